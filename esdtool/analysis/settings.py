"""The analysis settings: every knob of method.md sections 1-5, with its default.

They are stored in each metrics table's metadata, so a table always says how it was made.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

from esdtool.errors import OptionError
from esdtool.spectral import ALPHA_METHODS
from esdtool.untrusted import user_regex

# Presets: the analysis settings of a published method, option by option (docs/method.md).
# "lora-ar": Adaptive Rank LoRA's code (UdiBhaskar/Adaptive-Rank-LoRA,
# src/adaptive_rank_assignment.py): float32 singular values squared (L98-99), every eigenvalue
# kept (L15, L118-120), sigma^2 = mean(lambda) (L125), its spike edge and conv sides (L93,
# L129-147), every Linear analysed however small (min_evals 2: one eigenvalue crashes its code).
# Its alpha is alpha_ks (L176-225), which esdtool computes anyway.
# "alphapruning": AlphaPruning's code (haiquanlu/AlphaPruning, lib/esd_utils.py
# net_esd_estimator with fix_fingers="xmin_peak", as get_esd_metrics calls it): float32 singular
# values squared (L110-113), zeros kept (filter_zeros False, L117-126), every Linear analysed,
# and its alpha_peak column (spectral/peak.py).
PRESETS: dict[str, dict[str, Any]] = {
    "lora-ar": {"dtype": "float32", "eig_threshold": 0.0, "sigma_fit": "mean",
                "spike_rule": "lora-ar", "conv_norm": 0.5, "min_evals": 2},
    "alphapruning": {"dtype": "float32", "eig_threshold": 0.0, "conv_norm": 0.5, "min_evals": 2,
                     "alpha_peak": True},
}  # fmt: skip


ESTIMATORS = ("plain", "farms")


@lru_cache(maxsize=16)
def _regex(pattern: str, flag: str) -> Any:
    return user_regex(pattern, flag)


@dataclass(frozen=True)
class AnalyzeSettings:
    """How ``analyze`` reads and measures a checkpoint.

    device:         "auto" (CUDA when present, else CPU), "cpu", "cuda" or "cuda:N".
    dtype:          eigenvalue precision. "float64": eigenvalues of the float64 Gram matrix
                    (exact to ~1e-15; the fastest path on CPUs and on GPUs with full-rate
                    FP64). "float32": float32 singular values squared (alphas within 1e-3 of
                    float64; for GPUs with slow FP64). "auto" (default) picks float64 on CPUs
                    and A100/H100-class GPUs, float32 on other GPUs. Fits always use float64.
    include/exclude: regexes searched in tensor names; a tensor is analysed when it matches
                    ``include`` (if given) and not ``exclude`` (if given).
    eig_threshold:  eigenvalues at or below it are left out of the fits ("nonzero" set).
    min_evals:      matrices with fewer eigenvalues (M) are skipped with a reason.
    sigma_fit:      MP sigma^2 estimator, "median" (robust) or "mean" (the seed's).
    tw_quantile:    Tracy-Widom level q of the spike threshold.
    conv_norm:      4-D conv kernels are scaled by sqrt(conv_norm) before pooling their spectra.
    weighted_alpha: which alpha feeds alpha_weighted and log_alpha_norm ("ks" as WeightWatcher).
    spike_rule:     "tw" (spikes above the Tracy-Widom quantile edge) or "lora-ar" (the edge of
                    Adaptive Rank LoRA's code, with its conv M/N; docs/method.md).
    estimator:      "plain" (each matrix's own spectrum) or "farms": also the FARMS columns,
                    fitted to the pooled spectrum of equally shaped windows (no aspect-ratio
                    bias; docs/method.md).
    farms_rows, farms_q, farms_grid: FARMS' window rows (capped at the matrix's smaller
                    side), window aspect ratio (columns / rows) and grid (ops x ops windows).
                    Defaults: FARMS' code's; its LLM runs used 2000, 1.0, 15. The grid is at
                    most 100 (10^4 windows: their pooled spectrum stays within 160 MB at 2000
                    rows; the eigensolves run in batches of at most 256 MB).
    alpha_peak:     also compute AlphaPruning's alpha_peak (spectral/peak.py) from the float32
                    eigenvalues (the alphapruning preset turns it on).
    raw_codes:      analyse quantized weights' stored codes as they are (FP8 codes; integer
                    codes still get no spectrum) instead of the weights they encode. Off by
                    default: codes describe the quantizer, not the model.
    max_tensor_gb:  a tensor whose analysis would need more memory than this (GB) is skipped
                    with the reason instead of exhausting the machine; None: half the free RAM
                    on a CPU, 80% of the free memory of the GPU.
    """

    device: str = "auto"
    dtype: str = "auto"
    include: str | None = None
    exclude: str | None = None
    eig_threshold: float = 1e-5
    min_evals: int = 10
    sigma_fit: str = "median"
    tw_quantile: float = 0.99
    conv_norm: float = 0.5
    weighted_alpha: str = "ks"
    max_tensor_gb: float | None = None
    raw_codes: bool = False
    spike_rule: str = "tw"
    estimator: str = "plain"
    farms_rows: int = 100
    farms_q: float = 2.0
    farms_grid: int = 10
    alpha_peak: bool = False
    preset: str | None = None

    @classmethod
    def from_preset(cls, preset: str | None, **overrides: Any) -> AnalyzeSettings:
        """The settings of ``preset`` (None: the defaults), with ``overrides`` on top: an
        explicit option always wins over the preset."""
        if preset is not None and preset not in PRESETS:
            raise OptionError(f"--preset must be one of {', '.join(PRESETS)}, not {preset!r}")
        base = PRESETS[preset] if preset else {}
        return cls(**{**base, **overrides, "preset": preset})

    def __post_init__(self) -> None:
        problems = []
        if self.dtype not in ("auto", "float32", "float64"):
            problems.append(f"--dtype must be auto, float32 or float64, not {self.dtype!r}")
        for flag, pattern in (("--include", self.include), ("--exclude", self.exclude)):
            if pattern is not None:
                try:
                    _regex(pattern, flag)
                except ValueError as exc:
                    problems.append(str(exc))
        if self.sigma_fit not in ("median", "mean"):
            problems.append(f"sigma_fit must be median or mean, not {self.sigma_fit!r}")
        if not 0 < self.tw_quantile < 1:
            problems.append(f"tw_quantile must lie in (0, 1), not {self.tw_quantile}")
        if self.weighted_alpha not in ALPHA_METHODS:
            problems.append(f"weighted_alpha must be one of {ALPHA_METHODS}")
        if not (math.isfinite(self.eig_threshold) and self.eig_threshold >= 0):
            problems.append(f"eig_threshold must be a finite number >= 0, not {self.eig_threshold}")
        if not (math.isfinite(self.conv_norm) and self.conv_norm > 0):
            problems.append(f"conv_norm must be a finite number > 0, not {self.conv_norm}")
        gb = self.max_tensor_gb
        if gb is not None and not (math.isfinite(gb) and 0 < gb < 1e9):
            problems.append(f"--max-tensor-gb must be a finite number of GB > 0, not {gb}")
        if self.min_evals < 2:
            problems.append(f"min_evals must be at least 2, not {self.min_evals}")
        if self.spike_rule not in ("tw", "lora-ar"):
            problems.append(f"--spike-rule must be tw or lora-ar, not {self.spike_rule!r}")
        if self.estimator not in ESTIMATORS:
            problems.append(f"--estimator must be one of {', '.join(ESTIMATORS)}, "
                            f"not {self.estimator!r}")  # fmt: skip
        if isinstance(self.farms_rows, bool) or not isinstance(self.farms_rows, int) \
                or self.farms_rows < 2:  # fmt: skip
            problems.append(f"--farms-rows must be an integer >= 2, not {self.farms_rows!r}")
        if not (isinstance(self.farms_q, int | float) and not isinstance(self.farms_q, bool)
                and math.isfinite(self.farms_q) and 0 < self.farms_q <= 1e6):  # fmt: skip
            problems.append(f"--farms-q must be a number in (0, 1e6], not {self.farms_q!r}")
        if isinstance(self.farms_grid, bool) or not isinstance(self.farms_grid, int) \
                or not 1 <= self.farms_grid <= 100:  # fmt: skip
            problems.append(f"--farms-grid must be an integer in 1..100, not {self.farms_grid!r}")
        if self.preset is not None and self.preset not in PRESETS:
            problems.append(f"--preset must be one of {', '.join(PRESETS)}, not {self.preset!r}")
        if not re.fullmatch(r"auto|cpu|cuda(:[0-9]{1,4})?", self.device):
            problems.append(f"--device must be auto, cpu, cuda or cuda:N, not {self.device!r}")
        if problems:
            raise OptionError("; ".join(problems))

    def selects(self, name: str) -> bool:
        """Whether the include/exclude regexes let tensor ``name`` through (RE2: linear time
        in the name, whatever the pattern)."""
        if self.include is not None and _regex(self.include, "--include").search(name) is None:
            return False
        return not (
            self.exclude is not None and _regex(self.exclude, "--exclude").search(name) is not None
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
