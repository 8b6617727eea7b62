"""What `LLM.generate`, `chat` and `stream` hand back."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CompletionOutput:
    index: int  # which of the request's n completions
    text: str  # decoded output, stop string excluded
    token_ids: list[int]  # generated ids (a final EOS/stop id included, as the model produced it)
    finish_reason: str | None  # "stop" (EOS, stop id or stop string) or "length"; None while running
    logprobs: list[dict[int, float]] | None = None  # per token: sampled id first, then the top alternatives
    cumulative_logprob: float | None = None  # sum of the sampled tokens' logprobs


@dataclass
class RequestOutput:
    request_id: int
    prompt: str | None  # None when the prompt came as token ids
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int  # prompt tokens served from the prefix cache
    time_to_first_token: float  # seconds from submission to the first generated token
    decode_tokens_per_second: float  # generated tokens after the first / the time they took

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason


@dataclass(frozen=True, slots=True)
class StreamDelta:
    index: int  # completion index within the request
    text: str  # new text since the previous delta (may be empty while a stop string is undecided)
    token_ids: tuple[int, ...]  # new token ids
    finish_reason: str | None  # set on the completion's last delta
    logprobs: tuple[dict[int, float], ...] | None = None  # one per new token, when the request asked
