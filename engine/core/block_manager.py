"""The paged KV cache's bookkeeping: which block holds which tokens, shared by whom.

A sequence owns a block table (block ids in token order). With prefix caching, each full block
is keyed by a hash chained over the whole prefix (its parent's hash and its own tokens); a new
sequence whose leading blocks match reuses them (reference counted) and skips their prefill.
A hit is accepted only when the stored parent hash and tokens equal the new ones, so even a hash
collision cannot hand out the wrong K/V. A block whose count drops to zero keeps its content and
goes to the back of the free list; allocation takes from the front, so the least recently
released cached block is the one evicted. Pure Python: no tensors, unit-tested on its own.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from .sequence import Sequence


def block_hash(parent: bytes, tokens: tuple[int, ...]) -> bytes:
    """A key for a full block: covers the whole prefix through `parent` (b"" for the first block)."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


@dataclass(eq=False)
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None  # set once the block is full and its K/V computed
    parent: bytes = b""
    tokens: tuple[int, ...] = ()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))  # LRU first
        self.cached: dict[bytes, int] = {}  # hash -> block id

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- admission -----------------------------------------------------------------------------
    def prefix_hits(self, seq: Sequence) -> list[int]:
        """Block ids of `seq`'s leading full blocks already in the cache (never its last token's block)."""
        if not self.enable_prefix_caching:
            return []
        hits, parent, bs = [], b"", self.block_size
        # Leave at least the last token to compute: its logits give the next token.
        for i in range((seq.num_tokens - 1) // bs):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = block_hash(parent, tokens)
            block = self.blocks[self.cached[h]] if h in self.cached else None
            if block is None or block.parent != parent or block.tokens != tokens:
                break
            hits.append(block.block_id)
            parent = h
        return hits

    def can_allocate(self, seq: Sequence) -> bool:
        hits = self.prefix_hits(seq)
        free_hits = sum(1 for b in hits if self.blocks[b].ref_count == 0)  # reusing them takes them off the free list
        return self.blocks_needed(seq.num_tokens) - len(hits) <= self.num_free_blocks - free_hits

    def allocate(self, seq: Sequence) -> None:
        """Give `seq` blocks for all its known tokens, reusing cached prefix blocks; sets its computed count."""
        assert not seq.block_table, "allocate() is for a sequence that holds no blocks"
        hits = self.prefix_hits(seq)
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free[block_id]
            block.ref_count += 1
        seq.block_table = hits + [self._take_free() for _ in range(self.blocks_needed(seq.num_tokens) - len(hits))]
        seq.num_computed_tokens = seq.num_cached_tokens = len(hits) * self.block_size
        seq.num_published_blocks = len(hits)

    # -- growth --------------------------------------------------------------------------------
    def slots_missing(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks `seq` still needs to hold `num_tokens` tokens."""
        return max(0, self.blocks_needed(num_tokens) - len(seq.block_table))

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.slots_missing(seq, num_tokens) <= self.num_free_blocks

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        seq.block_table.extend(self._take_free() for _ in range(self.slots_missing(seq, num_tokens)))

    def register_computed(self, seq: Sequence) -> None:
        """Publish `seq`'s full, computed blocks to the prefix cache (called after each step)."""
        if not self.enable_prefix_caching:
            return
        bs, start = self.block_size, seq.num_published_blocks
        parent = self.blocks[seq.block_table[start - 1]].hash if start else b""
        for i in range(start, seq.num_computed_tokens // bs):
            block = self.blocks[seq.block_table[i]]
            if block.hash is None:
                tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
                block.hash, block.parent, block.tokens = block_hash(parent, tokens), parent, tokens
                self.cached.setdefault(block.hash, block.block_id)  # an equal block may be published already
            parent = block.hash
            seq.num_published_blocks = i + 1

    # -- release -------------------------------------------------------------------------------
    def release(self, seq: Sequence) -> None:
        """Drop `seq`'s references. Tail blocks are queued for eviction before the shared head blocks."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} released more often than taken"
            if block.ref_count == 0:
                self.free[block_id] = None
                if block.hash is None:  # holds nothing reusable: hand it out first
                    self.free.move_to_end(block_id, last=False)
        seq.block_table = []
        seq.num_computed_tokens = seq.num_published_blocks = 0

    def _take_free(self) -> int:
        if not self.free:
            raise RuntimeError("no free KV-cache block: the scheduler should have checked first")
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self.cached.get(block.hash) == block_id:
            del self.cached[block.hash]  # evicted: its content is about to be overwritten
        block.hash, block.parent, block.tokens, block.ref_count = None, b"", (), 1
        return block_id
