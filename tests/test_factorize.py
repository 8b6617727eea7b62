"""Whitened SVD and the global rank rule."""

import pytest
import torch

from converters.factorize import whitened_svd
from engine.model.rank_budget import allocate_ranks, module_params


def _inputs(n, d, rank=None):
    """Anisotropic calibration inputs [n, d] (optionally of deficient rank), like real activations."""
    scales = torch.logspace(0, 3, d, dtype=torch.float64)
    x = torch.randn(n, d, dtype=torch.float64) * scales
    if rank is not None:
        x = torch.randn(n, rank, dtype=torch.float64) @ torch.randn(rank, d, dtype=torch.float64)
    return x


@pytest.mark.parametrize("out_f, in_f", [(37, 53), (64, 24)])
@pytest.mark.parametrize("case", ["plain", "full-rank gram", "rank-deficient gram", "zero gram"])
def test_full_rank_reproduces_the_layer(out_f, in_f, case):
    W = torch.randn(out_f, in_f, dtype=torch.float64)
    gram = {
        "plain": None,
        "full-rank gram": (lambda x: x.T @ x)(_inputs(200, in_f)),
        "rank-deficient gram": (lambda x: x.T @ x)(_inputs(200, in_f, rank=5)),
        "zero gram": torch.zeros(in_f, in_f, dtype=torch.float64),
    }[case]
    f = whitened_svd(W, gram)
    assert torch.isfinite(f.A).all() and torch.isfinite(f.B).all()
    torch.testing.assert_close(f.A @ f.B, W, atol=1e-9, rtol=1e-9)
    A, B = f.balanced(torch.arange(len(f.sigma)))
    torch.testing.assert_close(A @ B, W, atol=1e-9, rtol=1e-9)


def test_indefinite_gram_takes_the_eigen_fallback_without_nans():
    """Round-off can leave a Gram slightly indefinite: Cholesky fails, the eigen path must not."""
    in_f = 16
    Q, _ = torch.linalg.qr(torch.randn(in_f, in_f, dtype=torch.float64))
    evals = torch.logspace(-8, 2, in_f, dtype=torch.float64)
    evals[0] = -1.0
    gram = Q @ torch.diag(evals) @ Q.T
    assert torch.linalg.cholesky_ex(gram + 1e-4 * gram.diagonal().mean() * torch.eye(in_f))[1] != 0
    W = torch.randn(8, in_f, dtype=torch.float64)
    f = whitened_svd(W, gram)
    assert torch.isfinite(f.A).all() and torch.isfinite(f.B).all()
    torch.testing.assert_close(f.A @ f.B, W, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("rank", [4, 10, 20])
def test_whitened_truncation_beats_plain_svd_on_calibration_outputs(rank):
    x = _inputs(500, 40)
    W = torch.randn(30, 40, dtype=torch.float64)
    errors = {}
    for name, gram in (("plain", None), ("whitened", x.T @ x)):
        f = whitened_svd(W, gram)
        errors[name] = torch.linalg.norm(x @ W.T - x @ (f.A[:, :rank] @ f.B[:rank]).T).item()
    assert errors["whitened"] < errors["plain"]


def test_allocate_ranks_keeps_top_scores_within_budget():
    shapes = {"a": (10, 10), "b": (4, 6)}  # a component costs 20 and 10
    scores = {"a": torch.tensor([5.0, 1.0, 0.5, 3.0]), "b": torch.tensor([4.0, 2.0, 0.0])}
    assert allocate_ranks(scores, shapes, budget=60, dense_fallback=False) == {"a": 2, "b": 2}  # 5,4,3,2
    assert allocate_ranks(scores, shapes, budget=59, dense_fallback=False) == {"a": 2, "b": 1}
    # a zero score is never kept, however large the budget
    assert allocate_ranks(scores, shapes, budget=10**6, dense_fallback=False) == {"a": 4, "b": 2}


def test_dense_fallback_caps_a_module_at_its_dense_size():
    shapes = {"a": (4, 4)}  # dense 16 params; each component 8: two components cost as much as dense
    scores = {"a": torch.tensor([4.0, 3.0, 2.0, 1.0])}
    ranks = allocate_ranks(scores, shapes, budget=16, dense_fallback=True)
    assert ranks == {"a": 4} and module_params(4, (4, 4), dense_fallback=True) == 16
