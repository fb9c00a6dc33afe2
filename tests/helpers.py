"""Plain helpers shared by the tests: small checkpoints written on the fly, tiny Llama models
built from a config, a fake hub cache, JSONL records, runners for the real CLI and a session's
foreign torch defaults.

Import them with ``from helpers import ...``; the fixtures built on them live in conftest.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from safetensors.numpy import save_file

import oracle as ref
from esdtool.cli.app import main

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def torch_defaults(dtype: torch.dtype, device: str | None = "meta") -> Iterator[None]:
    """A session that set torch's default dtype and device (a notebook's
    ``set_default_device("cuda")``), restored after: a tensor the code makes without naming the
    data's dtype and device takes these (meta cannot be mixed with CPU data, nor read; float16's
    rounding shows)."""
    import torch

    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device) if device else contextlib.nullcontext():
            yield
    finally:
        torch.set_default_dtype(before)


def build_tiny_llama(directory: Path, shard_size: str | None) -> Path:
    """A seeded 2-layer Llama saved as safetensors, in shards of ``shard_size`` if given."""
    transformers = pytest.importorskip("transformers")
    import torch

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(config)
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(directory, safe_serialization=True, **kwargs)
    return directory


def write_tensors(path: Path, tensors: dict[str, np.ndarray], metadata=None) -> Path:
    """Write numpy arrays as a safetensors file (the tests' own small checkpoints)."""
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata)
    return path


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Run the real CLI in-process through its entry point; (exit code, stdout, stderr)."""
    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_subprocess(args: list[str], env: dict[str, str] | None = None, **kw):
    """Run `python -m esdtool ARGS` in a fresh interpreter (for environment-dependent paths)."""
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "esdtool", *map(str, args)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=300,
        **kw,
    )


def build_tiny_causal_lm(directory: Path, initializer_range: float = 0.5) -> Path:
    """A 2-layer Llama with its own small byte-level BPE tokenizer (300 tokens, a chat template),
    saved as safetensors: a complete model directory that needs no download (the one
    ``python -m esdtool.training.tiny`` makes)."""
    pytest.importorskip("transformers")
    from esdtool.training.tiny import make_tiny_causal_lm

    return make_tiny_causal_lm(directory, initializer_range=initializer_range)


def make_hf_cache(home, repo_id: str, model_dir, commit: str = "a" * 40):
    """The layout huggingface_hub keeps under HF_HOME/hub (refs -> snapshot folder)."""
    repo = home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in model_dir.iterdir():
        shutil.copy(f, snapshot / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


# Toy prompt / completion records (sums of small integers) for fine-tuning tests and doc tests.
ARITHMETIC = [
    {"prompt": f"Q: what is {a} plus {b}? A:", "completion": f" {a + b}."}
    for a in range(4)
    for b in range(4)
]


def write_jsonl(path: Path, records: list[dict], repeat: int = 1) -> Path:
    """One JSON record per line, the records ``repeat`` times over."""
    import json

    with path.open("w") as f:
        for _ in range(repeat):
            for record in records:
                f.write(json.dumps(record) + "\n")
    return path


# Quantized checkpoints (test_quantized*.py): what a row of a dequantized weight must hold.
SCALE_LIKE = ("scale", "scales", "qzeros", "g_idx", "zero_point", "_blocks", "absmax", "shape")


def assert_matches(row, weight: np.ndarray, what: str) -> None:
    """A table row holds the spectrum and metrics of ``weight`` (float64 oracle)."""
    expected = ref.row(weight.astype(np.float64))
    top = expected["lambda_max"]
    np.testing.assert_allclose(row["eigenvalues"], expected["evals"], rtol=1e-6, atol=1e-6 * top,
                               err_msg=what)  # fmt: skip
    for col in ("lambda_max", "frobenius_norm", "stable_rank", "alpha_median", "bulk_max"):
        assert row[col] == pytest.approx(expected[col], rel=1e-6), (what, col)
    assert row["alpha_ks"] == pytest.approx(expected["alpha_ks"], rel=1e-4), what


def decoded(directory: Path) -> dict[str, torch.Tensor]:
    """esdtool's own dequantized weights of a checkpoint directory, by codes tensor name (the
    tables say little about a column permutation: it leaves every spectrum as it is)."""
    from esdtool.dequant import layout_of, read_scheme
    from esdtool.io.checkpoint import open_checkpoint

    config_path = directory / "config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else None
    ckpt = open_checkpoint(sorted(directory.glob("*.safetensors")))
    infos = {n: ckpt.info(n) for n in ckpt.keys()}  # noqa: SIM118 (not a dict)
    layout = layout_of(infos, read_scheme(config, "config"), ckpt.get_tensor)
    return {
        name: weight.decode({role: ckpt.get_tensor(n) for role, n in weight.parts})
        for name, weight in layout.weights.items()
    }


def assert_same_weight(ours: torch.Tensor, reference: torch.Tensor, what: str) -> None:
    import torch

    assert ours.shape == reference.shape, what
    torch.testing.assert_close(ours.double(), reference.double(), rtol=1e-6, atol=0, msg=what)


def assert_no_scale_analysed(table) -> None:
    """No tensor holding scales, zero points, indices or packed blocks has a spectrum."""
    ok = table[table.status == "ok"]
    for name, quantization in zip(ok.name, ok.quantization, strict=True):
        last = name.rsplit(".", 1)[-1]
        if quantization is None or isinstance(quantization, float):
            assert not any(s in last for s in SCALE_LIKE), name


def finetune_json(capsys, model, plan, data, out, *args) -> dict:
    """Run the real `esdtool finetune` CLI with --json (logging every step, batch 4) and return
    its JSON summary; the run must succeed."""
    import json

    code, stdout, stderr = run_cli(
        ["finetune", model, "--adapter-config", plan, "--data", data, "-o", out,
         "--logging-steps", "1", "--batch-size", "4", "--json", *args],
        capsys,
    )  # fmt: skip
    assert code == 0, stderr
    return json.loads(stdout)
