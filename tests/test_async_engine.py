"""`AsyncEngine` in-process, on a tiny random Llama: one request's handling never fails another, and
every request a handler abandons (before or after the engine accepted it) is aborted."""

import asyncio
import time

import pytest
from transformers import LlamaConfig

from conftest import save_tiny_model, save_tiny_tokenizer
from engine import LLM, SamplingParams
from engine.server.async_engine import AsyncEngine

TINY = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=4096)
LONG = SamplingParams(max_tokens=1500, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """The default CPU path (not Triton's interpreter): the subject is the engine loop, which must step fast."""
    import kernels

    folder = tmp_path_factory.mktemp("tiny")
    save_tiny_model(TINY, folder)
    save_tiny_tokenizer(folder, TINY.vocab_size)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "BACKEND", "auto")
        e = AsyncEngine(LLM(folder, device="cpu", kv_cache_memory=8 << 20))
        e.start()
        yield e
        e.shutdown()


def wait_idle(engine: AsyncEngine, timeout: float = 20.0) -> None:
    """No request left in the scheduler and every KV block free (read from the engine thread's gauges)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = engine.metrics
        if m.num_requests_running == 0 and m.num_requests_waiting == 0 and m.kv_cache_usage_perc == 0 \
                and not engine.llm.has_unfinished():
            return
        time.sleep(0.01)
    pytest.fail(f"engine still busy after {timeout} s: running {engine.metrics.num_requests_running}, "
                f"waiting {engine.metrics.num_requests_waiting}, cache {engine.metrics.kv_cache_usage_perc}")


async def collect(engine: AsyncEngine, ids: list[int], params: SamplingParams):
    events = [e async for e in engine.generate(ids, params)]
    assert [e.kind for e in events[:-1]] == ["delta"] * (len(events) - 1)
    return events[-1]


def test_n_2_completions_finishing_in_one_step_fail_nothing(engine):
    """Sampled n=2 requests whose stop ids end both completions in the same step (half the vocabulary
    stops, so many do) used to raise KeyError in the engine loop and abort every request in flight."""
    same_step = 0
    step_deltas = engine.llm.step_deltas

    def spy():  # runs on the engine thread: count steps where one request finished two completions
        nonlocal same_step
        deltas = step_deltas()
        finished = [rid for rid, d in deltas if d.finish_reason is not None]
        same_step += len(finished) != len(set(finished))
        return deltas

    engine.llm.step_deltas = spy
    try:
        async def main():
            long = asyncio.ensure_future(collect(engine, [5, 7], LONG))
            await asyncio.sleep(0.05)
            shorts = [asyncio.ensure_future(collect(engine, [5, 6], SamplingParams(n=2, max_tokens=5, temperature=1, seed=seed,
                                                             stop_token_ids=tuple(range(2, 50)))))
                      for seed in range(40)]
            shorts = await asyncio.gather(*shorts)
            return await long, shorts

        long, shorts = asyncio.run(main())
    finally:
        del engine.llm.step_deltas
    assert same_step > 0, "the case under test never happened: no request finished two completions in one step"
    assert long.kind == "done" and len(long.output.outputs[0].token_ids) == LONG.max_tokens
    assert all(s.kind == "done" and len(s.output.outputs) == 2 for s in shorts)
    wait_idle(engine)


def test_out_of_vocabulary_stop_ids_are_rejected_before_they_reach_the_sampler(engine):
    """With min_tokens they were indexed into the logits: IndexError in the step, every request aborted."""
    async def main():
        long = asyncio.ensure_future(collect(engine, [5, 7], LONG))
        await asyncio.sleep(0.05)
        with pytest.raises(ValueError, match="stop_token_ids.*97"):
            await collect(engine, [5, 6], SamplingParams(max_tokens=5, min_tokens=3, stop_token_ids=(3, 97)))
        return await long

    long = asyncio.run(main())
    assert long.kind == "done" and len(long.output.outputs[0].token_ids) == LONG.max_tokens
    wait_idle(engine)


def test_a_failure_in_one_requests_bookkeeping_fails_that_request_alone(engine):
    """An exception while finishing one request (here its output assembly) is that request's error event."""
    output = engine.llm.output

    def broken(request_id):
        out = output(request_id)
        if out.prompt_token_ids == [9, 9, 9]:
            raise RuntimeError("planted failure")
        return out

    async def main():
        long = asyncio.ensure_future(collect(engine, [5, 7], LONG))
        await asyncio.sleep(0.05)
        bad = await collect(engine, [9, 9, 9], SamplingParams(max_tokens=3, temperature=0))
        good = await collect(engine, [5, 6], SamplingParams(max_tokens=3, temperature=0))
        return await long, bad, good

    engine.llm.output = broken
    try:
        long, bad, good = asyncio.run(main())
    finally:
        del engine.llm.output
    assert bad.kind == "error" and "internal error" in bad.message
    assert good.kind == "done" and long.kind == "done"
    assert len(long.output.outputs[0].token_ids) == LONG.max_tokens
    wait_idle(engine)


def test_requests_to_an_engine_whose_thread_died_fail_at_once(tmp_path):
    """A thread that ended (here: a planted bug in its command handling) must not leave handlers
    waiting forever for an answer: queued adds are refused, later ones raise at once."""
    import kernels
    from engine.server.async_engine import EngineClosed

    save_tiny_model(TINY, tmp_path)
    save_tiny_tokenizer(tmp_path, TINY.vocab_size)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "BACKEND", "auto")
        e = AsyncEngine(LLM(tmp_path, device="cpu", kv_cache_memory=4 << 20))

    def broken_drain(block: bool) -> None:
        raise RuntimeError("planted bug in the engine loop")

    e._drain_commands = broken_drain
    e.start()
    e._thread.join(timeout=10)
    assert not e.alive

    async def main():
        with pytest.raises(EngineClosed):
            await collect(e, [5, 6], SamplingParams(max_tokens=3))

    asyncio.run(asyncio.wait_for(main(), timeout=10))
    e.shutdown()


def test_a_handler_cancelled_before_acceptance_aborts_its_request(engine):
    """The handler's task is cancelled while the engine thread is busy stepping, before the add is
    answered: the request must still be aborted, not run to max_tokens holding blocks and a seat."""
    async def main():
        busy = asyncio.ensure_future(collect(engine, [5, 7], SamplingParams(max_tokens=200, temperature=0,
                                                                            ignore_eos=True)))
        await asyncio.sleep(0.05)
        orphans = []
        for _ in range(8):
            task = asyncio.ensure_future(collect(engine, [5, 6], SamplingParams(max_tokens=3000, ignore_eos=True)))
            await asyncio.sleep(0)  # the add is queued, its answer not yet back
            task.cancel()
            orphans.append(task)
        await asyncio.gather(*orphans, return_exceptions=True)
        return await busy

    before = engine.metrics.generation_tokens
    busy = asyncio.run(main())
    assert busy.kind == "done"
    wait_idle(engine, timeout=10)
    assert engine.metrics.generation_tokens - before < 200 + 8 * 1000  # no orphan ran to its 3000 tokens
