"""TempBalance's per-layer learning rates and AlphaDecay's per-module weight decays, re-implemented
in plain numpy from their published code.

Sources:

- YefanZhou/TempBalance, ``tempbalance.py`` at commit f03315317eeebf84b968ffa10675292712bd104d:
  ``Tempbalance.get_layer_temps`` (L329-353) and the median-xmin Hill alpha of
  ``net_esd_estimator`` (L270-278). "T<n>" in the comments below is a line of this file.
  (Commit 016b227ecaf2 has the same maps and the same alpha.)
- hed-ucas/AlphaDecay, ``LLaMa-pretraining/WeightDecayUnbalance.py`` at commit
  b51be34f74e83b4608903646a472c4a1baf369df (16,941 characters):
  ``modulewise_AlphaDecay.get_layer_temps`` (L321-361) and the same median-xmin Hill alpha
  (L250-258). "A<n>" in the comments below is a line of this file.

Both maps take ``metric_scores = np.array(layer_stats['alpha'])`` (T149, A89): one alpha per
tuned module, after the first and last Conv2d/Linear and those with fewer than 50 eigenvalues
are dropped. The maps are float64 numpy code in the origins too. The alpha itself is float32
torch there; :func:`median_alpha` applies its formula in float64.

No esdtool import.
"""

from __future__ import annotations

import math
from operator import itemgetter

import numpy as np

# ---------------------------------------------------- TempBalance get_layer_temps (T329-353)


def tempbalance_lrs(
    alphas,
    base_lr: float,
    assign_func: str,
    lr_min_ratio: float = 0.5,
    lr_max_ratio: float = 1.5,
) -> np.ndarray:
    """Per-layer learning rates (T329-353), ``base_lr`` = ``untuned_lr``, the scheduled global LR.

    Class defaults: ``assign_func='tb_linear_map'``, ratios 0.5 / 1.5 (T24-26).

    - ``tb_linear_map``: np.interp(alpha, [min, max], [r_min lr, r_max lr]) (T334-337). When
      every alpha is equal np.interp returns the right end r_max * lr for all.
    - ``tb_sqrt``: sqrt(alpha) / sum(sqrt(alpha)) * n * lr (T339-340).
    - ``tb_log2``: log2(alpha) / sum(log2(alpha)) * n * lr (T342-343).
    - ``tb_step``: the layer of rank k (ascending alpha, k = 0..n-1) gets
      lr * (r_min + (r_max - r_min) * k / n) (T345-348); r_max itself is never reached.
      Deviation: the origin uses np.argsort's default (quicksort, unstable), so the order among
      equal alphas is unspecified there. This uses ``kind="stable"``: equal alphas get
      consecutive ranks in module order.
    """
    metric_scores = np.asarray(alphas, dtype=np.float64)
    n = len(metric_scores)  # T330
    untuned_lr = base_lr
    if assign_func == "tb_linear_map":  # T334
        lr_range = [lr_min_ratio * untuned_lr, lr_max_ratio * untuned_lr]  # T335
        score_range = [min(metric_scores), max(metric_scores)]  # T336
        return np.interp(metric_scores, score_range, lr_range)  # T337
    if assign_func == "tb_sqrt":  # T339
        return np.sqrt(metric_scores) / np.sum(np.sqrt(metric_scores)) * n * untuned_lr  # T340
    if assign_func == "tb_log2":  # T342
        return np.log2(metric_scores) / np.sum(np.log2(metric_scores)) * n * untuned_lr  # T343
    if assign_func == "tb_step":  # T345
        idxes = np.argsort(metric_scores, kind="stable")  # T346 (origin: default quicksort)
        unsort_temps = [
            untuned_lr * (lr_min_ratio + (lr_max_ratio - lr_min_ratio) * i / n) for i in range(n)
        ]  # T347
        temps = [v for _, v in sorted(zip(idxes, unsort_temps, strict=True), key=itemgetter(0))]
        return np.array(temps, dtype=np.float64)  # T348: the inverse permutation
    raise NotImplementedError(assign_func)  # T350-351


# ------------------------------------------------ AlphaDecay get_layer_temps (A321-361)


def alphadecay_wds(
    alphas,
    base_wd: float,
    assign_func: str,
    wd_min_ratio: float = 0.6666,
    wd_max_ratio: float = 3.0,
    blocks=None,
    sigmoid_alpha: float = 4.0,
) -> np.ndarray:
    """Per-module weight decays (A321-361), ``base_wd`` = ``untuned_wd`` = ``--weight_decay``.

    Defaults: the ratios of the released scripts (0.6666 / 3; the argparse default is 0.666 / 3
    and the class default 0.5 / 1.5, A31-32) and the class's ``sigmoid_alpha=4`` (A35).

    - ``tb_linear_map``: np.interp(alpha, [min, max], [r_min wd, r_max wd]) (A334-337), the
      map of the paper. Equal alphas all give r_max * wd.
    - ``tb_sqrt``: sqrt(alpha) / sum(sqrt(alpha) + 1e-8) * n * wd (A338-339): 1e-8 added to
      each term, so n * 1e-8 in the sum.
    - ``tb_log2``: the same with log2 (A340-341).
    - ``layerwise_sigmoid`` (A342-358): ``blocks`` gives each module's group label (the origin
      uses ``longname.split('.')[2]``, A329: the block number of ``model.layers.<b>.…``). Within
      each label z = (alpha - mean) / (std + 1e-8) (np.std, ddof 0), and
      wd = 2 / (1 + exp(-sigmoid_alpha * z)) * base_wd. Labels need not be consecutive.
    """
    metric_scores = np.asarray(alphas, dtype=np.float64)
    n = len(metric_scores)  # A322
    untuned_wd = base_wd
    if assign_func == "tb_linear_map":  # A334
        wd_range = [wd_min_ratio * untuned_wd, wd_max_ratio * untuned_wd]  # A335
        score_range = [min(metric_scores), max(metric_scores)]  # A336
        return np.interp(metric_scores, score_range, wd_range)  # A337
    if assign_func == "tb_sqrt":  # A338
        s = np.sqrt(metric_scores)
        return s / np.sum(np.sqrt(metric_scores) + 1e-8) * n * untuned_wd  # A339
    if assign_func == "tb_log2":  # A340
        s = np.log2(metric_scores)
        return s / np.sum(np.log2(metric_scores) + 1e-8) * n * untuned_wd  # A341
    if assign_func == "layerwise_sigmoid":  # A342
        if blocks is None or len(blocks) != n:
            raise ValueError("layerwise_sigmoid needs one block label per alpha")
        layer_metrics: dict = {}  # A327-332: scores grouped by label, in module order
        for i, label in enumerate(blocks):
            layer_metrics.setdefault(label, []).append(metric_scores[i])
        temps = np.zeros_like(metric_scores)  # A344
        for label, scores in layer_metrics.items():  # A345
            layer_scores = np.array(scores)  # A346
            layer_mean = np.mean(layer_scores)  # A348
            layer_std = np.std(layer_scores) + 1e-8  # A349
            layer_norm = (layer_scores - layer_mean) / layer_std  # A351
            layer_theta = 2 / (1 + np.exp(-sigmoid_alpha * layer_norm))  # A353
            layer_indices = [i for i, b in enumerate(blocks) if b == label]  # A355-356
            for i, theta in zip(layer_indices, layer_theta, strict=True):  # A357
                temps[i] = theta * untuned_wd  # A358
        return temps
    raise NotImplementedError(assign_func)  # A359-360


# ------------------------------------------- the median-xmin Hill alpha (T270-278, A250-258)


def median_alpha(evals) -> float:
    """``pl_fitting='median'`` with ``xmin_pos=2`` (T271-275, A251-255), in float64.

    Eigenvalues sorted ascending, no filtering (filter_zeros=False); i = int(N / 2),
    n = N - i (the xmin element counts),
    alpha = 1 + n / (sum_{j>=i} ln lambda_j - n ln lambda_i).
    NaN for fewer than 2 eigenvalues or any eigenvalue <= 0.
    """
    e = np.sort(np.asarray(evals, dtype=np.float64).ravel())
    N = len(e)
    if N < 2 or not np.all(e > 0):
        return math.nan
    log_e = np.log(e)  # T268 / A248: torch.log
    i = int(N / 2)  # T271 / A251: int(len(nz_eigs) / self.xmin_pos)
    n = float(N - i)  # T273 / A253
    with np.errstate(divide="ignore"):
        return float(1 + n / (np.sum(log_e[i:]) - n * log_e[i]))  # T275 / A255
