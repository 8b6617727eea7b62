"""One completion's state while the engine works on it. Only the scheduler changes it."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # not in the running batch: new, or preempted (its cache freed)
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: int  # the `generate` call's request; n > 1 completions share it
    token_ids: list[int]  # prompt followed by the generated tokens
    num_prompt_tokens: int
    params: SamplingParams
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)  # cache block ids, in token order
    num_computed_tokens: int = 0  # leading tokens whose K/V are in the cache
    num_cached_tokens: int = 0  # of those, how many came from the prefix cache at admission
    num_published_blocks: int = 0  # leading blocks already offered to the prefix cache
    finish_reason: str | None = None  # "stop" or "length"
    logprobs: list[dict[int, float]] = field(default_factory=list)  # per generated token, when asked
    generator: torch.Generator | None = None  # the request's own RNG when it has a seed
    num_preemptions: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
