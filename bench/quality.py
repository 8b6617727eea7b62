"""The quality table: held-out perplexity of SmolLM2-135M compressed by svd, svd-llm and soco.

    .venv/bin/python bench/quality.py [--ratios 0.2 0.3 0.4 0.5] [--steps 400] [--samples 128]

Calibrates once (train.txt), factorises once per whitening, then for each ratio bakes every
method into models/quality/ and measures perplexity on valid.txt (whole file, ctx 512, stride
512). Each measured cell is saved to bench/results/quality.json as soon as it exists, so an
interrupted run resumes where it stopped. Writes quality.md and quality.png beside it.
Also measures what the rank-prefix property costs: the 0.3 soco folder served at 0.4 vs a
direct 0.4 conversion.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from converters.compress import CompressConfig, compress_prepared, prepare  # noqa: E402
from converters.pull import pull  # noqa: E402
from engine import load_model  # noqa: E402
from engine.perplexity import load_text, perplexity  # noqa: E402

RESULTS = REPO / "bench" / "results"
CORPUS = REPO.parent / "shared" / "corpus" / "pydocs"
METHODS = ("svd", "svd-llm", "soco")


def held_out_ppl(folder: Path, token_ids: list[int], ratio: float | None = None) -> float:
    model = load_model(folder, device="cpu", dtype="float32", ratio=ratio)
    model.pack_for_cpu()  # packed CPU GEMMs (engine.cpu_gemm): the same figures, faster (dense 12.784 either way)
    return perplexity(model, token_ids, ctx=512, stride=512).perplexity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.3, 0.4, 0.5])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--steps", type=int, default=400, help="SoCo steps per ratio")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--prefix-check", action="store_true", help="also serve soco 0.3 at 0.4")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    RESULTS.mkdir(parents=True, exist_ok=True)
    store = RESULTS / "quality.json"
    results = json.loads(store.read_text()) if store.exists() else {}
    model_dir = pull("smollm2-135m", REPO / "models")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    valid = tokenizer(load_text(CORPUS / "valid.txt"), add_special_tokens=False, verbose=False)["input_ids"]

    def save(key: str, value: dict) -> None:
        results[key] = value | {"commit": _commit()}
        store.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")

    if "dense" not in results:
        save("dense", {"ppl": held_out_ppl(model_dir, valid)})
    base = CompressConfig(ratio=0.3, calib=str(CORPUS / "train.txt"), samples=args.samples,
                          seq_len=args.seq_len, steps=args.steps)
    prepared = {}
    for method in args.methods:
        whiten = method != "svd"
        todo = [r for r in args.ratios if f"{method}@{r}" not in results]
        if not todo:
            continue
        if whiten not in prepared:
            prepared.clear()  # one set of float64 factors in memory at a time
            prepared[whiten] = prepare(model_dir, replace(base, method=method), whiten)
        for ratio in todo:
            out = REPO / "models" / "quality" / f"{method}-{ratio}"
            config = replace(base, method=method, ratio=ratio)
            start = time.perf_counter()
            manifest = compress_prepared(prepared[whiten], model_dir, out, config)
            seconds = time.perf_counter() - start  # SoCo training + bake; calibration is shared
            save(f"{method}@{ratio}", {"ppl": held_out_ppl(out, valid), "achieved_ratio": manifest["achieved_ratio"],
                                       "model_ratio": manifest["model_ratio"], "bake_seconds": round(seconds, 1),
                                       "prepare_seconds": round(prepared[whiten].seconds, 1),
                                       "steps": args.steps if method == "soco" else 0})
    if args.prefix_check and "prefix soco 0.3->0.4" not in results:
        folder = REPO / "models" / "quality" / "soco-0.3"
        save("prefix soco 0.3->0.4", {"ppl": held_out_ppl(folder, valid, ratio=0.4)})
    write_report(results, args)


def _commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()


def write_report(results: dict, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = sorted({float(k.split("@")[1]) for k in results if "@" in k})
    lines = [
        "# Quality: SmolLM2-135M-Instruct, held-out perplexity",
        "",
        f"Dense: **{results['dense']['ppl']:.3f}**. Perplexity on ../shared/corpus/pydocs/valid.txt (whole file,",
        "ctx 512, stride 512, fp32, CPU). Ratio = fraction of the decoder's linear parameters removed.",
        f"Calibration: train.txt, {args.samples} windows × {args.seq_len} tokens; SoCo: {args.steps} steps of 2 × 128 tokens.",
        "",
        "| method | " + " | ".join(f"{r:.1f}" for r in ratios) + " |",
        "|---|" + "---|" * len(ratios),
    ]
    for method in METHODS:
        cells = [results.get(f"{method}@{r}") for r in ratios]
        lines.append(f"| {method} | " + " | ".join(f"{c['ppl']:.3f}" if c else "–" for c in cells) + " |")
    lines += ["", "Times: `prepare` = load + calibration + factorisation, shared by all ratios of a method (not",
              "recorded for the first cells); `train+bake` = SoCo training (soco only) + bake.", "",
              "| cell | achieved ratio | whole-model ratio | prepare (s) | train+bake (s) | commit |",
              "|---|---|---|---|---|---|"]
    for key, cell in sorted(results.items()):
        if "@" in key:
            lines.append(f"| {key} | {cell['achieved_ratio']:.4f} | {cell['model_ratio']:.4f} | "
                         f"{cell.get('prepare_seconds', '–')} | {cell['bake_seconds']} | {cell['commit']} |")
    if "prefix soco 0.3->0.4" in results:
        direct = results.get("soco@0.4", {}).get("ppl")
        lines += ["", f"Rank prefix: the soco 0.3 folder served at 0.4 gives "
                      f"{results['prefix soco 0.3->0.4']['ppl']:.3f}" + (f" vs {direct:.3f} converted directly." if direct else ".")]
    (RESULTS / "quality.md").write_text("\n".join(lines) + "\n")

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in METHODS:
        pts = [(r, results[f"{method}@{r}"]["ppl"]) for r in ratios if f"{method}@{r}" in results]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=method)
    ax.axhline(results["dense"]["ppl"], color="gray", linestyle="--", label="dense")
    ax.set(yscale="log", xlabel="fraction of decoder linear parameters removed", ylabel="held-out perplexity",
           title="SmolLM2-135M on valid.txt")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "quality.png", dpi=120)


if __name__ == "__main__":
    main()
