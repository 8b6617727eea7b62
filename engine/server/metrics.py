"""Prometheus text exposition of what operators chart for vLLM, under our own `lowrank:` prefix.

Written by hand (the format is a few lines of text) rather than adding prometheus_client.
Updated on the engine thread, read by the HTTP thread: plain ints and floats under the GIL.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class Histogram:
    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0
    n: int = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1

    def lines(self, name: str) -> list[str]:
        out, cumulative = [], 0
        for bound, count in zip(self.buckets, self.counts):
            cumulative += count
            out.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
        out += [f'{name}_bucket{{le="+Inf"}} {self.n}', f"{name}_sum {self.total}", f"{name}_count {self.n}"]
        return out


@dataclass
class Metrics:
    prefix: str = "lowrank:"
    num_requests_running: int = 0
    num_requests_running_max: int = 0  # peak concurrency since start: shows batching happened
    num_requests_waiting: int = 0
    kv_cache_usage_perc: float = 0.0  # fraction of cache blocks in use, 0..1 (vLLM's convention)
    kv_cache_blocks: int = 0  # blocks the cache budget holds (more with a LoRC latent cache)
    kv_cache_bytes_per_token: int = 0  # over all layers: K and V, or their latents
    prefix_cache_hits: int = 0  # prompt tokens served from the prefix cache
    num_preemptions: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    request_success: int = 0
    time_to_first_token_seconds: Histogram = field(default_factory=Histogram)
    time_per_output_token_seconds: Histogram = field(default_factory=Histogram)
    e2e_request_latency_seconds: Histogram = field(default_factory=Histogram)

    def render(self) -> str:
        p, lines = self.prefix, []
        gauges = ("num_requests_running", "num_requests_running_max", "num_requests_waiting", "kv_cache_usage_perc",
                  "kv_cache_blocks", "kv_cache_bytes_per_token")
        for name in gauges:
            lines += [f"# TYPE {p}{name} gauge", f"{p}{name} {getattr(self, name)}"]
        counters = ("prefix_cache_hits", "num_preemptions", "prompt_tokens", "generation_tokens", "request_success")
        for name in counters:
            lines += [f"# TYPE {p}{name}_total counter", f"{p}{name}_total {getattr(self, name)}"]
        for name in ("time_to_first_token_seconds", "time_per_output_token_seconds", "e2e_request_latency_seconds"):
            lines += [f"# TYPE {p}{name} histogram", *getattr(self, name).lines(p + name)]
        return "\n".join(lines) + "\n"
