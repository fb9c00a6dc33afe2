"""Peak memory of `esdtool analyze` on a synthetic ~2 GB bf16 Llama-shaped checkpoint.

Prints the checkpoint size, the peak RSS of a bare interpreter that imports esdtool (the
baseline), the peak RSS of the whole analyze process, and the difference; the goal is a
difference under 1 GB: analyze holds one tensor at a time, never the model.

    python benchmarks/bench_memory.py [--layers 18] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import run_measured

HIDDEN, INTERMEDIATE, VOCAB = 2048, 5632, 32000


def write_checkpoint(directory: Path, layers: int) -> int:
    """A Llama-shaped bf16 checkpoint, one shard per layer plus one for the embeddings.

    Runs in its own process (see main): a child's peak RSS counts its parent's size at fork
    time, so the measuring process must stay small and never import torch itself.
    """
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0

    def shard(name: str, tensors: dict[str, torch.Tensor]) -> None:
        nonlocal total
        save_file(tensors, str(directory / name))
        for key, t in tensors.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    shard(
        "embed.safetensors",
        {
            "model.embed_tokens.weight": rand(VOCAB, HIDDEN),
            "lm_head.weight": rand(VOCAB, HIDDEN),
            "model.norm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
        },
    )
    for i in range(layers):
        p = f"model.layers.{i}."
        shard(
            f"layer-{i:03d}.safetensors",
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=18, help="18 layers = about 2.1 GB")
    parser.add_argument("--dir", type=Path, help="keep the checkpoint here (default: a temp dir)")
    parser.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate_only:
        print(write_checkpoint(args.dir, args.layers))
        return
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.dir or Path(tmp)
        directory.mkdir(parents=True, exist_ok=True)
        generate = [sys.executable, __file__, "--generate-only", "--layers", str(args.layers)]
        size = int(subprocess.check_output([*generate, "--dir", str(directory)], text=True))
        _, base_mb, _ = run_measured(
            [sys.executable, "-c", "import esdtool.cli.app, pandas, pyarrow.parquet"]
        )
        seconds, peak_mb, _ = run_measured(
            [sys.executable, "-m", "esdtool", "analyze", str(directory),
             "-o", str(Path(tmp) / "m.parquet"), "--quiet"]
        )  # fmt: skip
    print(f"synthetic Llama-shaped checkpoint: {args.layers} layers, {size / 2**30:.2f} GiB bf16")
    print(f"{'baseline (imports only)':28}{base_mb:10.0f} MiB")
    print(f"{'esdtool analyze peak':28}{peak_mb:10.0f} MiB   ({seconds:.0f} s)")
    print(
        f"{'above baseline':28}{peak_mb - base_mb:10.0f} MiB   "
        f"= {(peak_mb - base_mb) / (size / 2**20):.2f} x the checkpoint (goal: < 1024 MiB)"
    )


if __name__ == "__main__":
    main()
