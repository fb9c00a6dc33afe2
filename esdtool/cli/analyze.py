"""`esdtool analyze`: stream a checkpoint's spectra into a parquet metrics table."""

from __future__ import annotations

import json
import os
import time
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from esdtool.analysis import AnalyzeSettings
from esdtool.cli._console import err, hush, out, print_error, safe
from esdtool.cli._options import DeviceOpt, JsonOpt, PresetOpt, QuietOpt, RevisionOpt

if TYPE_CHECKING:
    from esdtool.analysis import AnalyzeResult

HELP = (
    "Compute every weight matrix's eigenvalue spectrum, power-law alphas and spike counts.\n\n"
    "SOURCE is a .safetensors file, a model directory (model.safetensors or a sharded "
    "model.safetensors.index.json), or a Hugging Face hub id such as org/name. A PEFT LoRA "
    "adapter (adapter_config.json + adapter_model.safetensors, a directory or hub id) gives "
    "one row per adapted module for its weight change scaling * B A, with lora_rank and "
    "effective_rank. With --adapter, SOURCE is the adapter's base model and the rows are the "
    "fine-tuned model's weights (each adapted one merged as PEFT merges it, nothing written)."
)

EXAMPLES = """[bold]Examples[/bold]

  esdtool analyze ./my-model -o metrics.parquet

  esdtool analyze meta-llama/Llama-3.2-1B --revision main -o llama.parquet --include 'layers\\.'

  esdtool analyze meta-llama/Llama-3.1-70B --stream -o llama70b.parquet

  HF_HUB_OFFLINE=1 esdtool analyze org/name -o m.parquet --json

  esdtool analyze ./run -o adapter.parquet      # a trained LoRA adapter: planned vs used rank

  esdtool analyze ./base --adapter ./run -o tuned.parquet   # the fine-tuned model, merged"""


class _RichProgress:
    """ProgressHook drawing one bar over bytes analysed, with tensors done and the bytes/s
    rate, and for a hub id a second one over bytes fetched, with its own rate (hidden until
    the first bytes arrive); while a hub id downloads, the first says which of the two rates
    bounds the run. Bytes fetched count every byte received, those of an attempt
    later retried too, so after a dropped connection the count exceeds the checkpoint."""

    def __init__(self) -> None:
        self.bar = Progress(
            TextColumn("[bold blue]{task.description:7}"),
            BarColumn(),
            TextColumn("{task.fields[count]}"),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[bound]}", markup=False),
            TextColumn("{task.fields[current]}", markup=False),
            console=err,
            transient=True,
            disable=not err.is_terminal,
        )
        self.task = self.bar.add_task("analyze", total=None, current="", count="", bound="")
        # Made here, not on the first fetched(): that is called from several threads at once
        # (the header readers, the download thread), and rich's update() is thread-safe.
        self.fetch: TaskID = self.bar.add_task(
            "fetch", total=None, current="", count="", bound="", visible=False
        )
        self._mark: tuple[float, float] | None = None  # (when, seconds waited then)
        self.done = 0
        self.tensors = 0

    def start(self, total_tensors: int, total_bytes: int) -> None:
        self.tensors = total_tensors
        self.bar.update(self.task, total=total_bytes, count=f"0/{total_tensors} tensors")
        self.bar.start()

    def fetched(self, nbytes: int) -> None:
        """Bytes received from the hub (from a reader or download thread), retried ones too."""
        self.bar.update(self.fetch, advance=nbytes, visible=True)

    def close(self) -> None:
        self.bar.stop()

    def waiting(self, seconds: float, now: float | None = None) -> None:
        """Seconds the analysis has waited for the download so far: over each second or more,
        a wait of more than half the time says the download bounds the run, else compute."""
        now = time.monotonic() if now is None else now
        if self._mark is None:
            self._mark = (now, seconds)
            return
        then, before = self._mark
        if now - then >= 1.0:
            share = (seconds - before) / (now - then)
            bound = "download-bound" if share > 0.5 else "compute-bound"
            self.bar.update(self.task, bound=bound)
            self._mark = (now, seconds)

    def advance(self, name: str, nbytes: int) -> None:
        self.done += 1
        count = f"{self.done}/{self.tensors} tensors"
        self.bar.update(self.task, advance=nbytes, count=count, current=safe(name)[-60:])

    def note(self, message: str) -> None:
        err.print(f"Note: {safe(message)}", markup=False, style="yellow", soft_wrap=True)


SourceArg = Annotated[
    str,
    typer.Argument(help="A .safetensors file, a model directory or a hub id.", show_default=False),
]
MetricsOut = Annotated[str, typer.Option("--output", "-o", help="The parquet table to write.")]
DtypeOpt = Annotated[
    str | None,
    typer.Option(
        "--dtype",
        help="Eigenvalue precision: auto (float64 on CPUs and FP64-capable GPUs, else "
        "float32), float64 (Gram + eigvalsh) or float32 (singular values; alphas within 1e-3). "
        "Default: auto.",
        show_default=False,
    ),
]
IncludeOpt = Annotated[
    str | None,
    typer.Option(
        "--include", help="Only tensors whose name matches this regex.", show_default=False
    ),
]
ExcludeOpt = Annotated[
    str | None,
    typer.Option(
        "--exclude", help="Skip tensors whose name matches this regex.", show_default=False
    ),
]


def analyze(
    source: SourceArg,
    output: MetricsOut = "metrics.parquet",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    revision: RevisionOpt = None,
    max_tensor_gb: Annotated[
        float | None,
        typer.Option(
            "--max-tensor-gb",
            help="Skip (with the reason) any tensor whose analysis needs more memory than this; "
            "default: half the available RAM, or 80% of the GPU's free memory.",
            show_default=False,
        ),
    ] = None,
    preset: PresetOpt = None,
    eig_threshold: Annotated[
        float | None,
        typer.Option(
            "--eig-threshold",
            help="Eigenvalues at or below this are left out of the power-law fits (default: 1e-5).",
            show_default=False,
        ),
    ] = None,
    min_evals: Annotated[
        int | None,
        typer.Option(
            "--min-evals",
            help="Skip matrices with fewer eigenvalues (min side) than this (default: 10).",
            show_default=False,
        ),
    ] = None,
    sigma_fit: Annotated[
        str | None,
        typer.Option(
            "--sigma-fit",
            help="Marchenko-Pastur sigma estimator: median (robust) or mean (Adaptive Rank "
            "LoRA's) (default: median).",
            show_default=False,
        ),
    ] = None,
    spike_rule: Annotated[
        str | None,
        typer.Option(
            "--spike-rule",
            help="Spikes above the Tracy-Widom quantile edge (tw) or above Adaptive Rank LoRA's "
            "edge (lora-ar) (default: tw).",
            show_default=False,
        ),
    ] = None,
    tw_quantile: Annotated[
        float | None,
        typer.Option(
            "--tw-quantile",
            help="Tracy-Widom level of the spike threshold, in (0, 1) (default: 0.99).",
            show_default=False,
        ),
    ] = None,
    conv_norm: Annotated[
        float | None,
        typer.Option(
            "--conv-norm",
            help="Conv kernels' spectra are scaled by this before pooling (default: 0.5).",
            show_default=False,
        ),
    ] = None,
    weighted_alpha: Annotated[
        str | None,
        typer.Option(
            "--weighted-alpha",
            help="The alpha behind alpha_weighted and log_alpha_norm: median, fix_finger or ks "
            "(default: ks).",
            show_default=False,
        ),
    ] = None,
    estimator: Annotated[
        str,
        typer.Option(
            "--estimator",
            help="plain (each matrix's own spectrum) or farms: also the FARMS columns "
            "(alpha_*_farms, spikes_farms), fitted to the pooled spectrum of equally shaped "
            "windows, free of the aspect-ratio bias (docs/method.md).",
        ),
    ] = "plain",
    farms_rows: Annotated[
        int,
        typer.Option("--farms-rows", help="FARMS window rows (capped at the smaller side)."),
    ] = 100,
    farms_q: Annotated[
        float,
        typer.Option("--farms-q", help="FARMS window aspect ratio, columns / rows."),
    ] = 2.0,
    farms_grid: Annotated[
        int,
        typer.Option(
            "--farms-grid",
            help="FARMS windows per side (grid x grid). FARMS' LLM runs: --farms-rows 2000 "
            "--farms-q 1 --farms-grid 15.",
        ),
    ] = 10,
    raw_codes: Annotated[
        bool,
        typer.Option(
            "--raw-codes",
            help="Analyse quantized weights' stored FP8 codes as they are, instead of the "
            "weights they encode (dequantized by default).",
        ),
    ] = False,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume/--no-resume",
            help="Reuse the rows a killed or interrupted run with the same output left.",
        ),
    ] = True,
    stream: Annotated[
        bool,
        typer.Option(
            "--stream",
            help="Hub ids: read each tensor with an HTTP range request and store nothing but "
            "the table (for a disk smaller than the model, or a one-off look). Default: download "
            "into the HF cache while the analysis runs.",
        ),
    ] = False,
    adapter: Annotated[
        str | None,
        typer.Option(
            "--adapter",
            help="A PEFT LoRA adapter (directory or hub id) trained on SOURCE: analyse the "
            "fine-tuned model, each adapted weight merged as PEFT's merge_and_unload merges it "
            "(W + scaling * B A; DoRA's magnitude applied; quantized weights dequantized first) "
            "while the weights stream, without writing merged weights. Compare with the base: "
            "esdtool compare base.parquet tuned.parquet.",
            show_default=False,
        ),
    ] = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    given = dict(
        dtype=dtype, eig_threshold=eig_threshold, min_evals=min_evals, sigma_fit=sigma_fit,
        spike_rule=spike_rule, tw_quantile=tw_quantile, conv_norm=conv_norm,
        weighted_alpha=weighted_alpha,
    )  # fmt: skip
    settings = AnalyzeSettings.from_preset(
        preset, device=device, include=include, exclude=exclude, max_tensor_gb=max_tensor_gb,
        raw_codes=raw_codes, estimator=estimator, farms_rows=farms_rows, farms_q=farms_q,
        farms_grid=farms_grid, **{k: v for k, v in given.items() if v is not None},
    )  # fmt: skip
    hush(quiet or as_json)
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 speaks for all
    hook = None if (quiet or as_json or not main_rank) else _RichProgress()
    try:
        _prefetch(source, revision, stream, settings, hook)
        from esdtool.analysis import analyze as run_analyze  # torch: seconds, the link busy

        result = run_analyze(
            source, output, settings, revision=revision, progress=hook, resume=resume,
            stream=stream, adapter=adapter,
        )  # fmt: skip
    finally:
        from esdtool.io import hub_prefetch

        hub_prefetch.discard()  # one the analysis did not take (it failed first) stops
        if hook is not None:
            hook.close()
    if not main_rank:
        raise typer.Exit(2 if result.errors else 0)
    if as_json:
        print(json.dumps(result.to_dict()))
    elif not quiet:
        _print_summary(result)
    for line in result.warnings:
        if not (as_json or quiet):
            err.print(f"Warning: {safe(line)}", markup=False, style="yellow", soft_wrap=True)
    for line in result.errors:
        print_error(line)
    if result.errors:
        raise typer.Exit(2)


def _prefetch(
    source: str,
    revision: str | None,
    stream: bool,
    settings: AnalyzeSettings,
    hook: _RichProgress | None,
) -> None:
    """A hub id on the default road starts fetching (commit, index, headers, then the shards
    the selection reads) before torch and the spectral code are imported; the analysis takes
    it over (esdtool.io.hub_prefetch). Nothing else changes what is imported first. Under
    torchrun only the ranks' own analysis fetches (they share the cache)."""
    if stream or os.environ.get("WORLD_SIZE", "1") != "1":
        return
    from esdtool.io import hub_prefetch

    if hub_prefetch.wants_hub(source, stream):
        fetched = hook.fetched if hook is not None else None
        hub_prefetch.start(source, revision, on_fetch=fetched, selects=settings.selects)


def _print_summary(result: AnalyzeResult) -> None:
    table = Table(title="esdtool analyze", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    source = safe(result.source) + (f" @ {safe(result.revision)}" if result.revision else "")
    table.add_row("source", Text(source))
    table.add_row("rows", str(result.rows))
    table.add_row("analysed", str(result.analysed))
    table.add_row("skipped", str(result.skipped))
    if result.errors or result.warnings:
        table.add_row("errors / non-finite", f"{len(result.errors)} / {len(result.warnings)}")
    for line in result.quantization:
        table.add_row("quantized", Text(safe(line)))
    if result.merged_adapter:
        merged = result.merged_adapter
        saved = merged.get("modules_to_save") or 0
        also = f", {saved} modules_to_save" if saved else ""
        table.add_row("merged adapter",
                      Text(f"{safe(str(merged.get('path')))} ({merged.get('modules')} "
                           f"modules{also})"))  # fmt: skip
    if result.rank_use:
        modules, planned, used = result.rank_use
        share = f" ({100 * used / planned:.0f}%)" if planned else ""
        table.add_row("LoRA rank used", f"{used} of {planned} planned{share}, {modules} modules")
    table.add_row("device", result.device)
    table.add_row("time", f"{result.seconds:.2f} s")
    if result.resumed:
        table.add_row("resumed", f"{result.resumed} rows from an earlier run")
    if result.slowest:
        name, seconds = result.slowest
        table.add_row("slowest", Text(f"{safe(name)} ({seconds * 1000:.1f} ms)"))
    table.add_row("written", Text(str(result.output)))
    out.print(table)
