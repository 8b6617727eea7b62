"""Triton kernels, each beside its plain-torch reference; imports only torch and triton.

Dispatch (Triton on CUDA or under TRITON_INTERPRET=1, the reference otherwise) lives here once
the first kernel lands.
"""
