"""lowrank-engine's runtime: the model (`engine.model`), the batched engine (`engine.core`) behind
`LLM`, evaluation (`engine.eval`) and the OpenAI-compatible server (`engine.server`).

The names below are imported on first use (PEP 562), so `import engine.model.rank_budget` (as
the converters do) does not pull in the whole engine, the kernels and Triton.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LLM": "engine.llm", "generate": "engine.llm",
    "EngineConfig": "engine.config",
    "ModelConfig": "engine.model.config", "ModelFolderError": "engine.model.config",
    "load_model": "engine.model.loader",
    "CompletionOutput": "engine.outputs", "RequestOutput": "engine.outputs", "StreamDelta": "engine.outputs",
    "SamplingParams": "engine.sampling_params",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # once per process
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
