"""A completion's text as its tokens arrive: stop strings found and cut, unsafe tails held back.

Streaming must never show what could still change: a trailing U+FFFD (a multi-byte character
split across tokens) or the start of a stop string. Decoding re-reads the whole output each step:
simple, and exact for byte-level BPE tokenizers; outputs are short next to the model's work.

Stop strings are followed by a Knuth-Morris-Pratt automaton each, fed only the characters that
are new since the last step (after rewinding to where a re-decode changed the text), so a step
costs what it adds, never the stop strings' lengths: the held-back tail is the automaton's state.
"""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=256)
def _prefix_function(pattern: str) -> tuple[int, ...]:
    """fail[i]: length of the longest proper prefix of pattern[:i + 1] that is also its suffix."""
    fail, k = [0] * len(pattern), 0
    for i in range(1, len(pattern)):
        while k and pattern[i] != pattern[k]:
            k = fail[k - 1]
        if pattern[i] == pattern[k]:
            k += 1
        fail[i] = k
    return tuple(fail)


class _StopMatcher:
    """How much of one stop string the text ends with, at every prefix of the text."""

    def __init__(self, stop: str):
        self.stop, self.fail = stop, _prefix_function(stop)
        self.states = [0]  # states[i]: the longest prefix of `stop` that text[:i] ends with

    def feed(self, text: str, start: int) -> int | None:
        """Forget text[start:], then read it anew; the start of the first full match, if one appears."""
        del self.states[start + 1:]
        stop, fail, k = self.stop, self.fail, self.states[-1]
        for i in range(start, len(text)):
            c = text[i]
            while k and (k == len(stop) or stop[k] != c):
                k = fail[k - 1]
            if stop[k] == c:
                k += 1
            self.states.append(k)
            if k == len(stop):
                return i + 1 - k
        return None


def _common_prefix(a: str, b: str) -> int:
    """len of the longest common prefix: usually all of `a` (one C-level check), else a binary search."""
    if b.startswith(a):
        return len(a)
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if b.startswith(a[:mid]):
            lo = mid
        else:
            hi = mid - 1
    return lo


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.matchers = [_StopMatcher(s) for s in stop]
        self.text = ""  # the output so far, cut before a stop string once one appears
        self.emitted = 0  # characters of `text` already handed to a stream
        self.stopped = False  # a stop string was found

    def update(self, output_ids: list[int]) -> None:
        if self.stopped:
            return  # the text ends where the stop string began
        text = self.tokenizer.decode(output_ids, skip_special_tokens=True)
        if self.matchers:
            start = _common_prefix(self.text, text)  # a re-decode may change the tail (U+FFFD completed)
            hits = [h for h in (m.feed(text, start) for m in self.matchers) if h is not None]
            if hits:
                text, self.stopped = text[: min(hits)], True
        self.text = text

    def delta(self, final: bool) -> str:
        """New text that is safe to show (everything, once `final`)."""
        safe = len(self.text)
        if not final:
            safe = len(self.text.rstrip("\ufffd"))
            if not self.stopped:
                safe -= max((m.states[safe] for m in self.matchers), default=0)
        if safe <= self.emitted:
            return ""
        out, self.emitted = self.text[self.emitted:safe], safe
        return out
