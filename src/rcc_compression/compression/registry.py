"""The one place stages are listed: name -> (config model, stage class).

Adding a method is one module (a ``StageConfig`` subclass and a ``Stage`` subclass) plus one line
here; the config schema, the cascade and the CLI pick it up from this dict.
"""

from __future__ import annotations

from typing import Any

from ..errors import CompressionError
from .alphaedit import AlphaEditConfig, AlphaEditStage
from .dare import DareConfig, DareStage
from .nullu import NulluConfig, NulluStage
from .quant import QuantConfig, QuantStage
from .stage import Stage, StageConfig

STAGES: dict[str, tuple[type[StageConfig], type[Stage]]] = {
    "dare": (DareConfig, DareStage),
    "nullu": (NulluConfig, NulluStage),
    "alphaedit": (AlphaEditConfig, AlphaEditStage),
    "quant": (QuantConfig, QuantStage),
}


def build_stage(name: str, config: StageConfig | dict[str, Any] | None = None) -> Stage:
    """Instantiate a registered stage from its typed config (or a dict validated against it)."""
    if name not in STAGES:
        raise CompressionError(f"unknown stage {name!r}; allowed: {', '.join(STAGES)}")
    cfg_cls, stage_cls = STAGES[name]
    if config is None:
        config = cfg_cls()
    elif isinstance(config, dict):
        from ..config import validate_stage_config

        config = validate_stage_config(name, config)
    return stage_cls(config)
