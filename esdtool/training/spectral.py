"""Watch a LoRA adapter's spectra while it trains, from any transformers Trainer.

:class:`SpectralCallback` reads, every N optimizer steps, the updates s B A of the active
adapter of the PEFT model being trained, in memory, by the r x r route the read-back of a saved
adapter uses (``esdtool.analyze(model, weights="adapter")``: thin QRs of the factors, no copy
of any base weight), and logs per module its effective rank, the share of its planned rank that
is used, lambda_max and its stable rank. At the end of training it writes
``spectra_trajectory.parquet``: the adapter table's rows at every measured step, with a
``step`` column (``esdtool compare`` and ``esdtool report --trajectory`` draw it).

Only the main process measures and writes (under torchrun every process holds the same
adapter). LoRA parameters sharded by DeepSpeed ZeRO-3 or FSDP are refused in one line: each
process holds a slice of the factors, and the spectrum of a slice is not the adapter's.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any

from esdtool.errors import EsdtoolError, OptionError
from esdtool.extras import require

require("esdtool.SpectralCallback", "transformers")

from transformers import TrainerCallback  # noqa: E402

from esdtool.io.trajectory import TRAJECTORY_NAME, write_trajectory  # noqa: E402

__all__ = ["SpectralCallback", "check_model", "rank_share", "scalars"]

# Per-module metrics logged at each measured step (the trajectory keeps every column).
LOGGED = ("effective_rank", "rank_share", "lambda_max", "stable_rank")


def rank_share(effective_rank: float, lora_rank: float, m: float) -> float:
    """The share of a module's usable planned rank its update uses: effective rank over
    min(r, M) (a rank above min(rows, cols) adds nothing)."""
    usable = min(lora_rank, m)
    return effective_rank / usable if usable > 0 else math.nan


class SpectralCallback(TrainerCallback):
    """Every ``every`` steps (and at the step training starts from, 0 or a resumed
    checkpoint's, and the step it ends at, early stopping included), the spectra of the adapter's
    updates, logged as ``spectral/<module>/<metric>`` for the metrics in :data:`LOGGED`, with
    ``spectral/rank_used`` and ``spectral/rank_share`` over all modules. At the end of training
    the rows of every measured step go to ``spectra_trajectory.parquet`` in ``output_dir``
    (default: the Trainer's output directory); :attr:`trajectory` holds them as (step, table).

    Pass it to any Trainer (``callbacks=[...]`` or ``trainer.add_callback``): the trajectory
    and :attr:`latest` are kept either way. transformers calls the reporting callbacks
    (TensorBoard, W&B, MLflow) before the ones a user adds, so for the scalars to reach them
    too, add it with :meth:`attach`, which puts it first.

    ``modules=False`` logs only the totals (a model with thousands of adapted modules).
    ``settings``: the :class:`~esdtool.AnalyzeSettings` of each measurement (the defaults are
    those of ``esdtool analyze``).
    """

    def __init__(
        self,
        every: int = 50,
        output_dir: str | os.PathLike[str] | None = None,
        *,
        modules: bool = True,
        settings: Any = None,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise OptionError(f"SpectralCallback(every=...) must be an integer >= 1, not {every!r}")
        self.every = every
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.modules = modules
        self.settings = settings
        self.trajectory: list[tuple[int, Any]] = []
        self.latest: dict[str, float] = {}
        self.output: Path | None = None
        self.error: str | None = None  # why the trajectory could not be written
        self._pending: dict[str, float] = {}

    def attach(self, trainer: Any) -> SpectralCallback:
        """Add this callback to ``trainer`` ahead of the reporting callbacks; returns it."""
        from esdtool.training.monitor import put_first

        return put_first(trainer, self)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model = kwargs.get("model")
        check_model(model)
        self.trajectory, self._pending, self.output = [], {}, None
        # Where training starts: step 0 (B is zero: nothing of the rank is used yet), or the
        # checkpoint resumed from (the Trainer has loaded its weights by now).
        self._measure(model, state, int(state.global_step))
        self._pending = {}  # kept in the trajectory; the first log is the next step's

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        step = int(state.global_step)
        if step % self.every == 0 or step >= state.max_steps:
            self._measure(kwargs.get("model"), state, step)
            control.should_log = True  # the scalars go out with this step's log
        return control

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if logs is not None and self._pending and "loss" in logs:
            logs.update(self._pending)
            self._pending = {}

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not self.trajectory:
            return
        # Training stopped before max_steps (early stopping): the adapter as it ends is measured.
        self._measure(kwargs.get("model"), state, int(state.global_step))
        directory = self.output_dir or Path(args.output_dir)
        metadata = dict(self.trajectory[0][1].attrs.get("esdtool", {}))
        metadata["trajectory_every"] = self.every
        try:
            directory.mkdir(parents=True, exist_ok=True)
            self.output = write_trajectory(self.trajectory, directory / TRAJECTORY_NAME, metadata)
        except (OSError, EsdtoolError) as exc:  # a full disk must not cost the trained adapter
            self.error = f"{directory / TRAJECTORY_NAME}: not written ({exc})"
            warnings.warn(f"esdtool.SpectralCallback: {self.error}", stacklevel=1)

    def _measure(self, model: Any, state: Any, step: int) -> None:
        if not state.is_world_process_zero:
            return
        if self.trajectory and self.trajectory[-1][0] == step:
            return  # already measured (a step that is both a multiple and the last)
        from esdtool.analysis import analyze

        table = analyze(model, settings=self.settings, weights="adapter").table
        self.trajectory.append((step, table))
        self.latest = scalars(table, modules=self.modules)
        self._pending = dict(self.latest)


def scalars(table: Any, *, modules: bool = True) -> dict[str, float]:
    """The logged numbers of one adapter table: per LoRA module (named without PEFT's
    ``base_model.model.`` prefix) the metrics of :data:`LOGGED`, and over all of them
    ``spectral/rank_used`` (the sum of effective ranks) and ``spectral/rank_share`` (that sum
    over the sum of min(r, M))."""
    found: dict[str, float] = {}
    used = usable = 0.0
    updates = table[table["lora_rank"].notna() & table["status"].isin(["ok", "zero"])]
    for row in updates.itertuples(index=False):
        effective = 0.0 if row.status == "zero" else float(row.effective_rank)
        used += effective
        usable += min(float(row.lora_rank), float(row.M))
        if not modules:
            continue
        name = str(row.module).removeprefix("base_model.model.")
        values = {
            "effective_rank": effective,
            "rank_share": rank_share(effective, float(row.lora_rank), float(row.M)),
            "lambda_max": 0.0 if row.status == "zero" else float(row.lambda_max),
            "stable_rank": 0.0 if row.status == "zero" else float(row.stable_rank),
        }
        found.update({f"spectral/{name}/{k}": v for k, v in values.items()})
    found["spectral/rank_used"] = used
    found["spectral/rank_share"] = used / usable if usable else math.nan
    return found


def check_model(model: Any) -> None:
    """A PEFT model whose LoRA factors each process holds whole; else one line saying why not."""
    if model is None or not (hasattr(model, "peft_config") and hasattr(model, "get_base_model")):
        raise OptionError(
            f"SpectralCallback watches a PEFT model's LoRA adapter; the Trainer trains a "
            f"{type(model).__name__}",
            hint="train a model from peft.get_peft_model(model, LoraConfig(...))",
        )
    for name, param in model.named_parameters():
        if "lora_" not in name:
            continue
        sharded = hasattr(param, "ds_id") or hasattr(param, "ds_numel")  # DeepSpeed ZeRO-3
        sharded = sharded or type(param).__name__ in ("FlatParameter", "DTensor")  # FSDP 1/2
        sharded = sharded or type(getattr(param, "data", None)).__name__ == "DTensor"
        if sharded:
            _refuse_sharded(f"{name} is a {type(param).__name__}")
    # FSDP 1 (the Trainer hands callbacks the wrapped model) keeps plain parameters, slices of
    # a flat one, and its state dict is a collective the main process alone would wait on.
    for module in model.modules():
        if any(c.__name__ == "FullyShardedDataParallel" for c in type(module).__mro__):
            _refuse_sharded(f"the model is wrapped in {type(module).__name__}")


def _refuse_sharded(why: str) -> None:
    raise OptionError(
        f"SpectralCallback: the LoRA parameters are sharded ({why}); under DeepSpeed ZeRO-3 or "
        "FSDP each process holds a slice of the factors, which is not supported",
        hint="train with DDP (torchrun, accelerate launch without ZeRO-3/FSDP), or "
        "read the saved adapter afterwards: esdtool analyze OUTPUT_DIR",
    )
