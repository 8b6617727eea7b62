"""Where a benchmark ran: device, driver, versions, commit, date; the header of every results file."""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(*cmd: str) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def cpu() -> str:
    """'AMD EPYC, x86_64, AVX2': the model and the widest vector extension (the native kernels' tiles follow it)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    model = re.search(r"^model name\s*:\s*(.+)$", info, re.M)
    flags_line = re.search(r"^flags\s*:\s*(.+)$", info, re.M)
    flags = set(flags_line.group(1).split()) if flags_line else set()
    vector = next((name.upper() for name in ("avx512f", "avx2", "avx", "sse4_2") if name in flags), "")
    return ", ".join(part for part in ((model.group(1).strip() if model else ""), platform.machine(), vector) if part)


def environment() -> dict[str, str]:
    import torch
    import triton

    cuda = torch.cuda.is_available()
    driver = _run("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader") if cuda else ""
    return {
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({cpu()}, {torch.get_num_threads()} threads)",
        "driver": driver or "n/a",
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda or "n/a",
        "commit": _run("git", "rev-parse", "--short", "HEAD") + (" (dirty)" if _run("git", "status", "--porcelain", "--untracked-files=no") else ""),
        "date": datetime.date.today().isoformat(),
    }


def device_slug(env: dict[str, str]) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'; any CPU -> 'cpu'."""
    return re.sub(r"[^a-z0-9]+", "-", env["device"].split("(")[0].lower()).strip("-")


def header(title: str, env: dict[str, str], extra: dict[str, str] | None = None) -> list[str]:
    rows = env | (extra or {})
    return [f"# {title}", "", "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows.items()], ""]


def read_benchmarks(description: str, default_out: str) -> tuple[list[dict], dict[str, str], Path]:
    """CLI of the report scripts: a pytest-benchmark JSON in, (benchmarks, environment, output path) out.

    `default_out` may use {device} and {date}.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("json", type=Path)
    parser.add_argument("--out", type=Path, help=f"default: bench/results/{default_out}")
    args = parser.parse_args()
    benchmarks = json.loads(args.json.read_text())["benchmarks"]
    if not benchmarks:
        raise SystemExit(f"{args.json}: no benchmarks recorded (was --benchmark-enable given?)")
    env = environment()
    out = args.out or REPO / "bench" / "results" / default_out.format(device=device_slug(env), date=env["date"])
    return benchmarks, env, out


def write_report(out: Path, lines: list[str]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print(out)
