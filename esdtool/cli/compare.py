"""`esdtool compare`: two or more metrics tables in, per-module changes out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from esdtool.cli._console import hush, out, safe
from esdtool.cli._options import JsonOpt, QuietOpt

HELP = (
    "Compare metrics tables of one model family (base and fine-tuned, checkpoints over "
    "training), module by module: every alpha, the spike count, stable rank and norms side by "
    "side and their change from the first table to the last.\n\n"
    "Writes OUTDIR/comparison.csv and OUTDIR/report.html (the changes by depth; with three "
    "tables or more, alpha_ks table by table, or effective_rank for LoRA adapters).\n\n"
    "Given one spectra_trajectory.parquet (esdtool.SpectralCallback writes it while an adapter "
    "trains), compares its steps, labelled 'step N'; a trajectory is compared on its own."
)

EXAMPLES = """[bold]Examples[/bold]

  esdtool compare base.parquet tuned.parquet -o compare

  esdtool compare run-a/adapter.parquet run-b/adapter.parquet --labels uniform,esd -o compare

  esdtool compare step-100.parquet step-500.parquet step-1000.parquet -o compare --json

  esdtool compare run/spectra_trajectory.parquet -o compare"""


def compare(
    tables: Annotated[
        list[Path],
        typer.Argument(
            help="Two or more tables written by esdtool analyze, or one training trajectory.",
            show_default=False,
        ),
    ],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Directory to write the comparison to.")
    ] = Path("compare"),
    labels: Annotated[
        str | None,
        typer.Option(
            "--labels",
            help="One label per table, comma-separated (default: the file names, or their "
            "folders' when the names are the same).",
            show_default=False,
        ),
    ] = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    from esdtool.comparison import compare as run_compare

    hush(quiet or as_json)
    given = None if labels is None else [part.strip() for part in labels.split(",")]
    result = run_compare(tables, output, labels=given)
    summary = result.summary()
    if as_json:
        print(json.dumps(summary))
    elif not quiet:
        # alpha_ks where the tables have it; a LoRA adapter's rows have none: their norms
        metric = next((m for m in ("alpha_ks", "frobenius_norm")
                       if summary["delta"][m]["median"] is not None), "alpha_ks")  # fmt: skip
        delta = summary["delta"][metric]
        missing = sum(summary["unmatched"].values())
        change = (
            f"{metric} change median {delta['median']:.3g}, largest {delta['max_abs']:.3g}"
            if delta["median"] is not None
            else "no metric in common to compare"
        )
        out.print(
            f"Compared {summary['modules_compared']} modules of {len(result.labels)} tables "
            f"({missing} unmatched); {change}. Wrote {safe(str(output))}/comparison.csv and "
            "report.html",
            markup=False,
        )
