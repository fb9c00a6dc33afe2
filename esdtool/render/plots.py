"""The report's figures: matplotlib (no pyplot state) rendered to SVG bytes.

Each function takes plain data (a DataFrame of table rows, an array of eigenvalues) and returns
the SVG: sharp on any screen (a 2x phone or laptop display blurs a PNG drawn at 1x), and smaller
than a PNG at 2x (19 kB against 57 kB for a spectrum). Text stays text (``svg.fonttype`` none),
drawn in the reader's sans-serif font. Text that comes from a checkpoint (module kinds in
legends and heatmap rows) goes through ``_label``: shortened, printable, and with ``$`` escaped
so it is never parsed as mathtext.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd
from matplotlib import rc_context
from matplotlib.backends.backend_svg import FigureCanvasSVG
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import FuncFormatter, MaxNLocator

from esdtool.spectral.marchenko_pastur import mp_density

DPI = 80  # SVG user units per inch: a 5.4-inch figure is drawn 432 CSS pixels wide
# HTSR's reading of alpha: below 2 over-fitted / very heavy-tailed, above 6 barely trained.
WELL_TRAINED = (2.0, 6.0)


def _svg(fig: Figure) -> bytes:
    FigureCanvasSVG(fig)
    buf = io.BytesIO()
    with rc_context({"svg.fonttype": "none", "svg.hashsalt": "esdtool"}):
        fig.savefig(buf, format="svg", dpi=DPI, metadata={"Date": None, "Creator": None})
    return buf.getvalue()


def _label(text: str, limit: int = 40) -> str:
    """Untrusted text as a plot label: middle-ellipsised (a 10 kB name cannot blow up a figure),
    control characters dropped, and ``$`` escaped so matplotlib never parses it as mathtext."""
    text = "".join(c if c.isprintable() else "?" for c in text)
    if len(text) > limit:
        text = text[: limit // 2 - 1] + "…" + text[-(limit // 2) :]
    return text.replace("$", r"\$")


def title_text(text: str) -> str:
    """Untrusted text made safe for a figure's title (see :func:`_label`)."""
    return _label(text, limit=80)


def by_depth(
    table: pd.DataFrame,
    column: str,
    title: str,
    ylabel: str,
    band: tuple[float, float] | None,
    xlabel: str = "layer",
) -> bytes:
    """``column`` against layer index, one line per module kind (median over experts)."""
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")  # legible at a phone's width
    ax = fig.add_subplot()
    data = table.dropna(subset=["layer", "kind", column])
    if band is not None:
        ax.axhspan(*band, color="#2a9d8f", alpha=0.08, lw=0)
    for kind, group in data.groupby("kind", sort=True):
        series = group.groupby("layer")[column].median()
        ax.plot(series.index, series.values, marker="o", ms=3, lw=1.2, label=_label(kind))
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers and steps: no 0.2, 0.4
    ax.grid(alpha=0.3)
    if data["kind"].nunique():  # below the axes: a legend at the side halves the plot on a phone
        fig.legend(loc="outside lower center", fontsize=8, frameon=False, ncol=2)
    return _svg(fig)


# More layers than this: one colour scale (a colour bar) instead of a legend entry per line.
LEGEND_LAYERS = 12


def share_over_steps(shares: pd.DataFrame, title: str) -> bytes:
    """``share`` against ``step``, one line per ``layer`` (coloured by depth; a null layer, the
    modules outside the blocks, in grey), the y axis from 0 to 1: the rows
    :func:`esdtool.render.trajectory.rank_share_by_layer` gives."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import ListedColormap, Normalize

    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    blocks = shares.dropna(subset=["layer"])
    layers = sorted(int(v) for v in blocks["layer"].unique())
    norm = Normalize(min(layers, default=0), max(max(layers, default=0), 1))
    # viridis without its pale yellow end, which a white page swallows
    cmap = ListedColormap(colormaps["viridis"](np.linspace(0, 0.85, 256)))
    for layer in layers:
        line = blocks[blocks["layer"] == layer]
        ax.plot(line["step"], line["share"], marker="o", ms=3, lw=1.2, color=cmap(norm(layer)),
                label=f"layer {layer}")  # fmt: skip
    outside = shares[shares["layer"].isna()]
    rest = []
    if len(outside):
        rest = ax.plot(outside["step"], outside["share"], marker="s", ms=3, lw=1.2, ls="--",
                       color="#8a8f94", label="outside the blocks")  # fmt: skip
    ax.set(title=title, xlabel="training step", ylabel="effective rank / min(lora_rank, M)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    if len(layers) > LEGEND_LAYERS:
        fig.colorbar(ScalarMappable(norm, cmap), ax=ax, fraction=0.04, pad=0.01, label="layer")
    handles = rest if len(layers) > LEGEND_LAYERS else ax.get_lines()
    if handles:  # below the axes, as by_depth's
        fig.legend(handles=handles, loc="outside lower center", fontsize=8, frameon=False, ncol=4)
    return _svg(fig)


def _wrapped(title: str, width_inches: float, fontsize: float = 10) -> str:
    """``title`` broken into lines that fit ``width_inches`` at ``fontsize`` (a character is
    about 0.6 em wide in the default sans-serif): a narrow figure (two layers) must not cut it."""
    import textwrap

    per_line = max(16, int(width_inches * 72 / (0.6 * fontsize)))
    return textwrap.fill(title, per_line, break_on_hyphens=False)


def heatmap(
    table: pd.DataFrame,
    column: str,
    title: str,
    cmap: str,
    integer: bool = False,
    scale: tuple[float, float] | None = None,
) -> bytes:
    """:func:`heatmap_figure` as SVG."""
    return _svg(heatmap_figure(table, column, title, cmap, integer, scale))


def heatmap_figure(
    table: pd.DataFrame,
    column: str,
    title: str,
    cmap: str,
    integer: bool = False,
    scale: tuple[float, float] | None = None,
) -> Figure:
    """Median ``column`` over (module kind x layer); blank where a cell has no value. Every
    kind and layer of ``table`` gets its row and column, even with no value at all (a kind no
    module of which got a rank shows as a blank row, not as a missing one). ``scale``: fixed
    colour limits (a share in [0, 1]) instead of the data's range, and labels to 2 decimals."""
    data = table.dropna(subset=["layer", "kind", column])
    grid = data.pivot_table(index="kind", columns="layer", values=column, aggfunc="median")
    kinds = sorted(table.dropna(subset=["layer", "kind"])["kind"].unique())
    layers = sorted(table.dropna(subset=["layer"])["layer"].unique())
    if kinds and layers:
        grid = grid.reindex(index=kinds, columns=layers)
    n_kinds, n_layers = grid.shape if grid.size else (1, 1)
    height = min(1.2 + 0.32 * n_kinds, 30)  # hundreds of kinds must not make a 5 MB image
    width = min(3 + 0.45 * n_layers, 16)
    fig = Figure(figsize=(width, height), layout="constrained")
    ax = fig.add_subplot()
    if grid.size:
        image = ax.imshow(
            np.ma.masked_invalid(grid.to_numpy(dtype=float)),
            aspect="auto",
            cmap=cmap,
            **({"vmin": scale[0], "vmax": scale[1]} if scale else {}),
        )
        fig.colorbar(image, ax=ax, fraction=0.03, pad=0.01)
        step_y = max(1, n_kinds // 80)
        ax.set_yticks(range(0, n_kinds, step_y), [_label(str(k)) for k in grid.index[::step_y]],
                      fontsize=8)  # fmt: skip
        step = max(1, n_layers // 24)
        ax.set_xticks(range(0, n_layers, step), [str(int(v)) for v in grid.columns[::step]])
        if grid.size <= 600:
            for (i, j), value in np.ndenumerate(grid.to_numpy(dtype=float)):
                if not math.isnan(value):
                    label = f"{value:.0f}" if integer else f"{value:.{2 if scale else 1}f}"
                    shade = image.cmap(image.norm(value))
                    dark = 0.299 * shade[0] + 0.587 * shade[1] + 0.114 * shade[2] < 0.55
                    ax.text(j, i, label, ha="center", va="center", fontsize=8,
                            color="white" if dark else "black")  # fmt: skip
    ax.set_title(_wrapped(title, width), fontsize=10)
    ax.set_xlabel("layer")
    return fig


def score_map(plan: pd.DataFrame, title: str) -> bytes:
    """The plan's score of every candidate, module kind x layer, adapted cells outlined and
    labelled with their rank: why each module got what it got, in one figure."""
    grid = plan.pivot_table(index="kind", columns="layer", values="score", aggfunc="median")
    rank = plan.pivot_table(index="kind", columns="layer", values="rank", aggfunc="max")
    kept = plan.pivot_table(index="kind", columns="layer", values="selected", aggfunc="max")
    rank, kept = rank.reindex_like(grid), kept.reindex_like(grid)
    n_kinds, n_layers = grid.shape if grid.size else (1, 1)
    height = min(1.6 + 0.36 * n_kinds, 30)
    width = min(3.5 + 0.5 * n_layers, 16)
    fig = Figure(figsize=(width, height), layout="constrained")
    ax = fig.add_subplot()
    if grid.size:
        image = ax.imshow(
            np.ma.masked_invalid(grid.to_numpy(dtype=float)), aspect="auto", cmap="Blues",
            vmin=0, vmax=1,
        )  # fmt: skip
        fig.colorbar(image, ax=ax, fraction=0.03, pad=0.01, label="score")
        step_y = max(1, n_kinds // 80)
        ax.set_yticks(range(0, n_kinds, step_y), [_label(str(k)) for k in grid.index[::step_y]],
                      fontsize=9)  # fmt: skip
        step = max(1, n_layers // 24)
        ax.set_xticks(range(0, n_layers, step), [str(int(v)) for v in grid.columns[::step]])
        flags = kept.to_numpy(dtype=float)
        ranks = rank.to_numpy(dtype=float)
        for (i, j), flag in np.ndenumerate(flags):
            if flag == 1:
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, lw=2, ec="#d1495b"))
                if grid.size <= 600 and not math.isnan(ranks[i, j]):
                    shade = image.cmap(image.norm(grid.to_numpy(dtype=float)[i, j]))
                    dark = 0.299 * shade[0] + 0.587 * shade[1] + 0.114 * shade[2] < 0.55
                    ax.text(j, i, f"r{ranks[i, j]:.0f}", ha="center", va="center", fontsize=8,
                            color="white" if dark else "black")  # fmt: skip
    ax.set_title(_wrapped(title, width), fontsize=10)
    ax.set_xlabel("layer")
    return _svg(fig)


def esd(evals: np.ndarray, row: dict, alpha_column: str, threshold: float = 0.0) -> bytes:
    """:func:`esd_figure` as SVG bytes."""
    return _svg(esd_figure(evals, row, alpha_column, threshold))


def esd_figure(evals: np.ndarray, row: dict, alpha_column: str, threshold: float = 0.0) -> Figure:
    """Log-log eigenvalue histogram with the power-law tail fitted from xmin, the MP bulk
    density and edge, and the Tracy-Widom spike threshold.

    The matrix's name is left to the page's caption: no untrusted text is drawn here.
    Only eigenvalues above ``threshold`` (the fits' nonzero set) are drawn: numerically zero
    ones would stretch the axis over many empty decades. Fixed margins and no minor ticks:
    constrained layout and log minor ticks cost 10x the drawing itself.
    """
    fig = Figure(figsize=(5.4, 3.9))
    # The legend sits below the axes, in two columns, where it cannot cover the histogram.
    fig.subplots_adjust(left=0.13, right=0.97, top=0.91, bottom=0.31)
    ax = fig.add_subplot()
    low_rank = row.get("fit_status") == "low_rank"  # a LoRA update: its r eigenvalues, all
    lam = np.asarray(evals, dtype=float)
    floor_at = 0.0 if low_rank else max(threshold, 0.0)
    lam = lam[np.isfinite(lam) & (lam > floor_at)]  # a crafted table may hold inf
    # A FARMS column's fit is of the pooled window spectrum, not of the spectrum drawn here:
    # the plot draws this matrix's own fit of the same method and names the FARMS alpha.
    method = alpha_column.removeprefix("alpha_").removesuffix("_farms")
    alpha, xmin = row.get(f"alpha_{method}"), row.get(f"xmin_{method}")
    spikes = row.get("num_spikes")
    head = f"α = {alpha:.2f} ({method})" if _finite(alpha) else f"α: no fit ({method})"
    farms = row.get(alpha_column) if alpha_column.endswith("_farms") else None
    head += f" · FARMS α {farms:.2f}" if _finite(farms) else ""
    head += f" · spikes {int(spikes)}" if spikes is not None and not pd.isna(spikes) else ""
    if low_rank:
        used, r = row.get("effective_rank"), row.get("lora_rank")
        head = "low-rank update" + (
            f" · effective rank {int(used)} of r = {int(r)}" if _finite(used) and _finite(r) else ""
        )
    ax.set_title(head, fontsize=11, loc="left")
    ax.set_xlabel("eigenvalue λ", fontsize=9)
    if lam.size >= 2 and lam[-1] > lam[0]:
        edges = np.geomspace(lam[0], lam[-1], int(np.clip(2 * math.sqrt(lam.size), 20, 80)) + 1)
        counts, _ = np.histogram(lam, edges)
        density = counts / (lam.size * np.diff(edges))
        ax.stairs(np.where(density > 0, density, np.nan), edges, fill=True, color="#8ab6d6")
        floor = density[density > 0].min() / 3
        sigma = row.get("sigma_mp")
        if _finite(sigma) and sigma > 0 and _finite(row.get("M")) and _finite(row.get("N")):
            grid = np.geomspace(lam[0], lam[-1], 400)
            mp = mp_density(grid, sigma, int(row["M"]), int(row["N"]))
            ax.plot(grid, np.where(mp > floor, mp, np.nan), color="#555", lw=1, label="MP bulk")
        if _finite(alpha) and _finite(xmin) and xmin > 0:
            tail = lam[lam >= xmin]
            x = np.geomspace(xmin, lam[-1], 50)
            y = tail.size / lam.size * (alpha - 1) / xmin * (x / xmin) ** -alpha
            ax.plot(x, y, color="#e76f51", lw=1.8, label=f"power law from xmin={xmin:.3g}")
        for value, style, color, label in (
            (row.get("bulk_max"), ":", "#777777", "MP edge"),  # dotted grey vs dashed dark
            (row.get("tw_threshold"), "--", "#264653", "spike threshold"),
        ):
            if _finite(value):
                ax.axvline(value, color=color, ls=style, lw=1.2, label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.minorticks_off()
        ax.xaxis.set_major_formatter(FuncFormatter(_decade))
        ax.yaxis.set_major_formatter(FuncFormatter(_decade))
        ax.set_ylim(bottom=floor)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, frameon=False, loc="upper center", bbox_to_anchor=(0.45, -0.2),
                      ncol=2)  # fmt: skip
    ax.set_ylabel("density", fontsize=9)
    ax.tick_params(labelsize=9)
    return fig


_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def _decade(value: float, _pos: object = None) -> str:
    """Log tick label as plain text (10⁻³): mathtext labels cost most of a figure's time."""
    exponent = round(math.log10(value)) if value > 0 else 0
    return "10" + str(exponent).translate(_SUPERSCRIPT)


def _finite(value: object) -> bool:
    return isinstance(value, int | float | np.floating) and math.isfinite(float(value))


def module_values(plan: pd.DataFrame, column: str, ylabel: str, alpha_label: str) -> bytes:
    """A per-module plan by depth: its number (top) and the alpha it came from (bottom), one
    line per module kind (the median where a layer holds several of a kind)."""
    fig = Figure(figsize=(6.4, 6.0), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    data = plan.dropna(subset=["layer"])
    for kind, group in data.groupby("kind", sort=True):
        by_layer = group.groupby("layer")
        top.plot(by_layer[column].median(), marker="o", ms=3, lw=1.2, label=_label(kind))
        bottom.plot(by_layer["mapped_alpha"].median(), marker="o", ms=3, lw=1.2)
    top.set(ylabel=ylabel, title=f"{ylabel} by layer")
    bottom.set(ylabel=alpha_label, xlabel="layer")
    for ax in (top, bottom):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if data["kind"].nunique():
        fig.legend(loc="outside lower center", fontsize=8, frameon=False, ncol=2)
    return _svg(fig)
