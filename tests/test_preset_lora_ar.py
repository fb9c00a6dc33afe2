"""`--preset lora-ar` reproduces Adaptive Rank LoRA's plan exactly (issue 15).

The expected plan comes from tests/origin_lora_ar.py, an independent plain-numpy
re-implementation of the origin's src/adaptive_rank_assignment.py (line references in its
comments), run on the model's own weights in named_modules order. It was checked to give the
same plan as the origin's code itself on MiniLM, a conv network and a tied Llama.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import origin_lora_ar as origin
import pytest

from esdtool import AllocateSettings, AnalyzeSettings, load_metrics
from helpers import run_cli

transformers = pytest.importorskip("transformers")


def _esdtool_plan(model_dir: Path, tmp_path: Path, capsys, task_type: str):
    table = tmp_path / "m.parquet"
    code, _, err = run_cli(["analyze", model_dir, "-o", table, "--preset", "lora-ar", "-q"], capsys)
    assert code == 0, err
    plan = tmp_path / "plan"
    code, _, err = run_cli(
        ["allocate", table, "-o", plan, "--preset", "lora-ar", "--task-type", task_type,
         "--verify", "-q"], capsys,
    )  # fmt: skip
    assert code == 0, err
    config = json.loads((plan / "adapter_config.json").read_text())
    return config, json.loads((plan / "esdtool_plan.json").read_text()), table


def _unanchored(pattern: dict[str, int]) -> dict[str, int]:
    """esdtool writes keys as ^ + re.escape(module): PEFT matches them like the origin's raw
    names (a key matches the end of a module name at a dot boundary)."""
    out = {}
    for key, value in pattern.items():
        assert key.startswith("^"), key
        out[re.sub(r"\\(.)", r"\1", key[1:])] = value
    return out


def _origin(model) -> tuple[dict[str, int], dict[str, int], list[str]]:
    order = origin.candidate_modules(model)
    return (*origin.origin_plan(origin.weights_of(model, order), order), order)


def test_minilm_plan_is_the_origins(minilm_dir, tmp_path, capsys):
    config, record, table = _esdtool_plan(minilm_dir, tmp_path, capsys, "FEATURE_EXTRACTION")
    ranks, alphas, order = _origin(transformers.AutoModel.from_pretrained(minilm_dir))
    assert "pooler.dense" in order and len(order) == 37  # the origin's candidates
    assert len(ranks) == 18
    assert _unanchored(config["rank_pattern"]) == ranks
    assert _unanchored(config["alpha_pattern"]) == alphas
    assert record["allocate_settings"]["preset"] == "lora-ar"
    html = (tmp_path / "plan" / "report.html").read_text()
    assert "analysis preset lora-ar, allocation preset lora-ar" in html
    assert "alpha_ks and num_spikes weighted 0.7/0.3, the lowest 0.5" in html
    meta = load_metrics(table).attrs["esdtool"]
    assert meta["settings"]["preset"] == "lora-ar" and meta["settings"]["spike_rule"] == "lora-ar"


def test_tied_lm_head_is_a_candidate(tmp_path, capsys):
    """A causal LM whose lm_head is tied to the embeddings (no lm_head tensor in the file): the
    origin analyses and may adapt lm_head; so does the preset, from the embedding's row."""
    import torch

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=300, max_position_embeddings=64,
        tie_word_embeddings=True, initializer_range=0.3,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(tmp_path / "model", safe_serialization=True)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in set(f.keys())
    ours, _, _ = _esdtool_plan(tmp_path / "model", tmp_path, capsys, "CAUSAL_LM")
    ranks, alphas, order = _origin(model)
    assert order[-1] == "lm_head"
    assert _unanchored(ours["rank_pattern"]) == ranks
    assert _unanchored(ours["alpha_pattern"]) == alphas
    assert any(k == "lm_head" for k in ranks) == any(k == "^lm_head" for k in ours["rank_pattern"])


def test_explicit_options_override_the_preset():
    a = AnalyzeSettings.from_preset("lora-ar", dtype="float64", tw_quantile=0.9)
    assert (a.dtype, a.sigma_fit, a.spike_rule, a.tw_quantile) == (
        "float64",
        "mean",
        "lora-ar",
        0.9,
    )
    b = AllocateSettings.from_preset("lora-ar", select="highest")
    assert (b.select, b.alpha_column, b.candidates) == ("highest", "alpha_ks", "model")
    assert AllocateSettings.from_preset(None) == AllocateSettings()


def test_unknown_preset_is_one_line(tmp_path, capsys, minilm_dir):
    code, _, err = run_cli(["analyze", minilm_dir, "-o", tmp_path / "m.parquet", "--preset",
                            "lora"], capsys)  # fmt: skip
    assert code == 2 and "--preset must be one of lora-ar" in err and "Traceback" not in err


def test_lora_ar_spike_rule_per_matrix(tmp_path):
    """--spike-rule lora-ar with the mean sigma: per matrix, the origin's edge and spike count
    (float64 on both sides), for linear matrices of several shapes and conv kernels, whose M and
    N the origin takes over (kh*kw, out, in)."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from esdtool import analyze

    generator = torch.Generator().manual_seed(0)
    weights = {
        "a.weight": torch.randn(96, 40, generator=generator),
        "b.weight": torch.randn(50, 50, generator=generator) + 0.5,  # a strong spike
        "c.weight": torch.randn(16, 12, 3, 3, generator=generator),  # M = 9 for the origin
        "d.weight": torch.randn(20, 24, 1, 1, generator=generator),  # M = 1 for the origin
    }
    save_file(weights, str(tmp_path / "m.safetensors"))
    settings = AnalyzeSettings.from_preset("lora-ar", dtype="float64")
    analyze(tmp_path / "m.safetensors", tmp_path / "m.parquet", settings)
    table = load_metrics(tmp_path / "m.parquet").set_index("name")
    for name, w in weights.items():
        expected = origin.analyze_layer(name, w.double().numpy(), precision="float64")
        row = table.loc[name]
        assert row["tw_threshold"] == pytest.approx(expected.edge, rel=1e-9), name
        assert row["bulk_max"] == pytest.approx(expected.bulk_max, rel=1e-9), name
        assert row["num_spikes"] == expected.num_spikes, name
        assert row["alpha_ks"] == pytest.approx(expected.alpha, rel=1e-6), name
        np.testing.assert_allclose(row["eigenvalues"], expected.eigs, rtol=1e-6)


def test_allocate_preset_needs_the_preset_table(minilm_metrics, tmp_path, capsys):
    """A table analysed with esdtool's defaults cannot give the origin's plan: one line."""
    code, _, err = run_cli(["allocate", minilm_metrics, "-o", tmp_path / "plan", "--preset",
                            "lora-ar"], capsys)  # fmt: skip
    assert code == 2 and "analysed with no preset" in err and "Traceback" not in err
    assert not (tmp_path / "plan").exists()


def test_overrides_are_said_and_recorded(minilm_dir, tmp_path, capsys):
    """A preset with an explicit override is no longer the origin's plan: the plan says so in
    its notes, its record and its report."""
    table = tmp_path / "m.parquet"
    code, _, err = run_cli(["analyze", minilm_dir, "-o", table, "--preset", "lora-ar",
                            "--sigma-fit", "median", "-q"], capsys)  # fmt: skip
    assert code == 0, err
    code, _, err = run_cli(["allocate", table, "-o", tmp_path / "plan", "--preset", "lora-ar",
                            "--select", "highest", "--task-type", "FEATURE_EXTRACTION"],
                           capsys)  # fmt: skip
    assert code == 0, err
    assert "not lora-ar's own plan" in err and "sigma_fit='median' (analyze)" in err
    record = json.loads((tmp_path / "plan" / "esdtool_plan.json").read_text())
    assert record["preset_overrides"] == ["sigma_fit='median' (analyze)", "select='highest'"]
    assert "not lora-ar&#39;s own plan" in (tmp_path / "plan" / "report.html").read_text()


def test_one_linear_model_gets_no_plan(tmp_path, capsys):
    """int(0.5 x 1) = 0 in the origin's code: GPT-2's only nn.Linear (its tied lm_head; its
    Conv1D projections are not nn.Linear) gets no adapter there, and no silent one here."""
    import torch

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    table = tmp_path / "m.parquet"
    code, _, err = run_cli(["analyze", tmp_path / "gpt2", "-o", table, "--preset", "lora-ar",
                            "-q"], capsys)  # fmt: skip
    assert code == 0, err
    code, _, err = run_cli(["allocate", table, "-o", tmp_path / "plan", "--preset", "lora-ar"],
                           capsys)  # fmt: skip
    assert code == 2 and "the plan adapts nothing" in err and "Traceback" not in err


def test_depthwise_conv_is_analysed_from_its_pooled_spectrum(tmp_path):
    """A depthwise kernel [64, 1, 7, 7] has M = 1 per position but 49 pooled eigenvalues: it is
    a matrix to analyse (the origin plans ConvNeXt's), not a skipped row."""
    import torch
    from safetensors.torch import save_file

    from esdtool import analyze

    weight = torch.randn(64, 1, 7, 7, generator=torch.Generator().manual_seed(0))
    save_file({"dw.weight": weight}, str(tmp_path / "m.safetensors"))
    analyze(tmp_path / "m.safetensors", tmp_path / "m.parquet")
    row = load_metrics(tmp_path / "m.parquet").set_index("name").loc["dw.weight"]
    assert row["status"] == "ok" and row["num_evals"] == 49
