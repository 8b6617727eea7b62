"""lowrank-engine's runtime: model code, loader, evaluation and the batched generation engine."""

from .config import ModelConfig, ModelFolderError
from .engine_config import EngineConfig
from .llm import LLM, generate
from .loader import load_model
from .outputs import CompletionOutput, RequestOutput, StreamDelta
from .sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "EngineConfig", "ModelConfig", "ModelFolderError", "RequestOutput",
           "SamplingParams", "StreamDelta", "generate", "load_model"]
