"""Turn a `bench/bench_cpu_kernels.py` pytest-benchmark JSON into bench/results/cpu-kernels-<device>.md.

    .venv/bin/python bench/cpu_kernels_report.py cpu.json [--out FILE]

Median times, and each contender against oneDNN's dense GEMM (the GEMM baseline) or the torch
reference (the attention baseline), timed in the same run.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from environment import header, read_benchmarks, write_report  # noqa: E402


def gemm_table(benchmarks: list[dict]) -> list[str]:
    ms = {(b["extra_info"]["rows"], b["extra_info"]["kernel"], b["extra_info"]["form"]): b["stats"]["median"] * 1e3
          for b in benchmarks if b["extra_info"]["kind"] == "gemm"}
    lines = ["| rows | kernel | dense ms | factorised ms | dense vs onednn dense | factorised vs onednn dense |",
             "|---:|---|---:|---:|---:|---:|"]
    for rows in sorted({r for r, _, _ in ms}):
        base = ms.get((rows, "onednn", "dense"))
        for kernel in ("native", "onednn", "torch", "native-int8", "native-int4"):
            dense, low = ms.get((rows, kernel, "dense")), ms.get((rows, kernel, "lowrank"))
            if dense is None or low is None:
                continue
            speed = (lambda t: f"{base / t:.2f}×") if base else (lambda t: "n/a")
            lines.append(f"| {rows} | {kernel} | {dense:.2f} | {low:.2f} | {speed(dense)} | {speed(low)} |")
    return lines


def attention_table(benchmarks: list[dict]) -> list[str]:
    us = {(b["extra_info"]["batch"], b["extra_info"]["context"], b["extra_info"]["kernel"]): b["stats"]["median"] * 1e6
          for b in benchmarks if b["extra_info"]["kind"] == "attention"}
    lines = ["| batch | context | native µs | torch reference µs | speed-up |", "|---:|---:|---:|---:|---:|"]
    for batch, context in sorted({(b, c) for b, c, _ in us}):
        native, ref = us.get((batch, context, "native")), us.get((batch, context, "torch"))
        if native and ref:
            lines.append(f"| {batch} | {context} | {native:.0f} | {ref:.0f} | {ref / native:.2f}× |")
    return lines


def main() -> None:
    benchmarks, env, out = read_benchmarks(__doc__.splitlines()[0], "cpu-kernels-{device}.md")
    first = next(b["extra_info"] for b in benchmarks if b["extra_info"]["kind"] == "gemm")
    lines = [
        *header(f"CPU kernels on {env['device']}", env, {"threads": str(first["threads"]), "dtype": "float32"}),
        f"GEMMs: all 7 projections of {first['layers']} SmolLM2-135M layers (distinct weights, more than the L3), "
        "dense and factorised at a 0.4 compression's ranks; median of 7 rounds.",
        "",
        *gemm_table(benchmarks),
        "",
        "Paged decode attention, SmolLM2's heads (9 query, 3 KV, head size 64), blocks of 16; median of 20 rounds.",
        "",
        *attention_table(benchmarks),
        "",
    ]
    write_report(out, lines)


if __name__ == "__main__":
    main()
