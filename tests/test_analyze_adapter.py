"""`esdtool analyze MODEL --adapter ADAPTER` (issue 28 item 3): the fine-tuned model's spectra
from the base model's files and the adapter's, each adapted weight merged while it streams and
never written. Checked against PEFT itself on the real MiniLM: the rows equal those of PEFT's
``merge_and_unload()`` saved and analysed, and of ``analyze(peft_model, weights="merged")``, to
1e-10 relative on every number (float64 analysis), for plain LoRA, rsLoRA (with per-module
rank_pattern / alpha_pattern and modules_to_save) and DoRA (magnitudes trained away from the
row norms), on linear layers and the word embeddings; a GPT-2's fan_in_fan_out Conv1D layers; a
quantized base (merged after dequantization); resume fingerprints; two torchrun processes; and
one-line refusals naming the adapter file."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from esdtool import AnalyzeSettings, analyze, load_metrics
from helpers import ROOT, decoded, run_cli

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

# Two encoder layers, the word embeddings and the pooler: every kind of adapted module, and
# tensors the adapter leaves alone, in a few seconds.
INCLUDE = r"(encoder\.layer\.[01]\.|word_embeddings|pooler)"
SETTINGS = AnalyzeSettings(include=INCLUDE, dtype="float64")
TARGETS = ["query", "value", "intermediate.dense", "word_embeddings"]
VARIANTS = {
    # The notebook road (weights="merged") refuses LoRA on embeddings: none here, to compare.
    "lora": {"target_modules": TARGETS[:-1]},
    "rslora": {
        "use_rslora": True,
        "rank_pattern": {"layer.0.attention.self.query": 4, "word_embeddings": 12},
        "alpha_pattern": {"value": 32},
        "modules_to_save": ["pooler"],
    },
    "dora": {"use_dora": True},
}
# Columns that say where a row came from or how long it took, not what it measured.
NOT_MEASURED = {"seconds", "lora_rank", "lora_alpha"}


@pytest.fixture(scope="module")
def base(minilm_dir):
    """MiniLM as stored (float32): PEFT's merge then rounds as it does for a user's model."""
    transformers.logging.set_verbosity_error()
    return transformers.AutoModel.from_pretrained(minilm_dir).eval()


def _train(base, directory, seed=1, **options):
    """A PEFT LoRA adapter on ``base`` with every factor random (B too, so the update is not
    zero) and DoRA magnitudes moved off the row norms; saved to ``directory``."""
    options = {"target_modules": TARGETS, **options}
    config = peft.LoraConfig(r=8, lora_alpha=16, **options)
    model = peft.get_peft_model(copy.deepcopy(base), config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.2 * torch.rand_like(param))
            elif "lora_" in name:
                param.normal_(0, 0.05)
            elif "modules_to_save" in name:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="module")
def variants(base, minilm_dir, tmp_path_factory):
    """Per variant: the PEFT model, its adapter directory, esdtool's table of MiniLM with the
    adapter (through the real CLI), and PEFT's merge_and_unload saved and analysed."""
    built = {}
    for kind, options in VARIANTS.items():
        work = tmp_path_factory.mktemp(kind)
        model = _train(base, work / "adapter", **options)
        merged = copy.deepcopy(model).merge_and_unload()
        merged.save_pretrained(work / "merged", safe_serialization=True)
        theirs = analyze(work / "merged", settings=SETTINGS).table
        built[kind] = (model, work, theirs)
    return built


@pytest.fixture(scope="module")
def base_table(minilm_dir):
    """MiniLM's own rows, selected as the merged tables' are."""
    return analyze(minilm_dir, settings=SETTINGS).table


def _cli_table(capsys, minilm_dir, adapter, out):
    code, _, stderr = run_cli(["analyze", minilm_dir, "--adapter", adapter, "-o", out,
                               "--include", INCLUDE, "--dtype", "float64", "-q"],
                              capsys)  # fmt: skip
    assert code == 0, stderr
    return load_metrics(out)


def _report(what, worst):
    """The largest relative difference measured (shown with pytest -s)."""
    print(f"max relative difference, {what}: {worst:.3g}")


def _same_rows(ours, theirs, what):
    """Every row of ``theirs`` is in ``ours`` with the same status and, to 1e-10 relative,
    the same eigenvalues and numbers; returns the largest relative difference."""
    ours, theirs = ours.set_index("name"), theirs.set_index("name")
    assert set(theirs.index) <= set(ours.index), what
    numeric = [c for c in theirs.select_dtypes("number").columns if c not in NOT_MEASURED]
    worst = 0.0
    for name, want in theirs.iterrows():
        got = ours.loc[name]
        assert got.status == want.status, (what, name)
        if want.status != "ok":
            continue
        a, b = np.asarray(got.eigenvalues, np.float64), np.asarray(want.eigenvalues, np.float64)
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10 * b[-1], err_msg=f"{what} {name}")
        worst = max(worst, float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-30 * b[-1]))))
        for column in numeric:
            if pd.isna(want[column]):
                assert pd.isna(got[column]), (what, name, column)
                continue
            x, y = float(got[column]), float(want[column])
            assert x == pytest.approx(y, rel=1e-10, abs=1e-300), (what, name, column)
            worst = max(worst, abs(x - y) / abs(y) if y else abs(x))
    return worst


@pytest.mark.parametrize("kind", list(VARIANTS))
def test_rows_equal_peft_merge_and_unload(variants, kind, minilm_dir, tmp_path, capsys):
    """(a) the real CLI with --adapter; (b) PEFT's merge_and_unload saved with safetensors and
    analysed: every row's eigenvalues and numeric columns equal to 1e-10 relative."""
    _, work, theirs = variants[kind]
    ours = _cli_table(capsys, minilm_dir, work / "adapter", tmp_path / "tuned.parquet")
    _report(kind, _same_rows(ours, theirs, kind))
    label = {"lora": "merged lora", "rslora": "merged lora rslora", "dora": "merged dora"}[kind]
    adapted = ours[ours.adapter == label]
    # 2 layers x (query, value, intermediate.dense), and the word embeddings
    modules = 6 if kind == "lora" else 7
    assert len(adapted) == modules and set(adapted.status) == {"ok"}
    assert adapted.name.str.endswith(".weight").all()  # the base tensors' names
    others = ours[ours.adapter.isna()]
    saved = ours[ours.adapter == "merged modules_to_save"]
    assert len(others) + len(adapted) + len(saved) == len(ours)
    assert len(saved) == (2 if kind == "rslora" else 0)  # pooler.dense weight and bias
    assert ours.lora_rank.isna().all()  # a model's table, not an adapter's
    meta = ours.attrs["esdtool"]
    assert meta["adapter"] is None
    merged = meta["merged_adapter"]
    assert merged["path"] == str((work / "adapter").resolve())
    written = json.loads((work / "adapter" / "adapter_config.json").read_text())
    assert merged["config"]["use_dora"] is (kind == "dora")
    assert all(merged["config"][k] == written[k] for k in merged["config"])
    # every module the adapter adapts (6 layers), not only the selected ones
    assert merged["modules"] == (18 if kind == "lora" else 19) and merged["note"] is None
    assert merged["modules_to_save"] == (1 if kind == "rslora" else 0)  # the pooler


def test_rows_equal_the_notebook_road_and_differ_from_the_base(variants, minilm_dir, base_table):
    """(c) plain LoRA: analyze(peft_model, weights="merged") gives the same rows; and the
    merge changed the adapted weights' spectra (and nothing else)."""
    model, work, _ = variants["lora"]
    ours = analyze(minilm_dir, settings=SETTINGS, adapter=work / "adapter").table
    notebook = analyze(model, settings=SETTINGS, weights="merged").table
    _report("lora (notebook)", _same_rows(ours, notebook, "notebook"))
    plain = base_table.set_index("name")
    for name, row in ours.set_index("name").iterrows():
        if row.status != "ok":
            continue
        moved = abs(row.lambda_max / plain.loc[name].lambda_max - 1)
        assert (moved > 1e-4) == (row.adapter == "merged lora"), name


def test_compare_base_with_tuned_is_a_model_comparison(variants, minilm_dir, base_table):
    """The tutorial's last step: the base's table and the merged one compare as two versions
    of one model (not refused as a model against an adapter), module by module; only the
    adapted modules' lambda_max moved."""
    from esdtool import compare

    _, work, _ = variants["lora"]
    tuned = analyze(minilm_dir, settings=SETTINGS, adapter=work / "adapter").table
    result = compare([base_table, tuned], labels=["base", "tuned"])
    table = result.table.set_index("module")
    assert table.in_all.all()
    adapted = set(tuned[tuned.adapter == "merged lora"].module)
    assert len(adapted) == 6
    moved = set(table.index[table.delta_lambda_max.abs() > 1e-6 * table["lambda_max@base"]])
    assert moved == adapted


def _gpt2(directory):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128,
                                     n_positions=64)  # fmt: skip
    model = transformers.GPT2Model(config).eval()
    model.save_pretrained(directory)
    return model


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_fan_in_fan_out_layers_merge_transposed(tmp_path, dora):
    """GPT-2's Conv1D stores weights [in, out] (fan_in_fan_out): PEFT merges (B A)^T and takes
    DoRA's norms per output row of the transposed weight; esdtool the same."""
    base = _gpt2(tmp_path / "base")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc", "c_proj", "wte"],
                             fan_in_fan_out=True, use_dora=dora)  # fmt: skip
    model = peft.get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.2 * torch.rand_like(param))
            elif "lora_" in name:
                param.normal_(0, 0.1)
    model.save_pretrained(tmp_path / "adapter")
    model.merge_and_unload().save_pretrained(tmp_path / "merged", safe_serialization=True)
    settings = AnalyzeSettings(dtype="float64")
    ours = analyze(tmp_path / "base", settings=settings, adapter=tmp_path / "adapter").table
    theirs = analyze(tmp_path / "merged", settings=settings).table
    _report(f"gpt2 {'dora' if dora else 'lora'}", _same_rows(ours, theirs, "gpt2"))
    assert (ours.adapter == ("merged dora" if dora else "merged lora")).sum() == 9


def test_a_quantized_base_is_merged_after_dequantization(base, minilm_dir, tmp_path, capsys):
    """An FP8 (per-channel) MiniLM: each adapted weight is dequantized, then merged; the rows
    equal those of the dequantized weights saved in float32 with the same adapter. --raw-codes
    (the stored codes) cannot take an update: one line."""
    weights = load_file(str(minilm_dir / "model.safetensors"))
    quantized = dict(weights)
    for name in [n for n in weights if n.endswith(("query.weight", "value.weight"))]:
        scale = weights[name].abs().amax(dim=1, keepdim=True) / 448
        quantized[name] = (weights[name] / scale).to(torch.float8_e4m3fn)
        quantized[name + "_scale"] = scale
    config = json.loads((minilm_dir / "config.json").read_text())
    for directory, tensors, quantization in (
        (tmp_path / "fp8", quantized, {"quant_method": "fbgemm_fp8"}),
        (tmp_path / "deq", None, None),
    ):
        directory.mkdir()
        if tensors is None:  # esdtool's own dequantized weights, stored as float32
            tensors = {**weights, **decoded(tmp_path / "fp8")}
        save_file(tensors, str(directory / "model.safetensors"))
        extra = {"quantization_config": quantization} if quantization else {}
        (directory / "config.json").write_text(json.dumps({**config, **extra}))
    _train(base, tmp_path / "adapter")
    # A quantized weight is merged where it is decoded (the analysis device), a plain one on the
    # CPU: pinned to the CPU, the two roads round the same float32 products alike.
    settings = AnalyzeSettings(include=r"encoder\.layer\.0\.", dtype="float64", device="cpu")
    ours = analyze(tmp_path / "fp8", settings=settings, adapter=tmp_path / "adapter").table
    reference = analyze(tmp_path / "deq", settings=settings, adapter=tmp_path / "adapter").table
    merged = ours[ours.adapter == "merged lora"].set_index("module")
    assert len(merged) == 3  # query, value (quantized) and intermediate.dense (not)
    assert set(merged.quantization.dropna()) == {"fp8_e4m3 channel"}
    assert merged.quantization.notna().sum() == 2
    worst = _same_rows(ours, reference, "fp8")
    code, _, stderr = run_cli(["analyze", tmp_path / "fp8", "--adapter", tmp_path / "adapter",
                               "--raw-codes", "-o", tmp_path / "raw.parquet"], capsys)  # fmt: skip
    assert code == 2 and "--raw-codes" in stderr and len(stderr.strip().splitlines()) == 1
    _report("fp8 base", worst)  # after run_cli, which reads what capsys holds


def _one_line(code, stderr, *fragments):
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("Error:"), stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_what_cannot_be_merged_is_refused_in_one_line(variants, minilm_dir, tmp_path, capsys):
    """Exit 2, one line naming the adapter's file: no adapter there, another PEFT type (LoHa),
    a module the model does not have, a shape it does not have, the model itself an adapter."""
    _, work, _ = variants["lora"]
    good = work / "adapter"

    def run(adapter, source=minilm_dir):
        return run_cli(["analyze", source, "--adapter", adapter, "-o",
                        tmp_path / "x.parquet", "-q"], capsys)  # fmt: skip

    _one_line(*run(tmp_path / "missing")[::2], "--adapter", "no such file or directory")
    _one_line(*run(minilm_dir)[::2], "not a PEFT adapter")

    def copy_of(name, config=None, tensors=None):
        directory = tmp_path / name
        directory.mkdir()
        written = json.loads((good / "adapter_config.json").read_text())
        (directory / "adapter_config.json").write_text(json.dumps({**written, **(config or {})}))
        stored = load_file(str(good / "adapter_model.safetensors"))
        save_file(tensors(stored) if tensors else stored,
                  str(directory / "adapter_model.safetensors"))  # fmt: skip
        return directory

    loha = copy_of("loha", {"peft_type": "LOHA"})
    _one_line(*run(loha)[::2], str(loha / "adapter_config.json"), "LOHA")

    def renamed(stored):
        return {k.replace("layer.0.attention.self.query", "layer.0.attention.self.quey"): v
                for k, v in stored.items()}  # fmt: skip

    absent = copy_of("absent", tensors=renamed)
    _one_line(*run(absent)[::2], str(absent / "adapter_model.safetensors"), "quey",
              "has no weight")  # fmt: skip

    def wider(stored):
        a = "base_model.model.encoder.layer.1.attention.self.value.lora_A.weight"
        return {**stored, a: torch.zeros(8, 385)}

    shape = copy_of("shape", tensors=wider)
    _one_line(*run(shape)[::2], str(shape / "adapter_model.safetensors"), "[384, 385]",
              "[384, 384]")  # fmt: skip
    _one_line(*run(good, source=good)[::2], "is a PEFT adapter itself")
    with pytest.raises(Exception, match="in memory"):
        analyze(variants["lora"][0], adapter=good)


def test_an_adapter_for_another_base_model_is_a_note(variants, minilm_dir, tmp_path, capsys):
    """base_model_name_or_path naming another model, every shape matching: merged, with a
    note (on stderr, in --json and in the table's metadata), not an error."""
    _, work, _ = variants["lora"]
    other = tmp_path / "other"
    other.mkdir()
    config = json.loads((work / "adapter" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "meta-llama/Llama-3.1-8B"
    (other / "adapter_config.json").write_text(json.dumps(config))
    (other / "adapter_model.safetensors").write_bytes(
        (work / "adapter" / "adapter_model.safetensors").read_bytes()
    )
    query = r"layer\.0\.attention\.self\.query"
    code, stdout, stderr = run_cli(["analyze", minilm_dir, "--adapter", other, "-o",
                                    tmp_path / "t.parquet", "--include", query, "--json"],
                                   capsys)  # fmt: skip
    assert code == 0, stderr
    notes = json.loads(stdout)["notes"]
    assert len(notes) == 1 and "Llama-3.1-8B" in notes[0] and "another model" in notes[0]
    assert load_metrics(tmp_path / "t.parquet").attrs["esdtool"]["merged_adapter"]["note"]
    code, _, stderr = run_cli(["analyze", minilm_dir, "--adapter", other, "-o",
                               tmp_path / "u.parquet", "--include", query], capsys)  # fmt: skip
    assert code == 0 and "Note:" in stderr and "Llama-3.1-8B" in stderr


def test_an_adapter_hub_id_merges_like_its_directory(variants, minilm_dir, tmp_path):
    """--adapter org/name (here from the local HF cache, offline): the directory's rows, the
    adapter's commit in the metadata."""
    from helpers import make_hf_cache, run_subprocess

    _, work, _ = variants["lora"]
    make_hf_cache(tmp_path / "hf", "org/tuned", work / "adapter")
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    include = r"encoder\.layer\.0\.attention"
    proc = run_subprocess(["analyze", minilm_dir, "--adapter", "org/tuned", "--include", include,
                           "-o", tmp_path / "hub.parquet", "-q"], env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    hub = load_metrics(tmp_path / "hub.parquet")
    local = analyze(minilm_dir, settings=AnalyzeSettings(include=include),
                    adapter=work / "adapter").table  # fmt: skip
    _same_rows(hub, local, "hub id")
    assert list(hub.adapter.fillna("")) == list(local.adapter.fillna(""))
    merged = hub.attrs["esdtool"]["merged_adapter"]
    assert merged["source"] == "org/tuned" and merged["revision"] == "a" * 40


class _StopAfter:
    """A progress hook that presses Ctrl-C after some tensors, and keeps the notes."""

    def __init__(self, count):
        self.count, self.notes = count, []

    def start(self, total_tensors, total_bytes):
        pass

    def advance(self, name, nbytes):
        self.count -= 1
        if self.count == 0:
            raise KeyboardInterrupt

    def note(self, message):
        self.notes.append(message)


def test_a_resumed_run_of_another_adapter_reuses_no_row(base, minilm_dir, tmp_path):
    """The resume fingerprint holds the adapter: an interrupted run of adapter A, rerun with
    adapter B at the same output, starts afresh and gives B's rows; rerun with A, resumes."""
    from esdtool.errors import AnalysisInterrupted

    _train(base, tmp_path / "a", seed=1)
    _train(base, tmp_path / "b", seed=2)
    # encoder.layer.0: 10 vectors (decided from headers, never kept), then 6 matrices
    settings = AnalyzeSettings(include=r"encoder\.layer\.0\.", dtype="float64")
    out = tmp_path / "t.parquet"
    with pytest.raises(AnalysisInterrupted):
        analyze(minilm_dir, out, settings, adapter=tmp_path / "a", progress=_StopAfter(13))
    hook = _StopAfter(-1)
    resumed = analyze(minilm_dir, out, settings, adapter=tmp_path / "b", progress=hook)
    assert resumed.resumed == 0 and any("starting afresh" in n for n in hook.notes)
    fresh = analyze(minilm_dir, settings=settings, adapter=tmp_path / "b").table
    _same_rows(load_metrics(out), fresh, "another adapter")
    with pytest.raises(AnalysisInterrupted):
        analyze(minilm_dir, out, settings, adapter=tmp_path / "a", progress=_StopAfter(13))
    again = analyze(minilm_dir, out, settings, adapter=tmp_path / "a")
    assert again.resumed > 0


def test_two_torchrun_processes_write_the_single_process_rows(tmp_path):
    """Under torchrun each rank merges its share of the weights: the same table as one process."""
    base = _gpt2(tmp_path / "base")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                             fan_in_fan_out=True)  # fmt: skip
    model = peft.get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.1)
    model.save_pretrained(tmp_path / "adapter")
    settings = AnalyzeSettings()
    single = analyze(tmp_path / "base", settings=settings, adapter=tmp_path / "adapter").table
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "two.parquet"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(port),
        "-m", "esdtool", "analyze", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
        "-o", str(out), "--json",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    if proc.returncode != 0 and "EADDRINUSE" in proc.stderr:
        pytest.skip("torchrun could not bind its rendezvous port")
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = load_metrics(out)
    assert two.attrs["esdtool"]["world_size"] == 2
    assert list(two.name) == list(single.name) and list(two.adapter) == list(single.adapter)
    _report("torchrun", _same_rows(two, single, "torchrun"))
