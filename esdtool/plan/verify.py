"""Checking a LoRA plan against a model with PEFT's own matching: the one checker that
``allocate --verify`` and ``finetune`` both use.

:func:`plan_problems` compares a PEFT-wrapped model (weights loaded or on the meta device) with
the plan directory: every planned module must get an adapter with exactly its planned r and
lora_alpha and the shape allocation.csv recorded, matched by exactly one rank_pattern key, and
no other module may get one. :func:`verify_plan` builds the model from its config.json on the
meta device (no weights, no memory) and runs that check, so a plan can be checked in seconds
before anything heavy is loaded.

:func:`read_plan` checks the plan files themselves first (both commands read them through it): a
hand-edited or damaged adapter_config.json or allocation.csv is refused with one line naming the
file and the entry, before PEFT or pandas meet a NaN, a fractional rank or a missing column.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from esdtool.errors import ModelLoadError, OptionError, PlanMismatchError
from esdtool.extras import require
from esdtool.plan.peft_config import CONFIG_NAME, CSV_NAME
from esdtool.untrusted import from_spreadsheet_cell, user_regex

# allocation.csv columns the checks use, and how each cell must read.
PLAN_COLUMNS = ("module", "selected", "rank", "lora_alpha", "rows", "cols")
_WHOLE = re.compile(r"[0-9]{1,18}")


def read_plan(plan_dir: Path) -> tuple[dict[str, Any], pd.DataFrame | None]:
    """The plan in ``plan_dir``, checked: (adapter_config.json as a dict, allocation.csv as a
    table with the :data:`PLAN_COLUMNS` typed, or None when there is no CSV).

    Raises :class:`OptionError` naming the file and the entry for anything PEFT or the checks
    would choke on or silently misuse: not JSON, r or a rank_pattern value that is not a
    positive whole number, lora_alpha or an alpha_pattern value that is not a positive finite
    number (JSON allows NaN), a pattern that is not a regex; a CSV that is empty or unparsable,
    lacks a column, or holds a rank, size or alpha that does not read as one.
    """
    plan_dir = Path(plan_dir)
    config = _read_config(plan_dir / CONFIG_NAME)
    csv = plan_dir / CSV_NAME
    return config, (_read_allocation(csv) if csv.is_file() else None)


def _is_whole(value: object) -> bool:
    return type(value) is int and value > 0


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_positive(value: object) -> bool:
    return _is_number(value) and 0 < value < math.inf  # type: ignore[operator]


def _read_config(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: not UTF-8, not JSON
        raise OptionError(f"{path}: not a readable JSON file ({exc})") from exc
    except RecursionError as exc:
        raise OptionError(f"{path}: not a readable JSON file (nested too deeply)") from exc
    if not isinstance(raw, dict):
        raise OptionError(f"{path}: not a JSON object")
    if "r" in raw and not _is_whole(raw["r"]):
        raise OptionError(f"{path}: r = {_short(raw['r'])} is not a positive whole number")
    if "lora_alpha" in raw and not _is_positive(raw["lora_alpha"]):
        raise OptionError(
            f"{path}: lora_alpha = {_short(raw['lora_alpha'])} is not a positive finite number"
        )
    dropout = raw.get("lora_dropout", 0.0)
    if not (_is_number(dropout) and 0 <= dropout < 1):
        raise OptionError(f"{path}: lora_dropout = {_short(dropout)} does not lie in [0, 1)")
    for field, ok, want in (
        ("rank_pattern", _is_whole, "a positive whole number"),
        ("alpha_pattern", _is_positive, "a positive finite number"),
    ):
        pattern = raw.get(field) or {}
        if not isinstance(pattern, dict):
            raise OptionError(f"{path}: {field} is not a JSON object")
        for key, value in pattern.items():
            if not ok(value):
                raise OptionError(f"{path}: {field}[{_short(key)}] = {_short(value)} is not {want}")
            _require_regex(path, f"{field} key {_short(key)}", key)
    if isinstance(raw.get("target_modules"), str):
        _require_regex(path, "target_modules", raw["target_modules"])
    return raw


def _require_regex(path: Path, what: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise OptionError(f"{path}: {what} is not a regular expression ({exc})") from exc


def _read_allocation(path: Path) -> pd.DataFrame:
    try:
        text = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError as exc:
        raise OptionError(f"{path}: is empty", hint="re-run esdtool allocate") from exc
    except (OSError, ValueError) as exc:  # ParserError, UnicodeDecodeError are ValueErrors
        raise OptionError(f"{path}: not a readable CSV file ({exc})") from exc
    missing = [c for c in PLAN_COLUMNS if c not in text.columns]
    if missing:
        raise OptionError(
            f"{path}: missing column(s) {', '.join(missing)}", hint="re-run esdtool allocate"
        )
    if len(text) == 0:
        raise OptionError(f"{path}: has no rows", hint="re-run esdtool allocate")
    columns: dict[str, list[Any]] = {c: [] for c in PLAN_COLUMNS}
    for number, row in enumerate(text[list(PLAN_COLUMNS)].itertuples(index=False), start=1):
        module, selected, rank, alpha, rows, cols = row
        module = from_spreadsheet_cell(module)  # written spreadsheet-safe: a leading ' added
        at = f"{path}: row {number} ({_short(module)})"
        if not module:
            raise OptionError(f"{path}: row {number}: module is empty")
        if selected.lower() not in ("true", "false"):
            raise OptionError(f"{at}: selected = {_short(selected)} is not True or False")
        chosen = selected.lower() == "true"
        whole = {"rank": rank, "rows": rows, "cols": cols}
        for name, value in whole.items():
            if not _WHOLE.fullmatch(value):
                raise OptionError(f"{at}: {name} = {_short(value)} is not a whole number")
        try:
            alpha_value = float(alpha)
        except ValueError:
            alpha_value = math.nan
        if not (math.isfinite(alpha_value) and alpha_value >= 0):
            raise OptionError(f"{at}: lora_alpha = {_short(alpha)} is not a finite number >= 0")
        if chosen and (int(rank) == 0 or alpha_value == 0):
            raise OptionError(
                f"{at}: selected, but with rank {rank} and lora_alpha {alpha} (both must be > 0)"
            )
        if int(rows) == 0 or int(cols) == 0:
            raise OptionError(f"{at}: rows x cols = {rows}x{cols}, not a matrix")
        for name, value in (
            ("module", module), ("selected", chosen), ("rank", int(rank)),
            ("lora_alpha", alpha_value), ("rows", int(rows)), ("cols", int(cols)),
        ):  # fmt: skip
            columns[name].append(value)
    return pd.DataFrame(columns)


def _short(value: object, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters (hand-edited files can hold anything)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def build_meta_model(model_dir: Path) -> Any:
    """The model of ``model_dir``/config.json, instantiated on the meta device. transformers'
    own warnings are held back meanwhile (they would break allocate's one-line errors)."""
    transformers = require("checking a plan", "transformers", "peft")["transformers"]
    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(
            f"{model_dir}: no config.json beside the checkpoint, so the model cannot be built",
            hint="keep the model's config.json next to its safetensors files",
        )
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        return _meta_model(transformers, model_dir)
    finally:
        transformers.logging.set_verbosity(level)


def _meta_model(transformers: Any, model_dir: Path) -> Any:
    import torch

    try:
        config = transformers.AutoConfig.from_pretrained(str(model_dir))
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError...
        raise ModelLoadError(f"{model_dir}: cannot read its config.json ({exc})") from exc
    architectures = getattr(config, "architectures", None) or []
    cls = next(
        (getattr(transformers, a) for a in architectures if hasattr(transformers, a)),
        transformers.AutoModel,
    )
    try:
        with torch.device("meta"):
            return cls.from_config(config) if cls is transformers.AutoModel else cls(config)
    except Exception as exc:  # a config transformers cannot build (ValueError, KeyError, ...)
        raise ModelLoadError(
            f"{model_dir}: cannot build the model from its config.json ({exc})"
        ) from exc


def linear_modules(model: Any) -> list[tuple[str, str]]:
    """(module name, tensor name of its weight) of every ``nn.Linear`` and ``nn.Conv2d`` of
    ``model`` (subclasses too), in ``named_modules`` order: what Adaptive Rank LoRA adapts. A
    weight tied to another module's (a tied lm_head) is named by the tensor the checkpoint
    stores, the first name ``named_parameters`` gives it."""
    import torch

    stored = {id(p): name for name, p in model.named_parameters()}  # first name of each tensor
    return [
        (name, stored[id(module.weight)])
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d) and id(module.weight) in stored
    ]


def adapted_modules(peft_model: Any) -> dict[str, Any]:
    """The modules that got the default LoRA adapter, by their name in the base model."""
    return {
        name.removeprefix("base_model.model."): module
        for name, module in peft_model.named_modules()
        if hasattr(module, "lora_A") and "default" in module.lora_A
    }


def matches_key(key: str, name: str) -> bool:
    """PEFT's rule for a rank_pattern / alpha_pattern key: it matches the end of the module
    name at a dot boundary (our keys start with ^, so only the whole name), decided by
    esdtool's linear-time matcher (a key from a file never reaches a backtracking engine);
    a key RE2 cannot run matches nothing here (read_plan and apply_plan say why)."""
    from esdtool.adapters.config import key_matches

    try:
        return key_matches(key, name)
    except ValueError:
        return False


def _shape(module: Any) -> tuple[int, ...]:
    """(out, in) of an adapted layer: its features (also right for 4-bit packed weights), else
    its weight's shape (e.g. GPT-2's Conv1D)."""
    layer = getattr(module, "base_layer", module)
    if hasattr(layer, "in_features") and hasattr(layer, "out_features"):
        return (layer.out_features, layer.in_features)
    return tuple(getattr(getattr(layer, "weight", None), "shape", ()))


def plan_problems(peft_model: Any, plan_dir: Path) -> list[str]:
    """Every way ``peft_model`` departs from the plan in ``plan_dir`` (empty when exact).

    Every rank_pattern key must reach a module and give it its rank. With allocation.csv each
    kept module is also checked for presence, r, lora_alpha, shape and a unique key, and
    unplanned adapters are reported (a hand-written config without it: keys only).
    """
    raw, plan = read_plan(Path(plan_dir))
    adapted = adapted_modules(peft_model)
    rank_pattern: dict[str, int] = raw.get("rank_pattern") or {}
    problems: list[str] = []
    for key, rank in rank_pattern.items():  # every key must reach a module, with its rank
        hits = [n for n in adapted if matches_key(key, n)]
        if not hits:
            problems.append(f"{key}: planned, but no such module gets an adapter")
        for name in hits:
            if adapted[name].r["default"] != rank:
                problems.append(f"{name}: r = {adapted[name].r['default']}, planned {rank}")
    if plan is None:
        return problems  # a hand-written config: names and ranks were all it could say

    kept = plan[plan.selected]
    for row in kept.itertuples():
        if row.module not in adapted:
            problems.append(f"{row.module}: planned, but no such module gets an adapter")
            continue
        module = adapted[row.module]
        keys = [k for k in rank_pattern if matches_key(k, row.module)]
        if len(keys) != 1:
            problems.append(f"{row.module}: matched by {len(keys)} rank_pattern keys")
        if module.r["default"] != row.rank:
            problems.append(f"{row.module}: r = {module.r['default']}, planned {row.rank}")
        if module.lora_alpha["default"] != row.lora_alpha:
            problems.append(
                f"{row.module}: lora_alpha = {module.lora_alpha['default']}, "
                f"planned {row.lora_alpha}"
            )
        shape = _shape(module)
        if len(shape) == 2 and sorted(shape) != sorted((row.rows, row.cols)):
            problems.append(
                f"{row.module}: is {shape[0]}x{shape[1]}, planned {row.rows}x{row.cols} "
                "(a plan for another model)"
            )
    for name in sorted(set(adapted) - set(kept.module)):
        problems.append(f"{name}: gets an adapter but is not in the plan")
    return list(dict.fromkeys(problems))  # a rank wrong in both files is one problem


def literal_patterns(config: Any, names: list[str]) -> Any:
    """``config`` with every pattern PEFT would run through Python's backtracking ``re``
    replaced by the literal module names it reaches, found by esdtool's linear-time matcher
    (RE2, or character by character): a plan file's ``([\\w.]+)*X`` cannot hang PEFT. A
    target_modules string becomes the list of module names it fully matches; a rank_pattern /
    alpha_pattern key that is not a literal becomes one anchored literal key per module it
    matches, in its place (PEFT takes the first matching key). Literal keys are kept as they
    are, and so the plans esdtool writes keep their keys (their target regex, an alternation
    of escaped names, becomes its list of names)."""
    import copy

    from esdtool.adapters.config import is_literal, key_matches

    config = copy.copy(config)
    target = config.target_modules
    if isinstance(target, str) and not _literal_alternation(target):
        whole = user_regex(rf"^(?:{target})$", "target_modules")
        config.target_modules = [n for n in names if whole.search(n) is not None] or target
    for field in ("rank_pattern", "alpha_pattern"):
        resolved: dict[str, Any] = {}
        for key, value in (getattr(config, field) or {}).items():
            if is_literal(key):
                resolved.setdefault(key, value)
                continue
            for name in names:
                if key_matches(key, name):
                    resolved.setdefault("^" + re.escape(name) + "$", value)
        setattr(config, field, resolved)
    return config


def _literal_alternation(target: str) -> bool:
    """Whether ``target`` is the form esdtool's plans write, ``^(?:name|name|...)$`` of escaped
    literal names: linear for any regex engine, so it is handed to PEFT as it is (the saved
    adapter then holds the plan's own target, which resume compares)."""
    from esdtool.adapters.config import is_literal

    if not (target.startswith("^(?:") and target.endswith(")$")):
        return False
    parts = re.split(r"(?<!\\)\|", target[4:-2])
    return all(part and is_literal(part) and "(" not in part and ")" not in part
               for part in parts)  # fmt: skip


def apply_plan(model: Any, config: Any) -> Any:
    """``peft.get_peft_model(model, config)`` with the config's patterns made literal
    (:func:`literal_patterns`), PEFT's "no target module found" turned into a
    :class:`PlanMismatchError`."""
    peft = require("applying a plan", "transformers", "peft")["peft"]
    names = [name for name, _ in model.named_modules() if name]
    try:
        config = literal_patterns(config, names)
    except ValueError as exc:  # a pattern RE2 cannot run (back-references, look-arounds)
        raise PlanMismatchError(f"a pattern of the plan cannot be matched safely: {exc}") from exc
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        # The plan names the analysed model's path; applying it to another copy is the point.
        warnings.filterwarnings("ignore", message=".*base_model_name_or_path.*was renamed")
        try:
            return peft.get_peft_model(model, config)
        except ValueError as exc:  # PEFT: "Target modules ... not found in the base model"
            raise PlanMismatchError(
                "none of its target_modules exist in the model"
                if "not found" in str(exc)
                else str(exc)
            ) from exc


def verify_plan(plan_dir: Path, model_dir: Path) -> list[str]:
    """Problems found applying ``plan_dir``'s adapter_config.json to the model in ``model_dir``
    (empty when the plan applies exactly), checked on the meta device. Every problem is listed,
    not just the first."""
    peft = require("checking a plan", "transformers", "peft")["peft"]
    plan_dir = Path(plan_dir)
    if not (Path(model_dir) / "config.json").is_file():
        raise ModelLoadError(f"{model_dir}: no config.json to build the model from")
    read_plan(plan_dir)  # one line naming a bad entry, before PEFT reads the files
    config = peft.LoraConfig.from_pretrained(str(plan_dir))
    config.task_type = None  # matching does not depend on the task head; any model will do
    try:
        model = apply_plan(build_meta_model(Path(model_dir)), config)
    except PlanMismatchError as exc:
        return [str(exc)]
    return plan_problems(model, plan_dir)


def raise_problems(problems: list[str], plan_dir: Path, model: object) -> None:
    """Raise :class:`PlanMismatchError` listing every problem, if there is any."""
    if problems:
        raise PlanMismatchError(
            f"{Path(plan_dir) / CONFIG_NAME}: does not fit {model}: {len(problems)} problem(s): "
            + "; ".join(problems),
            hint="re-run esdtool analyze and allocate on this model",
        )


def check_plan(plan_dir: Path, model_dir: Path) -> None:
    """:func:`verify_plan`, raising :class:`PlanMismatchError` listing every problem."""
    raise_problems(verify_plan(plan_dir, model_dir), plan_dir, model_dir)
