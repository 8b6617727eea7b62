"""The paged KV cache's memory: per layer one block pool for K and one for V (or for their LoRC
latents), sized from a byte budget, in the model's dtype or the one its attention caches as
(`Attention.kv_dtype`); an int8 cache (kernels.kv_quant) adds a float32 scale pool beside each."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engine.config import EngineConfig
from engine.model.llama import CausalLM

CPU_DEFAULT_BYTES = 1 << 30
CUDA_FREE_FRACTION = 0.9


def bytes_per_block(model: CausalLM, block_size: int) -> int:
    """Bytes one block of `block_size` tokens takes over all layers (K and V, or their LoRC latents)."""
    per_token = 0
    for layer in model.model.layers:
        attn = layer.self_attn
        for shape in attn.cache_shapes():
            per_token += math.prod(shape) + 4 * math.prod(shape[:-1]) if attn.kv_int8 \
                else math.prod(shape) * (attn.kv_dtype or model.dtype).itemsize
    return block_size * per_token


def default_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * CUDA_FREE_FRACTION)
    return CPU_DEFAULT_BYTES


@dataclass(frozen=True, slots=True)
class CachePlan:
    max_model_len: int  # prompt + completion tokens per sequence
    budget: int  # bytes for the cache
    per_block: int  # bytes of one block over all layers
    num_blocks: int  # blocks the byte budget holds
    needed: int  # blocks one sequence of max_model_len takes


def plan_cache(model: CausalLM, config: EngineConfig) -> CachePlan:
    """How many blocks of `config.block_size` tokens the budget holds for `model` (every rank of a
    tensor-parallel group plans its own shard's; the fewest is what they all allocate)."""
    bs = config.block_size
    limit = model.config.max_position_embeddings
    max_model_len = min(config.max_model_len or limit, limit)
    per_block = bytes_per_block(model, bs)
    budget = config.kv_cache_memory or default_budget(model.device)
    return CachePlan(max_model_len, budget, per_block, budget // per_block, -(-max_model_len // bs))


def allocate_kv_cache(model: CausalLM, num_blocks: int, block_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Zeroed pools [num_blocks, block_size, *cache_shapes] per layer, handed to each attention module
    (int8 ones with their scale pools [num_blocks, block_size, *cache_shapes[:-1]])."""
    caches = []
    for layer in model.model.layers:
        attn = layer.self_attn
        dtype = attn.kv_dtype or model.dtype
        kv = tuple(torch.zeros((num_blocks, block_size, *shape), dtype=dtype, device=model.device)
                   for shape in attn.cache_shapes())
        attn.kv_cache = kv
        attn.kv_scales = tuple(torch.zeros((num_blocks, block_size, *shape[:-1]), dtype=torch.float32,
                                           device=model.device) for shape in attn.cache_shapes()) \
            if attn.kv_int8 else None
        caches.append(kv)
    return caches
