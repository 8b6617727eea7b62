"""Bake: one global threshold on the scores meets the ratio; write the compressed folder atomically.

Per module the kept components are sorted by score (descending), √σ put on each factor and the
learned mask folded into A,
so any rank prefix is itself a valid smaller model; `X.score` keeps the scores for the loader's
global rule. A module whose kept rank saves nothing stays dense, with its original weight.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.model.checkpoint import FORMAT_VERSION, MANIFEST, open_weights, weight_files
from engine.model.llama import CausalLM
from engine.model.rank_budget import allocate_ranks, dense_rank, module_params

from .atomic import atomic_folder
from .calibrate import decoder_linears
from .data_parallel import rank_zero_writes
from .factorize import Factors

WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json")


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in weight_files(folder):
        with open_weights(file) as f:
            tensors |= {name: f.get_tensor(name) for name in f.keys()}
    return tensors


def files_sha256(files: list[Path]) -> str:
    """One sha256 over the files' bytes, in order."""
    h = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def weights_sha256(folder: Path) -> str:
    return files_sha256(weight_files(folder))


def bake(
    source: Path,
    out: Path,
    factors: dict[str, Factors],
    scores: dict[str, torch.Tensor],
    ratio: float,
    manifest: dict,
    scales: dict[str, torch.Tensor] | None = None,
) -> dict:
    """Write the compressed folder `out`; return its manifest (lowrank.json).

    factors: every decoder linear's factorisation; scores: its components' importance (the
    global threshold ranks these); scales: multipliers folded into A (SoCo's learned mask;
    None = 1). `manifest` carries method, calibration and training details.
    """
    source, out = Path(source), Path(out)
    tensors = read_tensors(source)
    source_total = sum(t.numel() for t in tensors.values())
    dtype = tensors["model.embed_tokens.weight"].dtype
    shapes = {name: f.shape for name, f in factors.items()}
    dense_total = sum(o * i for o, i in shapes.values())
    ranks = allocate_ranks(scores, shapes, int((1 - ratio) * dense_total), dense_fallback=True)
    modules, kept = {}, 0
    for name, f in factors.items():
        rank, shape = ranks[name], shapes[name]
        factorized = module_params(rank, shape, dense_fallback=False) < shape[0] * shape[1]
        if factorized:
            del tensors[f"{name}.weight"]
            order = scores[name].argsort(descending=True, stable=True)[:rank]
            A, B = f.balanced(order, 1.0 if scales is None else scales[name][order].double())
            tensors[f"{name}.A"] = A.to(dtype).contiguous()
            tensors[f"{name}.B"] = B.to(dtype).contiguous()
            tensors[f"{name}.score"] = scores[name][order].float().contiguous()
        kept += module_params(rank, shape, dense_fallback=True)
        modules[name] = {"shape": list(shape), "rank": rank if factorized else min(shape),
                         "dense_rank": round(dense_rank(shape), 2), "factorized": factorized}
    other = source_total - dense_total  # embeddings, norms, biases: kept as they are
    manifest = manifest | {
        "format_version": FORMAT_VERSION,
        "source": {"path": str(source), "weights_sha256": weights_sha256(source)},
        "target_ratio": ratio,
        "achieved_ratio": 1 - kept / dense_total,
        "model_ratio": 1 - (kept + other) / (dense_total + other),
        "linear_params": {"dense": dense_total, "kept": kept},
        "modules": modules,
        "kv_latent": None,
    }
    write_folder_atomically(source, out, tensors, manifest)
    return manifest


def dense_manifest(source: Path, model: CausalLM) -> dict:
    """A manifest for a dense source: every decoder linear listed as kept whole."""
    modules = {}
    for name in decoder_linears(model):
        shape = tuple(model.get_submodule(name).weight.shape)
        modules[name] = {"shape": list(shape), "rank": min(shape), "dense_rank": round(dense_rank(shape), 2),
                         "factorized": False}
    dense_total = sum(m["shape"][0] * m["shape"][1] for m in modules.values())
    return {"format_version": FORMAT_VERSION, "method": "none",
            "source": {"path": str(source), "weights_sha256": weights_sha256(source)},
            "target_ratio": 0.0,
            "linear_params": {"dense": dense_total, "kept": dense_total}, "modules": modules}


def write_folder_atomically(source: Path, out: Path, tensors: dict[str, torch.Tensor], manifest: dict) -> None:
    """The weights, the manifest and the source's config/tokenizer files, all or nothing (written by
    rank 0 of a data-parallel group, read by every rank once this returns)."""
    rank_zero_writes(lambda: _write_folder(source, out, tensors, manifest))


def _write_folder(source: Path, out: Path, tensors: dict[str, torch.Tensor], manifest: dict) -> None:
    with atomic_folder(out, replace=True) as tmp:
        for item in source.iterdir():  # config, tokenizer, chat template: copied unchanged
            if item.is_file() and not item.name.endswith(WEIGHT_SUFFIXES) and item.name != MANIFEST:
                shutil.copy2(item, tmp / item.name)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
