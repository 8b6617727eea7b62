"""lowrank-engine's runtime: model code, loader and evaluation (the serving engine grows here)."""

from .config import ModelConfig, ModelFolderError
from .loader import load_model

__all__ = ["ModelConfig", "ModelFolderError", "load_model"]
