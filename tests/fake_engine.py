"""A fake paged model and helpers that drive the scheduler by hand (tests of scheduling and preemption).

The fake model writes each computed token's "K/V" (its whole prefix) into the paged cache through
the block table and reads every earlier position back before it samples, so a block handed out
with the wrong content, a skipped or repeated token, or a write into a shared block fails the
run, not just the bookkeeping. Its next token is a function of the whole token list, so a
sequence's output is the same however it was batched, chunked, cached or preempted.
"""


from engine.core.block_manager import BlockManager
from engine.core.scheduler import Batch, Scheduler
from engine.core.sequence import Sequence, SequenceStatus
from engine.sampling_params import SamplingParams

VOCAB = 1000  # the fake model's tokens; no test's EOS lies below it unless it means to


def next_token(token_ids: list[int]) -> int:
    """A polynomial hash of the whole list: order-sensitive, so different histories rarely agree."""
    h = len(token_ids)
    for t in token_ids:
        h = (h * 1_000_003 + t) % (1 << 61)
    return h % VOCAB


class FakeModel:
    """A paged-attention model in miniature: a slot's value is the prefix its token's K/V encodes."""

    def __init__(self, bm: BlockManager, sample=lambda seq: next_token(seq.token_ids)):
        self.bm, self.sample = bm, sample
        self.cache: dict[tuple[int, int], tuple[int, ...]] = {}  # (block id, offset) -> prefix

    def _slot(self, seq: Sequence, pos: int) -> tuple[int, int]:
        assert pos // self.bm.block_size < len(seq.block_table), f"seq {seq.seq_id} has no block for {pos}"
        return seq.block_table[pos // self.bm.block_size], pos % self.bm.block_size

    def run(self, batch: Batch) -> list[int]:
        for seq, n in zip(batch.seqs, batch.num_new_tokens):  # the whole batch writes, then attends
            assert n >= 1
            for pos in range(seq.num_computed_tokens, seq.num_computed_tokens + n):
                block = self.bm.blocks[self._slot(seq, pos)[0]]
                assert block.ref_count == 1 and block.hash is None, "write into a shared or published block"
                self.cache[self._slot(seq, pos)] = tuple(seq.token_ids[:pos + 1])
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            for pos in range(seq.num_computed_tokens + n):
                assert self.cache.get(self._slot(seq, pos)) == tuple(seq.token_ids[:pos + 1]), \
                    f"seq {seq.seq_id} reads wrong K/V at position {pos}"
        return [self.sample(seq) for seq, s in zip(batch.seqs, batch.samples) if s]


def make_seq(seq_id: int, prompt_tokens, request_id: int | None = None, **params) -> Sequence:
    return Sequence(seq_id, seq_id if request_id is None else request_id, list(prompt_tokens),
                    len(prompt_tokens), SamplingParams(**params))


def prompt(length: int, start: int = 100) -> list[int]:
    return list(range(start, start + length))


def make_scheduler(num_blocks=64, block_size=4, max_num_seqs=8, budget=64, max_model_len=256,
                   eos=(), prefix_caching=True) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, block_size, prefix_caching), max_num_seqs, budget, max_model_len, eos)


def check_invariants(sched: Scheduler, batch: Batch | None = None) -> None:
    """What must hold between any two calls: reference counts, the free list, budgets, seats."""
    bm = sched.block_manager
    holders: dict[int, int] = {}
    for seq in sched.running:
        assert seq.status is SequenceStatus.RUNNING
        assert len(set(seq.block_table)) == len(seq.block_table)
        assert len(seq.block_table) >= bm.blocks_needed(seq.num_computed_tokens)
        for b in seq.block_table:
            holders[b] = holders.get(b, 0) + 1
    assert all(bm.blocks[b].ref_count == holders.get(b, 0) for b in range(len(bm.blocks)))
    assert set(bm.free) == {b for b in range(len(bm.blocks)) if b not in holders}
    for seq in sched.waiting:
        assert seq.status is SequenceStatus.WAITING and seq.block_table == [] and seq.num_computed_tokens == 0
    assert len(sched.running) <= sched.max_num_seqs
    if batch is not None:
        assert batch.num_tokens <= sched.max_num_batched_tokens
        assert len(set(map(id, batch.seqs))) == len(batch.seqs)
        for seq, n, samples in zip(batch.seqs, batch.num_new_tokens, batch.samples):
            assert seq in sched.running
            assert len(seq.block_table) >= bm.blocks_needed(seq.num_computed_tokens + n)
            assert samples == (seq.num_computed_tokens + n == seq.num_tokens)


def step(sched: Scheduler, model: FakeModel) -> tuple[Batch, list[Sequence]]:
    batch = sched.schedule()
    check_invariants(sched, batch)
    produced = sched.update(batch, model.run(batch))
    check_invariants(sched)
    return batch, produced


def run_to_end(sched: Scheduler, model: FakeModel, max_steps: int = 2000) -> list[Batch]:
    batches = []
    while sched.has_unfinished():
        assert len(batches) < max_steps, "no progress"
        batch, _ = step(sched, model)
        assert batch.seqs, "an empty step while work is left"
        batches.append(batch)
    return batches


def run_alone(prompt_tokens, block_size: int = 4, max_model_len: int = 1024, eos=(), **params) -> list[int]:
    """The output with a roomy pool and nobody else around: the reference for every batched run."""
    sched = make_scheduler(num_blocks=256, block_size=block_size, max_model_len=max_model_len, eos=eos)
    seq = make_seq(0, prompt_tokens, **params)
    sched.add(seq)
    run_to_end(sched, FakeModel(sched.block_manager))
    return seq.output_token_ids


def assert_all_released(sched: Scheduler) -> None:
    bm = sched.block_manager
    assert not sched.running and not sched.waiting
    assert bm.num_free_blocks == len(bm.blocks) and all(b.ref_count == 0 for b in bm.blocks)
