"""Single-sequence reference decoding: re-runs the whole sequence every step, no KV cache.

Slow by design (O(n²) in the output length) and obviously right: it serves `lowrank generate`
until the batched engine lands, and stays as the oracle the engine's output is tested against.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from engine.model.llama import CausalLM


@torch.inference_mode()
def stream_tokens(
    model: CausalLM,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    seed: int | None = None,
    stop_ids: tuple[int, ...] = (),
) -> Iterator[int]:
    """Yield up to `max_new_tokens` new token ids: greedy at temperature 0, else sampled (seeded)."""
    if not prompt_ids:
        raise ValueError("the prompt is empty: at least one token is needed")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    vocab = model.config.vocab_size
    if not all(0 <= t < vocab for t in prompt_ids):
        raise ValueError(f"prompt token ids must be in [0, {vocab}), got {min(prompt_ids)}..{max(prompt_ids)}")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    ids = list(prompt_ids)
    for _ in range(max_new_tokens):
        last = model.hidden_states([ids])[0][-1:]  # (1, hidden)
        logits = model.logits(last)[0].float().cpu()
        if temperature == 0:
            token = int(logits.argmax())
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=generator))
        yield token
        if token in stop_ids:
            return
        ids.append(token)
