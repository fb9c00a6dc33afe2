"""What ``analyze --estimator farms`` costs, in one run, as ratios.

1. Default window settings (FARMS' code: 100 rows, Q 2, 10 x 10): the whole analysis with
   FARMS against plain, on MiniLM and on a Llama-shaped 1-layer model (hidden 1024, grouped k/v
   256 x 1024, MLP 2816; seeded random init). Target: at most 2x. Printed beside it, the floor:
   plain plus a bare loop of the windows' batched eigensolves for every matrix (what FARMS
   cannot avoid computing), as a ratio to plain.
2. LLM window settings (FARMS' LLM runs: 2000 rows, Q 1, 15 x 15 = 225 windows per matrix, far
   more arithmetic than the matrix's own eigensolve): ``farms_metrics`` on one matrix (windows
   gathered, batched eigensolves, pooling, the three fits and the MP fit on the pooled
   spectrum) against a bare loop of the same batched eigensolves on the same windows. Target:
   within 1.3x. ``--rows`` shrinks the windows for a quick run (default 600; 2000 is the
   published setting, minutes per matrix on 2 CPU cores).

    python benchmarks/bench_farms.py [--rows 600] [--repeat 2]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from _common import best, minilm_dir

DEFAULT_TARGET, LLM_TARGET = 2.0, 1.3


def _llama(where: Path) -> Path:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=8000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=1,
        num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=1024,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(where)
    return where


def bare_windows(W: torch.Tensor, rows: int, q: float, grid: int) -> None:
    """The windows' Gram products and batched eigensolves, nothing else (a floor)."""
    from esdtool.spectral.farms import _BATCH_ELEMENTS, windows
    from esdtool.spectral.spectra import _GRAM_BLOCK_ELEMENTS

    placed = windows(W.shape[0], W.shape[1], rows, q, grid)
    step = max(1, min(_BATCH_ELEMENTS // (placed.n * placed.c + placed.M * placed.M),
                      _GRAM_BLOCK_ELEMENTS // (placed.M * placed.N)))  # fmt: skip
    starts = [(r, c) for r in placed.row_starts for c in placed.col_starts]
    for first in range(0, len(starts), step):
        batch = torch.stack(
            [W[r : r + placed.n, c : c + placed.c] for r, c in starts[first : first + step]]
        ).to(torch.float64)
        gram = batch @ batch.mT if placed.n <= placed.c else batch.mT @ batch
        torch.linalg.eigvalsh(gram)


def _floor(source: Path, repeat: int) -> float:
    from safetensors.torch import load_file

    matrices = [t for f in sorted(source.glob("*.safetensors")) for t in load_file(f).values()
                if t.ndim == 2 and min(t.shape) >= 10]  # fmt: skip
    return best(lambda: [bare_windows(W, 100, 2.0, 10) for W in matrices], repeat)


def whole_analysis(repeat: int) -> list[tuple[str, float, float, float]]:
    from esdtool import AnalyzeSettings, analyze

    minilm = Path(minilm_dir())
    out = []
    with tempfile.TemporaryDirectory() as scratch:
        llama = _llama(Path(scratch) / "llama")
        for name, source in (("MiniLM", minilm), ("Llama-shaped 1 layer", llama)):
            plain = best(lambda s=source: analyze(s, None, AnalyzeSettings()), repeat)
            farms = best(
                lambda s=source: analyze(s, None, AnalyzeSettings(estimator="farms")), repeat
            )
            out.append((name, plain, farms, plain + _floor(source, repeat)))
    return out


def llm_windows(rows: int, repeat: int) -> tuple[float, float, int]:
    from esdtool.spectral.farms import farms_metrics, windows

    side = rows + rows // 5  # room for 15 distinct starts per side
    torch.manual_seed(0)
    W = torch.randn(side, side) * side**-0.5
    ours = best(lambda: farms_metrics(W, rows, 1.0, 15), repeat)
    loop = best(lambda: bare_windows(W, rows, 1.0, 15), repeat)
    return ours, loop, windows(side, side, rows, 1.0, 15).count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=600)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("1. default windows (100 rows, Q 2, 10 x 10): whole analysis, FARMS vs plain")
    for name, plain, farms, floor in whole_analysis(args.repeat):
        ratio = farms / plain
        verdict = "ok" if ratio <= DEFAULT_TARGET else "OVER TARGET"
        print(f"   {name:22s} plain {plain:6.2f} s  farms {farms:6.2f} s  "
              f"{ratio:.2f}x (target <= {DEFAULT_TARGET}x) {verdict}; floor (plain + bare "
              f"window eigensolves) {floor / plain:.2f}x")  # fmt: skip
    ours, loop, count = llm_windows(args.rows, args.repeat)
    ratio = ours / loop
    verdict = "ok" if ratio <= LLM_TARGET else "OVER TARGET"
    print(f"2. LLM windows ({count} windows of {args.rows} x {args.rows}, Q 1): farms_metrics "
          f"{ours:.2f} s, bare batched eigensolves {loop:.2f} s, {ratio:.2f}x "
          f"(target <= {LLM_TARGET}x) {verdict}")  # fmt: skip


if __name__ == "__main__":
    main()
