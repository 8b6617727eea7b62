"""Tensor parallelism: what factorised row-parallel layers save in communication, and decode speed.

    python bench/tensor_parallel.py [--shape smollm2-135m] [--tp 3] [--rounds 3] [--batches 1 8] [--tokens 32]
                                    [--ratio 0.4] [--json FILE]      (bench/gpu.sh: the record only)
    python bench/tensor_parallel.py --report FILE                      a record -> bench/results/*.md

1. Communication, from the shapes: per token and decoder layer a row-parallel o_proj and down_proj
   all_reduce `hidden` values each when dense; factorised they reduce their rank-r intermediate
   instead (`engine.model.tensor_parallel`). Ranks are SVD-LLM's uniform ones at `--ratio`
   (`bench/synthetic.py`), for the SmolLM2, Llama-3-8B and Qwen2-7B shapes.
2. The same, measured: every `all_reduce` rank 0 issues during greedy decode steps of a
   real-shaped `--shape` (default SmolLM2; random weights: bytes and speed do not depend on them) at `--tp`, dense and
   factorised, counted by size; the embedding's share (hidden per token) is separated out.
3. Decode tokens/s at `--tp` against one process, same folder, rounds alternating between the two
   engines (one tensor-parallel engine per process at a time: it owns the process group). On a CPU the ranks share its cores (gloo, one process each); on GPUs each rank has one.

Writes bench/results/tensor-parallel-<device>.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from environment import environment  # noqa: E402
from synthetic import SHAPES, build, linear_shapes, uniform_ranks  # noqa: E402

from engine import LLM, SamplingParams  # noqa: E402


def communication_table(ratio: float) -> list[dict]:
    """Values all_reduced per token per layer by o_proj + down_proj, dense vs factorised at `ratio`."""
    rows = []
    for shape in ("smollm2-135m", "llama3-8b", "qwen2-7b"):
        config = SHAPES[shape]
        hidden, layers = config["hidden_size"], config["num_hidden_layers"]
        linears = linear_shapes(config)
        ranks = uniform_ranks(linears, ratio)
        factorised = 0
        for i in range(layers):
            for leaf in ("self_attn.o_proj", "mlp.down_proj"):
                name = f"model.layers.{i}.{leaf}"
                out, inp = linears[name]
                r = ranks.get(name, min(out, inp))
                factorised += r if r * (out + inp) < out * inp else hidden
        rows.append({"shape": shape, "hidden": hidden, "layers": layers, "dense_values": 2 * hidden,
                     "factorised_values": factorised / layers, "ratio": ratio})
    return rows


class AllReduceCounter:
    """Counts the bytes of every torch.distributed.all_reduce this process issues."""

    def __init__(self):
        self.calls: list[int] = []
        self._original = dist.all_reduce

    def __enter__(self):
        def counting(tensor, *args, **kwargs):
            self.calls.append(tensor.numel() * tensor.element_size())
            return self._original(tensor, *args, **kwargs)

        dist.all_reduce = counting
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._original


def _prompts(batch: int, vocab: int, length: int = 16) -> list[list[int]]:
    g = torch.Generator().manual_seed(batch)
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(batch)]


def decode_seconds(llm: LLM, batch: int, tokens: int) -> float:
    """Seconds for `tokens` greedy decode steps of `batch` sequences (their prefill timed apart and removed)."""
    prompts = _prompts(batch, llm.vocab_size)
    start = time.perf_counter()
    llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True), use_tqdm=False)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    llm.generate(prompts, SamplingParams(max_tokens=tokens + 1, temperature=0, ignore_eos=True), use_tqdm=False)
    return time.perf_counter() - start - prefill


def measured_communication(llm: LLM, layers: int, hidden: int, tokens: int) -> dict:
    """Bytes rank 0 all_reduces per token computed, in decode: total, the embedding's, per layer.
    Each forward issues 1 + 2·layers all_reduces, the embedding's first ([T, hidden]: it gives T)."""
    prompt = _prompts(1, llm.vocab_size)
    llm.generate(prompt, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True), use_tqdm=False)  # prefill
    with AllReduceCounter() as counter:
        llm.generate(prompt, SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True), use_tqdm=False)
    itemsize = llm.model.dtype.itemsize
    per_forward = 1 + 2 * layers
    forwards = [counter.calls[i:i + per_forward] for i in range(0, len(counter.calls), per_forward)]
    computed = sum(f[0] for f in forwards) // (hidden * itemsize)  # tokens the forwards computed
    decode = [f for f in forwards if f[0] == hidden * itemsize]  # one token each
    per_layer = sum(sum(f[1:]) for f in decode) / len(decode) / layers
    return {"forwards": len(forwards), "tokens_computed": computed, "decode_forwards": len(decode),
            "bytes_per_token": sum(map(sum, decode)) / len(decode), "embedding_bytes": hidden * itemsize,
            "per_layer_bytes": per_layer, "per_layer_values": per_layer / itemsize, "calls_per_token": per_forward}


def _threads(tp: int) -> None:
    """One process: every core; a tensor-parallel rank: its share (as the workers take theirs)."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="smollm2-135m", choices=list(SHAPES))
    parser.add_argument("--tp", type=int, default=3, help="ranks (SmolLM2's 9 heads: 3 or 9)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--folders", type=Path, help="where the synthetic folders go (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--json", type=Path, help="write only the record, here")
    parser.add_argument("--report", type=Path, help="render a record written with --json into --out")
    args = parser.parse_args()
    if args.report:
        return write(json.loads(args.report.read_text()), args.out)
    env = environment()  # before any engine shares the cores out
    dtype = getattr(torch, args.dtype or ("float32" if args.device == "cpu" else "bfloat16"))
    table = communication_table(args.ratio)
    root = args.folders or Path(tempfile.mkdtemp(prefix="lowrank-tp-"))
    folders = {"dense": build(args.shape, root, dtype), f"r{args.ratio}": build(args.shape, root, dtype,
                                                                               ratio=args.ratio)}
    config = SHAPES[args.shape]
    settings = {"device": args.device, "max_model_len": 512, "kv_cache_memory": 256 << 20}
    measured, times = {}, {}
    for name, folder in folders.items():  # one tensor-parallel engine at a time: each owns the process group
        engines = {tp: LLM(folder, tensor_parallel_size=tp, **settings) for tp in (1, args.tp)}
        _threads(args.tp)
        measured[name] = measured_communication(engines[args.tp], config["num_hidden_layers"], config["hidden_size"],
                                                args.tokens)
        for _ in range(args.rounds):  # alternating: a drift of the machine lands on both alike
            for tp, llm in engines.items():
                _threads(tp)
                for batch in args.batches:
                    times.setdefault(f"{name}|{tp}|{batch}", []).append(decode_seconds(llm, batch, args.tokens))
        for llm in engines.values():
            llm.close()
    speed = {key: args.tokens * int(key.split("|")[2]) / min(values) for key, values in times.items()}
    device = "cpu" if args.device == "cpu" else torch.cuda.get_device_name().replace(" ", "-").lower()
    record = {"env": env, "shape": args.shape, "tp": args.tp, "device": device, "dtype": str(dtype),
              "tokens": args.tokens, "rounds": args.rounds, "communication": table, "measured": measured,
              "decode_tok_s": speed}
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    else:
        write(record, args.out)


def write(record: dict, out: Path) -> None:
    stem = out / f"tensor-parallel-{record['device']}"
    stem.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    stem.with_suffix(".md").write_text(report(record) + "\n")
    print(report(record))


def report(record: dict) -> str:
    env = record["env"]
    lines = [f"# Tensor parallelism: communication and decode speed ({record['device']})", "",
             f"`python bench/tensor_parallel.py --shape {record['shape']} --tp {record['tp']}` at commit {env.get('commit', '?')}, "
             f"{env.get('date', '?')}, torch {env.get('torch', '?')}, {env.get('device', '')}.", "",
             "## Values all_reduced per token per decoder layer (o_proj + down_proj)", "",
             "| shape | hidden | dense | factorised (SVD-LLM ranks at ratio "
             f"{record['communication'][0]['ratio']}) | saving | bf16 bytes dense → factorised |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in record["communication"]:
        d, f = row["dense_values"], row["factorised_values"]
        lines.append(f"| {row['shape']} | {row['hidden']} | {d} | {f:.0f} | {1 - f / d:.0%} | "
                     f"{2 * d:.0f} → {2 * f:.0f} |")
    lines += ["", f"## Measured: rank 0's all_reduce bytes per decode token ({record['shape']} shape, TP={record['tp']}, "
              f"{record['dtype'].removeprefix('torch.')})", "",
              "| folder | bytes per decode token | of which embedding | per layer | values per layer | all_reduces per token |",
              "|---|---:|---:|---:|---:|---:|"]
    for name, m in record["measured"].items():
        lines.append(f"| {name} | {m['bytes_per_token']:.0f} | {m['embedding_bytes']} | {m['per_layer_bytes']:.0f} | "
                     f"{m['per_layer_values']:.0f} | {m['calls_per_token']:.0f} |")
    lines += ["", f"## Decode tokens/s (best of {record['rounds']} alternating rounds, {record['tokens']} tokens)", "",
              "| folder | batch | TP=1 | TP=" + str(record["tp"]) + " | ratio |", "|---|---:|---:|---:|---:|"]
    speed = record["decode_tok_s"]
    for key in speed:
        name, tp, batch = key.split("|")
        if tp != "1":
            continue
        one, many = speed[key], speed[f"{name}|{record['tp']}|{batch}"]
        lines.append(f"| {name} | {batch} | {one:.1f} | {many:.1f} | {many / one:.2f}× |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
