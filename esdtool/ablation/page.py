"""ablation.html: one offline page (no script, styles inline, images as data URIs, autoescaped)
with the verdicts, the metric against the learning rate per arm with its seed band, the
chosen-rate results and the paired differences with their 95% intervals, the budget table and
every run (failed ones with their reason)."""

from __future__ import annotations

import base64
import io
import math
from importlib import resources
from typing import Any

import jinja2

from esdtool.ablation.summary import ArmSummary
from esdtool.untrusted import printable
from esdtool.version import __version__


def render(
    design: dict[str, Any], rows: list[dict[str, Any]], summaries: list[ArmSummary],
    *, total_runs: int,
) -> str:  # fmt: skip
    """The page's HTML."""
    has_test = design["inputs"].get("test_data") is not None
    kind = "loss" if design["settings"].get("metric", "loss") == "loss" else "exact match"
    metric = f"{'test' if has_test else 'eval'} {kind}"
    done = [r for r in rows if r["status"] == "ok"]
    failed = [r for r in rows if r["status"] != "ok"]
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    page = resources.files("esdtool.templates").joinpath("ablation.html.j2").read_text("utf-8")
    return env.from_string(page).render(
        version=__version__,
        model=printable(str(design["inputs"]["model"])),
        inputs={k: printable(str(v)) for k, v in design["inputs"].items() if v is not None},
        metric=metric,
        optimistic=not has_test,
        budget=design["budget"],
        seeds=design["settings"]["seeds"],
        lrs=design["settings"]["lrs"],
        progress={"done": len(done), "failed": len(failed), "total": total_runs},
        verdicts=[s.verdict for s in summaries if s.arm != "uniform"],
        edges=edge_warnings(summaries, design["settings"]["lrs"]),
        arms=[_arm_row(s, design) for s in summaries],
        lr_plot=_b64(_lr_plot(summaries, metric=f"eval {kind}")),
        chooser=f"eval {kind}",
        better="lowest" if kind == "loss" else "highest",
        diff_plot=_b64(_diff_plot(summaries, metric)) if len(summaries) > 1 else None,
        runs=[{k: _fmt(v) for k, v in r.items()} for r in rows],
        off_budget=[
            {
                "name": f"{r['arm']}/lr{r['lr']:g}/seed{r['seed']}",
                "params": r["trainable_params"],
                "off": r["trainable_params"] / design["budget"] - 1,
            }
            for r in done
            if isinstance(r.get("trainable_params"), int | float)
            and design["budget"]
            and abs(r["trainable_params"] / design["budget"] - 1) > 0.01
        ],
        failed=[
            {
                "name": f"{r['arm']}/lr{r['lr']:g}/seed{r['seed']}",
                "reason": printable(str(r["reason"])),
            }
            for r in failed
        ],
    )


def edge_warnings(summaries: list[ArmSummary], lrs: list[float]) -> list[str]:
    """Arms whose chosen learning rate is the grid's smallest or largest: their best rate may
    lie beyond the grid, and the comparison is then between untuned arms."""
    if len(lrs) < 2:
        return []
    low, high = min(lrs), max(lrs)
    found = []
    for s in summaries:
        if s.lr is not None and s.lr in (low, high):
            side = "largest" if s.lr == high else "smallest"
            found.append(f"{s.arm}: its best learning rate is the grid's {side} ({s.lr:g}); "
                         "its best may lie beyond the grid: widen --lrs")  # fmt: skip
    return found


def _arm_row(s: ArmSummary, design: dict[str, Any]) -> dict[str, Any]:
    info = design["arms"].get(s.arm, {})
    return {
        "arm": s.arm,
        "how": printable(str(info.get("how", ""))),
        "params": info.get("peft_params"),
        "share": (info.get("peft_params") or 0) / design["budget"] - 1 if design["budget"] else 0,
        "lr": "—" if s.lr is None else f"{s.lr:g}",
        "final": _ci(s.final.mean, s.final.low, s.final.high, s.final.n),
        "diff": "—"
        if s.diff is None
        else _ci(s.diff.mean, s.diff.low, s.diff.high, s.diff.n, signed=True),
        "runs": f"{s.runs - s.failed} of {s.runs}" + (f" ({s.failed} failed)" if s.failed else ""),
    }


def _ci(mean: float, low: float, high: float, n: int, signed: bool = False) -> str:
    if n == 0 or not math.isfinite(mean):
        return "—"
    sign = "+" if signed else ""
    if n < 2:
        return f"{mean:{sign}.4f} (one seed)"
    return f"{mean:{sign}.4f} [{low:{sign}.4f}, {high:{sign}.4f}] (n={n})"


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return printable(str(value)) if value is not None else ""


def _figure(height: float = 3.6) -> tuple[Any, Any]:
    from matplotlib.figure import Figure  # a Figure of its own: no pyplot, no global state

    fig = Figure(figsize=(6.4, height), layout="constrained")
    return fig, fig.add_subplot()


def _svg(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    return buf.getvalue()


def _b64(svg: bytes) -> str:
    return base64.b64encode(svg).decode()


def _lr_plot(summaries: list[ArmSummary], metric: str) -> bytes:
    """Mean eval loss against the learning rate per arm, the band its 95% interval over seeds,
    the chosen rate marked."""
    fig, ax = _figure()
    for s in summaries:
        lrs = sorted(s.eval_by_lr)
        if not lrs:
            continue
        means = [s.eval_by_lr[lr].mean for lr in lrs]
        line = ax.plot(lrs, means, marker="o", label=printable(s.arm))[0]
        lows = [s.eval_by_lr[lr].low for lr in lrs]
        highs = [s.eval_by_lr[lr].high for lr in lrs]
        if all(math.isfinite(v) for v in lows + highs):
            ax.fill_between(lrs, lows, highs, color=line.get_color(), alpha=0.15)
        if s.lr is not None:
            ax.plot([s.lr], [s.eval_by_lr[s.lr].mean], marker="*", markersize=12,
                    color=line.get_color())  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(f"{metric} (mean over seeds)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=4, fontsize=8, frameon=False)
    return _svg(fig)


def _diff_plot(summaries: list[ArmSummary], metric: str) -> bytes:
    """Each arm's paired difference to uniform with its 95% interval; the zero line."""
    shown = [s for s in summaries if s.diff is not None and s.diff.n > 0]
    fig, ax = _figure(1.2 + 0.45 * max(1, len(shown)))
    for i, s in enumerate(shown):
        d = s.diff
        assert d is not None
        if math.isfinite(d.low):
            ax.errorbar([d.mean], [i], xerr=[[d.mean - d.low], [d.high - d.mean]], fmt="o",
                        capsize=4)  # fmt: skip
        else:
            ax.plot([d.mean], [i], "o")
    ax.axvline(0, color="#888", linewidth=1)
    ax.set_yticks(range(len(shown)), [printable(s.arm) for s in shown])
    ax.invert_yaxis()  # the arms top to bottom in the table's order
    better = "negative" if "loss" in metric else "positive"
    ax.set_xlabel(f"{metric}: arm minus uniform, same seed ({better}: better than uniform)")
    return _svg(fig)
