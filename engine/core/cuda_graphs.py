"""Decode steps replayed from CUDA graphs, one per batch size of a ladder (nano-vllm, gpt-fast).

A decode step of a small model is mostly launch overhead: dozens of kernels per layer, each a
few microseconds of work. Capturing the forward once per batch size and replaying it removes
the launches. Inputs live in static buffers the graph reads; a batch of b sequences runs the
smallest captured size >= b, its extra rows pointed at a scratch cache block nobody owns, and
their outputs dropped. The same static path runs eagerly where no graph can be captured (CPU),
which is how CI tests it.
"""

from __future__ import annotations

import torch

from engine.model.attention import AttentionContext
from engine.model.llama import CausalLM

LADDER = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class DecodeGraphs:
    def __init__(self, model: CausalLM, max_batch: int, max_blocks: int, block_size: int, scratch_block: int,
                 capture: bool):
        self.model, self.block_size, self.scratch_block = model, block_size, scratch_block
        self.sizes = sorted({s for s in LADDER if s < max_batch} | {max_batch})
        device = model.device
        n = self.sizes[-1]
        self.ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slots = torch.full((n,), scratch_block * block_size, dtype=torch.long, device=device)
        self.tables = torch.full((n, max_blocks), scratch_block, dtype=torch.int32, device=device)
        self.lens = torch.ones(n, dtype=torch.int32, device=device)
        self.cu_seqlens = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        if capture:
            self._capture()

    def _context(self, size: int) -> AttentionContext:
        return AttentionContext(cu_seqlens=self.cu_seqlens[: size + 1], seqlens=(1,) * size, max_seqlen=1,
                                slot_mapping=self.slots[:size], block_tables=self.tables[:size],
                                context_lens=None, reads_cache=True, context_lens_tensor=self.lens[:size])

    def _forward(self, size: int) -> torch.Tensor:
        return self.model(self.ids[:size], self.positions[:size], self._context(size))

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = None
        for size in reversed(self.sizes):  # largest first: the smaller graphs reuse its memory pool
            self._forward(size)  # warm-up outside the graph: Triton compiles and autotunes here
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self._forward(size)
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize()

    def fits(self, batch_size: int) -> bool:
        return batch_size <= self.sizes[-1]

    def run(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, tables: torch.Tensor,
            lens: torch.Tensor) -> torch.Tensor:
        """One decode step for b sequences (ids/positions/slots/lens [b], tables [b, w]) -> hidden [b, hidden]."""
        b, width = len(ids), tables.shape[1]
        size = next(s for s in self.sizes if s >= b)
        self.ids[:b].copy_(ids)
        self.positions[:b].copy_(positions)
        self.slots[:b].copy_(slots)
        self.lens[:b].copy_(lens)
        self.tables[:b, :width].copy_(tables)
        # Padding rows: write to and read from the scratch block only.
        self.slots[b:size].fill_(self.scratch_block * self.block_size)
        self.lens[b:size].fill_(1)
        self.tables[b:size].fill_(self.scratch_block)
        if size in self.graphs:
            self.graphs[size].replay()
            return self.outputs[size][:b]
        return self._forward(size)[:b]
