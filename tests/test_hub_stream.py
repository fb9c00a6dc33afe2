"""Hub ids read as they arrive, against a local stand-in for the Hub (tests/hubstub.py): never
the internet. The default road downloads shards into the HF cache while the analysis runs;
``--stream`` reads each tensor with a range request and stores no shard. Both must give the
table the local analysis of the same files gives (every column but the timings), survive
dropped connections, 5xx errors and truncated bodies, and end a hopeless transfer with one line
that keeps the finished rows for the next run."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from esdtool import analyze, load_metrics
from helpers import run_cli, write_tensors
from hubstub import Fault, HubStub, commit_of

REPO = "tiny-org/tiny-llama"


@pytest.fixture(scope="module")
def local_table(tiny_llama_sharded, tmp_path_factory):
    """The local analysis of the same files: what every hub road must reproduce."""
    out = tmp_path_factory.mktemp("local") / "m.parquet"
    return load_metrics(analyze(tiny_llama_sharded, out).output)


def checkpoint_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def assert_same_table(table: pd.DataFrame, expected: pd.DataFrame) -> None:
    """Every column but the wall time of each row, exactly."""
    pd.testing.assert_frame_equal(table.drop(columns="seconds"), expected.drop(columns="seconds"))


def hub_run(args: list, capsys) -> tuple[int, dict | None, str]:
    code, out, err = run_cli(["analyze", *args, "--json"], capsys)
    return code, (json.loads(out) if code == 0 else None), err


def one_line(err: str, *parts: str) -> None:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for part in parts:
        assert part in err, (part, err)


def shards_in_cache(home: Path) -> list[Path]:
    return [p for p in home.rglob("*") if p.is_file() and p.stat().st_size > 4096]


def byte_times(hub: HubStub) -> list[float]:
    """When each body chunk the stand-in sends goes out (``[-1]``: the last byte's time)."""
    times: list[float] = []
    count = hub.count

    def counted(name: str, nbytes: int) -> None:
        count(name, nbytes)
        times.append(time.monotonic())

    hub.count = counted
    return times


class TimedHook:
    """A progress hook recording when the analysis started, when each tensor finished, and
    the bytes fetched."""

    def __init__(self) -> None:
        self.started = float("inf")
        self.advanced: list[float] = []
        self.fetched_bytes = 0

    def start(self, total_tensors: int, total_bytes: int) -> None:
        self.started = time.monotonic()

    def advance(self, name: str, nbytes: int) -> None:
        self.advanced.append(time.monotonic())

    def fetched(self, nbytes: int) -> None:
        self.fetched_bytes += nbytes


def test_stream_equals_local_stores_nothing_and_fetches_each_byte_once(
    hub, tiny_llama_sharded, local_table, tmp_path, capsys
):
    hub.add_repo(REPO, tiny_llama_sharded)
    out = tmp_path / "s.parquet"
    code, summary, err = hub_run([REPO, "--stream", "-o", out], capsys)
    assert code == 0, err
    table = load_metrics(out)
    assert_same_table(table, local_table)
    assert summary["revision"] == commit_of(REPO) == table.attrs["esdtool"]["revision"]
    assert table.attrs["esdtool"]["source_kind"] == "hub"
    assert not list(hub.home.rglob("*.safetensors")) and not shards_in_cache(hub.home)
    assert hub.served_bytes() <= 1.1 * checkpoint_bytes(tiny_llama_sharded)
    ranges = [r for m, p, r, s in hub.requests if p.endswith(".safetensors") and m == "GET"]
    assert ranges and all(r is not None for r in ranges)  # never a whole shard
    assert not out.with_name(f".{out.name}.partial").exists()


def test_default_hub_road_overlaps_download_and_fills_the_cache(
    hub, tiny_llama_sharded, local_table, tmp_path
):
    """Throttled to ~1 s of download: tensors of the first shards are analysed before the last
    shard's bytes have all been sent (the rows decided from headers alone aside)."""
    hub.add_repo(REPO, tiny_llama_sharded)
    hub.rate = checkpoint_bytes(tiny_llama_sharded) / 1.0
    last_byte = byte_times(hub)
    hook = TimedHook()
    result = analyze(REPO, tmp_path / "d.parquet", progress=hook)
    table = load_metrics(result.output)
    assert_same_table(table, local_table)
    skipped = int((table.status != "ok").sum())
    assert sum(t < last_byte[-1] for t in hook.advanced) > skipped
    snapshot = hub.home / "hub" / f"models--{REPO.replace('/', '--')}" / "snapshots"
    cached = sorted(p.name for p in (snapshot / commit_of(REPO)).glob("*.safetensors"))
    assert cached == sorted(p.name for p in tiny_llama_sharded.glob("*.safetensors"))
    assert hook.fetched_bytes >= checkpoint_bytes(tiny_llama_sharded)
    assert hub.served_bytes() <= 1.1 * checkpoint_bytes(tiny_llama_sharded)

    hub.served.clear()  # a second run reuses the cache: the plain local road, no shard fetched
    again = analyze(REPO, tmp_path / "again.parquet")
    assert_same_table(load_metrics(again.output), local_table)
    assert hub.served_bytes() == 0


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "download"])
def test_dropped_connections_5xx_and_truncated_bodies_are_survived(
    hub, tiny_llama_sharded, local_table, tmp_path, capsys, stream
):
    hub.add_repo(REPO, tiny_llama_sharded)
    hub.faults += [
        Fault("drop", after=1000, min_start=1),  # mid-tensor (stream) or mid-shard
        Fault("500", times=2),
        Fault("truncate", after=500, min_start=1),
        Fault("drop", after=0),
    ]
    out = tmp_path / "f.parquet"
    code, _, err = hub_run([REPO, "-o", out, *(["--stream"] if stream else [])], capsys)
    assert code == 0, err
    assert all(f.times == 0 for f in hub.faults), hub.faults  # every fault did happen
    assert_same_table(load_metrics(out), local_table)


def _data_start(shard: Path) -> int:
    with open(shard, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def test_exhausted_retries_stop_in_one_line_keeping_rows_and_the_rerun_resumes(
    hub, tiny_llama_sharded, local_table, tmp_path, capsys
):
    hub.add_repo(REPO, tiny_llama_sharded)
    index = json.loads((tiny_llama_sharded / "model.safetensors.index.json").read_text())
    last = tiny_llama_sharded / list(dict.fromkeys(index["weight_map"].values()))[-1]
    hub.faults.append(Fault("500", match=last.name, times=10**6, min_start=_data_start(last)))
    out = tmp_path / "r.parquet"
    code, _, err = hub_run([REPO, "--stream", "-o", out], capsys)
    assert code == 2
    one_line(err, last.name, "HTTP 500", "finished tensor(s) kept in", ".r.parquet.partial",
             "run the same command again")  # fmt: skip
    sidecar = out.with_name(".r.parquet.partial")
    kept = sidecar.read_text().count("\n") - 1
    assert kept > 0 and not out.exists()
    first_run = hub.served_bytes()

    hub.faults.clear()
    hub.served.clear()
    code, summary, err = hub_run([REPO, "--stream", "-o", out], capsys)
    assert code == 0, err
    assert summary["resumed_rows"] >= kept
    assert_same_table(load_metrics(out), local_table)
    resumed = hub.served_bytes()
    hub.served.clear()
    code, _, err = hub_run([REPO, "--stream", "-o", tmp_path / "full.parquet"], capsys)
    assert code == 0, err
    assert resumed < hub.served_bytes() and first_run > 0  # the rerun fetched only what was left


def test_a_failed_download_keeps_its_rows_and_resumes_on_either_road(
    hub, tiny_llama_sharded, local_table, tmp_path, capsys
):
    """The default road fails for good on the last shard it downloads; the rows of the shards
    before it are kept, and a --stream rerun resumes from them (the fingerprint is the repo,
    commit and headers, whichever road read them)."""
    hub.add_repo(REPO, tiny_llama_sharded)
    index = json.loads((tiny_llama_sharded / "model.safetensors.index.json").read_text())
    last = list(dict.fromkeys(index["weight_map"].values()))[-1]
    hub.faults.append(Fault("500", match=last, times=10**6, whole=True))
    out = tmp_path / "d.parquet"
    code, _, err = hub_run([REPO, "-o", out], capsys)
    assert code == 2
    one_line(err, last, "500", "finished tensor(s) kept in")
    kept = out.with_name(".d.parquet.partial").read_text().count("\n") - 1
    assert kept > 0

    hub.faults.clear()
    code, summary, err = hub_run([REPO, "--stream", "-o", out], capsys)
    assert code == 0, err
    assert summary["resumed_rows"] >= kept
    assert_same_table(load_metrics(out), local_table)


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "download"])
@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("gated", "gated repository"),
        ("private", "no such repository on the hub, or it is private"),
        ("bad-token", "refused the token (HTTP 401)"),
        ("missing", "no such repository on the hub"),
        ("revision", "revision 'v9' not found"),
    ],
)
def test_refusals_are_one_line_each(
    hub, tiny_llama_sharded, tmp_path, capsys, monkeypatch, stream, case, expected
):
    hub.add_repo(REPO, tiny_llama_sharded)
    repo, extra = REPO, []
    if case == "gated":
        hub.gated.add(REPO)
    elif case in ("private", "bad-token"):
        hub.private[REPO] = "hf_right"
        if case == "bad-token":
            monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    elif case == "missing":
        repo = "tiny-org/absent"
    else:
        extra = ["--revision", "v9"]
    args = [repo, "-o", tmp_path / "x.parquet", *extra, *(["--stream"] if stream else [])]
    code, _, err = hub_run(args, capsys)
    assert code == 2
    one_line(err, repo, expected)
    assert not hub.served_bytes()


def test_a_private_repo_streams_with_its_token(hub, tiny_llama_sharded, local_table, tmp_path,
                                               capsys, monkeypatch):  # fmt: skip
    hub.add_repo(REPO, tiny_llama_sharded)
    hub.private[REPO] = "hf_right"
    monkeypatch.setenv("HF_TOKEN", "hf_right")
    code, _, err = hub_run([REPO, "--stream", "-o", tmp_path / "p.parquet"], capsys)
    assert code == 0, err
    assert_same_table(load_metrics(tmp_path / "p.parquet"), local_table)


def test_stream_is_refused_offline_and_for_local_paths(
    hub, tiny_llama_sharded, tmp_path, capsys, monkeypatch
):
    from huggingface_hub import constants

    hub.add_repo(REPO, tiny_llama_sharded)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    code, _, err = hub_run([REPO, "--stream", "-o", tmp_path / "o.parquet"], capsys)
    assert code == 2
    one_line(err, REPO, "HF_HUB_OFFLINE is set", "drop --stream")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    code, _, err = hub_run([tiny_llama_sharded, "--stream", "-o", tmp_path / "o.parquet"], capsys)
    assert code == 2
    one_line(err, "--stream reads hub ids")
    assert not hub.requests


def test_a_remote_header_gets_every_local_check(hub, tmp_path, capsys):
    """Headers come from the network: an overlap a local file is refused for is refused here in
    the same words (only the file's name differs)."""
    import struct

    header = json.dumps({
        "a": {"dtype": "F32", "shape": [16, 16], "data_offsets": [0, 1024]},
        "b": {"dtype": "F32", "shape": [16, 16], "data_offsets": [512, 1536]},
    }).encode()  # fmt: skip
    repo = tmp_path / "bad"
    repo.mkdir()
    (repo / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(1536))
    hub.add_repo("org/bad", repo)
    code, _, local_err = run_cli(["analyze", repo, "-o", tmp_path / "l.parquet"], capsys)
    code_hub, _, hub_err = hub_run(["org/bad", "--stream", "-o", tmp_path / "h.parquet"], capsys)
    assert code == code_hub == 2
    one_line(hub_err, "org/bad/model.safetensors", "data of tensors 'a' and 'b' overlap")
    assert local_err.split("model.safetensors", 1)[1] == hub_err.split("model.safetensors", 1)[1]


def test_streamed_tensors_have_safe_opens_dtypes_and_values(tmp_path):
    """tensor_from_bytes against safetensors' own reader, dtype by dtype."""
    from esdtool.io.checkpoint import read_header
    from esdtool.io.remote import tensor_from_bytes

    gen = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=gen)
    tensors = {
        "f32": base, "f16": base.half(), "bf16": base.bfloat16(), "f64": base.double(),
        "i8": (base * 20).to(torch.int8), "u8": (base.abs() * 20).to(torch.uint8),
        "i64": (base * 1e6).to(torch.int64), "bool": base > 0,
        "f8": base.to(torch.float8_e4m3fn), "f8e5": base.to(torch.float8_e5m2),
        "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 4),
    }  # fmt: skip
    path = tmp_path / "dtypes.safetensors"
    save_file(tensors, str(path))
    infos, _ = read_header(path)
    raw = path.read_bytes()
    start = 8 + int.from_bytes(raw[:8], "little")
    with safe_open(str(path), framework="pt") as f:
        for name, info in infos.items():
            data = bytearray(raw[start + info.begin : start + info.end])
            ours, theirs = tensor_from_bytes(data, info, str(path)), f.get_tensor(name)
            assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, name
            as_bytes = lambda t: t.reshape(-1).view(torch.uint8)  # noqa: E731 (bit for bit)
            assert torch.equal(as_bytes(ours), as_bytes(theirs)), name
    with torch.device("meta"):  # a session's default device is not where the bytes lie
        devices = {tensor_from_bytes(bytearray(raw[start + i.begin : start + i.end]), i, "x").device
                   for i in infos.values()}  # fmt: skip
    assert devices == {torch.device("cpu")}


def test_fp8_checkpoint_with_scales_in_another_shard_streams(hub, tmp_path, capsys):
    """Fine-grained FP8: codes in one shard, their block scales in the next; the streamed rows
    are the local rows (the weights decoded from parts fetched separately)."""
    gen = torch.Generator().manual_seed(1)
    model = tmp_path / "fp8"
    model.mkdir()
    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    codes, scales, weight_map = {}, {}, {}
    for i in range(3):
        name = f"model.layers.{i}.mlp.up_proj"
        codes[f"{name}.weight"] = (torch.randn(160, 96, generator=gen) * 100).to(
            torch.float8_e4m3fn
        )
        scales[f"{name}.weight_scale_inv"] = torch.rand(2, 1, generator=gen) + 0.01
        weight_map[f"{name}.weight"], weight_map[f"{name}.weight_scale_inv"] = first, second
    save_file(codes, str(model / first))
    save_file(scales, str(model / second))
    index = {"metadata": {}, "weight_map": weight_map}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    quant = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    config = {"model_type": "llama", "quantization_config": quant}
    (model / "config.json").write_text(json.dumps(config))
    hub.add_repo("org/fp8", model)
    local = load_metrics(analyze(model, tmp_path / "l.parquet").output)
    assert (local.status == "ok").sum() == 3 and local.quantization.notna().any()
    code, _, err = hub_run(["org/fp8", "--stream", "-o", tmp_path / "s.parquet"], capsys)
    assert code == 0, err
    assert_same_table(load_metrics(tmp_path / "s.parquet"), local)
    assert local[local.status == "ok"].alpha_ks.notna().all()


def test_a_single_file_repo_streams_and_downloads(hub, tmp_path, capsys):
    """No shard index: --stream reads model.safetensors by ranges; the default road downloads
    it whole (nothing to overlap) through the plain hub road."""
    gen = torch.Generator().manual_seed(2)
    model = tmp_path / "one"
    model.mkdir()
    write_tensors(model / "model.safetensors",
                  {f"layers.{i}.w.weight": torch.randn(40, 56, generator=gen).numpy()
                   for i in range(2)})  # fmt: skip
    hub.add_repo("org/one", model)
    local = load_metrics(analyze(model, tmp_path / "l.parquet").output)
    commit = commit_of("org/one")
    for args in (["--stream"], [], ["--stream", "--revision", commit]):
        out = tmp_path / f"o{len(args)}.parquet"
        code, summary, err = hub_run(["org/one", "-o", out, *args], capsys)
        assert code == 0, err
        assert_same_table(load_metrics(out), local)
        assert summary["revision"] == commit


def test_a_downloaded_shard_must_match_the_header_planned_from(
    hub, tiny_llama_sharded, tmp_path, monkeypatch
):
    """The default road plans from headers fetched by range, then reads the downloaded file:
    a file whose header says otherwise (a stale or damaged cache entry) gives error rows naming
    it, never numbers from other bytes."""
    from esdtool.io import hub_cache

    hub.add_repo(REPO, tiny_llama_sharded)
    real = hub_cache.download_shard
    other = write_tensors(tmp_path / "other.safetensors", {"x": torch.zeros(3, 3).numpy()})
    damaged = sorted(p.name for p in tiny_llama_sharded.glob("*.safetensors"))[0]

    def download(repo, filename, version, target, landing, stop=None):
        path = real(repo, filename, version, target, landing, stop)
        return other if filename == damaged else path

    monkeypatch.setattr(hub_cache, "download_shard", download)
    result = analyze(REPO, tmp_path / "m.parquet")
    assert result.errors and all("differs from the one fetched" in e for e in result.errors)
    table = load_metrics(result.output)
    rows = table[table.shard == damaged]
    assert rows.status.isin(["error", "skipped"]).all() and (rows.status == "error").any()
    assert (table[table.shard != damaged].status != "error").all()


def test_an_adapter_repo_downloads_and_is_refused_by_stream(hub, tmp_path, capsys):
    """A PEFT adapter repo (with a stray config.json, as some hold): the default road analyses
    its updates as the directory does; --stream refuses it in one line rather than reading its
    factors as a model's matrices."""
    from safetensors.torch import save_file

    repo = tmp_path / "adapter"
    repo.mkdir()
    torch.manual_seed(0)
    save_file(
        {"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.randn(8, 64),
         "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight": torch.randn(48, 8)},
        str(repo / "adapter_model.safetensors"),
    )  # fmt: skip
    (repo / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (repo / "config.json").write_text(json.dumps({"model_type": "llama"}))
    hub.add_repo("org/adapter", repo)
    code, _, err = hub_run(["org/adapter", "--stream", "-o", tmp_path / "s.parquet"], capsys)
    assert code == 2
    one_line(err, "org/adapter", "PEFT adapter", "drop --stream")
    code, summary, err = hub_run(["org/adapter", "-o", tmp_path / "d.parquet"], capsys)
    assert code == 0, err
    table = load_metrics(tmp_path / "d.parquet")
    assert table.lora_rank.tolist()[0] == 8 and table.adapter.tolist()[0] == "lora"
    assert summary["lora"]["planned_rank"] == 8


def test_an_old_huggingface_hub_takes_the_download_road(
    hub, tiny_llama_sharded, local_table, tmp_path, capsys, monkeypatch
):
    """huggingface_hub < 1.0 (a requests session, no byte-range streaming): --stream says what
    it needs in one line; the default road downloads first and gives the same table."""
    from esdtool.io import hub_prefetch

    monkeypatch.setattr(hub_prefetch, "serves_ranges", lambda: False)
    hub.add_repo(REPO, tiny_llama_sharded)
    code, _, err = hub_run([REPO, "--stream", "-o", tmp_path / "s.parquet"], capsys)
    assert code == 2
    one_line(err, REPO, "needs huggingface_hub >= 1.0")
    code, _, err = hub_run([REPO, "-o", tmp_path / "d.parquet"], capsys)
    assert code == 0, err
    assert_same_table(load_metrics(tmp_path / "d.parquet"), local_table)
    ranges = [r for m, p, r, s in hub.requests if p.endswith(".safetensors") and m == "GET"]
    assert ranges and all(r is None for r in ranges)  # whole files: no header range reads


# -- the review's defects: hostile or changing servers, refusals and stops mid-run -----------


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
def test_a_small_file_announcing_a_huge_length_is_refused_before_it_is_read(
    hub, tiny_llama_sharded, tmp_path, capsys, name
):
    """config.json and the index are read into memory: a Content-Length of a petabyte is
    refused in one line naming the file, not allocated."""
    hub.add_repo(REPO, tiny_llama_sharded)
    hub.announce[name] = 10**15
    code, _, err = hub_run([REPO, "--stream", "-o", tmp_path / "a.parquet"], capsys)
    assert code == 2
    one_line(err, f"{REPO}/{name}", "announces 1000000000000000 bytes", "at most 64 MB")


@pytest.mark.parametrize("name", ["config.json", "model-00002-of-00011.safetensors"])
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "download"])
def test_a_redirect_loop_is_one_line_on_both_roads(
    hub, tiny_llama_sharded, tmp_path, capsys, stream, name
):
    """A server that redirects a file to itself forever: one line naming the file, exit 2
    (or the transfer error's), never 'unexpected TooManyRedirects'."""
    hub.add_repo(REPO, tiny_llama_sharded)
    assert (tiny_llama_sharded / name).is_file()
    hub.loops.add(name)
    args = [REPO, "-o", tmp_path / "a.parquet"] + (["--stream"] if stream else [])
    code, _, err = hub_run(args, capsys)
    assert code == 2 and "unexpected" not in err, err
    assert len(err.strip().splitlines()) == 1 and "redirect" in err.lower(), err


def test_a_server_without_byte_ranges_takes_the_download_road(
    hub, tiny_llama_sharded, local_table, tmp_path, capsys
):
    """A mirror that answers Range with 200 and the whole file: the default road downloads
    first and analyses after (the plain road); only --stream is refused, its hint for it."""
    hub.add_repo(REPO, tiny_llama_sharded)
    hub.ignore_ranges = True
    code, _, err = hub_run([REPO, "-o", tmp_path / "d.parquet"], capsys)
    assert code == 0, err
    assert_same_table(load_metrics(tmp_path / "d.parquet"), local_table)
    code, _, err = hub_run([REPO, "--stream", "-o", tmp_path / "s.parquet"], capsys)
    assert code == 2
    one_line(err, "not 206 Partial Content", "--stream needs an endpoint", "drop --stream")


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "download"])
@pytest.mark.parametrize(
    ("status", "expected"),
    [("401", "(HTTP 401)"), ("403", "gated repository"), ("404", "not found at")],
)
def test_a_refusal_mid_run_stops_in_one_line_keeping_the_rows(
    hub, tiny_llama_sharded, local_table, tmp_path, capsys, stream, status, expected
):
    """The headers were read, then the hub refuses the last shard's data (a token revoked, a
    repo gone gated, a file gone): one line saying which, exit 2, the finished rows kept for
    the rerun, never a table of error rows."""
    hub.add_repo(REPO, tiny_llama_sharded)
    index = json.loads((tiny_llama_sharded / "model.safetensors.index.json").read_text())
    last = list(dict.fromkeys(index["weight_map"].values()))[-1]
    if stream:
        start = _data_start(tiny_llama_sharded / last)
        hub.faults.append(Fault(status, match=last, times=10**6, min_start=start))
    else:
        hub.faults.append(Fault(status, match=last, times=10**6, whole=True))
    out = tmp_path / "r.parquet"
    code, _, err = hub_run([REPO, "-o", out, *(["--stream"] if stream else [])], capsys)
    assert code == 2
    one_line(err, expected, f"HTTP {status}", "finished tensor(s) kept in", ".r.parquet.partial")
    kept = out.with_name(".r.parquet.partial").read_text().count("\n") - 1
    assert kept > 0 and not out.exists()

    hub.faults.clear()
    code, summary, err = hub_run([REPO, "-o", out, *(["--stream"] if stream else [])], capsys)
    assert code == 0, err
    assert summary["resumed_rows"] >= kept
    assert_same_table(load_metrics(out), local_table)


def test_ctrl_c_stops_the_download_under_way(hub, tiny_llama_sharded, tmp_path, monkeypatch):
    """Ctrl-C mid-run on the default road: the shard being downloaded stops at its next chunk
    (it is not fetched to its end), at once (the reader thread waiting for that shard is let
    go, not joined until a timeout), and no esdtool thread is left when analyze returns."""
    import threading

    from huggingface_hub import constants

    from esdtool.errors import AnalysisInterrupted

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 1024)  # a chunk: 1/32 of a shard
    hub.add_repo(REPO, tiny_llama_sharded)
    hub.rate = checkpoint_bytes(tiny_llama_sharded) / 8.0  # ~0.7 s a shard

    class Hook:
        advanced = 0
        served_then = 0
        when = 0.0

        def start(self, total_tensors: int, total_bytes: int) -> None: ...

        def advance(self, name: str, nbytes: int) -> None:
            self.advanced += 1
            if self.advanced == 7:  # past the rows decided from headers: mid-run
                self.served_then, self.when = hub.served_bytes(), time.monotonic()
                raise KeyboardInterrupt

        def fetched(self, nbytes: int) -> None: ...

    hook = Hook()
    with pytest.raises(AnalysisInterrupted):
        analyze(REPO, tmp_path / "i.parquet", progress=hook)
    assert time.monotonic() - hook.when < 2.0  # the threads' join timeouts are 5 s
    alive = [t.name for t in threading.enumerate() if t.name.startswith("esdtool")]
    assert not alive
    time.sleep(0.3)
    shard = min(p.stat().st_size for p in tiny_llama_sharded.glob("*.safetensors"))
    assert hub.served_bytes() - hook.served_then < shard / 4  # what was in flight, no more


def _compressed_tensors_model(folder: Path, shards: int = 6) -> Path:
    """A pack-quantized compressed-tensors checkpoint: int32 codes, scales and the two-number
    weight_shape of one weight per shard."""
    folder.mkdir()
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    for i in range(shards):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        w = f"model.layers.{i}.mlp.up_proj"
        parts = {
            f"{w}.weight_packed": torch.randint(-(2**31), 2**31 - 1, (256, 32), generator=gen,
                                                dtype=torch.int32),
            f"{w}.weight_scale": torch.rand(256, 1, generator=gen) + 0.01,
            f"{w}.weight_shape": torch.tensor([256, 256]),
        }  # fmt: skip
        save_file(parts, str(folder / shard))
        weight_map.update(dict.fromkeys(parts, shard))
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    group = {"weights": {"num_bits": 4, "type": "int", "strategy": "channel"}}
    quant = {"quant_method": "compressed-tensors", "format": "pack-quantized",
             "config_groups": {"g": group}}  # fmt: skip
    (folder / "config.json").write_text(json.dumps({"model_type": "llama",
                                                    "quantization_config": quant}))  # fmt: skip
    return folder


def test_a_compressed_tensors_checkpoint_is_analysed_while_it_downloads(hub, tmp_path):
    """Planning reads every weight_shape: by range, not by waiting for every shard, so the
    analysis starts before the last shard's bytes are sent."""
    model = _compressed_tensors_model(tmp_path / "ct")
    local = load_metrics(analyze(model, tmp_path / "l.parquet").output)
    assert (local.status == "ok").sum() == 6
    hub.add_repo("org/ct", model)
    hub.rate = checkpoint_bytes(model) / 1.5
    last_byte = byte_times(hub)
    hook = TimedHook()
    result = analyze("org/ct", tmp_path / "h.parquet", progress=hook)
    assert_same_table(load_metrics(result.output), local)
    assert hook.started < last_byte[-1]
    skipped = int((local.status != "ok").sum())
    assert sum(t < last_byte[-1] for t in hook.advanced) > skipped


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "download"])
@pytest.mark.parametrize("change", ["same-header", "truncated"])
def test_a_file_replaced_after_its_header_was_read_gives_errors_not_numbers(
    hub, tiny_llama_sharded, local_table, tmp_path, stream, change
):
    """After planning, the server serves another version of the last shard at the same commit
    URL: other values under the same header (same size), or the file cut short. Its tensors
    get error rows saying the file changed, never numbers from the other bytes nor a raw
    RuntimeError; the other shards' rows are the local ones."""
    hub.add_repo(REPO, tiny_llama_sharded)
    index = json.loads((tiny_llama_sharded / "model.safetensors.index.json").read_text())
    last = list(dict.fromkeys(index["weight_map"].values()))[-1]
    original = (tiny_llama_sharded / last).read_bytes()
    start = _data_start(tiny_llama_sharded / last)
    other = original[:start] + bytes(b ^ 0x5A for b in original[start:])
    if change == "truncated":
        other = original[:-100]

    class Hook:
        def start(self, total_tensors: int, total_bytes: int) -> None:
            hub.replace(REPO, last, other)

        def advance(self, name: str, nbytes: int) -> None: ...

        def fetched(self, nbytes: int) -> None: ...

    result = analyze(REPO, tmp_path / "c.parquet", progress=Hook(), stream=stream)
    table = load_metrics(result.output)
    changed = table.shard == last
    assert (table[changed].status == "error").any()
    assert not (table[changed].status == "ok").any()
    # both roads read by range, each answer checked against the header's version
    words = "changed since its header was read"
    assert result.errors and all(words in e for e in result.errors), result.errors
    assert not any("RuntimeError" in e for e in result.errors)
    assert_same_table(table[~changed], local_table[~changed])


def test_a_cache_that_cannot_be_written_is_one_line_naming_it_without_retries(
    hub, tiny_llama_sharded, tmp_path
):
    """A local error while hf_hub_download writes the HF cache (here: a file where its blobs
    folder belongs; a full disk or a permission problem alike) is no network failure: no
    retries, no "check the connection", one error naming the cache, the rows kept."""
    from esdtool.errors import OutputError

    hub.add_repo(REPO, tiny_llama_sharded)
    blobs = hub.home / "hub" / f"models--{REPO.replace('/', '--')}" / "blobs"

    class Hook:
        def start(self, total_tensors: int, total_bytes: int) -> None:
            blobs.rename(blobs.with_name("blobs.moved"))
            blobs.write_text("not a folder")

        def advance(self, name: str, nbytes: int) -> None: ...

        def fetched(self, nbytes: int) -> None: ...

    with pytest.raises(OutputError) as raised:
        analyze(REPO, tmp_path / "o.parquet", progress=Hook())
    message = str(raised.value)
    assert "cannot write it into the HF cache at" in message and str(hub.home / "hub") in message
    assert "finished tensor(s) kept in" in message
    assert "connection" not in (raised.value.hint or "")
    # no shard's copy tried (the cache is checked first), so none retried
    sizes = {p.name: p.stat().st_size for p in tiny_llama_sharded.glob("*.safetensors")}
    copies = [p for m, p, r, s in hub.requests if p.endswith(".safetensors") and
              (r is None or r.endswith(f"-{sizes[p.rsplit('/', 1)[-1]] - 1}"))]  # fmt: skip
    assert copies == [], copies


def test_the_fetch_bar_is_made_once_whatever_the_threads():
    """fetched() comes from several threads at once (header readers, the download): one fetch
    bar, hidden until bytes arrive, counting every byte."""
    import threading

    from esdtool.cli.analyze import _RichProgress

    progress = _RichProgress()
    add_task = progress.bar.add_task

    def slow_add_task(*args, **kwargs):  # a busy rich lock: widens any race
        time.sleep(0.01)
        return add_task(*args, **kwargs)

    progress.bar.add_task = slow_add_task
    barrier = threading.Barrier(8)

    def fetch() -> None:
        barrier.wait()
        progress.fetched(100)

    threads = [threading.Thread(target=fetch) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bars = [t for t in progress.bar.tasks if t.description == "fetch"]
    assert len(bars) == 1 and bars[0].completed == 800 and bars[0].visible
    local = _RichProgress()  # a local source fetches nothing: no fetch bar shows
    assert not [t for t in local.bar.tasks if t.visible and t.description == "fetch"]


def test_the_library_progress_bar_shows_bytes_fetched(hub, tiny_llama_sharded, local_table):
    """analyze(..., progress=True) draws tqdm bars: the analysis's, and one of the bytes fetched,
    which counts every byte the stand-in served."""
    from esdtool.analysis.progress import TqdmProgress

    hub.add_repo(REPO, tiny_llama_sharded)
    bar = TqdmProgress()
    try:
        result = analyze(REPO, stream=True, progress=bar)
    finally:
        bar.close()
    assert_same_table(result.table, local_table)
    assert bar.fetch is not None and bar.fetch.n == hub.served_bytes(suffix="")  # every file
    assert bar.bar.n == bar.bar.total > 0


def test_a_config_json_python_cannot_parse_is_ignored_not_a_crash(hub, tmp_path, capsys):
    """config.json only names the model (and its quantization, checked on its own): one with an
    integer of 5000 digits (JSON allows it, Python refuses to convert it) reads as no config,
    as a local one does."""
    repo = tmp_path / "repo"
    repo.mkdir()
    write_tensors(repo / "model.safetensors", {"w": torch.randn(32, 48).numpy()})
    (repo / "config.json").write_text('{"model_type": "x", "n": ' + "9" * 5000 + "}")
    hub.add_repo("org/odd-config", repo)
    code, _, err = hub_run(["org/odd-config", "--stream", "-o", tmp_path / "s.parquet"],
                           capsys)  # fmt: skip
    assert code == 0, err
    assert load_metrics(tmp_path / "s.parquet").attrs["esdtool"]["model_type"] is None


def test_a_tensor_in_two_shards_is_one_line_locally_and_from_the_hub(hub, tmp_path, capsys):
    """Both roads merge shard headers through one mechanism (Checkpoint._merge): a name found
    in two shards is refused naming both, never one silently shadowing the other."""
    repo = tmp_path / "repo"
    repo.mkdir()
    write_tensors(repo / "a.safetensors", {"w": torch.randn(16, 16).numpy()})
    write_tensors(repo / "b.safetensors", {"w": torch.randn(16, 16).numpy()})
    code, _, err = run_cli(["analyze", repo, "-o", tmp_path / "l.parquet"], capsys)
    assert code == 2
    one_line(err, "b.safetensors: tensor 'w' is also in", "a.safetensors")
    hub.add_repo("org/twice", repo)
    code, _, err = hub_run(["org/twice", "--stream", "-o", tmp_path / "s.parquet"], capsys)
    assert code == 2
    one_line(err, "org/twice/b.safetensors: tensor 'w' is also in", "a.safetensors")
