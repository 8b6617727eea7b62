"""The int8 KV cache format and its plain-torch reference.

At batch 16-64 a decode step reads more bytes of cached keys and values than of weights once the
weights are int8 (SmolLM2: 46 KB of float32 K/V per token over 30 layers against 143 MB of int8
weights per step, so 64 sequences of 128 tokens read 2.6x the weights' bytes), and llama.cpp
caches F16. With `kv_cache_dtype="int8"` every cached vector, one token's key or value of one KV
head ([head_dim] floats, after RoPE for keys), is stored as int8 levels and one float32 scale:
    d = max|x| / 127,   q = round(x / d) in [-127, 127]   (q = 0 where d = 0),
a quarter of the float32 bytes plus 4 per vector (Q8_0 with one block per head vector). Symmetric
for the reason the weight format is (kernels/quant.py); one scale per vector, not per cache
block, because a block fills a token at a time and its scale could not be known in advance.

The model attends to the dequantised vectors q·d everywhere, also within a prefill that reads no
cache (`engine.model.llama.Attention`), so a sequence's output does not depend on how the
scheduler split it into steps, and the format's cost is measured by a plain perplexity pass.

Every writer (this module, the native decoder layer in kernels/cpu/decoder_layer.c) computes d
and q in float32 with a true division and round-half-to-even, so they store identical levels;
every reader (the torch reference, the native and the Triton decode kernels) multiplies the
widened levels by d before using them, as `dequantize_vectors` does.
"""

from __future__ import annotations

import torch


def quantize_vectors(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (int8 levels [..., D], float32 scales [...]), one scale per vector."""
    xf = x.float()
    scales = xf.abs().amax(dim=-1) / 127
    divisor = torch.where(scales > 0, scales, torch.ones_like(scales))
    levels = torch.round(xf / divisor.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return levels, scales


def dequantize_vectors(levels: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """What every reader of the int8 cache sees: levels × their vector's scale, in `dtype`."""
    return (levels.float() * scales.unsqueeze(-1)).to(dtype)
