"""Hostile and damaged inputs: every one ends in one line on stderr naming the file and the
problem (exit 2, a typed error), never in "unexpected ...", a traceback, error rows blaming every
tensor, or a run that trains on nonsense. Each case is a real tiny file written here."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest

from helpers import ARITHMETIC, run_cli, write_jsonl, write_tensors

DEEP = "[" * 100_000  # json.loads raises RecursionError on this


def raw_safetensors(path: Path, header: dict, data: bytes) -> Path:
    """A safetensors file written by hand, so its header can say anything."""
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def matrix(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((12, 20)).astype("<f4")


def good_entries() -> tuple[dict, bytes]:
    """Two analysable float32 matrices: header entries and their data bytes."""
    header, data = {}, b""
    for i, name in enumerate(("layers.0.a.weight", "layers.0.b.weight")):
        raw = matrix(i).tobytes()
        header[name] = {
            "dtype": "F32",
            "shape": [12, 20],
            "data_offsets": [len(data), len(data) + len(raw)],
        }
        data += raw
    return header, data


def error_line(code: int, stderr: str, *parts: str) -> str:
    """The one error line of a refused run, checked: exit 2, typed, each of ``parts`` in it."""
    assert code == 2, stderr
    assert "unexpected" not in stderr and "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), stderr
    for part in parts:
        assert part in lines[0], (part, stderr)
    return lines[0]


def analyze_fails(args: list, capsys, *parts: str) -> str:
    code, _, stderr = run_cli(["analyze", *args, "-q"], capsys)
    return error_line(code, stderr, *parts)


# 1. Headers safetensors itself would refuse fail when the checkpoint opens, not row by row.


@pytest.mark.parametrize("value", [1, {"nested": "x"}, ["a"], None, True])
def test_metadata_values_must_be_strings(tmp_path, capsys, value):
    header, data = good_entries()
    path = raw_safetensors(
        tmp_path / "m.safetensors", {"__metadata__": {"k": value}, **header}, data
    )
    out = tmp_path / "m.parquet"
    analyze_fails([path, "-o", out], capsys, str(path), "__metadata__", "'k'", "not a string")
    assert not out.exists()


def test_an_unknown_dtype_is_refused_at_header_time(tmp_path, capsys):
    header, data = good_entries()
    header["odd"] = {"dtype": "F7", "shape": [4], "data_offsets": [len(data), len(data) + 4]}
    path = raw_safetensors(tmp_path / "d.safetensors", header, data + bytes(4))
    out = tmp_path / "d.parquet"
    analyze_fails([path, "-o", out], capsys, str(path), "'odd'", "unknown dtype 'F7'")
    assert not out.exists()


def test_a_header_safetensors_refuses_fails_before_computing(tmp_path, capsys):
    """F4 packs two values a byte: 3 of them cannot fill 64 bytes. safetensors' own parser says
    so naming no tensor; esdtool's header check refuses it first, naming the tensor (issue 28)."""
    from esdtool import analyze
    from esdtool.errors import CheckpointError

    header, data = good_entries()
    header["packed"] = {"dtype": "F4", "shape": [3], "data_offsets": [len(data), len(data) + 64]}
    path = raw_safetensors(tmp_path / "f4.safetensors", header, data + bytes(64))
    out = tmp_path / "f4.parquet"
    message = "tensor 'packed': F4 x [3] is 12 bits, not a whole number of bytes"
    analyze_fails([path, "-o", out], capsys, str(path), message)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        analyze(path, out)
    assert not out.exists()


# 2. JSON nested too deeply for the parser is malformed JSON, wherever it is.


def test_a_deeply_nested_header_is_malformed_json(tmp_path, capsys):
    blob = DEEP.encode()
    path = tmp_path / "deep.safetensors"
    path.write_bytes(struct.pack("<Q", len(blob)) + blob)
    analyze_fails([path, "-o", tmp_path / "o.parquet"], capsys, str(path), "not valid JSON")


def test_a_deeply_nested_index_is_malformed_json(tmp_path, capsys):
    write_tensors(tmp_path / "model-00001-of-00001.safetensors", {"w": matrix()})
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(DEEP)
    analyze_fails(
        [tmp_path, "-o", tmp_path / "o.parquet"], capsys, str(index), "not a readable JSON index"
    )


def test_a_deeply_nested_config_is_ignored(tmp_path, capsys):
    write_tensors(tmp_path / "model.safetensors", {"w": matrix()})
    (tmp_path / "config.json").write_text(DEEP)
    code, _, stderr = run_cli(["analyze", tmp_path, "-o", tmp_path / "o.parquet", "-q"], capsys)
    assert code == 0, stderr
    assert (tmp_path / "o.parquet").is_file()


def test_a_deeply_nested_sidecar_is_discarded(tmp_path, capsys):
    from esdtool.analysis.resume import FORMAT, Sidecar

    path = write_tensors(tmp_path / "w.safetensors", {"w": matrix()})
    out = tmp_path / "o.parquet"
    (tmp_path / ".o.parquet.partial").write_text(DEEP + "\n")
    code, _, stderr = run_cli(["analyze", path, "-o", out, "-q"], capsys)
    assert code == 0, stderr
    assert out.is_file()
    # A matching first line, then a row line nested too deeply: the rows stop there.
    side_path = tmp_path / ".x.partial"
    side_path.write_text(json.dumps({"format": FORMAT, "fingerprint": "d"}) + "\n" + DEEP + "\n")
    side = Sidecar.open(side_path, "d")
    side.close()
    assert side.kept == {} and not side.discarded


# 3. weight_map values that are not file names, on both roads to the index.


def sharded_dir(directory: Path, weight_map: dict) -> Path:
    write_tensors(directory / "model-00001-of-00002.safetensors", {"a": matrix(0)})
    write_tensors(directory / "model-00002-of-00002.safetensors", {"b": matrix(1)})
    index = directory / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


@pytest.mark.parametrize("value", [["model-00001-of-00002.safetensors"], 7, None, "*.bin"])
def test_weight_map_values_must_be_file_names(tmp_path, capsys, value):
    index = sharded_dir(tmp_path, {"a": "model-00001-of-00002.safetensors", "b": value})
    analyze_fails([tmp_path, "-o", tmp_path / "o.parquet"], capsys, str(index), "'b'")


@pytest.mark.parametrize("content", ["list", "deep"])
def test_a_bad_index_on_the_hub_is_one_line(tmp_path, capsys, monkeypatch, content):
    """The hub road reads the index before fetching shards: same checks, same line."""
    import huggingface_hub

    snapshot = tmp_path / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    index = snapshot / "model.safetensors.index.json"
    weight_map = {"a": "model-00001-of-00001.safetensors", "b": ["x.safetensors"]}
    index.write_text(DEEP if content == "deep" else json.dumps({"weight_map": weight_map}))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: str(snapshot))
    parts = (str(index), "'b'") if content == "list" else (str(index), "not a readable JSON")
    analyze_fails(["org/model", "-o", tmp_path / "o.parquet"], capsys, *parts)


# 4. Every tensor the index names must be in the shard it names.


def test_a_tensor_the_index_names_must_be_in_its_shard(tmp_path, capsys):
    """Needs analysis/run.py to pass the index: open_checkpoint(files, index=resolved.index)."""
    first = "model-00001-of-00002.safetensors"
    index = sharded_dir(
        tmp_path, {"a": first, "b": "model-00002-of-00002.safetensors", "ghost": first}
    )
    out = tmp_path / "o.parquet"
    analyze_fails([tmp_path, "-o", out], capsys, str(index), "'ghost'", repr(first))
    assert not out.exists()


def test_the_index_is_checked_against_the_shards_on_opening(tmp_path):
    from esdtool.errors import CheckpointError
    from esdtool.io.checkpoint import open_checkpoint
    from esdtool.io.source import resolve_source

    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    sharded_dir(tmp_path, {"a": second, "b": first})  # the shards swapped
    resolved = resolve_source(tmp_path)
    assert resolved.index is not None and resolved.index.weight_map["b"] == first
    wrong = f"names tensor 'a' in shard '{second}', but it is in '{first}' \\(1 more"
    with pytest.raises(CheckpointError, match=wrong):
        open_checkpoint(resolved.files, index=resolved.index)
    sharded_dir(tmp_path, {"a": first, "b": second, "ghost": second})
    resolved = resolve_source(tmp_path)
    with pytest.raises(CheckpointError, match=r"'ghost' in shard .*, but no shard holds it"):
        open_checkpoint(resolved.files, index=resolved.index)
    # A tensor in a shard that the index leaves out is fine.
    sharded_dir(tmp_path, {"a": first, "b": second})
    write_tensors(tmp_path / second, {"b": matrix(1), "extra": matrix(2)})
    resolved = resolve_source(tmp_path)
    with open_checkpoint(resolved.files, index=resolved.index) as ckpt:
        assert ckpt.keys() == ["a", "b", "extra"]


# 5. Shapes past int64 fail at header time, naming the tensor.


@pytest.mark.parametrize(
    ("shape", "span"),
    [([2**63, 0], 0), ([0, 2**64], 0), ([2**40, 2**40], 960), ([2**62, 4], 960)],
)
def test_shapes_past_int64_fail_at_header_time(tmp_path, capsys, shape, span):
    header, data = good_entries()
    header["huge"] = {"dtype": "F32", "shape": shape, "data_offsets": [len(data), len(data) + span]}
    path = raw_safetensors(tmp_path / "h.safetensors", header, data + bytes(span))
    out = tmp_path / "h.parquet"
    analyze_fails([path, "-o", out], capsys, str(path), "'huge'", "does not fit in int64")
    assert not out.exists()


# 6. A full disk while the resume sidecar grows.


def test_a_full_disk_while_appending_the_sidecar_is_one_line(tmp_path, capsys, monkeypatch):
    import os

    path = write_tensors(tmp_path / "w.safetensors", {"a": matrix(0), "b": matrix(1)})
    out = tmp_path / "o.parquet"
    real_fsync, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) > 1:  # the sidecar's first line goes through; the first row does not
            raise OSError(28, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    analyze_fails([path, "-o", out], capsys, ".o.parquet.partial", "No space left on device")
    assert not out.exists()


# 7. Training data: chat records that are not lists of turns, and files that are not UTF-8.


@pytest.fixture(scope="module")
def hand_plan(tmp_path_factory) -> Path:
    """A plan for the tiny causal LM written by hand, as allocate would: two up_proj adapters
    (rank 8 and 4) and one module left out."""
    plan = tmp_path_factory.mktemp("hand-plan")
    keys = {0: 8, 1: 4}
    names = {i: f"model.layers.{i}.mlp.up_proj" for i in keys}
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "target_modules": "^(?:" + "|".join(n.replace(".", "\\.") for n in names.values()) + ")$",
        "r": 8,
        "lora_alpha": 16,
        "rank_pattern": {"^" + names[i].replace(".", "\\."): r for i, r in keys.items()},
        "alpha_pattern": {"^" + names[i].replace(".", "\\."): 2 * r for i, r in keys.items()},
        "lora_dropout": 0.0,
        "bias": "none",
        "inference_mode": False,
    }
    (plan / "adapter_config.json").write_text(json.dumps(config, indent=2))
    (plan / "allocation.csv").write_text(
        "module,rows,cols,alpha,selected,rank,lora_alpha,params\n"
        "model.layers.0.mlp.down_proj,64,160,3.1,False,0,0.0,0\n"
        "model.layers.0.mlp.up_proj,160,64,2.5,True,8,16.0,1792\n"
        "model.layers.1.mlp.up_proj,160,64,2.9,True,4,8.0,896\n"
    )
    return plan


def finetune_fails(model, plan, data, tmp_path, capsys, *parts: str) -> str:
    out = tmp_path / "run"
    code, _, stderr = run_cli(
        ["finetune", model, "--adapter-config", plan, "--data", data, "-o", out,
         "--max-steps", "1", "-q"],
        capsys,
    )  # fmt: skip
    line = error_line(code, stderr, *parts)
    assert not out.exists()  # nothing trained, nothing written
    return line


def test_the_hand_plan_and_good_data_pass(tiny_causal_lm, hand_plan, tmp_path, capsys):
    """The base every refusal below departs from is itself accepted."""
    pytest.importorskip("trl", reason="pip install 'esdtool[finetune]'")
    chat = [
        {"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]}
    ]
    for data in (
        write_jsonl(tmp_path / "p.jsonl", ARITHMETIC),
        write_jsonl(tmp_path / "c.jsonl", chat),
    ):
        code, stdout, stderr = run_cli(
            ["finetune", tiny_causal_lm, "--adapter-config", hand_plan, "--data", data,
             "--dry-run"],
            capsys,
        )  # fmt: skip
        assert code == 0, stderr
        assert "model.layers.1.mlp.up_proj" in stdout


USER = {"role": "user", "content": "1+1?"}
ASSISTANT = {"role": "assistant", "content": "2"}


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([{"messages": "hello"}, {"messages": "there"}], "record 0: messages is str, not a list"),
        ([{"messages": ["hello", "there"]}], "record 0: turn 0 is str"),
        ([{"messages": [[1, 2]]}], "record 0: turn 0 is list"),
        ([{"messages": [{"role": "user"}, {"role": "assistant"}]}],
         "record 0: turn 0: content is missing"),
        ([{"messages": [{"role": "user", "content": 1}, {"role": "assistant", "content": 2}]}],
         "record 0: turn 0: content is int, not text"),
        ([{"messages": [USER, ASSISTANT]}, {"messages": [{"role": "user"}, ASSISTANT]}],
         "record 1: turn 0: content is missing"),
        ([{"messages": [USER, ASSISTANT]}, {"messages": None}], "record 1: messages is missing"),
        ([{"messages": [USER, ASSISTANT]}, {"messages": [ASSISTANT, USER]}],
         "record 1: every messages record must end with an assistant turn"),
    ],
)  # fmt: skip
def test_chat_records_that_are_not_turns_are_named(
    tiny_causal_lm, hand_plan, tmp_path, capsys, records, message
):
    pytest.importorskip("trl", reason="pip install 'esdtool[finetune]'")
    data = write_jsonl(tmp_path / "chat.jsonl", records)
    finetune_fails(tiny_causal_lm, hand_plan, data, tmp_path, capsys, str(data), message)


@pytest.mark.parametrize(
    ("name", "content", "where"),
    [
        ("bom.jsonl", b'\xff\xfe{"prompt": "a", "completion": "b"}\n', "byte 0xff on line 1"),
        ("latin.jsonl", b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", '
         b'"completion": "b"}\n', "byte 0xe9 on line 2"),
        ("latin.csv", "prompt,completion\na,b\ncafé,b\n".encode("latin-1"), "byte 0xe9 on line 3"),
    ],
)  # fmt: skip
def test_data_files_that_are_not_utf8_are_named(
    tiny_causal_lm, hand_plan, tmp_path, capsys, name, content, where
):
    pytest.importorskip("trl", reason="pip install 'esdtool[finetune]'")
    data = tmp_path / name
    data.write_bytes(content)
    finetune_fails(tiny_causal_lm, hand_plan, data, tmp_path, capsys, str(data), "not UTF-8", where)


# 8. Plan files with entries that are not what they claim: refused before anything trains.

KEY = "^model\\.layers\\.0\\.mlp\\.up_proj"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("lora_alpha", float("nan"), "lora_alpha = nan is not a positive finite number"),
        ("r", 8.5, "r = 8.5 is not a positive whole number"),
        ("rank_pattern", 8.5, "rank_pattern['^model\\\\.layers\\\\.0\\\\.mlp\\\\.up_proj'] = 8.5"),
        ("rank_pattern", "8", "= '8' is not a positive whole number"),
        ("rank_pattern", -8, "= -8 is not a positive whole number"),
        ("alpha_pattern", float("nan"), "= nan is not a positive finite number"),
        ("alpha_pattern", "x", "= 'x' is not a positive finite number"),
        ("alpha_pattern", -16, "= -16 is not a positive finite number"),
    ],
)
def test_adapter_configs_with_bad_numbers_are_refused(
    tiny_causal_lm, hand_plan, tmp_path, capsys, field, value, message
):
    pytest.importorskip("trl", reason="pip install 'esdtool[finetune]'")
    import shutil

    plan = tmp_path / "plan"
    shutil.copytree(hand_plan, plan)
    config = json.loads((plan / "adapter_config.json").read_text())
    if field in ("rank_pattern", "alpha_pattern"):
        config[field][KEY] = value
    else:
        config[field] = value
    (plan / "adapter_config.json").write_text(json.dumps(config))  # NaN is written as NaN
    data = write_jsonl(tmp_path / "d.jsonl", ARITHMETIC)
    finetune_fails(
        tiny_causal_lm, plan, data, tmp_path, capsys, str(plan / "adapter_config.json"), message
    )


def test_a_pattern_key_that_is_no_regex_is_refused(tiny_causal_lm, hand_plan, tmp_path, capsys):
    pytest.importorskip("trl", reason="pip install 'esdtool[finetune]'")
    import shutil

    plan = tmp_path / "plan"
    shutil.copytree(hand_plan, plan)
    config = json.loads((plan / "adapter_config.json").read_text())
    config["rank_pattern"]["^model.(layers"] = 8
    (plan / "adapter_config.json").write_text(json.dumps(config))
    data = write_jsonl(tmp_path / "d.jsonl", ARITHMETIC)
    finetune_fails(
        tiny_causal_lm, plan, data, tmp_path, capsys, "'^model.(layers'", "not a regular expression"
    )


def bad_csvs(good: str) -> dict[str, tuple[str, str]]:
    """Damaged copies of a good allocation.csv: (content, what the error must say)."""
    header = good.splitlines()[0]
    drop = header.split(",").index("rank")
    no_rank = [
        ",".join(c for i, c in enumerate(line.split(",")) if i != drop)
        for line in good.splitlines()
    ]
    return {
        "empty": ("", "allocation.csv: is empty"),
        "header only": (header + "\n", "allocation.csv: has no rows"),
        "no rank column": ("\n".join(no_rank) + "\n", "missing column(s) rank"),
        "rank text": (good.replace("True,8,16.0", "True,eight,16.0"),
                      "rank = 'eight' is not a whole number"),
        "rank float": (good.replace("True,8,16.0", "True,8.5,16.0"),
                       "rank = '8.5' is not a whole number"),
        "alpha nan": (good.replace("True,8,16.0", "True,8,nan"),
                      "lora_alpha = 'nan' is not a finite number"),
        "selected maybe": (good.replace("True,8,16.0", "maybe,8,16.0"), "selected = 'maybe'"),
    }  # fmt: skip


@pytest.mark.parametrize("case", list(bad_csvs("module,rank\n")))
def test_damaged_allocation_csvs_are_refused(tiny_causal_lm, hand_plan, tmp_path, capsys, case):
    """finetune refuses it in one line; verify_plan (allocate --verify's check) the same way."""
    pytest.importorskip("trl", reason="pip install 'esdtool[finetune]'")
    import shutil

    from esdtool.errors import OptionError
    from esdtool.plan.verify import verify_plan

    plan = tmp_path / "plan"
    shutil.copytree(hand_plan, plan)
    content, message = bad_csvs((hand_plan / "allocation.csv").read_text())[case]
    (plan / "allocation.csv").write_text(content)
    data = write_jsonl(tmp_path / "d.jsonl", ARITHMETIC)
    finetune_fails(
        tiny_causal_lm, plan, data, tmp_path, capsys, str(plan / "allocation.csv"), message
    )
    with pytest.raises(OptionError, match=r"allocation\.csv"):
        verify_plan(plan, tiny_causal_lm)
