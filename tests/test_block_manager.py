"""The paged KV cache's bookkeeping: blocks come back, prefix hits are exact, eviction is LRU.

A wrong answer here hands a sequence another prompt's K/V: the model then writes fluent nonsense
and nothing crashes, so every hit is checked for its block ids, not just its count.
"""

import pytest

import engine.core.block_manager
from engine.core.block_manager import BlockManager, block_hash
from engine.core.sequence import Sequence
from engine.sampling_params import SamplingParams

BS = 4  # block size of most tests: small enough to reason about block by block


def make_seq(tokens, seq_id: int = 0) -> Sequence:
    return Sequence(seq_id, seq_id, list(tokens), len(tokens), SamplingParams())


def prompt(length: int, start: int = 100) -> list[int]:
    return list(range(start, start + length))


def admit_and_compute(bm: BlockManager, seq: Sequence) -> Sequence:
    """What admission plus a whole-prompt step does: allocate, compute everything, publish."""
    bm.allocate(seq)
    seq.num_computed_tokens = seq.num_tokens
    bm.register_computed(seq)
    return seq


def take_one(bm: BlockManager, seq_id: int = 999) -> int:
    """Allocate a one-token sequence (never a hit) and return the block it was given."""
    seq = make_seq([10_000 + seq_id], seq_id)
    bm.allocate(seq)
    return seq.block_table[0]


def assert_consistent(bm: BlockManager) -> None:
    """The free list holds exactly the unreferenced blocks; the cache maps hashes to their holders."""
    assert set(bm.free) == {b.block_id for b in bm.blocks if b.ref_count == 0}
    assert all(b.ref_count >= 0 for b in bm.blocks)
    for h, block_id in bm.cached.items():
        assert bm.blocks[block_id].hash == h


# -- allocation and release ------------------------------------------------------------------------
@pytest.mark.parametrize("num_tokens", [1, BS - 1, BS, BS + 1, 3 * BS, 3 * BS + 2])
def test_allocate_then_release_returns_every_block(num_tokens):
    """A sequence gets ceil(tokens / block_size) distinct blocks, and release hands them all back."""
    bm = BlockManager(16, BS)
    seq = make_seq(prompt(num_tokens))
    bm.allocate(seq)
    needed = -(-num_tokens // BS)
    assert len(seq.block_table) == len(set(seq.block_table)) == needed
    assert bm.num_free_blocks == 16 - needed
    assert all(bm.blocks[b].ref_count == 1 for b in seq.block_table)
    assert seq.num_computed_tokens == seq.num_cached_tokens == 0  # an empty cache has no hits
    bm.release(seq)
    assert bm.num_free_blocks == 16
    assert seq.block_table == [] and seq.num_computed_tokens == 0
    assert_consistent(bm)


def test_grow_takes_a_block_only_at_a_block_boundary():
    """Decoding adds a block when the next token starts one, never before."""
    bm = BlockManager(8, BS)
    seq = make_seq(prompt(BS))
    bm.allocate(seq)
    assert bm.slots_missing(seq, BS) == 0
    bm.grow(seq, BS)
    assert len(seq.block_table) == 1
    assert bm.slots_missing(seq, BS + 1) == 1 and bm.can_grow(seq, BS + 1)
    bm.grow(seq, BS + 1)
    assert len(seq.block_table) == 2 and bm.num_free_blocks == 6
    assert not bm.can_grow(seq, 8 * BS + 1)  # 9 blocks: more than the pool holds


@pytest.mark.parametrize("num_blocks, block_size", [(0, 4), (4, 0), (-1, 4)])
def test_empty_pool_or_block_is_refused(num_blocks, block_size):
    with pytest.raises(ValueError, match="num_blocks >= 1 and block_size >= 1"):
        BlockManager(num_blocks, block_size)


def test_taking_from_an_empty_pool_raises():
    """The scheduler must check first; running out silently would overwrite a live block."""
    bm = BlockManager(1, BS)
    bm.allocate(make_seq(prompt(BS)))
    with pytest.raises(RuntimeError, match="no free KV-cache block"):
        bm.allocate(make_seq(prompt(1, start=7), seq_id=1))


# -- prefix hits ------------------------------------------------------------------------------------
@pytest.mark.parametrize("length", [BS + 1, 2 * BS + 1, 2 * BS + 3, 5 * BS + 1])
def test_same_long_prompt_reuses_the_full_leading_blocks(length):
    """A second sequence with the first one's prompt takes its published full blocks and skips them."""
    bm = BlockManager(32, BS)
    first = admit_and_compute(bm, make_seq(prompt(length), 0))
    second = make_seq(prompt(length), 1)
    bm.allocate(second)
    full = (length - 1) // BS  # every full block lies before the last token here
    assert second.block_table[:full] == first.block_table[:full]
    assert not set(second.block_table[full:]) & set(first.block_table)
    assert second.num_computed_tokens == second.num_cached_tokens == full * BS
    assert second.num_published_blocks == full
    assert all(bm.blocks[b].ref_count == 2 for b in first.block_table[:full])
    assert all(bm.blocks[b].ref_count == 1 for b in first.block_table[full:] + second.block_table[full:])
    assert_consistent(bm)


def test_shared_blocks_are_reference_counted():
    """A shared block stays out of the free list until its last holder lets go."""
    bm = BlockManager(16, BS)
    first = admit_and_compute(bm, make_seq(prompt(2 * BS + 1), 0))
    second = make_seq(prompt(2 * BS + 1), 1)
    bm.allocate(second)
    shared, own_tail = first.block_table[:2], first.block_table[2]
    bm.release(first)
    assert all(bm.blocks[b].ref_count == 1 for b in shared)
    assert not set(shared) & set(bm.free)
    assert own_tail in bm.free  # its own tail is free again
    bm.release(second)
    assert all(bm.blocks[b].ref_count == 0 for b in shared)
    assert set(shared) <= set(bm.free) and bm.num_free_blocks == 16
    assert_consistent(bm)


def test_released_blocks_keep_their_content_for_a_later_hit():
    """Releasing does not forget: a later identical prompt hits blocks that sit on the free list."""
    bm = BlockManager(16, BS)
    first = admit_and_compute(bm, make_seq(prompt(3 * BS), 0))
    table = list(first.block_table)
    bm.release(first)
    again = make_seq(prompt(3 * BS), 1)
    bm.allocate(again)
    assert again.block_table[:2] == table[:2]
    assert again.num_cached_tokens == 2 * BS
    assert not set(table[:2]) & set(bm.free)  # taken off the free list, not shared with it
    assert_consistent(bm)


def test_nothing_is_a_hit_before_register_computed():
    """Allocated-but-uncomputed blocks hold no K/V yet, so they must not be offered."""
    bm = BlockManager(16, BS)
    bm.allocate(make_seq(prompt(3 * BS), 0))
    assert bm.prefix_hits(make_seq(prompt(3 * BS), 1)) == []


def test_register_computed_publishes_only_computed_full_blocks_across_chunks():
    """Chunked prefill publishes block by block, chaining the hash across calls."""
    bm = BlockManager(16, BS)
    seq = make_seq(prompt(3 * BS + 2), 0)
    bm.allocate(seq)
    probe = make_seq(prompt(3 * BS + 2), 1)
    for computed, published in [(3, 0), (BS, 1), (BS + 3, 1), (3 * BS + 1, 3), (3 * BS + 2, 3)]:
        seq.num_computed_tokens = computed
        bm.register_computed(seq)
        assert seq.num_published_blocks == published
        assert bm.prefix_hits(probe) == seq.block_table[:published]
    # The chain equals one computed in a single go.
    h0 = block_hash(b"", tuple(prompt(BS)))
    assert bm.blocks[seq.block_table[1]].hash == block_hash(h0, tuple(prompt(3 * BS + 2)[BS:2 * BS]))


@pytest.mark.parametrize("num_full", [1, 2, 3])
@pytest.mark.parametrize("extra", [0, 1, BS - 1])
def test_the_last_tokens_block_is_never_a_hit(num_full, extra):
    """Even a prompt entirely in the cache leaves >= 1 token to compute: its logits give the next token.

    extra == 0 is the exact-multiple case: the last full block holds the last token, so it is
    recomputed rather than hit.
    """
    length = num_full * BS + extra
    bm = BlockManager(32, BS)
    admit_and_compute(bm, make_seq(prompt(length), 0))
    assert len(bm.cached) == num_full  # the whole prompt's full blocks are published
    again = make_seq(prompt(length), 1)
    bm.allocate(again)
    expected_hits = num_full - 1 if extra == 0 else num_full
    assert again.num_cached_tokens == again.num_computed_tokens == expected_hits * BS
    assert again.num_tokens - again.num_computed_tokens >= 1
    # The block it computes into is its own: writing there cannot touch the first sequence's cache.
    assert bm.blocks[again.block_table[again.num_computed_tokens // BS]].ref_count == 1


def test_a_longer_prompt_with_the_same_head_hits_the_head_only():
    bm = BlockManager(32, BS)
    first = admit_and_compute(bm, make_seq(prompt(2 * BS + 1), 0))
    longer = make_seq(prompt(2 * BS) + [7] * (3 * BS), 1)
    bm.allocate(longer)
    assert longer.block_table[:2] == first.block_table[:2] and longer.num_cached_tokens == 2 * BS
    diverged = make_seq(prompt(BS) + [7] * (2 * BS), 2)  # same first block, different second
    assert bm.prefix_hits(diverged) == first.block_table[:1]


def test_prefix_caching_disabled_never_hits():
    bm = BlockManager(32, BS, enable_prefix_caching=False)
    first = admit_and_compute(bm, make_seq(prompt(3 * BS + 1), 0))
    assert bm.cached == {} and all(bm.blocks[b].hash is None for b in first.block_table)
    again = make_seq(prompt(3 * BS + 1), 1)
    bm.allocate(again)
    assert again.num_cached_tokens == again.num_computed_tokens == 0
    assert not set(again.block_table) & set(first.block_table)
    bm.release(first)
    assert bm.prefix_hits(make_seq(prompt(3 * BS + 1), 2)) == []


# -- eviction ---------------------------------------------------------------------------------------
def test_lru_eviction_order():
    """Unhashed free blocks go first, then cached ones, least recently released first, tail before head."""
    bm = BlockManager(8, BS)
    a = admit_and_compute(bm, make_seq(prompt(2 * BS + 1, start=100), 0))  # 2 cached blocks + 1 partial
    b = admit_and_compute(bm, make_seq(prompt(2 * BS + 1, start=500), 1))
    a_table, b_table = list(a.block_table), list(b.block_table)
    bm.release(a)  # released first: evicted first among the cached ones
    bm.release(b)
    assert bm.num_free_blocks == 8
    taken = [take_one(bm, 10 + i) for i in range(8)]
    unhashed = {a_table[2], b_table[2]} | (set(range(8)) - set(a_table) - set(b_table))
    assert set(taken[:4]) == unhashed
    assert taken[4:] == [a_table[1], a_table[0], b_table[1], b_table[0]]
    assert bm.cached == {}


def test_a_hit_refreshes_recency():
    """Reusing a cached prompt moves its blocks behind the ones nobody asked for since."""
    bm = BlockManager(4, BS)
    a = admit_and_compute(bm, make_seq(prompt(2 * BS, start=100), 0))
    b = admit_and_compute(bm, make_seq(prompt(2 * BS, start=500), 1))
    a_head, b_head = a.block_table[0], b.block_table[0]
    bm.release(a)
    bm.release(b)  # b is now the most recently released
    again = make_seq(prompt(2 * BS, start=100), 2)
    bm.allocate(again)  # hits a's head block, recomputes its last block
    assert again.block_table[0] == a_head
    bm.release(again)  # now a's head is the most recently released
    taken = [take_one(bm, 10 + i) for i in range(3)]
    assert a_head not in taken and b_head in taken
    assert bm.prefix_hits(make_seq(prompt(2 * BS + 1, start=100), 3)) == [a_head]
    assert bm.prefix_hits(make_seq(prompt(2 * BS + 1, start=500), 4)) == []


def test_an_evicted_block_is_no_longer_a_hit():
    """Once a cached block is handed out again its content is gone, and so is every hit after it."""
    bm = BlockManager(3, BS)
    first = admit_and_compute(bm, make_seq(prompt(3 * BS), 0))
    table = list(first.block_table)
    bm.release(first)
    probe = make_seq(prompt(3 * BS), 1)
    assert bm.prefix_hits(probe) == table[:2]
    evicted = [take_one(bm, 10), take_one(bm, 11)]  # the tail first: the head stays longest
    assert evicted == [table[2], table[1]]
    assert bm.prefix_hits(probe) == table[:1]
    assert take_one(bm, 12) == table[0]
    assert bm.prefix_hits(probe) == [] and bm.cached == {}


def test_evicting_a_duplicate_keeps_the_published_original():
    """Two sequences may compute the same block side by side; evicting the copy keeps the cached one."""
    bm = BlockManager(6, BS)
    first, second = make_seq(prompt(2 * BS + 1), 0), make_seq(prompt(2 * BS + 1), 1)
    bm.allocate(first)
    bm.allocate(second)  # nothing published yet: no hits, its own copies
    assert not set(first.block_table) & set(second.block_table)
    for seq in (first, second):
        seq.num_computed_tokens = seq.num_tokens
        bm.register_computed(seq)
    assert sorted(bm.cached.values()) == sorted(first.block_table[:2])  # the first publisher wins
    copies = list(second.block_table)
    bm.release(second)
    assert sorted(take_one(bm, 10 + i) for i in range(3)) == sorted(copies)  # the copies are evicted
    third = make_seq(prompt(2 * BS + 1), 2)
    assert bm.prefix_hits(third) == first.block_table[:2]
    assert_consistent(bm)


# -- collisions -------------------------------------------------------------------------------------
def test_a_colliding_hash_with_different_tokens_is_no_hit(monkeypatch):
    """Every block hashes alike: the stored tokens, not the hash, decide a hit."""
    monkeypatch.setattr(engine.core.block_manager, "block_hash", lambda parent, tokens: b"same")
    bm = BlockManager(16, BS)
    first = admit_and_compute(bm, make_seq(prompt(2 * BS + 1, start=100), 0))
    assert bm.cached == {b"same": first.block_table[0]}
    other = make_seq(prompt(2 * BS + 1, start=500), 1)
    bm.allocate(other)
    assert other.num_cached_tokens == 0 and not set(other.block_table) & set(first.block_table)
    # The real prompt still hits its first block (and only that one: the chain's next key collides).
    assert bm.prefix_hits(make_seq(prompt(2 * BS + 1, start=100), 2)) == first.block_table[:1]


def test_a_colliding_hash_with_the_same_tokens_but_another_prefix_is_no_hit(monkeypatch):
    """Every block hashes alike: a block whose tokens repeat the head's must not reuse the head's K/V."""
    monkeypatch.setattr(engine.core.block_manager, "block_hash", lambda parent, tokens: b"same")
    bm = BlockManager(16, BS)
    head = prompt(BS)
    first = admit_and_compute(bm, make_seq(head + prompt(BS, start=500) + [1], 0))
    repeated = make_seq(head + head + [1], 1)  # block 1 has block 0's tokens at another position
    bm.allocate(repeated)
    assert repeated.block_table[0] == first.block_table[0]
    assert repeated.block_table[1] != first.block_table[0]
    assert repeated.num_cached_tokens == BS


def test_same_tokens_after_another_prefix_is_no_hit_when_the_hash_ignores_the_parent(monkeypatch):
    """A hash that forgets the prefix maps a block to another prompt's block with equal tokens: refused."""
    monkeypatch.setattr(engine.core.block_manager, "block_hash", lambda parent, tokens: repr(tokens).encode())
    bm = BlockManager(16, BS)
    tail = prompt(BS, start=500)
    first = admit_and_compute(bm, make_seq(prompt(BS, start=100) + tail + [1], 0))
    moved = make_seq(tail + tail + [1], 1)  # its first block has `first`'s second block's tokens
    assert bm.prefix_hits(moved) == []
    bm.allocate(moved)
    assert moved.num_cached_tokens == 0 and not set(moved.block_table) & set(first.block_table)


# -- can_allocate -----------------------------------------------------------------------------------
@pytest.mark.parametrize("extra_blocks, fits", [(0, True), (1, True), (2, False), (3, False)])
def test_can_allocate_counts_hits_that_sit_on_the_free_list(extra_blocks, fits):
    """Reusing a free cached block takes it off the free list, so it cannot also serve as a new block."""
    bm = BlockManager(4, BS)
    first = admit_and_compute(bm, make_seq(prompt(2 * BS + 1), 0))
    bm.release(first)  # 4 free blocks, 2 of them holding the cached head
    seq = make_seq(prompt(2 * BS) + [7] * (extra_blocks * BS + 1), 1)  # 2 hits + extra + 1 new blocks
    assert len(bm.prefix_hits(seq)) == 2
    assert bm.can_allocate(seq) is fits
    if fits:
        bm.allocate(seq)
        assert seq.num_cached_tokens == 2 * BS
    else:
        with pytest.raises(RuntimeError):
            bm.allocate(seq)  # exact: one block more than "no" would have allowed


@pytest.mark.parametrize("extra_blocks, fits", [(2, True), (3, False)])
def test_can_allocate_with_hits_held_by_a_running_sequence(extra_blocks, fits):
    """Hits already in use cost no free block at all."""
    bm = BlockManager(6, BS)
    admit_and_compute(bm, make_seq(prompt(2 * BS + 1), 0))  # holds 3 blocks, 2 of them cached
    seq = make_seq(prompt(2 * BS) + [7] * (extra_blocks * BS + 1), 1)
    assert bm.can_allocate(seq) is fits
    if fits:
        bm.allocate(seq)
        assert bm.num_free_blocks == 0
