"""GPTQ rounding (Frantar et al., 2022): group quantisation of a weight with error feedback in the
metric of its calibration inputs, so that x·Ŵᵀ stays close to x·Wᵀ on the inputs the layer sees,
not only Ŵ close to W.

Input columns are quantised in order. Each column's rounding error, divided by the pivot of the
upper Cholesky factor U of H⁻¹ (H = XᵀX + λ·mean(diag H)·I, the damped input Gram), is subtracted
from the columns not yet quantised along U's row: the optimal update of the remaining weights
(Optimal Brain Surgeon's) for the loss ||X(W − Ŵ)ᵀ||². Columns go in blocks of whole groups, the
updates inside a block applied at once and the block's errors pushed to the later columns with one
matrix product (GPTQ's lazy batch). A group's scale is set when its first column is reached, from
the weights as updated so far (the format's own scale rule, `kernels.quant.group_scale`), so it
sees the feedback of the groups before it. Output rows never interact: a row prefix (B's rank
prefix) of the result is the result for that prefix. Columns do: a column prefix (A's rank prefix)
keeps the feedback its columns received but loses what later columns absorbed, so a factor served
below its stored rank gains less from GPTQ than at full rank (never more error than it had).

Everything in float64; the damping λ is `DAMP`, GPTQ's default. Dead inputs (zero on every
calibration token) get a unit diagonal, so H is invertible, and are rounded as they are.
"""

from __future__ import annotations

import torch

from kernels.quant import Quantized, check_format, from_levels, group_scale, round_to_levels

DAMP = 0.01
BLOCK = 128  # columns per lazy batch, rounded up to whole groups


def gptq_quantize(w: torch.Tensor, gram: torch.Tensor, bits: int, group: int, damp: float = DAMP) -> Quantized:
    """W [out, in] quantised in the format of `kernels.quant.quantize`, rounded by GPTQ on the
    input Gram `gram` [in, in] (XᵀX summed over calibration tokens)."""
    check_format(bits, group)
    out, cols = w.shape
    if gram.shape != (cols, cols):
        raise ValueError(f"the Gram must be [{cols}, {cols}] for a weight {tuple(w.shape)}, got {tuple(gram.shape)}")
    W = w.detach().to(torch.float64).clone()
    H = gram.detach().to(torch.float64).clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    H.diagonal().add_(damp * H.diagonal().mean())
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    q = torch.zeros(out, cols, dtype=torch.int8)
    d = torch.zeros(out, -(-cols // group), dtype=torch.float64)
    block = -(-BLOCK // group) * group
    for start in range(0, cols, block):
        end = min(start + block, cols)
        Wb, errors = W[:, start:end].clone(), torch.zeros(out, end - start, dtype=torch.float64)
        Ub = U[start:end, start:end]
        for j in range(end - start):
            column = start + j
            if column % group == 0:  # the group lies inside the block: its weights carry the updates so far
                width = min(group, end - column)
                d[:, column // group] = group_scale(Wb[:, j : j + width], bits)
            scale = d[:, column // group]
            q[:, column] = round_to_levels(Wb[:, j], scale, bits)
            errors[:, j] = (Wb[:, j] - q[:, column].double() * scale) / Ub[j, j]
            Wb[:, j:] -= errors[:, j : j + 1] * Ub[j : j + 1, j:]
        W[:, end:] -= errors @ U[start:end, end:]
    return from_levels(q, d, bits, group)

