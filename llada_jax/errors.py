"""User errors: one base class (`UserError`), caught once by `llada-jax` -> message + exit 2.

Anything else that escapes is a bug and keeps its traceback. Raise the narrowest class that fits;
each message names the file, flag or config field and what to do about it.
"""

from data_pipeline.errors import DataError, UserError

__all__ = ["UserError", "DataError", "ConfigError", "ShardingError", "CheckpointError",
           "ConversionError", "GenerateError", "SpeculateError"]


class ConfigError(UserError):
    """A training config (file, override, field value) or a model config.json that cannot run."""


class ShardingError(ConfigError):
    """A mesh or rule set that cannot shard the model as asked."""


class CheckpointError(UserError):
    """A checkpoint path that is missing, of the wrong kind, or malformed."""


class ConversionError(CheckpointError):
    """An HF directory or checkpoint that does not match the model config; lists every problem."""


class GenerateError(UserError):
    """Bad input to generate-teacher (prompt file, checkpoint, options), with what to change."""


class SpeculateError(UserError):
    """Bad input to speculate (checkpoints, tokenizers, options), with what to change."""
