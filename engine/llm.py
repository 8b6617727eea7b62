"""`LLM`: load a dense or compressed folder and generate, batched, over a paged KV cache.

    llm = LLM("models/smollm2-135m")
    out = llm.generate(["def fib(n):", "The capital of France is"], SamplingParams(max_tokens=32))
    for delta in llm.stream("Once upon a time", SamplingParams(temperature=0.8, seed=1)): ...
    with LLM("models/llama", tensor_parallel_size=2, device="cuda") as llm: ...   # one process per GPU

Each engine step is schedule -> run -> update (nano-vllm's shape); the scheduler owns request
state, the runner owns tensors, and this module turns token ids into text, stop strings and
outputs. Requests are validated before anything is scheduled, so a bad one raises `ValueError`
and the others keep going.
"""

from __future__ import annotations

import gc
import itertools
import sys
import time
from collections.abc import Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import EngineConfig
from .core.block_manager import BlockManager
from .core.detokenizer import IncrementalDetokenizer
from .core.kv_cache import plan_cache
from .core.runner import ModelRunner
from .core.sampler import Sampler
from .core.scheduler import Scheduler
from .core.sequence import Sequence
from .core.workers import Workers, load_shard
from .model.loader import load_tokenizer
from .outputs import CompletionOutput, RequestOutput, StreamDelta
from .prompts import check_token_ids, completion_room, render_chat
from .sampling_params import SamplingParams

Prompt = str | list[int]


@dataclass(eq=False)
class _Request:
    request_id: int
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    detokenizers: list[IncrementalDetokenizer]
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    last_token: float | None = None
    sent: list[int] = field(default_factory=list)  # output tokens already handed out as deltas, per completion

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


class LLM:
    def __init__(self, path: str | Path, *, dtype: str | torch.dtype | None = None, device: str | None = None,
                 ratio: float | None = None, **settings):
        known = {f.name for f in fields(EngineConfig)}
        if unknown := sorted(set(settings) - known):
            raise ValueError(f"unknown engine setting(s) {unknown}; known: {', '.join(sorted(known))}")
        self.config = EngineConfig(**settings)
        tp = self.config.tensor_parallel_size
        # Ranks 1.. of a tensor-parallel group: worker processes that run each step on their shard.
        self.workers = Workers(tp, path, dtype, device, ratio, self.config) if tp > 1 else None
        try:
            self._build(path, dtype, device, ratio)
        except BaseException:
            if self.workers is not None:
                self.workers.close(graceful=False)
            raise
        self._requests: dict[int, _Request] = {}
        self._request_ids = itertools.count()
        self._seq_ids = itertools.count()
        # What exists now (the model's modules, tensors, the tokenizer) lives as long as the engine:
        # moved out of the collector's reach, the full collections the serving loop's allocations
        # trigger stop walking it (they took ~4 % of a batch-64 CPU decode step). vLLM does the same.
        gc.freeze()

    def _build(self, path: str | Path, dtype, device: str | None, ratio: float | None) -> None:
        """Model (this rank's shard), tokenizer, cache, scheduler and runner."""
        self.model = load_shard(path, dtype, device, ratio, self.config.kv_cache_dtype, 0,
                                self.config.tensor_parallel_size)
        self.tokenizer = load_tokenizer(path)
        mc, bs = self.model.config, self.config.block_size
        self.vocab_size = mc.vocab_size
        plan = plan_cache(self.model, self.config)
        self.max_model_len, per_block, needed = plan.max_model_len, plan.per_block, plan.needed
        self.eos_token_ids = tuple(sorted({*mc.eos_token_ids, self.tokenizer.eos_token_id} - {None}))
        self.kv_cache_bytes_per_token = per_block // bs
        num_blocks = self.workers.agree_blocks(plan.num_blocks) if self.workers else plan.num_blocks
        if num_blocks < needed:
            raise ValueError(f"kv_cache_memory={plan.budget} bytes holds {num_blocks} blocks of {bs} tokens; "
                             f"max_model_len={self.max_model_len} needs {needed}: raise kv_cache_memory or lower "
                             f"max_model_len")
        attn = self.model.model.layers[0].self_attn
        latent = " of LoRC latents" if attn.latent else f" ({self.config.kv_cache_dtype})" if attn.kv_dtype else ""
        shard = f" per rank of {self.config.tensor_parallel_size}" if self.workers else ""
        print(f"KV cache{latent}: {num_blocks} blocks x {bs} tokens = {num_blocks * bs} tokens "
              f"({num_blocks * per_block / 2**20:.0f} MiB{shard}, {per_block // bs} bytes per token)", file=sys.stderr)
        self.block_manager = BlockManager(num_blocks, bs, self.config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, self.config.max_num_seqs, self.config.max_num_batched_tokens,
                                   self.max_model_len, self.eos_token_ids)
        sampler = Sampler(self.eos_token_ids, self.model.device, self.config.seed)
        self.runner = ModelRunner(self.model, num_blocks, bs, sampler, self.config.max_num_seqs, needed,
                                  self.config.cuda_graphs, self.config.int8_activations, self.workers)
        if self.workers:
            self.workers.ready()

    def close(self) -> None:
        """Stop the tensor-parallel workers (also done at exit); a one-process engine has nothing to stop."""
        if self.workers is not None:
            self.workers.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- requests ------------------------------------------------------------------------------
    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt (text or ids), checked against the vocabulary and max_model_len."""
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt)["input_ids"]
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            ids = list(prompt)
            check_token_ids(ids, self.vocab_size)
        else:
            raise ValueError(f"a prompt is a string or a list of token ids, got {type(prompt).__name__}")
        completion_room(len(ids), self.max_model_len)
        return ids

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None) -> int:
        """Queue one prompt (validated first); returns its request id."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        ids = self.encode(prompt)
        params.check_vocab(self.vocab_size)
        return self._submit(prompt if isinstance(prompt, str) else None, ids, params)

    def _submit(self, prompt: str | None, ids: list[int], params: SamplingParams) -> int:
        request_id = next(self._request_ids)
        seqs = []
        for index in range(params.n):
            seq = Sequence(next(self._seq_ids), request_id, list(ids), len(ids), params)
            if params.seed is not None:
                seq.generator = torch.Generator(self.model.device).manual_seed(params.seed + index)
            seqs.append(seq)
        detoks = [IncrementalDetokenizer(self.tokenizer, params.stop) for _ in seqs]
        self._requests[request_id] = _Request(request_id, prompt, list(ids), params, seqs, detoks,
                                              sent=[0] * len(seqs))
        for seq in seqs:
            self.scheduler.add(seq)
        return request_id

    def abort(self, request_id: int) -> None:
        request = self._requests.pop(request_id, None)
        for seq in request.seqs if request else ():
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- the step ------------------------------------------------------------------------------
    def step(self) -> list[Sequence]:
        """schedule -> run -> update; returns the sequences that got a token."""
        batch = self.scheduler.schedule()
        if not batch.seqs:
            raise RuntimeError("the scheduler found nothing to run although requests are pending")
        tokens, logprobs = self.runner.run(batch)
        produced = self.scheduler.update(batch, tokens, logprobs)
        now = time.perf_counter()
        for seq in produced:
            request = self._requests[seq.request_id]
            request.first_token = request.first_token or now
            request.last_token = now
            detok = request.detokenizers[request.seqs.index(seq)]
            detok.update(seq.output_token_ids)
            if detok.stopped and not seq.is_finished:
                self.scheduler.finish(seq, "stop")
        return produced

    def output(self, request_id: int) -> RequestOutput:
        r = self._requests[request_id]
        completions = []
        for index, (seq, detok) in enumerate(zip(r.seqs, r.detokenizers)):
            lps = seq.logprobs if r.params.logprobs is not None else None
            cumulative = sum(lp[t] for lp, t in zip(lps, seq.output_token_ids)) if lps is not None else None
            completions.append(CompletionOutput(index, detok.text, seq.output_token_ids, seq.finish_reason, lps,
                                                cumulative))
        ttft = (r.first_token or r.submitted) - r.submitted
        decoded = max(len(s.output_token_ids) for s in r.seqs) - 1
        span = (r.last_token or 0) - (r.first_token or 0)
        return RequestOutput(r.request_id, r.prompt, r.prompt_ids, completions, r.seqs[0].num_cached_tokens, ttft,
                             decoded / span if decoded > 0 and span > 0 else 0.0)

    # -- front doors ---------------------------------------------------------------------------
    def generate(self, prompts: Prompt | Seq[Prompt], sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 *, use_tqdm: bool = True) -> list[RequestOutput]:
        """Complete every prompt (text or token ids); outputs in input order."""
        batch = [prompts] if isinstance(prompts, str) or _is_token_list(prompts) else list(prompts)
        params = _per_prompt(sampling_params, len(batch))
        encoded = [self.encode(p) for p in batch]  # every prompt checked before any is scheduled
        for sp in params:
            sp.check_vocab(self.vocab_size)
        ids = [self._submit(p if isinstance(p, str) else None, e, sp) for p, e, sp in zip(batch, encoded, params)]
        return self._run_to_completion(ids, use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
             *, use_tqdm: bool = True) -> list[RequestOutput]:
        """Reply to one conversation (a list of {"role", "content"}) or many, through the model's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        return self.generate([self.apply_chat_template(c) for c in conversations], sampling_params, use_tqdm=use_tqdm)

    def apply_chat_template(self, conversation: list[dict]) -> list[int]:
        if not conversation or not all(isinstance(m, dict) and "role" in m and "content" in m for m in conversation):
            raise ValueError("a conversation is a non-empty list of {'role': ..., 'content': ...} messages")
        text = render_chat(self.tokenizer, conversation, "use generate() with a plain prompt")
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> Iterator[StreamDelta]:
        """Yield text/token deltas of one prompt as they are decoded (other queued requests advance too)."""
        request_id = self.add_request(prompt, sampling_params)
        request = self._requests[request_id]
        try:
            while not request.finished:
                for owner, delta in self.step_deltas():
                    if owner == request_id:
                        yield delta
        finally:
            if not request.finished:  # the caller stopped listening: free the request's blocks
                self.abort(request_id)
            else:
                self._requests.pop(request_id, None)

    def step_deltas(self) -> list[tuple[int, StreamDelta]]:
        """One step; then (request id, what is new) for every completion that advanced."""
        deltas = []
        for seq in self.step():
            request = self._requests[seq.request_id]
            i = request.seqs.index(seq)
            start = request.sent[i]
            request.sent[i] = seq.num_output_tokens
            logprobs = tuple(seq.logprobs[start:]) if request.params.logprobs is not None else None
            text = request.detokenizers[i].delta(final=seq.is_finished)
            deltas.append((seq.request_id, StreamDelta(i, text, tuple(seq.output_token_ids[start:]),
                                                       seq.finish_reason, logprobs)))
        return deltas

    def is_finished(self, request_id: int) -> bool:
        return self._requests[request_id].finished

    def pop_output(self, request_id: int) -> RequestOutput:
        """The finished request's output; the engine forgets the request."""
        output = self.output(request_id)
        del self._requests[request_id]
        return output

    def _run_to_completion(self, request_ids: list[int], use_tqdm: bool) -> list[RequestOutput]:
        pending = set(request_ids)
        with tqdm(total=len(request_ids), desc="generate", unit="req", disable=not use_tqdm) as bar:
            while pending:
                self.step()
                done = {i for i in pending if self._requests[i].finished}
                pending -= done
                bar.update(len(done))
        return [self.pop_output(i) for i in request_ids]


def _is_token_list(prompt) -> bool:
    return isinstance(prompt, (list, tuple)) and len(prompt) > 0 and all(isinstance(t, int) for t in prompt)


def _per_prompt(params: SamplingParams | Seq[SamplingParams] | None, count: int) -> list[SamplingParams]:
    if params is None or isinstance(params, SamplingParams):
        return [params or SamplingParams()] * count
    params = list(params)
    if len(params) != count:
        raise ValueError(f"got {len(params)} sampling params for {count} prompts: pass one, or one per prompt")
    for p in params:
        if not isinstance(p, SamplingParams):
            raise ValueError(f"sampling params must be SamplingParams, got {type(p).__name__}")
    return params


def generate(model: str | Path, prompts: Prompt | Seq[Prompt], sampling_params: SamplingParams | None = None,
             **llm_settings) -> list[RequestOutput]:
    """One-liner: load `model` and complete `prompts` (tensor-parallel workers stopped after)."""
    with LLM(model, **llm_settings) as llm:
        return llm.generate(prompts, sampling_params)
