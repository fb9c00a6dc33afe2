"""Eigenvalues: the Gram route vs numpy's SVD, blocking, orientation, experts and convs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import oracle as ref
from esdtool.spectral import spectra
from esdtool.spectral.spectra import eigenvalues, matrices_of, spectrum


@pytest.mark.parametrize("shape", [(40, 90), (90, 40), (64, 64)])
def test_eigenvalues_are_squared_singular_values(shape):
    W = np.random.default_rng(0).standard_normal(shape)
    np.testing.assert_allclose(eigenvalues(torch.from_numpy(W)).numpy(), ref.evals(W), rtol=1e-10)


@pytest.mark.parametrize("shape", [(300, 50), (50, 300)])
def test_blocked_gram_equals_one_product(monkeypatch, shape):
    W = torch.randn(*shape, dtype=torch.float64)
    whole = eigenvalues(W)
    monkeypatch.setattr(spectra, "_GRAM_BLOCK_ELEMENTS", 50 * 7)
    np.testing.assert_allclose(eigenvalues(W).numpy(), whole.numpy(), rtol=1e-12)


def test_bfloat16_is_upcast_not_computed_in_bfloat16():
    W = torch.randn(64, 96).to(torch.bfloat16)
    expected = ref.evals(W.double().numpy())
    np.testing.assert_allclose(eigenvalues(W).numpy(), expected, rtol=1e-10)


def test_experts_give_one_matrix_each_and_conv_pools_kernel_positions():
    experts = torch.randn(3, 20, 30)
    assert [m.shape for m in matrices_of(experts)] == [(20, 30)] * 3
    conv = torch.randn(16, 12, 3, 3, dtype=torch.float64)
    (batch,) = matrices_of(conv)
    pooled = spectrum(batch, conv_norm=0.5).numpy()
    expected = (
        np.sort(
            np.concatenate(
                [ref.evals(conv[:, :, i, j].numpy()) for i in range(3) for j in range(3)]
            )
        )
        * 0.5
    )
    np.testing.assert_allclose(pooled, expected, rtol=1e-10)


def test_auto_dtype_uses_float64_unless_the_gpu_has_slow_fp64(monkeypatch):
    from esdtool.spectral.spectra import auto_dtype

    assert auto_dtype(torch.device("cpu")) == torch.float64
    for capability, expected in (((9, 0), torch.float64), ((8, 0), torch.float64),
                                 ((8, 6), torch.float32), ((8, 9), torch.float32)):  # fmt: skip
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d, c=capability: c)
        assert auto_dtype(torch.device("cuda:0")) == expected, capability


def test_float32_spectrum_is_squared_singular_values():
    W = torch.randn(30, 70, dtype=torch.float64) * torch.logspace(0, -3, 70, dtype=torch.float64)
    exact = np.linalg.svd(W.numpy(), compute_uv=False)[::-1] ** 2
    got = eigenvalues(W, torch.float32)
    assert got.dtype == torch.float32 and bool((got[1:] >= got[:-1]).all())
    np.testing.assert_allclose(got.double().numpy(), exact, rtol=2e-4, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(20, 50), (50, 20)])
def test_nonfinite_entries_are_flagged_per_matrix(dtype, shape):
    """Any NaN or Inf, wherever it sits, flags its own matrix only (the float64 path reads it
    off the Gram diagonal); finite matrices in the same batch keep their exact spectra."""
    from esdtool.spectral.spectra import checked_eigenvalues

    rng = np.random.default_rng(7)
    batch = torch.from_numpy(rng.standard_normal((4, *shape))).to(torch.bfloat16)
    clean = checked_eigenvalues(batch.clone(), dtype)[0]
    batch[1, rng.integers(shape[0]), rng.integers(shape[1])] = float("nan")
    batch[3, rng.integers(shape[0]), rng.integers(shape[1])] = float("-inf")
    evals, finite = checked_eigenvalues(batch, dtype)
    assert finite.tolist() == [True, False, True, False]
    assert bool(torch.isfinite(evals).all())
    torch.testing.assert_close(evals[[0, 2]], clean[[0, 2]])
    assert not bool(checked_eigenvalues(batch[3], dtype)[1])
