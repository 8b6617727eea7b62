"""Quantise a folder's decoder linears to int8 or int4 weights (weight-only, one scale per group of
input channels): the last stage of a conversion, after SoCo, healing and LoRC.

Every decoder linear's stored matrices go through `kernels.quant` (the format and its reference
live there): a dense linear's `weight`, a factorised one's `A` and `B`, LoRC's K/V latents
included. A's groups run along its rank and B's along the module's input, so the rank prefix the
loader takes at a higher ratio is still whole groups (A's last one cut short, its scale still
right). Each matrix `X.leaf` is stored as `X.leaf_q` (int8 levels, or int4 levels two per byte in
uint8) and `X.leaf_scales` (float32 [rows, ⌈cols/group⌉]); biases, norms and the importance
scores stay as they are. The head (`head`, on by default) is stored in int8 whatever `bits` is
(int4 heads cost the most quality per byte saved; llama.cpp's Q4_K_M keeps its at Q6_K), and
where it is tied to the embedding the one table is quantised and serves both. lowrank.json
records `bits` and `group` on every quantised module and the settings once, under `quantization`.

Defaults (`DEFAULT_GROUP`): int8 groups of 64, int4 groups of 32, chosen on held-out perplexity in
bench/results/quant-rtn.md (int8 at 64 costs no more than at 32 and stores half the scales).
A group must divide every dense input width, so that no dense row ends in a short group (factor
ranks are whatever bake chose and may end in one).

Rounding (`ROUNDINGS`): round-to-nearest, or GPTQ (`converters.gptq`) on the input Grams of
calibration windows of the calibration text (the statistics SVD-LLM's whitening uses): a dense
weight on its input's Gram H; a factor pair B first, on H, then A on the Gram of its own input,
B̂·H·B̂ᵀ (B̂ the quantised B: A compensates what B's rounding did). `DEFAULT_ROUNDING` per bit
width is what measured better (bench/results/quant-rtn.md).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from engine import load_model
from engine.model.checkpoint import FORMAT_VERSION, read_manifest
from engine.model.config import ModelConfig
from engine.model.llama import CausalLM
from engine.model.loader import load_tokenizer
from kernels.quant import Quantized, check_format, dequantize, quantize

from .bake import dense_manifest, read_tensors, write_folder_atomically
from .calibrate import collect_grams, decoder_linears, gram_key, sample_windows, tokenize_file
from .data_parallel import progress
from .gptq import DAMP, gptq_quantize

DEFAULT_GROUP = {8: 64, 4: 32}
ROUNDINGS = ("rtn", "gptq")
DEFAULT_ROUNDING = {8: "rtn", 4: "gptq"}
HEAD_GROUP = 64  # the head's group (or the largest that divides its width), int8 at any --bits


@dataclass(frozen=True)
class QuantConfig:
    bits: int = 8
    group: int | None = None  # None: DEFAULT_GROUP[bits]
    rounding: str | None = None  # None: DEFAULT_ROUNDING[bits]
    calib: str | None = None  # gptq: the calibration text
    samples: int = 128  # gptq: calibration windows
    seq_len: int = 512  # gptq: tokens per window
    damp: float = DAMP  # gptq: λ, as a fraction of the Gram's mean diagonal
    head: bool = True  # also the head (the tied token table): int8, round-to-nearest, at any `bits`
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.group is None:
            object.__setattr__(self, "group", DEFAULT_GROUP.get(self.bits, 0))
        check_format(self.bits, self.group)
        if self.rounding is None:
            object.__setattr__(self, "rounding", DEFAULT_ROUNDING[self.bits])
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {self.rounding!r}")
        if self.rounding == "gptq" and not self.calib:
            raise ValueError("gptq rounding needs a calibration text (calib)")
        if self.samples < 1 or self.seq_len < 1 or not 0 < self.damp < 1:
            raise ValueError(f"samples and seq_len must be positive and damp in (0, 1), got "
                             f"{self.samples}, {self.seq_len}, {self.damp}")


def quantized_leaves(module: dict) -> tuple[str, ...]:
    """The stored matrices of a manifest module entry: B and A when factorised, else the weight."""
    return ("B", "A") if module["factorized"] else ("weight",)


def calibration_grams(folder: Path, config: QuantConfig) -> dict[str, torch.Tensor]:
    """The input Gram of every decoder linear of `folder` on calibration windows (converters.calibrate)."""
    model = load_model(folder, dtype=torch.float32, device=config.device)
    windows = sample_windows(tokenize_file(load_tokenizer(folder), config.calib), config.samples, config.seq_len,
                             config.seed)
    return {k: g.cpu() for k, g in collect_grams(model, windows, products=torch.float64).items()}


def _quantize_head(tensors: dict[str, torch.Tensor]) -> dict:
    """The head in int8, groups of HEAD_GROUP, in place in `tensors`: `lm_head.weight`, or where the
    head is tied the token table itself (a lookup then dequantises its rows)."""
    name = "lm_head.weight" if "lm_head.weight" in tensors else "model.embed_tokens.weight"
    width = tensors[name].shape[1]
    group = next((g for g in (HEAD_GROUP, 32, 16, 8, 4, 2) if width % g == 0), None)
    if group is None:
        raise ValueError(f"the head's width {width} is odd: no group divides it (keep the head float)")
    qw = quantize(tensors.pop(name), 8, group)
    tensors[f"{name}_q"], tensors[f"{name}_scales"] = qw.q, qw.scales
    return {"module": name.removesuffix(".weight"), "bits": 8, "group": group}


def _round(w: torch.Tensor, gram: torch.Tensor | None, config: QuantConfig) -> Quantized:
    if gram is None:
        return quantize(w, config.bits, config.group)
    return gptq_quantize(w, gram, config.bits, config.group, config.damp)


def check_widths(folder: Path, group: int) -> None:
    """A ValueError naming the first decoder linear of `folder` whose input width `group` does not
    divide, and the groups that would do (checked from config.json alone, before any work)."""
    model = _shapes_only(folder)
    widths = {name: model.get_submodule(name).in_features for name in decoder_linears(model)}
    for name, width in widths.items():
        if width % group:
            fits = [g for g in (16, 32, 64, 128, 256) if all(w % g == 0 for w in widths.values())]
            hint = f"groups that divide every width: {', '.join(map(str, fits))}" if fits else "no power of two >= 16 does"
            raise ValueError(f"group {group} does not divide the input width {width} of {name} ({hint})")


def _shapes_only(folder: Path) -> CausalLM:
    """The folder's dense model on the meta device: its modules' shapes, no weights read."""
    with torch.device("meta"):
        return CausalLM(ModelConfig.from_folder(folder))


def quantized_problem(folder: Path, manifest: dict | None, stage: str) -> str | None:
    """Quantisation is the last stage: why `stage` cannot read `folder` (None when it can). A stage
    that reads the float matrices back would train or factorise a rounded copy."""
    if not manifest or not (q := manifest.get("quantization")):
        return None
    if stage == "quantise":
        return f"{folder} is already quantised (int{q['bits']}, groups of {q['group']}): quantise the unquantised folder"
    return f"{folder} is quantised (int{q['bits']}); {stage} the unquantised folder, then quantise the result"


def refuse_quantized(folder: Path, manifest: dict | None, stage: str) -> None:
    """`quantized_problem` as a ValueError."""
    if problem := quantized_problem(folder, manifest, stage):
        raise ValueError(problem)


def quantize_folder(source: str | Path, out: str | Path, config: QuantConfig) -> dict:
    """Write `out`: the folder `source` (dense or compressed) with its decoder linears quantised."""
    start = time.perf_counter()
    source, out = Path(source), Path(out)
    manifest = read_manifest(source)
    refuse_quantized(source, manifest, "quantise")
    check_widths(source, config.group)
    if manifest is None:
        manifest = dense_manifest(source, _shapes_only(source)) | {"achieved_ratio": 0.0, "model_ratio": 0.0, "kv_latent": None}
    grams = calibration_grams(source, config) if config.rounding == "gptq" else None
    tensors = read_tensors(source)
    bytes_before = sum(t.nbytes for t in tensors.values())
    for name, m in progress(manifest["modules"].items(), desc=f"quantize ({config.rounding})", unit="linear"):
        gram = None if grams is None else grams[gram_key(name)]
        for leaf in quantized_leaves(m):  # B before A: A's Gram is B's output's
            qw = _round(tensors.pop(f"{name}.{leaf}"), gram, config)
            tensors[f"{name}.{leaf}_q"], tensors[f"{name}.{leaf}_scales"] = qw.q, qw.scales
            if gram is not None and leaf == "B":
                B = dequantize(qw, torch.float64)
                gram = B @ gram @ B.T
        m |= {"bits": config.bits, "group": config.group}
    head = _quantize_head(tensors) if config.head else None
    bytes_after = sum(t.nbytes for t in tensors.values())
    manifest["format_version"] = FORMAT_VERSION
    manifest["quantization"] = asdict(config) | {
        "scales": "float32", "head": head,
        "bytes": {"before": bytes_before, "after": bytes_after},  # all of the folder's tensors
        "seconds": round(time.perf_counter() - start, 1),
    }
    write_folder_atomically(source, out, tensors, manifest)
    return manifest
