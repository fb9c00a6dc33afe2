"""What a new user stumbled on (issue 28, item 5), each fixed with a test that failed before:
`python -m esdtool.training.tiny --help` made a directory named --help; a successful
`allocate --verify` said nothing; with --json an error left stdout empty; plot_esd's figure did
not name its matrix; a 2-layer model's layer axes read 0.0, 0.2, ... 1.0."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pandas as pd

from helpers import ARITHMETIC, ROOT, run_cli, write_jsonl


def test_tiny_model_help_prints_usage_and_makes_nothing(tmp_path):
    for flag, code in (("--help", 0), ("-h", 0), ("--force", 1)):
        proc = subprocess.run([sys.executable, "-m", "esdtool.training.tiny", flag], cwd=tmp_path,
                              capture_output=True, text=True,
                              env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})  # fmt: skip
        assert proc.returncode == code, proc.stderr
        assert "usage: python -m esdtool.training.tiny DIRECTORY" in proc.stdout + proc.stderr
        assert list(tmp_path.iterdir()) == []  # no directory named after the flag


def test_a_successful_verify_says_so(minilm_metrics, tmp_path, capsys):
    args = ["allocate", minilm_metrics, "--task-type", "FEATURE_EXTRACTION", "--verify",
            "--no-report"]  # fmt: skip
    code, stdout, stderr = run_cli([*args, "-o", tmp_path / "a"], capsys)
    assert code == 0, stderr
    assert "verified" in stdout and "PEFT gives every module its planned rank" in stdout
    code, stdout, _ = run_cli([*args, "-o", tmp_path / "b", "--json"], capsys)
    assert code == 0 and json.loads(stdout)["verified"] is True
    code, stdout, _ = run_cli([*args[:-2], "--no-report", "-o", tmp_path / "c", "--json"], capsys)
    assert json.loads(stdout)["verified"] is False


def test_an_error_with_json_is_a_json_object_on_stdout_too(tmp_path, capsys):
    code, stdout, stderr = run_cli(
        ["allocate", tmp_path / "missing.parquet", "-o", tmp_path / "plan", "--json"], capsys
    )
    assert code == 2 and stderr.startswith("Error:")
    error = json.loads(stdout)
    assert error["exit_code"] == 2 and "missing.parquet" in error["error"]
    assert set(error) == {"error", "hint", "exit_code"}
    code, stdout, _ = run_cli(["allocate", tmp_path / "missing.parquet", "-o", tmp_path / "p"],
                              capsys)  # fmt: skip
    assert code == 2 and stdout == ""  # without --json, stdout stays empty


def test_plot_esd_names_its_matrix(minilm_metrics):
    from esdtool import load_metrics, plot_esd

    table = load_metrics(minilm_metrics)
    name = table[table.status == "ok"].name.iloc[0]
    title = plot_esd(table, name).axes[0].get_title(loc="left")
    assert title.splitlines()[0] == name and "α =" in title.splitlines()[1]


def test_layer_axes_count_layers_in_whole_numbers():
    from esdtool.render.plots import by_depth

    table = pd.DataFrame({"layer": [0, 0, 1, 1], "kind": ["q", "v", "q", "v"],
                          "alpha": [2.0, 3.0, 2.5, 3.5]})  # fmt: skip
    svg = by_depth(table, "alpha", "alpha by depth", "alpha", None).decode()
    ticks = set(re.findall(r">\s*(-?\d+(?:\.\d+)?)\s*</text>", svg))
    assert "0.2" not in ticks and "0.5" not in ticks
    assert {"0", "1"} <= ticks, ticks


def test_a_sub_byte_tensor_of_the_wrong_size_is_named(tmp_path, capsys):
    """An F4 tensor whose bytes do not match its shape (safetensors' reader said only "invalid
    shape, data type, or offset for tensor", naming none): one line naming the tensor; a right
    F4 size passes the header check."""
    import struct

    def write(path, shape, nbytes):
        entries = {"w.weight": {"dtype": "F4", "shape": shape, "data_offsets": [0, nbytes]}}
        header = json.dumps(entries).encode()
        path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(nbytes))
        return path

    bad = write(tmp_path / "bad.safetensors", [4, 4], 16)  # 16 F4 values are 8 bytes
    code, _, stderr = run_cli(["analyze", bad, "-o", tmp_path / "m.parquet"], capsys)
    assert code == 2 and "tensor 'w.weight': F4 x [4, 4] needs 8 bytes" in stderr
    odd = write(tmp_path / "odd.safetensors", [3], 2)
    code, _, stderr = run_cli(["analyze", odd, "-o", tmp_path / "o.parquet"], capsys)
    assert code == 2 and "is 12 bits, not a whole number of bytes" in stderr

    from esdtool.io.checkpoint import read_header

    good = write(tmp_path / "good.safetensors", [4, 4], 8)
    assert read_header(good)


def test_finetune_shows_no_third_party_noise(tiny_causal_lm, plan, tmp_path, recwarn):
    """Without --quiet, finetune emitted transformers' gradient_checkpointing FutureWarning and
    torch's pin_memory warning on a machine without a GPU: noise the user can do nothing
    about."""
    from esdtool.training import FinetuneSettings, finetune

    data = write_jsonl(tmp_path / "d.jsonl", ARITHMETIC)
    finetune(tiny_causal_lm, plan, data, tmp_path / "run", FinetuneSettings(max_steps=1),
             progress=False)  # fmt: skip
    messages = [str(w.message) for w in recwarn]
    noise = [m for m in messages if "gradient_checkpointing" in m or "pin_memory" in m]
    assert noise == []


def test_gradient_checkpointing_still_reaches_the_trainer(tiny_causal_lm, plan, tmp_path):
    """The option goes by transformers 5's name now (activation_checkpointing): on and off
    both reach the Trainer's arguments (the old name mirrors the new)."""
    import transformers

    from esdtool.training import FinetuneSettings, finetune

    seen = {}

    class Spy(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            seen["on"] = bool(args.gradient_checkpointing)

    data = write_jsonl(tmp_path / "d.jsonl", ARITHMETIC)
    for on in (True, False):
        finetune(tiny_causal_lm, plan, data, tmp_path / str(on),
                 FinetuneSettings(max_steps=1, gradient_checkpointing=on), progress=False,
                 callbacks=[Spy()])  # fmt: skip
        assert seen["on"] is on


def test_a_narrow_heatmap_keeps_its_whole_title():
    """The adapter report's heatmap of a 2-layer model: its title ("effective_rank / lora_rank:
    layer x module kind") used to run past the figure's edge ("...layer x module k"). Drawn,
    the title lies inside the figure, and every word of it is there."""
    import pandas as pd

    from esdtool.render import plots

    title = "effective_rank / lora_rank: layer x module kind"
    table = pd.DataFrame({"layer": [0, 0, 1, 1], "kind": ["q", "v", "q", "v"],
                          "rank_used": [0.5, 0.7, 0.6, 0.9]})  # fmt: skip
    fig = plots.heatmap_figure(table, "rank_used", title, "viridis", scale=(0, 1))
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    box, frame = fig.axes[0].title.get_window_extent(canvas.get_renderer()), fig.bbox
    assert frame.x0 - 0.5 <= box.x0 and box.x1 <= frame.x1 + 0.5
    assert fig.axes[0].get_title().split() == title.split()
