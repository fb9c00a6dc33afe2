"""`esdtool report`: a metrics table in, one self-contained HTML page out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from esdtool.cli._console import hush, out, safe
from esdtool.cli._options import JsonOpt, MaxPlotsOpt, QuietOpt
from esdtool.render import MAX_PLOTS

HELP = (
    "Write the HTML report of a metrics table: header, alpha and spikes by depth, a heatmap, "
    "one eigenvalue-spectrum plot per matrix and a sortable table of every row.\n\n"
    "One file with everything inlined: it opens offline and can be mailed or attached. "
    "For the report with a LoRA plan, use esdtool allocate (it writes OUTDIR/report.html).\n\n"
    "For a trained adapter's table, --trajectory adds the spectra_trajectory.parquet that "
    "esdtool.SpectralCallback wrote while it trained: the share of planned rank used per layer "
    "at every step, and the modules whose effective rank still grew at the last step."
)

EXAMPLES = """[bold]Examples[/bold]

  esdtool report metrics.parquet -o report.html

  esdtool report metrics.parquet -o report.html --alpha-column alpha_ks --max-plots 200

  esdtool report adapter.parquet -o report.html --trajectory run/spectra_trajectory.parquet"""


def report(
    metrics: Annotated[
        Path, typer.Argument(help="A metrics table written by esdtool analyze.", show_default=False)
    ],
    output: Annotated[
        str, typer.Option("--output", "-o", help="The HTML file to write.")
    ] = "report.html",
    alpha_column: Annotated[
        str,
        typer.Option(
            "--alpha-column",
            help="Fit drawn on each spectrum: alpha_median, alpha_fix_finger or alpha_ks.",
        ),
    ] = "alpha_median",
    max_plots: MaxPlotsOpt = MAX_PLOTS,
    trajectory: Annotated[
        Path | None,
        typer.Option(
            "--trajectory",
            help="A spectra_trajectory.parquet of the adapter's training: adds the "
            "'Training trajectory' section.",
            show_default=False,
        ),
    ] = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    from esdtool.render import report as write_report

    hush(quiet or as_json)
    result = write_report(
        metrics, output, alpha_column=alpha_column, max_plots=max_plots, trajectory=trajectory
    )
    summary = {
        "report": str(result.output),
        "spectra_plotted": result.plotted,
        "spectra_omitted": result.omitted,
        "bytes": result.size_bytes,
    }
    if as_json:
        print(json.dumps(summary))
    elif not quiet:
        omitted = f" ({result.omitted} not drawn)" if result.omitted else ""
        out.print(
            f"Wrote {safe(str(result.output))}: {result.plotted} spectra{omitted}, "
            f"{result.size_bytes / 1e6:.1f} MB",
            markup=False,
        )
