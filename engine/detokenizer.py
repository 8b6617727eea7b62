"""A completion's text as its tokens arrive: stop strings found and cut, unsafe tails held back.

Streaming must never show what could still change: a trailing U+FFFD (a multi-byte character
split across tokens) or the start of a stop string. Decoding re-reads the whole output each step:
simple, and exact for byte-level BPE tokenizers; outputs are short next to the model's work.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer, self.stop = tokenizer, stop
        self.text = ""  # the output so far, cut before a stop string once one appears
        self.emitted = 0  # characters of `text` already handed to a stream
        self.stopped = False  # a stop string was found

    def update(self, output_ids: list[int]) -> None:
        text = self.tokenizer.decode(output_ids, skip_special_tokens=True)
        if self.stop:
            longest = max(len(s) for s in self.stop)
            start = max(0, len(self.text) - longest)  # a new match ends in the new text
            hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                text, self.stopped = text[: min(hits)], True
        self.text = text

    def delta(self, final: bool) -> str:
        """New text that is safe to show (everything, once `final`)."""
        safe = len(self.text)
        if not final:
            safe = len(self.text.rstrip("\ufffd"))
            held = max((k for s in self.stop for k in range(1, len(s)) if self.text[:safe].endswith(s[:k])),
                       default=0)
            safe -= held
        if safe <= self.emitted:
            return ""
        out, self.emitted = self.text[self.emitted:safe], safe
        return out
