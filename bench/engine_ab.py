"""A/B the engine's CPU generation speed between two checkouts, alternating, on the same machine.

    .venv/bin/python bench/engine_ab.py OLD_CHECKOUT [NEW_CHECKOUT (default: this one)] [--rounds 4] [--repeats 3]

A refactor must not slow the engine, but this project's machine changes between sessions (and
moves a contender by +-10 % between runs), so `bench/results/engine-cpu.md` from another day is
no baseline. This times both checkouts in one run: each round starts a fresh process per
checkout, in alternating order, that generates with `bench_engine`'s workload (64-token prompts,
64 new tokens, greedy) on the dense model and its SoCo 0.4 folder (the ones `bench_engine.py`
uses) `--repeats` times per batch, and prints output tok/s. The best over all rounds and repeats
per checkout is reported: on a shared VM, noise only ever slows a run down.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BATCHES = (1, 16)

# Runs inside the checkout under test: only the public API both sides have (`engine.LLM`).
CHILD = r"""
import json, sys, time
import torch
sys.path.insert(0, sys.argv[1])
import engine
from engine import LLM, SamplingParams
assert engine.__file__.startswith(sys.argv[1]), engine.__file__  # this checkout's engine, not the installed one
out = {}
for name, folder in json.loads(sys.argv[2]).items():
    llm = LLM(folder, dtype=torch.float32, device="cpu", max_model_len=144, max_num_seqs=16,
              max_num_batched_tokens=1024, enable_prefix_caching=False)
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    for batch in json.loads(sys.argv[3]):
        prompts = torch.randint(100, 40000, (batch, 64), generator=torch.Generator().manual_seed(batch)).tolist()
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), use_tqdm=False)
        seconds = []
        for _ in range(int(sys.argv[4])):
            start = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            seconds.append(time.perf_counter() - start)
        out[f"{name} batch {batch}"] = batch * 64 / min(seconds)
print(json.dumps(out))
"""


def run_once(checkout: Path, folders: dict[str, str], repeats: int) -> dict[str, float]:
    # The default path on both sides: an older checkout picked Triton under TRITON_INTERPRET=1.
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LOWRANK_KERNELS")}
    result = subprocess.run([sys.executable, "-c", CHILD, str(checkout.resolve()), json.dumps(folders),
                             json.dumps(BATCHES), str(repeats)],
                            capture_output=True, text=True, cwd=checkout, check=True, env=env)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path, nargs="?", default=REPO)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="timed generations per workload per process")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "bench"))
    import bench_engine

    dense = bench_engine.dense_folder()
    folders = {"dense": str(dense), "soco-0.4": str(bench_engine.soco_folder(dense))}
    best: dict[str, dict[str, float]] = {"old": {}, "new": {}}
    for r in range(args.rounds):
        for side in (("old", "new") if r % 2 == 0 else ("new", "old")):
            for key, tok_s in run_once(getattr(args, side), folders, args.repeats).items():
                best[side][key] = max(best[side].get(key, 0.0), tok_s)
            print(f"round {r + 1} {side}: " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(best[side].items())),
                  flush=True)
    print("\n| workload | old tok/s | new tok/s | new/old |\n|---|---:|---:|---:|")
    for key in best["old"]:
        print(f"| {key} | {best['old'][key]:.1f} | {best['new'][key]:.1f} | {best['new'][key] / best['old'][key]:.3f} |")


if __name__ == "__main__":
    main()
