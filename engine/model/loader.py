"""Load an HF model folder, dense or compressed, straight into our modules.

As gpt-fast does: build on the meta device (no wasted init), swap factorised projections for
`LowRankLinear` (quantised ones for `QuantLinear` / `QuantLowRankLinear`), then assign the
checkpoint's tensors, cast to the chosen dtype on the chosen device (integer levels stay
integers). A compressed folder (`lowrank.json` beside the weights) can be served at a higher
compression ratio than it was baked at: its stored scores pick a rank prefix per module by the
same global rule bake used. Safetensors only; never pickles.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kernels.quant import n_groups, stored_cols

from .checkpoint import open_weights, read_manifest, weight_files
from .config import ModelConfig, ModelFolderError, parse_dtype
from .layers import Linear, LowRankLinear, QuantEmbedding, QuantLinear, QuantLowRankLinear
from .llama import CausalLM
from .rank_budget import allocate_ranks, lowrank_params

RATIO_TOLERANCE = 0.005  # bake meets the requested ratio within ±0.5 % of the linear parameters


def load_tokenizer(path: str | Path):
    """The folder's tokenizer; missing or damaged tokenizer files are a ModelFolderError naming the folder."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # transformers and tokenizers raise OSError, ValueError, TypeError, Exception...
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelFolderError(f"{path}: the tokenizer files cannot be loaded: {message}") from None


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(config: ModelConfig, device: torch.device) -> torch.dtype:
    """float32 on CPU (half-precision matmuls are slow there); the checkpoint's own dtype on GPU."""
    if device.type == "cpu":
        return torch.float32
    return parse_dtype(config.torch_dtype or "bfloat16")


def serving_ranks(path: Path, manifest: dict, files: list[Path], ratio: float | None) -> dict[str, int]:
    """Rank per factorised module: as baked, or the prefix that meets `ratio` under the global rule."""
    factorized = {name: m for name, m in manifest["modules"].items() if m["factorized"]}
    if ratio is None:
        return {name: m["rank"] for name, m in factorized.items()}
    baked = manifest["achieved_ratio"]
    if not 0 < ratio < 1:
        raise ValueError(f"ratio must be in (0, 1), got {ratio}")
    if ratio < baked - RATIO_TOLERANCE:
        raise ValueError(f"{path} was baked at ratio {baked:.4f}; it can serve ratio >= that, not {ratio}")
    if all(m.get("latent") for m in factorized.values()):
        raise ValueError(f"{path} has no importance scores to serve another ratio from (only K/V latents)")
    return prefix_ranks(manifest, stored_scores(files), ratio)


def stored_scores(files: list[Path]) -> dict[str, torch.Tensor]:
    """Each factorised module's `X.score` (its components' importance, descending) -> {module: scores}."""
    scores = {}
    for file in files:
        with open_weights(file) as f:
            scores |= {k.removesuffix(".score"): f.get_tensor(k) for k in f.keys() if k.endswith(".score")}
    return scores


def prefix_ranks(manifest: dict, scores: dict[str, torch.Tensor], ratio: float) -> dict[str, int]:
    """The global rule at `ratio` over a folder's stored scores (module -> its `X.score`): the rank
    prefix of every factorised module. LoRC K/V latents keep their ranks; dense modules stay dense.
    What the loader serves and what healing trains at a sampled ratio."""
    modules = manifest["modules"]
    factorized = {name: m for name, m in modules.items() if m["factorized"]}
    latent = {name: m["rank"] for name, m in factorized.items() if m.get("latent")}  # LoRC K/V: ranks fixed
    scored = [name for name in factorized if name not in latent]
    total = sum(m["shape"][0] * m["shape"][1] for m in modules.values())
    fixed = sum(m["shape"][0] * m["shape"][1] for m in modules.values() if not m["factorized"])
    fixed += sum(lowrank_params(rank, tuple(modules[name]["shape"])) for name, rank in latent.items())
    shapes = {name: tuple(factorized[name]["shape"]) for name in scored}
    budget = int((1 - ratio) * total) - fixed
    return allocate_ranks({n: scores[n] for n in scored}, shapes, budget, dense_fallback=False) | latent


def load_model(
    path: str | Path,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    ratio: float | None = None,
) -> CausalLM:
    """Read `path` into a CausalLM in eval mode on `device` (default: CUDA if present) in `dtype`.

    `ratio` (compressed folders only): serve a smaller model, removing that fraction of the
    decoder's linear parameters, from the stored components in importance order.
    """
    path = Path(path)
    config = ModelConfig.from_folder(path)
    files = weight_files(path)
    manifest = read_manifest(path)
    if ratio is not None and manifest is None:
        raise ValueError(f"{path} is a dense folder; a ratio needs a compressed one (`lowrank compress`)")
    device = torch.device(device) if device is not None else default_device()
    dtype = parse_dtype(dtype) if dtype is not None else default_dtype(config, device)
    ranks = serving_ranks(path, manifest, files, ratio) if manifest else {}
    quantized = {name: m for name, m in manifest["modules"].items() if "bits" in m} if manifest else {}
    head = ((manifest or {}).get("quantization") or {}).get("head")  # a quantised head or tied table
    with torch.device("meta"):
        model = CausalLM(config)
        for name in ranks.keys() | quantized.keys():
            dense = model.get_submodule(name)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, _stored_linear(dense, ranks.get(name), quantized.get(name)))
        if head and head["module"] == "lm_head":
            model.lm_head = QuantLinear(config.hidden_size, config.vocab_size, head["bits"], head["group"])
        elif head:
            model.model.embed_tokens = QuantEmbedding(config.vocab_size, config.hidden_size, head["bits"], head["group"])
    expected = {name: t.shape for name, t in model.state_dict(keep_vars=True).items()}
    state: dict[str, torch.Tensor] = {}
    for file in files:
        with open_weights(file) as f:
            for name in f.keys():
                if name.endswith(".score") and name.removesuffix(".score") in ranks:
                    continue  # importance scores choose ranks; they are not weights
                if name not in expected:
                    if name == "lm_head.weight" and config.tie_word_embeddings:
                        continue  # some tied checkpoints store the head anyway
                    raise ModelFolderError(f"{file}: unexpected tensor {name!r} for a {config.model_type} model")
                tensor = _read_prefix(f, name, ranks, quantized)
                if tensor.shape != expected[name]:
                    raise ModelFolderError(
                        f"{file}: {name} has shape {tuple(tensor.shape)}, config.json implies {tuple(expected[name])}"
                    )  # quantised levels keep their integer dtype; everything else takes the serving dtype
                state[name] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else None)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ModelFolderError(f"{path}: {len(missing)} tensors missing from the checkpoint, e.g. {missing[0]!r}")
    model.load_state_dict(state, strict=True, assign=True)
    if head and model.lm_head is None:  # the tied head reads the quantised table through the GEMM kernels
        model.lm_head = model.model.embed_tokens.as_head()
    model.model.rotary.materialize(device)
    if manifest and manifest.get("kv_latent"):
        model.use_latent_kv()
    return model.eval()


def _stored_linear(dense: Linear, rank: int | None, quant: dict | None) -> Linear | LowRankLinear:
    """The module a decoder linear is stored as: factorised at `rank` (None: dense), quantised per
    its manifest entry `quant` (None: float)."""
    shape = dense.in_features, dense.out_features
    bias = dense.bias is not None
    if quant is None:
        return LowRankLinear(*shape, rank, bias)
    if rank is None:
        return QuantLinear(*shape, quant["bits"], quant["group"], bias)
    return QuantLowRankLinear(*shape, rank, quant["bits"], quant["group"], bias)


def _read_prefix(f, name: str, ranks: dict[str, int], quantized: dict[str, dict]) -> torch.Tensor:
    """A tensor, or for a factor only its first `rank` components (read lazily, not the whole).
    A quantised A keeps the groups its prefix touches; int4 levels are repacked when the prefix
    ends inside a byte, so the unused nibble holds level 0 as a freshly quantised prefix would."""
    module, _, leaf = name.rpartition(".")
    if module not in ranks or leaf not in ("A", "B", "A_q", "A_scales", "B_q", "B_scales"):
        return f.get_tensor(name)
    rank = ranks[module]
    if leaf.startswith("B"):
        return f.get_slice(name)[:rank]
    if leaf == "A":
        return f.get_slice(name)[:, :rank]
    bits, group = quantized[module]["bits"], quantized[module]["group"]
    if leaf == "A_scales":
        return f.get_slice(name)[:, : n_groups(rank, group)]
    levels = f.get_slice(name)[:, : stored_cols(rank, bits)]
    if bits == 4 and rank % 2:
        levels[:, -1] = (levels[:, -1] & 0xF) | 0x80  # the high nibble is column `rank`, beyond the prefix
    return levels
