"""Turn a `bench/bench_latent_attention.py` pytest-benchmark JSON into the latent-attention table.

    .venv/bin/python bench/latent_report.py latent.json [--out bench/results/latent-attention-<device>-<date>.md]

One row per (shape, batch, context): median time per call of each contender, the bytes of cache
the latent one reads in GB/s, and its speed-up over SDPA on the full cache (the issue's target:
>= 1.5x at 8k context, kv_ratio 0.5, on a GPU) and over our paged decode.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from environment import header, read_benchmarks, write_report  # noqa: E402

CONTENDERS = ("latent", "sdpa", "paged", "flash")


def table(benchmarks: list[dict]) -> list[str]:
    cells: dict[tuple[str, int, int], dict[str, dict]] = {}
    for b in benchmarks:
        info = b["extra_info"]
        cells.setdefault((info["shape"], info["batch"], info["context"]), {})[info["contender"]] = \
            info | {"seconds": b["stats"]["median"] / info["inner"]}
    lines = ["| shape | batch | context | rank | " + " | ".join(f"{c} µs" for c in CONTENDERS)
             + " | latent GB/s | vs sdpa | vs paged |", "|---|---:|---:|---:|" + "---:|" * (len(CONTENDERS) + 3)]
    for (shape, batch, context), c in sorted(cells.items()):
        if "latent" not in c:
            continue
        latent = c["latent"]
        times = " | ".join(f"{c[n]['seconds'] * 1e6:.1f}" if n in c else "n/a" for n in CONTENDERS)
        ratio = lambda name: f"{c[name]['seconds'] / latent['seconds']:.2f}×" if name in c else "n/a"  # noqa: E731
        lines.append(f"| {shape} | {batch} | {context} | {latent['rank']} | {times} | "
                     f"{latent['cache_bytes'] / latent['seconds'] / 1e9:.0f} | {ratio('sdpa')} | {ratio('paged')} |")
    return lines


def main() -> None:
    benchmarks, env, out = read_benchmarks(__doc__.splitlines()[0], "latent-attention-{device}-{date}.md")
    first = benchmarks[0]["extra_info"]
    triton_used = any(b["extra_info"]["triton"] for b in benchmarks if b["extra_info"]["contender"] == "latent")
    lines = [
        *header(f"Latent decode attention on {env['device']}", env, {
            "measured on": first["device"], "dtype": first["dtype"],
            "latent runs": "the Triton kernel" if triton_used else "the torch reference (no GPU)"}),
        "One query per sequence over the whole context; kv_ratio 0.5 latents (rank = half of n_kv·head_dim "
        "for K and for V); time = median per call. `vs` columns: their time / latent's (above 1: latent is "
        "faster). GB/s counts the latent cache bytes read once.",
        "",
        *table(benchmarks),
        "",
    ]
    write_report(out, lines)


if __name__ == "__main__":
    main()
