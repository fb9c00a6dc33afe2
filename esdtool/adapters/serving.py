"""Serving a LoRA adapter with vLLM: the ``--max-lora-rank`` a server needs to load it.

vLLM sizes its LoRA buffers for ``--max-lora-rank`` and refuses, when loading, an adapter whose
rank is larger ("LoRA rank 64 is greater than max_lora_rank 16"); the flag takes only a few
values, so the adapter needs the smallest of them that is at least its largest rank, and an
adapter with a rank above the largest value cannot be served at all.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from esdtool.errors import CheckpointError
from esdtool.untrusted import printable

# Every value vLLM's --max-lora-rank accepts, ascending: vllm/config/lora.py in vLLM v0.26.0,
# `MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]`. The one place esdtool holds them.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_SOURCE = "vllm/config/lora.py, vLLM v0.26.0"


@dataclass(frozen=True)
class ServingCheck:
    """What serving an adapter with vLLM takes.

    largest_rank:       the largest rank in the adapter (every rank_pattern value and the
                        default r).
    vllm_max_lora_rank: the smallest value vLLM's ``--max-lora-rank`` accepts that is at least
                        ``largest_rank``; None when ``largest_rank`` is above every accepted
                        value, and vLLM cannot load the adapter.
    """

    largest_rank: int
    vllm_max_lora_rank: int | None

    @property
    def fits(self) -> bool:
        """Whether some vLLM server (with ``--max-lora-rank vllm_max_lora_rank``) can load it."""
        return self.vllm_max_lora_rank is not None

    @property
    def warning(self) -> str | None:
        """What to do when vLLM cannot load the adapter; None when it can."""
        if self.fits:
            return None
        top = VLLM_MAX_LORA_RANKS[-1]
        return (
            f"vLLM cannot load this adapter: its largest rank {self.largest_rank} is above "
            f"{top}, the largest --max-lora-rank vLLM accepts ({VLLM_SOURCE}); plan again with "
            f"--max-rank {top} or lower (AllocateSettings(max_rank={top})) to serve it with vLLM"
        )

    def record(self) -> dict[str, Any]:
        """The check as JSON-ready values (the plan record's and ``--json``'s ``serving``)."""
        return {
            "vllm_max_lora_rank": self.vllm_max_lora_rank,
            "largest_rank": self.largest_rank,
            "fits": self.fits,
            "warning": self.warning,
        }


def vllm_max_lora_rank(largest_rank: int) -> int | None:
    """The smallest accepted ``--max-lora-rank`` >= ``largest_rank``, or None if none is."""
    return next((value for value in VLLM_MAX_LORA_RANKS if value >= largest_rank), None)


def serving_check(ranks: Iterable[int]) -> ServingCheck:
    """The check for an adapter whose modules have ``ranks`` (at least one)."""
    largest = max(int(r) for r in ranks)
    return ServingCheck(largest, vllm_max_lora_rank(largest))


def config_serving(config: Mapping[str, Any], where: str = "adapter_config.json") -> ServingCheck:
    """The check for an adapter_config.json's content: its largest rank is the largest
    rank_pattern value or the default r, whichever is larger. Both count: vLLM refuses an
    adapter whose default r is above --max-lora-rank (vllm/lora/peft_helper.py,
    ``validate_legal``) even when every module has its own rank_pattern entry, and each
    module's factors must fit buffers sized by --max-lora-rank.

    The content is untrusted (a hand-edited file): r missing is PEFT's default 8; an r or a
    rank_pattern value that is not a positive integer, or a rank_pattern that is not an
    object, is refused in one :class:`~esdtool.errors.CheckpointError` naming ``where``."""
    r = config.get("r", 8)
    patterns = config.get("rank_pattern")
    patterns = {} if patterns is None else patterns
    problems = [] if _rank(r) else [f"r is {_shown(r)}, not a positive integer"]
    if isinstance(patterns, Mapping):
        problems += [f"rank_pattern[{_shown(key)}] is {_shown(value)}, not a positive integer"
                     for key, value in patterns.items() if not _rank(value)]  # fmt: skip
    else:
        problems.append(f"rank_pattern is {type(patterns).__name__}, not an object")
    if problems:
        raise CheckpointError(f"{printable(where)}: {'; '.join(problems)}")
    return serving_check([r, *patterns.values()])


def _rank(value: object) -> bool:
    """A rank as PEFT takes it: an integer >= 1 (not a bool, not 8.0)."""
    return type(value) is int and value >= 1


def _shown(value: object) -> str:
    """A value from the file, printable and at most 60 characters."""
    text = printable(repr(value))
    return text if len(text) <= 60 else text[:57] + "..."
