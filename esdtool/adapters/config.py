"""adapter_config.json, checked all at once, and PEFT's per-module r and lora_alpha.

PEFT resolves a module's rank and alpha by matching its path against the keys of rank_pattern
and alpha_pattern with ``re.match(rf"(.*\\.)?({key})$", path)``, the first matching key in the
file's order winning (peft.utils.other.get_pattern_key). The keys come from an untrusted file and
must never reach a backtracking regex engine, so esdtool matches them in one of two ways: the
fixed-length literals nearly all keys are (module paths, ``.`` matching any character as in
PEFT, escaped punctuation, a leading ``^`` to name one module exactly) by comparing characters,
and any other key with RE2, whose matching time is linear in the path. The two give PEFT's
answer; a key RE2 cannot run (back-references, look-arounds) is refused in one line naming it,
since the rank and alpha it gives are then unknown.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from esdtool.errors import CheckpointError
from esdtool.untrusted import user_regex

_REGEX_SYNTAX = frozenset("\\^$*+?{}[]|()")
_MAX_SHOWN = 80


@dataclass(frozen=True)
class AdapterConfig:
    """A LoRA adapter's settings, as PEFT uses them to build and merge its layers.

    r, lora_alpha:  the defaults; rank_pattern / alpha_pattern override them per module.
    use_rslora:     scaling = lora_alpha / sqrt(r) instead of lora_alpha / r.
    use_dora:       DoRA: the weight is renormalised per output row to a trained magnitude.
    fan_in_fan_out: the base weights are stored transposed (GPT-2's Conv1D).
    modules_to_save: modules trained and saved in full.
    base_model:     base_model_name_or_path (untrusted text; never used as a path).
    raw:            the file's fields that matter here, verbatim, for the table's metadata.
    """

    r: int
    lora_alpha: float
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    use_dora: bool = False
    fan_in_fan_out: bool = False
    modules_to_save: tuple[str, ...] = ()
    base_model: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict)

    def rank(self, module: str) -> int:
        """The r PEFT gives ``module`` (its path in the base model)."""
        key = pattern_key(self.rank_pattern, module)
        return self.rank_pattern[key] if key is not None else self.r

    def alpha(self, module: str) -> float:
        """The lora_alpha PEFT gives ``module``."""
        key = pattern_key(self.alpha_pattern, module)
        return self.alpha_pattern[key] if key is not None else self.lora_alpha

    def scaling(self, r: int, alpha: float) -> float:
        """PEFT's scaling of B A: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def label(self) -> str:
        """The table's ``adapter`` value for this adapter's low-rank rows."""
        return ("dora" if self.use_dora else "lora") + (" rslora" if self.use_rslora else "")


@functools.lru_cache(maxsize=1 << 16)  # each key parsed once, however many modules it meets
def _literal(key: str) -> tuple[tuple[str | None, ...], bool] | None:
    r"""A pattern key as fixed-length literal tokens (a character, or None for ``.``: any but a
    newline) and whether it is anchored by a leading ``^``; None when it holds any other
    regular-expression syntax. Escaped punctuation (``\.``, ``\-``) is the character itself,
    and a trailing ``$`` is the end PEFT's pattern anchors anyway: esdtool's own plans write
    ``^model\.layers\.0\.mlp\.up_proj`` keys to name exactly one module."""
    anchored = key.startswith("^")
    body = key[1:] if anchored else key
    body = body[:-1] if body.endswith("$") and not body.endswith("\\$") else body
    if not body:  # "", "^", "$": PEFT matches them against odd paths; nobody means that
        return None
    tokens: list[str | None] = []
    i = 0
    while i < len(body):
        c = body[i]
        if c == "\\":
            if i + 1 == len(body) or body[i + 1].isalnum() or body[i + 1] in " \n":
                return None  # \d, \w, \b, ... are classes and assertions, not characters
            tokens.append(body[i + 1])
            i += 2
            continue
        if c in _REGEX_SYNTAX:
            return None
        tokens.append(None if c == "." else c)
        i += 1
    return tuple(tokens), anchored


def _runnable(key: str) -> bool:
    """Whether ``key`` is matched: a literal, or a non-empty expression RE2 compiles."""
    if is_literal(key):
        return True
    if key in ("", "^", "$", "^$"):
        return False
    try:
        _compiled(key)
    except ValueError:
        return False
    return True


def is_literal(key: str) -> bool:
    """Whether esdtool can match ``key`` without running it as a regular expression."""
    return _literal(key) is not None


@functools.lru_cache(maxsize=1 << 12)
def _compiled(key: str) -> Any:
    """PEFT's pattern for ``key`` compiled by RE2 (ValueError for a key RE2 does not accept)."""
    return user_regex(rf"(.*\.)?({key})$", "pattern key")


def key_matches(key: str, path: str) -> bool:
    r"""PEFT's ``re.match(rf"(.*\.)?({key})$", path)`` for a key :func:`is_literal` accepts: the
    key's characters are a suffix of the path (``.`` matching any character but a newline),
    preceded by nothing, or (unless the key starts with ``^``) by a ``.`` with no newline
    before it; ``$`` also matches before a final newline."""
    parsed = _literal(key)
    candidates = [path] + ([path[:-1]] if path.endswith("\n") else [])
    if parsed is None:  # RE2's $ is the end of the text; Python's also before a final newline
        pattern = _compiled(key)
        return any(pattern.match(text) is not None for text in candidates)
    tokens, anchored = parsed
    n = len(tokens)
    for text in candidates:
        if n == 0 or n > len(text):
            continue
        tail, head = text[len(text) - n :], text[: len(text) - n]
        if not all(t == c or (t is None and c != "\n") for t, c in zip(tokens, tail, strict=True)):
            continue
        if head == "" or (not anchored and head.endswith(".") and "\n" not in head):
            return True
    return False


def pattern_key(patterns: Mapping[str, Any], path: str) -> str | None:
    """The first key of ``patterns`` (in order) that matches ``path``, or None."""
    return next((key for key in patterns if key_matches(key, path)), None)


def read_adapter_config(data: Mapping[str, Any], where: str) -> AdapterConfig:
    """Check a parsed adapter_config.json (``where`` names it in messages): every problem is
    listed in one :class:`CheckpointError`."""
    problems: list[str] = []
    peft_type = data.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise CheckpointError(
            f"{where}: peft_type {_short(peft_type)}: esdtool reads LoRA adapters "
            "(peft_type LORA) only",
            hint="analyse the merged model instead (PEFT's merge_and_unload, then save it)",
        )
    r = data.get("r", 8)
    if type(r) is not int or r < 1:
        problems.append(f"r is {_short(r)}, not a positive integer")
    alpha = data.get("lora_alpha", 8)
    if not _number(alpha):
        problems.append(f"lora_alpha is {_short(alpha)}, not a finite number")
    flags = {}
    for name in ("use_rslora", "use_dora", "fan_in_fan_out"):
        value = data.get(name)
        if value is not None and type(value) is not bool:
            problems.append(f"{name} is {_short(value)}, not true or false")
        flags[name] = value is True
    problems += _variants(data)
    patterns: dict[str, dict[str, Any]] = {}
    for name, check, what in (
        ("rank_pattern", lambda v: type(v) is int and v >= 1, "a positive integer"),
        ("alpha_pattern", _number, "a finite number"),
    ):
        value = data.get(name)
        value = {} if value is None else value
        if not isinstance(value, dict):
            problems.append(f"{name} is {_short(value)}, not an object")
            continue
        for key, item in value.items():
            if not _runnable(key):
                problems.append(
                    f"{name} key {_short(key)} is a regular expression esdtool does not run "
                    "(empty, or needing back-references or look-arounds, which only a "
                    "backtracking engine runs)"
                )
            elif not check(item):
                problems.append(f"{name}[{_short(key)}] is {_short(item)}, not {what}")
        patterns[name] = value
    saved = data.get("modules_to_save")
    saved = [] if saved is None else saved
    if not (isinstance(saved, list) and all(isinstance(s, str) for s in saved)):
        problems.append(f"modules_to_save is {_short(saved)}, not a list of names")
        saved = []
    base = data.get("base_model_name_or_path")
    if problems:
        hint = None
        if any("regular expression" in p for p in problems):
            hint = "write module paths (as in the adapter's tensor names) as pattern keys"
        elif any(" is set: " in p or "init_lora_weights" in p for p in problems):
            hint = "merge it into its base model (PEFT's merge_and_unload), save that, and "
            hint += "esdtool compare the base and merged models' tables"
        raise CheckpointError(f"{where}: {'; '.join(problems)}", hint=hint)
    keep = ("peft_type", "r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora",
            "use_dora", "fan_in_fan_out", "modules_to_save", "target_modules",
            "base_model_name_or_path", "task_type", "peft_version")  # fmt: skip
    return AdapterConfig(
        r=r, lora_alpha=float(alpha), rank_pattern=patterns["rank_pattern"],
        alpha_pattern={k: float(v) for k, v in patterns["alpha_pattern"].items()},
        use_rslora=flags["use_rslora"], use_dora=flags["use_dora"],
        fan_in_fan_out=flags["fan_in_fan_out"], modules_to_save=tuple(saved),
        base_model=base if isinstance(base, str) else None,
        raw={k: data[k] for k in keep if k in data},
    )  # fmt: skip


# LoRA variants whose weight change is not scaling * B A, by the adapter_config.json field that
# turns them on (any value but null / false / an empty one): analysing them as B A would give
# numbers that look right and are not.
_VARIANTS = {
    "use_bdlora": "BD-LoRA (block-diagonal factors)",
    "kasa_config": "KaSA (a trained diagonal between B and A)",
    "use_qalora": "QA-LoRA (A acts on pooled inputs)",
    "arrow_config": "Arrow (routed experts of adapters)",
    "target_parameters": "LoRA on parameters (not on modules)",
    "layer_replication": "layer replication (modules shared across layers)",
}
# init_lora_weights values after which B A is the change training made. PiSSA, OLoRA, CorDA and
# LoftQ move part of the base weight into the adapter at initialisation: unless converted when
# saved (path_initial_model_for_weight_conversion), B A is relative to a changed base.
_PLAIN_INITS = (True, False, None, "gaussian", "eva")


def _variants(data: Mapping[str, Any]) -> list[str]:
    """The fields that make this adapter something esdtool cannot read as scaling * B A."""
    found = [f"{field_} is set: {what}" for field_, what in _VARIANTS.items() if data.get(field_)]
    init = data.get("init_lora_weights", True)
    if not any(init is plain or (type(init) is str and init == plain) for plain in _PLAIN_INITS):
        found.append(
            f"init_lora_weights is {_short(init)}: B A is then relative to a base the "
            "initialisation changed (save it converted: path_initial_model_for_weight_conversion)"
        )
    return found


def _number(value: object) -> bool:
    """A JSON number a float holds (10**400 is an int JSON allows and float() refuses)."""
    if type(value) not in (int, float):
        return False
    try:
        return math.isfinite(float(value))  # type: ignore[arg-type]
    except OverflowError:
        return False


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."
