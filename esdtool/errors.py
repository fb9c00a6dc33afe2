"""Every typed error the library raises, named for what happened; the CLI turns each into one
line on stderr and exits with ``exit_code``.

Every error carries a ``hint`` (what to do next) besides its message (what happened).
"""

from __future__ import annotations


class EsdtoolError(Exception):
    """Base class: a problem with the user's input, not a bug in esdtool."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class OptionError(EsdtoolError):
    """An option or setting has an invalid value (bad regex, unknown device, out of range)."""


class MissingExtraError(EsdtoolError):
    """A feature needs an optional dependency that is not installed (e.g. the finetune extra)."""


class SourceError(EsdtoolError):
    """The SOURCE argument names nothing esdtool can read (missing path, unknown hub id)."""


class HubRefusedError(SourceError):
    """The hub refused a request (401, 403, 404: gated, private, gone, a revoked token). During
    an analysis it stops the run like a :class:`TransferError`, keeping the finished rows."""


class PickleRefusedError(SourceError):
    """Only pickled checkpoints (.bin/.pt/...) were found; esdtool never unpickles."""


class CheckpointError(EsdtoolError):
    """A safetensors file (or its index) is malformed, truncated or unsafe."""


class ShardMissingError(CheckpointError):
    """A sharded checkpoint's index names a shard file that is not there."""


class ModelLoadError(EsdtoolError):
    """transformers cannot build or load a model or tokenizer from the files given."""


class MetricsSchemaError(EsdtoolError):
    """A parquet file is not an esdtool metrics table, or is of an unsupported schema version."""


class DataFormatError(EsdtoolError):
    """Training data that cannot be read, or whose records fit none of the known formats."""


class PlanMismatchError(EsdtoolError):
    """A LoRA plan does not fit the model: modules missing, other shapes, other ranks."""


class OutputError(EsdtoolError):
    """An output file or directory cannot be written."""


class HubCacheError(OutputError):
    """A shard cannot be written into the HF cache (a full disk, no permission, a damaged cache
    folder); like a :class:`TransferError` it stops an analysis, keeping the finished rows."""


class TransferError(EsdtoolError):
    """Reading from the hub failed again after every retry (a dropped connection, 5xx errors);
    the finished rows are safe in the resume sidecar."""


class AnalysisInterrupted(EsdtoolError):
    """Ctrl-C during an analysis: the finished rows are safe in the resume sidecar."""

    exit_code = 130


def listed(names: list[str], limit: int) -> str:
    """The first ``limit`` of ``names`` joined by commas, and how many more there are (a
    message names a few of many, never a thousand)."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
