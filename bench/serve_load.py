"""Load test of a running `lowrank serve`: N concurrent clients, a fixed number of requests.

    lowrank serve smollm2-135m --port 8000 &
    .venv/bin/python bench/serve_load.py --port 8000 --model smollm2-135m --clients 16 --requests 64

Each client streams completions through the official `openai` client (greedy, a fixed prompt
length and exactly --max-tokens new tokens, EOS ignored) one after another. Reports requests/s,
output tokens/s, latency p50/p99 and time to first token p50/p99, and appends the run to
bench/results/serve-<device>.md with the machine header.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from environment import REPO, device_slug, environment, header, write_report  # noqa: E402

WORDS = "the quick brown fox jumps over the lazy dog while a python script parses json logs".split()


def _prompt(i: int, words: int) -> str:
    return " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(words))


async def _client(api, model: str, jobs: asyncio.Queue, max_tokens: int, words: int, samples: list) -> None:
    while True:
        try:
            i = jobs.get_nowait()
        except asyncio.QueueEmpty:
            return
        start = time.perf_counter()
        first, tokens = None, 0
        stream = await api.completions.create(model=model, prompt=_prompt(i, words), max_tokens=max_tokens,
                                              temperature=0, stream=True, extra_body={"ignore_eos": True},
                                              stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text and first is None:
                first = time.perf_counter() - start
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        samples.append((time.perf_counter() - start, first or 0.0, tokens))


def _pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


async def run(args: argparse.Namespace) -> dict:
    from openai import AsyncOpenAI

    api = AsyncOpenAI(base_url=f"http://{args.host}:{args.port}/v1", api_key=args.api_key, max_retries=0,
                      timeout=600)
    jobs: asyncio.Queue = asyncio.Queue()
    for i in range(args.requests):
        jobs.put_nowait(i)
    samples: list = []
    start = time.perf_counter()
    async with api:  # closes the HTTP pool inside this event loop
        await asyncio.gather(*[_client(api, args.model, jobs, args.max_tokens, args.prompt_words, samples)
                               for _ in range(args.clients)])
    wall = time.perf_counter() - start
    latency, ttft = [s[0] for s in samples], [s[1] for s in samples]
    return {"clients": args.clients, "requests": len(samples), "wall_s": wall,
            "requests_per_s": len(samples) / wall, "output_tok_per_s": sum(s[2] for s in samples) / wall,
            "latency_p50_s": _pct(latency, 50), "latency_p99_s": _pct(latency, 99),
            "ttft_p50_s": _pct(ttft, 50), "ttft_p99_s": _pct(ttft, 99)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model", required=True, help="the served model name")
    parser.add_argument("--api-key", default="none")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=32, help="requests per client count")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompt-words", type=int, default=32)
    parser.add_argument("--out", type=Path, help="default: bench/results/serve-<device>.md")
    args = parser.parse_args()
    rows = []
    for clients in args.clients:
        result = asyncio.run(run(argparse.Namespace(**vars(args) | {"clients": clients})))
        rows.append(result)
        print(result)
    env = environment()
    out = args.out or REPO / "bench" / "results" / f"serve-{device_slug(env)}.md"
    lines = [*header(f"`lowrank serve` under load on {env['device']}", env, {
                 "model": args.model, "workload": f"{args.prompt_words}-word prompts, {args.max_tokens} new tokens, "
                                                  "greedy, EOS ignored, streamed"}),
             "| clients | requests | req/s | output tok/s | latency p50 s | p99 s | TTFT p50 s | p99 s |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['clients']} | {r['requests']} | {r['requests_per_s']:.2f} | {r['output_tok_per_s']:.1f} | "
                     f"{r['latency_p50_s']:.2f} | {r['latency_p99_s']:.2f} | {r['ttft_p50_s']:.3f} | "
                     f"{r['ttft_p99_s']:.3f} |")
    write_report(out, [*lines, ""])


if __name__ == "__main__":
    main()
