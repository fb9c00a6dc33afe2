"""allocate's serving check: the --max-lora-rank a vLLM server needs to load the plan's adapter,
in the summary, --json, esdtool_plan.json and the report, and a warning when no value serves it.

Expected values come from vLLM's own list, vllm/config/lora.py in vLLM v0.26.0:
``MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]``; the value a plan needs is the
smallest of them at least its largest rank. The plans' largest ranks are read back from the
adapter_config.json allocate wrote, not from the package's own record.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from esdtool import allocate
from esdtool.adapters.serving import VLLM_MAX_LORA_RANKS, config_serving, vllm_max_lora_rank
from esdtool.plan import AllocateSettings
from helpers import run_cli, write_tensors

VLLM_0_26_0 = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # copied by hand from vLLM's source
# (largest rank of the plan, the --max-lora-rank vLLM needs): each side of 8, 320 and 512.
BOUNDARIES = [(8, 8), (9, 16), (320, 320), (321, 512), (512, 512), (513, None)]
MINILM_WIDTH = 384  # MiniLM's hidden size: the rank cap min(rows, cols) of every candidate


def _largest_rank(plan_dir) -> int:
    """The largest rank in the written adapter_config.json: rank_pattern values and r."""
    config = json.loads((plan_dir / "adapter_config.json").read_text())
    return max([config["r"], *config["rank_pattern"].values()])


def _flat(text: str) -> str:
    """Rich's table and soft-wrapped lines as one line of words."""
    return " ".join(text.replace("│", " ").split())


def test_the_accepted_values_are_vllms():
    assert VLLM_MAX_LORA_RANKS == VLLM_0_26_0


@pytest.mark.parametrize(
    ("largest", "needed"), [(1, 1), (2, 8), *BOUNDARIES, (10_000, None)]
)  # fmt: skip
def test_the_needed_value_is_the_smallest_accepted_one_at_least_the_largest_rank(largest, needed):
    assert vllm_max_lora_rank(largest) == needed
    expected = next((v for v in VLLM_0_26_0 if v >= largest), None)  # the rule, spelled out
    assert needed == expected


def test_the_default_r_counts_too():
    """vLLM refuses an adapter whose r is above --max-lora-rank (vllm/lora/peft_helper.py,
    validate_legal), whatever its rank_pattern says."""
    check = config_serving({"r": 600, "rank_pattern": {"^a": 8, "^b": 16}})
    assert (check.largest_rank, check.vllm_max_lora_rank, check.fits) == (600, None, False)
    check = config_serving({"r": 8, "rank_pattern": {"^a": 8, "^b": 17}})
    assert (check.largest_rank, check.vllm_max_lora_rank, check.fits) == (17, 32, True)


def test_a_hand_edited_config_gets_peft_defaults_or_one_line():
    """adapter_config.json is untrusted: an r left out is PEFT's default 8 and an empty or null
    rank_pattern adds nothing; an r or a rank that is not a positive integer (8.5 would have
    been truncated to 8, "16" taken as 16, a missing r a KeyError) is refused in one line naming
    the file and every bad value."""
    from esdtool.errors import CheckpointError

    assert config_serving({}).largest_rank == 8
    assert config_serving({"rank_pattern": {"^a": 9}}).vllm_max_lora_rank == 16
    assert config_serving({"r": 4, "rank_pattern": {}}).largest_rank == 4
    assert config_serving({"r": 4, "rank_pattern": None}).vllm_max_lora_rank == 8
    for config, message in [
        ({"r": None}, "r is None, not a positive integer"),
        ({"r": 8.5}, "r is 8.5, not a positive integer"),
        ({"r": True}, "r is True, not a positive integer"),
        ({"r": 0}, "r is 0, not a positive integer"),
        ({"r": 8, "rank_pattern": {"^a": 16, "^b": "16", "^c": 8.5}},
         "rank_pattern['^b'] is '16', not a positive integer; rank_pattern['^c'] is 8.5"),
        ({"r": 8, "rank_pattern": [16]}, "rank_pattern is list, not an object"),
        ({"r": "\x1b[31m" + "9" * 100}, "r is '\\x1b[31m999"),
    ]:  # fmt: skip
        with pytest.raises(CheckpointError) as caught:
            config_serving(config, "plan/adapter_config.json")
        text = str(caught.value)
        assert text.startswith("plan/adapter_config.json: ") and message in text, text
        assert "\n" not in text and "\x1b" not in text and len(text) < 200


@pytest.mark.parametrize(("largest", "needed"), BOUNDARIES)
def test_minilm_plans_record_the_value_vllm_needs(minilm_metrics, tmp_path, largest, needed):
    """The real plan of MiniLM with --max-rank = the boundary: the highest score gets exactly
    that rank (the rank cap min(rows, cols) = 384 is lifted for 512 and 513, as the lora-ar
    preset lifts it)."""
    settings = AllocateSettings(max_rank=largest, rank_cap=largest <= MINILM_WIDTH)
    result = allocate(minilm_metrics, tmp_path / "plan", settings, report=False)
    assert _largest_rank(tmp_path / "plan") == largest
    serving = result.serving
    assert (serving.largest_rank, serving.vllm_max_lora_rank) == (largest, needed)
    assert serving.fits is (needed is not None)
    record = json.loads((tmp_path / "plan" / "esdtool_plan.json").read_text())["serving"]
    assert record == result.summary()["serving"] == serving.record()
    assert record["vllm_max_lora_rank"] == needed and record["largest_rank"] == largest
    assert record["fits"] is (needed is not None)
    if needed is None:
        assert "vLLM cannot load this adapter" in record["warning"]
        assert "--max-rank 512" in record["warning"] and "v0.26.0" in record["warning"]
    else:
        assert record["warning"] is None


@pytest.mark.parametrize(("largest", "needed"), BOUNDARIES[:4])
def test_the_cli_prints_and_json_carries_the_value(minilm_metrics, tmp_path, capsys, largest,
                                                   needed):  # fmt: skip
    base = ["allocate", minilm_metrics, "--task-type", "FEATURE_EXTRACTION", "--no-report",
            "--max-rank", largest]  # fmt: skip
    code, stdout, stderr = run_cli([*base, "-o", tmp_path / "text"], capsys)
    assert code == 0, stderr
    assert f"vLLM --max-lora-rank {needed} (largest rank {largest})" in _flat(stdout)
    assert "Warning" not in stderr
    code, stdout, stderr = run_cli([*base, "-o", tmp_path / "json", "--json"], capsys)
    assert code == 0, stderr
    assert json.loads(stdout)["serving"] == {
        "vllm_max_lora_rank": needed, "largest_rank": largest, "fits": True, "warning": None,
    }  # fmt: skip
    assert _largest_rank(tmp_path / "json") == largest


@pytest.fixture(scope="module")
def wide_metrics(tmp_path_factory):
    """A block projection 520 x 530 wide (MiniLM's are 384): a plan can give it rank 513."""
    from esdtool import analyze

    work = tmp_path_factory.mktemp("wide")
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((520, 530)).astype("f4")
    path = write_tensors(work / "wide.safetensors", {"model.layers.0.mlp.up_proj.weight": weight})
    return analyze(path, work / "m.parquet").output


@pytest.mark.parametrize(("largest", "needed"), BOUNDARIES[4:])
def test_the_cli_warns_when_no_value_serves_the_plan(wide_metrics, tmp_path, capsys, largest,
                                                     needed):  # fmt: skip
    base = ["allocate", wide_metrics, "--no-report", "--min-rank", largest, "--max-rank",
            largest]  # fmt: skip
    code, stdout, stderr = run_cli([*base, "-o", tmp_path / "text"], capsys)
    assert code == 0, stderr
    assert _largest_rank(tmp_path / "text") == largest
    text, warning = _flat(stdout), _flat(stderr)
    record = json.loads((tmp_path / "text" / "esdtool_plan.json").read_text())["serving"]
    if needed is not None:
        assert f"vLLM --max-lora-rank {needed} (largest rank {largest})" in text
        assert "Warning" not in stderr and record["fits"] is True
        return
    assert f"vLLM --max-lora-rank none: largest rank {largest} is above" in text
    assert warning.startswith("Warning: vLLM cannot load this adapter: its largest rank 513")
    assert "--max-rank 512" in warning
    assert record["fits"] is False and record["vllm_max_lora_rank"] is None
    assert _flat(record["warning"]) in warning
    code, stdout, stderr = run_cli([*base, "-o", tmp_path / "json", "--json"], capsys)
    assert code == 0 and stderr == ""
    serving = json.loads(stdout)["serving"]
    assert serving == {**record, "warning": serving["warning"]}
    assert "vLLM cannot load this adapter" in serving["warning"]
    assert "--max-rank 512" in serving["warning"]


@pytest.mark.parametrize(("largest", "needed"), [(9, 16), (513, None)])
def test_the_reports_plan_section_says_it(minilm_metrics, tmp_path, largest, needed):
    settings = AllocateSettings(max_rank=largest, rank_cap=largest <= MINILM_WIDTH)
    allocate(minilm_metrics, tmp_path / "plan", settings, max_plots=0)
    html = (tmp_path / "plan" / "report.html").read_text()
    glance = html[html.index('<section id="glance">') :]
    glance = glance[: glance.index("</section>")]
    if needed is not None:
        assert (
            f'<p id="serving">Serving with vLLM: <code>--max-lora-rank {needed}</code> '
            f"(largest rank {largest}).</p>"
        ) in glance
    else:
        assert '<p id="serving" class="warning">vLLM cannot load this adapter' in glance
        assert "--max-rank 512" in glance
