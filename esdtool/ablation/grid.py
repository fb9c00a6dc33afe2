"""The grid of an ablation: one run per (arm, learning rate, seed), where each one lives on disk,
which of them a shard runs, and running one in a process of its own.

Layout under the output directory: ``runs/<arm>/lr<LR>/seed<S>/`` is the run's finetune
directory, ``runs/<arm>/lr<LR>/seed<S>.json`` its result (written last, atomically: a run is
finished exactly when its result exists), ``seed<S>.log`` what the process printed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from esdtool.errors import OptionError
from esdtool.io.atomic import atomic_write

RESULT_STATUSES = ("ok", "failed")


@dataclass(frozen=True)
class Run:
    """One cell of the grid."""

    arm: str
    lr: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.arm}/lr{self.lr:g}/seed{self.seed}"

    def directory(self, root: Path) -> Path:
        return root / "runs" / self.arm / f"lr{self.lr:g}" / f"seed{self.seed}"

    def result_path(self, root: Path) -> Path:
        return self.directory(root).with_suffix(".json")

    def log_path(self, root: Path) -> Path:
        return self.directory(root).with_suffix(".log")


def grid(arms: tuple[str, ...], lrs: tuple[float, ...], seeds: tuple[int, ...]) -> list[Run]:
    """Every run, in a fixed order: arm, then learning rate, then seed."""
    return [Run(arm, lr, seed) for arm in arms for lr in lrs for seed in seeds]


def parse_shard(text: str | None, environ: dict[str, str] | None = None) -> tuple[int, int]:
    """``I/N`` (1 <= I <= N), else Slurm's array variables when set, else the whole grid
    (1/1). SLURM_ARRAY_TASK_ID counts from SLURM_ARRAY_TASK_MIN (0 unless set)."""
    env = os.environ if environ is None else environ
    if text is None and "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        try:
            first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
            index = int(env["SLURM_ARRAY_TASK_ID"]) - first + 1
            count = int(env["SLURM_ARRAY_TASK_COUNT"])
        except ValueError as exc:
            raise OptionError(f"SLURM_ARRAY_TASK_ID/COUNT are not integers ({exc})") from exc
        text = f"{index}/{count}"
    if text is None:
        return 1, 1
    parts = text.split("/")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise OptionError(f"--shard takes I/N (e.g. 2/4), not {text!r}")
    index, count = int(parts[0]), int(parts[1])
    if not 1 <= index <= count:
        raise OptionError(f"--shard {text}: I must lie in 1..N")
    return index, count


def shard(runs: list[Run], index: int, count: int) -> list[Run]:
    """The runs shard ``index`` of ``count`` takes: every count-th, from the index-th. Shards
    are disjoint and together hold every run."""
    return runs[index - 1 :: count]


def read_result(path: Path) -> dict[str, Any] | None:
    """A finished run's result, or None when there is none (or it cannot be read: the run is
    then run again)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    block = data.get("esdtool") if isinstance(data, dict) else None
    if not isinstance(block, dict) or block.get("status") not in RESULT_STATUSES:
        return None
    if not (isinstance(block.get("arm"), str) and type(block.get("seed")) is int
            and isinstance(block.get("lr"), int | float)):  # fmt: skip
        return None  # not a result esdtool wrote: the run is run again
    if not all(isinstance(data.get(k, {}), dict) for k in ("run_info", "train_info")):
        return None
    return data


def run_spec(run: Run, root: Path, common: dict[str, Any]) -> dict[str, Any]:
    """What the worker needs for ``run``: the shared part plus the run's own."""
    return {
        **common,
        "arm": run.arm, "lr": run.lr, "seed": run.seed,
        "plan_dir": str(root / "arms" / run.arm),
        "run_dir": str(run.directory(root)),
        "result": str(run.result_path(root)),
        "experiment_name": f"esdtool-ablate/{run.name}",
        "peft_config": json.loads((root / "arms" / run.arm / "adapter_config.json").read_text()),
        "finetune": {**common["finetune"], "lr": run.lr, "seed": run.seed},
    }  # fmt: skip


def execute(
    run: Run,
    root: Path,
    common: dict[str, Any],
    *,
    environ: dict[str, str] | None = None,
    started: Callable[[subprocess.Popen[bytes]], None] | None = None,
    nproc: int = 1,
) -> dict[str, Any]:
    """Run ``run`` in a new process (its earlier, unfinished directory cleared first) and
    return its result; a process that died without one gets a failed result naming how.
    ``nproc`` > 1: the run trains under torchrun with that many processes (DDP; the first
    writes the result). ``environ``: the process's extra environment (CUDA_VISIBLE_DEVICES)."""
    directory = run.directory(root)
    if directory.exists():
        shutil.rmtree(directory)  # an unfinished run of ours: start it over
    directory.parent.mkdir(parents=True, exist_ok=True)
    spec = run_spec(run, root, common)
    spec_path = directory.with_suffix(".spec.json")
    text = json.dumps(spec, indent=2, default=str) + "\n"
    atomic_write(spec_path, lambda tmp: tmp.write_text(text))
    env = {**os.environ, **(environ or {}), "TOKENIZERS_PARALLELISM": "false"}
    with open(run.log_path(root), "wb") as log:
        launcher = [sys.executable]
        if nproc > 1:  # torchrun's own free port (--standalone): runs in parallel never clash
            launcher += ["-m", "torch.distributed.run", "--standalone",
                         "--nproc-per-node", str(nproc)]  # fmt: skip
        process = subprocess.Popen(
            [*launcher, "-m", "esdtool.ablation.worker", str(spec_path)],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
        if started is not None:
            started(process)
        try:
            code = process.wait()
        except BaseException:  # Ctrl-C, SIGTERM (as KeyboardInterrupt): no orphan keeps training
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            raise
    found = read_result(run.result_path(root))
    if found is not None:
        return found
    from esdtool.ablation.worker import record

    tail = _tail(run.log_path(root))
    how = f"killed by signal {-code}" if code < 0 else f"exited with status {code}"
    reason = f"the run's process {how} without a result" + (f" ({tail})" if tail else "")
    failed = record(spec, None, {"status": "failed", "reason": reason}, "", 0.0)
    out = json.dumps(failed, indent=2, default=str) + "\n"
    atomic_write(run.result_path(root), lambda tmp: tmp.write_text(out))
    return failed


def _tail(log: Path, limit: int = 300) -> str:
    """The last non-empty line of a run's log (why it died), cut to ``limit`` characters."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines()]
    except OSError:
        return ""
    lines = [line for line in lines if line]
    return lines[-1][:limit] if lines else ""
