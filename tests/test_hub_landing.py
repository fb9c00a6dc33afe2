"""The default hub road computes a tensor as soon as its bytes have landed, inside a shard still
arriving (esdtool/io/hub_cache.py), against the local stand-in for the Hub (tests/hubstub.py):
the table is the local one, the cache ends up as hf_hub_download leaves it, and a shard that
does not check out (replaced mid-transfer, damaged bytes) keeps no number computed from it."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_hub_stream import TimedHook, assert_same_table, byte_times, checkpoint_bytes

from esdtool import analyze, load_metrics
from helpers import run_subprocess
from hubstub import Fault, commit_of

REPO = "big-org/one-shard"


def _model(folder: Path, indexed: bool) -> Path:
    """Four 256 x 512 float32 matrices (2 MB) in one file: model.safetensors alone, or one
    shard named by an index."""
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(3)
    tensors = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(256, 512, generator=gen)
               for i in range(4)}  # fmt: skip
    name = "model-00001-of-00001.safetensors" if indexed else "model.safetensors"
    save_file(tensors, str(folder / name))
    if indexed:
        index = {"metadata": {}, "weight_map": dict.fromkeys(tensors, name)}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return folder


def _storage(home: Path) -> Path:
    return home / "hub" / f"models--{REPO.replace('/', '--')}"


def _entry(storage: Path, name: str) -> tuple[str, str, bytes]:
    """How the cache holds one file: the snapshot's link target, the blob's name and bytes."""
    pointer = storage / "snapshots" / commit_of(REPO) / name
    target = os.readlink(pointer)
    return target, Path(target).name, (pointer.parent / target).read_bytes()


def _leftovers(storage: Path, *contents: bytes) -> list[str]:
    """Blobs of these contents (named by their sha256), and partial files, in the cache."""
    names = {hashlib.sha256(c).hexdigest() for c in contents}
    found = (storage / "blobs").glob("*") if storage.exists() else []
    return sorted(p.name for p in found if p.name in names or p.name.endswith(".incomplete"))


@pytest.mark.parametrize("indexed", [False, True], ids=["model.safetensors", "one-shard-index"])
def test_tensors_are_analysed_before_their_shard_has_landed(hub, tmp_path, indexed):
    """Throttled to about 2.5 s for the only shard: the first tensor's row comes before the
    shard's last byte is sent (the stand-in's clock and the progress hook), the table is the
    local one, and the cache holds what hf_hub_download leaves, found there by it offline."""
    from huggingface_hub import hf_hub_download

    model = _model(tmp_path / "m", indexed)
    local = load_metrics(analyze(model, tmp_path / "local.parquet").output)
    hub.add_repo(REPO, model)
    hub.rate = checkpoint_bytes(model) / 2.5
    sent = byte_times(hub)
    hook = TimedHook()
    result = analyze(REPO, tmp_path / "h.parquet", progress=hook)
    assert_same_table(load_metrics(result.output), local)
    assert len(hook.advanced) == 4 and hook.advanced[0] < sent[-1] - 0.5, (hook.advanced, sent[-1])
    assert hub.served_bytes() <= 1.05 * checkpoint_bytes(model)  # every byte fetched once

    name = next(p.name for p in model.glob("*.safetensors"))
    ours = _entry(_storage(hub.home), name)
    hub.rate = None
    other = tmp_path / "other-cache"
    hf_hub_download(REPO, name, revision=commit_of(REPO), cache_dir=other)
    theirs = _entry(other / f"models--{REPO.replace('/', '--')}", name)
    assert ours == theirs  # the same relative link, blob name (sha256) and bytes
    assert _leftovers(_storage(hub.home)) == []  # no partial file
    found = hf_hub_download(REPO, name, revision=commit_of(REPO), local_files_only=True)
    assert Path(found) == _storage(hub.home) / "snapshots" / commit_of(REPO) / name


def test_a_copy_that_drops_often_but_moves_finishes_without_refetching(hub, tmp_path):
    """Eight dropped connections, more than the retries of one request: each answer brought
    bytes, so each stall gets its own retries, and every retry asks for the rest only."""
    from esdtool.io.hub_calls import RETRIES

    model = _model(tmp_path / "m", indexed=True)
    local = load_metrics(analyze(model, tmp_path / "local.parquet").output)
    hub.add_repo(REPO, model)
    drops = Fault("drop", match="model-00001", after=100_000, times=RETRIES + 3, whole=True)
    hub.faults.append(drops)
    result = analyze(REPO, tmp_path / "h.parquet")
    assert drops.times == 0 and not result.errors
    assert_same_table(load_metrics(result.output), local)
    assert hub.served_bytes() <= 1.05 * checkpoint_bytes(model)


@pytest.mark.parametrize("how", ["between-requests", "inside-one-answer"])
def test_a_shard_replaced_mid_transfer_keeps_no_number_and_no_cache_entry(hub, tmp_path, how):
    """The stand-in swaps the shard for other bytes of the same size (the same header) once
    the copy is 1 MB in: after a dropped connection (the resumed request meets another version)
    or inside one answer (the rest of the body is the other file's: only the sha256 at the end
    can tell). Rows computed from the bytes that landed first are held until the shard checks
    out, so every row is an error saying why; no blob, link or partial file is left."""
    model = _model(tmp_path / "m", indexed=True)
    name = "model-00001-of-00001.safetensors"
    original = (model / name).read_bytes()
    start = 8 + int.from_bytes(original[:8], "little")
    other = original[:start] + bytes(b ^ 0x5A for b in original[start:])
    hub.add_repo(REPO, model)
    hub.rate = checkpoint_bytes(model) / 1.5  # the first tensors are computed before the swap
    swap = lambda: hub.replace(REPO, name, other)  # noqa: E731
    kind = "drop" if how == "between-requests" else "call"
    hub.faults.append(Fault(kind, match=name, after=2**20, whole=True, then=swap))
    hook = TimedHook()
    result = analyze(REPO, tmp_path / "h.parquet", progress=hook)
    table = load_metrics(result.output)
    assert (table.status == "error").all(), table.status.tolist()
    words = "changed since its header was read" if kind == "drop" else "hash to sha256"
    assert result.errors and all(words in e for e in result.errors), result.errors
    assert hook.advanced[0] < hook.advanced[-1]  # rows were computed while bytes arrived
    storage = _storage(hub.home)
    assert not (storage / "snapshots" / commit_of(REPO) / name).exists()
    assert _leftovers(storage, original, other) == [], _leftovers(storage, original, other)


def test_where_the_cache_cannot_be_written_as_hf_does_the_shard_is_downloaded_whole(
    hub, tmp_path, monkeypatch
):
    """No sha256 ETag (a mirror without the hub's headers): hf_hub_download fetches the shard
    and the analysis reads it once it is there; the same table, the same cache."""
    from esdtool.io import hub_cache

    model = _model(tmp_path / "m", indexed=True)
    local = load_metrics(analyze(model, tmp_path / "local.parquet").output)
    hub.add_repo(REPO, model)
    monkeypatch.setattr(hub_cache, "cache_target", lambda *args: None)
    result = analyze(REPO, tmp_path / "h.parquet")
    assert_same_table(load_metrics(result.output), local)
    heads = [p for m, p, r, s in hub.requests if m == "HEAD" and p.endswith(".safetensors")]
    assert heads  # hf_hub_download's
    name = "model-00001-of-00001.safetensors"
    assert _entry(_storage(hub.home), name)[2] == (model / name).read_bytes()


def test_the_cli_fetches_before_it_imports_torch(hub, tmp_path):
    """``esdtool analyze org/name`` in its own process: the shard copy is under way before the
    process starts importing torch (an audit hook records when; the stand-in when it answered),
    and the table is the local one. A local source imports as before: nothing is fetched."""
    model = _model(tmp_path / "m", indexed=True)
    local = load_metrics(analyze(model, tmp_path / "local.parquet").output)
    hub.add_repo(REPO, model)
    hub.rate = checkpoint_bytes(model) / 2.0
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    stamp = tmp_path / "torch-import.txt"
    (hooks / "sitecustomize.py").write_text(
        "import sys, time\n"
        "def _hook(event, args):\n"
        "    if event == 'import' and args[0] == 'torch' and not _seen:\n"
        "        _seen.append(1)\n"
        f"        open({str(stamp)!r}, 'w').write(repr(time.monotonic()))\n"
        "_seen = []\n"
        "sys.addaudithook(_hook)\n"
    )
    env = {"HF_ENDPOINT": hub.endpoint, "HF_HOME": str(hub.home), "PYTHONPATH": str(hooks),
           "HF_HUB_DISABLE_PROGRESS_BARS": "1"}  # fmt: skip
    out = tmp_path / "h.parquet"
    proc = run_subprocess(["analyze", REPO, "-o", out, "--json"], env=env)
    assert proc.returncode == 0, proc.stderr
    assert_same_table(load_metrics(out), local)
    torch_at = float(stamp.read_text())
    size = (model / "model-00001-of-00001.safetensors").stat().st_size
    copies = [t for (m, p, r, s), t in zip(hub.requests, hub.request_times, strict=True)
              if m == "GET" and r is not None and r.endswith(f"-{size - 1}")]  # fmt: skip
    assert copies and copies[0] < torch_at, (copies, torch_at)

    stamp.unlink()
    hub.requests.clear()
    proc = run_subprocess(["analyze", model, "-o", tmp_path / "l.parquet", "--json"], env=env)
    assert proc.returncode == 0, proc.stderr
    assert stamp.exists() and hub.requests == []


@pytest.mark.parametrize("throttled", [True, False], ids=["download-bound", "compute-bound"])
def test_the_progress_hook_hears_how_long_the_analysis_waited_for_bytes(hub, tmp_path, throttled):
    """Throttled to 2.5 s for 2 MB that compute in well under a second, the analysis waits
    most of the time; unthrottled it hardly waits. The CLI's bar says which bounds the run."""
    from esdtool.cli.analyze import _RichProgress

    model = _model(tmp_path / "m", indexed=True)
    hub.add_repo(REPO, model)
    hub.rate = checkpoint_bytes(model) / 2.5 if throttled else None
    heard: list[float] = []

    class Hook(TimedHook):
        def waiting(self, seconds: float) -> None:
            heard.append(seconds)

    analyze(REPO, tmp_path / "h.parquet", progress=Hook())
    assert len(heard) == 4 and heard == sorted(heard)
    assert heard[-1] > 1.5 if throttled else heard[-1] < 0.5, heard

    bar = _RichProgress()
    bar.waiting(0.0, now=10.0)
    bar.waiting(0.9, now=10.5)  # under a second since the mark: no verdict yet
    assert bar.bar.tasks[0].fields["bound"] == ""
    bar.waiting(1.2, now=11.5)
    assert bar.bar.tasks[0].fields["bound"] == "download-bound"
    bar.waiting(1.3, now=13.0)
    assert bar.bar.tasks[0].fields["bound"] == "compute-bound"


def test_a_server_answering_the_copy_whole_gets_it_downloaded_by_hf(hub, tmp_path):
    """A proxy that serves byte ranges but answers a request for all of a file with 200 (the
    copy's first request): the shard goes through hf_hub_download instead, same table."""
    model = _model(tmp_path / "m", indexed=True)
    local = load_metrics(analyze(model, tmp_path / "local.parquet").output)
    hub.add_repo(REPO, model)
    hub.whole_as_200 = True
    result = analyze(REPO, tmp_path / "h.parquet")
    assert not result.errors
    assert_same_table(load_metrics(result.output), local)
    name = "model-00001-of-00001.safetensors"
    assert _entry(_storage(hub.home), name)[2] == (model / name).read_bytes()


def test_a_prefetch_no_analysis_takes_stops_and_leaves_no_partial_file(hub, tmp_path):
    """The CLI's prefetch, its command failed before the analysis: discard() stops the copy
    under way; no partial file and no link stay, and no more bytes are sent."""
    from esdtool.io import hub_prefetch

    model = _model(tmp_path / "m", indexed=True)
    hub.add_repo(REPO, model)
    hub.rate = checkpoint_bytes(model) / 3.0
    hub_prefetch.start(REPO, None, selects=lambda name: True)  # returns once bytes flow
    hub_prefetch.discard()
    time.sleep(0.3)
    sent = hub.served_bytes()
    time.sleep(0.5)
    assert hub.served_bytes() == sent < checkpoint_bytes(model)
    storage = _storage(hub.home)
    assert _leftovers(storage, (model / "model-00001-of-00001.safetensors").read_bytes()) == []
    assert hub_prefetch.take(REPO, None, None) is None
