"""The model architecture, read from an HF folder's config.json into one frozen dataclass.

We parse config.json ourselves (no transformers config object at run time) and accept both
spellings transformers has used: `rope_theta` + `rope_scaling` (<= 4.x) and `rope_parameters`
(5.x).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

_DTYPES = {
    "float64": torch.float64,  # for references in tests
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


class ModelFolderError(ValueError):
    """A path that is not a model folder we can load; the message names what is wrong."""


def read_json_object(file: Path) -> dict:
    """A folder's JSON file that must hold an object (config.json, lowrank.json); anything else is a
    ModelFolderError naming the file."""
    try:
        value = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFolderError(f"{file} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ModelFolderError(f"{file} holds a JSON {type(value).__name__}, not an object")
    return value


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'fp16' / 'bfloat16' / torch.float32 ... -> torch.dtype, with a clear error otherwise."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported; use float32, float16, bfloat16 (or float64)")
        return dtype
    try:
        return _DTYPES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}") from None


@dataclass(frozen=True, slots=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # rope_type + its parameters; None for plain RoPE
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2: q/k/v carry a bias, o_proj does not
    o_bias: bool  # Llama's attention_bias puts a bias on o_proj too
    mlp_bias: bool
    sliding_windows: tuple[int | None, ...]  # per layer: window in tokens, None = full attention
    torch_dtype: str | None  # the dtype the weights were saved in
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelFolderError(
                f"model_type {self.model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ModelFolderError(
                f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}"
            )
        if len(self.sliding_windows) != self.num_layers:
            raise ModelFolderError(
                f"layer_types names {len(self.sliding_windows)} layers, num_hidden_layers={self.num_layers}"
            )
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ModelFolderError(
                f"rope_type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_dict(cls, cfg: dict) -> ModelConfig:
        """Build from a config.json dict (any transformers version's spelling)."""
        model_type = cfg.get("model_type", "")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ModelFolderError(f"hidden_act {cfg['hidden_act']!r} is not supported; only 'silu' (SwiGLU)")
        num_heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // num_heads
        rope_theta, rope_scaling = _read_rope(cfg)
        attention_bias = bool(cfg.get("attention_bias", False))
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=attention_bias or model_type == "qwen2",
            o_bias=attention_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            sliding_windows=_read_sliding_windows(cfg, model_type),
            torch_dtype=cfg.get("dtype") or cfg.get("torch_dtype"),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_folder(cls, path: str | Path) -> ModelConfig:
        config_file = Path(path) / "config.json"
        if not Path(path).is_dir():
            raise ModelFolderError(f"{path} is not a folder (expected an HF model folder with config.json)")
        if not config_file.is_file():
            raise ModelFolderError(f"{path} is not a model folder: config.json is missing")
        cfg = read_json_object(config_file)
        for name in _POSITIVE_INT_FIELDS:
            value = cfg.get(name)
            if value is None:
                continue  # absent (a required one is reported as missing below)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ModelFolderError(f"{config_file}: {name} must be a positive integer, got {value!r}")
        try:
            return cls.from_dict(cfg)
        except KeyError as exc:
            raise ModelFolderError(f"{config_file} lacks the field {exc.args[0]!r}") from None
        except (TypeError, ValueError, AttributeError) as exc:  # any other field of the wrong type
            raise ModelFolderError(f"{config_file}: a field has the wrong type or value: {exc}") from None


# Checked before they are used in arithmetic, so the message names the field, not the operation.
_POSITIVE_INT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                        "num_key_value_heads", "head_dim", "max_position_embeddings")


def _read_rope(cfg: dict) -> tuple[float, dict | None]:
    params = cfg.get("rope_parameters")
    if params:  # transformers 5: theta and scaling in one dict
        theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = cfg.get("rope_theta", 10000.0)
        scaling = dict(cfg.get("rope_scaling") or {})
    if "type" in scaling and "rope_type" not in scaling:  # the oldest spelling
        scaling["rope_type"] = scaling.pop("type")
    if scaling.get("rope_type", "default") == "default":
        return float(theta), None
    return float(theta), scaling


def _read_sliding_windows(cfg: dict, model_type: str) -> tuple[int | None, ...]:
    n = cfg["num_hidden_layers"]
    window = cfg.get("sliding_window")
    if model_type == "qwen2" and not cfg.get("use_sliding_window", False):
        window = None
    layer_types = cfg.get("layer_types")
    if layer_types is None:
        first_windowed = cfg.get("max_window_layers", 0) if model_type == "qwen2" else 0
        layer_types = ["sliding_attention" if i >= first_windowed else "full_attention" for i in range(n)]
    return tuple(window if (window and kind == "sliding_attention") else None for kind in layer_types)
