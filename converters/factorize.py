"""Truncation-aware whitened SVD (SVD-LLM): W·S = UΣVᵀ with S Sᵀ = XᵀX + ridge.

Then W = (UΣ)(Vᵀ S⁻¹) exactly, and dropping the smallest σ minimises the error of W x on the
calibration inputs, not of W. S is a Cholesky factor of the ridged Gram; when the Gram is
singular or ill-conditioned (a layer that saw little data) Cholesky fails and an
eigendecomposition with clamped eigenvalues takes over. S⁻¹ is applied by solves, never formed.
All in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

RIDGE = 1e-4  # λ in G + λ·mean(diag G)·I: small enough not to bias, large enough to factor
EIG_FLOOR = 1e-10  # eigenvalues clamped at this fraction of the largest in the fallback


@dataclass(frozen=True, slots=True)
class Factors:
    """W = U diag(σ) B exactly at full rank, ≈ with any prefix; components in descending σ."""

    U: torch.Tensor  # [out, k]
    sigma: torch.Tensor  # [k]
    B: torch.Tensor  # [k, in] = Vᵀ S⁻¹

    @property
    def shape(self) -> tuple[int, int]:
        return self.U.shape[0], self.B.shape[1]

    @property
    def A(self) -> torch.Tensor:
        """U diag(σ) [out, k]."""
        return self.U * self.sigma

    def balanced(self, order: torch.Tensor, scale: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) for the components `order` with √σ on each side and `scale` folded into A.

        Whitened σ reach ~1e5 on layers with large activations (SmolLM2's down_proj): σ folded
        whole into A overflowed fp16 (inf in layer 11), √σ on each side keeps both in range.
        """
        root = self.sigma[order].sqrt()
        return self.U[:, order] * (root * scale), root[:, None] * self.B[order]


def whitened_svd(weight: torch.Tensor, gram: torch.Tensor | None, ridge: float = RIDGE) -> Factors:
    """Factor `weight` [out, in]; `gram` [in, in] = XᵀX of its inputs, or None for plain SVD."""
    W = weight.double()
    if gram is None:
        U, sigma, Vt = torch.linalg.svd(W, full_matrices=False)
        return Factors(U, sigma, Vt)
    G = gram.double()
    scale = G.diagonal().mean().item()
    if not scale > 0:  # the layer saw only zeros: nothing to whiten by
        return whitened_svd(weight, None)
    G = G + ridge * scale * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    L, info = torch.linalg.cholesky_ex(G)
    if info.item() == 0 and torch.isfinite(L).all():
        U, sigma, Vt = torch.linalg.svd(W @ L, full_matrices=False)
        # B = Vᵀ L⁻¹  <=>  Lᵀ Bᵀ = V
        B = torch.linalg.solve_triangular(L.T, Vt.T, upper=True).T
        return Factors(U, sigma, B)
    evals, Q = torch.linalg.eigh(G)
    root = evals.clamp(min=EIG_FLOOR * evals.max().clamp(min=1e-300)).sqrt()
    U, sigma, Vt = torch.linalg.svd((W @ Q) * root, full_matrices=False)  # S = Q diag(root)
    B = (Vt / root) @ Q.T  # Vᵀ S⁻¹ = Vᵀ diag(1/root) Qᵀ
    return Factors(U, sigma, B)
