"""The paged KV cache's memory: per layer one block pool for K and one for V (or for their LoRC
latents), sized from a byte budget."""

from __future__ import annotations

import math

import torch

from engine.model.llama import CausalLM

CPU_DEFAULT_BYTES = 1 << 30
CUDA_FREE_FRACTION = 0.9


def bytes_per_block(model: CausalLM, block_size: int) -> int:
    """Bytes one block of `block_size` tokens takes over all layers (K and V, or their LoRC latents)."""
    itemsize = model.dtype.itemsize
    per_token = sum(math.prod(shape) for layer in model.model.layers for shape in layer.self_attn.cache_shapes())
    return block_size * per_token * itemsize


def default_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * CUDA_FREE_FRACTION)
    return CPU_DEFAULT_BYTES


def allocate_kv_cache(model: CausalLM, num_blocks: int, block_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Zeroed pools [num_blocks, block_size, *cache_shapes] per layer, handed to each attention module."""
    caches = []
    for layer in model.model.layers:
        attn = layer.self_attn
        kv = tuple(torch.zeros((num_blocks, block_size, *shape), dtype=model.dtype, device=model.device)
                   for shape in attn.cache_shapes())
        attn.kv_cache = kv
        caches.append(kv)
    return caches
