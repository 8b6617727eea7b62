"""Real-shaped models with seeded random weights, made where they are timed.

    python bench/synthetic.py OUT [--shapes smollm2-135m llama3-8b qwen2-7b] [--dtype bfloat16]
                              [--ratio 0.4] [--kv-ratio 0.5] [--device cuda]

Speed does not depend on weight values, and the lent GPU machine has no network and takes at
most 64 MiB per call, so its benchmarks cannot carry real weights: they build these instead.
Each shape gives three HF-format folders the engine and transformers both load:

- `<shape>-dense`: config.json, model.safetensors (N(0, 0.02) weights, norms 1, biases 0.02·N,
  seeded), and a word-level tokenizer over the whole vocabulary (the engine needs ids only);
- `<shape>-r<ratio>`: every decoder linear factorised at the ranks `engine.model.rank_budget`
  gives for `ratio` under SVD-LLM's uniform rule (or the ranks of a committed `lowrank.json`,
  `--ranks`), in the checkpoint format `bake` writes (A, B, descending scores, the manifest);
- `<shape>-r<ratio>-kv<kv>`: the same with every K/V projection a LoRC latent of rank
  (1 − kv)·width, as `lowrank lorc --schedule uniform` would make it.

A folder already there with the same recipe (recorded in `synthetic.json`) is kept.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from converters.atomic import atomic_folder  # noqa: E402
from converters.calibrate import decoder_linears  # noqa: E402
from engine.model.checkpoint import FORMAT_VERSION, MANIFEST, read_manifest  # noqa: E402
from engine.model.config import ModelConfig  # noqa: E402
from engine.model.llama import CausalLM  # noqa: E402
from engine.model.rank_budget import allocate_ranks, dense_rank, lowrank_params, uniform_priority  # noqa: E402

RECIPE = "synthetic.json"
INIT_STD = 0.02
_LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu", "bos_token_id": 1,
          "eos_token_id": 2, "rms_norm_eps": 1e-5}
SHAPES = {  # the configs of the real models (their published config.json), minus what the engine ignores
    "smollm2-135m": _LLAMA | {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                              "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                              "max_position_embeddings": 8192, "rope_theta": 100000.0, "tie_word_embeddings": True},
    "llama3-8b": _LLAMA | {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                           "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                           "max_position_embeddings": 8192, "rope_theta": 500000.0, "tie_word_embeddings": False},
    "qwen2-7b": {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_act": "silu",
                 "bos_token_id": 1, "eos_token_id": 2, "rms_norm_eps": 1e-6, "vocab_size": 152064,
                 "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                 "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 32768,
                 "rope_theta": 1000000.0, "tie_word_embeddings": False},
    # Dry-run sizes (CI, tests): the same families, GQA and biases, head sizes every kernel takes.
    "tiny-llama": _LLAMA | {"vocab_size": 512, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
                            "rope_theta": 10000.0, "tie_word_embeddings": True},
    "tiny-qwen2": {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_act": "silu",
                   "bos_token_id": 1, "eos_token_id": 2, "rms_norm_eps": 1e-6, "vocab_size": 512, "hidden_size": 128,
                   "intermediate_size": 320, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "num_key_value_heads": 1, "max_position_embeddings": 512, "rope_theta": 10000.0,
                   "tie_word_embeddings": False},
}


def _meta_model(config: dict) -> CausalLM:
    """The engine's own model for `config`, with no storage: its names and shapes are the truth."""
    with torch.device("meta"):
        return CausalLM(ModelConfig.from_dict(config))


def linear_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """Every decoder linear's (out, in)."""
    model = _meta_model(config)
    return {name: tuple(model.get_submodule(name).weight.shape) for name in decoder_linears(model)}


def parameter_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in _meta_model(config).named_parameters()}


def uniform_ranks(shapes: dict[str, tuple[int, int]], ratio: float) -> dict[str, int]:
    """What `lowrank compress --method svd-llm --ratio` keeps per module: one global rule over
    uniform priorities, every module factorised only where that saves parameters."""
    scores = {name: uniform_priority(shape, min(shape)) for name, shape in shapes.items()}
    total = sum(o * i for o, i in shapes.values())
    return allocate_ranks(scores, shapes, int((1 - ratio) * total), dense_fallback=True)


def latent_rank(width: int, kv_ratio: float) -> int:
    return max(1, round((1 - kv_ratio) * width))


def _random(shape: tuple[int, ...], std: float, dtype: torch.dtype, device: str, gen: torch.Generator) -> torch.Tensor:
    return (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * std).to(dtype).cpu()


def _factor_pair(shape: tuple[int, int], rank: int, dtype, device, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """A [out, r], B [r, in] whose product has entries of the dense init's scale (INIT_STD)."""
    std = math.sqrt(INIT_STD / math.sqrt(rank))
    return _random((shape[0], rank), std, dtype, device, gen), _random((rank, shape[1]), std, dtype, device, gen)


def write_tokenizer(folder: Path, vocab_size: int, eos_id: int = 2, bos_id: int | None = 1) -> None:
    """A word-level tokenizer over ids 0..vocab-1 ("t0 t1 ..."; unknown words are t0), offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    special = {"eos_token": f"t{eos_id}"} | ({} if bos_id is None else {"bos_token": f"t{bos_id}"})
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", **special).save_pretrained(folder)


def build(shape: str, out: Path, dtype: torch.dtype, ratio: float | None = None, kv_ratio: float | None = None,
          device: str = "cpu", ranks: dict[str, int] | None = None, seed: int = 0) -> Path:
    """The folder for `shape` (dense, factorised at `ratio`, plus latents at `kv_ratio`) under `out`."""
    from safetensors.torch import save_file

    name = f"{shape}-dense" if ratio is None else f"{shape}-r{ratio}" + ("" if kv_ratio is None else f"-kv{kv_ratio}")
    folder = Path(out) / name
    config = SHAPES[shape] | {"torch_dtype": str(dtype).removeprefix("torch.")}
    recipe = {"shape": shape, "config": config, "ratio": ratio, "kv_ratio": kv_ratio, "seed": seed,
              "ranks": ranks, "format_version": FORMAT_VERSION}
    if (folder / RECIPE).is_file() and _without_timing(json.loads((folder / RECIPE).read_text())) == recipe:
        return folder
    start = time.perf_counter()
    gen = torch.Generator(device=device).manual_seed(seed)
    linears = linear_shapes(config)
    factor_ranks = {} if ratio is None else (ranks or uniform_ranks(linears, ratio))
    width = config["num_key_value_heads"] * (config["hidden_size"] // config["num_attention_heads"])
    tensors: dict[str, torch.Tensor] = {}
    modules = {}
    for pname, pshape in parameter_shapes(config).items():
        module = pname.rpartition(".")[0]
        if pname.endswith("norm.weight"):
            tensors[pname] = torch.ones(pshape, dtype=dtype)
        elif pname.endswith(".bias"):
            tensors[pname] = _random(pshape, INIT_STD, dtype, device, gen)
        elif module in linears:
            shape2 = linears[module]
            latent = kv_ratio is not None and module.endswith(("k_proj", "v_proj"))
            rank = latent_rank(width, kv_ratio) if latent else factor_ranks.get(module, min(shape2))
            factorized = latent or (module in factor_ranks and lowrank_params(rank, shape2) < shape2[0] * shape2[1])
            if factorized:
                tensors[f"{module}.A"], tensors[f"{module}.B"] = _factor_pair(shape2, rank, dtype, device, gen)
                if not latent:  # descending importance: the loader's global rule can serve any larger ratio
                    tensors[f"{module}.score"] = uniform_priority(shape2, rank).float()
            else:
                tensors[pname] = _random(pshape, INIT_STD, dtype, device, gen)
            modules[module] = {"shape": list(shape2), "rank": rank if factorized else min(shape2),
                               "dense_rank": round(dense_rank(shape2), 2), "factorized": factorized} | (
                                   {"latent": True} if latent else {})
        else:  # embeddings, an untied head
            tensors[pname] = _random(pshape, INIT_STD, dtype, device, gen)
    with atomic_folder(folder, replace=True) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        write_tokenizer(tmp, config["vocab_size"])
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if ratio is not None:
            (tmp / MANIFEST).write_text(json.dumps(_manifest(modules, tensors, ratio, kv_ratio, width, config), indent=2)
                                        + "\n")
        (tmp / RECIPE).write_text(json.dumps(recipe | {"seconds": round(time.perf_counter() - start, 1)}, indent=2)
                                  + "\n")
    return folder


def _without_timing(recorded: dict) -> dict:
    return {k: v for k, v in recorded.items() if k != "seconds"}


def _manifest(modules: dict, tensors: dict, ratio: float, kv_ratio: float | None, width: int, config: dict) -> dict:
    dense_total = sum(m["shape"][0] * m["shape"][1] for m in modules.values())
    kept = sum(lowrank_params(m["rank"], tuple(m["shape"])) if m["factorized"] else m["shape"][0] * m["shape"][1]
               for m in modules.values())
    other = sum(t.numel() for n, t in tensors.items() if not n.endswith((".A", ".B", ".score")) and
                n.rpartition(".")[0] not in modules)
    kv = None
    if kv_ratio is not None:
        layers = config["num_hidden_layers"]
        rank = latent_rank(width, kv_ratio)
        kv = {"kv_ratio": kv_ratio, "schedule": "uniform", "width": width, "achieved_kv_ratio": 1 - rank / width,
              "ranks": [[rank, rank]] * layers, "sensitivity": None, "settings": {"synthetic": True}}
    return {"format_version": FORMAT_VERSION, "method": "synthetic", "source": {"path": "synthetic"},
            "target_ratio": ratio, "achieved_ratio": 1 - kept / dense_total,
            "model_ratio": 1 - (kept + other) / (dense_total + other),
            "linear_params": {"dense": dense_total, "kept": kept}, "modules": modules, "kv_latent": kv}


def committed_ranks(path: Path) -> dict[str, int]:
    """The factorised ranks of a real conversion's `lowrank.json` (a few KB, carried with the tree)."""
    manifest = read_manifest(Path(path).parent if Path(path).name == MANIFEST else Path(path))
    if manifest is None:
        raise SystemExit(f"{path}: no {MANIFEST} there")
    return {name: m["rank"] for name, m in manifest["modules"].items() if m["factorized"] and not m.get("latent")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--shapes", nargs="+", default=["smollm2-135m", "llama3-8b", "qwen2-7b"], choices=list(SHAPES))
    parser.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--kv-ratio", type=float, default=0.5)
    parser.add_argument("--ranks", type=Path, help="a lowrank.json whose factorised ranks to use (same shape)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the random numbers are drawn (a GPU draws 8B in seconds)")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    ranks = committed_ranks(args.ranks) if args.ranks else None
    for shape in args.shapes:
        for ratio, kv in ((None, None), (args.ratio, None), (args.ratio, args.kv_ratio)):
            folder = build(shape, args.out, dtype, ratio, kv, args.device, ranks)
            print(f"{folder}: {json.loads((folder / RECIPE).read_text()).get('seconds', 0)} s", flush=True)


if __name__ == "__main__":
    main()
