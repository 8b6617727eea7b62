"""Per-request generation settings, validated when built (errors name the field and the value)."""

from __future__ import annotations

import math
import reprlib
from dataclasses import dataclass, field

GREEDY_BELOW = 1e-5  # temperatures below this sample greedily (vLLM's _SAMPLING_EPS)
MAX_STOP_STRINGS = 4  # as OpenAI's API allows
MAX_STOP_CHARS = 1024  # per stop string: each costs its length per completion to prepare


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int = 64  # new tokens at most; the request finishes with reason "length" there
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # keep the k most likely tokens; 0 = all
    top_p: float = 1.0  # keep the smallest set with this much probability mass; in (0, 1]
    min_p: float = 0.0  # drop tokens below min_p × the top token's probability; in [0, 1]
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in prompt or output (CTRL-style)
    presence_penalty: float = 0.0  # subtracted once from tokens already generated (OpenAI)
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated tokens (OpenAI)
    seed: int | None = None  # same seed -> same completion, whatever else shares the batch
    stop: tuple[str, ...] = ()  # stop strings; the text is cut before them and they are not returned
    stop_token_ids: tuple[int, ...] = ()  # finish on these ids (besides the model's EOS)
    ignore_eos: bool = False  # keep going past the model's EOS ids (benchmarks)
    min_tokens: int = 0  # EOS and stop ids are blocked until this many tokens exist
    logprobs: int | None = None  # None: no logprobs; k >= 0: the sampled token's and the top-k's
    n: int = 1  # completions per prompt, sharing the prompt's cache blocks
    # stop_token_ids as a set, for the per-token checks: a long list must not cost its length every step
    stop_token_set: frozenset[int] = field(init=False, repr=False, compare=False, default=frozenset())

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):  # accept one string, as OpenAI's API does
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(dict.fromkeys(int(t) for t in self.stop_token_ids)))
        object.__setattr__(self, "stop_token_set", frozenset(self.stop_token_ids))
        floats = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
        for name in floats:  # Infinity passes every range check below and turns the logits into NaN
            if not (isinstance(getattr(self, name), (int, float)) and math.isfinite(getattr(self, name))):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)!r}")
        checks = [
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens", "an integer >= 1"),
            (self.temperature >= 0, "temperature", ">= 0"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k", "an integer >= 0 (0 = off)"),
            (0 < self.top_p <= 1, "top_p", "in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p", "in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty", "> 0"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty", "in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty", "in [-2, 2]"),
            (isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= self.max_tokens, "min_tokens",
             f"an integer in [0, max_tokens={self.max_tokens}]"),
            (self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20), "logprobs",
             "None or an integer in [0, 20]"),
            (isinstance(self.n, int) and 1 <= self.n <= 64, "n", "an integer in [1, 64]"),
            # torch seeds are 64-bit; completion j of n draws from seed + j, which stays below 2**64
            (self.seed is None or (isinstance(self.seed, int) and -2**63 <= self.seed < 2**63), "seed",
             "None or an integer in [-2**63, 2**63)"),
            (len(self.stop) <= MAX_STOP_STRINGS and all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS
                                                        for s in self.stop),
             "stop", f"at most {MAX_STOP_STRINGS} non-empty strings of at most {MAX_STOP_CHARS} characters"),
            (all(t >= 0 for t in self.stop_token_ids), "stop_token_ids", "ids >= 0"),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise ValueError(f"{name} must be {expected}, got {shown(getattr(self, name), 200)}")

    def check_vocab(self, vocab_size: int) -> None:
        """Ids must index the model's logits: the sampler bans stop ids by indexing them."""
        if bad := [t for t in self.stop_token_ids if t >= vocab_size]:
            raise ValueError(f"stop_token_ids must be ids below the vocabulary size {vocab_size}, got {bad[:5]}")

    @property
    def greedy(self) -> bool:
        """0, or so close to it (as vLLM rounds) that dividing float32 logits by it would overflow."""
        return self.temperature < GREEDY_BELOW


def shown(value, limit: int = 80) -> str:
    """A value's repr for an error message, cut short (a 600 kB stop string is not echoed back) and
    shallow (reprlib stops a few levels down, so deep nesting cannot recurse)."""
    text = reprlib.repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
