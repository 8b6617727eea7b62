"""Continuous batching driven by hand (tests/fake_engine.py): budget, chunked prefill, finishing,
prefix caching, n > 1 siblings and aborts."""

import pytest
from fake_engine import (FakeModel, assert_all_released, check_invariants, make_scheduler, make_seq, prompt, run_alone,
                         run_to_end, step)

from engine.core.sequence import SequenceStatus


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
