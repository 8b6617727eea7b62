"""Calibration: token windows sampled from a text file, and the input Gram XᵀX of every decoder linear.

Inputs of q/k/v are the same tensor (the attention norm's output), and so are gate/up's (the
MLP norm's output): one Gram each, hooked on q_proj and gate_proj. Each batch's Gram is
computed in float32 (a float64 matmul costs ~5× on CPU) and accumulated in float64.
"""

from __future__ import annotations

from pathlib import Path

import torch

from engine.model.llama import CausalLM

from .data_parallel import progress, shard, sum_across_ranks

# Which hooked module's input Gram each decoder linear uses.
SHARED_INPUT = {
    "q_proj": "q_proj", "k_proj": "q_proj", "v_proj": "q_proj", "o_proj": "o_proj",
    "gate_proj": "gate_proj", "up_proj": "gate_proj", "down_proj": "down_proj",
}


def gram_key(linear_name: str) -> str:
    """The hooked module whose input Gram serves a decoder linear ('…k_proj' -> '…q_proj')."""
    parent, _, leaf = linear_name.rpartition(".")
    return f"{parent}.{SHARED_INPUT[leaf]}"


def decoder_linears(model: CausalLM) -> list[str]:
    """Names of every projection inside the decoder layers, in model order."""
    return [
        f"model.layers.{i}.{group}.{leaf}"
        for i in range(model.config.num_layers)
        for group, leaves in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                              ("mlp", ("gate_proj", "up_proj", "down_proj")))
        for leaf in leaves
    ]


def sample_windows(token_ids: list[int], samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """`samples` disjoint windows of `seq_len` tokens, chosen with a fixed seed -> [samples, seq_len]."""
    available = len(token_ids) // seq_len
    if available < samples:
        raise ValueError(
            f"calibration text has {len(token_ids)} tokens, fewer than samples × seq_len = "
            f"{samples} × {seq_len} = {samples * seq_len}"
        )
    ids = torch.as_tensor(token_ids[: available * seq_len], dtype=torch.long).view(available, seq_len)
    pick = torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:samples]
    return ids[pick.sort().values]


def tokenize_file(tokenizer, path: str | Path) -> list[int]:
    from engine.eval.perplexity import load_text

    return tokenizer(load_text(path), add_special_tokens=False, verbose=False)["input_ids"]


@torch.inference_mode()
def collect_grams(model: CausalLM, windows: torch.Tensor, batch_size: int = 4,
                  only: set[str] | None = None, products: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Run `windows` through `model`, summing xᵀx of each hooked linear's input into float64
    (of the hooked modules named in `only`, when given). Each batch's xᵀx is computed in
    `products`: float32 is exact enough for whitening; GPTQ takes float64, because the float32
    roundoff, about 1e-6 of the largest eigenvalue, makes a Gram with a 1e7 condition number
    indefinite along the directions a factor's B·H·Bᵀ then amplifies.

    Inside a torch.distributed process group each rank runs its own share of `windows` and the
    Grams are summed across ranks, so every rank returns the Grams of all of `windows` (equal to
    one process's to float64 round-off: only the order of the sums differs)."""
    hooked = [n for n in dict.fromkeys(gram_key(n) for n in decoder_linears(model)) if only is None or n in only]
    grams: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(module, inputs, output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).to(products)
            gram = (x.T @ x).double()
            if name in grams:
                grams[name] += gram
            else:
                grams[name] = gram

        return hook

    windows = shard(windows, batch_size)
    handles = [model.get_submodule(n).register_forward_hook(hook_for(n)) for n in hooked]
    try:
        for i in progress(range(0, len(windows), batch_size), desc="calibrate", unit="batch"):
            model.hidden_states(list(windows[i : i + batch_size]))
    finally:
        for h in handles:
            h.remove()
    return sum_across_ranks(grams)
