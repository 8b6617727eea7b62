"""The GPU run's first stage: where it runs, and the two ceilings every figure is read against.

    python bench/gpu_env.py OUT.json [--dry]

Records `environment.environment()` (device, driver, versions, commit, date; on the device
machine, which has no git, the commit comes from `GPU_COMMIT`), the GPU's clocks and memory as
`nvidia-smi` reports them, and two measured ceilings (METHOD.md: datasheet rates are leads):
a large device-to-device copy (bytes read + written per second) and a bf16 matrix product
(FLOP/s), each the median of CUDA-event timings after a warm-up, on random data. `--dry` (no
GPU: CI's run of `bench/gpu.sh`) measures the same on the CPU at tiny sizes, float32.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from environment import environment  # noqa: E402


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: allocation, handles, clocks up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ceilings(dry: bool) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    copy_bytes = (1 << 20) if dry else (2 << 30)  # 2 GiB each way: far past the L2
    src = torch.randn(copy_bytes // 4, device=device)
    dst = torch.empty_like(src)
    copy_s = _median_seconds(lambda: dst.copy_(src), 5 if dry else 20)
    n = 256 if dry else 8192
    dtype = torch.float32 if dry else torch.bfloat16
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    mm_s = _median_seconds(lambda: a @ b, 5 if dry else 20)
    return {"copy_GBps": round(2 * copy_bytes / copy_s / 1e9, 1), "copy_bytes": copy_bytes,
            "matmul_TFLOPs": round(2 * n**3 / mm_s / 1e12, 2), "matmul": f"{n}x{n}x{n} {str(dtype).removeprefix('torch.')}"}


def gpu_state() -> dict:
    """nvidia-smi's view, or nothing where there is none (the dry run)."""
    fields = "name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw"
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return dict(zip(fields.split(","), (v.strip() for v in out.split(",")))) if out else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--dry", action="store_true", help="tiny sizes, float32, the CPU where there is no GPU")
    args = parser.parse_args()
    env = environment()
    if not env["commit"] or env["commit"] == " (dirty)":
        env["commit"] = os.environ.get("GPU_COMMIT", "unknown")
    import transformers

    record = env | {"transformers": transformers.__version__, "python": sys.version.split()[0], "dry_run": args.dry,
                    "gpu": gpu_state(), "ceilings": ceilings(args.dry)}
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record["ceilings"]))


if __name__ == "__main__":
    main()
