"""Continuous batching, driven by hand: schedule(), a fake model, update(), and the invariants between.

The fake model writes each computed token's "K/V" (its whole prefix) into the paged cache through
the block table and reads every earlier position back before it samples, so a block handed out
with the wrong content, a skipped or repeated token, or a write into a shared block fails the
run, not just the bookkeeping. Its next token is a function of the whole token list, so a
sequence's output is the same however it was batched, chunked, cached or preempted.
"""

import dataclasses
import random

import pytest

from engine.block_manager import BlockManager
from engine.sampling_params import SamplingParams
from engine.scheduler import Batch, Scheduler
from engine.sequence import Sequence, SequenceStatus

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


# -- budget, chunking, seats ------------------------------------------------------------------------
@pytest.mark.parametrize("budget, long_len", [(8, 30), (5, 17), (16, 16), (3, 40)])
def test_chunked_prefill_never_stalls_the_running_decodes(budget, long_len):
    """A prompt longer than the budget is split over steps; the decode beside it runs every step."""
    sched = make_scheduler(budget=budget)
    model = FakeModel(sched.block_manager)
    short = make_seq(0, prompt(2), max_tokens=50)
    sched.add(short)
    step(sched, model)  # `short` is decoding from here on
    long = make_seq(1, prompt(long_len, start=300), max_tokens=2)
    sched.add(long)
    chunks, flags = [], []
    while long.num_output_tokens == 0:
        batch, _ = step(sched, model)
        assert batch.seqs[0] is short and batch.num_new_tokens[0] == 1 and batch.samples[0]
        assert batch.num_tokens <= budget
        assert list(batch.seqs) == [short, long]
        chunks.append(batch.num_new_tokens[1])
        flags.append(batch.samples[1])
    full, rest = divmod(long_len, budget - 1)
    assert chunks == [budget - 1] * full + ([rest] if rest else [])
    assert flags == [False] * (len(chunks) - 1) + [True]  # no token sampled from a partial prompt
    run_to_end(sched, model)
    assert long.output_token_ids == run_alone(prompt(long_len, start=300), max_tokens=2)
    assert short.output_token_ids == run_alone(prompt(2), max_tokens=50)


@pytest.mark.parametrize("max_num_seqs", [1, 2, 3])
def test_max_num_seqs_bounds_the_running_set_and_admits_in_arrival_order(max_num_seqs):
    sched = make_scheduler(max_num_seqs=max_num_seqs)
    seqs = [make_seq(i, prompt(3 + i, start=100 * i), max_tokens=2 + i % 3) for i in range(6)]
    for seq in seqs:
        sched.add(seq)
    admitted = []
    for batch in run_to_end(sched, FakeModel(sched.block_manager)):
        assert len(batch.seqs) <= max_num_seqs
        admitted += [s.seq_id for s in batch.seqs if s.seq_id not in admitted]
    assert admitted == list(range(6))
    assert all(s.finish_reason == "length" for s in seqs)
    assert_all_released(sched)


def test_budget_caps_admission_of_short_prompts():
    """Whole prompts that fit the budget together go in one step; the one that overflows is chunked."""
    sched = make_scheduler(budget=10)
    seqs = [make_seq(i, prompt(4, start=100 * i)) for i in range(3)]
    for seq in seqs:
        sched.add(seq)
    batch = sched.schedule()
    assert batch.num_new_tokens == (4, 4, 2) and batch.samples == (True, True, False)


def test_logprobs_go_to_their_own_sequence():
    """update's logprobs are indexed like its tokens: one per sampling sequence, in batch order."""
    sched = make_scheduler(budget=8)
    a = make_seq(0, prompt(3), logprobs=2, max_tokens=3)
    b = make_seq(1, prompt(3, start=300), max_tokens=3)  # asked for none
    c = make_seq(2, prompt(9, start=600), logprobs=0, max_tokens=3)  # chunked: samples from its third step
    for seq in (a, b, c):
        sched.add(seq)
    model = FakeModel(sched.block_manager)
    while sched.has_unfinished():
        batch = sched.schedule()
        tokens = model.run(batch)
        sampling = [seq for seq, samples in zip(batch.seqs, batch.samples) if samples]
        sched.update(batch, tokens, [{t: -float(seq.seq_id)} for seq, t in zip(sampling, tokens)])
    assert a.logprobs == [{t: -0.0} for t in a.output_token_ids] and len(a.logprobs) == 3
    assert b.logprobs == []
    assert c.logprobs == [{t: -2.0} for t in c.output_token_ids] and len(c.logprobs) == 3


# -- finishing ---------------------------------------------------------------------------------------
EOS = 2


@pytest.mark.parametrize("params, script, output, reason", [
    ({"max_tokens": 3}, [5, 6, 7, 8], [5, 6, 7], "length"),
    ({"max_tokens": 1}, [5, 6], [5], "length"),
    ({"max_tokens": 10}, [5, EOS, 7], [5, EOS], "stop"),
    ({"max_tokens": 2}, [5, EOS], [5, EOS], "stop"),  # EOS on the last allowed token is still a stop
    ({"max_tokens": 3, "ignore_eos": True}, [5, EOS, 7, 8], [5, EOS, 7], "length"),
    ({"max_tokens": 10, "stop_token_ids": (6,)}, [5, 6, 7], [5, 6], "stop"),
    ({"max_tokens": 10, "stop_token_ids": (6,), "ignore_eos": True}, [EOS, 6, 7], [EOS, 6], "stop"),
])
def test_finish_reasons(params, script, output, reason):
    sched = make_scheduler(eos=(EOS,))
    seq = make_seq(0, prompt(5), **params)
    sched.add(seq)
    run_to_end(sched, FakeModel(sched.block_manager, sample=lambda s: script[s.num_output_tokens]))
    assert seq.output_token_ids == output and seq.finish_reason == reason and seq.is_finished
    assert seq.token_ids[:5] == prompt(5) and seq.num_output_tokens == len(output)
    assert_all_released(sched)


def test_max_model_len_finishes_with_length():
    sched = make_scheduler(max_model_len=8)
    seq = make_seq(0, prompt(5), max_tokens=100)
    sched.add(seq)
    run_to_end(sched, FakeModel(sched.block_manager))
    assert seq.num_tokens == 8 and seq.finish_reason == "length"


def test_update_returns_the_sequences_that_got_a_token():
    sched = make_scheduler(budget=6)
    done, chunked = make_seq(0, prompt(2), max_tokens=1), make_seq(1, prompt(9, start=300))
    sched.add(done)
    sched.add(chunked)
    batch, produced = step(sched, FakeModel(sched.block_manager))
    assert batch.samples == (True, False) and produced == [done]
    assert done.is_finished and done not in sched.running and chunked in sched.running


def test_finished_sequences_give_every_block_back():
    sched = make_scheduler(num_blocks=24, max_num_seqs=2)
    seqs = [make_seq(i, prompt(3 + 2 * i, start=50 * i), max_tokens=4 + i) for i in range(5)]
    seqs.append(make_seq(5, prompt(11, start=200), max_tokens=3))  # seq 4's prompt: may hit its head
    for seq in seqs:
        sched.add(seq)
    run_to_end(sched, FakeModel(sched.block_manager))
    assert all(s.is_finished and s.block_table == [] for s in seqs)
    assert_all_released(sched)


# -- preemption --------------------------------------------------------------------------------------
def test_the_newest_running_sequence_is_preempted_and_keeps_its_tokens():
    """Two sequences fill a 4-block pool; when the older needs a block the newer one yields it."""
    sched = make_scheduler(num_blocks=4, block_size=2)
    model = FakeModel(sched.block_manager)
    old, new = make_seq(0, prompt(3), max_tokens=6), make_seq(1, prompt(3, start=300), max_tokens=6)
    sched.add(old)
    sched.add(new)
    step(sched, model)
    step(sched, model)  # both at 5 tokens, 4 computed: 2 blocks each, none free
    tokens = list(new.token_ids)
    batch, _ = step(sched, model)
    assert list(batch.seqs) == [old]
    assert new.status is SequenceStatus.WAITING and list(sched.waiting) == [new]
    assert new.num_preemptions == 1 and sched.num_preemptions == 1 and old.num_preemptions == 0
    assert new.token_ids == tokens and new.block_table == [] and new.num_computed_tokens == 0
    run_to_end(sched, model)
    assert new.output_token_ids == run_alone(prompt(3, start=300), block_size=2, max_tokens=6)
    assert old.output_token_ids == run_alone(prompt(3), block_size=2, max_tokens=6)
    assert_all_released(sched)


def test_a_finish_in_the_step_of_a_preemption_and_the_return_hits_the_prefix_cache():
    """`old` takes `new`'s block and finishes in that step; `new` comes back to its own cached head."""
    sched = make_scheduler(num_blocks=4, block_size=2)
    model = FakeModel(sched.block_manager)
    old, new = make_seq(0, prompt(3), max_tokens=3), make_seq(1, prompt(3, start=300), max_tokens=6)
    sched.add(old)
    sched.add(new)
    step(sched, model)
    step(sched, model)
    head = new.block_table[0]
    batch, produced = step(sched, model)  # `new` preempted; `old` gets its last token
    assert list(batch.seqs) == [old] and produced == [old]
    assert old.finish_reason == "length" and new.status is SequenceStatus.WAITING
    batch, _ = step(sched, model)
    assert list(batch.seqs) == [new]
    # Its tail block went to `old`; the head was released later in LRU order and is still cached.
    assert new.block_table[0] == head and new.num_cached_tokens == 2
    assert batch.num_new_tokens == (3,)  # 5 tokens known, the first 2 cached
    run_to_end(sched, model)
    assert new.output_token_ids == run_alone(prompt(3, start=300), block_size=2, max_tokens=6)
    assert_all_released(sched)


def test_a_preempted_sequence_returns_to_every_cached_block_nobody_took():
    """Its full blocks go to the back of the free list: only the one its preemptor took is recomputed."""
    sched = make_scheduler(num_blocks=8, block_size=2)
    model = FakeModel(sched.block_manager)
    hog = make_seq(0, prompt(7), max_tokens=4)  # finishes the step after: it takes no second block
    victim = make_seq(1, prompt(7, start=300), max_tokens=8)
    sched.add(hog)
    sched.add(victim)
    step(sched, model)
    step(sched, model)  # 9 tokens each, 8 computed: 4 blocks each, all published; the pool is full
    published = list(victim.block_table)
    assert victim.num_published_blocks == 4
    step(sched, model)  # `hog` needs a 5th block: it takes `victim`'s tail, the first one released
    assert victim.status is SequenceStatus.WAITING and victim.num_preemptions == 1
    assert hog.block_table[4] == published[3]
    while victim.status is SequenceStatus.WAITING:
        step(sched, model)
    assert victim.block_table[:3] == published[:3] and victim.num_cached_tokens == 6
    run_to_end(sched, model)
    assert victim.output_token_ids == run_alone(prompt(7, start=300), block_size=2, max_tokens=8)
    assert_all_released(sched)


PREEMPTION_CASES = [  # (num_blocks, block_size, budget, prefix caching)
    (6, 2, 8, True),
    (6, 2, 8, False),
    (5, 2, 3, True),
    (4, 4, 16, True),
    (7, 2, 64, True),
    (4, 4, 5, False),
]


@pytest.mark.parametrize("num_blocks, block_size, budget, prefix_caching", PREEMPTION_CASES)
def test_outputs_under_preemption_equal_a_run_alone(num_blocks, block_size, budget, prefix_caching):
    """A tiny pool forces preemptions; nothing fails, everything finishes, and no output changes."""
    capacity = num_blocks * block_size
    sched = make_scheduler(num_blocks=num_blocks, block_size=block_size, budget=budget,
                           max_model_len=capacity, prefix_caching=prefix_caching)
    shared = prompt(5, start=7)  # some prompts share a head, so hits and preemptions mix
    prompts = [prompt(3), shared + [1], prompt(6, start=400), shared + [2, 3], prompt(2, start=900), shared]
    seqs = [make_seq(i, p, max_tokens=capacity - len(p)) for i, p in enumerate(prompts)]
    for seq in seqs:
        sched.add(seq)
    run_to_end(sched, FakeModel(sched.block_manager))
    assert sched.num_preemptions > 0, "the case must exercise preemption"
    for seq, p in zip(seqs, prompts):
        assert seq.finish_reason == "length" and seq.num_tokens == capacity
        assert seq.output_token_ids == run_alone(p, block_size=block_size, max_tokens=capacity - len(p))
    assert_all_released(sched)


def test_a_preempted_sequence_goes_back_ahead_of_newcomers():
    """It already waited its turn once: it returns to the head of the queue, and nobody is admitted that step."""
    sched = make_scheduler(num_blocks=4, block_size=2)
    model = FakeModel(sched.block_manager)
    a, b = make_seq(0, prompt(3), max_tokens=8), make_seq(1, prompt(3, start=300), max_tokens=8)
    sched.add(a)
    sched.add(b)
    step(sched, model)
    step(sched, model)
    sched.add(make_seq(2, [5]))
    batch = sched.schedule()
    assert list(batch.seqs) == [a] and [s.seq_id for s in sched.waiting] == [1, 2]


@pytest.mark.parametrize("seed", range(40))
def test_random_traffic_on_a_tiny_pool(seed):
    """Arrivals, shared heads, n > 1, EOS, aborts mid-step and preemptions mixed: invariants hold every step,
    no step is empty, everything finishes, and each completion equals its run alone."""
    rng = random.Random(seed)
    block_size = rng.choice([1, 2, 3, 4])
    max_model_len = rng.randint(6, 16)
    num_blocks = -(-max_model_len // block_size) + rng.randint(0, 3)  # the engine's floor: one longest sequence
    eos = tuple(rng.sample(range(VOCAB), 40))  # about one token in 25 ends a sequence unless ignore_eos
    sched = make_scheduler(num_blocks=num_blocks, block_size=block_size, budget=rng.randint(1, 12),
                           max_num_seqs=rng.randint(1, 5), max_model_len=max_model_len, eos=eos,
                           prefix_caching=rng.random() < 0.8)
    model = FakeModel(sched.block_manager)
    heads = [[rng.randrange(VOCAB) for _ in range(rng.randint(1, 8))] for _ in range(3)]
    arrivals, seq_id = {}, 0
    for request_id in range(10):
        head = rng.choice(heads)[:rng.randint(1, max_model_len - 1)]
        tokens = (head + [rng.randrange(VOCAB) for _ in range(rng.randint(0, 4))])[:max_model_len - 1]
        params = {"max_tokens": rng.randint(1, 12), "n": rng.choice([1, 1, 2, 3]), "ignore_eos": rng.random() < 0.3}
        at = rng.randint(0, 30)
        for _ in range(params["n"]):
            arrivals.setdefault(at, []).append(make_seq(seq_id, tokens, request_id=request_id, **params))
            seq_id += 1
    everyone = [seq for group in arrivals.values() for seq in group]
    aborted = set()
    for t in range(3000):
        for seq in arrivals.pop(t, []):
            sched.add(seq)
        if not sched.has_unfinished():
            if not arrivals:
                break
            continue
        batch = sched.schedule()
        check_invariants(sched, batch)
        assert batch.seqs, "an empty step while work is left"
        tokens = model.run(batch)
        if rng.random() < 0.05:  # a client hangs up while the step runs, or before
            victim = rng.choice(sched.running + list(sched.waiting))
            sched.finish(victim, "abort")
            aborted.add(victim.seq_id)
        sched.update(batch, tokens)
        check_invariants(sched)
    assert not arrivals and not sched.has_unfinished(), "no progress"
    assert_all_released(sched)
    for seq in everyone:
        assert seq.is_finished
        if seq.seq_id in aborted:
            assert seq.finish_reason == "abort"
            continue
        alone = run_alone(seq.token_ids[:seq.num_prompt_tokens], block_size=block_size, max_model_len=max_model_len,
                          eos=eos, max_tokens=seq.params.max_tokens, ignore_eos=seq.params.ignore_eos)
        assert seq.output_token_ids == alone, f"seq {seq.seq_id} (preempted {seq.num_preemptions}x)"


# -- prefix caching end to end ------------------------------------------------------------------------
@pytest.mark.parametrize("length", [4, 8, 9, 12, 14])
def test_an_entirely_cached_prompt_still_computes_its_last_token(length):
    """The second run of a prompt hits every full block but the last token's, samples, and agrees."""
    sched = make_scheduler(block_size=4)
    model = FakeModel(sched.block_manager)
    first = make_seq(0, prompt(length), max_tokens=3)
    sched.add(first)
    run_to_end(sched, model)
    second = make_seq(1, prompt(length), max_tokens=3)
    sched.add(second)
    batch, _ = step(sched, model)
    cached = (length - 1) // 4 * 4
    assert second.num_cached_tokens == cached
    assert batch.num_new_tokens == (length - cached,) and batch.samples == (True,)
    run_to_end(sched, model)
    assert second.output_token_ids == first.output_token_ids


def test_a_prompt_computing_beside_its_twin_does_not_hit_unpublished_blocks():
    """Two equal prompts admitted in one step both compute: nothing was published when they arrived."""
    sched = make_scheduler(block_size=4)
    model = FakeModel(sched.block_manager)
    a, b = make_seq(0, prompt(9), max_tokens=2), make_seq(1, prompt(9), max_tokens=2)
    sched.add(a)
    sched.add(b)
    batch, _ = step(sched, model)
    assert batch.num_new_tokens == (9, 9) and b.num_cached_tokens == 0
    run_to_end(sched, model)
    assert a.output_token_ids == b.output_token_ids


# -- n > 1 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget, prefill_steps", [(64, 1), (4, 3)])
def test_siblings_wait_for_the_prompt_then_share_its_full_blocks(budget, prefill_steps):
    sched = make_scheduler(block_size=4, budget=budget)
    model = FakeModel(sched.block_manager)
    first, second = (make_seq(i, prompt(9), request_id=7, n=2, max_tokens=4) for i in range(2))
    sched.add(first)
    sched.add(second)
    for _ in range(prefill_steps):  # budget, seats and blocks would allow the sibling: it waits anyway
        batch, _ = step(sched, model)
        assert first in batch.seqs and second not in batch.seqs and second.status is SequenceStatus.WAITING
    batch, _ = step(sched, model)
    assert list(batch.seqs) == [first, second] and batch.num_new_tokens == (1, 1)
    assert second.num_cached_tokens == 8
    assert second.block_table[:2] == first.block_table[:2]
    assert all(sched.block_manager.blocks[b].ref_count == 2 for b in first.block_table[:2])
    assert second.block_table[2] != first.block_table[2]  # the last token's block is each one's own
    run_to_end(sched, model)
    assert first.output_token_ids == second.output_token_ids == run_alone(prompt(9), max_tokens=4)
    assert_all_released(sched)


def test_a_sibling_is_not_held_back_by_another_request():
    sched = make_scheduler(block_size=4)
    other = make_seq(0, prompt(9), request_id=1)
    sched.add(other)
    sched.add(make_seq(1, prompt(9, start=300), request_id=2))
    batch = sched.schedule()
    assert len(batch.seqs) == 2


# -- aborts --------------------------------------------------------------------------------------------
def test_finish_aborts_a_waiting_sequence():
    sched = make_scheduler(max_num_seqs=1)
    running, waiting = make_seq(0, prompt(3)), make_seq(1, prompt(3, start=300))
    sched.add(running)
    sched.add(waiting)
    step(sched, FakeModel(sched.block_manager))
    sched.finish(waiting, "abort")
    assert waiting.is_finished and waiting.finish_reason == "abort" and waiting not in sched.waiting
    assert list(sched.running) == [running]


def test_finish_aborts_a_running_sequence_mid_step():
    """Aborted while its step runs: update skips it and still hands the others their own tokens."""
    sched = make_scheduler(num_blocks=16)
    model = FakeModel(sched.block_manager)
    a, b, c = (make_seq(i, prompt(5, start=100 * i), max_tokens=5) for i in range(3))
    for seq in (a, b, c):
        sched.add(seq)
    step(sched, model)
    batch = sched.schedule()
    tokens = model.run(batch)
    assert len(set(tokens)) == 3  # a token handed to the wrong sequence would show
    sched.finish(b, "abort")
    assert b.block_table == [] and b not in sched.running
    produced = sched.update(batch, tokens)
    assert produced == [a, c] and a.token_ids[-1] == tokens[0] and c.token_ids[-1] == tokens[2]
    assert b.num_output_tokens == 1 and b.finish_reason == "abort"
    check_invariants(sched)
    run_to_end(sched, model)
    assert a.output_token_ids == run_alone(prompt(5, start=0), max_tokens=5)
    assert c.output_token_ids == run_alone(prompt(5, start=200), max_tokens=5)
    assert_all_released(sched)


def test_an_aborted_sequence_is_not_scheduled_again():
    sched = make_scheduler()
    a, b = make_seq(0, prompt(3)), make_seq(1, prompt(3, start=300))
    sched.add(a)
    sched.add(b)
    model = FakeModel(sched.block_manager)
    step(sched, model)
    sched.finish(a, "abort")
    batch, _ = step(sched, model)
    assert list(batch.seqs) == [b]


# -- SamplingParams and Sequence ---------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [
    ("max_tokens", 0), ("max_tokens", 2.5), ("temperature", -0.1), ("top_k", -1), ("top_k", 1.5),
    ("top_p", 0.0), ("top_p", 1.01), ("min_p", -0.01), ("min_p", 1.5), ("repetition_penalty", 0.0),
    ("presence_penalty", 2.1), ("presence_penalty", -2.1), ("frequency_penalty", 3.0),
    ("frequency_penalty", -2.5), ("min_tokens", -1), ("min_tokens", 65), ("logprobs", -1),
    ("logprobs", 21), ("n", 0), ("n", 65), ("stop", ("ok", "")), ("stop", ""), ("stop_token_ids", (3, -1)),
])
def test_invalid_sampling_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field} must be"):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("kw", [
    {"max_tokens": 1}, {"temperature": 0.0}, {"top_p": 1.0}, {"min_p": 0.0}, {"min_p": 1.0},
    {"presence_penalty": -2.0}, {"frequency_penalty": 2.0}, {"min_tokens": 64}, {"logprobs": 0},
    {"logprobs": 20}, {"n": 64}, {"stop_token_ids": (0,)},
])
def test_sampling_params_boundaries_are_accepted(kw):
    SamplingParams(**kw)


def test_sampling_params_normalise_stop_and_are_frozen():
    assert SamplingParams(stop="###").stop == ("###",)
    assert SamplingParams(stop=["a", "bc"]).stop == ("a", "bc")
    assert SamplingParams(stop_token_ids=[3, 4]).stop_token_ids == (3, 4)
    assert SamplingParams(temperature=0).greedy and not SamplingParams().greedy
    with pytest.raises(dataclasses.FrozenInstanceError):
        SamplingParams().max_tokens = 3


def test_sequence_views_split_prompt_and_output():
    seq = make_seq(0, [1, 2, 3])
    seq.token_ids += [7, 8]
    assert seq.num_tokens == 5 and seq.output_token_ids == [7, 8] and seq.num_output_tokens == 2
    assert seq.status is SequenceStatus.WAITING and not seq.is_finished


def test_a_sibling_waiting_for_its_prompt_does_not_block_the_requests_behind_it():
    sched = make_scheduler(block_size=4)
    model = FakeModel(sched.block_manager)
    first, second = (make_seq(i, prompt(9), request_id=7, n=2, max_tokens=4) for i in range(2))
    later = make_seq(2, prompt(5, start=300), request_id=8, max_tokens=4)
    for seq in (first, second, later):
        sched.add(seq)
    batch, _ = step(sched, model)
    assert list(batch.seqs) == [first, later]  # the sibling waits; the next request does not
    assert list(sched.waiting) == [second]  # and it keeps its place at the head
    run_to_end(sched, model)
    assert first.output_token_ids == second.output_token_ids
    assert_all_released(sched)
