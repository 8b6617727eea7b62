"""One global threshold over importance scores decides every factorised module's rank.

The same rule serves `bake` (choosing ranks at conversion) and the loader (serving a smaller
size from a checkpoint's stored scores), so a checkpoint truncated at load keeps exactly what a
bake at that ratio with the same scores would keep.
"""

from __future__ import annotations

import torch


def lowrank_params(rank: int, shape: tuple[int, int]) -> int:
    out_features, in_features = shape
    return rank * (out_features + in_features)


def dense_rank(shape: tuple[int, int]) -> float:
    """The rank at which factors stop saving parameters: in·out / (in + out)."""
    out_features, in_features = shape
    return out_features * in_features / (out_features + in_features)


def module_params(rank: int, shape: tuple[int, int], dense_fallback: bool) -> int:
    """Parameters a module costs at `rank`; with `dense_fallback` never more than the dense weight."""
    cost = lowrank_params(rank, shape)
    return min(cost, shape[0] * shape[1]) if dense_fallback else cost


def allocate_ranks(
    scores: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]], budget: int, dense_fallback: bool
) -> dict[str, int]:
    """Keep the highest-scoring components over all modules while their parameters fit `budget`.

    scores[name] [k]: importance per component, any order (a module keeps its top ones); a
    component scored <= 0 is cut whatever the budget.
    A component of an out×in module costs out + in; with `dense_fallback` a module costs at most
    out·in (it is stored dense once factors stop saving), so components past that point are free.
    """
    names = list(scores)
    sorted_scores, increments, owners = [], [], []
    for idx, name in enumerate(names):
        s = scores[name].detach().float().cpu().sort(descending=True).values
        ranks = torch.arange(1, len(s) + 1)
        out_features, in_features = shapes[name]
        cost = ranks * (out_features + in_features)
        if dense_fallback:
            cost = cost.clamp(max=out_features * in_features)
        sorted_scores.append(s)
        increments.append(torch.diff(cost, prepend=torch.zeros(1, dtype=cost.dtype)))
        owners.append(torch.full((len(s),), idx))
    all_scores = torch.cat(sorted_scores)
    order = torch.sort(all_scores, descending=True, stable=True).indices
    spent = torch.cumsum(torch.cat(increments)[order], 0)
    kept = int(torch.searchsorted(spent, torch.tensor(budget), right=True))
    kept = min(kept, int((all_scores > 0).sum()))  # order is descending: positives come first
    counts = torch.bincount(torch.cat(owners)[order[:kept]], minlength=len(names))
    return {name: int(c) for name, c in zip(names, counts)}


def uniform_priority(shape: tuple[int, int], k: int) -> torch.Tensor:
    """Scores that make the global rule keep the same fraction of every module (SVD-LLM's uniform
    ranks): component i is cut once the ratio exceeds 1 − (i + 1)(out + in)/(out·in)."""
    out_features, in_features = shape
    return 1 - torch.arange(1, k + 1, dtype=torch.float64) * (out_features + in_features) / (out_features * in_features)
