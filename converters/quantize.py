"""Quantise a folder's decoder linears to int8 or int4 weights (weight-only, one scale per group of
input channels): the last stage of a conversion, after SoCo, healing and LoRC.

Every decoder linear's stored matrices go through `kernels.quant` (the format and its reference
live there): a dense linear's `weight`, a factorised one's `A` and `B`, LoRC's K/V latents
included. A's groups run along its rank and B's along the module's input, so the rank prefix the
loader takes at a higher ratio is still whole groups (A's last one cut short, its scale still
right). Each matrix `X.leaf` is stored as `X.leaf_q` (int8 levels, or int4 levels two per byte in
uint8) and `X.leaf_scales` (float32 [rows, ⌈cols/group⌉]); biases, norms, the importance scores,
the embedding and the head stay as they are. lowrank.json records `bits` and `group` on every
quantised module and the settings once, under `quantization`.

Defaults (`DEFAULT_GROUP`): int8 groups of 64, int4 groups of 32, chosen on held-out perplexity in
bench/results/quant-rtn.md (int8 at 64 costs no more than at 32 and stores half the scales).
Rounding is round-to-nearest. A group must divide every dense input width, so that no dense row
ends in a short group (factor ranks are whatever bake chose and may end in one).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from engine.model.checkpoint import FORMAT_VERSION, read_manifest
from engine.model.config import ModelConfig
from engine.model.llama import CausalLM
from kernels.quant import check_format, quantize

from .bake import dense_manifest, read_tensors, write_folder_atomically
from .calibrate import decoder_linears

DEFAULT_GROUP = {8: 64, 4: 32}
ROUNDING = "rtn"


@dataclass(frozen=True)
class QuantConfig:
    bits: int = 8
    group: int | None = None  # None: DEFAULT_GROUP[bits]

    def __post_init__(self) -> None:
        if self.group is None:
            object.__setattr__(self, "group", DEFAULT_GROUP.get(self.bits, 0))
        check_format(self.bits, self.group)


def quantized_leaves(module: dict) -> tuple[str, ...]:
    """The stored matrices of a manifest module entry: A and B when factorised, else the weight."""
    return ("A", "B") if module["factorized"] else ("weight",)


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
    if manifest and (q := manifest.get("quantization")):
        return (f"{folder} is quantised (int{q['bits']}); {stage} the unquantised folder, "
                "then quantise the result (`lowrank quantize`)")
    return None


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
    tensors = read_tensors(source)
    bytes_before = sum(t.nbytes for t in tensors.values())
    for name, m in manifest["modules"].items():
        for leaf in quantized_leaves(m):
            qw = quantize(tensors.pop(f"{name}.{leaf}"), config.bits, config.group)
            tensors[f"{name}.{leaf}_q"], tensors[f"{name}.{leaf}_scales"] = qw.q, qw.scales
        m |= {"bits": config.bits, "group": config.group}
    bytes_after = sum(t.nbytes for t in tensors.values())
    manifest["format_version"] = FORMAT_VERSION
    manifest["quantization"] = asdict(config) | {
        "rounding": ROUNDING, "scales": "float32",
        "bytes": {"before": bytes_before, "after": bytes_after},  # all of the folder's tensors
        "seconds": round(time.perf_counter() - start, 1),
    }
    write_folder_atomically(source, out, tensors, manifest)
    return manifest
