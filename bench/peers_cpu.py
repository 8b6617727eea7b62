"""Against llama.cpp on this CPU, in one run: decode throughput at batch 1, 16 and 64 and held-out
perplexity of llama.cpp's GGUFs of the dense SmolLM2 (F32, F16, Q8_0, Q4_K_M, Q3_K_M) and of ours
(dense and compressed folders, each in fp32, int8 and int4; the quantised ones also with int8
activations, "a8", and with an int8 KV cache besides, "a8kv8", where the CPU has VNNI), 2 threads
each. Every one of ours caches K/V in float16 (`kv_cache_dtype="float16"`) but the a8kv8 rows, as
llama.cpp caches them by default: the cache's bytes are the same on both sides.

    bash bench/peers/llama_cpp.sh                # once per machine: builds llama.cpp, makes the GGUFs
    .venv/bin/python bench/peers_cpu.py [--compressed FOLDER ...] [--rounds 3] [--skip-perplexity] [--name NAME]

Decode tok/s: 64-token prompts, `--new-tokens` greedy tokens per sequence, EOS ignored. llama.cpp:
`llama-batched-bench`'s S_TG (its decode throughput over all sequences). Ours: the engine's
`LLM.generate`, with the prefill taken out the same way: B·(N − 1) / (t(N) − t(1)), t(n) the
wall time of generating n tokens for the batch. Contenders alternate within each round (this VM
drifts by ±10 % between minutes) and each figure is the median over rounds.

Perplexity on valid.txt (or its first `--ppl-chars` characters, the same text for everyone): ours
with disjoint 512-token windows (`lowrank eval`'s default), our fp32 dense also with stride 256
(each scored token sees ≥ 256 tokens of context) to set beside `llama-perplexity -c 512`, which
scores the second half of each 512-token window. Each is
compared with its own unquantised reference (llama.cpp's F16, our fp32 dense), as ../shared/PEERS.md
says. File MB: whole-model file bytes (GGUF; our safetensors, float folders in bfloat16). Decode
MB: the weight bytes one decode step reads (ours: the serving form's packed matrices, fp32 served
from a bf16 file doubling them, `engine.model.cpu_serving.decode_weight_bytes`; llama.cpp's GGUF
is served as stored). The DRAM bandwidth measured here bounds decode at batch 1: tok/s ≤
bandwidth / decode bytes.

Our int8 folders round to nearest in groups of 64, int4 by GPTQ in groups of 32 (`lowrank
quantize` defaults), made under models/peers/ when missing. Writes bench/results/NAME.json, .md
and .png (NAME: peers-cpu by default).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from converters.calibrate import tokenize_file  # noqa: E402
from converters.pull import pull  # noqa: E402
from converters.quantize import QuantConfig, quantize_folder  # noqa: E402
from engine.eval.perplexity import perplexity  # noqa: E402
from environment import cpu, environment  # noqa: E402

RESULTS = REPO / "bench" / "results"
CORPUS = REPO.parent / "shared" / "corpus" / "pydocs"
PEERS = REPO / "models" / "peers"
PROMPT_LEN = 64
THREADS = 2
KV_BYTES = 640 << 20  # per engine (all stay loaded): 64 sequences of 208 tokens of float32 SmolLM2 K/V fit
GGUF_TYPES = ("f32", "f16", "q8_0", "q4_k_m", "q3_k_m")


def peer_cache() -> Path:
    """The folder bench/peers/llama_cpp.sh filled (it prints it); a clear error where it has not run."""
    try:
        out = subprocess.run(["bash", str(REPO / "bench" / "peers" / "llama_cpp.sh")], capture_output=True, text=True,
                             check=True, timeout=7200).stdout.strip().splitlines()
    except subprocess.CalledProcessError as exc:
        raise SystemExit(f"bench/peers/llama_cpp.sh failed:\n{exc.stderr[-2000:]}") from None
    return Path(out[-1])


KV = {"kv_cache_dtype": "float16"}  # every row's cache but a8kv8's: llama.cpp's default (F16 K and V)
FAST = {"a8": KV | {"int8_activations": True}, "a8kv8": {"int8_activations": True, "kv_cache_dtype": "int8"}}


def our_folders(dense: Path, compressed: list[Path]) -> dict[str, tuple[Path, dict]]:
    """name -> (folder, engine settings): dense and each `compressed`, in fp32 and quantised (made
    once under models/peers), the quantised ones also with FAST's settings where the CPU multiplies in
    integers."""
    from kernels.cpu.gemm import int8_products

    formats = {"int8": QuantConfig(bits=8), "int4": QuantConfig(bits=4, calib=str(CORPUS / "train.txt"))}
    folders = {}
    for base_name, base in (("dense", dense), *((c.name, c) for c in compressed)):
        folders[f"ours {base_name} fp32"] = base, KV
        for label, config in formats.items():
            out = PEERS / f"{base.name}-{label}"
            if not (out / "lowrank.json").is_file():
                quantize_folder(base, out, config)
            folders[f"ours {base_name} {label}"] = out, KV
            if int8_products():
                for fast, settings in FAST.items():
                    folders[f"ours {base_name} {label} {fast}"] = out, settings
    return folders


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


class Ours:
    """One engine per folder, loaded once; decode throughput with the prefill taken out."""

    def __init__(self, folder: Path, settings: dict, batches: list[int], new_tokens: int):
        from engine import LLM
        from engine.model.cpu_serving import decode_weight_bytes

        self.llm = LLM(folder, dtype="float32", device="cpu", max_num_seqs=max(batches),
                       max_model_len=PROMPT_LEN + new_tokens + 16, max_num_batched_tokens=max(batches) * PROMPT_LEN,
                       enable_prefix_caching=False, kv_cache_memory=KV_BYTES, **settings)
        self.vocab = self.llm.model.config.vocab_size
        self.decode_bytes = decode_weight_bytes(self.llm.model)

    def decode_tok_s(self, batch: int, new_tokens: int) -> float:
        from engine import SamplingParams

        gen = torch.Generator().manual_seed(batch)
        prompts = torch.randint(100, min(40000, self.vocab), (batch, PROMPT_LEN), generator=gen).tolist()

        def timed(n: int) -> float:
            start = time.perf_counter()
            self.llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)
            return time.perf_counter() - start

        timed(2)  # warm: first-call allocations
        return batch * (new_tokens - 1) / (timed(new_tokens) - timed(1))


def llama_decode(bin_dir: Path, gguf: Path, batches: list[int], new_tokens: int) -> dict[int, float]:
    """llama-batched-bench's S_TG t/s per batch size, one call for all of them."""
    ctx = max(batches) * (PROMPT_LEN + new_tokens) + 256
    out = subprocess.run([str(bin_dir / "llama-batched-bench"), "-m", str(gguf), "-c", str(ctx), "-b", "2048",
                          "-ub", "512", "-npp", str(PROMPT_LEN), "-ntg", str(new_tokens),
                          "-npl", ",".join(map(str, batches)), "-t", str(THREADS)],
                         capture_output=True, text=True, check=True, timeout=3600).stdout
    return parse_batched_bench(out)


def parse_batched_bench(text: str) -> dict[int, float]:
    """{B: S_TG t/s} from llama-batched-bench's markdown table."""
    lines = [line for line in text.splitlines() if line.strip().startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    at_b, at_tg = header.index("B"), header.index("S_TG t/s")
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    return {int(r[at_b]): float(r[at_tg]) for r in rows if r[at_b].isdigit()}


def llama_perplexity(bin_dir: Path, gguf: Path, text: Path) -> float:
    out = subprocess.run([str(bin_dir / "llama-perplexity"), "-m", str(gguf), "-f", str(text), "-c", "512",
                          "-b", "512", "-t", str(THREADS)], capture_output=True, text=True, check=True, timeout=7200)
    match = re.search(r"Final estimate: PPL = ([0-9.]+)", out.stdout + out.stderr)
    if match is None:
        raise SystemExit(f"llama-perplexity printed no final estimate for {gguf}:\n{out.stderr[-2000:]}")
    return float(match.group(1))


def our_perplexity(folder: Path, settings: dict, ids: list[int], both_strides: bool) -> dict[str, float]:
    """Disjoint 512-token windows; with `both_strides` also stride 256 (twice the work), the figure to
    set beside llama-perplexity's absolute one."""
    from engine import load_model
    from engine.model.cpu_serving import to_cpu_serving

    model = load_model(folder, device="cpu", dtype="float32")
    model.use_kv_cache_dtype(settings.get("kv_cache_dtype", "auto"))
    to_cpu_serving(model, settings.get("int8_activations", False))  # the served path: the native kernels
    return {f"ppl_stride{s}": perplexity(model, ids, ctx=512, stride=s).perplexity
            for s in ((512, 256) if both_strides else (512,))}


def dram_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes per second of a large copy (read + write) with THREADS threads: the decode floor's bandwidth."""
    src = torch.ones(int(gib * (1 << 30)) // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compressed", type=Path, nargs="*", help="our compressed folders to set beside the dense "
                        "one (default: models/quality/soco+heal-0.4, else soco-0.4, when bench/quality.py made them)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-perplexity", action="store_true")
    parser.add_argument("--ppl-chars", type=int, help="score only the first N characters of valid.txt (every "
                        "contender the same text; default: the whole file)")
    parser.add_argument("--report-only", action="store_true", help="rewrite the table and plot from NAME.json")
    parser.add_argument("--name", default="peers-cpu", help="results file stem under bench/results (default peers-cpu)")
    args = parser.parse_args()
    if args.report_only:
        return write_report(json.loads((RESULTS / f"{args.name}.json").read_text()), args.name)
    torch.set_num_threads(THREADS)
    cache = peer_cache()
    dense = pull("smollm2-135m", REPO / "models")
    default = next((f for f in (REPO / "models" / "quality" / n for n in ("soco+heal-0.4", "soco-0.4"))
                    if (f / "lowrank.json").is_file()), None)
    compressed = args.compressed if args.compressed is not None else [default] if default else []
    if not compressed:
        print("no compressed folder (give --compressed): timing the dense contenders only", file=sys.stderr)
    ours = our_folders(dense, compressed)
    ggufs = {f"llama.cpp {t.upper()}": cache / "gguf" / f"{dense.name}-{t}.gguf" for t in GGUF_TYPES}
    rows = {name: {"kind": "ours", "path": str(f), "settings": settings, "bytes": folder_bytes(f)}
            for name, (f, settings) in ours.items()}
    rows |= {name: {"kind": "llama.cpp", "path": str(g), "bytes": g.stat().st_size, "decode_bytes": g.stat().st_size}
             for name, g in ggufs.items()}
    engines = {name: Ours(folder, settings, args.batches, args.new_tokens) for name, (folder, settings) in ours.items()}
    for name, engine in engines.items():
        rows[name]["decode_bytes"] = engine.decode_bytes
    samples: dict[str, dict[int, list[float]]] = {name: {b: [] for b in args.batches} for name in rows}
    for round_ in range(args.rounds):  # alternate: every contender once per round
        for name in rows:
            if name in engines:
                for b in args.batches:
                    samples[name][b].append(engines[name].decode_tok_s(b, args.new_tokens))
            else:
                for b, tok_s in llama_decode(cache / "bin", ggufs[name], args.batches, args.new_tokens).items():
                    samples[name][b].append(tok_s)
            print(f"round {round_ + 1}: {name}", {b: round(v[-1], 1) for b, v in samples[name].items()}, flush=True)
    for name, row in rows.items():
        row["decode_tok_s"] = {str(b): statistics.median(v) for b, v in samples[name].items()}
    if not args.skip_perplexity:
        from engine.model.loader import load_tokenizer

        text = CORPUS / "valid.txt"
        if args.ppl_chars:
            text = PEERS / f"valid-{args.ppl_chars}.txt"
            text.write_text((CORPUS / "valid.txt").read_text()[:args.ppl_chars])
        ids = tokenize_file(load_tokenizer(dense), text)
        for name, row in rows.items():
            if row["kind"] == "ours":
                row |= our_perplexity(Path(row["path"]), row["settings"], ids, both_strides=name == "ours dense fp32")
            else:
                row["ppl_llama"] = llama_perplexity(cache / "bin", Path(row["path"]), text)
            print(name, {k: v for k, v in row.items() if k.startswith("ppl")}, flush=True)
    record = {"environment": environment() | {"cpu": cpu()}, "threads": THREADS,
              "dram_bandwidth_gb_s": dram_bandwidth() / 1e9, "prompt_len": PROMPT_LEN, "new_tokens": args.new_tokens,
              "rounds": args.rounds, "ppl_text": f"valid.txt[:{args.ppl_chars}]" if args.ppl_chars else "valid.txt",
              "rows": rows}
    (RESULTS / f"{args.name}.json").write_text(json.dumps(record, indent=1) + "\n")
    write_report(record, args.name)


def write_report(record: dict, name: str = "peers-cpu") -> None:
    """NAME.md (table) and NAME.png (tok/s and perplexity ratio against bytes)."""
    rows, batches = record["rows"], list(next(iter(record["rows"].values()))["decode_tok_s"])
    ref = {"ours": rows.get("ours dense fp32", {}).get("ppl_stride512"), "llama.cpp": rows.get("llama.cpp F16", {}).get("ppl_llama")}
    bandwidth = record["dram_bandwidth_gb_s"]
    env = record["environment"]
    lines = ["# Against llama.cpp on CPU: decode throughput and perplexity, one run", "",
             f"{env.get('cpu')}, {record['threads']} threads; {env.get('date', '')}, commit {env.get('commit', '')}. "
             f"Prompts of {record['prompt_len']} tokens, {record['new_tokens']} new tokens per sequence, decode tok/s "
             f"(prefill excluded), median of {record['rounds']} alternating rounds (`bench/peers_cpu.py`). DRAM "
             f"bandwidth (copy, {record['threads']} threads): {bandwidth:.1f} GB/s; at batch 1 a step reads every "
             "weight once, so `decode MB x tok/s` is the bandwidth a contender draws.", "",
             f"Perplexity on {record.get('ppl_text', 'valid.txt')}, each against its own reference (llama.cpp: its F16 with "
             "`llama-perplexity -c 512`; ours: our fp32 dense, disjoint 512-token windows); `ours ctx≥256` scores "
             "the tokens llama-perplexity scores (stride 256), to set beside its absolute figure.", "",
             "| contender | file MB | decode MB | " + " | ".join(f"batch {b} tok/s" for b in batches)
             + " | GB/s drawn at batch 1 | PPL | × reference | ours ctx≥256 |",
             "|---|---:|---:|" + "---:|" * len(batches) + "---:|---:|---:|---:|"]
    for contender, row in rows.items():
        ppl = row.get("ppl_stride512") if row["kind"] == "ours" else row.get("ppl_llama")
        ratio = f"{ppl / ref[row['kind']]:.4f}" if ppl and ref[row["kind"]] else "–"
        tok = " | ".join(f"{row['decode_tok_s'][b]:.1f}" for b in batches)
        ctx256 = f"{row['ppl_stride256']:.3f}" if row.get("ppl_stride256") else "–"
        decode = row.get("decode_bytes", row["bytes"])  # records before decode bytes were measured
        drawn = decode * row["decode_tok_s"][batches[0]] / 1e9
        lines.append(f"| {contender} | {row['bytes'] / 1e6:.0f} | {decode / 1e6:.0f} | {tok} | {drawn:.1f} | "
                     f"{f'{ppl:.3f}' if ppl else '–'} | {ratio} | {ctx256} |")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    plot(rows, batches, ref, RESULTS / f"{name}.png")


def plot(rows: dict, batches: list[str], ref: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.get_cmap("tab20").colors
    for i, (name, row) in enumerate(rows.items()):
        marker = "o" if row["kind"] == "ours" else "s"
        mb = row["bytes"] / 1e6
        tok = [row["decode_tok_s"][b] for b in batches]  # one colour per contender, a line through its batch sizes
        axes[0].plot([mb] * len(tok), tok, marker=marker, color=colors[i % len(colors)], label=name)
        ppl = row.get("ppl_stride512") if row["kind"] == "ours" else row.get("ppl_llama")
        if ppl and ref[row["kind"]]:
            axes[1].scatter(mb, ppl / ref[row["kind"]], marker=marker)
            axes[1].annotate(name, (mb, ppl / ref[row["kind"]]), fontsize=7)
    axes[0].set(xlabel="model MB", ylabel="decode tok/s", yscale="log",
                title=f"throughput against bytes (batch {', '.join(batches)}: one point each)")
    axes[0].legend(fontsize=6)
    axes[1].set(xlabel="model MB", ylabel="perplexity / own reference", title="perplexity against bytes")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main()
