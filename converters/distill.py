"""KL(teacher ‖ student) of next-token distributions, fused with the output head and chunked.

What SoCo and healing both minimise. The logits of a training batch are [tokens, vocab] (1024 ×
49152 floats = 200 MB for SmolLM2): materialised whole they are allocated, faulted in and saved
for backward at every step. Here the head runs on `chunk` tokens at a time, each chunk's
gradient with respect to the student's hidden states is formed at once (softmax_s − softmax_t,
the KL's gradient in the logits, times the head), and only that [tokens, hidden] gradient is
kept for backward, as the fused linear-cross-entropy kernels of Liger and Apple's CCE do. The
head itself is frozen (embeddings and head are never compressed), so no gradient is formed for it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.model.llama import CausalLM

CHUNK_TOKENS = 128  # 128 × 49152 fp32 logits = 24 MiB: below glibc's mmap threshold (engine.core.cpu_memory), reused


def head_weight(model: CausalLM) -> torch.Tensor:
    """The [vocab, hidden] matrix the logits are made with (the embedding table when tied)."""
    return model.model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight


class _FusedKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_hidden, teacher_hidden, weight, chunk: int):
        acc = torch.promote_types(student_hidden.dtype, torch.float32)  # at least fp32 (float64 stays)
        total = student_hidden.new_zeros((), dtype=acc)
        grad = torch.empty_like(student_hidden) if student_hidden.requires_grad else None
        n = student_hidden.shape[0]
        weight_acc = weight.to(acc) if grad is not None else None  # cast once, not per chunk
        for start in range(0, n, chunk):
            s = F.linear(student_hidden[start:start + chunk], weight).to(acc).log_softmax(-1)
            t = F.linear(teacher_hidden[start:start + chunk], weight).to(acc).log_softmax(-1)
            p_t = t.exp()
            total += (p_t * (t - s)).sum()
            if grad is not None:  # d KL / d logits_s = softmax_s − softmax_t
                grad[start:start + chunk] = ((s.exp() - p_t) @ weight_acc).to(grad.dtype)
        ctx.save_for_backward(grad)
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        n = grad.shape[0]
        return grad * (grad_out / n).to(grad.dtype), None, None, None


def distill_kl(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, weight: torch.Tensor,
               chunk: int = CHUNK_TOKENS) -> torch.Tensor:
    """Mean over tokens of KL(softmax(teacher_hidden·Wᵀ) ‖ softmax(student_hidden·Wᵀ)), in nats.

    student_hidden [N, hidden] (differentiable), teacher_hidden [N, hidden], weight [vocab, hidden].
    """
    if student_hidden.shape != teacher_hidden.shape or student_hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(f"hidden states {tuple(student_hidden.shape)} and {tuple(teacher_hidden.shape)} "
                         f"do not fit the head {tuple(weight.shape)}")
    return _FusedKL.apply(student_hidden, teacher_hidden.detach(), weight.detach(), chunk)
