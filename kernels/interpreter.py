"""Whether Triton runs its CPU interpreter (`TRITON_INTERPRET=1`: how CI, without a GPU, runs the
kernels), read once, here. The interpreter reads the variable when triton is first imported, so
it is set before anything imports triton (tests/conftest.py)."""

import os

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
