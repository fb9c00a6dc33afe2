"""Analysis under torchrun: the cost-balanced split, and two gloo processes writing the same
table as one process. Also the batched expert path, which a 3-D tensor takes on every rank."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from esdtool import analyze, load_metrics
from esdtool.analysis.distributed import matrix_cost, partition
from helpers import ROOT, write_tensors


def test_partition_covers_everything_once_and_balances_cost():
    rng = np.random.default_rng(0)
    for parts in (2, 3, 8):
        costs = list(rng.pareto(1.5, size=200) + 0.1)
        shares = partition(costs, parts)
        flat = sorted(i for share in shares for i in share)
        assert flat == list(range(200))
        assert all(share == sorted(share) for share in shares)
        loads = [sum(costs[i] for i in share) for share in shares]
        lower_bound = max(max(costs), sum(costs) / parts)
        assert max(loads) <= 4 / 3 * lower_bound + 1e-9  # LPT's guarantee


def test_matrix_cost_grows_with_work():
    assert matrix_cost((4096,)) == 0
    assert matrix_cost((4096, 4096)) > matrix_cost((1024, 4096)) > matrix_cost((1024, 1024))
    assert matrix_cost((8, 64, 128)) == pytest.approx(8 * matrix_cost((64, 128)))
    assert matrix_cost((64, 32, 3, 3)) == pytest.approx(9 * matrix_cost((64, 32)))


def test_batched_experts_equal_each_expert_analysed_alone(tmp_path):
    """One 3-D tensor (batched Gram + eigvalsh) against the same experts stored as 2-D."""
    rng = np.random.default_rng(3)
    experts = (rng.standard_t(4, size=(5, 48, 80)) * 0.05).astype(np.float32)
    experts[2, 3, 4] = np.nan
    tensors = {"model.layers.0.mlp.experts.down_proj": experts}
    tensors |= {f"model.layers.0.mlp.experts.{e}.down_proj.weight": experts[e] for e in range(5)}
    path = write_tensors(tmp_path / "moe.safetensors", tensors)
    df = load_metrics(analyze(path, tmp_path / "m.parquet").output)
    batched = df[df.name == "model.layers.0.mlp.experts.down_proj"].set_index("slice")
    assert list(batched.index) == [0, 1, 2, 3, 4]
    assert list(batched.status) == ["ok", "ok", "nonfinite", "ok", "ok"]
    for e in (0, 1, 3, 4):
        alone = df[df.name == f"model.layers.0.mlp.experts.{e}.down_proj.weight"].iloc[0]
        for col in ("alpha_median", "alpha_fix_finger", "alpha_ks", "lambda_max", "sigma_mp"):
            assert batched.loc[e, col] == pytest.approx(alone[col], rel=1e-9), (e, col)
        assert batched.loc[e, "num_spikes"] == alone["num_spikes"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_write_the_single_process_table(tiny_llama_sharded, tmp_path):
    single = load_metrics(analyze(tiny_llama_sharded, tmp_path / "one.parquet").output)
    out = tmp_path / "two.parquet"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
        "-m", "esdtool", "analyze", str(tiny_llama_sharded), "-o", str(out), "--json",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    if proc.returncode != 0 and "EADDRINUSE" in proc.stderr:
        pytest.skip("torchrun could not bind its rendezvous port")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count('"output"') == 1  # one summary, from rank 0

    two = load_metrics(out)
    assert two.attrs["esdtool"]["world_size"] == 2
    assert list(two.name) == list(single.name)
    assert list(two.status) == list(single.status)
    ok = single.status == "ok"
    for col in ("alpha_median", "alpha_fix_finger", "alpha_ks", "lambda_max", "stable_rank"):
        np.testing.assert_allclose(two[col][ok], single[col][ok], rtol=1e-6, err_msg=col)
    assert (two.num_spikes[ok] == single.num_spikes[ok]).all()
    for a, b in zip(two.eigenvalues[ok], single.eigenvalues[ok], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
