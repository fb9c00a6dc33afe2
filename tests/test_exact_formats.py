"""The packed formats' arithmetic on inputs the reference checkpoints do not hold: batched
(3-D) codes unpacked along every dimension, words with the sign bit set, partial edge blocks
of a batched scale grid, group indices at and past the last group, narrow dtypes in and
float32 out. Each compared with a bit-by-bit Python or numpy computation. Written from
`make mutation`'s survivors (docs/testing.md); test_quantized*.py check the same functions
against the formats' own tools."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from esdtool.dequant import formats


def fields_np(words: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Each int32 word's 32/bits fields, lowest first, laid out along ``axis``; 3 bits: every
    three words one 96-bit little-endian stream of 32 fields."""
    words = np.moveaxis(words.astype(np.int64) & 0xFFFFFFFF, axis, -1)
    out = []
    for row in words.reshape(-1, words.shape[-1]):
        values = []
        if bits == 3:
            for t in range(0, row.size, 3):
                stream = int(row[t]) | int(row[t + 1]) << 32 | int(row[t + 2]) << 64
                values += [(stream >> (3 * f)) & 7 for f in range(32)]
        else:
            for word in row:
                values += [(int(word) >> (bits * k)) & ((1 << bits) - 1)
                           for k in range(32 // bits)]  # fmt: skip
        out.append(values)
    shaped = np.array(out).reshape(*words.shape[:-1], -1)
    return np.moveaxis(shaped, -1, axis)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dim", [0, 1, 2, -1])
def test_unpack_batched_words_along_any_dimension(bits, dim):
    rng = np.random.default_rng(bits * 10 + dim)
    shape = [2, 3, 6]
    shape[dim] = 3 if bits == 3 else 2  # the packed dimension: one or two 3-word streams
    words = rng.integers(-(2**31), 2**31, size=shape, dtype=np.int64).astype(np.int32)
    words.flat[0] = -1  # every bit set, the sign bit too
    got = formats.unpack(torch.from_numpy(words), bits, dim)
    want = fields_np(words, bits, dim if dim >= 0 else words.ndim + dim)
    assert got.dtype == torch.int32
    np.testing.assert_array_equal(got.numpy(), want)


def expand_np(grid: np.ndarray, block: tuple[int, int], shape: tuple[int, ...]) -> np.ndarray:
    rows, cols = shape[-2:]
    bm, bn = min(block[0], rows), min(block[1], cols)
    out = np.empty((*grid.shape[:-2], rows, cols), dtype=grid.dtype)
    for i in range(rows):
        for j in range(cols):
            out[..., i, j] = grid[..., i // bm, j // bn]
    return out


@pytest.mark.parametrize(("grid_shape", "block", "shape"), [
    ((2, 3, 2), (4, 5), (2, 10, 7)),  # experts, partial edge blocks on both sides
    ((3, 2), (2, 4), (5, 8)),
    ((1, 1), (128, 128), (5, 3)),  # a block past both edges
])  # fmt: skip
def test_expand_a_batched_grid_over_its_blocks(grid_shape, block, shape):
    grid = np.arange(np.prod(grid_shape), dtype=np.float32).reshape(grid_shape) + 1
    got = formats.expand(torch.from_numpy(grid), block, shape)
    np.testing.assert_array_equal(got.numpy(), expand_np(grid, block, shape))


def test_expand_refuses_a_grid_that_does_not_fit():
    with pytest.raises(ValueError) as info:
        formats.expand(torch.ones(2, 3, 3), (4, 5), (2, 10, 7))
    assert str(info.value) == "scale grid [2, 3, 3] does not fit [2, 10, 7]"
    with pytest.raises(ValueError):  # the batch's grid rows are the second to last dimension
        formats.expand(torch.ones(3, 2, 2), (4, 5), (2, 10, 7))


def test_by_group_index_bounds_and_messages():
    values = torch.tensor([[1, 2, 3]], dtype=torch.int8)
    scale = torch.tensor([[0.5, 2.0]], dtype=torch.float16)
    got = formats.by_group_index(values, scale, torch.tensor([1, 0, 1], dtype=torch.int32))
    assert got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), [[2.0, 1.0, 6.0]])
    zero = torch.tensor([[1, 3]], dtype=torch.int32)
    got = formats.by_group_index(values, scale, torch.tensor([0, 1, 1]), zero)
    np.testing.assert_array_equal(got.numpy(), [[0.0, -2.0, 0.0]])
    for g_idx, word in (([0, 2, 1], "2"), ([0, -1, 1], "-1"), ([5, -3, 0], "-3")):
        with pytest.raises(ValueError) as info:
            formats.by_group_index(values, scale, torch.tensor(g_idx))
        assert str(info.value) == f"g_idx holds group {word}, outside 0..1"


def test_scale_values_are_float32_whatever_the_stored_type():
    stored = torch.tensor([0.25, 4.0, 1.0])
    for dtype in (torch.bfloat16, torch.float16, getattr(torch, "float8_e8m0fnu", None)):
        if dtype is None:
            continue
        got = formats.scale_values(stored.to(dtype))
        assert got.dtype == torch.float32
        np.testing.assert_array_equal(got.numpy(), [0.25, 4.0, 1.0])


def test_blockwise_with_integer_zero_points():
    codes = torch.tensor([[3, 5, 7, 9]], dtype=torch.uint8)
    scale = torch.tensor([[0.5, 2.0]], dtype=torch.bfloat16)
    zero = torch.tensor([[1, 4]], dtype=torch.uint8)
    got = formats.blockwise(codes, scale, (1, 2), zero)
    assert got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), [[1.0, 2.0, 6.0, 10.0]])
