"""esdtool.analyze on models already in memory (issue 17): a torch module, a PEFT-wrapped one
(base or merged weights) or a state dict gives the same table as the checkpoint on disk, and
``output=None`` writes nothing."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from esdtool import AnalyzeSettings, analyze, load_metrics

transformers = pytest.importorskip("transformers")

SETTINGS = AnalyzeSettings(dtype="float64", device="cpu")


def _same(a, b, columns=("status", "alpha_ks", "alpha_median", "lambda_max", "num_spikes")):
    a, b = a.set_index("name"), b.set_index("name")
    common = a.index.intersection(b.index)
    assert len(common) >= len(b) - 1, set(b.index) - set(common)
    for column in columns:
        x, y = a.loc[common, column], b.loc[common, column]
        if x.dtype.kind == "f":
            np.testing.assert_allclose(x.to_numpy(float), y.to_numpy(float), rtol=1e-12)
        else:
            assert list(x) == list(y), column


def test_module_equals_its_checkpoint(minilm_dir, minilm_table, tmp_path):
    model = transformers.AutoModel.from_pretrained(minilm_dir)
    before = set(tmp_path.iterdir())
    result = analyze(model, settings=SETTINGS)
    assert result.output is None and set(tmp_path.iterdir()) == before
    table = result.table
    assert list(table.columns) == list(minilm_table.columns)
    assert (table.dtypes == minilm_table.dtypes).all()
    assert table.attrs["esdtool"]["source_kind"] == "memory"
    assert (
        table.attrs["esdtool"]["schema_version"] == minilm_table.attrs["esdtool"]["schema_version"]
    )
    _same(table, minilm_table)  # position_ids is a buffer, not a parameter: one row fewer


def test_state_dict_and_output_file(minilm_dir, minilm_table, tmp_path):
    from safetensors.torch import load_file

    state = load_file(str(minilm_dir / "model.safetensors"))
    result = analyze(state, tmp_path / "m.parquet", SETTINGS)
    written = load_metrics(tmp_path / "m.parquet")
    assert result.table.drop(columns=["seconds"]).equals(written.drop(columns=["seconds"]))
    _same(written, minilm_table)


def test_peft_base_and_merged_weights(tiny_causal_lm):
    """'base' reads the frozen weights; 'merged' each adapted weight plus its update, which
    must be what PEFT's own merge_and_unload gives."""
    peft = pytest.importorskip("peft")
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_causal_lm)
    plain = analyze(base, settings=SETTINGS).table
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                             init_lora_weights=False)  # fmt: skip
    torch.manual_seed(0)
    wrapped = peft.get_peft_model(copy.deepcopy(base), config)
    as_base = analyze(wrapped, settings=SETTINGS, weights="base").table
    _same(as_base, plain)
    assert "(base weights)" in as_base.attrs["esdtool"]["source"]
    merged = analyze(wrapped, settings=SETTINGS, weights="merged").table
    reference = analyze(copy.deepcopy(wrapped).merge_and_unload(), settings=SETTINGS).table
    _same(merged, reference)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert (
        merged.set_index("name").loc[q, "lambda_max"]
        != plain.set_index("name").loc[q, "lambda_max"]
    )


def test_bad_in_memory_input_is_one_error():
    from esdtool.errors import OptionError

    with pytest.raises(OptionError, match="maps names to tensors"):
        analyze({"w": [1, 2, 3]})
    with pytest.raises(OptionError, match="weights must be one of base, merged"):
        analyze({"w": torch.ones(20, 20)}, weights="adapters")


def test_notebook_twins(minilm_dir, tmp_path):
    """The loop in Python without files: analyze -> allocate -> report, then save each."""
    peft = pytest.importorskip("peft")
    from esdtool import allocate, plot_esd, report

    model = transformers.AutoModel.from_pretrained(minilm_dir)
    table = analyze(model, settings=SETTINGS).table
    plan = allocate(table, task_type="FEATURE_EXTRACTION")
    assert plan.config is None and not any(tmp_path.iterdir())
    assert len(plan.rank_pattern) == 18 and set(plan.alpha_pattern) == set(plan.rank_pattern)
    config = plan.to_lora_config()
    assert isinstance(config, peft.LoraConfig) and config.rank_pattern == plan.rank_pattern
    wrapped = peft.get_peft_model(model, config)
    adapted = {n.removeprefix("base_model.model.").removesuffix(".lora_A.default")
               for n, _ in wrapped.named_modules() if n.endswith("lora_A.default")}  # fmt: skip
    assert len(adapted) == 18
    saved = plan.save(tmp_path / "plan")
    assert saved.config.is_file() and (tmp_path / "plan" / "report.html").is_file()
    page = report(table, plan=plan)
    assert page.output is None and page._repr_html_().startswith("<iframe srcdoc=")
    assert "Plan at a glance" in page.html
    assert page.save(tmp_path / "r.html").read_text() == page.html
    name = "encoder.layer.0.attention.self.query.weight"
    figure = plot_esd(table, name)
    assert figure.axes and figure.axes[0].get_xscale() == "log"
    from esdtool.errors import OptionError

    with pytest.raises(OptionError, match="no analysed row"):
        plot_esd(table, "nope")


def test_a_file_source_with_no_output_writes_nothing(minilm_dir, minilm_table, tmp_path):
    """A path analysed with output=None: the same table, no parquet, no resume sidecar; an
    interrupt says that nothing is kept rather than naming a sidecar."""
    from esdtool.errors import AnalysisInterrupted

    result = analyze(minilm_dir, settings=SETTINGS)
    assert result.output is None and not any(minilm_dir.glob("*.partial*"))
    _same(result.table, minilm_table)

    class Stop:
        def start(self, tensors, nbytes):
            pass

        def advance(self, name, nbytes):
            raise KeyboardInterrupt

    with pytest.raises(AnalysisInterrupted, match="no row is kept"):
        analyze(minilm_dir, settings=SETTINGS, progress=Stop())


def _tiny_peft(tiny_causal_lm, **config):
    peft = pytest.importorskip("peft")
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_causal_lm)
    torch.manual_seed(0)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                           init_lora_weights=False, **config)  # fmt: skip
    return peft.get_peft_model(base, lora)


def test_merged_weights_refuse_what_is_not_a_sum(tiny_causal_lm):
    """DoRA's merge rescales by its magnitude: 'merged' refuses it rather than add B A alone."""
    from esdtool.errors import OptionError

    wrapped = _tiny_peft(tiny_causal_lm, use_dora=True)
    with pytest.raises(OptionError, match="DoRA"):
        analyze(wrapped, settings=SETTINGS, weights="merged")
    with pytest.raises(OptionError, match="for a PEFT model"):
        analyze({"w": torch.ones(20, 20)}, weights="merged")


def test_merged_adapters_disabled_adapters_and_modules_to_save(tiny_causal_lm):
    """An adapter already merged is not added twice; disabled adapters are not added; a
    modules_to_save copy stands in for its original, under the original's name."""
    from esdtool.errors import OptionError

    wrapped = _tiny_peft(tiny_causal_lm, modules_to_save=["lm_head"])
    with torch.no_grad():
        wrapped.base_model.model.lm_head.modules_to_save["default"].weight.mul_(3.0)
    reference = analyze(copy.deepcopy(wrapped).merge_and_unload(), settings=SETTINGS).table
    merged = analyze(wrapped, settings=SETTINGS, weights="merged").table
    _same(merged, reference)
    assert "lm_head.weight" in set(merged.name) and not merged.name.str.contains("modules_to").any()
    wrapped.merge_adapter()
    _same(analyze(wrapped, settings=SETTINGS, weights="merged").table, reference)
    with pytest.raises(OptionError, match="merged into the base weights"):
        analyze(wrapped, settings=SETTINGS, weights="base")
    wrapped.unmerge_adapter()
    plain = analyze(wrapped, settings=SETTINGS, weights="base").table
    with wrapped.disable_adapter():
        _same(analyze(wrapped, settings=SETTINGS, weights="merged").table, plain)


def test_a_model_on_the_meta_device_is_one_error(tiny_causal_lm):
    from esdtool.errors import OptionError

    config = transformers.AutoConfig.from_pretrained(tiny_causal_lm)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(OptionError, match="meta device"):
        analyze(model)
    with pytest.raises(OptionError, match="holds no tensor"):
        analyze({})


def test_report_and_tiny_model_never_overwrite(minilm_dir, minilm_metrics, tmp_path):
    """ReportResult.save refuses the table and the model, as report(output=) does; the tiny
    model refuses a directory of someone else's files; a frame that is no table is one error."""
    import pandas as pd

    from esdtool import allocate, plot_esd, report
    from esdtool.errors import MetricsSchemaError, OutputError
    from esdtool.training.tiny import make_tiny_causal_lm

    page = report(minilm_metrics)
    with pytest.raises(OutputError):
        page.save(minilm_metrics)
    with pytest.raises(OutputError):
        page.save(minilm_dir / "model.safetensors")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match="not empty"):
        make_tiny_causal_lm(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    for call in (lambda: report(pd.DataFrame()), lambda: allocate(pd.DataFrame()),
                 lambda: plot_esd(pd.DataFrame({"name": []}), "x")):  # fmt: skip
        with pytest.raises(MetricsSchemaError, match="not an esdtool metrics table"):
            call()
