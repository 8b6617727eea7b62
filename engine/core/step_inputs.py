"""One engine step's inputs on the host: what the runner turns into tensors, and what rank 0 of a
tensor-parallel group sends the other ranks (one int64 tensor, no pickles) so that every rank
runs the same forward."""

from __future__ import annotations

from dataclasses import dataclass

import torch

HEADER = 6  # tokens, sequences, sampled rows, block-table entries, reads_cache, graph


@dataclass(frozen=True, slots=True)
class StepInputs:
    ids: list[int]  # token ids this step computes, packed in batch order
    positions: list[int]
    slots: list[int]  # the cache slot each token's K/V is written to
    query_lens: tuple[int, ...]  # tokens per sequence this step
    context_lens: tuple[int, ...]  # tokens per sequence once this step's are added
    block_tables: list[list[int]]  # per sequence
    rows: list[int]  # packed rows whose logits are sampled
    reads_cache: bool  # some sequence attends to keys of an earlier step
    graph: bool  # a decode step the runner replays from a CUDA graph

    def encode(self) -> torch.Tensor:
        """-> int64 [HEADER + payload]: the header's counts, then every list back to back."""
        tables = [len(t) for t in self.block_tables]
        header = [len(self.ids), len(self.query_lens), len(self.rows), sum(tables), int(self.reads_cache),
                  int(self.graph)]
        flat = [v for t in self.block_tables for v in t]
        return torch.tensor(header + self.ids + self.positions + self.slots + list(self.query_lens)
                            + list(self.context_lens) + tables + flat + self.rows, dtype=torch.long)

    @staticmethod
    def payload_size(header: torch.Tensor) -> int:
        """Values after the header, from the header alone (what a receiver allocates)."""
        tokens, seqs, rows, entries = (int(v) for v in header[:4])
        return 3 * tokens + 3 * seqs + entries + rows

    @classmethod
    def decode(cls, encoded: torch.Tensor) -> StepInputs:
        values = encoded.tolist()
        tokens, seqs, rows, _, reads_cache, graph = values[:HEADER]
        at = HEADER

        def take(n: int) -> list[int]:
            nonlocal at
            at += n
            return values[at - n: at]

        ids, positions, slots = take(tokens), take(tokens), take(tokens)
        query_lens, context_lens, widths = tuple(take(seqs)), tuple(take(seqs)), take(seqs)
        tables = [take(w) for w in widths]
        return cls(ids, positions, slots, query_lens, context_lens, tables, take(rows), bool(reads_cache), bool(graph))
