"""Runs one scheduled batch: pack its tokens, one forward over the paged cache, sample.

The batch is packed without padding: each sequence contributes the tokens it computes this
step (one when decoding, a chunk when prefilling), at their positions, with the cache slot each
token's K/V goes to. Logits are taken only at the last token of the sequences that sample.
"""

from __future__ import annotations

import torch

from .attention import AttentionContext
from .kv_cache import allocate_kv_cache
from .model import CausalLM
from .sampler import Sampler
from .scheduler import Batch


class ModelRunner:
    def __init__(self, model: CausalLM, num_blocks: int, block_size: int, sampler: Sampler):
        self.model, self.block_size, self.sampler = model, block_size, sampler
        self.device = model.device
        self.kv_cache = allocate_kv_cache(model, num_blocks, block_size)

    def prepare(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, AttentionContext, torch.Tensor]:
        """-> input ids [T], positions [T], the attention context, and the rows [S] whose logits are sampled."""
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
        query_lens = batch.num_new_tokens
        context_lens = tuple(s.num_computed_tokens + n for s, n in zip(batch.seqs, query_lens))
        reads_cache = any(s.num_computed_tokens > 0 for s in batch.seqs)
        tables = None
        if reads_cache:
            width = max(len(s.block_table) for s in batch.seqs)
            tables = torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s in batch.seqs],
                                  dtype=torch.int32).to(self.device, non_blocking=True)
        base = AttentionContext.from_lengths(query_lens, self.device)
        ctx = AttentionContext(
            cu_seqlens=base.cu_seqlens, seqlens=base.seqlens, max_seqlen=base.max_seqlen,
            slot_mapping=torch.tensor(slots, dtype=torch.long).to(self.device, non_blocking=True),
            block_tables=tables, context_lens=context_lens, reads_cache=reads_cache,
        )
        ends, total = [], 0
        for n, samples in zip(query_lens, batch.samples):
            total += n
            if samples:
                ends.append(total - 1)
        return (torch.tensor(ids, dtype=torch.long).to(self.device, non_blocking=True),
                torch.tensor(positions, dtype=torch.long).to(self.device, non_blocking=True),
                ctx, torch.tensor(ends, dtype=torch.long).to(self.device, non_blocking=True))

    @torch.inference_mode()
    def run(self, batch: Batch) -> tuple[list[int], list[dict[int, float]] | None]:
        """One forward + sampling; returns a token (and logprobs) per sampling sequence, in batch order."""
        ids, positions, ctx, rows = self.prepare(batch)
        hidden = self.model(ids, positions, ctx)  # (T, hidden)
        sampling = [s for s, samples in zip(batch.seqs, batch.samples) if samples]
        if not sampling:
            return [], None
        logits = self.model.logits(hidden[rows]).float()  # (S, vocab)
        return self.sampler(logits, sampling)
