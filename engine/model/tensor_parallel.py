"""Tensor parallelism, Megatron-style: a loaded model cut, in place, into one rank's shard of a
torch.distributed group (NCCL on CUDA, gloo on CPU), as vLLM and nano-vllm split theirs.

- Column-parallel (q, k, v, gate, up): the rank keeps its rows of the output, its heads or its
  intermediate channels. A factorised A·B keeps its rows of A and the whole of B: each rank
  computes x·Bᵀ (r wide) itself and nothing is communicated.
- Row-parallel (o, down): the rank keeps its columns of the input and the partial products are
  summed with one all_reduce. Dense, over the output [T, hidden]; factorised, over the rank-r
  intermediate x_i·B_iᵀ before A, which every rank holds whole: r values per token, not `hidden`
  (`communicated_values` counts both, for the benchmark).
- Embedding and head by vocabulary: a lookup zeroes the ids outside the rank's range and the
  ranks' rows are summed; the head's logits are gathered to rank 0, the sampler's. A vocabulary
  the world does not divide is padded to whole shards (padded logits are cut after the gather).
- GQA: KV heads are split when the world divides them and replicated when they divide the world
  (each rank keeps the one KV head its query heads read, as vLLM does); otherwise refused.
- LoRC latent K/V: k and v are column-parallel factorised layers, so each rank computes and
  caches the whole latent (B whole: the latent is shared by the layer's heads) and rebuilds only
  its own heads from it (its rows of A).
- Quantised layers cut like float ones: rows freely, a row-parallel cut of columns only at whole
  groups of scales (else refused).

The shard's modules are the plain ones (`Linear`, `LowRankLinear`, their quantised forms) with
fewer rows or columns, so the kernels, the CPU serving swap and CUDA graphs take them unchanged;
only the row-parallel layers, the embedding and the head are wrappers that communicate.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kernels.quant import stored_cols

from .config import ModelConfig
from .layers import Linear, LowRankLinear, QuantEmbedding, QuantLinear, QuantLowRankLinear
from .llama import CausalLM


def check_tensor_parallel(config: ModelConfig, size: int) -> None:
    """A world size this model's heads and channels can be cut into, or a ValueError naming the numbers."""
    if size < 1:
        raise ValueError(f"tensor_parallel_size must be a positive integer, got {size}")
    if config.num_heads % size:
        raise ValueError(f"tensor_parallel_size {size} does not divide the model's {config.num_heads} attention heads")
    kv = config.num_kv_heads
    if kv % size and size % kv:
        raise ValueError(f"tensor_parallel_size {size} neither divides the model's {kv} KV heads nor is a multiple "
                         "of them (for the KV heads to be replicated)")
    if config.intermediate_size % size:
        raise ValueError(f"tensor_parallel_size {size} does not divide the model's intermediate size "
                         f"{config.intermediate_size}")


def shard_model(model: CausalLM, rank: int, size: int, group: dist.ProcessGroup | None = None) -> CausalLM:
    """Cut `model` (freshly loaded, whole) into rank `rank`'s shard of `size`, in place; returns it."""
    config = model.config
    check_tensor_parallel(config, size)
    if size == 1:
        return model
    d = config.head_dim
    heads = config.num_heads // size
    kv_heads = max(1, config.num_kv_heads // size)
    kv_first = rank * config.num_kv_heads // size  # replicated: the KV head this rank's query heads read
    inter = config.intermediate_size // size
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.q_proj = _column(attn.q_proj, rank * heads * d, (rank + 1) * heads * d)
        attn.k_proj = _column(attn.k_proj, kv_first * d, (kv_first + kv_heads) * d)
        attn.v_proj = _column(attn.v_proj, kv_first * d, (kv_first + kv_heads) * d)
        attn.o_proj = _row(attn.o_proj, rank * heads * d, (rank + 1) * heads * d, group)
        attn.num_heads, attn.num_kv_heads = heads, kv_heads
        mlp.gate_proj = _column(mlp.gate_proj, rank * inter, (rank + 1) * inter)
        mlp.up_proj = _column(mlp.up_proj, rank * inter, (rank + 1) * inter)
        mlp.down_proj = _row(mlp.down_proj, rank * inter, (rank + 1) * inter, group)
    _shard_vocabulary(model, rank, size, group)
    return model


# -- column-parallel: keep output rows [start, stop) ---------------------------------------------

def _column(module: nn.Module, start: int, stop: int) -> nn.Module:
    """`module` keeping rows [start, stop) of its output (a factorised one: A's rows, B whole)."""
    if isinstance(module, QuantLowRankLinear):
        _set(module, "A_q", module.A_q[start:stop])
        _set(module, "A_scales", module.A_scales[start:stop])
    elif isinstance(module, QuantLinear):
        _set(module, "weight_q", module.weight_q[start:stop])
        _set(module, "weight_scales", module.weight_scales[start:stop])
    elif isinstance(module, LowRankLinear):
        _set(module, "A", module.A[start:stop])
    elif isinstance(module, Linear):
        _set(module, "weight", module.weight[start:stop])
    else:
        raise TypeError(f"no column-parallel form for {type(module).__name__}")
    if module.bias is not None:
        _set(module, "bias", module.bias[start:stop])
    module.out_features = stop - start
    return module


def _set(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace a parameter or buffer by (a contiguous copy of) a slice, freeing the whole."""
    value = value.contiguous().clone()
    if name in module._parameters:
        module._parameters[name] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[name] = value


# -- row-parallel: keep input columns [start, stop), all_reduce the partial products -----------

class RowParallelLinear(nn.Module):
    """y = Σ_ranks x_i·W_iᵀ + b: this rank's columns of a dense (or quantised) W, one all_reduce
    of the output [T, out]; the bias is added once, after it."""

    def __init__(self, part: Linear, bias: torch.Tensor | None, group: dist.ProcessGroup | None):
        super().__init__()
        self.part, self.bias, self.group = part, bias, group
        self.in_features, self.out_features = part.in_features, part.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.part(x)
        dist.all_reduce(y, group=self.group)
        return y if self.bias is None else y + self.bias

    def communicated_values(self, tokens: int) -> int:
        return tokens * self.out_features


class RowParallelLowRank(nn.Module):
    """y = (Σ_ranks x_i·B_iᵀ)·Aᵀ + b: this rank's columns of B (`down`, a linear [r, in_i]); the
    all_reduce runs over the rank-r intermediate, then A (`up`, whole on every rank, with the bias)."""

    def __init__(self, down: Linear, up: Linear, group: dist.ProcessGroup | None):
        super().__init__()
        self.down, self.up, self.group = down, up, group
        self.in_features, self.out_features, self.rank = down.in_features, up.out_features, down.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.down(x)
        dist.all_reduce(t, group=self.group)
        return self.up(t)

    def communicated_values(self, tokens: int) -> int:
        return tokens * self.rank


def _row(module: nn.Module, start: int, stop: int, group: dist.ProcessGroup | None) -> nn.Module:
    if isinstance(module, LowRankLinear):  # the quantised form too: it is a subclass
        down = _columns_of(module, "B", module.in_features, start, stop)
        up = _columns_of(module, "A", module.rank, 0, module.rank, module.bias)
        return RowParallelLowRank(down, up, group)
    if isinstance(module, Linear):
        return RowParallelLinear(_columns_of(module, "weight", module.in_features, start, stop), module.bias, group)
    raise TypeError(f"no row-parallel form for {type(module).__name__}")


def _columns_of(module: nn.Module, leaf: str, cols: int, start: int, stop: int,
                bias: torch.Tensor | None = None) -> Linear:
    """Columns [start, stop) of one of `module`'s matrices (`weight`, `A` or `B`) as a plain linear
    (a `QuantLinear` over its levels and scales when quantised)."""
    if not isinstance(module, (QuantLinear, QuantLowRankLinear)):
        matrix = getattr(module, leaf)
        with torch.device("meta"):
            linear = Linear(stop - start, matrix.shape[0], bias is not None)
        _set(linear, "weight", matrix[:, start:stop])
    else:
        bits, group = module.bits, module.group
        if start % group or (stop % group and stop != cols):
            raise ValueError(f"a tensor-parallel cut at input columns {start}:{stop} splits groups of {group} "
                             f"scales: choose a tensor_parallel_size that keeps whole groups")
        levels, scales = getattr(module, f"{leaf}_q"), getattr(module, f"{leaf}_scales")
        with torch.device("meta"):
            linear = QuantLinear(stop - start, levels.shape[0], bits, group, bias is not None)
        _set(linear, "weight_q", levels[:, stored_cols(start, bits):stored_cols(stop, bits)])
        _set(linear, "weight_scales", scales[:, start // group: -(-stop // group)])
    if bias is not None:
        _set(linear, "bias", bias)
    return linear


# -- vocabulary-parallel embedding and head -----------------------------------------------------

class VocabParallelEmbedding(nn.Module):
    """This rank's rows [start, stop) of the token table (padded to whole shards): a lookup zeroes
    the ids outside them and the ranks' rows are summed."""

    def __init__(self, table: nn.Module, start: int, stop: int, group: dist.ProcessGroup | None):
        super().__init__()
        self.table, self.start, self.stop, self.group = table, start, stop, group

    @property
    def weight(self) -> torch.Tensor:
        return self.table.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        inside = (ids >= self.start) & (ids < self.stop)
        x = self.table(torch.where(inside, ids - self.start, 0))
        x = x.masked_fill(~inside[..., None], 0)
        dist.all_reduce(x, group=self.group)
        return x


class VocabParallelHead(nn.Module):
    """Logits of this rank's vocabulary rows, gathered to rank 0 (the sampler's) -> [N, vocab] there;
    the other ranks return their own part."""

    def __init__(self, part: nn.Module, vocab_size: int, group: dist.ProcessGroup | None):
        super().__init__()
        self.part, self.vocab_size, self.group = part, vocab_size, group
        self.root = 0 if group is None else dist.get_global_rank(group, 0)  # the group's rank 0, globally
        self.size = dist.get_world_size(group)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        local = self.part(hidden).contiguous()
        if dist.get_rank() != self.root:
            dist.gather(local, None, dst=self.root, group=self.group)
            return local
        parts = [torch.empty_like(local) for _ in range(self.size)]
        dist.gather(local, parts, dst=self.root, group=self.group)
        return torch.cat(parts, dim=-1)[..., : self.vocab_size]


def _shard_vocabulary(model: CausalLM, rank: int, size: int, group: dist.ProcessGroup | None) -> None:
    vocab = model.config.vocab_size
    per = -(-vocab // size)
    start, stop = rank * per, min(vocab, (rank + 1) * per)
    embed = model.model.embed_tokens
    tied = model.lm_head is None or (isinstance(embed, QuantEmbedding) and isinstance(model.lm_head, QuantLinear)
                                     and model.lm_head.weight_q is embed.weight_q)
    if isinstance(embed, QuantEmbedding):
        for name in ("weight_q", "weight_scales"):
            _set(embed, name, _padded_rows(getattr(embed, name), start, stop, per))
        embed.num_embeddings = per
        table = embed
    else:
        table = nn.Embedding.from_pretrained(_padded_rows(embed.weight, start, stop, per), freeze=True)
    if tied:
        head = table.as_head() if isinstance(table, QuantEmbedding) else _linear_over(table.weight)
    else:
        head = model.lm_head
        names = ("weight_q", "weight_scales") if isinstance(head, QuantLinear) else ("weight",)
        for name in names:
            _set(head, name, _padded_rows(getattr(head, name), start, stop, per))
        head.out_features = per
    model.model.embed_tokens = VocabParallelEmbedding(table, start, stop, group)
    model.lm_head = VocabParallelHead(head, vocab, group)


def _padded_rows(t: torch.Tensor, start: int, stop: int, rows: int) -> torch.Tensor:
    """Rows [start, stop) of `t`, padded with zero rows to `rows`."""
    out = t.new_zeros(rows, *t.shape[1:])
    out[: stop - start] = t[start:stop]
    return out


def _linear_over(weight: torch.Tensor) -> Linear:
    """A bias-free `Linear` whose weight is `weight` itself (a tied head over the table's rows)."""
    with torch.device("meta"):
        linear = Linear(weight.shape[1], weight.shape[0])
    linear.weight = nn.Parameter(weight, requires_grad=False)
    return linear


def communicated_values(model: CausalLM, tokens: int = 1) -> dict[str, int]:
    """Values each row-parallel layer all_reduces for `tokens` tokens (per layer name)."""
    return {name: m.communicated_values(tokens) for name, m in model.named_modules()
            if isinstance(m, (RowParallelLinear, RowParallelLowRank))}
