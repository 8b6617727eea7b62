"""Load an HF model folder (config.json + safetensors) straight into our modules.

As gpt-fast does: build on the meta device (no wasted init), then assign the checkpoint's
tensors, cast to the chosen dtype on the chosen device. Safetensors only; never pickles.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from .config import ModelConfig, ModelFolderError, parse_dtype
from .model import CausalLM


def weight_files(path: str | Path) -> list[Path]:
    """The folder's safetensors files (single file or a sharded index), or an error naming what is missing."""
    path = Path(path)
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise ModelFolderError(f"{path}: shard {missing[0]} named in {index.name} is missing")
        return [path / s for s in shards]
    raise ModelFolderError(f"{path} is not a model folder: model.safetensors is missing")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(config: ModelConfig, device: torch.device) -> torch.dtype:
    """float32 on CPU (half-precision matmuls are slow there); the checkpoint's own dtype on GPU."""
    if device.type == "cpu":
        return torch.float32
    return parse_dtype(config.torch_dtype or "bfloat16")


def load_model(
    path: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device | None = None
) -> CausalLM:
    """Read `path` into a CausalLM in eval mode on `device` (default: CUDA if present) in `dtype`."""
    config = ModelConfig.from_folder(path)
    files = weight_files(path)
    device = torch.device(device) if device is not None else default_device()
    dtype = parse_dtype(dtype) if dtype is not None else default_dtype(config, device)
    with torch.device("meta"):
        model = CausalLM(config)
    expected = {name: p.shape for name, p in model.named_parameters()}
    state: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if name not in expected:
                    if name == "lm_head.weight" and config.tie_word_embeddings:
                        continue  # some tied checkpoints store the head anyway
                    raise ModelFolderError(f"{file}: unexpected tensor {name!r} for a {config.model_type} model")
                tensor = f.get_tensor(name)
                if tensor.shape != expected[name]:
                    raise ModelFolderError(
                        f"{file}: {name} has shape {tuple(tensor.shape)}, config.json implies {tuple(expected[name])}"
                    )
                state[name] = tensor.to(device=device, dtype=dtype)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ModelFolderError(f"{path}: {len(missing)} tensors missing from the checkpoint, e.g. {missing[0]!r}")
    model.load_state_dict(state, strict=True, assign=True)
    model.model.rotary.materialize(device)
    return model.eval()
