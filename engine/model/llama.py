"""A Llama-family decoder (Llama, Mistral, Qwen2) in plain torch, over packed token batches.

Module and parameter names mirror transformers' (`model.layers.N.self_attn.q_proj.weight`), so
an HF folder's safetensors load straight into it. `forward` takes packed tokens [T] with their
positions and an `AttentionContext`; no padding anywhere.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels.kv_quant import dequantize_vectors, quantize_vectors

from .attention import AttentionContext, cached_attention, causal_attention, latent_cached_attention
from .config import ModelConfig
from .layers import Linear, LowRankLinear, RMSNorm, SwiGLU
from .rope import RoPE, RotaryEmbedding


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, sliding_window: int | None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.sliding_window = sliding_window
        self.q_proj = Linear(config.hidden_size, config.q_size, config.qkv_bias)
        self.k_proj = Linear(config.hidden_size, config.kv_size, config.qkv_bias)
        self.v_proj = Linear(config.hidden_size, config.kv_size, config.qkv_bias)
        self.o_proj = Linear(config.q_size, config.hidden_size, config.o_bias)
        self.kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None  # the engine's paged cache for this layer
        self.kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None  # an int8 cache's scales [blocks, bs, Hkv]
        self.kv_dtype: torch.dtype | None = None  # set by `use_kv_cache_dtype`: what K/V are cached as; None: x's
        self.inv_freq: torch.Tensor | None = None  # set by `use_latent_kv`: keys are rebuilt and rotated there
        self.rope = RoPE()

    @property
    def latent(self) -> bool:
        """Whether the cache holds LoRC latents (B_k x, B_v x) instead of keys and values."""
        return self.inv_freq is not None

    def use_latent_kv(self, inv_freq: torch.Tensor) -> None:
        """Cache latents from now on; K and V must be factorised (`converters.lorc`)."""
        if not (isinstance(self.k_proj, LowRankLinear) and isinstance(self.v_proj, LowRankLinear)):
            raise ValueError("a latent KV cache needs factorised k_proj and v_proj")
        self.inv_freq = inv_freq

    @property
    def kv_int8(self) -> bool:
        """Whether K/V are cached as int8 vectors with one scale each (kernels.kv_quant)."""
        return self.kv_dtype == torch.int8

    def use_kv_cache_dtype(self, name: str) -> None:
        """Cache K and V as `name` (engine.config.KV_CACHE_DTYPES: float16, or int8 vectors with one
        scale each, kernels.kv_quant), and attend to them as stored."""
        from engine.config import KV_CACHE_DTYPES

        if name not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(map(repr, KV_CACHE_DTYPES))}, got {name!r}")
        dtype = KV_CACHE_DTYPES[name]
        if self.latent and dtype is not None:
            raise ValueError(f"a {name} KV cache takes keys and values, not LoRC latents (kv_cache_dtype='auto' "
                             "for a LoRC folder)")
        self.kv_dtype = dtype

    def cache_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Per-token shapes of what this layer caches: (r_k,), (r_v,) latents, or K and V [Hkv, D]."""
        if self.latent:
            return (self.k_proj.rank,), (self.v_proj.rank,)
        return (self.num_kv_heads, self.head_dim), (self.num_kv_heads, self.head_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        q = self.rope(self.q_proj(x).unflatten(-1, (self.num_heads, self.head_dim)), cos, sin)  # (T, Hq, hd)
        if self.latent:
            cached = self.k_proj.down(x), self.v_proj.down(x)  # (T, r_k), (T, r_v)
        else:
            cached = self._keys_values(self.k_proj(x), self.v_proj(x), cos, sin)  # (T, Hkv, hd) each
        stored = cached
        if self.kv_int8:  # what is stored is what is attended to, cached or not
            stored = tuple(quantize_vectors(t) for t in cached)
            cached = tuple(dequantize_vectors(levels, scales, x.dtype) for levels, scales in stored)
        elif self.kv_dtype not in (None, x.dtype):
            stored = tuple(t.to(self.kv_dtype) for t in cached)
            cached = tuple(t.to(x.dtype) for t in stored)
        if ctx.slot_mapping is not None:
            self._write_cache(stored, ctx.slot_mapping)
            if ctx.reads_cache:
                return self.o_proj(self._cached_attention(q, ctx).flatten(-2))
        k, v = self._keys_values(self.k_proj.up(cached[0]), self.v_proj.up(cached[1]), cos, sin) if self.latent \
            else cached
        return self.o_proj(causal_attention(q, k, v, ctx, self.sliding_window).flatten(-2))

    def _write_cache(self, new: tuple, slots: torch.Tensor) -> None:
        """This step's cached tensors into their slots of the pools [blocks, block_size, *cache_shapes]
        (set by the engine); for an int8 cache `new` is ((K levels, K scales), (V levels, V scales))."""
        pools, parts = self.kv_cache, new
        if self.kv_int8:
            pools, parts = (*self.kv_cache, *self.kv_scales), (new[0][0], new[1][0], new[0][1], new[1][1])
        for pool, part in zip(pools, parts):
            pool.view(-1, *part.shape[1:])[slots] = part

    def _keys_values(self, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Projected k, v [T, kv_size] -> (rotated keys, values), each [T, Hkv, hd]."""
        shape = (self.num_kv_heads, self.head_dim)
        return self.rope(k.unflatten(-1, shape), cos, sin), v.unflatten(-1, shape)

    def _cached_attention(self, q: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        if not self.latent:
            return cached_attention(q, *self.kv_cache, ctx, self.sliding_window, self.kv_scales)
        k, v = self.k_proj, self.v_proj
        return latent_cached_attention(q, *self.kv_cache, k.A, v.A, k.bias, v.bias, self.inv_freq, ctx,
                                       self.sliding_window)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, config.sliding_windows[layer_idx])
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size, config.mlp_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderStack(nn.Module):
    """What HF calls `model.model`: embeddings, layers, final norm."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # (T, hidden)
        cos, sin = self.rotary(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, ctx)
        return self.norm(x)


class CausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = DecoderStack(config)
        # None when tied to the embeddings; the CPU serving form sets its packed copy of the table here
        self.lm_head = None if config.tie_word_embeddings else Linear(config.hidden_size, config.vocab_size)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """Packed tokens [T] at `positions` [T] -> final hidden states [T, hidden]."""
        return self.model(input_ids, positions, ctx)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states [N, hidden] -> logits [N, vocab] in the model dtype."""
        if self.lm_head is None:
            return torch.nn.functional.linear(hidden, self.model.embed_tokens.weight)
        return self.lm_head(hidden)

    def use_latent_kv(self) -> None:
        """Every layer caches LoRC latents (a folder whose manifest has `kv_latent`)."""
        for layer in self.model.layers:
            layer.self_attn.use_latent_kv(self.model.rotary.inv_freq)

    def use_kv_cache_dtype(self, name: str) -> None:
        """Every layer caches (and attends to) keys and values as `name` (an EngineConfig.kv_cache_dtype)."""
        for layer in self.model.layers:
            layer.self_attn.use_kv_cache_dtype(name)

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The serving dtype: every float tensor's (a quantised table's levels are integers)."""
        return self.model.norm.weight.dtype

    def hidden_states(self, sequences: list[list[int]] | list[torch.Tensor]) -> list[torch.Tensor]:
        """Whole sequences (each from position 0), packed into one pass -> hidden [L_i, hidden] each."""
        ids = [torch.as_tensor(s, dtype=torch.long) for s in sequences]
        lengths = [len(s) for s in ids]
        ctx = AttentionContext.from_lengths(lengths, self.device)
        positions = torch.cat([torch.arange(n) for n in lengths]).to(self.device)
        return list(self(torch.cat(ids).to(self.device), positions, ctx).split(lengths))

    @torch.inference_mode()
    def forward_sequences(self, sequences: list[list[int]] | list[torch.Tensor]) -> list[torch.Tensor]:
        """Full logits [L_i, vocab] per sequence; for tests and small jobs (the engine keeps a KV cache)."""
        return [self.logits(h) for h in self.hidden_states(sequences)]
