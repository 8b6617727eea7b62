"""Runs one scheduled batch: pack its tokens, one forward over the paged cache, sample.

The batch is packed without padding: each sequence contributes the tokens it computes this
step (one when decoding, a chunk when prefilling), at their positions, with the cache slot each
token's K/V goes to. Logits are taken only at the last token of the sequences that sample.
"""

from __future__ import annotations

import torch

from engine.model.attention import AttentionContext
from engine.model.cpu_serving import to_cpu_serving
from engine.model.llama import CausalLM
from kernels import backend_for

from .cpu_memory import keep_freed_memory
from .cuda_graphs import DecodeGraphs
from .kv_cache import allocate_kv_cache
from .sampler import Sampler
from .scheduler import Batch


class ModelRunner:
    def __init__(self, model: CausalLM, num_blocks: int, block_size: int, sampler: Sampler, max_num_seqs: int,
                 max_blocks_per_seq: int, cuda_graphs: bool = True, int8_activations: bool = False):
        self.model, self.block_size, self.sampler = model, block_size, sampler
        self.device = model.device
        # The kernel path, asked once: what the model is swapped into, and whether graphs can capture its steps.
        self.backend = backend_for(self.device)
        if self.device.type == "cpu":
            keep_freed_memory()  # large activations from reused heap memory, not fresh pages (engine.core.cpu_memory)
            if self.backend.cpu_serving:
                to_cpu_serving(model, int8_activations)
        # One block more than the block manager hands out: padded graph rows write there.
        self.kv_cache = allocate_kv_cache(model, num_blocks + 1, block_size)
        self.scratch_block = num_blocks
        self.max_num_seqs, self.max_blocks_per_seq = max_num_seqs, max_blocks_per_seq
        self.graphs: DecodeGraphs | None = None
        if cuda_graphs and self.device.type == "cuda" and self._graphs_capture():
            self.graphs = DecodeGraphs(model, max_num_seqs, max_blocks_per_seq, block_size, num_blocks, capture=True)

    def _graphs_capture(self) -> bool:
        """Graphs need every layer's decode step free of host syncs: the backend's decode kernels."""
        c = self.model.config
        value_ranks = [cache[1].shape[-1] if layer.self_attn.latent else None
                       for layer, cache in zip(self.model.model.layers, self.kv_cache)]
        return self.backend.graphs_capture(c.num_heads, c.num_kv_heads, c.head_dim, self.kv_cache[0][0].dtype,
                                           value_ranks)

    def use_static_decode(self) -> None:
        """Run decode steps through the graph path's static buffers without capturing (CPU tests)."""
        self.graphs = DecodeGraphs(self.model, self.max_num_seqs, self.max_blocks_per_seq, self.block_size,
                                   self.scratch_block, capture=False)

    def _host_inputs(self, batch: Batch) -> tuple[list[int], list[int], list[int]]:
        """Token ids, positions and cache slots of the tokens this step computes, packed in batch order."""
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            start = seq.num_computed_tokens
            ids.extend(seq.token_ids[start:start + n])
            span = range(start, start + n)
            positions.extend(span)
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in span)
        return ids, positions, slots

    def _to_device(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

    def _block_tables(self, batch: Batch) -> torch.Tensor:
        width = max(len(s.block_table) for s in batch.seqs)
        return self._to_device([s.block_table + [0] * (width - len(s.block_table)) for s in batch.seqs], torch.int32)

    def prepare(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, AttentionContext, torch.Tensor]:
        """-> input ids [T], positions [T], the attention context, and the rows [S] whose logits are sampled."""
        ids, positions, slots = self._host_inputs(batch)
        query_lens = batch.num_new_tokens
        reads_cache = any(s.num_computed_tokens > 0 for s in batch.seqs)
        base = AttentionContext.from_lengths(query_lens, self.device)
        context_lens = tuple(s.num_computed_tokens + n for s, n in zip(batch.seqs, query_lens))
        ctx = AttentionContext(
            cu_seqlens=base.cu_seqlens, seqlens=base.seqlens, max_seqlen=base.max_seqlen,
            slot_mapping=self._to_device(slots, torch.long),
            block_tables=self._block_tables(batch) if reads_cache else None,
            context_lens=context_lens, reads_cache=reads_cache,
            # on the device once per step, not copied again by every layer's kernel call
            context_lens_tensor=self._to_device(list(context_lens), torch.int32) if reads_cache else None,
        )
        ends, total = [], 0
        for n, samples in zip(query_lens, batch.samples):
            total += n
            if samples:
                ends.append(total - 1)
        return self._to_device(ids, torch.long), self._to_device(positions, torch.long), ctx, \
            self._to_device(ends, torch.long)

    def _is_decode(self, batch: Batch) -> bool:
        return all(n == 1 for n in batch.num_new_tokens) and all(batch.samples) and self.graphs.fits(len(batch.seqs))

    @torch.inference_mode()
    def run(self, batch: Batch) -> tuple[list[int], list[dict[int, float]] | None]:
        """One forward + sampling; returns a token (and logprobs) per sampling sequence, in batch order."""
        sampling = [s for s, samples in zip(batch.seqs, batch.samples) if samples]
        if self.graphs is not None and self._is_decode(batch):
            ids, positions, slots = self._host_inputs(batch)
            lens = [s.num_computed_tokens + 1 for s in batch.seqs]
            hidden = self.graphs.run(self._to_device(ids, torch.long), self._to_device(positions, torch.long),
                                     self._to_device(slots, torch.long), self._block_tables(batch),
                                     self._to_device(lens, torch.int32))  # (B, hidden): every row samples
        else:
            ids, positions, ctx, rows = self.prepare(batch)
            hidden = self.model(ids, positions, ctx)[rows]  # (S, hidden); the forward also fills the cache
        if not sampling:
            return [], None
        logits = self.model.logits(hidden).float()  # (S, vocab)
        return self.sampler(logits, sampling)
