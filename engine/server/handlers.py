"""The handlers of /v1/completions and /v1/chat/completions over one `AsyncEngine`.

They tokenize with the server's own tokenizer (the engine thread keeps its own: fast tokenizers
are not safe to share across threads), check lengths and sampling values, then stream the
engine's events back as JSON or server-sent events; a client that disconnects aborts its request.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse

from engine.outputs import RequestOutput
from engine.prompts import check_token_ids, completion_room, render_chat
from engine.sampling_params import SamplingParams

from .async_engine import AsyncEngine, EngineClosed, Event
from .protocol import APIError, ChatRequest, CompletionRequest
from .token_bytes import TokenBytes

T = TypeVar("T")


class Handlers:
    def __init__(self, engine: AsyncEngine, tokenizer, served_model_name: str, max_model_len: int,
                 max_sequences_per_request: int):
        self.engine, self.tokenizer = engine, tokenizer
        self.name, self.max_model_len = served_model_name, max_model_len
        self.max_sequences = max_sequences_per_request
        self.vocab_size = engine.llm.vocab_size
        self.token_bytes = TokenBytes(tokenizer)
        self.created = int(time.time())
        # Prompts are templated and tokenized on one worker thread: the tokenizer releases the GIL, so
        # the event loop keeps streaming while a long prompt is encoded. The loop itself only decodes
        # single tokens (logprobs): reads, which the Rust tokenizer allows beside an encode (nothing
        # here changes its truncation or padding). Past this many characters a prompt cannot fit the context
        # (no token's text is longer than the vocabulary's longest; x2 for normalizers that compose
        # characters): refused before any of that work.
        self.tokenizer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lowrank-tokenizer")
        self.longest_token = max(map(len, tokenizer.get_vocab()), default=1)
        self.max_prompt_chars = 2 * max_model_len * self.longest_token

    def close(self) -> None:
        self.tokenizer_thread.shutdown(wait=False, cancel_futures=True)

    # -- shared steps --------------------------------------------------------------------------
    async def _on_tokenizer_thread(self, work: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.tokenizer_thread, work)

    def _check_chars(self, length: int, param: str) -> None:
        if length > self.max_prompt_chars:
            raise APIError(400, f"the prompt has {length} characters: more than this model's maximum context of "
                                f"{self.max_model_len} tokens can hold (at most {self.max_prompt_chars} characters; "
                                f"no token is longer than {self.longest_token})", param)

    def _check_model(self, model: str) -> None:
        if model != self.name:
            raise APIError(404, f"The model `{model}` does not exist; this server serves `{self.name}`", "model")

    def _check_fanout(self, num_prompts: int, n: int) -> None:
        """Checked before any prompt is tokenized: the cap bounds that work too."""
        if num_prompts * n > self.max_sequences:
            raise APIError(400, f"this request asks for {num_prompts} prompt(s) x n={n} = {num_prompts * n} "
                                f"sequences; this server allows at most {self.max_sequences} per request "
                                f"(--max-sequences-per-request): send fewer prompts or a smaller n",
                           "n" if num_prompts <= self.max_sequences else "prompt")

    async def _run(self, prompts: list[list[int]], params: SamplingParams) -> AsyncIterator[tuple[int, Event]]:
        """Events of every prompt's request, interleaved as they come; leaving early aborts them all."""
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, ids: list[int]) -> None:
            try:
                async for event in self.engine.generate(ids, params):
                    await merged.put((index, event))
            except EngineClosed as exc:
                await merged.put((index, APIError(503, str(exc))))
            except ValueError as exc:  # rejected by the engine's own checks (the prompt's: all else is checked here)
                await merged.put((index, APIError(400, str(exc), "prompt")))
            except Exception as exc:  # a bug of ours: this request fails (a 500), never hangs
                traceback.print_exception(exc, file=sys.stderr)
                await merged.put((index, APIError(500, "internal error while adding the request")))
            await merged.put((index, None))

        tasks = [asyncio.ensure_future(pump(i, ids)) for i, ids in enumerate(prompts)]
        try:
            open_streams = len(tasks)
            while open_streams:
                index, item = await merged.get()
                if item is None:
                    open_streams -= 1
                elif isinstance(item, APIError):
                    raise item
                elif item.kind == "error":
                    raise APIError(item.status, item.message)
                else:
                    yield index, item
        finally:
            for task in tasks:
                task.cancel()

    async def _collect(self, prompts: list[list[int]], params: SamplingParams, request: Request
                       ) -> list[RequestOutput]:
        async def work() -> list[RequestOutput]:
            outputs: list[RequestOutput | None] = [None] * len(prompts)
            async for index, event in self._run(prompts, params):
                if event.kind == "done":
                    outputs[index] = event.output
            return outputs

        return await _cancel_on_disconnect(request, work())

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _usage(self, prompts: list[list[int]], completion_tokens: int) -> dict:
        prompt_tokens = sum(len(p) for p in prompts)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    # -- /v1/completions ------------------------------------------------------------------------
    async def _completion_prompts(self, prompt, n: int) -> tuple[list[str | list[int]], list[list[int]]]:
        """The prompts as given (one list entry each) and their token ids."""
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "prompt is empty", "prompt")
        if all(isinstance(p, int) for p in prompt):
            prompt = [prompt]
        self._check_fanout(len(prompt), n)
        for p in prompt:  # ids before anything decodes them (the tokenizer overflows past 2**64), text by length
            if isinstance(p, str):
                self._check_chars(len(p), "prompt")
            else:
                check_token_ids(p, self.vocab_size)

        def encode(text: str) -> list[int]:
            return self.tokenizer(text)["input_ids"]

        return prompt, await self._on_tokenizer_thread(
            lambda: [encode_bounded(encode, p, self.max_model_len) if isinstance(p, str) else list(p)
                     for p in prompt])

    def _completion_logprobs(self, tokens: list[int], entries, offset: int, k: int) -> dict:
        texts = [self._token_text(t) for t in tokens]
        offsets, position = [], offset
        for text in texts:
            offsets.append(position)
            position += len(text)
        return {"tokens": texts, "token_logprobs": [e[t] for e, t in zip(entries, tokens)],
                "top_logprobs": [{self._token_text(a): v for a, v in _top(e, k)} for e in entries],
                "text_offset": offsets}

    async def completions(self, body: CompletionRequest, request: Request):
        self._check_model(body.model)
        given, prompts = await self._completion_prompts(body.prompt, body.n)
        max_tokens = min(completion_room(len(ids), self.max_model_len, body.max_tokens) for ids in prompts)
        texts = [""] * len(prompts)  # the prompts' text, for echo (decoded only then, and only once checked)
        if body.echo:
            texts = await self._on_tokenizer_thread(
                lambda: [p if isinstance(p, str) else self.tokenizer.decode(p) for p in given])
        params = body.sampling_params(max_tokens, body.logprobs, self.vocab_size)
        rid, n = f"cmpl-{uuid.uuid4().hex}", params.n
        head = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": self.name}
        if body.stream:
            return _sse(self._stream_completions(body, prompts, texts, params, head))
        outputs = await self._collect(prompts, params, request)
        choices, completion_tokens = [], 0
        for i, (out, prompt_text) in enumerate(zip(outputs, texts)):
            for c in out.outputs:
                completion_tokens += len(c.token_ids)
                prefix = prompt_text if body.echo else ""
                logprobs = (self._completion_logprobs(c.token_ids, c.logprobs, len(prefix), params.logprobs)
                            if c.logprobs else None)
                choices.append({"index": i * n + c.index, "text": prefix + c.text, "logprobs": logprobs,
                                "finish_reason": c.finish_reason})
        return head | {"choices": choices, "usage": self._usage(prompts, completion_tokens)}

    async def _stream_completions(self, body, prompts, texts, params, head) -> AsyncIterator[dict]:
        n, completion_tokens = params.n, 0
        offsets: dict[int, int] = {}  # characters already streamed per choice: logprobs' text_offset
        if body.echo:
            for i, text in enumerate(texts):
                for j in range(n):
                    yield head | {"choices": [{"index": i * n + j, "text": text, "logprobs": None,
                                               "finish_reason": None}]}
        async for i, event in self._run(prompts, params):
            if event.kind != "delta":
                continue
            d = event.delta
            completion_tokens += len(d.token_ids)
            index = i * n + d.index
            start = offsets.get(index, len(texts[i]) if body.echo else 0)
            offsets[index] = start + len(d.text)
            logprobs = (self._completion_logprobs(list(d.token_ids), d.logprobs, start, params.logprobs)
                        if d.logprobs else None)
            yield head | {"choices": [{"index": index, "text": d.text, "logprobs": logprobs,
                                       "finish_reason": d.finish_reason}]}
        if body.include_usage:
            yield head | {"choices": [], "usage": self._usage(prompts, completion_tokens)}

    # -- /v1/chat/completions -------------------------------------------------------------------
    async def _chat_prompt(self, body: ChatRequest) -> list[int]:
        conversation = [{"role": m.role, "content": m.text()} for m in body.messages]
        self._check_chars(sum(len(m["content"]) for m in conversation), "messages")

        def encode() -> list[int]:
            text = render_chat(self.tokenizer, conversation, "use /v1/completions")
            return encode_bounded(lambda t: self.tokenizer(t, add_special_tokens=False)["input_ids"], text,
                                  self.max_model_len, "messages")

        return await self._on_tokenizer_thread(encode)

    def _chat_logprobs(self, tokens, entries, k: int) -> dict:
        def item(token_id: int, value: float) -> dict:
            return {"token": self._token_text(token_id), "logprob": value, "bytes": list(self.token_bytes(token_id))}

        return {"content": [item(token, entry[token]) | {"top_logprobs": [item(a, v) for a, v in _top(entry, k)]}
                            for token, entry in zip(tokens, entries)]}

    async def chat(self, body: ChatRequest, request: Request):
        self._check_model(body.model)
        self._check_fanout(1, body.n)
        ids = await self._chat_prompt(body)
        max_tokens = completion_room(len(ids), self.max_model_len, body.max_completion_tokens or body.max_tokens,
                                     "messages")
        params = body.sampling_params(max_tokens, (body.top_logprobs or 0) if body.logprobs else None,
                                      self.vocab_size)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        if body.stream:
            head = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": self.name}
            return _sse(self._stream_chat(body, ids, params, head))
        (out,) = await self._collect([ids], params, request)
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": self._chat_logprobs(c.token_ids, c.logprobs, params.logprobs) if c.logprobs else None,
                    "finish_reason": c.finish_reason} for c in out.outputs]
        head = {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": self.name}
        return head | {"choices": choices, "usage": self._usage([ids], sum(len(c.token_ids) for c in out.outputs))}

    async def _stream_chat(self, body, ids, params, head) -> AsyncIterator[dict]:
        for j in range(params.n):
            yield head | {"choices": [{"index": j, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                       "finish_reason": None}]}
        completion_tokens = 0
        async for _, event in self._run([ids], params):
            if event.kind != "delta":
                continue
            d = event.delta
            completion_tokens += len(d.token_ids)
            delta = {"content": d.text} if d.text or d.finish_reason is None else {}
            yield head | {"choices": [{"index": d.index, "delta": delta,
                                       "logprobs": (self._chat_logprobs(d.token_ids, d.logprobs, params.logprobs)
                                                    if d.logprobs else None),
                                       "finish_reason": d.finish_reason}]}
        if body.include_usage:
            yield head | {"choices": [], "usage": self._usage([ids], completion_tokens)}


PROBE_CHARS_PER_TOKEN = 8  # about twice what English text spends per token


def encode_bounded(encode: Callable[[str], list[int]], text: str, max_model_len: int, param: str = "prompt"
                   ) -> list[int]:
    """encode(text), unless its first PROBE_CHARS_PER_TOKEN x max_model_len characters alone encode to
    more tokens than the context holds: then a 400 after encoding only those (long-context models let
    the character bound through megabytes, which would take seconds to encode whole)."""
    probe = PROBE_CHARS_PER_TOKEN * max_model_len
    if len(text) > probe:
        head = encode(text[:probe])
        if len(head) > max_model_len + 16:  # + 16: the cut may split what the whole text merges
            raise APIError(400, f"This model's maximum context length is {max_model_len} tokens; the prompt's "
                                f"first {probe} of {len(text)} characters alone are {len(head)} tokens. "
                                f"Reduce the prompt.", param)
    return encode(text)


def _top(entry: dict[int, float], k: int) -> list[tuple[int, float]]:
    """The k most likely alternatives of a logprobs entry (it holds the sampled token and the top k)."""
    return sorted(entry.items(), key=lambda item: -item[1])[:k]


def _sse(chunks: AsyncIterator[dict]) -> StreamingResponse:
    async def lines():
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
        except APIError as exc:  # the status line is sent already: report in-band, as OpenAI does
            yield f"data: {json.dumps(exc.body())}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream")


async def _cancel_on_disconnect(request: Request, work):
    """Run `work`; if the client disconnects first, cancel it (its requests are aborted)."""
    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watcher = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        watcher.cancel()
        return task.result()
    task.cancel()
    raise APIError(400, "the client disconnected")
