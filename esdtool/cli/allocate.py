"""`esdtool allocate`: a metrics table in, a PEFT LoRA config with per-module ranks out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table
from rich.text import Text

from esdtool.cli._console import err, hush, out, safe
from esdtool.cli._options import JsonOpt, MaxPlotsOpt, PresetOpt, QuietOpt
from esdtool.render import MAX_PLOTS

if TYPE_CHECKING:
    from esdtool.plan import AllocateResult

HELP = (
    "Turn a metrics table into a PEFT LoRA config: which modules get an adapter, and which "
    "rank and lora_alpha each gets (rank_pattern / alpha_pattern).\n\n"
    "Writes OUTDIR/adapter_config.json (peft.LoraConfig.from_pretrained loads it) and "
    "OUTDIR/allocation.csv (one row per candidate module) and OUTDIR/report.html (the spectra, "
    "the plan and every metric in one self-contained page)."
)

EXAMPLES = """[bold]Examples[/bold]

  esdtool allocate metrics.parquet -o lora-plan

  esdtool allocate metrics.parquet -o lora-plan --match-rank 8 --rank-scaling sqrt"""


def allocate(
    metrics: Annotated[
        Path, typer.Argument(help="A metrics table written by esdtool analyze.", show_default=False)
    ],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Directory to write the config to.")
    ] = Path("lora-plan"),
    target: Annotated[
        str | None,
        typer.Option(
            "--target",
            help="What the plan sets per module: lora (ranks), pruning (sparsity, as "
            "AlphaPruning), lr (learning-rate factors, as TempBalance) or weight-decay "
            "(weight-decay factors, as AlphaDecay) (default: lora).",
            show_default=False,
        ),
    ] = None,
    sparsity: Annotated[
        float | None,
        typer.Option(
            "--sparsity",
            help="pruning: the model's share of weights to prune, in "
            "(0, 1) (the parameter-weighted mean of the ratios).",
            show_default=False,
        ),
    ] = None,
    epsilon: Annotated[
        float | None,
        typer.Option(
            "--epsilon",
            help="pruning: before scaling, ratios span 1 - e to 1 + e times the mean; "
            "e in (0, 1) (default: 0.3).",
            show_default=False,
        ),
    ] = None,
    mapping: Annotated[
        str | None,
        typer.Option(
            "--mapping",
            help="pruning: block (each module takes its block's mean "
            "alpha, AlphaPruning's default) or module.",
            show_default=False,
        ),
    ] = None,
    lr_map: Annotated[
        str | None,
        typer.Option(
            "--lr-map",
            help="lr: linear (default), sqrt, log2 or step (TempBalance's maps).",
            show_default=False,
        ),
    ] = None,
    wd_map: Annotated[
        str | None,
        typer.Option(
            "--wd-map",
            help="weight-decay: linear (default), sqrt, log2 or sigmoid (AlphaDecay's maps).",
            show_default=False,
        ),
    ] = None,
    min_factor: Annotated[
        float | None,
        typer.Option(
            "--min-factor",
            help="lr / weight-decay: the factor of the lowest alpha "
            "(default: 0.5 for lr, 0.6666 for weight-decay).",
            show_default=False,
        ),
    ] = None,
    max_factor: Annotated[
        float | None,
        typer.Option(
            "--max-factor",
            help="lr / weight-decay: the factor of the highest alpha "
            "(default: 1.5 for lr, 3 for weight-decay).",
            show_default=False,
        ),
    ] = None,
    min_evals: Annotated[
        int | None,
        typer.Option(
            "--min-evals",
            help="lr / weight-decay: modules with fewer eigenvalues "
            "keep the base value (default: 50).",
            show_default=False,
        ),
    ] = None,
    targets: Annotated[
        str | None,
        typer.Option(
            "--targets",
            help="attention, mlp or all-linear (the block projections there), or a regex on "
            "module names picking the candidates (default: all-linear).",
        ),
    ] = None,
    preset: PresetOpt = None,
    alpha_column: Annotated[
        str | None,
        typer.Option(
            "--alpha-column",
            help="Alpha column feeding the score: alpha_median, alpha_fix_finger, "
            "alpha_ks, or their _farms twins (analyze --estimator farms) (default: alpha_median).",
        ),
    ] = None,
    spikes_column: Annotated[
        str | None,
        typer.Option(
            "--spikes-column",
            help="Spike-count column feeding the score: num_spikes, num_spikes_bulk or "
            "spikes_farms (default: num_spikes).",
        ),
    ] = None,
    normalise_within: Annotated[
        str | None,
        typer.Option(
            "--normalise-within",
            help="Normalise alpha and spikes within each shape or module kind (shape, kind) "
            "instead of over all candidates (none, the default): modules compete with peers.",
            show_default=False,
        ),
    ] = None,
    w_hill: Annotated[
        float | None,
        typer.Option("--w-hill", help="Weight of the normalised alpha (default: 0.7)."),
    ] = None,
    w_mp_spikes: Annotated[
        float | None,
        typer.Option("--w-mp-spikes", help="Weight of the inverted spike count (default: 0.3)."),
    ] = None,
    top_n_percentile: Annotated[
        float | None,
        typer.Option(
            "--top-n-percentile",
            help="Fraction of candidates that get an adapter, in (0, 1] (default: 0.5).",
        ),
    ] = None,
    select: Annotated[
        str | None,
        typer.Option(
            "--select",
            help="Keep the highest scores, or the lowest (as Adaptive Rank LoRA's code does; "
            "default: highest).",
        ),
    ] = None,
    min_rank: Annotated[
        int | None, typer.Option("--min-rank", help="Smallest rank given (default: 4).")
    ] = None,
    max_rank: Annotated[
        int | None, typer.Option("--max-rank", help="Largest rank given (default: 64).")
    ] = None,
    rank_scaling: Annotated[
        str | None,
        typer.Option(
            "--rank-scaling", help="Score-to-rank curve: linear, log or sqrt (default: linear)."
        ),
    ] = None,
    alpha_factor: Annotated[
        float | None,
        typer.Option("--alpha-factor", help="lora_alpha = factor x rank (default: 2.0)."),
    ] = None,
    budget_params: Annotated[
        int | None,
        typer.Option(
            "--budget-params", help="Rescale ranks to about this many trainable parameters."
        ),
    ] = None,
    match_rank: Annotated[
        int | None,
        typer.Option(
            "--match-rank", help="Budget = uniform LoRA at this rank on the same candidates."
        ),
    ] = None,
    budget_percent: Annotated[
        float | None,
        typer.Option(
            "--budget-percent",
            help="Budget = this percentage of the analysed model's parameters (e.g. 0.5).",
            show_default=False,
        ),
    ] = None,
    rank_multiple: Annotated[
        int | None,
        typer.Option(
            "--rank-multiple",
            help="Every rank a multiple of K (8 suits kernels and serving engines); the budget "
            "is still met (default: 1).",
            show_default=False,
        ),
    ] = None,
    task_type: Annotated[
        str,
        typer.Option(
            "--task-type", help="PEFT task type (CAUSAL_LM, SEQ_CLS, FEATURE_EXTRACTION, ...)."
        ),
    ] = "CAUSAL_LM",
    lora_dropout: Annotated[float, typer.Option("--lora-dropout", help="LoRA dropout.")] = 0.05,
    use_rslora: Annotated[
        bool, typer.Option("--use-rslora", help="Rank-stabilised scaling (alpha / sqrt r).")
    ] = False,
    use_dora: Annotated[
        bool, typer.Option("--use-dora", help="Weight-decomposed LoRA (DoRA).")
    ] = False,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify",
            help="Check with PEFT on the model (meta device) that the plan applies exactly.",
        ),
    ] = False,
    write_report: Annotated[
        bool, typer.Option("--report/--no-report", help="Write OUTDIR/report.html.")
    ] = True,
    max_plots: MaxPlotsOpt = MAX_PLOTS,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    from esdtool.plan import AllocateSettings
    from esdtool.plan import allocate as run_allocate

    hush(quiet or as_json)
    given = dict(
        targets=targets, alpha_column=alpha_column, spikes_column=spikes_column, w_hill=w_hill,
        w_mp_spikes=w_mp_spikes, top_n_percentile=top_n_percentile, select=select,
        min_rank=min_rank, max_rank=max_rank, rank_scaling=rank_scaling,
        alpha_factor=alpha_factor, budget_params=budget_params, match_rank=match_rank,
        normalise_within=normalise_within, budget_percent=budget_percent,
        rank_multiple=rank_multiple, target=target,
        sparsity=sparsity, epsilon=epsilon, mapping=mapping, lr_map=lr_map, wd_map=wd_map,
        min_factor=min_factor, max_factor=max_factor, min_evals=min_evals,
    )  # fmt: skip
    settings = AllocateSettings.from_preset(
        preset, **{k: v for k, v in given.items() if v is not None}
    )
    result = run_allocate(
        metrics, output, settings, task_type=task_type, lora_dropout=lora_dropout,
        use_rslora=use_rslora, use_dora=use_dora, verify=verify, report=write_report,
        max_plots=max_plots,
    )  # fmt: skip
    if result.modules is not None:
        if as_json:
            print(json.dumps(result.summary()))
        elif not quiet:
            _print_module_summary(result)
        return
    if as_json:
        print(json.dumps({**result.summary(), "verified": verify}))
    elif not quiet:
        _print_summary(result, verify)
        if result.serving.warning:
            err.print(f"Warning: {result.serving.warning}", markup=False, style="yellow",
                      soft_wrap=True)  # fmt: skip
        for note in result.allocation.notes:
            err.print(f"Note: {safe(note)}", markup=False, style="yellow", soft_wrap=True)


def _print_module_summary(result: AllocateResult) -> None:
    plan = result.modules
    assert plan is not None
    s = result.summary()
    table = Table(title=f"esdtool allocate --target {plan.target}", show_header=False,
                  title_justify="left")  # fmt: skip
    table.add_column(style="bold")
    table.add_column()
    table.add_row("modules", f"{s['modules']}" + (" (model order)" if plan.model_order else ""))
    table.add_row(plan.column, f"{s[plan.column + '_min']:.4g}..{s[plan.column + '_max']:.4g}")
    if plan.target == "pruning":
        table.add_row("weighted mean", f"{s['sparsity_weighted_mean']:.6g}")
    written = [str(f) for f in (result.csv, *result.files, result.report) if f is not None]
    table.add_row("written", Text(", ".join(written)))
    out.print(table)
    for note in plan.notes:
        err.print(f"Note: {safe(note)}", markup=False, style="yellow", soft_wrap=True)


def _print_summary(result: AllocateResult, verified: bool = False) -> None:
    s = result.summary()
    table = Table(title="esdtool allocate", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("modules adapted", f"{s['adapted']} of {s['candidates']} candidates")
    table.add_row("ranks", f"{s['rank_min']}..{s['rank_max']}")
    hist = "  ".join(f"r{r}: {n}" for r, n in s["rank_histogram"].items())
    table.add_row("rank histogram", Text(hist))
    table.add_row("trainable params", f"{s['trainable_params']:,}")
    table.add_row("same cost as", f"uniform r={s['equal_cost_rank']:.1f} on all candidates")
    table.add_row("shape", Text(safe(result.allocation.shape.sentence())))
    if verified:  # --verify raises on any departure: reaching here means every module matched
        table.add_row("verified", "PEFT gives every module its planned rank and alpha "
                      "(the model built from config.json on the meta device)")  # fmt: skip
    if s["budget_params"] is not None:
        table.add_row("budget", f"{s['budget_params']:,}")
    serving = result.serving
    table.add_row(
        "vLLM --max-lora-rank",
        f"{serving.vllm_max_lora_rank} (largest rank {serving.largest_rank})"
        if serving.fits
        else f"none: largest rank {serving.largest_rank} is above every value vLLM accepts",
    )
    written = [s["config"], s["csv"]] + ([s["report"]] if s["report"] else [])
    table.add_row("written", Text(", ".join(written)))
    out.print(table)
