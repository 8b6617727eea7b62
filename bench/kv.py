"""The KV table: LoRC latent K/V on SmolLM2-135M, quality and memory.

    .venv/bin/python bench/kv.py [--kv-ratios 0.25 0.5 0.75] [--bases dense soco-0.3]

For each base (the dense model; the SoCo 0.3 folder bench/quality.py made) it calibrates once on
train.txt, factorises every K/V projection once, then for each kv_ratio writes a progressive and
a uniform folder into models/kv/ and measures held-out perplexity on valid.txt (whole file, ctx
512, stride 512: the quality table's protocol, so the numbers compare with it). Each cell is
saved to bench/results/kv.json as soon as it exists, so an interrupted run resumes. Writes kv.md
(with the memory table: KV bytes per token and the largest batch that fits a KV budget at each
context) and kv.png beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from environment import environment  # noqa: E402
from quality import held_out_ppl  # noqa: E402

from converters.calibrate import tokenize_file  # noqa: E402
from converters.lorc import LoRCConfig, latent_ranks, prepare_kv, write_latent_folder  # noqa: E402
from converters.pull import pull  # noqa: E402

RESULTS = REPO / "bench" / "results"
CORPUS = REPO.parent / "shared" / "corpus" / "pydocs"
BASES = {"dense": lambda: pull("smollm2-135m", REPO / "models"), "soco-0.3": lambda: REPO / "models/quality/soco-0.3"}
SCHEDULES = ("progressive", "uniform")
BUDGET_GIB = 4  # the KV budget of the memory table
CONTEXTS = (1024, 4096, 8192, 16384)
SERVE_BYTES = 2  # the memory table is for fp16/bf16 serving


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kv-ratios", type=float, nargs="+", default=[0.5, 0.25, 0.75])
    parser.add_argument("--bases", nargs="+", default=list(BASES), choices=list(BASES))
    parser.add_argument("--samples", type=int, default=64)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    store = RESULTS / "kv.json"
    results = json.loads(store.read_text()) if store.exists() else {"cells": {}}
    tokenizer = AutoTokenizer.from_pretrained(BASES["dense"]())
    valid = tokenize_file(tokenizer, CORPUS / "valid.txt")

    def save() -> None:
        results["environment"] = environment()
        store.write_text(json.dumps(results, indent=2) + "\n")

    for base in args.bases:
        source = BASES[base]()
        key = f"{base}/none"
        if key not in results["cells"]:
            results["cells"][key] = {"base": base, "kv_ratio": 0.0, "schedule": "none", "ppl": held_out_ppl(source, valid),
                                     "kv_bytes_per_token": None, "ranks": None}
            save()
        prepared = None
        for kv_ratio in args.kv_ratios:
            for schedule in SCHEDULES:
                key = f"{base}/{schedule}/{kv_ratio}"
                if key in results["cells"]:
                    continue
                config = LoRCConfig(kv_ratio=kv_ratio, schedule=schedule, calib=str(CORPUS / "train.txt"),
                                    samples=args.samples)
                prepared = prepared or prepare_kv(source, config)
                start = time.perf_counter()
                kv = latent_ranks(prepared, config)
                folder = REPO / "models" / "kv" / f"{base}-{schedule}-{kv_ratio}"
                write_latent_folder(prepared, folder, kv)
                results["cells"][key] = {"base": base, "kv_ratio": kv_ratio, "schedule": schedule,
                                         "achieved_kv_ratio": kv["achieved_kv_ratio"], "ranks": kv["ranks"],
                                         "sensitivity": kv["sensitivity"], "ppl": held_out_ppl(folder, valid),
                                         "convert_seconds": round(time.perf_counter() - start, 1)}
                save()
                print(f"{key}: ppl {results['cells'][key]['ppl']:.3f}", flush=True)
    write_report(results)


def kv_bytes_per_token(ranks: list[list[int]] | None, layers: int, width: int) -> int:
    total = 2 * layers * width if ranks is None else sum(r_k + r_v for r_k, r_v in ranks)
    return total * SERVE_BYTES


def write_report(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = results["cells"]
    layers, width = 30, 192  # SmolLM2-135M: 30 layers, 3 KV heads x 64
    lines = ["# LoRC latent KV cache on SmolLM2-135M-Instruct", "",
             "Held-out perplexity on ../shared/corpus/pydocs/valid.txt (whole file, ctx 512, stride 512, fp32), "
             "calibration on train.txt only. `kv_ratio` is the fraction of KV-cache bytes removed; progressive "
             "ranks come from measured per-projection sensitivity, uniform ranks are the same in every layer, "
             "at the same total.", "",
             "A compressed base caches at most the ranks its K/V already have, so its achieved kv_ratio can "
             "exceed the target; both schedules then cache the same total.", "",
             "| base | kv_ratio | achieved | progressive | uniform | KV bytes/token (fp16) |",
             "|---|---:|---:|---:|---:|---:|"]
    for base in BASES:
        none = cells.get(f"{base}/none")
        if none:
            lines.append(f"| {base} | 0 | 0 | {none['ppl']:.3f} | {none['ppl']:.3f} | "
                         f"{kv_bytes_per_token(None, layers, width)} |")
        for kv_ratio in sorted({c["kv_ratio"] for c in cells.values() if c["base"] == base and c["kv_ratio"]}):
            p, u = cells.get(f"{base}/progressive/{kv_ratio}"), cells.get(f"{base}/uniform/{kv_ratio}")
            ranks, achieved = (p or u)["ranks"], (p or u)["achieved_kv_ratio"]
            lines.append(f"| {base} | {kv_ratio} | {achieved:.3f} | " + (f"{p['ppl']:.3f} | " if p else "n/a | "))
            lines[-1] += (f"{u['ppl']:.3f} | " if u else "n/a | ") + f"{kv_bytes_per_token(ranks, layers, width)} |"
    lines += ["", f"## Memory: the largest batch whose contexts fit {BUDGET_GIB} GiB of KV cache (fp16)", "",
              "| kv_ratio | bytes/token | " + " | ".join(f"ctx {c}" for c in CONTEXTS) + " |",
              "|---:|---:|" + "---:|" * len(CONTEXTS)]
    ratios = [0.0] + sorted({c["kv_ratio"] for c in cells.values() if c["kv_ratio"]})
    for kv_ratio in ratios:
        cell = next((c for c in cells.values() if c["kv_ratio"] == kv_ratio and c["ranks"]), None)
        per_token = kv_bytes_per_token(cell["ranks"] if cell else None, layers, width)
        tokens = BUDGET_GIB * 2**30 // per_token
        lines.append(f"| {kv_ratio} | {per_token} | " + " | ".join(str(tokens // c) for c in CONTEXTS) + " |")
    progressive = [c for c in cells.values() if c["schedule"] == "progressive" and c["base"] == "dense"]
    if progressive:
        last = max(progressive, key=lambda c: c["kv_ratio"])
        lines += ["", f"Progressive ranks (dense base, kv_ratio {last['kv_ratio']}), per layer [r_k, r_v]: "
                  + ", ".join(f"{i}:{r}" for i, r in enumerate(last["ranks"]))]
    env = results.get("environment", {})
    lines += ["", f"Measured on {env.get('device', 'cpu')}, commit {env.get('commit', '?')}, {env.get('date', '?')}."]
    (RESULTS / "kv.md").write_text("\n".join(lines) + "\n")

    fig, ax = plt.subplots(figsize=(6, 4))
    for base in BASES:
        for schedule, style in (("progressive", "-o"), ("uniform", "--s")):
            pts = sorted((c["kv_ratio"], c["ppl"]) for c in cells.values() if c["base"] == base
                         and c["schedule"] in (schedule, "none"))
            if len(pts) > 1:
                ax.plot(*zip(*pts), style, label=f"{base}, {schedule}")
    ax.set_xlabel("kv_ratio (fraction of KV-cache bytes removed)")
    ax.set_ylabel("held-out perplexity")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "kv.png", dpi=120)


if __name__ == "__main__":
    main()
