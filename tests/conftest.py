"""Shared fixtures. TRITON_INTERPRET and LOWRANK_KERNELS must be set before `kernels` is imported anywhere."""

import math
import os
import sys
from pathlib import Path

import pytest
import torch  # does not import triton

# No GPU: run the Triton kernels in the CPU interpreter, so CI checks them; the interpreter alone
# does not choose them (kernels.backend), LOWRANK_KERNELS=triton does. With a GPU, compile them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("LOWRANK_KERNELS", "triton")

REPO = Path(__file__).resolve().parents[1]
# For tests that run the Triton path on CPU tensors (LOWRANK_KERNELS=triton): with a GPU there is no interpreter.
interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="the Triton path on CPU tensors needs TRITON_INTERPRET=1")
REAL_MODEL = "smollm2-135m"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def cpu_kernels(monkeypatch):
    """The default path (`auto`) for a test whose subject is not the Triton kernels: on CPU the
    native kernels serve the engine and `kernels.lowrank_gemm` (the trainers') is the torch reference.

    Under the interpreter a kernel launch costs tens of milliseconds; long training runs and the
    real model would take minutes. The kernels' own tests (and one SoCo step) keep CI honest.
    """
    import kernels

    monkeypatch.setattr(kernels, "BACKEND", "auto")


def save_tiny_model(config, folder: Path) -> torch.nn.Module:
    """A random transformers model for `config`, saved as a real safetensors folder; returns it (fp32, eval)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    # Random init leaves norms at exactly 1 and biases at 0: perturb them so the test sees them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


def save_tiny_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer ("t0 t1 ..." <-> ids, eos t1) beside a tiny model, so the engine can load it
    offline: bench/synthetic.py's, which the benchmarks' random real-shaped models use too."""
    if str(REPO / "bench") not in sys.path:
        sys.path.append(str(REPO / "bench"))  # appended: bench's modules never shadow an installed one
    from synthetic import write_tokenizer

    write_tokenizer(folder, vocab_size, eos_id=1, bos_id=None)


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """The real SmolLM2 folder, pulled once into the repo's models/ (git-ignored) and reused."""
    from converters.pull import pull

    return pull(REAL_MODEL, REPO / "models")


def shuffled_paged_pools(lengths, token_shapes, device, block_size: int = 16):
    """Block pools [blocks, block_size, *shape], one per per-token shape, with blocks shuffled across
    sequences: random values in each sequence's slots, NaN in unused blocks and past each context,
    so a stray read shows. -> (pools, block tables int32 [B, max_blocks] padded with 0)."""
    widths = [-(-n // block_size) for n in lengths]
    num_blocks = sum(widths) + 3
    pools = [torch.full((num_blocks, block_size, *shape), float("nan"), device=device) for shape in token_shapes]
    order = torch.randperm(num_blocks, device=device)
    tables = torch.zeros(len(lengths), max(widths), dtype=torch.int32, device=device)
    used = 0
    for i, (n, w) in enumerate(zip(lengths, widths)):
        blocks = order[used:used + w]
        used += w
        tables[i, :w] = blocks.int()
        for pool, shape in zip(pools, token_shapes):
            values = torch.randn(w * block_size, *shape, device=device)
            values[n:] = float("nan")  # slots past the context are never read either
            pool[blocks] = values.unflatten(0, (w, block_size))
    return pools, tables


def dense_attention_ref(q, ks, vs, query_lens, sliding_window, causal=True):
    """float64 softmax(q k^T / sqrt(D)) v per sequence; query t sits at position L - n + t, sees keys j <= it
    (and within the window); query head h reads KV head h // (Hq / Hkv). causal=False only guards the tests."""
    outs, start = [], 0
    for k, v, n in zip(ks, vs, query_lens):
        length, group = k.shape[0], q.shape[1] // k.shape[1]
        qi = q[start:start + n].double()  # (n, Hq, D)
        start += n
        k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)  # (L, Hq, D)
        scores = torch.einsum("qhd,khd->hqk", qi, k) / math.sqrt(qi.shape[-1])
        q_pos, k_pos = torch.arange(length - n, length)[:, None], torch.arange(length)[None, :]
        visible = k_pos <= q_pos if causal else torch.ones(n, length, dtype=torch.bool)
        if sliding_window is not None:
            visible &= q_pos - k_pos < sliding_window
        weights = scores.masked_fill(~visible, -math.inf).softmax(-1)
        outs.append(torch.einsum("hqk,khd->qhd", weights, v))
    return torch.cat(outs)
