"""Trained PEFT LoRA adapters: `esdtool analyze ADAPTER_DIR` gives one row per adapted module for
its weight change, checked against PEFT's own merge (merge_and_unload, then the difference of
weights, in float64), with r and lora_alpha resolved as PEFT resolves rank_pattern and
alpha_pattern; rsLoRA, DoRA and modules_to_save; closed-form effective ranks; the planned vs
used rank report; hostile adapter configs in one line."""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
import torch

from helpers import run_cli

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

RANKS = {"layer.0.attention.self.query": 4, "encoder.layer.3.attention.self.value": 12}
ALPHAS = {"value": 32, "layer.5.attention.self.query": 3}


@pytest.fixture(scope="module")
def base(minilm_dir):
    """MiniLM in float64, so that PEFT's merge is exact to 1e-16 and the comparison measures
    esdtool, not float32 rounding of W + Delta W."""
    transformers.logging.set_verbosity_error()
    return transformers.AutoModel.from_pretrained(minilm_dir, dtype=torch.float64).eval()


def _adapter(base, directory, **options):
    """A PEFT adapter on MiniLM with every factor random (B too), saved to ``directory``;
    returns the PEFT model."""
    config = peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["query", "value", "word_embeddings"],
        rank_pattern=RANKS, alpha_pattern=ALPHAS, **options,
    )  # fmt: skip
    model = peft.get_peft_model(copy.deepcopy(base), config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name or "lora_B" in name or "lora_embedding" in name:
                param.normal_(0, 0.05)
    model.save_pretrained(directory)
    return model


def _merged_difference(base, model):
    """PEFT's own weight change of every adapted module: merge_and_unload minus the base."""
    merged = copy.deepcopy(model).merge_and_unload()
    old = dict(base.named_parameters())
    return {
        name.removesuffix(".weight"): (param - old[name]).detach().numpy()
        for name, param in merged.named_parameters()
        if name in old and not torch.equal(param, old[name])
    }


def _spectrum(matrix):
    """Squared singular values, ascending, M of them (float64 LAPACK)."""
    return np.sort(np.linalg.svd(matrix, compute_uv=False) ** 2)


@pytest.mark.parametrize("options", [{}, {"use_rslora": True}], ids=["lora", "rslora"])
def test_adapter_rows_hold_the_spectrum_of_peft_merge(base, tmp_path, options):
    from esdtool import analyze

    model = _adapter(base, tmp_path / "adapter", **options)
    table = analyze(tmp_path / "adapter").table
    expected = _merged_difference(base, model)
    rows = table[table.lora_rank.notna()].set_index("module")
    assert sorted(rows.index) == sorted(expected)  # 6 query, 6 value, the word embeddings
    assert set(rows.adapter) == {"lora rslora" if options else "lora"}
    layers = {n.removeprefix("base_model.model."): m for n, m in model.named_modules()}
    for module, delta in expected.items():
        row = rows.loc[module]
        layer = layers[module]
        # r and lora_alpha as PEFT resolved them for this module (rank_pattern, alpha_pattern)
        assert row.lora_rank == layer.r["default"]
        assert row.lora_alpha == layer.lora_alpha["default"]
        evals = np.asarray(row.eigenvalues, dtype=np.float64)
        truth = _spectrum(delta)
        assert evals.size == truth.size == min(delta.shape)
        np.testing.assert_allclose(evals, truth, rtol=2e-6, atol=1e-6 * truth[-1])
        assert row.lambda_max == pytest.approx(truth[-1], rel=1e-10)
        assert row.frobenius_norm == pytest.approx(np.sqrt(truth.sum()), rel=1e-10)
        assert row.matrix_rank == row.lora_rank
        assert row.fit_status == "low_rank" and np.isnan(row.alpha_ks)
        assert row.num_spikes is pd_na() or row.num_spikes is None or np.isnan(row.num_spikes)
        assert (row.rows, row.cols) == tuple(
            base.get_submodule(module).weight.shape
        )  # the base weight's own layout (an embedding is [vocab, dim])
    # Every module got the rank and alpha the patterns give it, not the defaults only.
    assert rows.loc["encoder.layer.0.attention.self.query"].lora_rank == 4
    assert rows.loc["encoder.layer.3.attention.self.value"].lora_rank == 12
    assert rows.loc["encoder.layer.1.attention.self.value"].lora_alpha == 32
    assert rows.loc["encoder.layer.5.attention.self.query"].lora_alpha == 3


def pd_na():
    import pandas as pd

    return pd.NA


def test_dora_rows_are_the_directional_update_and_magnitudes_are_named(base, tmp_path):
    """DoRA merges m * (W + s B A) / ||W + s B A||; esdtool (without the base) analyses the
    directional update s B A, which is what PEFT merges for the same factors without DoRA."""
    from esdtool import analyze

    _adapter(base, tmp_path / "dora", use_dora=True)
    table = analyze(tmp_path / "dora").table
    plain = tmp_path / "plain"
    plain.mkdir()
    config = json.loads((tmp_path / "dora" / "adapter_config.json").read_text())
    (plain / "adapter_config.json").write_text(json.dumps({**config, "use_dora": False}))
    (plain / "adapter_model.safetensors").write_bytes(
        (tmp_path / "dora" / "adapter_model.safetensors").read_bytes()
    )
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), plain)
    expected = _merged_difference(base, model)
    rows = table[table.lora_rank.notna()].set_index("module")
    assert set(rows.adapter) == {"dora"}
    for module, delta in expected.items():
        truth = _spectrum(delta)
        np.testing.assert_allclose(rows.loc[module].eigenvalues, truth, rtol=2e-6,
                                   atol=1e-6 * truth[-1])  # fmt: skip
    magnitudes = table[table.adapter == "dora_magnitude"]
    assert len(magnitudes) == len(rows)
    assert set(magnitudes.status) == {"skipped"}
    assert all("DoRA magnitude vector of " in r for r in magnitudes.reason)


def test_modules_to_save_are_analysed_whole_and_marked(base, tmp_path):
    import oracle
    from esdtool import analyze

    model = _adapter(base, tmp_path / "a", modules_to_save=["pooler.dense"])
    table = analyze(tmp_path / "a").table
    saved = table[(table.adapter == "modules_to_save") & (table.status == "ok")]
    assert list(saved.module) == ["pooler.dense"]
    weight = model.base_model.model.pooler.dense.modules_to_save["default"].weight
    truth = oracle.evals(weight.detach().numpy())
    np.testing.assert_allclose(saved.iloc[0].eigenvalues, truth, rtol=1e-5, atol=1e-6 * truth[-1])
    assert saved.iloc[0].fit_status == "ok" and saved.iloc[0].alpha_ks > 1


def _factors(directory, out, inner, sigmas, alpha, rank=None):
    """An adapter with one module whose update has singular values alpha / r * sigmas."""
    from safetensors.torch import save_file

    rng = np.random.default_rng(0)
    r = rank or len(sigmas)
    U = np.linalg.qr(rng.standard_normal((out, r)))[0]
    V = np.linalg.qr(rng.standard_normal((inner, r)))[0]
    B = U * np.asarray(sigmas, dtype=np.float64)
    directory.mkdir()
    save_file(
        {
            "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.tensor(
                np.ascontiguousarray(V.T)
            ),
            "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight": torch.tensor(B),
        },
        str(directory / "adapter_model.safetensors"),
    )
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["up_proj"]}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


def test_effective_rank_and_norms_in_closed_form(tmp_path):
    """sigma^2 = 50, 30, 10, 5, 3, 1, 0.5, 0.5 (sum 100): the top three hold exactly 90%, so the
    effective rank is 3; stable rank 100 / 50 = 2; scaling alpha / r = 2 multiplies every
    eigenvalue by 4."""
    from esdtool import analyze

    squares = np.array([50, 30, 10, 5, 3, 1, 0.5, 0.5])
    adapter = _factors(tmp_path / "a", 96, 64, np.sqrt(squares), alpha=16)
    row = analyze(adapter).table.iloc[0]
    assert (row.module, row.lora_rank, row.lora_alpha) == ("model.layers.0.mlp.up_proj", 8, 16)
    assert (row.rows, row.cols, row.role, row.layer) == (96, 64, "linear", 0)
    assert row.effective_rank == 3
    assert row.stable_rank == pytest.approx(2.0, rel=1e-12)
    assert row.lambda_max == pytest.approx(4 * 50, rel=1e-12)
    assert row.frobenius_norm == pytest.approx(np.sqrt(4 * 100), rel=1e-12)
    np.testing.assert_allclose(np.sort(row.eigenvalues)[-8:], 4 * np.sort(squares), rtol=1e-6)
    assert np.count_nonzero(row.eigenvalues) == 8 and len(row.eigenvalues) == 64


def test_an_untrained_adapter_is_zero_and_uses_no_rank(tmp_path, capsys):
    adapter = _factors(tmp_path / "a", 64, 64, np.zeros(4), alpha=8)
    code, stdout, stderr = run_cli(["analyze", adapter, "-o", tmp_path / "t.parquet", "--json"],
                                   capsys)  # fmt: skip
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["lora"] == {"modules": 1, "planned_rank": 4, "used_rank": 0}
    from esdtool import load_metrics

    row = load_metrics(tmp_path / "t.parquet").iloc[0]
    assert row.status == "zero" and row.effective_rank == 0


def test_cli_loop_on_an_adapter_report_and_allocate(base, tmp_path, capsys):
    _adapter(base, tmp_path / "adapter")
    table = tmp_path / "adapter.parquet"
    code, stdout, stderr = run_cli(["analyze", tmp_path / "adapter", "-o", table], capsys)
    assert code == 0, stderr
    assert "LoRA rank used" in stdout
    code, _, stderr = run_cli(["report", table, "-o", tmp_path / "r.html"], capsys)
    assert code == 0, stderr
    html = (tmp_path / "r.html").read_text()
    assert 'id="usage"' in html and "Planned vs used rank" in html
    assert "encoder.layer.0.attention.self.query" in html
    # allocate plans from a model's table; an adapter's table is refused in one line
    code, _, stderr = run_cli(["allocate", table, "-o", tmp_path / "plan"], capsys)
    assert code == 2 and "trained LoRA adapter" in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "plan").exists()


def test_report_lists_modules_by_share_used(tmp_path):
    from esdtool import analyze
    from esdtool.render.usage import rank_use, section

    squares = np.array([50, 30, 10, 5, 3, 1, 0.5, 0.5])
    table = analyze(_factors(tmp_path / "a", 96, 64, np.sqrt(squares), alpha=16)).table
    table["kind"] = "mlp.up_proj"
    use = rank_use(table)
    assert (use["planned_rank"], use["used_rank"], use["share"]) == (8, 3, 3 / 8)
    content = section(table)
    assert content["listing"][0]["share"] == "0.38" and content["figure"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"peft_type": "LOHA"}, "esdtool reads LoRA adapters"),
        ({"rank_pattern": {"(up)_\\1": 4}}, "is a regular expression"),
        ({"alpha_pattern": {"(?=up)up_proj": 4}}, "is a regular expression"),
        ({"r": "8", "lora_alpha": None, "use_rslora": "yes"}, "r is '8'"),
        ({"rank_pattern": {"up_proj": 0}}, "not a positive integer"),
    ],
)
def test_hostile_adapter_configs_are_one_line(tmp_path, capsys, change, message):
    adapter = _factors(tmp_path / "a", 64, 64, np.ones(4), alpha=8)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, **change}))
    code, stdout, stderr = run_cli(["analyze", adapter, "-o", tmp_path / "t.parquet"], capsys)
    assert code == 2, stdout
    assert message in stderr and "adapter_config.json" in stderr
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    if "r is" in message:  # every problem at once
        assert "lora_alpha" in stderr and "use_rslora" in stderr


def test_a_rank_the_config_does_not_give_is_never_a_number(tmp_path, capsys):
    """A lora_A of 4 rows under r = 16: its scaling would be wrong, so no row has numbers (here
    the only module: the run says so in one line)."""
    adapter = _factors(tmp_path / "a", 64, 64, np.ones(4), alpha=8)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "r": 16}))
    code, _, stderr = run_cli(["analyze", adapter, "-o", tmp_path / "t.parquet"], capsys)
    assert code == 2 and "gives r = 16, its lora_A holds 4 rows" in stderr
    assert len(stderr.strip().splitlines()) == 1


def test_pattern_keys_match_as_peft_matches_them():
    """esdtool's regex-free match equals PEFT's re.match(rf"(.*\\.)?({key})$", path) on literal
    keys (esdtool's own anchored, escaped plan keys included), and PEFT's own get_pattern_key
    picks the same key; keys with other regular-expression syntax are not literal."""
    from peft.utils.other import get_pattern_key

    from esdtool.adapters.config import is_literal, key_matches, pattern_key

    paths = ["model.layers.0.self_attn.q_proj", "model.layers.10.self_attn.q_proj",
             "encoder.layer.0.attention.self.query", "q_proj", "xq_proj", "a.b\nq_proj",
             "model.layers.1.mlp.up_proj\n", "layers.0.q_proj", "a.b-c", "x.a.b-c",
             "x.layers.0.q_proj"]  # fmt: skip
    keys = ["q_proj", "layers.0.self_attn.q_proj", "layers.1.self_attn.q_proj", "0.self_attn",
            "self_attn.q_proj", "layer.0.attention.self.query", "up_proj", "proj", "layers.0",
            "layersX0.q_proj", "model.layers.0.self_attn.q_proj", "b.q_proj",
            "layers.0.q", r"^model\.layers\.0\.self_attn\.q_proj", r"^q_proj",
            r"layers\.0\.q_proj$", r"^layers\.0\.q_proj", r"a\.b\-c", "^layers.0.q_proj$",
            r"^model\.layers\.1\.mlp\.up_proj"]  # fmt: skip
    for key in keys:
        for path in paths:
            assert key_matches(key, path) == bool(re.match(rf"(.*\.)?({key})$", path)), (key, path)
    for path in paths:
        found = get_pattern_key(keys, path)
        assert pattern_key(dict.fromkeys(keys), path) == (found if found in keys else None)
    # Regular-expression keys go to RE2 (linear time), with PEFT's answer; (a+)+ is the
    # classic catastrophic-backtracking key, here on a path made to trigger it.
    regexes = (r"layers\.\d+\.q_proj", "q_proj|k_proj", "(a+)+", "layers.[0-3].q", "q?",
               "a{2}", "^a^b", "a$b", r"self_attn\.(q|k)_proj",
               r"layers\.1\d*\..*proj")  # fmt: skip
    for key in regexes:
        assert not is_literal(key), key
        for path in [*paths, "layers.1.self_attn.k_proj", "aa", "a.aa"]:
            expected = bool(re.match(rf"(.*\.)?({key})$", path))
            assert key_matches(key, path) == expected, (key, path)
    assert not key_matches("(a+)+", "a" * 50_000 + "!")  # instant with RE2


def test_compare_refuses_a_model_against_its_adapter(base, minilm_table, tmp_path):
    """A model's table holds W, an adapter's delta W: compared, "frobenius_norm change median
    -49.2" compared the two. Refused in one line (library and CLI), saying how to compare a
    base model with its fine-tuned version."""
    from esdtool import analyze, compare
    from esdtool.errors import OptionError

    _adapter(base, tmp_path / "a")
    adapter = analyze(tmp_path / "a", tmp_path / "a.parquet").table
    with pytest.raises(OptionError, match="measure different things") as info:
        compare([minilm_table, adapter], labels=["base", "adapter"])
    assert "weights='merged'" in info.value.hint


def test_an_adapter_hub_id_resolves_like_its_directory(tmp_path):
    """A hub repo holding only adapter_config.json and adapter_model.safetensors (from the local
    HF cache, offline): the same rows as the directory, the commit recorded."""
    import pandas as pd

    from esdtool import analyze, load_metrics
    from helpers import make_hf_cache, run_subprocess

    squares = np.array([50, 30, 10, 5, 3, 1, 0.5, 0.5])
    adapter = _factors(tmp_path / "a", 96, 64, np.sqrt(squares), alpha=16)
    make_hf_cache(tmp_path / "hf", "org/my-adapter", adapter)
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    proc = run_subprocess(["analyze", "org/my-adapter", "-o", tmp_path / "hub.parquet"], env=env)
    assert proc.returncode == 0, proc.stderr
    hub = load_metrics(tmp_path / "hub.parquet")
    local = analyze(adapter).table
    columns = ["name", "module", "status", "adapter", "lora_rank", "lora_alpha",
               "effective_rank", "lambda_max", "stable_rank"]  # fmt: skip
    pd.testing.assert_frame_equal(hub[columns], local[columns])
    assert hub.attrs["esdtool"]["revision"] == "a" * 40
    assert hub.attrs["esdtool"]["adapter"]["r"] == 8


def test_broken_modules_get_their_own_rows_and_the_rest_go_on(tmp_path):
    """A NaN factor, a lora_A without its lora_B, and factors that disagree on r each get a row
    saying so; the one sound module is analysed."""
    from safetensors.torch import save_file

    from esdtool import analyze

    prefix = "base_model.model.model.layers.0."
    good, nan = torch.randn(4, 64), torch.randn(64, 4)
    nan[3, 1] = float("nan")
    tensors = {
        prefix + "mlp.up_proj.lora_A.weight": good, prefix + "mlp.up_proj.lora_B.weight": good.T,
        prefix + "mlp.down_proj.lora_A.weight": good, prefix + "mlp.down_proj.lora_B.weight": nan,
        prefix + "self_attn.q_proj.lora_A.weight": good,
        prefix + "self_attn.k_proj.lora_A.weight": good,
        prefix + "self_attn.k_proj.lora_B.weight": torch.randn(64, 5),
    }  # fmt: skip
    (tmp_path / "a").mkdir()
    save_file({k: v.clone().contiguous() for k, v in tensors.items()},
              str(tmp_path / "a" / "adapter_model.safetensors"))  # fmt: skip
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8}
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    table = analyze(tmp_path / "a").table.set_index("name")
    assert table.loc[prefix + "mlp.up_proj.lora_A.weight"].status == "ok"
    down = table.loc[prefix + "mlp.down_proj.lora_A.weight"]
    assert down.status == "nonfinite" and "NaN" in down.reason
    assert "has no lora_B" in table.loc[prefix + "self_attn.q_proj.lora_A.weight"].reason
    assert "disagree on r" in table.loc[prefix + "self_attn.k_proj.lora_A.weight"].reason
    assert table.loc[prefix + "self_attn.k_proj.lora_A.weight"].status == "error"


def _write_adapter(directory, tensors, config=None):
    from safetensors.torch import save_file

    directory.mkdir()
    save_file({k: v.clone().contiguous() for k, v in tensors.items()},
              str(directory / "adapter_model.safetensors"))  # fmt: skip
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, **(config or {})}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


P = "base_model.model.model.layers.0."


def test_parts_claimed_twice_unknown_parts_and_conv_factors_are_rows_not_crashes(tmp_path):
    """Found by an adversarial pass: each of these was an unexpected KeyError or a silent
    number."""
    from esdtool import analyze

    A, B = torch.randn(4, 64), torch.randn(64, 4)
    tensors = {
        P + "mlp.up_proj.lora_A.weight": A, P + "mlp.up_proj.lora_B.weight": B,  # sound
        P + "mlp.gate_proj.lora_A.weight": A, P + "mlp.gate_proj.lora_B.weight": B,
        "model.layers.0.mlp.gate_proj.lora_A.weight": A,  # the same part, unprefixed
        P + "mlp.down_proj.lora_A.weight": A, P + "mlp.down_proj.lora_B.weight": B,
        P + "mlp.down_proj.lora_diag": torch.randn(4, 4),  # KaSA's part
        P + "conv.lora_A.weight": torch.randn(4, 16, 3),  # Conv1d
        P + "conv.lora_B.weight": torch.randn(32, 4, 1),
        P + "self_attn.q_proj.lora_A.weight": A, P + "self_attn.q_proj.lora_embedding_A": A,
        P + "self_attn.q_proj.lora_B.weight": B,
    }  # fmt: skip
    table = analyze(_write_adapter(tmp_path / "a", tensors)).table.set_index("name")
    assert table.loc[P + "mlp.up_proj.lora_A.weight"].status == "ok"
    gate = table.loc[P + "mlp.gate_proj.lora_A.weight"]
    assert gate.status == "error" and "two tensors for one part" in gate.reason
    assert table.loc["model.layers.0.mlp.gate_proj.lora_A.weight"].status == "skipped"
    diag = table.loc[P + "mlp.down_proj.lora_diag"]
    assert diag.status == "error" and "unknown LoRA part" in diag.reason
    assert table.loc[P + "conv.lora_A.weight"].status == "skipped"
    q = table.loc[P + "self_attn.q_proj.lora_A.weight"]
    assert q.status == "error"
    errors = table[table.status == "error"]
    assert len(errors) == 3  # one line per broken module (its other parts are skipped)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"lora_alpha": 10**400}, "lora_alpha is"),
        ({"use_bdlora": {"nblocks": 2}}, "BD-LoRA"),
        ({"kasa_config": {}}, "r is"),  # an empty kasa_config is off; paired with a bad r
        ({"kasa_config": {"x": 1}}, "KaSA"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights is 'pissa'"),
        ({"target_parameters": ["experts.gate_up_proj"]}, "LoRA on parameters"),
        ({"rank_pattern": {"": 2}}, "is a regular expression"),
        ({"use_dora": 0}, "use_dora is 0"),
    ],
)
def test_configs_esdtool_cannot_read_as_b_a_are_one_line(tmp_path, capsys, change, message):
    adapter = _write_adapter(
        tmp_path / "a",
        {P + "mlp.up_proj.lora_A.weight": torch.randn(4, 64),
         P + "mlp.up_proj.lora_B.weight": torch.randn(64, 4)},
        {**change, **({"r": "x"} if message == "r is" else {})},
    )  # fmt: skip
    code, _, stderr = run_cli(["analyze", adapter, "-o", tmp_path / "t.parquet"], capsys)
    assert code == 2 and message in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1 and "unexpected" not in stderr


def test_a_huge_integer_in_the_config_and_a_missing_config_are_one_line(tmp_path, capsys):
    adapter = _write_adapter(
        tmp_path / "a",
        {P + "mlp.up_proj.lora_A.weight": torch.randn(4, 64),
         P + "mlp.up_proj.lora_B.weight": torch.randn(64, 4)},
    )  # fmt: skip
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ' + "9" * 5000 + "}")
    code, _, stderr = run_cli(["analyze", adapter, "-o", tmp_path / "t.parquet"], capsys)
    assert code == 2 and "adapter_config.json: not a readable JSON file" in stderr
    (adapter / "adapter_config.json").unlink()
    code, _, stderr = run_cli(["analyze", adapter, "-o", tmp_path / "t.parquet"], capsys)
    assert code == 2 and "without its adapter_config.json" in stderr
    assert len(stderr.strip().splitlines()) == 1 and not (tmp_path / "t.parquet").exists()


def test_fp8_factors_and_float64_overflow(tmp_path):
    """FP8 factors are read (upcast first); factors whose product leaves float64 are skipped
    with the reason, never a linear-algebra traceback in the row."""
    from esdtool import analyze

    A, B = torch.randn(4, 64) * 0.1, torch.randn(64, 4) * 0.1
    tensors = {
        P + "mlp.up_proj.lora_A.weight": A.to(torch.float8_e4m3fn),
        P + "mlp.up_proj.lora_B.weight": B.to(torch.float8_e4m3fn),
        P + "mlp.down_proj.lora_A.weight": A.double() * 1e160,
        P + "mlp.down_proj.lora_B.weight": B.double() * 1e160,
    }
    table = analyze(_write_adapter(tmp_path / "a", tensors)).table.set_index("module")
    fp8 = table.loc["model.layers.0.mlp.up_proj"]
    delta = 2 * B.to(torch.float8_e4m3fn).double() @ A.to(torch.float8_e4m3fn).double()
    truth = np.sort(np.linalg.svd(delta.numpy(), compute_uv=False) ** 2)
    assert fp8.status == "ok"
    np.testing.assert_allclose(fp8.eigenvalues, truth, rtol=1e-5, atol=1e-6 * truth[-1])
    big = table.loc["model.layers.0.mlp.down_proj"]
    assert big.status == "skipped" and "overflow float64" in big.reason


def test_small_updates_count_their_directions_whatever_lora_alpha_is(tmp_path):
    """Rank 5 of r = 8: num_nonzero, entropy and effective rank are those of the 5 directions
    at lora_alpha 8 and at 0.08 (eigenvalues 1e4 times smaller, far below eig_threshold)."""
    from esdtool import analyze

    rng = np.random.default_rng(3)
    A = torch.tensor(rng.standard_normal((8, 64)) / 8)
    B = torch.tensor(rng.standard_normal((48, 5)) @ rng.standard_normal((5, 8)) * 0.01)
    rows = []
    for alpha in (8, 0.08):
        directory = tmp_path / f"a{alpha}"
        tensors = {P + "mlp.up_proj.lora_A.weight": A, P + "mlp.up_proj.lora_B.weight": B}
        _write_adapter(directory, tensors, {"r": 8, "lora_alpha": alpha})
        rows.append(analyze(directory).table.iloc[0])
    assert rows[1].lambda_max < 1e-5  # the whole spectrum below the fits' eig_threshold
    for row in rows:
        assert (row.num_nonzero, row.matrix_rank) == (5, 5)
    assert rows[0].effective_rank == rows[1].effective_rank
    assert rows[0].entropy == pytest.approx(rows[1].entropy, abs=1e-9)
    assert rows[0].stable_rank == pytest.approx(rows[1].stable_rank, rel=1e-9)


def test_rank_use_counts_at_most_the_matrix_side(tmp_path, capsys):
    """r = 40 on a 24 x 20 update: at most 20 directions exist, all used."""
    adapter = _write_adapter(
        tmp_path / "a",
        {P + "mlp.up_proj.lora_A.weight": torch.randn(40, 20),
         P + "mlp.up_proj.lora_B.weight": torch.randn(24, 40)},
        {"r": 40},
    )  # fmt: skip
    code, stdout, _ = run_cli(["analyze", adapter, "-o", tmp_path / "t.parquet", "--json"],
                              capsys)  # fmt: skip
    lora = json.loads(stdout)["lora"]
    assert code == 0 and lora["planned_rank"] == 20 and lora["used_rank"] <= 20


def test_compare_cli_on_adapter_tables(base, minilm_metrics, tmp_path, capsys):
    """Two adapters saved as run-a/adapter.parquet and run-b/adapter.parquet: labelled by their
    folders (not adapter#1, adapter#2), or by --labels; the CSV and the page hold no 'nan' (an
    update has no alphas: those columns are blank); the norms' change is summarised. A model's
    table against an adapter's: exit 2, one line."""
    for name, options in (("run-a", {}), ("run-b", {"use_rslora": True})):
        _adapter(base, tmp_path / name / "adapter", **options)
        code, _, stderr = run_cli(["analyze", tmp_path / name / "adapter", "-o",
                                   tmp_path / name / "adapter.parquet", "-q"], capsys)  # fmt: skip
        assert code == 0, stderr
    pair = [tmp_path / "run-a" / "adapter.parquet", tmp_path / "run-b" / "adapter.parquet"]
    code, stdout, stderr = run_cli(["compare", *pair, "-o", tmp_path / "c"], capsys)
    assert code == 0, stderr
    assert "frobenius_norm change median" in stdout
    csv = (tmp_path / "c" / "comparison.csv").read_text()
    page = (tmp_path / "c" / "report.html").read_text()
    assert "effective_rank@run-a/adapter" in csv and "#1" not in csv
    assert "nan" not in csv.lower() and ">nan<" not in page.lower()
    code, _, stderr = run_cli(["compare", *pair, "-o", tmp_path / "d", "--labels",
                               "plain,rslora"], capsys)  # fmt: skip
    assert code == 0, stderr
    assert "effective_rank@rslora" in (tmp_path / "d" / "comparison.csv").read_text()
    code, _, stderr = run_cli(["compare", minilm_metrics, pair[0], "-o", tmp_path / "e"], capsys)
    assert code == 2 and "measure different things" in stderr
    assert len(stderr.strip().splitlines()) == 1


def test_an_adapter_in_memory_gives_the_rows_of_its_saved_files(base, tmp_path):
    """analyze(peft_model, weights="adapter"): a notebook reads its trained adapter without
    saving it; the rows equal those of the directory save_pretrained writes."""
    from esdtool import analyze
    from esdtool.errors import OptionError

    model = _adapter(base, tmp_path / "a", use_dora=True, modules_to_save=["pooler.dense"])
    memory = analyze(model, weights="adapter").table
    files = analyze(tmp_path / "a").table
    columns = ["name", "module", "status", "adapter", "lora_rank", "lora_alpha", "rows",
               "cols", "effective_rank", "lambda_max", "stable_rank", "alpha_ks"]  # fmt: skip
    import pandas as pd

    pd.testing.assert_frame_equal(memory[columns], files[columns])
    assert memory.attrs["esdtool"]["adapter"]["use_dora"] is True
    assert memory.attrs["esdtool"]["peft_weights"] == "adapter"
    with pytest.raises(OptionError, match="for a PEFT model"):
        analyze(base, weights="adapter")


def test_factors_past_the_memory_budget_are_skipped_saying_so(tmp_path):
    """The budget counts an update's factors and their float64 copies (never the product,
    which is not formed): twice the stored float64 factors (2 x 2 x 256 x 8 bytes) and 24 bytes
    per factor element (24 x 512): 20,480 bytes here."""
    from esdtool import analyze
    from esdtool.analysis import AnalyzeSettings

    adapter = _factors(tmp_path / "a", 64, 64, np.ones(4), alpha=8)
    budget = 20_000  # bytes: just under what the update needs
    row = analyze(adapter, settings=AnalyzeSettings(max_tensor_gb=budget / 1e9)).table.iloc[0]
    assert row.status == "skipped" and "needs about 2.05e-05 GB" in row.reason
    row = analyze(adapter, settings=AnalyzeSettings(max_tensor_gb=21_000 / 1e9)).table.iloc[0]
    assert row.status == "ok"
