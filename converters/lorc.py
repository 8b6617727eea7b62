"""LoRC: a low-rank latent KV cache made from each layer's K and V projections, with no retraining.

Each layer's `k_proj` and `v_proj` are factorised by the same whitened SVD as the weights (the
Gram of their shared input, the attention norm's output): `k = A_k (B_k x)`, `v = A_v (B_v x)`.
The engine then caches the latents `c_k = B_k x` and `c_v = B_v x`, r_k + r_v values per token
instead of 2·n_kv·head_dim, and rebuilds keys (with RoPE) and values inside attention. A
projection SoCo already factorised is re-factorised from its product A·B: exact at its own
rank, the calibration-optimal truncation below it, and milliseconds of work.

`kv_ratio` is the fraction of KV-cache bytes removed: Σ_l (r_k,l + r_v,l) = (1 − kv_ratio)·L·2·W
with W = n_kv·head_dim (less where a compressed source's K/V already have smaller ranks: a latent
never exceeds them). Two schedules spend the same budget:
- `uniform`: every layer keeps the same ranks;
- `progressive` (LoRC): ranks follow measured sensitivity. For each layer and each of K, V we
  truncate that one projection to the uniform rank, measure KL(model ‖ perturbed) on
  calibration windows and divide by the whitened energy removed: s = KL per unit of relative
  output energy. Component i of a projection then has priority s·σᵢ²/Σσ², and one global
  threshold keeps the highest priorities (first-order: it minimises Σ s·(energy dropped)).
  Rank goes where the measured sensitivity is, without assuming which layers those are: on
  SmolLM2 that is the middle and late layers' K/V, while layer 0 keeps the least (bench/results/kv.md).
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from engine import load_model
from engine.model.checkpoint import read_manifest
from engine.model.layers import Linear, LowRankLinear
from engine.model.llama import CausalLM
from engine.model.loader import load_tokenizer
from engine.model.rank_budget import dense_rank, lowrank_params

from .bake import dense_manifest, read_tensors, write_folder_atomically
from .calibrate import collect_grams, decoder_linears, gram_key, sample_windows, tokenize_file
from .data_parallel import progress
from .factorize import Factors, whitened_svd
from .quantize import refuse_quantized

SCHEDULES = ("progressive", "uniform")
KV_LEAVES = ("k_proj", "v_proj")
SIGMA_FLOOR = 1e-6  # components below this fraction of the largest σ carry nothing


@dataclass(frozen=True, slots=True)
class LoRCConfig:
    kv_ratio: float
    schedule: str = "progressive"
    calib: str = ""  # calibration text file
    samples: int = 64  # windows for the Grams
    seq_len: int = 512
    probe_samples: int = 4  # windows for the sensitivity probe (its reference log-probs stay in memory)
    probe_seq_len: int = 256
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.kv_ratio < 1:
            raise ValueError(f"kv_ratio must be in (0, 1), got {self.kv_ratio}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        for name in ("samples", "seq_len", "probe_samples", "probe_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


def kv_names(model: CausalLM) -> list[tuple[str, str]]:
    """(k_proj, v_proj) module names per layer."""
    return [tuple(f"model.layers.{i}.self_attn.{leaf}" for leaf in KV_LEAVES) for i in range(model.config.num_layers)]


def effective_weight(module: Linear | LowRankLinear) -> torch.Tensor:
    """The [out, in] matrix a projection applies, in float64 (A·B for a factorised one)."""
    if isinstance(module, LowRankLinear):
        return module.A.double() @ module.B.double()
    return module.weight.double()


def uniform_rank(width: int, kv_ratio: float) -> int:
    """The rank that removes `kv_ratio` of a `width`-wide projection's cache, at least 1."""
    return max(1, round((1 - kv_ratio) * width))


def rank_cap(module: Linear | LowRankLinear, factors: Factors, width: int) -> int:
    """The most components worth caching: the full width, the rank a compressed source already has,
    and no component whose σ is numerically zero (a re-factorised A·B has nothing past its rank)."""
    sigma = factors.sigma
    significant = int((sigma > SIGMA_FLOOR * sigma[0]).sum()) if len(sigma) else 0
    own = module.rank if isinstance(module, LowRankLinear) else width
    return max(1, min(width, own, significant))


def progressive_ranks(factors: dict[str, Factors], sensitivity: dict[str, float], budget: int,
                      caps: dict[str, int]) -> dict[str, int]:
    """Keep the components of highest priority s·σ²/Σσ² over all K/V projections while the total
    rank fits `budget`; every projection keeps at least one component and at most its cap."""
    names = list(factors)
    priorities, owners = [], []
    for idx, name in enumerate(names):
        energy = factors[name].sigma.double() ** 2
        p = sensitivity[name] * energy / energy.sum().clamp(min=1e-300)
        p = p[:caps[name]].clone()
        p[0] = float("inf")  # the floor of one component
        priorities.append(p)
        owners.append(torch.full((len(p),), idx))
    order = torch.cat(priorities).argsort(descending=True, stable=True)[:budget]
    counts = torch.bincount(torch.cat(owners)[order], minlength=len(names))
    return {name: int(c) for name, c in zip(names, counts)}


@contextmanager
def swapped(model: CausalLM, name: str, replacement: torch.nn.Module):
    """Temporarily put `replacement` at module path `name`."""
    parent, _, child = name.rpartition(".")
    holder = model.get_submodule(parent)
    original = getattr(holder, child)
    setattr(holder, child, replacement)
    try:
        yield
    finally:
        setattr(holder, child, original)


def truncated_linear(factors: Factors, rank: int, bias: torch.Tensor | None, dtype: torch.dtype) -> LowRankLinear:
    """The rank-`rank` truncation of `factors` as a layer (for the sensitivity probe). Factorised, so
    it also serves an attention layer already caching latents (a LoRC folder converted again)."""
    out_features, in_features = factors.shape
    layer = LowRankLinear(in_features, out_features, rank, bias is not None)
    A, B = factors.balanced(torch.arange(rank))
    layer.A.data, layer.B.data = A.to(dtype), B.to(dtype)
    if bias is not None:
        layer.bias.data = bias
    return layer


@torch.no_grad()  # not inference_mode: the probe's swapped-in layers are built inside it
def measure_sensitivity(model: CausalLM, factors: dict[str, Factors], windows: torch.Tensor,
                        ranks: dict[str, int]) -> dict[str, float]:
    """Per K/V projection: KL(model ‖ model with that projection truncated to its rank in `ranks`),
    in nats per token, divided by the fraction of its whitened energy the truncation removes."""
    def log_probs() -> list[torch.Tensor]:
        return [model.logits(h).float().log_softmax(-1) for h in model.hidden_states(list(windows))]

    reference = log_probs()
    dtype = model.model.embed_tokens.weight.dtype
    sensitivity = {}
    for name in progress(factors, desc="kv sensitivity", unit="proj"):
        f, rank = factors[name], ranks[name]
        energy = f.sigma.double() ** 2
        removed = (energy[rank:].sum() / energy.sum().clamp(min=1e-300)).item()
        with swapped(model, name, truncated_linear(f, rank, model.get_submodule(name).bias, dtype)):
            perturbed = log_probs()
        kl = sum(F.kl_div(p, r, log_target=True, reduction="sum").item() for p, r in zip(perturbed, reference))
        if not math.isfinite(kl):
            raise ValueError(f"{name}: the sensitivity probe's KL is {kl}; the model's outputs are not finite")
        sensitivity[name] = max(kl, 0.0) / windows.numel() / max(removed, 1e-12)  # KL >= 0 up to rounding
    return sensitivity


@dataclass
class KVPrepared:
    """A loaded model with every K/V projection factorised: what each kv_ratio and schedule starts from."""

    source: Path
    model: CausalLM
    token_ids: list[int]  # the calibration text, tokenized (the sensitivity probe samples it too)
    factors: dict[str, Factors]
    pairs: list[tuple[str, str]]
    width: int  # n_kv · head_dim: a projection's full rank
    caps: dict[str, int]  # the most components worth caching per projection (`rank_cap`)
    seconds: float


def prepare_kv(source: str | Path, config: LoRCConfig) -> KVPrepared:
    """Load `source` (dense or compressed), take its K/V inputs' Gram, factorise every K/V projection."""
    start = time.perf_counter()
    source = Path(source)
    refuse_quantized(source, read_manifest(source), "factorise the K/V cache of")
    model = load_model(source, dtype=torch.float32, device=config.device)
    token_ids = tokenize_file(load_tokenizer(source), config.calib)
    windows = sample_windows(token_ids, config.samples, config.seq_len, config.seed)
    pairs = kv_names(model)
    grams = collect_grams(model, windows, only={gram_key(k) for k, _ in pairs})
    factors = {name: whitened_svd(effective_weight(model.get_submodule(name)), grams[gram_key(name)])
               for pair in pairs for name in pair}
    width = model.config.num_kv_heads * model.config.head_dim
    caps = {name: rank_cap(model.get_submodule(name), f, width) for name, f in factors.items()}
    return KVPrepared(source, model, token_ids, factors, pairs, width, caps, time.perf_counter() - start)


def latent_ranks(prepared: KVPrepared, config: LoRCConfig) -> dict:
    """The `kv_latent` record (ranks per layer, sensitivity, settings) for `config`'s ratio and schedule."""
    start = time.perf_counter()
    factors, pairs, width, caps = prepared.factors, prepared.pairs, prepared.width, prepared.caps
    flat = uniform_rank(width, config.kv_ratio)
    sensitivity = None
    if config.schedule == "uniform":
        ranks = {name: min(flat, caps[name]) for name in factors}
    else:
        probe = sample_windows(prepared.token_ids, config.probe_samples, config.probe_seq_len, config.seed + 2)
        # probe where the truncation removes something: at the uniform rank, or below a smaller cap
        probe_ranks = {name: min(flat, uniform_rank(caps[name], config.kv_ratio)) for name in factors}
        sensitivity = measure_sensitivity(prepared.model, factors, probe, probe_ranks)
        budget = sum(min(flat, cap) for cap in caps.values())  # what uniform caches: same total, compared fairly
        ranks = progressive_ranks(factors, sensitivity, budget, caps)
    return {
        "kv_ratio": config.kv_ratio, "schedule": config.schedule, "width": width,
        "achieved_kv_ratio": 1 - sum(ranks.values()) / (len(factors) * width),
        "ranks": [[ranks[k], ranks[v]] for k, v in pairs],
        "sensitivity": None if sensitivity is None else [[sensitivity[k], sensitivity[v]] for k, v in pairs],
        "settings": asdict(config),
        "seconds": round(prepared.seconds + time.perf_counter() - start, 1),
    }


def lorc(source: str | Path, out: str | Path, config: LoRCConfig) -> dict:
    """Write `out`: the folder `source` (dense or compressed) with latent K/V projections; returns its manifest."""
    prepared = prepare_kv(source, config)
    return write_latent_folder(prepared, Path(out), latent_ranks(prepared, config))


def write_latent_folder(prepared: KVPrepared, out: Path, kv_latent: dict) -> dict:
    """The source's tensors with each K/V projection as `A`, `B` at its latent rank, atomically."""
    source, model, factors = prepared.source, prepared.model, prepared.factors
    ranks = {name: r for pair, rs in zip(prepared.pairs, kv_latent["ranks"]) for name, r in zip(pair, rs)}
    tensors = read_tensors(source)
    dtype = tensors["model.embed_tokens.weight"].dtype
    manifest = read_manifest(source) or dense_manifest(source, model)
    modules = manifest["modules"]
    for name, f in factors.items():
        for leaf in ("weight", "A", "B", "score"):
            tensors.pop(f"{name}.{leaf}", None)
        rank = ranks[name]
        A, B = f.balanced(torch.arange(rank))
        tensors[f"{name}.A"], tensors[f"{name}.B"] = A.to(dtype).contiguous(), B.to(dtype).contiguous()
        modules[name] = {"shape": list(f.shape), "rank": rank, "dense_rank": round(dense_rank(f.shape), 2),
                         "factorized": True, "latent": True}
    dense_total = manifest["linear_params"]["dense"]
    kept = sum(lowrank_params(m["rank"], m["shape"]) if m["factorized"] else m["shape"][0] * m["shape"][1]
               for m in modules.values())
    other = non_linear_params(model)
    manifest |= {"achieved_ratio": 1 - kept / dense_total, "model_ratio": 1 - (kept + other) / (dense_total + other),
                 "linear_params": {"dense": dense_total, "kept": kept}, "kv_latent": kv_latent}
    write_folder_atomically(source, out, tensors, manifest)
    return manifest


def non_linear_params(model: CausalLM) -> int:
    """Parameters outside the decoder linears' matrices: embeddings, norms, biases, an untied head."""
    matrices = {f"{name}.{leaf}" for name in decoder_linears(model) for leaf in ("weight", "A", "B")}
    return sum(p.numel() for n, p in model.named_parameters() if n not in matrices)
