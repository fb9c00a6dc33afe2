"""System metrics logged with the loss: what a run costs while it trains.

:class:`SystemMonitorCallback` is a transformers ``TrainerCallback``. At each logging step it
adds to the Trainer's logs (so TensorBoard, W&B and MLflow receive them beside the loss) the
process's CPU share and resident memory (psutil), tokens and samples per second since the last
log, and per GPU its utilisation, memory used, temperature and power (NVML, through
nvidia-ml-py, where present) and the allocator's peak on this process's device (torch). On a
machine without a GPU no GPU key is logged. At the end of training :attr:`summary` holds the
run's :class:`SystemSummary`.

transformers calls the reporting callbacks before the ones a user adds: for the metrics to
reach them, the callback must come first (:meth:`SystemMonitorCallback.attach`;
``esdtool finetune`` does it).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from esdtool.extras import require

require("esdtool.SystemMonitorCallback", "transformers")

from transformers import TrainerCallback  # noqa: E402

__all__ = ["SystemMonitorCallback", "SystemSummary", "put_first"]

_GB = 1024**3


@dataclass(frozen=True)
class SystemSummary:
    """What a training run cost.

    wall_seconds: from the first training step's start to the end of training.
    peak_memory_gb: the CUDA allocator's peak on this process's device, or without a GPU the
        process's peak resident memory (``peak_memory_kind`` says which).
    tokens / tokens_per_second: input tokens the Trainer counted (padding excluded where
        transformers can, see ``include_num_input_tokens_seen``) over the wall time; None when
        the Trainer does not count tokens.
    samples_per_second: optimizer steps x per-device batch x accumulation x processes, over
        the wall time.
    gpu_utilization_mean: the mean over logging steps and GPUs of NVML's utilisation (%); None
        without a GPU or without nvidia-ml-py.
    evaluations / eval_seconds: evaluations run during training and their time (the Trainer's
        eval_runtime), part of the wall time.
    """

    wall_seconds: float
    peak_memory_gb: float | None
    peak_memory_kind: str
    steps: int
    tokens: int | None
    tokens_per_second: float | None
    samples_per_second: float | None
    gpu_utilization_mean: float | None
    gpus: int
    evaluations: int = 0
    eval_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; GPU fields are left out on a machine without a GPU."""
        data = asdict(self)
        if not self.gpus:
            data.pop("gpu_utilization_mean")
            data.pop("gpus")
        return data


def put_first(trainer: Any, callback: Any) -> Any:
    """Add ``callback`` to ``trainer`` ahead of every other callback (the reporting ones
    included), so what it adds to the logs reaches TensorBoard, W&B or MLflow. Returns it.
    A callback the trainer already holds (``callbacks=[...]`` and then ``attach``) is moved,
    not added twice: twice, its every reading would be taken again a moment later (CPU share
    over no time at all) and overwrite the first."""
    callbacks = trainer.callback_handler.callbacks
    if any(c is callback for c in callbacks):
        callbacks[:] = [c for c in callbacks if c is not callback]
    callbacks.insert(0, callback)
    return callback


class _Nvml:
    """NVML's readings per GPU, or nothing where nvidia-ml-py or a driver is missing."""

    def __init__(self) -> None:
        self.handles: list[Any] = []
        try:
            import pynvml  # nvidia-ml-py
        except ImportError:
            return
        try:
            pynvml.nvmlInit()
            self.handles = [
                pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())
            ]
        except Exception:  # no driver, no device: NVMLError's many subclasses
            self.handles = []
            return
        self.nvml = pynvml

    def read(self) -> dict[str, float]:
        """``gpu{i}/utilization`` (%), ``memory_used_gb``, ``temperature_c``, ``power_w``: what
        each device reports (a reading a device does not support is left out)."""
        found: dict[str, float] = {}
        nvml = getattr(self, "nvml", None)
        for i, handle in enumerate(self.handles):
            readings = {
                "utilization": lambda h: nvml.nvmlDeviceGetUtilizationRates(h).gpu,
                "memory_used_gb": lambda h: nvml.nvmlDeviceGetMemoryInfo(h).used / _GB,
                "temperature_c": lambda h: nvml.nvmlDeviceGetTemperature(
                    h, nvml.NVML_TEMPERATURE_GPU
                ),
                "power_w": lambda h: nvml.nvmlDeviceGetPowerUsage(h) / 1000.0,
            }
            for key, read in readings.items():
                try:
                    found[f"gpu{i}/{key}"] = float(read(handle))
                except Exception:  # NVMLError_NotSupported and kin
                    continue
        return found

    def close(self) -> None:
        if self.handles:
            with contextlib.suppress(Exception):  # a driver gone away: nothing to release
                self.nvml.nvmlShutdown()
            self.handles = []


def _peak_rss_gb() -> float | None:
    """The process's peak resident memory (getrusage: KiB on Linux, bytes on macOS)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / _GB if sys.platform == "darwin" else peak * 1024 / _GB


class SystemMonitorCallback(TrainerCallback):
    """Log system metrics with the loss at each logging step (the main process only); keys:

    ``system/cpu_percent`` (this process, 100 per busy core), ``system/rss_gb``,
    ``system/tokens_per_second`` and ``system/samples_per_second`` (since the last log),
    ``system/gpu{i}/utilization|memory_used_gb|temperature_c|power_w`` per GPU (NVML) and
    ``system/peak_allocated_gb`` (the CUDA allocator's peak on this process's device).
    """

    def __init__(self) -> None:
        self.summary: SystemSummary | None = None
        self._nvml: _Nvml | None = None
        self._process: Any = None
        self._gpu_samples: list[float] = []

    def attach(self, trainer: Any) -> SystemMonitorCallback:
        """Add this callback to ``trainer`` ahead of the reporting callbacks; returns it."""
        return put_first(trainer, self)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._gpu_samples = []
        self.summary = None
        try:
            import psutil

            self._process = psutil.Process()
            self._process.cpu_percent(None)  # the first call starts the interval
        except ImportError:
            self._process = None
        if state.is_world_process_zero:
            self._nvml = _Nvml()
        self._start = self._last = time.perf_counter()
        self._start_step = self._last_step = int(state.global_step)
        self._start_tokens = self._last_tokens = int(state.num_input_tokens_seen or 0)
        self._evaluations, self._eval_seconds = 0, 0.0

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any
    ) -> None:
        runtime = (metrics or {}).get("eval_runtime")
        if isinstance(runtime, int | float) and math.isfinite(runtime):
            self._evaluations += 1
            self._eval_seconds += float(runtime)

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if logs is None or "loss" not in logs or not state.is_world_process_zero:
            return  # evaluation logs and the end-of-training summary carry no step's cost
        logs.update({f"system/{k}": v for k, v in self.read(args, state).items()})

    def read(self, args: Any, state: Any) -> dict[str, float]:
        """The readings now, rates over the time since the last call."""
        now = time.perf_counter()
        seconds = now - self._last
        readings: dict[str, float] = {}
        if self._process is not None:
            readings["cpu_percent"] = float(self._process.cpu_percent(None))
            readings["rss_gb"] = self._process.memory_info().rss / _GB
        steps = int(state.global_step) - self._last_step
        tokens = int(state.num_input_tokens_seen or 0) - self._last_tokens
        if seconds > 0 and steps > 0:
            readings["samples_per_second"] = steps * _samples_per_step(args) / seconds
            if _counts_tokens(args):
                readings["tokens_per_second"] = tokens / seconds
        self._last, self._last_step = now, int(state.global_step)
        self._last_tokens = int(state.num_input_tokens_seen or 0)
        if self._nvml is not None:
            gpus = self._nvml.read()
            readings.update(gpus)
            self._gpu_samples += [v for k, v in gpus.items() if k.endswith("/utilization")]
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            readings["peak_allocated_gb"] = torch.cuda.max_memory_allocated() / _GB
        return readings

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        import torch

        seconds = time.perf_counter() - self._start
        steps = int(state.global_step) - self._start_step
        tokens = int(state.num_input_tokens_seen or 0) - self._start_tokens
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            peak, kind = torch.cuda.max_memory_allocated() / _GB, "cuda allocator"
        else:
            peak, kind = _peak_rss_gb(), "process peak RSS"
        counted = _counts_tokens(args)
        gpus = len(self._nvml.handles) if self._nvml is not None else 0
        self.summary = SystemSummary(
            wall_seconds=seconds,
            peak_memory_gb=peak,
            peak_memory_kind=kind,
            steps=steps,
            tokens=tokens if counted else None,
            tokens_per_second=tokens / seconds if counted and seconds > 0 else None,
            samples_per_second=steps * _samples_per_step(args) / seconds if seconds > 0 else None,
            gpu_utilization_mean=(
                math.fsum(self._gpu_samples) / len(self._gpu_samples) if self._gpu_samples else None
            ),
            gpus=gpus,
            evaluations=self._evaluations,
            eval_seconds=self._eval_seconds,
        )
        if self._nvml is not None:
            self._nvml.close()


def _samples_per_step(args: Any) -> int:
    world = max(1, int(getattr(args, "world_size", 1) or 1))
    return int(args.per_device_train_batch_size) * int(args.gradient_accumulation_steps) * world


def _counts_tokens(args: Any) -> bool:
    return getattr(args, "include_num_input_tokens_seen", "no") not in ("no", False, None)
