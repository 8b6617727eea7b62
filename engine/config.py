"""The engine's settings, validated once (errors name the field and the value)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

# kv_cache_dtype -> what the cache stores: "auto", the model's dtype; "float16" (llama.cpp's default
# cache, half a float32 model's bytes); "int8", kernels.kv_quant's format
KV_CACHE_DTYPES = {"auto": None, "float16": torch.float16, "int8": torch.int8}
KV_DTYPES = tuple(KV_CACHE_DTYPES)


@dataclass(frozen=True, slots=True)
class EngineConfig:
    max_num_seqs: int = 64  # sequences in the running batch at most
    max_num_batched_tokens: int = 2048  # tokens per step (decodes + prefill chunks)
    max_model_len: int | None = None  # prompt + output tokens per sequence; None: the model's limit
    kv_cache_memory: int | None = None  # bytes for the KV cache; None: 1 GiB on CPU, 90 % of free memory on CUDA
    block_size: int = 16  # tokens per cache block
    enable_prefix_caching: bool = True
    seed: int = 0  # the RNG of requests that bring no seed of their own
    cuda_graphs: bool = True  # on CUDA, replay decode steps from graphs captured per batch size
    int8_activations: bool = False  # CPU, int8 / int4 weights: multiply by int8-rounded rows where it has VNNI
    kv_cache_dtype: str = "auto"  # KV_CACHE_DTYPES: "auto" (the model's dtype), "float16", "int8" (kernels.kv_quant)
    tensor_parallel_size: int = 1  # ranks the model is cut across (engine.model.tensor_parallel), one process each

    def __post_init__(self) -> None:
        positive = ["max_num_seqs", "max_num_batched_tokens", "block_size", "tensor_parallel_size"]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise ValueError(f"max_model_len must be an integer >= 2, got {self.max_model_len!r}")
        if not isinstance(self.int8_activations, bool):
            raise ValueError(f"int8_activations must be True or False, got {self.int8_activations!r}")
        if self.kv_cache_dtype not in KV_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(map(repr, KV_DTYPES))}, got {self.kv_cache_dtype!r}")
        if self.kv_cache_memory is not None and (not isinstance(self.kv_cache_memory, int) or self.kv_cache_memory < 1):
            raise ValueError(f"kv_cache_memory must be a positive number of bytes, got {self.kv_cache_memory!r}")

    def as_dict(self) -> dict:
        return asdict(self)
