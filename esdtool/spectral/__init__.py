"""Pure spectral math: eigenvalue spectra, power-law fits, Marchenko-Pastur / Tracy-Widom spike
counts, and the metrics record of one spectrum. Tensors in, frozen records out; no I/O.

The alpha methods are named here, torch-free, as the one list every other module takes them
from (the table's columns alpha_median, alpha_fix_finger, alpha_ks; settings; the report).
"""

ALPHA_METHODS: tuple[str, ...] = ("median", "fix_finger", "ks")
ALPHA_COLUMNS: tuple[str, ...] = tuple(f"alpha_{m}" for m in ALPHA_METHODS)
# The same fits on FARMS' pooled window spectrum (analyze --estimator farms).
FARMS_ALPHA_COLUMNS: tuple[str, ...] = tuple(f"{c}_farms" for c in ALPHA_COLUMNS)
# Every alpha column a plan or the report can read: the fits, their FARMS twins, and
# AlphaPruning's alpha_peak (analyze --preset alphapruning).
TABLE_ALPHA_COLUMNS: tuple[str, ...] = (*ALPHA_COLUMNS, *FARMS_ALPHA_COLUMNS, "alpha_peak")
