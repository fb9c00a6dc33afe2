"""FARMS (esdtool.spectral.farms) against an independent float64 reading of FARMS' own code.

The reference here is written from HUST-AI-HYZ/FARMS, ``LLM_Pruning/lib/sampling.py``
(``fixed_sampling``), not from esdtool: plain Python loops over the windows, numpy float64, one
``np.linalg.svd(window, compute_uv=False) ** 2`` per window, the pooled values sorted with
numpy. esdtool instead gathers all windows at once and takes the eigenvalues of batched float64
Gram matrices. FARMS' placement, per dimension (side = rows or cols, window = n or c):

    n = min(num_row_samples, min(rows, cols));  c = int(n * Q)
    step = max(1, (side - window) // (ops - 1))
    count = min(ops, max(1, (side - window) // step + 1))
    start_i = min(i * step, side - window),  i < count

esdtool's two deliberate departures, mirrored in the reference: ops == 1 is one window at
(0, 0) (FARMS' code divides by zero), and a window that does not fit (c > cols or c < 1) is a
ValueError (FARMS' code would slice a narrower window, changing its aspect ratio).

The fits on the pooled spectrum are esdtool's own (method.md sections 3-4); the independent
float64 fits of tests/oracle.py are applied to the reference's pooled spectrum with M, N = the
window's smaller and larger side.

Spectral-level tests come first; the tests of the analysis table (``analyze(...,
AnalyzeSettings(estimator="farms"))``) are the methods of ``TestAnalyzeTable`` (select them with
``-k TestAnalyzeTable``, leave them out with ``-k "not TestAnalyzeTable"``).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import oracle
from esdtool.spectral.farms import farms_metrics, farms_spectrum, windows
from esdtool.spectral.metrics import spectrum_metrics
from esdtool.spectral.spectra import eigenvalues

DEFAULTS = (100, 2.0, 10)  # FARMS' code's num_row_samples, Q_ratio, sampling_ops_per_dim
FITS = ("median", "fix_finger", "ks")
REL = 1e-10  # alphas: esdtool's Gram eigenvalues vs the reference's SVD (measured <= 3.3e-14)

# The reference's many small SVDs run on one BLAS thread: on the busy 2-core test machine, two
# BLAS threads waiting on each other made them ~15x slower (36 ms per 100 x 200 SVD, not 2.5).
try:
    from threadpoolctl import threadpool_limits

    def one_blas_thread():
        return threadpool_limits(limits=1, user_api="blas")

except ImportError:  # pragma: no cover

    def one_blas_thread():
        return contextlib.nullcontext()


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """esdtool's eigensolves on one intra-op thread while this module runs (restored after):
    on the 2-core test machine, busy with another process, a batched eigvalsh of 16 windows
    took 2-5 s on two MKL threads (waiting on each other) against 5-10 ms on one. The
    results do not depend on it; the runtime of the module did (62 s against 18 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


PROJECTION = re.compile(
    r"encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
    r"|intermediate\.dense|output\.dense)\.weight$"
)


# ---------------------------------------------------------------------------------------------
# The independent reference
# ---------------------------------------------------------------------------------------------


def ref_starts(side: int, window: int, ops: int) -> list[int]:
    """Window starts along one side, transcribed from ``fixed_sampling`` with a plain loop
    (ops == 1: one start at 0, esdtool's rule where FARMS' code divides by zero)."""
    if ops == 1:
        return [0]
    free = side - window
    step = free // (ops - 1)
    if step < 1:
        step = 1
    how_many = free // step + 1
    if how_many < 1:
        how_many = 1
    if how_many > ops:
        how_many = ops
    out = []
    for i in range(how_many):
        s = i * step
        if s > free:
            s = free
        out.append(s)
    return out


def ref_windows(rows: int, cols: int, n_rows: int, q: float, ops: int):
    """(n, c, row starts, col starts), or None where esdtool must refuse the settings."""
    if n_rows < 2 or not q > 0 or ops < 1:
        return None
    n = min(n_rows, min(rows, cols))
    c = int(n * q)
    if n < 1 or c < 1 or c > cols:
        return None
    return n, c, ref_starts(rows, n, ops), ref_starts(cols, c, ops)


def ref_pooled(W, n_rows: int, q: float, ops: int):
    """(pooled spectrum ascending, n, c, number of windows): one float64 SVD per window."""
    W = np.asarray(W, dtype=np.float64)
    placed = ref_windows(W.shape[0], W.shape[1], n_rows, q, ops)
    assert placed is not None, "the reference refuses these settings"
    n, c, row_starts, col_starts = placed
    parts = []
    with one_blas_thread():
        for r in row_starts:
            for k in col_starts:
                window = W[r : r + n, k : k + c]
                assert window.shape == (n, c)  # numpy would silently cut a window short
                parts.append(np.linalg.svd(window, compute_uv=False) ** 2)
    return np.sort(np.concatenate(parts)), n, c, len(row_starts) * len(col_starts)


def ref_farms(W, n_rows: int, q: float, ops: int) -> dict:
    """The FARMS numbers of W by the reference: oracle fits of the pooled spectrum."""
    pooled, n, c, count = ref_pooled(W, n_rows, q, ops)
    M, N = min(n, c), max(n, c)
    x = oracle.nonzero(pooled)
    spikes = oracle.spikes(pooled, M, N, exact_tw=True)
    return {
        "median": oracle.alpha_median(x)[0],
        "fix_finger": oracle.alpha_fix_finger(x)[0],
        "ks": oracle.alpha_ks(x)[0],
        "num_spikes": spikes["num_spikes"],
        "tw_threshold": spikes["tw_threshold"],
        "windows": count,
        "pooled": pooled,
        "M": M,
        "N": N,
    }


def spikes_agree(ours: int, expected: dict) -> bool:
    """Exact, except where a pooled eigenvalue lies within 1e-6 relative of the TW threshold
    (the two implementations' TW1 quantiles differ in their last digits)."""
    if ours == expected["num_spikes"]:
        return True
    near = np.abs(expected["pooled"] / expected["tw_threshold"] - 1) < 1e-6
    return abs(ours - expected["num_spikes"]) <= int(near.sum())


def assert_farms_equal(W: torch.Tensor, settings: tuple, expected: dict, what: str) -> None:
    """esdtool's farms_metrics of W equal the reference's numbers (alphas to REL)."""
    ours = farms_metrics(W, *settings)
    assert ours is not None, what
    assert ours.windows.count == expected["windows"], what
    assert expected["M"] == ours.windows.M and expected["N"] == ours.windows.N, what
    for fit in FITS:
        got = getattr(ours.metrics, fit).alpha
        assert got == pytest.approx(expected[fit], rel=REL), (what, fit)
    count = ours.metrics.spikes.num_spikes
    assert count is not None and spikes_agree(count, expected), (what, count, expected)
    assert ours.spikes_per_window == count / expected["windows"], what


# ---------------------------------------------------------------------------------------------
# 1. Window placement
# ---------------------------------------------------------------------------------------------

PLACEMENTS = [
    # (rows, cols, n_rows, q, grid)
    (384, 384, 100, 2.0, 10),  # square (MiniLM attention)
    (1536, 384, 100, 2.0, 10),  # tall (MiniLM intermediate.dense, stored out x in)
    (384, 1536, 100, 2.0, 10),  # wide (MiniLM output.dense)
    (768, 3072, 100, 2.0, 10),
    (4096, 11008, 2000, 1.0, 15),  # FARMS' LLM settings on Llama-7B MLP shapes
    (11008, 4096, 2000, 1.0, 15),
    (100, 200, 100, 2.0, 10),  # the window is the whole matrix
    (80, 80, 100, 1.0, 10),  # side < n_rows, Q 1: the whole matrix
    (80, 80, 100, 1.0, 1),
    (300, 700, 50, 2.0, 1),  # grid 1: one window at (0, 0)
    (105, 215, 100, 2.0, 10),  # free room (5, 15) < grid - 1: step 1, 6 x 10 windows
    (103, 250, 100, 2.0, 10),  # free rows 3: 4 row starts
    (101, 250, 100, 2.0, 1000),  # grid far beyond the room
    (1000, 1000, 100, 2.0, 1000),
    (384, 384, 100, 2.0, 2),  # two starts per side: 0 and side - window exactly
    (384, 384, 100, 2.0, 3),
    (500, 500, 100, 0.5, 10),  # Q < 1: windows wider than high become taller than wide
    (500, 333, 100, 0.37, 7),
    (500, 900, 100, 2.3, 10),  # int(100 * 2.3) = 229, as FARMS' int() truncates
    (50, 1000, 100, 2.0, 10),  # wide, short: n capped at 50, c = 100
    (1, 100, 100, 2.0, 10),  # a single row: n = 1
    (2, 2, 2, 1.0, 3),  # the smallest window
    (1000, 61, 30, 2.0, 4),  # tall, the window just fits across (c = 60 <= 61)
    (1000, 60, 100, 0.5, 4),  # tall and narrower than n_rows: n = 60 (capped by cols), c = 30
]


@pytest.mark.parametrize("case", PLACEMENTS, ids=[str(c) for c in PLACEMENTS])
def test_window_placement_matches_fixed_sampling(case):
    """Window sides and every row/column start equal FARMS' fixed_sampling (transcribed above)
    on square, tall and wide matrices, a window equal to the matrix, grid 1, grids larger than
    the free room, Q < 1, Q > 1 and a Q whose n * Q truncates; M and N are the window's sides.
    A wrong step, count or clamp moves or adds windows and changes the pooled spectrum."""
    rows, cols = case[:2]
    expected = ref_windows(*case)
    assert expected is not None
    n, c, row_starts, col_starts = expected
    got = windows(*case)
    assert (got.n, got.c) == (n, c)
    assert list(got.row_starts) == row_starts
    assert list(got.col_starts) == col_starts
    assert got.count == len(row_starts) * len(col_starts)
    assert min(n, c) == got.M and max(n, c) == got.N
    assert max(got.row_starts) + n <= rows and max(got.col_starts) + c <= cols


def test_window_placement_random_sweep():
    """400 random (rows, cols, n_rows, q, grid) settings, fitting or not: where the reference
    places windows esdtool places the same ones, and where the window cannot fit (c > cols or
    c < 1) esdtool raises ValueError. Catches off-by-ones that the hand-picked cases miss."""
    rng = np.random.default_rng(1234)
    placed = refused = 0
    for _ in range(400):
        rows, cols = (int(v) for v in rng.integers(1, 3000, size=2))
        n_rows = int(rng.integers(2, 600))
        q = float(rng.choice([0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, float(rng.uniform(0.01, 5))]))
        grid = int(rng.choice([1, 2, 3, 5, 10, 15, int(rng.integers(1, 200))]))
        expected = ref_windows(rows, cols, n_rows, q, grid)
        case = (rows, cols, n_rows, q, grid)
        if expected is None:
            refused += 1
            with pytest.raises(ValueError):
                windows(*case)
            continue
        placed += 1
        got = windows(*case)
        assert (got.n, got.c, list(got.row_starts), list(got.col_starts)) == expected, case
    assert placed > 150 and refused > 50  # both branches exercised


BAD = [
    (384, 384, 1, 2.0, 10),  # n_rows < 2
    (384, 384, 0, 2.0, 10),
    (384, 384, -5, 2.0, 10),
    (384, 384, 100, 0.0, 10),  # q <= 0
    (384, 384, 100, -1.0, 10),
    (384, 384, 100, float("nan"), 10),
    (384, 384, 100, 2.0, 0),  # grid < 1
    (384, 384, 100, 2.0, -3),
    (80, 80, 100, 2.0, 10),  # c = 160 > 80 columns
    (1000, 60, 100, 2.0, 10),  # tall: n = 60, c = 120 > 60 (FARMS would cut it to 60)
    (384, 150, 100, 2.0, 10),  # c = 200 > 150
    (100, 100, 10, 0.05, 3),  # c = int(0.5) = 0
    (0, 10, 5, 1.0, 2),  # empty matrix
    (384, 384, 100, 1e300, 10),
]


@pytest.mark.parametrize("case", BAD, ids=[str(c) for c in BAD])
def test_bad_settings_raise_value_error(case):
    """Bad settings (n_rows < 2, q <= 0 or NaN, grid < 1) and windows that do not fit the
    matrix raise ValueError instead of silently measuring a window of another shape, as FARMS'
    code would (its slice stops at the matrix edge)."""
    assert ref_windows(*case) is None
    with pytest.raises(ValueError):
        windows(*case)


def test_infinite_q_raises_value_error():
    """q = inf is a bad setting like q = 1e300 (no window can have infinitely many columns):
    it must be a ValueError, as every other bad setting is, not int(inf)'s OverflowError.
    (AnalyzeSettings refuses a non-finite --farms-q; this is the spectral API's own check.)"""
    with pytest.raises(ValueError):
        windows(384, 384, 100, float("inf"), 10)


# ---------------------------------------------------------------------------------------------
# 2. Pooled spectrum and metrics against the reference
# ---------------------------------------------------------------------------------------------


def _gaussian(rng, rows, cols):
    return rng.standard_normal((rows, cols))


def _student_t(rng, rows, cols):
    """Heavy-tailed entries (Student-t, 3 degrees of freedom), at a weight-like scale."""
    return 0.05 * rng.standard_t(3, (rows, cols))


def _planted(rng, rows, cols):
    """A small iid bulk plus four planted rank-one spikes of decreasing strength."""
    W = 0.02 * rng.standard_normal((rows, cols))
    for i in range(4):
        u, v = rng.standard_normal(rows), rng.standard_normal(cols)
        W += (3.0 / (i + 1)) * np.outer(u / np.linalg.norm(u), v / np.linalg.norm(v))
    return W


GENERATORS = {"gaussian": _gaussian, "student_t": _student_t, "planted": _planted}
SHAPES = [(300, 300), (180, 520), (640, 150)]
SYNTHETIC_SETTINGS = [(40, 1.5, 5), (30, 0.5, 6), (50, 1.0, 4), (25, 3.0, 7)]


@pytest.mark.parametrize("settings", SYNTHETIC_SETTINGS, ids=[str(s) for s in SYNTHETIC_SETTINGS])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{r}x{c}" for r, c in SHAPES])
@pytest.mark.parametrize("kind", list(GENERATORS))
def test_synthetic_matrices_equal_reference(kind, shape, settings):
    """On iid Gaussian, heavy-tailed (Student-t) and planted-spike matrices, square, wide and
    tall, with Q < 1, = 1 and > 1 windows: esdtool's pooled spectrum equals the reference's
    (ascending, the same values to 1e-11 of lambda_max: windows in the right place, each
    window's squared singular values, sorted), and alpha_median, alpha_fix_finger, alpha_ks
    and spikes per window equal the oracle's fits of it, alphas to 1e-10 relative (measured
    3.3e-14 at worst)."""
    seed = [*GENERATORS].index(kind) * 100 + SHAPES.index(shape) * 10
    W = GENERATORS[kind](np.random.default_rng(seed), *shape)
    expected = ref_farms(W, *settings)
    Wt = torch.from_numpy(W)
    pooled, finite, placed = farms_spectrum(Wt, *settings)
    assert finite is True
    assert pooled.dtype == torch.float64
    assert bool((pooled[1:] >= pooled[:-1]).all()), "the pooled spectrum is not ascending"
    assert pooled.numel() == placed.count * placed.M == expected["pooled"].size
    ref = expected["pooled"]
    np.testing.assert_allclose(pooled.numpy(), ref, rtol=0, atol=1e-11 * ref[-1])
    assert_farms_equal(Wt, settings, expected, f"{kind} {shape} {settings}")


@pytest.fixture(scope="module")
def minilm_projections(minilm_dir) -> dict[str, torch.Tensor]:
    """The 36 attention and MLP projection weights of MiniLM (6 layers x query, key, value,
    attention output, intermediate, output), float32 as stored (out x in)."""
    tensors = load_file(str(minilm_dir / "model.safetensors"))
    found = {k: v for k, v in tensors.items() if PROJECTION.search(k)}
    assert len(found) == 36
    return found


LAYER0_ONE_PER_SHAPE = [
    f"encoder.layer.0.{m}.weight" for m in ("attention.self.query", "intermediate.dense",
                                             "output.dense")
]  # fmt: skip
_REFERENCE: dict = {}


def reference_of(name: str, W: torch.Tensor, settings: tuple) -> dict:
    """ref_farms, computed once per (matrix, settings) for the whole module."""
    key = (name, settings)
    if key not in _REFERENCE:
        _REFERENCE[key] = ref_farms(W.numpy(), *settings)
    return _REFERENCE[key]


def test_minilm_projections_equal_reference(minilm_projections):
    """All 36 MiniLM projections (384 x 384, 1536 x 384, 384 x 1536) with 100 x 200 windows
    on a 4 x 4 grid: the three alphas to 1e-10 relative and the spikes per window equal the
    reference on real weights (whose spectra, unlike Gaussian ones, have power-law tails).
    The grid is 4, not 10, to keep the quadratic KS fits of 36 pooled spectra fast."""
    settings = (100, 2.0, 4)
    for name, W in minilm_projections.items():
        assert_farms_equal(W, settings, reference_of(name, W, settings), name)


def test_minilm_default_settings_equal_reference(minilm_projections):
    """One projection of each shape (layer 0's query 384 x 384, intermediate 1536 x 384 and
    output 384 x 1536) with FARMS' default settings, 100 x 200 windows on a 10 x 10 grid
    (10,000 pooled eigenvalues): the alphas to 1e-10 relative and the spikes per window equal
    the reference. Three, not 36: each KS fit of 10,000 eigenvalues takes about a second."""
    for name in LAYER0_ONE_PER_SHAPE:
        W = minilm_projections[name]
        assert_farms_equal(W, DEFAULTS, reference_of(name, W, DEFAULTS), name)


def test_window_with_nan_gives_none():
    """A NaN inside a window makes farms_metrics None (nothing fitted), as the plain
    spectrum of a non-finite matrix is not fitted; the finite flag says so."""
    W = torch.from_numpy(np.random.default_rng(5).standard_normal((120, 260)))
    W[3, 7] = math.nan
    _, finite, _ = farms_spectrum(W, 40, 2.0, 3)
    assert finite is False
    assert farms_metrics(W, 40, 2.0, 3) is None


# ---------------------------------------------------------------------------------------------
# 3. The aspect-ratio bias FARMS removes
# ---------------------------------------------------------------------------------------------


def test_farms_alpha_does_not_drift_with_aspect_ratio():
    """iid N(0, 1) matrices 256 x 256Q, Q = 1, 2, 4, 8 (torch seed 0, float64). The plain
    alpha_median rises steadily with Q although every matrix is the same kind of noise; the
    FARMS alpha_median (default 100 x 200 windows, 10 x 10 grid) measures every matrix as a
    Q = 2 one and stays put, at the plain value of the Q = 2 matrix.

    Measured (seed 0), plain: 2.126, 2.741, 3.482, 4.484 (range 2.36); FARMS: 2.711, 2.702,
    2.697, 2.699 (range 0.014). Over seeds 0-4 and Q = 1..8: plain range 2.26-2.37, always
    increasing; FARMS range 0.016-0.047; FARMS spikes per window <= 0.04 (plain: 0 spikes).
    alpha_fix_finger and alpha_ks are not asserted: a pure MP bulk has no power-law tail, and
    both jump between 3 and 90 from seed to seed for either estimator."""
    generator = torch.Generator().manual_seed(0)
    plain, farms, spikes = [], [], []
    for Q in (1, 2, 4, 8):
        W = torch.randn(256, 256 * Q, generator=generator, dtype=torch.float64)
        plain.append(spectrum_metrics(eigenvalues(W), 256, 256 * Q).median.alpha)
        fm = farms_metrics(W, *DEFAULTS)
        assert fm is not None and (fm.windows.M, fm.windows.N) == (100, 200)
        farms.append(fm.metrics.median.alpha)
        spikes.append(fm.spikes_per_window)
    assert all(b > a for a, b in itertools.pairwise(plain)), plain
    assert max(plain) - min(plain) > 1.5, plain
    assert max(farms) - min(farms) < 0.15, farms
    assert all(abs(a - plain[1]) < 0.2 for a in farms), (farms, plain[1])
    assert max(spikes) <= 0.1, spikes


# ---------------------------------------------------------------------------------------------
# 4. One window: FARMS is the plain analysis
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side, n_rows, grid", [(80, 100, 10), (100, 100, 10), (37, 100, 1),
                                                (64, 64, 15)])  # fmt: skip
def test_one_window_square_matrix_equals_plain(side, n_rows, grid):
    """A square matrix whose side is <= n_rows, with Q = 1: exactly one window, the whole
    matrix, so the FARMS metrics are the plain metrics of the matrix, exactly (the same
    eigenvalues, M, N and fits): the FARMS path adds nothing of its own."""
    W = torch.from_numpy(np.random.default_rng(side).standard_t(4, (side, side)))
    fm = farms_metrics(W, n_rows, 1.0, grid)
    assert fm is not None
    placed = fm.windows
    assert (placed.n, placed.c, placed.row_starts, placed.col_starts) == (side, side, (0,), (0,))
    assert placed.count == 1
    pooled, _, _ = farms_spectrum(W, n_rows, 1.0, grid)
    evals = eigenvalues(W)
    assert torch.equal(pooled, evals)
    plain = spectrum_metrics(evals, side, side)
    for fit in FITS:
        assert getattr(fm.metrics, fit) == getattr(plain, fit), fit
    assert fm.metrics.spikes == plain.spikes
    assert fm.spikes_per_window == plain.spikes.num_spikes
    assert fm.metrics.lambda_max == plain.lambda_max
    assert fm.metrics.fit_status == plain.fit_status


# ---------------------------------------------------------------------------------------------
# Table level: analyze(..., AnalyzeSettings(estimator="farms"))
# ---------------------------------------------------------------------------------------------


class TestAnalyzeTable:
    """The FARMS columns of the analysis table (alpha_median_farms, alpha_fix_finger_farms,
    alpha_ks_farms, spikes_farms, farms_windows) against the reference."""

    SETTINGS = (40, 1.5, 5)

    @staticmethod
    def _settings(**kw):
        from esdtool import AnalyzeSettings

        return AnalyzeSettings(device="cpu", dtype="float64", **kw)

    @staticmethod
    def _assert_row(row, expected: dict, what: str) -> None:
        for fit in FITS:
            assert row[f"alpha_{fit}_farms"] == pytest.approx(expected[fit], rel=REL), (what, fit)
        assert row["farms_windows"] == expected["windows"], what
        count = round(row["spikes_farms"] * expected["windows"])
        assert row["spikes_farms"] == count / expected["windows"], what
        assert spikes_agree(count, expected), (what, count, expected["num_spikes"])

    def test_table_in_memory_state_dict_equals_reference(self):
        """A state dict of a square Gaussian, a wide Student-t and a tall planted-spike matrix,
        a 3-D tensor of two experts and a bias: every matrix row (each expert its own) has
        FARMS columns equal to the reference for its own windows; the bias has none."""
        from esdtool import analyze

        rng = np.random.default_rng(77)
        sd = {
            "sq.weight": _gaussian(rng, 300, 300),
            "wide.weight": _student_t(rng, 180, 520),
            "tall.weight": _planted(rng, 640, 150),
            "experts.weight": np.stack([_student_t(rng, 120, 260), _planted(rng, 120, 260)]),
            "sq.bias": rng.standard_normal(300),
        }
        rows_, q, grid = self.SETTINGS
        table = analyze(
            {k: torch.from_numpy(v) for k, v in sd.items()}, None,
            self._settings(estimator="farms", farms_rows=rows_, farms_q=q, farms_grid=grid),
        ).table  # fmt: skip
        assert len(table) == 6
        for _, row in table.iterrows():
            if row["name"] == "sq.bias":
                assert pd_isna(row["farms_windows"]) and math.isnan(row["alpha_median_farms"])
                continue
            W = sd[row["name"]]
            if W.ndim == 3:
                W = W[int(row["slice"])]
            assert row["status"] == "ok", row["name"]
            self._assert_row(row, ref_farms(W, *self.SETTINGS), f"{row['name']} {row['slice']}")

    def test_table_minilm_equals_reference(self, minilm_dir, minilm_projections):
        """MiniLM read from its checkpoint directory with --estimator farms and FARMS' default
        settings (three projections of layer 0, one of each shape, selected with --include):
        their FARMS columns equal the reference (100 windows each)."""
        from esdtool import analyze

        include = "|".join("^" + re.escape(name) + "$" for name in LAYER0_ONE_PER_SHAPE)
        table = analyze(minilm_dir, None, self._settings(estimator="farms", include=include)).table
        rows = table[table["status"] == "ok"]
        assert sorted(rows["name"]) == sorted(LAYER0_ONE_PER_SHAPE)
        for _, row in rows.iterrows():
            W = minilm_projections[row["name"]]
            self._assert_row(row, reference_of(row["name"], W, DEFAULTS), row["name"])
            assert row["farms_windows"] == 100

    def test_table_plain_estimator_has_empty_farms_columns(self):
        """Without --estimator farms the FARMS columns are present but empty (NaN / null):
        nothing is computed, and nothing pretends to be."""
        from esdtool import analyze

        W = torch.from_numpy(np.random.default_rng(3).standard_normal((120, 260)))
        table = analyze({"w.weight": W}, None, self._settings()).table
        row = table.iloc[0]
        assert row["status"] == "ok"
        for fit in FITS:
            assert math.isnan(row[f"alpha_{fit}_farms"])
        assert math.isnan(row["spikes_farms"]) and pd_isna(row["farms_windows"])

    def test_table_window_that_does_not_fit_is_refused(self):
        """A block projection that cannot take the window (30 x 30 with --farms-rows 100,
        --farms-q 2: 30 x 60) is an OptionError before any work, not a silently narrower
        window; a matrix outside the blocks that cannot take it (no plan adapts it) gets null
        FARMS columns and the others their numbers."""
        from esdtool import analyze
        from esdtool.errors import OptionError

        rng = np.random.default_rng(4)
        big = torch.from_numpy(rng.standard_normal((300, 300)))
        small = torch.from_numpy(rng.standard_normal((30, 30)))
        sd = {"layers.0.ok.weight": big, "layers.0.small.weight": small}
        with pytest.raises(OptionError, match=r"layers\.0\.small\.weight"):
            analyze(sd, None, self._settings(estimator="farms"))
        sd = {"layers.0.ok.weight": big, "head.weight": small}
        table = analyze(sd, None, self._settings(estimator="farms")).table.set_index("name")
        assert pd_isna(table.loc["head.weight", "alpha_median_farms"])
        assert not pd_isna(table.loc["layers.0.ok.weight", "alpha_median_farms"])


def pd_isna(value) -> bool:
    import pandas as pd

    return bool(pd.isna(value))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--farms-rows", "1"], "--farms-rows must be an integer >= 2"),
        (["--farms-q", "0"], "--farms-q must be a number in (0, 1e6]"),
        (["--farms-q", "inf"], "--farms-q must be a number in (0, 1e6]"),
        (["--farms-q", "1e307"], "--farms-q must be a number in (0, 1e6]"),
        (["--farms-grid", "0"], "--farms-grid must be an integer in 1..100"),
        ([], "cannot take the FARMS window of --farms-rows 100 and --farms-q 2"),
    ],
)
def test_bad_farms_settings_are_one_line_exit_2(tiny_causal_lm, tmp_path, capsys, options,
                                                message):  # fmt: skip
    """Bad window settings, and a window the tiny causal LM's 64-wide matrices cannot take
    (FARMS' default 100 x Q 2 gives 64 x 128), are refused in one line before any work; no
    table is written."""
    from helpers import run_cli

    out = tmp_path / "m.parquet"
    code, _, stderr = run_cli(["analyze", tiny_causal_lm, "-o", out, "--estimator", "farms",
                               *options], capsys)  # fmt: skip
    assert code == 2 and message in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    assert not out.exists()
