"""What a kernel benchmark times: on CUDA a CUDA-graph replay of several calls, so Python launch
overhead (tens of µs per Triton launch) does not hide the kernels' own time, as the engine's
captured decode step runs them; on CPU the call itself."""

from __future__ import annotations

import torch

CUDA = torch.cuda.is_available()
INNER = 20 if CUDA else 1  # calls per timed replay


def timed(fn):
    """INNER calls of `fn`, captured once in a CUDA graph on a GPU; `fn` itself on CPU."""
    if not CUDA:
        return fn
    for _ in range(3):  # compile, autotune and warm up outside the capture
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(INNER):
            fn()

    def replay():
        graph.replay()
        torch.cuda.synchronize()

    return replay
