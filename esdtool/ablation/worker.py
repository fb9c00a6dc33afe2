"""One run of an ablation grid, in a process of its own (``python -m esdtool.ablation.worker
SPEC``): a crash, an out-of-memory kill or a NaN loss ends this run only.

SPEC is a JSON file the grid wrote (:func:`esdtool.ablation.grid.run_spec`). The run trains
with :func:`esdtool.finetune` and writes its result, laid out as PEFT's method-comparison
results (``run_info``, ``train_info``, ``meta_info``) plus an ``esdtool`` block, atomically to
the spec's ``result`` path. Nothing is printed; the exit status is 0 when a result was written.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from esdtool.errors import EsdtoolError


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Train the run ``spec`` describes; its result record (status ok or failed)."""
    from esdtool.training import FinetuneSettings, finetune

    started, created = time.perf_counter(), datetime.now(UTC).isoformat(timespec="seconds")
    settings = FinetuneSettings(**{**spec["finetune"], "report_to": ()})
    outcome: dict[str, Any] = {"status": "failed", "reason": None}
    result = None
    extra: dict[str, float | None] = {}
    expected = spec.get("code")
    if expected is not None and expected != code_fingerprint():
        outcome["reason"] = (
            "esdtool's code changed since the grid started (its source fingerprint differs): "
            "runs of two versions would be mixed; re-run the command once the code is settled "
            "(--retry-failed runs this one again)"
        )
        return record(spec, None, outcome, created, 0.0)
    try:
        result = finetune(
            spec["model"], spec["plan_dir"], spec["data"], spec["run_dir"], settings,
            eval_data=spec["eval_data"], test_data=spec.get("test_data"),
            revision=spec.get("revision"), progress=False, adapter_report=False,
        )  # fmt: skip
        outcome = {"status": "ok", "reason": _nonfinite(result)}
        if outcome["reason"] is not None:
            outcome["status"] = "failed"
        else:
            extra = scores(spec)
    except EsdtoolError as exc:
        outcome["reason"] = str(exc)
    except Exception as exc:  # a crash inside the stack: this run's, not the grid's
        last = traceback.extract_tb(exc.__traceback__)[-1:]
        where = f" at {Path(last[0].filename).name}:{last[0].lineno}" if last else ""
        outcome["reason"] = f"{type(exc).__name__}: {exc}{where}"
    return record(spec, result, outcome, created, time.perf_counter() - started, extra)


def code_fingerprint() -> str:
    """sha256 over esdtool's own source files and templates, as this process imports them: a
    grid's runs must all come from one version of the code."""
    import hashlib
    from importlib import resources

    import esdtool

    digest = hashlib.sha256()
    roots = [Path(esdtool.__file__).parent, Path(str(resources.files("esdtool.templates")))]
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.suffix in (".py", ".j2", ".css", ".js") and path.is_file():
                digest.update(path.relative_to(root).as_posix().encode() + b"\0")
                digest.update(path.read_bytes())
    return digest.hexdigest()


def scores(spec: dict[str, Any]) -> dict[str, float | None]:
    """What the run's saved adapter scores beyond the loss: exact match on the eval (and
    test) records with --metric exact-match, forgetting with --forgetting-data."""
    wanted = spec["metric"] == "exact-match" or spec.get("forgetting_data")
    if not wanted or int(os.environ.get("RANK", "0")) != 0:
        return {}  # under torchrun only the first process scores (its result is the run's)
    import peft
    import transformers

    from esdtool.io.source import TOKENIZER_PATTERNS, resolve_source
    from esdtool.training.data import load_training_data
    from esdtool.training.evaluate import exact_match, forgetting, prompts_and_answers

    model_dir = resolve_source(spec["model"], spec.get("revision"),
                               also=TOKENIZER_PATTERNS).files[0].parent  # fmt: skip
    tokenizer = transformers.AutoTokenizer.from_pretrained(spec["run_dir"])
    base = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), use_safetensors=True)
    model = peft.PeftModel.from_pretrained(base, spec["run_dir"])
    found: dict[str, float | None] = {}
    if spec["metric"] == "exact-match":
        for split in ("eval", "test"):
            path = spec.get(f"{split}_data")
            if path is None:
                continue
            pairs = prompts_and_answers(load_training_data(path)[0], tokenizer)
            found[f"{split}_exact_match"] = exact_match(
                model, tokenizer, pairs, max_new_tokens=spec["max_new_tokens"],
                answer_regex=spec.get("answer_regex"),
            ).score  # fmt: skip
    if spec.get("forgetting_data"):
        records = load_training_data(spec["forgetting_data"])[0]
        texts = [r["text"] if "text" in r else f"{r['prompt']}{r['completion']}"
                 for r in records]  # fmt: skip
        found["forgetting"] = forgetting(model, tokenizer, texts,
                                         spec["finetune"]["max_length"])  # fmt: skip
    return found


def _nonfinite(result: Any) -> str | None:
    """Why a finished run's numbers cannot be compared (a loss that went NaN or infinite)."""
    for step, loss in result.losses:
        if not math.isfinite(loss):
            return f"the training loss is {loss} at step {step}"
    for name in ("eval_loss", "test_loss", "final_loss"):
        value = getattr(result, name)
        if value is not None and not math.isfinite(value):
            return f"the {name.replace('_', ' ')} is {value}"
    return None


def record(
    spec: dict[str, Any],
    result: Any,
    outcome: dict[str, Any],
    created: str,
    seconds: float,
    extra: dict[str, float | None] | None = None,
) -> dict[str, Any]:
    """The run's result in PEFT's method-comparison layout, with esdtool's own block."""
    system = (result.system or {}) if result is not None else {}
    adapter = Path(spec["run_dir"]) / "adapter_model.safetensors"
    size = adapter.stat().st_size if result is not None and adapter.is_file() else None
    rank_use = result.rank_use if result is not None else None
    metrics = {
        "eval_loss": result.eval_loss if result is not None else None,
        "test_loss": result.test_loss if result is not None else None,
        "final_train_loss": result.final_loss if result is not None else None,
        "eval_exact_match": None, "test_exact_match": None, "forgetting": None,
        **(extra or {}),
    }  # fmt: skip
    devices = {
        "esdtool_code": spec.get("code"),
        "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
    }
    return {
        "run_info": {
            "created_at": created,
            "total_time": seconds,
            "experiment_name": spec["experiment_name"],
            "train_config": spec["finetune"],
            "peft_config": spec["peft_config"],
            "error_msg": outcome["reason"] or "",
        },
        "train_info": {
            "accelerator_memory_max": (
                int(system["peak_memory_gb"] * 2**30)
                if system.get("peak_memory_kind") == "cuda allocator"
                else None
            ),
            "peak_rss_bytes": (
                int(system["peak_memory_gb"] * 2**30)
                if system.get("peak_memory_kind") == "process peak RSS"
                else None
            ),
            "train_time": system.get("wall_seconds"),
            "evaluations": system.get("evaluations"),
            "eval_time": system.get("eval_seconds"),
            "tokens_per_second": system.get("tokens_per_second"),
            "file_size": size,
            "num_trainable_params": result.trainable_params if result is not None else None,
            "num_total_params": result.total_params if result is not None else None,
            "status": "success" if outcome["status"] == "ok" else "failed",
            "metrics": [metrics],
        },
        "meta_info": {**spec["meta_info"], "devices": devices},
        "esdtool": {
            "arm": spec["arm"], "lr": spec["lr"], "seed": spec["seed"],
            "status": outcome["status"], "reason": outcome["reason"], **metrics,
            "steps": result.steps if result is not None else None,
            "rank_use": list(rank_use) if rank_use is not None else None,
        },
    }  # fmt: skip


def main(argv: list[str]) -> int:
    from esdtool.io.atomic import atomic_write

    spec = json.loads(Path(argv[0]).read_text())
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result = run(spec)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun the first process writes the result
    text = json.dumps(result, indent=2, default=str) + "\n"
    atomic_write(Path(spec["result"]), lambda tmp: tmp.write_text(text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
