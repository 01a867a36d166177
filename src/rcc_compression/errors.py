"""Error types raised by rcc-compression.

Every error the package raises on bad input derives from :class:`RCCError`, so callers (and the
CLI, which turns them into one line and exit status 2) can tell user errors from bugs.
"""

from __future__ import annotations


class RCCError(Exception):
    """Base class of every error rcc-compression raises on bad input or state."""


class ConfigError(RCCError, ValueError):
    """A configuration file, key or value is invalid; the message names file, key and what is allowed."""


class ModelLoadError(RCCError):
    """A model could not be resolved or loaded (unknown name, no network, wrong type)."""


class DataError(RCCError):
    """A dataset file is missing, malformed or empty; the message names the file."""


class CheckpointError(RCCError):
    """A saved checkpoint is missing, corrupt, of an unknown format, or would be overwritten."""


class CompressionError(RCCError):
    """A compression request cannot be met (unreachable rate, no target layers, non-finite result)."""


class EvaluationError(RCCError):
    """An evaluation produced no result (every benchmark was skipped) or cannot run on this model."""
