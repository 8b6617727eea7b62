"""Probe for the int8/int4 formats: held-out perplexity of SmolLM2-135M with every decoder linear
replaced by its round-trip through `kernels.quant` (round-to-nearest, no calibration), per
(bits, group). It decides the group size before any kernel exists: what the format itself costs,
with no kernel error in it. Embeddings and the head stay fp32. Writes bench/results/quant-rtn.md.

    .venv/bin/python bench/quant_rtn.py [--configs 8/32 8/64 4/32 4/64] [--windows 24]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from converters.calibrate import decoder_linears, tokenize_file  # noqa: E402
from converters.pull import pull  # noqa: E402
from engine import load_model  # noqa: E402
from engine.eval.perplexity import perplexity  # noqa: E402
from engine.model.cpu_serving import to_cpu_serving  # noqa: E402
from environment import cpu  # noqa: E402
from kernels.quant import dequantize, quantize  # noqa: E402

RESULTS = REPO / "bench" / "results"
CORPUS = REPO.parent / "shared" / "corpus" / "pydocs"


def round_trip(model: torch.nn.Module, bits: int, group: int) -> int:
    """Replace every decoder Linear's weight by dequantize(quantize(w)); returns the count."""
    names = decoder_linears(model)
    for name in names:
        module = model.get_submodule(name)
        module.weight.data = dequantize(quantize(module.weight.data, bits, group))
    return len(names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["8/32", "8/64", "4/32", "4/64"])
    parser.add_argument("--windows", type=int, default=None, help="only the first N windows of 512 tokens")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    model_dir = pull("smollm2-135m", REPO / "models")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    valid = tokenize_file(tokenizer, CORPUS / "valid.txt")
    if args.windows:
        valid = valid[: args.windows * 512]
    out = RESULTS / "quant-rtn.json"
    rows = {}
    for config in ["fp32"] + args.configs:
        bits, group = (32, 0) if config == "fp32" else map(int, config.split("/"))
        model = load_model(model_dir, device="cpu", dtype="float32")
        linears = round_trip(model, bits, group) if group else 0
        to_cpu_serving(model)
        start = time.perf_counter()
        ppl = perplexity(model, valid, ctx=512, stride=512).perplexity
        fp32_ppl = ppl if config == "fp32" else fp32_ppl
        rows[config] = {"tokens": len(valid), "bits": bits, "group": group, "linears": linears, "ppl": ppl,
                        "vs_dense": ppl / fp32_ppl, "seconds": time.perf_counter() - start, "cpu": cpu()}
        out.write_text(json.dumps(rows, indent=1) + "\n")
        print(config, f"{ppl:.3f}", flush=True)
    lines = ["# Round-to-nearest group quantisation of SmolLM2-135M's decoder linears (format cost alone)", "",
             f"the first {rows['fp32']['tokens']} tokens of valid.txt, ctx 512, stride 512, weights dequantised to fp32 "
             f"(`bench/quant_rtn.py`); embeddings and head fp32. CPU: {rows['fp32']['cpu']}.", "",
             "| bits | group | perplexity | × dense |", "|---|---|---|---|"]
    lines += [f"| {r['bits']} | {r['group']} | {r['ppl']:.3f} | {r['vs_dense']:.4f} |" for r in rows.values()]
    (RESULTS / "quant-rtn.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
