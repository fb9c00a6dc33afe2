"""The plan options practitioners reach for: target presets, a budget as a share of the model's
parameters, and ranks on a multiple of K (kernels and serving engines prefer multiples of 8).

Target presets pick among the block projections (role ``linear``) by where they sit, read off
module names with RE2 patterns (linear time in the name):

- ``attention``: modules under an attention block (Llama's ``self_attn``, GPT-2's ``attn``,
  BERT's ``attention``);
- ``mlp``: modules under the feed-forward block (``mlp``, ``feed_forward``, ``ffn``, MoE
  experts, BERT's ``intermediate`` and its block ``output.dense``);
- ``all-linear``: every block projection (the default candidates).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from esdtool.errors import OptionError
from esdtool.untrusted import user_regex

TARGET_PRESETS: dict[str, str | None] = {
    "attention": r"(^|\.)(self_attn|self_attention|attn|attention)\.",
    "mlp": r"(^|\.)(mlp|feed_forward|ffn|block_sparse_moe|experts|intermediate)\."
    r"|\.[0-9]+\.output\.dense$",
    "all-linear": None,
}


def pick_targets(df: pd.DataFrame, targets: str | None) -> pd.DataFrame:
    """Candidates among analysed matrices: a preset (among role ``linear``), a regex searched
    in module names (any role), or role ``linear`` (None)."""
    pattern = targets
    if targets is None or targets in TARGET_PRESETS:
        df = df[df.role == "linear"]
        pattern = TARGET_PRESETS.get(targets)  # all-linear and None: every linear
        if pattern is None:
            return df
    regex = user_regex(pattern, "--targets")  # RE2: linear in each name
    return df[[regex.search(str(m)) is not None for m in df.module]]


def model_params(metrics: pd.DataFrame) -> int:
    """Parameters of the analysed checkpoint: every tensor's elements (a matrix rows x cols,
    each expert's, a vector its length), from the table's shapes. Refused when the table holds
    only some of the tensors (analysed with --include / --exclude)."""
    settings = (metrics.attrs.get("esdtool") or {}).get("settings") or {}
    if settings.get("include") is not None or settings.get("exclude") is not None:
        raise OptionError(
            "--budget-percent needs the model's parameter count, and this table was analysed "
            "with --include/--exclude (some tensors are not in it)",
            hint="give --budget-params, or analyse every tensor",
        )
    rows = metrics.rows.to_numpy(float, na_value=0)
    cols = metrics.cols.to_numpy(float, na_value=1)
    return int(np.sum(rows * cols))


def round_to_multiple(
    ranks: np.ndarray, multiple: int, lo: int, hi: np.ndarray
) -> tuple[np.ndarray, int]:
    """Each rank to the nearest multiple of ``multiple`` (ties to even) within [lo, hi] rounded
    inward to multiples; a module whose range holds no multiple keeps the largest rank it can
    (``hi``). Returns the ranks and how many could not be made multiples."""
    if multiple == 1:
        return ranks, 0
    low = multiple * math.ceil(lo / multiple)
    high = multiple * np.floor(hi / multiple)
    out = np.clip(multiple * np.rint(ranks / multiple), low, high).astype(int)
    stuck = high < max(low, multiple)
    out[stuck] = hi[stuck]
    return out, int(stuck.sum())
