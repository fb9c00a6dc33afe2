"""The real CLI on real files: output, JSON, and one-line errors for bad input."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from esdtool import __version__, load_metrics
from helpers import run_cli, write_tensors


def test_analyze_json_summary(minilm_dir, tmp_path, capsys):
    out = tmp_path / "m.parquet"
    code, stdout, _ = run_cli(["analyze", minilm_dir, "-o", out, "--json"], capsys)
    assert code == 0
    summary = json.loads(stdout)
    # MiniLM's 104 tensors: 39 weight matrices, 65 vectors / int / too-small (test_minilm.py)
    assert summary["rows"] == 104 and summary["analysed"] == 39 and summary["skipped"] == 65
    assert summary["slowest"]["name"] in set(load_metrics(out).name)
    assert summary["output"] == str(out)


def test_analyze_prints_a_summary_table(tiny_llama, tmp_path, capsys):
    code, stdout, _ = run_cli(["analyze", tiny_llama, "-o", tmp_path / "m.parquet"], capsys)
    assert code == 0
    for word in ("rows", "analysed", "skipped", "time", "slowest"):
        assert word in stdout
    code, stdout, stderr = run_cli(
        ["analyze", tiny_llama, "-o", tmp_path / "q.parquet", "--quiet"], capsys
    )
    assert code == 0 and stdout == "" and stderr == ""


def test_version_and_help(capsys):
    code, stdout, _ = run_cli(["--version"], capsys)
    assert code == 0 and stdout.strip() == f"esdtool {__version__}"
    code, stdout, _ = run_cli(["analyze", "--help"], capsys)
    assert code == 0
    for option in (
        "--output",
        "--device",
        "--dtype",
        "--include",
        "--exclude",
        "--revision",
        "--quiet",
        "--json",
    ):
        assert option in stdout


def _truncated(tmp_path):
    path = write_tensors(tmp_path / "t.safetensors", {"w": np.ones((64, 64), np.float32)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path, "truncated"


def _garbage_header(tmp_path):
    path = tmp_path / "g.safetensors"
    body = b"{not json at all"
    path.write_bytes(struct.pack("<Q", len(body)) + body)
    return path, "not valid JSON"


def _not_safetensors(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("hello, I am a text file and nothing else\n" * 3)
    return path, "header length"


def _missing_shard(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    write_tensors(model / "model-00001-of-00002.safetensors", {"a": np.ones((16, 16), np.float32)})
    index = {
        "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",
        }
    }
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    return model, "model-00002-of-00002.safetensors"


def _pickle_only(tmp_path):
    model = tmp_path / "pickled"
    model.mkdir()
    # A pickle that would run code if loaded: esdtool must refuse it by name, never open it.
    (model / "pytorch_model.bin").write_bytes(b"\x80\x04cos\nsystem\n(S'touch PWNED'\ntR.")
    return model, "pytorch_model.bin"


def _missing_path(tmp_path):
    return tmp_path / "nowhere" / "model.safetensors", "no such file"


def _empty_file(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    return path, "too short"


def _raw(tmp_path, name: str, header: object, data: bytes = b"") -> Path:
    """A file with a hand-written header (json) and data section."""
    body = json.dumps(header).encode()
    path = tmp_path / name
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


def _header_not_object(tmp_path):
    return _raw(tmp_path, "list.safetensors", [1, 2, 3]), "not a JSON object"


def _overlapping(tmp_path):
    header = {
        "a": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]},
        "b": {"dtype": "F32", "shape": [4, 4], "data_offsets": [32, 96]},
    }
    return _raw(tmp_path, "overlap.safetensors", header, bytes(96)), "overlap"


def _shape_mismatch(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 60]}}
    return _raw(tmp_path, "shape.safetensors", header, bytes(60)), "needs 64 bytes"


def _unknown_dtype(tmp_path):
    header = {"a": {"dtype": "Q3_K", "shape": [16, 16], "data_offsets": [0, 110]}}
    return _raw(tmp_path, "quant.safetensors", header, bytes(110)), "unknown dtype"


def _hole_in_data(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}
    return _raw(tmp_path, "hole.safetensors", header, bytes(80)), "belong to no tensor"


def _no_safetensors_in_dir(tmp_path):
    model = tmp_path / "emptymodel"
    model.mkdir()
    (model / "config.json").write_text("{}")
    return model, "no .safetensors files"


def _not_a_file(tmp_path):
    import os

    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    return fifo, "not a regular file"


@pytest.mark.parametrize(
    "case",
    [
        _header_not_object,
        _overlapping,
        _shape_mismatch,
        _unknown_dtype,
        _hole_in_data,
        _no_safetensors_in_dir,
        _not_a_file,
        _truncated,
        _garbage_header,
        _not_safetensors,
        _missing_shard,
        _pickle_only,
        _missing_path,
        _empty_file,
    ],
)
def test_bad_input_is_one_line_naming_the_file(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source, problem = case(tmp_path)
    out = tmp_path / "out.parquet"
    code, _, stderr = run_cli(["analyze", source, "-o", out], capsys)
    assert code == 2
    assert stderr.startswith("Error: ") and stderr.count("\n") == 1, stderr
    assert str(source.name) in stderr and problem in stderr
    assert "Traceback" not in stderr
    assert not out.exists()
    assert not (tmp_path / "PWNED").exists()


def test_debug_shows_the_traceback(tmp_path):
    from esdtool.cli.app import main
    from esdtool.errors import SourceError

    with pytest.raises(SourceError):
        main(["--debug", "analyze", str(tmp_path / "absent"), "-o", str(tmp_path / "o.parquet")])


def test_bad_options_are_refused_before_work(tmp_path, capsys, tiny_llama):
    code, _, stderr = run_cli(
        ["analyze", tiny_llama, "--include", "(", "-o", tmp_path / "o.pq"], capsys
    )
    assert code == 2 and "--include" in stderr and stderr.count("\n") == 1
    code, _, stderr = run_cli(["analyze", tiny_llama, "--dtype", "float16"], capsys)
    assert code == 2 and "--dtype" in stderr
    code, _, stderr = run_cli(["analyze", tiny_llama, "--device", "cuda:7"], capsys)
    assert code == 2 and "cuda" in stderr.lower()


def test_a_failing_tensor_keeps_the_rest_and_exits_2(tiny_llama, tmp_path, capsys, monkeypatch):
    """A tensor that cannot be read gets an `error` row; every other row is still computed and
    written, and the command names the tensor and exits 2."""
    from esdtool.errors import CheckpointError
    from esdtool.io.checkpoint import Checkpoint

    real = Checkpoint.get_tensor

    def flaky(self, name):
        if name == "model.layers.1.mlp.up_proj.weight":
            raise CheckpointError(f"{self.info(name).shard}: cannot read tensor {name!r} (boom)")
        return real(self, name)

    monkeypatch.setattr(Checkpoint, "get_tensor", flaky)
    out = tmp_path / "m.parquet"
    code, _, stderr = run_cli(["analyze", tiny_llama, "-o", out, "--quiet"], capsys)
    assert code == 2
    assert "model.layers.1.mlp.up_proj.weight" in stderr and "boom" in stderr
    df = load_metrics(out).set_index("name")
    assert df.loc["model.layers.1.mlp.up_proj.weight", "status"] == "error"
    # the other 13 block linears, the embedding and lm_head
    assert (df.status == "ok").sum() == 2 * 7 - 1 + 2


def test_unwritable_outputs_are_one_line_errors(tiny_llama, tmp_path, capsys):
    (tmp_path / "adir").mkdir()
    code, _, stderr = run_cli(["analyze", tiny_llama, "-o", tmp_path / "adir"], capsys)
    assert code == 2 and "is a directory" in stderr and stderr.count("\n") == 1
    (tmp_path / "afile").write_text("x")
    code, _, stderr = run_cli(["analyze", tiny_llama, "-o", tmp_path / "afile" / "m.parquet"],
                              capsys)  # fmt: skip
    assert code == 2 and "cannot write" in stderr and stderr.count("\n") == 1


def test_analyze_imports_neither_pandas_nor_matplotlib(minilm_dir, tmp_path):
    """Start-up is part of every run: analyze must not pay for what only allocate and report
    use (pandas, matplotlib, jinja2, transformers)."""
    code = (
        "import sys\n"
        "from esdtool.cli.app import main\n"
        "try:\n"
        f"    main(['analyze', {str(minilm_dir)!r}, '-o', {str(tmp_path / 'm.parquet')!r}, '-q'])\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "print(sorted(m for m in ('pandas', 'matplotlib', 'jinja2', 'transformers', 'peft')"
        " if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    assert (tmp_path / "m.parquet").is_file()


def test_hostile_names_reach_the_terminal_escaped(tmp_path, capsys):
    """A name carrying terminal escapes and rich markup is printed inert: escapes shown as
    \\xNN, markup as text, never interpreted."""
    name = "layers.0.\x1b[2J\x1b[31m[bold red]x[/bold red]\x07.weight"
    bad = np.ones((32, 48), np.float32)
    bad[0, 0] = np.nan
    path = write_tensors(tmp_path / "h.safetensors", {name: bad, "layers.0.ok.weight": bad * 0})
    code, _, stderr = run_cli(["analyze", path, "-o", tmp_path / "m.parquet"], capsys)
    assert code == 0
    assert "\x1b" not in stderr and "\x07" not in stderr
    assert "\\x1b[2J\\x1b[31m[bold red]x[/bold red]\\x07" in stderr


def test_docs_cli_md_is_current():
    """docs/cli.md is generated from the commands; regenerate with `make docs`."""
    from pathlib import Path

    from esdtool.cli.docgen import cli_reference

    path = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
    assert path.read_text() == cli_reference(), "docs/cli.md is stale: run `make docs`"


def test_every_command_and_option_has_help():
    import typer

    from esdtool.cli.docgen import missing_help

    assert missing_help() == []
    # ... and the check does catch an option without help:
    demo = typer.Typer()
    demo.callback()(lambda: None)
    demo.command("x", help="Does x.")(lambda n: None)
    assert missing_help(demo) == ["esdtool x N"]


def test_help_text_keeps_its_brackets(capsys):
    """Rich reads [word] as markup: an unescaped extra name would vanish from --help."""
    import typer

    from esdtool.cli.docgen import cli_reference, swallowed_markup

    assert swallowed_markup() == []
    code, stdout, _ = run_cli(["finetune", "--help"], capsys)
    assert code == 0 and "esdtool[finetune]" in " ".join(stdout.split())
    assert "esdtool[finetune]" in cli_reference()
    demo = typer.Typer()
    demo.callback()(lambda: None)
    demo.command("x", help="Needs pip install 'esdtool[extra]'; [bold]x[/bold] \\[ok].")(lambda: 0)
    found = swallowed_markup(demo)
    assert len(found) == 1 and found[0].startswith("[extra] in")
