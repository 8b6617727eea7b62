"""Continuous batching: which sequences run this step, with how many tokens each.

Every step, running sequences come first, oldest first: a decoding one needs one token, one in
the middle of a chunked prefill takes what is left of the token budget. Then waiting sequences
are admitted in arrival order while the budget, the seat count and free blocks allow; a long
prompt is split across steps, so it never stalls the decodes running beside it. When a running
sequence needs a block and none is free, the newest running sequence is preempted: its blocks
are released (its full blocks stay in the prefix cache) and it waits to be recomputed, keeping
the tokens it produced, so its output is unchanged. Plain Python over `Sequence` objects: the
only owner of request state, unit-tested without a model.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


@dataclass(frozen=True, slots=True)
class Batch:
    """One step's work, in the order the runner packs it."""

    seqs: tuple[Sequence, ...]
    num_new_tokens: tuple[int, ...]  # tokens each sequence computes this step (1 when decoding)
    samples: tuple[bool, ...]  # whether each sequence's last computed token yields its next token

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, eos_token_ids: tuple[int, ...] = ()):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- schedule ------------------------------------------------------------------------------
    def schedule(self) -> Batch:
        bm, budget = self.block_manager, self.max_num_batched_tokens
        seqs: list[Sequence] = []
        counts: list[int] = []
        preempted = False
        for seq in list(self.running):
            if budget == 0:
                break
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while seq.status is SequenceStatus.RUNNING and not bm.can_grow(seq, seq.num_computed_tokens + n):
                self._preempt(self.running[-1])
                preempted = True
            if seq.status is not SequenceStatus.RUNNING:
                break  # it was the newest left: everything after it is preempted too
            bm.grow(seq, seq.num_computed_tokens + n)
            seqs.append(seq)
            counts.append(n)
            budget -= n
        # Admit only when nothing had to be preempted: otherwise the newcomer would be evicted next.
        held: list[Sequence] = []  # n > 1 siblings waiting for their prompt: they do not block others
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            seq = self.waiting[0]
            if self._sibling_prefilling(seq):
                held.append(self.waiting.popleft())
                continue
            if not bm.can_allocate(seq):
                break
            bm.allocate(seq)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            seqs.append(seq)
            counts.append(n)
            budget -= n
        self.waiting.extendleft(reversed(held))
        samples = tuple(s.num_computed_tokens + n == s.num_tokens for s, n in zip(seqs, counts))
        return Batch(tuple(seqs), tuple(counts), samples)

    def _sibling_prefilling(self, seq: Sequence) -> bool:
        """n > 1: wait until the first completion has computed (and published) the shared prompt."""
        return any(s.request_id == seq.request_id and s.num_computed_tokens < s.num_prompt_tokens
                   for s in self.running)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.release(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    # -- update --------------------------------------------------------------------------------
    def update(self, batch: Batch, tokens: list[int], logprobs: list[dict[int, float]] | None = None) -> list[Sequence]:
        """Record a step: `tokens` (and `logprobs`) hold one entry per sampling sequence, in batch order.

        Returns the sequences that received a token this step (finished ones included).
        """
        assert len(tokens) == sum(batch.samples), "one token per sampling sequence"
        produced, k = [], 0
        for seq, n, samples in zip(batch.seqs, batch.num_new_tokens, batch.samples):
            if seq.status is not SequenceStatus.RUNNING:
                k += samples  # aborted while the step ran
                continue
            seq.num_computed_tokens += n
            self.block_manager.register_computed(seq)
            if not samples:
                continue
            token = tokens[k]
            if logprobs is not None and seq.params.logprobs is not None:
                seq.logprobs.append(logprobs[k])
            k += 1
            seq.token_ids.append(token)
            produced.append(seq)
            reason = self._finish_reason(seq, token)
            if reason is not None:
                self.finish(seq, reason)
        return produced

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        params = seq.params
        if token in params.stop_token_set or (token in self.eos_token_ids and not params.ignore_eos):
            return "stop"
        if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def finish(self, seq: Sequence, reason: str) -> None:
        """End `seq` (also used for stop strings and aborts): release its blocks, leave the batch."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.block_manager.release(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
