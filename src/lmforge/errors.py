"""The errors lmforge raises. Every message says what went wrong, where, and how to fix it.

The CLI turns any LmforgeError into one line on stderr and exit code 2.
"""

from __future__ import annotations


class LmforgeError(Exception):
    """Base class of every error lmforge raises on purpose."""


class ConfigError(LmforgeError, ValueError):
    """An invalid or unsupported configuration (a model config, a preset name, an option)."""


class CheckpointError(LmforgeError):
    """A checkpoint that is missing, corrupt, or does not fit the model."""


class DataError(LmforgeError):
    """Input data that cannot be used: missing or malformed files, wrong fields, empty data."""


class TrainingError(LmforgeError):
    """A training run that cannot go on: non-finite loss, out of memory, a resume that does not fit."""


class ChatTemplateError(ConfigError):
    """A chat template that is missing, is not valid Jinja, or refuses the messages (its raise_exception)."""
