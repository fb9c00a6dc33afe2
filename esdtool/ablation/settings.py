"""What an ablation runs: its arms, its grid of learning rates and seeds, its budget, and the
fine-tuning options every run shares; validated all at once (every problem listed)."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from esdtool.ablation.arms import ARMS, DEFAULT_ARMS
from esdtool.errors import OptionError
from esdtool.training.config import FinetuneSettings
from esdtool.untrusted import user_regex

METRICS = ("loss", "exact-match")

_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-_")


def default_lrs(lr: float, count: int = 5) -> tuple[float, ...]:
    """``count`` learning rates, four per decade, centred on ``lr``: lr x 10^(k/4)."""
    half = count // 2
    return tuple(float(f"{lr * 10 ** (k / 4):.4g}") for k in range(-half, count - half))


@dataclass(frozen=True)
class AblateSettings:
    """The ablation's design.

    arms: built-in arms (:data:`~esdtool.ablation.arms.ARMS`), in the order the page lists them.
    plans: more arms, ``name -> plan directory`` (any esdtool or PEFT LoRA plan), held to the
        same budget.
    lrs: learning rates of the grid (None: 5 values, four per decade, centred on the finetune
        settings' ``lr``). seeds: how many seeds (1, 2, ..., seeds): each seed sets the
        adapters' initialisation and the data order, the same for every arm.
    budget_rank / budget_params: the trainable-parameter budget, uniform rank R on every
        candidate (default 8) or N parameters. arm_seed: the draws of shuffled and random.
    gpus: device ids to run on (CUDA_VISIBLE_DEVICES values): runs go at once, each on its
        ``nproc_per_run`` of them; empty: one run at a time on what the process sees.
    nproc_per_run: processes per run under torchrun (DDP), one per GPU.
    metric: what chooses each arm's learning rate and is reported: "loss" (the eval loss,
        always measured) or "exact-match" (greedy answers of up to ``max_new_tokens`` tokens,
        graded as GSM8K; ``answer_regex`` overrides where the answer is).
    finetune: the options every run trains with (its ``lr`` and ``seed`` are the grid's).
    """

    arms: tuple[str, ...] = DEFAULT_ARMS
    plans: dict[str, Path] = field(default_factory=dict)
    lrs: tuple[float, ...] | None = None
    seeds: int = 3
    budget_rank: int | None = None
    budget_params: int | None = None
    arm_seed: int = 0
    metric: str = "loss"
    answer_regex: str | None = None
    max_new_tokens: int = 64
    gpus: tuple[str, ...] = ()
    nproc_per_run: int = 1
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)

    def __post_init__(self) -> None:
        object.__setattr__(self, "arms", tuple(self.arms))
        object.__setattr__(self, "plans", {k: Path(v) for k, v in dict(self.plans).items()})
        if self.lrs is not None:
            object.__setattr__(self, "lrs", tuple(float(x) for x in self.lrs))
        problems = []
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown:
            problems.append(f"--arms: no arm {', '.join(unknown)} (arms: {', '.join(ARMS)})")
        names = list(self.arms) + list(self.plans)
        if len(set(names)) != len(names):
            problems.append(f"an arm is named twice ({', '.join(names)})")
        if not names:
            problems.append("no arm to run: give --arms or --arm NAME=PLAN_DIR")
        if "uniform" not in self.arms:
            problems.append("the uniform arm is the reference every difference is paired with: "
                            "keep it in --arms")  # fmt: skip
        for name in self.plans:
            if not name or not set(name) <= _NAME_CHARS or len(name) > 40:
                problems.append(f"--arm {name!r}: a name of lowercase letters, digits, - and _ "
                                "(it names a directory)")  # fmt: skip
        if self.lrs is not None:
            if not self.lrs:
                problems.append("--lrs: give at least one learning rate")
            bad = [x for x in self.lrs if not (math.isfinite(x) and 0 < x < 1)]
            if bad:
                problems.append(f"--lrs must lie in (0, 1), not {', '.join(map(str, bad))}")
            if len({f"{x:g}" for x in self.lrs}) != len(self.lrs):  # one run directory each
                problems.append("--lrs names one learning rate twice (to 6 significant digits)")
        if isinstance(self.seeds, bool) or not isinstance(self.seeds, int) or self.seeds < 1:
            problems.append(f"--seeds must be at least 1, not {self.seeds}")
        if self.budget_rank is not None and self.budget_params is not None:
            problems.append("--budget-rank and --budget-params are exclusive: give one")
        if self.budget_rank is not None and self.budget_rank < 1:
            problems.append(f"--budget-rank must be at least 1, not {self.budget_rank}")
        if self.budget_params is not None and self.budget_params < 1:
            problems.append(f"--budget-params must be at least 1, not {self.budget_params}")
        object.__setattr__(self, "gpus", tuple(str(g).strip() for g in self.gpus))
        if any(not g or not set(g) <= set("0123456789") for g in self.gpus):
            problems.append(f"--gpus takes device numbers (0,1,...), not {','.join(self.gpus)}")
        if len(set(self.gpus)) != len(self.gpus):
            problems.append("--gpus names one device twice")
        if isinstance(self.nproc_per_run, bool) or not 1 <= self.nproc_per_run <= 1024:
            problems.append(f"--nproc-per-run must be at least 1, not {self.nproc_per_run}")
        elif self.gpus and len(self.gpus) % self.nproc_per_run:
            problems.append(f"--gpus lists {len(self.gpus)} devices, not a multiple of "
                            f"--nproc-per-run {self.nproc_per_run}")  # fmt: skip
        if self.metric not in METRICS:
            problems.append(f"--metric must be one of {', '.join(METRICS)}, not {self.metric!r}")
        if self.answer_regex is not None:
            try:
                user_regex(self.answer_regex, "--answer-regex")
            except ValueError as exc:
                problems.append(str(exc))
        if isinstance(self.max_new_tokens, bool) or not 1 <= self.max_new_tokens <= 4096:
            problems.append(f"--max-new-tokens must lie in 1..4096, not {self.max_new_tokens}")
        if problems:
            raise OptionError("; ".join(problems))

    @property
    def grid_lrs(self) -> tuple[float, ...]:
        return self.lrs if self.lrs is not None else default_lrs(self.finetune.lr)

    @property
    def device_groups(self) -> list[str | None]:
        """CUDA_VISIBLE_DEVICES of each run slot: groups of ``nproc_per_run`` of ``gpus``, or
        one slot that changes nothing."""
        if not self.gpus:
            return [None]
        k = self.nproc_per_run
        return [",".join(self.gpus[i : i + k]) for i in range(0, len(self.gpus), k)]

    @property
    def seed_list(self) -> tuple[int, ...]:
        return tuple(range(1, self.seeds + 1))

    @property
    def arm_names(self) -> tuple[str, ...]:
        return (*self.arms, *self.plans)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (the record every run and the summary carry)."""
        data = asdict(self)
        data["plans"] = {k: os.fspath(v) for k, v in self.plans.items()}
        data["lrs"] = list(self.grid_lrs)
        data["finetune"]["report_to"] = list(self.finetune.report_to)
        if self.lrs is not None:  # each run trains at its grid rate: --lr played no part
            data["finetune"]["lr"] = None
        return data
