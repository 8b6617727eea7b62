"""Healing recipe sweep: short runs on the real SmolLM2 svd-llm 0.3 folder, compared by their KL to the teacher.

    .venv/bin/python bench/heal_recipe.py [--steps 60] [--folder models/svdllm-0.3] '{"lr": 1e-3}' ...

Each argument is a JSON object of `HealConfig` fields; every run sees the same train.txt windows
in the same order (same seed), so the KL curves are paired. Nothing here reads valid.txt: the
recipe is chosen on the calibration text alone. Appends to bench/results/heal-recipe.json and
rewrites heal-recipe.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from converters.heal import HealConfig, heal  # noqa: E402

RESULTS = REPO / "bench" / "results"
TRAIN = REPO.parent / "shared" / "corpus" / "pydocs" / "train.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", help="JSON objects of HealConfig fields, one per run")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--folder", default=str(REPO / "models" / "svdllm-0.3"))
    args = parser.parse_args()
    store = RESULTS / "heal-recipe.json"
    runs = json.loads(store.read_text()) if store.exists() else []
    scratch = REPO / "models" / "heal-recipe-scratch"
    for spec in args.runs:
        settings = json.loads(spec)
        config = HealConfig(steps=args.steps, calib=str(TRAIN), checkpoint_every=10_000, **settings)
        record = heal(args.folder, scratch, config)["healing"]
        shutil.rmtree(scratch)
        runs.append({"settings": settings, "steps": args.steps, "folder": Path(args.folder).name,
                     "curve": [(h["step"], h["kl"]) for h in record["history"]], "final_kl": record["final_kl"],
                     "step_seconds": record["step_seconds"], "trainable_params": record["trainable_params"],
                     "peak_rss_mib": record["peak_rss_mib"]})
        store.write_text(json.dumps(runs, indent=1) + "\n")
    write_report(runs)


def write_report(runs: list[dict]) -> None:
    steps = sorted({s for run in runs for s, _ in run["curve"]})
    lines = ["# Healing recipe: KL to the dense teacher on train.txt windows (SmolLM2-135M)", "",
             "Short runs from the same folder, the same windows in the same order; KL of that step's fresh",
             "batch (4 × 256 tokens, never seen before), in nats. Lower is better. valid.txt is not read.",
             "s/step depends on what else shared the 2 cores (a test run, for the slowest rows).", "",
             "| folder | settings | " + " | ".join(f"step {s}" for s in steps) + " | trainable | s/step |",
             "|---|---|" + "---|" * len(steps) + "---|---|"]
    for run in runs:
        curve = dict(run["curve"])
        lines.append(f"| {run['folder']} | `{json.dumps(run['settings'])}` | "
                     + " | ".join(f"{curve[s]:.3f}" if s in curve else "–" for s in steps)
                     + f" | {run['trainable_params'] / 1e6:.1f}M | {sum(run['step_seconds'].values()):.2f} |")
    (RESULTS / "heal-recipe.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
