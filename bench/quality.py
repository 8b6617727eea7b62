"""The quality table: held-out perplexity of SmolLM2-135M compressed, then healed, at 0.2-0.5.

    .venv/bin/python bench/quality.py [--rows ...] [--ratios 0.2 0.3 0.4 0.5] [--budget-minutes 60]

Rows (`ROWS`): svd and svd-llm (uniform ranks), soco (SoCo, fixed target), soco-p (SoCo with
its progressive stage 1, measured worse so far), svd-llm+heal and soco+heal (each folder healed
at its own ratio), and soco+heal[0.2-0.5] (the soco 0.2 folder healed once over [0.2, 0.5],
served at each ratio). Calibration, SoCo and healing read
train.txt only; perplexity is measured on the whole valid.txt (ctx 512, stride 512, fp32).

Every cell is saved to bench/results/quality.json as soon as it exists, and healing runs in
chunks of `--chunk` steps that checkpoint (`converters.heal`), so a run stopped by
`--budget-minutes` (or by anything else) goes on where it stopped when started again. The
healing curve (`--curve`) evaluates the soco+heal 0.3 run's weights at its checkpoints.
Writes quality.md and quality.png beside the JSON.
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from converters.atomic import atomic_write_text  # noqa: E402
from converters.calibrate import tokenize_file  # noqa: E402
from converters.compress import CompressConfig, compress_prepared, prepare  # noqa: E402
from converters.heal import HealConfig, heal  # noqa: E402
from converters.pull import pull  # noqa: E402
from engine import load_model  # noqa: E402
from engine.eval.perplexity import perplexity  # noqa: E402
from engine.model.checkpoint import read_manifest  # noqa: E402
from engine.model.cpu_serving import to_cpu_serving  # noqa: E402
from environment import cpu  # noqa: E402

RESULTS = REPO / "bench" / "results"
CORPUS = REPO.parent / "shared" / "corpus" / "pydocs"
MODELS = REPO / "models" / "quality"
BASE_ROWS = ("svd", "svd-llm", "soco", "soco-p")  # compression alone
HEALED_ROWS = ("svd-llm+heal", "soco+heal")
NESTED = "soco+heal[0.2-0.5]"
ROWS = BASE_ROWS + HEALED_ROWS + (NESTED,)
NESTED_RANGE = (0.2, 0.5)
CURVE = "curve soco+heal@0.3"


def held_out_ppl(folder: Path, token_ids: list[int], ratio: float | None = None) -> float:
    model = load_model(folder, device="cpu", dtype="float32", ratio=ratio)
    to_cpu_serving(model)  # the packed CPU GEMMs: the same figures, faster (dense 12.784 either way)
    return perplexity(model, token_ids, ctx=512, stride=512).perplexity


class Table:
    """quality.json, written after every cell."""

    def __init__(self, store: Path):
        self.store = store
        self.cells = json.loads(store.read_text()) if store.exists() else {}

    def __contains__(self, key: str) -> bool:
        return key in self.cells

    def save(self, key: str, value: dict) -> None:
        self.cells[key] = value | {"commit": _commit(), "cpu": cpu()}  # cell times depend on the machine
        atomic_write_text(self.store, json.dumps(self.cells, indent=2, sort_keys=True) + "\n")


class Runner:
    def __init__(self, args: argparse.Namespace, table: Table, model_dir: Path, valid: list[int]):
        self.args, self.table, self.model_dir, self.valid = args, table, model_dir, valid
        self.deadline = time.monotonic() + 60 * args.budget_minutes
        self.prepared: dict = {}
        self.base = CompressConfig(ratio=0.3, calib=str(CORPUS / "train.txt"), samples=args.samples,
                                   seq_len=args.seq_len, steps=args.steps)
        self.heal_config = HealConfig(steps=args.heal_steps, calib=str(CORPUS / "train.txt"), lr=args.heal_lr,
                                      checkpoint_every=args.chunk)

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline

    def base_folder(self, method: str, ratio: float) -> Path:
        """The compressed folder of a base row (made, and its cell measured, when either is missing)."""
        folder = MODELS / f"{method}-{ratio}"
        key = f"{method}@{ratio}"
        if (folder / "lowrank.json").is_file() and key in self.table:
            return folder
        whiten = method != "svd"
        if whiten not in self.prepared:
            self.prepared.clear()  # one set of float64 factors in memory at a time
            self.prepared[whiten] = prepare(self.model_dir, replace(self.base, method="svd-llm" if whiten else "svd"),
                                            whiten)
        soco_method = "soco" if method.startswith("soco") else method
        config = replace(self.base, method=soco_method, ratio=ratio, progressive=method == "soco-p")
        start = time.perf_counter()
        manifest = compress_prepared(self.prepared[whiten], self.model_dir, folder, config)
        seconds = time.perf_counter() - start  # SoCo training + bake; calibration is shared
        # Measured again whenever the folder is remade (models/ is not kept between checkouts), so the
        # cell always describes the very folder its +heal row heals.
        self.table.save(key, {"ppl": held_out_ppl(folder, self.valid), "achieved_ratio": manifest["achieved_ratio"],
                              "model_ratio": manifest["model_ratio"], "bake_seconds": round(seconds, 1),
                              "prepare_seconds": round(self.prepared[whiten].seconds, 1),
                              "steps": self.args.steps if soco_method == "soco" else 0})
        return folder

    def healed(self, source: Path, out: Path, config: HealConfig, curve: bool = False) -> dict | None:
        """Heal in checkpointed chunks until done (-> the manifest) or out of time (-> None)."""
        while not self.out_of_time():
            step = _checkpoint_step(out)
            snapshot = out.with_name(f"{out.name}.at-{step + self.args.chunk}") if curve else None
            manifest = heal(source, out, config, teacher=self.model_dir, resume=True, stop_after=self.args.chunk,
                            snapshot=snapshot)
            if curve and snapshot is not None and snapshot.exists():
                self._add_point(read_manifest(snapshot)["healing"]["steps_done"], held_out_ppl(snapshot, self.valid))
            if manifest is not None:
                return manifest
        return None

    def heal_cell(self, row: str, ratio: float) -> None:
        key = f"{row}@{ratio}"
        if key in self.table or self.out_of_time():
            return
        method = row.removesuffix("+heal")
        source = self.base_folder(method, ratio)
        out = MODELS / f"{row}-{ratio}"
        curve = self.args.curve and row == "soco+heal" and ratio == 0.3
        manifest = self.healed(source, out, self.heal_config, curve) if not (out / "lowrank.json").is_file() \
            else read_manifest(out)
        if manifest is None:
            return
        record = manifest["healing"]
        ppl = held_out_ppl(out, self.valid)
        self.table.save(key, {"ppl": ppl, "achieved_ratio": manifest["achieved_ratio"],
                              "heal_seconds": record["seconds"], "heal_steps": record["config"]["steps"],
                              "final_kl": record["final_kl"], "step_seconds": record["step_seconds"],
                              "peak_rss_mib": record["peak_rss_mib"], "heal": record["config"]})
        if curve:
            self._add_point(record["steps_done"], ppl)

    def _add_point(self, steps: int, ppl: float) -> None:
        points = dict(self.table.cells.get(CURVE, {}).get("points", [])) | {str(steps): ppl}
        self.table.save(CURVE, {"points": sorted(points.items(), key=lambda kv: int(kv[0]))})

    def nested_cells(self, ratios: list[float]) -> None:
        lo, hi = NESTED_RANGE
        todo = [r for r in ratios if lo <= r <= hi and f"{NESTED}@{r}" not in self.table]
        if not todo or self.out_of_time():
            return
        source = self.base_folder("soco", lo)
        out = MODELS / f"soco+heal-{lo}-{hi}"
        config = replace(self.heal_config, max_ratio=hi)
        manifest = self.healed(source, out, config) if not (out / "lowrank.json").is_file() else read_manifest(out)
        if manifest is None:
            return
        record = manifest["healing"]
        for ratio in todo:
            self.table.save(f"{NESTED}@{ratio}", {"ppl": held_out_ppl(out, self.valid, ratio=ratio),
                                                  "heal_seconds": record["seconds"],
                                                  "heal_steps": record["config"]["steps"], "heal": record["config"]})


def _checkpoint_step(out: Path) -> int:
    from converters.heal import CHECKPOINT
    from engine.model.checkpoint import open_weights

    file = out.with_name(f"{out.name}.partial") / CHECKPOINT
    if not file.is_file():
        return 0
    with open_weights(file) as f:
        return json.loads(f.metadata()["progress"])["step"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.3, 0.4, 0.5])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--steps", type=int, default=400, help="SoCo steps per ratio")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--heal-steps", type=int, default=400)
    parser.add_argument("--heal-lr", type=float, default=None, help="default: converters.heal's")
    parser.add_argument("--chunk", type=int, default=100, help="healing steps between checkpoints")
    parser.add_argument("--budget-minutes", type=float, default=float("inf"),
                        help="start no new chunk of work after this long; run again to go on")
    parser.add_argument("--curve", action="store_true", help="perplexity of soco+heal 0.3 at each checkpoint")
    parser.add_argument("--prefix-check", action="store_true", help="also serve soco 0.3 at 0.4")
    parser.add_argument("--report-only", action="store_true", help="rewrite quality.md / .png from the JSON")
    args = parser.parse_args()

    RESULTS.mkdir(parents=True, exist_ok=True)
    _commit()
    table = Table(RESULTS / "quality.json")
    if not args.report_only:
        from transformers import AutoTokenizer

        model_dir = pull("smollm2-135m", REPO / "models")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        valid = tokenize_file(tokenizer, CORPUS / "valid.txt")
        if "dense" not in table:
            table.save("dense", {"ppl": held_out_ppl(model_dir, valid)})
        runner = Runner(args, table, model_dir, valid)
        for row in args.rows:
            for ratio in args.ratios:
                if runner.out_of_time():
                    break
                if row in BASE_ROWS and f"{row}@{ratio}" not in table:
                    runner.base_folder(row, ratio)
                elif row in HEALED_ROWS:
                    runner.heal_cell(row, ratio)
            if row == NESTED:
                runner.nested_cells(args.ratios)
        if args.prefix_check and "prefix soco 0.3->0.4" not in table:
            table.save("prefix soco 0.3->0.4", {"ppl": held_out_ppl(MODELS / "soco-0.3", valid, ratio=0.4)})
    write_report(table.cells)


def _ppl(ppl: float, dense: float) -> str:
    return f"{ppl:.3f} ({ppl / dense:.2f}×)" if ppl < 1e4 else f"{ppl:.1e}"


@functools.cache
def _commit() -> str:
    """The commit this process started from (read once: commits made while a cell runs are not its code)."""
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()


def write_report(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = sorted({float(k.split("@")[1]) for k in results if "@" in k and not k.startswith("curve")})
    dense = results["dense"]["ppl"]
    lines = [
        "# Quality: SmolLM2-135M-Instruct, held-out perplexity",
        "",
        f"Dense: **{dense:.3f}**. Perplexity on ../shared/corpus/pydocs/valid.txt (whole file, ctx 512,",
        "stride 512, fp32, CPU). Ratio = fraction of the decoder's linear parameters removed. Calibration,",
        "SoCo and healing read train.txt only (128 windows × 512 tokens for the Grams; SoCo 400 steps of",
        "2 × 128 tokens; healing as recorded per cell below). `soco`: fixed target; `soco-p` ramps its",
        "target (`converters.soco`, `progressive=True`); `+heal` distils the factors from the dense model",
        "(`converters.heal`); the last row is one healing run over [0.2, 0.5] served at each ratio.",
        "",
        "| method | " + " | ".join(f"{r:.1f}" for r in ratios) + " |",
        "|---|" + "---|" * len(ratios),
    ]
    for row in ROWS:
        cells = [results.get(f"{row}@{r}") for r in ratios]
        if any(cells):
            lines.append(f"| {row} | " + " | ".join(_ppl(c["ppl"], dense) if c else "–" for c in cells) + " |")
    lines += ["", "Cells: achieved ratio, and the CPU time each took on the machine named per cell: `prepare` =",
              "load + calibration + factorisation, shared by a method's ratios; `compress` = SoCo training + bake;",
              "`heal` = healing steps (teacher and student forward, backward, Adam). The machine changes between",
              "sessions: cells with no CPU recorded ran on the 2-core AVX2 Zen 3 of the earlier sessions.", "",
              "| cell | ratio | prepare (s) | compress (s) | heal steps | heal (s) | s/step | final KL | peak RSS (MiB) | CPU | commit |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, cell in sorted(results.items()):
        if "@" not in key or key.startswith("curve"):
            continue
        step = cell.get("step_seconds")
        per_step = f"{sum(step.values()):.2f}" if step else "–"
        lines.append(f"| {key} | {cell['achieved_ratio']:.4f} | {cell.get('prepare_seconds', '–')} | "
                     f"{cell.get('bake_seconds', '–')} | {cell.get('heal_steps', '–')} | {cell.get('heal_seconds', '–')} | "
                     f"{per_step} | {cell.get('final_kl', '–')} | {cell.get('peak_rss_mib', '–')} | {cell.get('cpu', '–')} | "
                     f"{cell['commit']} |"
                     if "achieved_ratio" in cell else
                     f"| {key} | – | – | – | {cell.get('heal_steps', '–')} | {cell.get('heal_seconds', '–')} (shared) | "
                     f"– | – | – | {cell.get('cpu', '–')} | {cell['commit']} |")
    if CURVE in results:
        lines += ["", "Healing curve (soco 0.3, one 400-step run's weights at its checkpoints, mid-schedule):", "",
                  "| steps | " + " | ".join(s for s, _ in results[CURVE]["points"]) + " |",
                  "|---|" + "---|" * len(results[CURVE]["points"]),
                  "| perplexity | " + " | ".join(f"{p:.3f}" for _, p in results[CURVE]["points"]) + " |"]
    if "prefix soco 0.3->0.4" in results:
        direct = results.get("soco@0.4", {}).get("ppl")
        lines += ["", f"Rank prefix: the soco 0.3 folder served at 0.4 gives "
                      f"{results['prefix soco 0.3->0.4']['ppl']:.3f}" + (f" vs {direct:.3f} converted directly." if direct else ".")]
    (RESULTS / "quality.md").write_text("\n".join(lines) + "\n")

    fig, axes = plt.subplots(1, 2 if CURVE in results else 1, figsize=(11 if CURVE in results else 6, 4), squeeze=False)
    ax = axes[0][0]
    for row in ROWS:
        if row == "svd":
            continue  # off the chart (10^7)
        pts = [(r, results[f"{row}@{r}"]["ppl"]) for r in ratios if f"{row}@{r}" in results]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=row, linestyle="--" if row in BASE_ROWS else "-")
    ax.axhline(dense, color="gray", linestyle=":", label="dense")
    ax.set(yscale="log", xlabel="fraction of decoder linear parameters removed", ylabel="held-out perplexity",
           title="SmolLM2-135M on valid.txt")
    ax.legend(fontsize=8)
    if CURVE in results:
        ax = axes[0][1]
        steps, ppl = zip(*((int(s), p) for s, p in results[CURVE]["points"]))
        base = results.get("soco@0.3", {}).get("ppl")
        if base:
            steps, ppl = (0, *steps), (base, *ppl)
        ax.plot(steps, ppl, marker="o")
        ax.axhline(dense, color="gray", linestyle=":", label="dense")
        ax.set(xlabel="healing steps (4 × 256 tokens each)", ylabel="held-out perplexity", title="soco 0.3 healing")
    fig.tight_layout()
    fig.savefig(RESULTS / "quality.png", dpi=120)


if __name__ == "__main__":
    main()
