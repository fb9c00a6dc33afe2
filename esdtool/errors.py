"""Typed errors raised by the library; the CLI turns each into a one-line message.

Every error carries a ``hint`` (what to do next) besides its message (what happened).
"""

from __future__ import annotations


class EsdtoolError(Exception):
    """Base class: a problem with the user's input, not a bug in esdtool."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class SourceError(EsdtoolError):
    """The SOURCE argument names nothing esdtool can read (missing path, unknown hub id)."""


class CheckpointError(EsdtoolError):
    """A safetensors file (or its index) is malformed, truncated or unsafe."""


class ShardMissingError(CheckpointError):
    """A sharded checkpoint's index names a shard file that is not there."""


class PickleRefusedError(SourceError):
    """Only pickled checkpoints (.bin/.pt/...) were found; esdtool never unpickles."""


class MetricsSchemaError(EsdtoolError):
    """A parquet file is not an esdtool metrics table, or is of an unsupported schema version."""


class SettingsError(EsdtoolError):
    """An option has an invalid value (bad regex, unknown device, ...)."""


class OutputError(EsdtoolError):
    """An output file or directory cannot be written."""
