"""Preemption by recompute: the newest sequence gives its blocks back and later returns with the
same output, whatever the pool size, budget or prefix caching (tests/fake_engine.py drives it)."""

import random

import pytest
from fake_engine import (VOCAB, FakeModel, assert_all_released, check_invariants, make_scheduler, make_seq, prompt,
                         run_alone, run_to_end, step)

from engine.core.sequence import SequenceStatus


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
