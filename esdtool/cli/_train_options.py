"""Training options that finetune and ablate share (ablate passes them to every run), declared
once so their names, help and defaults cannot drift apart."""

from __future__ import annotations

from typing import Annotated

import typer

EpochsOpt = Annotated[float, typer.Option("--epochs", help="Passes over the data.")]
MaxStepsOpt = Annotated[
    int, typer.Option("--max-steps", help="Stop after this many steps (overrides --epochs).")
]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", help="Sequences per device per step.")]
GradAccumOpt = Annotated[int, typer.Option("--grad-accum", help="Gradient accumulation steps.")]
MaxLengthOpt = Annotated[
    int, typer.Option("--max-length", help="Truncate sequences to this many tokens.")
]
GradientCheckpointingOpt = Annotated[
    bool, typer.Option("--gradient-checkpointing", help="Trade compute for activation memory.")
]
QloraOpt = Annotated[
    bool, typer.Option("--qlora", help="Load the base model in 4-bit NF4 (bitsandbytes, CUDA).")
]
WarmupStepsOpt = Annotated[
    int, typer.Option("--warmup-steps", help="Linear warmup from 0 to --lr over N steps.")
]
WarmupRatioOpt = Annotated[
    float,
    typer.Option(
        "--warmup-ratio", help="Warmup over this share of the steps (not with --warmup-steps)."
    ),
]
LrSchedulerOpt = Annotated[
    str,
    typer.Option(
        "--lr-scheduler",
        help="Learning-rate schedule after warmup: linear, cosine, cosine_with_restarts, "
        "polynomial, constant, constant_with_warmup or inverse_sqrt.",
    ),
]
WeightDecayOpt = Annotated[
    float, typer.Option("--weight-decay", help="AdamW's decoupled weight decay.")
]
MaxGradNormOpt = Annotated[
    float, typer.Option("--max-grad-norm", help="Clip gradients to this norm (0: no clipping).")
]
