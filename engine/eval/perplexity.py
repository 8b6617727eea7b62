"""Held-out perplexity with fixed, documented windows.

The text is tokenized once, without special tokens. Windows of `ctx` tokens start every
`stride` tokens (the last one is cut at the end of the text); each token is scored once, by the
first window that holds it with context before it, given only that window's earlier tokens.
With stride == ctx (the default, 512/512) windows are disjoint and the first token of each
window is not scored; with stride < ctx every scored token sees at least ctx - stride tokens of
context (transformers' "strided perplexity").
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from engine.model.llama import CausalLM


@dataclass(frozen=True, slots=True)
class Window:
    begin: int  # first token fed to the model
    end: int  # one past the last token fed
    first_scored: int  # first token whose log-likelihood this window contributes


@dataclass(frozen=True, slots=True)
class PerplexityResult:
    perplexity: float
    mean_nll: float  # nats per scored token
    scored_tokens: int
    total_tokens: int
    windows: int
    ctx: int
    stride: int
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def load_text(path: str | Path, max_chars: int | None = None) -> str:
    """Read a UTF-8 text file (its first `max_chars` characters when given) or raise ValueError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"text file {path} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"text file {path} is a directory") from None
    except PermissionError:
        raise ValueError(f"text file {path} is not readable (permission denied)") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"text file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if max_chars is not None:
        if max_chars < 1:
            raise ValueError(f"max_chars must be positive, got {max_chars}")
        text = text[:max_chars]
    if not text.strip():
        raise ValueError(f"text file {path} is empty")
    return text


def make_windows(n_tokens: int, ctx: int, stride: int) -> list[Window]:
    if ctx < 2:
        raise ValueError(f"ctx must be at least 2 tokens, got {ctx}")
    if not 1 <= stride <= ctx:
        raise ValueError(f"stride must be in [1, ctx={ctx}], got {stride}")
    if n_tokens < 2:
        raise ValueError(f"perplexity needs at least 2 tokens of text, got {n_tokens}")
    windows, prev_end = [], 0
    for begin in range(0, n_tokens - 1, stride):
        end = min(begin + ctx, n_tokens)
        first = max(begin + 1, prev_end)
        if first < end:
            windows.append(Window(begin, end, first))
        prev_end = end
        if end == n_tokens:
            break
    return windows


@torch.inference_mode()
def perplexity(
    model: CausalLM,
    token_ids: list[int] | torch.Tensor,
    ctx: int = 512,
    stride: int = 512,
    batch_size: int = 4,
    progress: bool = True,
) -> PerplexityResult:
    """exp(mean NLL) of `token_ids` under `model`, windows as in the module docstring."""
    start = time.perf_counter()
    ids = torch.as_tensor(token_ids, dtype=torch.long)
    windows = make_windows(len(ids), ctx, stride)
    nll_sum, scored = 0.0, 0
    with tqdm(total=len(windows), desc="perplexity", unit="window", disable=not progress) as bar:
        for i in range(0, len(windows), batch_size):
            batch = windows[i : i + batch_size]
            hiddens = model.hidden_states([ids[w.begin : w.end] for w in batch])
            for w, hidden in zip(batch, hiddens):
                # position p predicts token p + 1: score tokens [first_scored, end)
                logits = model.logits(hidden[w.first_scored - w.begin - 1 : w.end - w.begin - 1]).float()
                targets = ids[w.first_scored : w.end].to(logits.device)
                nll_sum += F.cross_entropy(logits, targets, reduction="sum").item()
                scored += len(targets)
            bar.update(len(batch))
    mean_nll = nll_sum / scored
    return PerplexityResult(
        perplexity=math.exp(mean_nll),
        mean_nll=mean_nll,
        scored_tokens=scored,
        total_tokens=len(ids),
        windows=len(windows),
        ctx=ctx,
        stride=stride,
        seconds=time.perf_counter() - start,
    )
