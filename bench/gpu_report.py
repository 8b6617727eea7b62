"""Turn what one `bench/gpu.sh` run left in its $OUT into one report: bench/results/gpu-<device>-<date>.md.

    python bench/gpu_report.py DIR [--out FILE]

The device, versions, commit and measured ceilings come from DIR/env.json (the run's machine,
not this one); then how each stage ended, which CUDA tests failed, and the kernel, latent
attention and engine tables (the same tables `kernels_report`, `latent_report` and
`engine_report` print), each against the targets the issues set. A missing or empty file is
reported as such: a stage that failed still leaves the others' figures readable.
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine_report  # noqa: E402
import kernels_report  # noqa: E402
import latent_report  # noqa: E402
from environment import REPO, device_slug  # noqa: E402

TARGETS = [
    "Low-rank decode GEMM (M <= 16) at >= 80 % of the measured copy bandwidth and >= 1.3x two cuBLAS GEMMs; "
    "prefill >= 0.9x two GEMMs.",
    "Latent attention >= 1.5x SDPA at 8k context, kv 0.5.",
    "The 0.4 model >= 1.4x the dense one's decode tok/s; the engine >= 3x transformers `generate` at batch 16.",
]
ENV_ROWS = ("device", "driver", "torch", "triton", "cuda", "transformers", "python", "commit", "date")


def _stages(folder: Path) -> list[dict]:
    file = folder / "stages.jsonl"
    return [json.loads(line) for line in file.read_text().splitlines() if line.strip()] if file.is_file() else []


def _tests(folder: Path) -> list[str]:
    file = folder / "tests.xml"
    if not file.is_file():
        return ["No tests.xml: the tests stage did not finish (see stages and log.txt)."]
    root = ET.parse(file).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    lines = [f"{counts['tests']} tests: {counts['tests'] - counts['failures'] - counts['errors'] - counts['skipped']} "
             f"passed, {counts['failures']} failed, {counts['errors']} errors, {counts['skipped']} skipped.", ""]
    for case in root.iter("testcase"):
        for kind in ("failure", "error"):
            problem = case.find(kind)
            if problem is not None:
                message = (problem.get("message") or problem.text or "").strip().splitlines()
                lines.append(f"- {kind}: `{case.get('classname')}::{case.get('name')}`: "
                             f"{message[0][:300] if message else ''}")
    return lines


def _benchmarks(folder: Path, name: str) -> list[dict] | None:
    file = folder / name
    if not file.is_file():
        return None
    return json.loads(file.read_text()).get("benchmarks") or None


def report(folder: Path) -> tuple[list[str], dict]:
    env = json.loads((folder / "env.json").read_text()) if (folder / "env.json").is_file() else {}
    ceilings = env.get("ceilings", {})
    lines = [f"# GPU run on {env.get('device', 'an unknown device')}", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {env[k]} |" for k in ENV_ROWS if k in env]
    if ceilings:
        lines.append(f"| measured copy | {ceilings['copy_GBps']} GB/s (read + write) |")
        lines.append(f"| measured matmul | {ceilings['matmul_TFLOPs']} TFLOP/s ({ceilings['matmul']}) |")
    if env.get("dry_run"):
        lines.append("| dry run | yes: tiny sizes on the CPU, not figures |")
    lines += ["", "## Stages", "", "| stage | exit | seconds | budget | timed out |", "|---|---:|---:|---:|---|"]
    lines += [f"| {s['stage']} | {s['rc']} | {s['seconds']} | {s['budget']} | {'yes' if s['timed_out'] else ''} |"
              for s in _stages(folder)]
    lines += ["", "## CUDA tests", "", *_tests(folder), "", "## Targets", "", *[f"- {t}" for t in TARGETS], ""]
    sections = (("Low-rank GEMM", "kernels.json", kernels_report.table),
                ("Latent decode attention", "latent.json", latent_report.table),
                ("Engine", "engine.json", engine_report.table))
    for title, name, table in sections:
        benchmarks = _benchmarks(folder, name)
        lines += [f"## {title}", ""]
        if benchmarks is None:
            lines += [f"No figures: {name} is missing or empty (see the stages above and log.txt).", ""]
            continue
        if name == "engine.json":
            lines += [engine_report.description(benchmarks[0]["extra_info"]), ""]
        if name == "kernels.json":
            copy = ceilings.get("copy_GBps")
            if copy:
                lines += [f"`of copy`: decode GB/s (M <= {kernels_report.DECODE_ROWS}) over the measured copy, "
                          f"{copy} GB/s. Each call re-reads the same A and B: factors that fit in the GPU's L2 "
                          "(on an H200 60 MB: every layer here but Llama-3-8B's gate, up and down) are read from it, "
                          "so read those rows' share as an upper bound, not an HBM figure.", ""]
            lines += [*kernels_report.table(benchmarks, copy), ""]
            continue
        lines += [*table(benchmarks), ""]
    return lines, env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    lines, env = report(args.folder)
    slug = device_slug({"device": env.get("device", "unknown")})
    out = args.out or REPO / "bench" / "results" / f"gpu-{slug}-{env.get('date', 'undated')}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print(out)


if __name__ == "__main__":
    main()
