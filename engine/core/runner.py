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
from .step_inputs import StepInputs


class ModelRunner:
    def __init__(self, model: CausalLM, num_blocks: int, block_size: int, sampler: Sampler | None, max_num_seqs: int,
                 max_blocks_per_seq: int, cuda_graphs: bool = True, int8_activations: bool = False, workers=None):
        """`sampler`: None on a tensor-parallel worker (rank 0 samples); `workers`: rank 0's handle on
        them (engine.core.workers), which each step is sent to before it runs here."""
        self.model, self.block_size, self.sampler, self.workers = model, block_size, sampler, workers
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

    def step_inputs(self, batch: Batch) -> StepInputs:
        """What this step computes, on the host: token ids, positions and cache slots packed in batch
        order, each sequence's block table and context, and the rows whose logits are sampled."""
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
        rows, total = [], 0
        for n, samples in zip(batch.num_new_tokens, batch.samples):
            total += n
            if samples:
                rows.append(total - 1)
        query_lens = tuple(batch.num_new_tokens)
        graph = self.graphs is not None and all(n == 1 for n in query_lens) and all(batch.samples) \
            and self.graphs.fits(len(batch.seqs))
        return StepInputs(ids, positions, slots, query_lens,
                          tuple(s.num_computed_tokens + n for s, n in zip(batch.seqs, query_lens)),
                          [list(s.block_table) for s in batch.seqs], rows,
                          any(s.num_computed_tokens > 0 for s in batch.seqs), graph)

    def _to_device(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

    def _block_tables(self, step: StepInputs) -> torch.Tensor:
        width = max(len(t) for t in step.block_tables)
        return self._to_device([t + [0] * (width - len(t)) for t in step.block_tables], torch.int32)

    def prepare(self, step: StepInputs) -> tuple[torch.Tensor, torch.Tensor, AttentionContext]:
        """-> input ids [T], positions [T] and the attention context of a step."""
        base = AttentionContext.from_lengths(step.query_lens, self.device)
        ctx = AttentionContext(
            cu_seqlens=base.cu_seqlens, seqlens=base.seqlens, max_seqlen=base.max_seqlen,
            slot_mapping=self._to_device(step.slots, torch.long),
            block_tables=self._block_tables(step) if step.reads_cache else None,
            context_lens=step.context_lens, reads_cache=step.reads_cache,
            # on the device once per step, not copied again by every layer's kernel call
            context_lens_tensor=self._to_device(list(step.context_lens), torch.int32) if step.reads_cache else None,
        )
        return self._to_device(step.ids, torch.long), self._to_device(step.positions, torch.long), ctx

    @torch.inference_mode()
    def execute(self, step: StepInputs) -> torch.Tensor:
        """The step's forward (which also fills the cache) -> hidden states of its sampled rows [S, hidden].
        Every rank of a tensor-parallel group runs it on the same `step` (engine.core.workers)."""
        if step.graph:
            hidden = self.graphs.run(self._to_device(step.ids, torch.long), self._to_device(step.positions, torch.long),
                                     self._to_device(step.slots, torch.long), self._block_tables(step),
                                     self._to_device(list(step.context_lens), torch.int32))  # every row samples
            return hidden
        ids, positions, ctx = self.prepare(step)
        return self.model(ids, positions, ctx)[self._to_device(step.rows, torch.long)]

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[S, vocab] float32 (under tensor parallelism, gathered on rank 0)."""
        return self.model.logits(hidden).float()

    @torch.inference_mode()
    def run(self, batch: Batch) -> tuple[list[int], list[dict[int, float]] | None]:
        """One forward + sampling; returns a token (and logprobs) per sampling sequence, in batch order."""
        step = self.step_inputs(batch)
        if self.workers is None:
            hidden = self.execute(step)
            logits = self.logits(hidden) if step.rows else None
        else:
            self.workers.send(step)  # the other ranks run the same step
            try:
                hidden = self.execute(step)
                logits = self.logits(hidden) if step.rows else None
            except RuntimeError as exc:  # a collective failed: a rank died or stopped answering
                raise self.workers.failure(exc) from None
        if logits is None:
            return [], None
        return self.sampler(logits, [s for s, samples in zip(batch.seqs, batch.samples) if samples])
