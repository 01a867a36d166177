"""Model handling: wrappers over Hugging Face CLIP and BLIP, and the registry that resolves names."""

from .base import ModelWrapper
from .registry import BUNDLED, detect_model_type, get_model, register_bundled, unwrap_model, wrap_model

__all__ = [
    "BUNDLED", "ModelWrapper", "detect_model_type", "get_model", "register_bundled", "unwrap_model", "wrap_model",
]
