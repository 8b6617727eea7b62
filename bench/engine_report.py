"""Turn a `bench/bench_engine.py` pytest-benchmark JSON into bench/results/engine-<device>.md.

    .venv/bin/python bench/engine_report.py engine.json [--out FILE]

Per batch size: output tokens/s of each contender (batch × new tokens / median wall time of a
whole `generate`), decode tokens/s (the tokens after the first over the time after the first
token), time to first token (median of 1-token generates of the same batch), and the ratios the
targets are stated in: ours vs transformers, compressed vs dense.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from environment import header, read_benchmarks, write_report  # noqa: E402


def table(benchmarks: list[dict]) -> list[str]:
    cells: dict[int, dict[str, dict]] = {}
    for b in benchmarks:
        info = b["extra_info"]
        total = b["stats"]["median"]
        tok_s = info["batch"] * info["new_tokens"] / total
        decode_s = info["batch"] * (info["new_tokens"] - 1) / (total - info["ttft_s"])  # tokens after the first
        cells.setdefault(info["batch"], {})[info["contender"]] = info | {"tok_s": tok_s, "decode_s": decode_s}
    lines = ["| batch | contender | output tok/s | decode tok/s | TTFT ms | vs transformers | vs ours-dense "
             "| decode vs ours-dense |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for batch in sorted(cells):
        row = cells[batch]
        hf, dense = row.get("hf-dense"), row.get("ours-dense")
        for name, c in sorted(row.items()):
            vs_hf = f"{c['tok_s'] / hf['tok_s']:.2f}×" if hf else "n/a"
            vs_dense = f"{c['tok_s'] / dense['tok_s']:.2f}×" if dense else "n/a"
            decode_vs_dense = f"{c['decode_s'] / dense['decode_s']:.2f}×" if dense else "n/a"
            lines.append(f"| {batch} | {name} | {c['tok_s']:.1f} | {c['decode_s']:.1f} | {c['ttft_s'] * 1e3:.0f} "
                         f"| {vs_hf} | {vs_dense} | {decode_vs_dense} |")
    return lines


def description(info: dict) -> str:
    """What was timed: the real SmolLM2 (and its SoCo 0.4 folder) or a synthetic real-shaped model."""
    model = info.get("model", "smollm2-135m")
    if model.startswith("synthetic"):
        return (f"A {model.removeprefix('synthetic ')}-shaped model with random weights (`bench/synthetic.py`): ours dense, "
                "factorised at 0.4 and with LoRC latents at kv 0.5, transformers `generate` on the dense one, timed in "
                "the same run (median of the rounds).")
    return ("SmolLM2-135M-Instruct: ours on the dense folder and on its SoCo 0.4 compression, transformers "
            "`generate` on the dense one, timed in the same run (median of the rounds).")


def main() -> None:
    benchmarks, env, out = read_benchmarks(__doc__.splitlines()[0], "engine-{device}.md")
    first = benchmarks[0]["extra_info"]
    lines = [
        *header(f"Generation engine on {env['device']}", env, {
            "measured on": first["device"], "dtype": first["dtype"],
            "workload": f"{first['prompt_len']}-token prompts, {first['new_tokens']} new tokens each, greedy, EOS ignored"}),
        description(first),
        "",
        *table(benchmarks),
        "",
    ]
    write_report(out, lines)


if __name__ == "__main__":
    main()
