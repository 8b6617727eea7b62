"""The paged KV cache's memory: one K and one V block pool per layer, sized from a byte budget."""

from __future__ import annotations

import torch

from .model import CausalLM

CPU_DEFAULT_BYTES = 1 << 30
CUDA_FREE_FRACTION = 0.9


def bytes_per_block(model: CausalLM, block_size: int) -> int:
    c = model.config
    itemsize = model.model.embed_tokens.weight.dtype.itemsize
    return 2 * c.num_layers * block_size * c.num_kv_heads * c.head_dim * itemsize


def default_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * CUDA_FREE_FRACTION)
    return CPU_DEFAULT_BYTES


def allocate_kv_cache(model: CausalLM, num_blocks: int, block_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Zeroed pools [num_blocks, block_size, Hkv, hd] per layer, handed to each attention module."""
    c, weight = model.config, model.model.embed_tokens.weight
    shape = (num_blocks, block_size, c.num_kv_heads, c.head_dim)
    caches = []
    for layer in model.model.layers:
        kv = (torch.zeros(shape, dtype=weight.dtype, device=weight.device),
              torch.zeros(shape, dtype=weight.dtype, device=weight.device))
        layer.self_attn.kv_cache = kv
        caches.append(kv)
    return caches
