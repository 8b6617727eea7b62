"""Triton kernels, each beside its plain-torch reference; imports only torch and triton.

`lowrank_gemm` is the one entry point callers use. Today it is the torch reference on every
device; the Triton kernel plugs in here (chosen once: Triton on CUDA or under
TRITON_INTERPRET=1, the reference otherwise) with the same signature.
"""

from .lowrank_gemm import lowrank_gemm_ref

lowrank_gemm = lowrank_gemm_ref

__all__ = ["lowrank_gemm", "lowrank_gemm_ref"]
