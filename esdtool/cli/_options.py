"""Options shared by several commands, declared once."""

from __future__ import annotations

from typing import Annotated

import typer

DeviceOpt = Annotated[
    str,
    typer.Option(
        "--device",
        help="Where to compute: auto (CUDA if present, else CPU), cpu, cuda or cuda:N.",
    ),
]
RevisionOpt = Annotated[
    str | None,
    typer.Option(
        "--revision", help="Hub branch, tag or commit (hub ids only).", show_default=False
    ),
]
QuietOpt = Annotated[
    bool, typer.Option("--quiet", "-q", help="No progress bar or summary; errors only.")
]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print a machine-readable JSON summary on stdout only.")
]
MaxPlotsOpt = Annotated[
    int,
    typer.Option(
        "--max-plots", help="Draw at most this many spectra in the report; the rest are counted."
    ),
]
PresetOpt = Annotated[
    str | None,
    typer.Option(
        "--preset",
        help="Start from a published method's settings: lora-ar (Adaptive Rank LoRA's code) or "
        "alphapruning (AlphaPruning's alpha_peak and sparsity plan; docs/method.md). Options "
        "given explicitly override it.",
        show_default=False,
    ),
]
