"""The packed formats' arithmetic on inputs the reference checkpoints do not hold: batched
(3-D) codes unpacked along every dimension, words with the sign bit set, partial edge blocks
of a batched scale grid, group indices at and past the last group, narrow dtypes in and
float32 out, every decoder run on the meta device (a CPU tensor in the mix raises there, as it
does on a GPU). Each compared with a bit-by-bit Python or numpy computation. Written from
`make mutation`'s survivors (docs/testing.md); test_quantized*.py check the same functions
against the formats' own tools."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from esdtool.dequant import formats
from helpers import torch_defaults


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


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8, 16])
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


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8, 16])
def test_unpack_a_single_row_of_words(bits):
    words = np.random.default_rng(bits).integers(-(2**31), 2**31, size=6).astype(np.int32)
    got = formats.unpack(torch.from_numpy(words), bits, 0)
    np.testing.assert_array_equal(got.numpy(), fields_np(words, bits, 0))


@pytest.mark.parametrize("bits", [3, 4])
def test_unpack_words_held_in_int64_or_uint32(bits):
    """gptq passes its offset zero points as int64 words in [0, 2**32); safetensors' U32 loads
    as uint32. The fields are int32 either way."""
    words = np.random.default_rng(bits).integers(0, 2**32, size=(2, 6), dtype=np.int64)
    for packed in (torch.from_numpy(words), torch.from_numpy(words).to(torch.uint32)):
        got = formats.unpack(packed, bits, 1)
        assert got.dtype == torch.int32
        np.testing.assert_array_equal(got.numpy(), fields_np(words, bits, 1))


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


def test_float64_codes_and_zero_points_still_give_float32():
    scale = torch.tensor([[0.5, 2.0]], dtype=torch.float16)
    codes = torch.tensor([[1.5, 2.0, 3.0]], dtype=torch.float64)
    got = formats.by_group_index(codes, scale, torch.tensor([1, 0, 1]))
    assert got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), [[3.0, 1.0, 6.0]])
    codes, zero = torch.tensor([[3, 5, 7]]), torch.tensor([[1.0, 0.5]], dtype=torch.float64)
    got = formats.by_group_index(codes, scale, torch.tensor([0, 1, 1]), zero)
    assert got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), [[1.0, 9.0, 13.0]])
    got = formats.blockwise(codes[:, :2], scale, (1, 1), zero)
    assert got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), [[1.0, 9.0]])


def test_by_group_index_takes_g_idx_in_any_integer_type():
    values = torch.tensor([[1, 2, 3]], dtype=torch.int8)
    scale = torch.tensor([[0.5, 2.0]])
    for dtype in (torch.uint8, torch.int16, torch.int32, torch.int64):
        got = formats.by_group_index(values, scale, torch.tensor([1, 0, 1], dtype=dtype))
        np.testing.assert_array_equal(got.numpy(), [[2.0, 1.0, 6.0]])


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("zero_offset", [0, 1])
@pytest.mark.parametrize("word_dtype", [torch.int32, torch.uint32])
def test_gptq_words_signed_or_unsigned(bits, zero_offset, word_dtype):
    """W[r, c] = (code[c, r] - zero[g_idx[c], r]) * scale[g_idx[c], r]; format v1 adds 1 to
    every field of the stored zero-point words as one whole-word addition (a stored -1 field
    borrows). The same bits stored as int32 or uint32 decode the same."""
    rng = np.random.default_rng(bits + zero_offset)
    rows, cols, groups = 16, 32, 2
    qweight = rng.integers(-(2**31), 2**31, size=(cols * bits // 32, rows)).astype(np.int32)
    qzeros = rng.integers(-(2**31), 2**31, size=(groups, rows * bits // 32)).astype(np.int32)
    qzeros.flat[0] = -1  # every field all ones
    scales = rng.uniform(0.5, 2.0, size=(groups, rows)).astype(np.float16)
    g_idx = rng.permutation(np.arange(cols) // (cols // groups))
    ones = {2: 0x55555555, 4: 0x11111111, 8: 0x01010101}[bits] * zero_offset
    codes = fields_np(qweight, bits, 0)  # [C, R]
    zeros = fields_np((qzeros.astype(np.int64) + ones) & 0xFFFFFFFF, bits, 1)  # [G, R]
    want = (codes.T - zeros[g_idx].T).astype(np.float32) * scales[g_idx].T.astype(np.float32)
    got = formats.gptq(
        torch.from_numpy(qweight).view(word_dtype), torch.from_numpy(qzeros).view(word_dtype),
        torch.from_numpy(scales), torch.from_numpy(g_idx), bits, zero_offset=zero_offset,
    )  # fmt: skip
    assert got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), want)


def fp4_np(code: int) -> float:
    """An E2M1 code's value from its bits: sign, two exponent bits (bias 1), one mantissa bit;
    exponent 0 is subnormal (0 or 0.5)."""
    sign, exponent, mantissa = code >> 3, (code >> 1) & 3, code & 1
    magnitude = mantissa / 2 if exponent == 0 else (1 + mantissa / 2) * 2.0 ** (exponent - 1)
    return -magnitude if sign else magnitude


def mxfp4_np(blocks: np.ndarray, exponents: np.ndarray) -> np.ndarray:
    """Each byte's low nibble then its high one, times 2**(e - 127) of its block."""
    lo = np.vectorize(fp4_np)(blocks & 0x0F)
    hi = np.vectorize(fp4_np)(blocks >> 4)
    values = np.stack((lo, hi), axis=-1).reshape(*blocks.shape[:-1], -1)
    values = values * 2.0 ** (exponents.astype(np.float64) - 127)[..., None]
    return values.reshape(*values.shape[:-2], -1).astype(np.float32)


def mxfp4_case(shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(len(shape))
    blocks = rng.integers(0, 256, size=shape, dtype=np.uint8)
    exponents = rng.integers(100, 150, size=shape[:-1], dtype=np.uint8)
    exponents.flat[0] = 0  # 2**-127: the values are float32 subnormals
    return blocks, exponents


@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 4)])
@pytest.mark.parametrize("scale_dtype", [torch.uint8, getattr(torch, "float8_e8m0fnu", None)])
def test_mxfp4_blocks_of_any_rank_and_scales_of_either_type(shape, scale_dtype):
    if scale_dtype is None:
        pytest.skip("torch < 2.7 has no float8_e8m0fnu")
    blocks, exponents = mxfp4_case(shape)
    scales = torch.from_numpy(exponents).view(scale_dtype)
    got = formats.mxfp4(torch.from_numpy(blocks), scales)
    assert got.dtype == torch.float32
    assert got.shape == (*shape[:-2], shape[-2] * shape[-1] * 2)
    np.testing.assert_array_equal(got.numpy(), mxfp4_np(blocks, exponents))


def test_mxfp4_is_float32_under_a_float64_default_dtype():
    blocks, exponents = mxfp4_case((3, 4))
    with torch_defaults(torch.float64, device=None):
        got = formats.mxfp4(torch.from_numpy(blocks), torch.from_numpy(exponents))
    assert got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), mxfp4_np(blocks, exponents))


def test_mxfp4_on_a_torch_without_float8_e8m0fnu(monkeypatch):
    """torch < 2.7 (pyproject allows 2.4) has no E8M0 dtype; uint8 scales still decode."""
    monkeypatch.delattr(torch, "float8_e8m0fnu", raising=False)
    blocks, exponents = mxfp4_case((3, 4))
    got = formats.mxfp4(torch.from_numpy(blocks), torch.from_numpy(exponents))
    np.testing.assert_array_equal(got.numpy(), mxfp4_np(blocks, exponents))


def test_decoders_keep_their_tensors_on_the_inputs_device():
    """Run on the meta device: as on a GPU, a tensor made on the CPU in the mix raises. (gptq
    and by_group_index check g_idx's values, which meta tensors do not hold.)"""
    meta = functools.partial(torch.empty, device="meta")
    i32, u8, f32 = torch.int32, torch.uint8, torch.float32
    cases = [
        (formats.unpack(meta(2, 5, dtype=i32), 4, 0), (16, 5), i32),
        (formats.unpack(meta(3, 5, dtype=i32), 3, 0), (32, 5), i32),
        (formats.mxfp4(meta(4, 2, 16, dtype=u8), meta(4, 2, dtype=u8)), (4, 64), f32),
        (formats.awq(meta(16, 2, dtype=i32), meta(2, 2, dtype=i32), meta(2, 16), 8), (16, 16), f32),
        (formats.blockwise(meta(4, 6, dtype=torch.float8_e4m3fn), meta(2, 3), (2, 2)), (4, 6), f32),
    ]
    for got, shape, dtype in cases:
        assert (got.device.type, tuple(got.shape), got.dtype) == ("meta", shape, dtype)


def test_decoders_do_not_depend_on_the_default_device_or_dtype():
    """A session that set torch's default device and dtype (a notebook's
    set_default_device("cuda")), here meta and float16: every decoder gives, on CPU inputs, what
    it gives under torch's own defaults (a table or index made on the default device would be
    meta there, and cannot meet the CPU codes)."""
    gen = torch.Generator().manual_seed(4)
    w = [torch.randint(-(2**31), 2**31, shape, generator=gen, dtype=torch.int32)
         for shape in [(4, 16), (2, 2), (3, 32), (2, 3), (16, 2), (2, 2)]]  # fmt: skip
    scales, scales32 = torch.rand(2, 16, generator=gen) + 0.5, torch.rand(2, 32, generator=gen)
    g_idx = torch.arange(32) % 2
    blocks = torch.randint(0, 256, (4, 2, 16), generator=gen, dtype=torch.uint8)
    exponents = torch.randint(120, 135, (4, 2), generator=gen, dtype=torch.uint8)
    fp8, grid = torch.rand(4, 6, generator=gen).to(torch.float8_e4m3fn), torch.rand(2, 3)
    calls = {
        "gptq": lambda: formats.gptq(w[0], w[1], scales, g_idx, 4, zero_offset=1),
        "gptq 3-bit": lambda: formats.gptq(w[2], w[3], scales32, g_idx, 3, zero_offset=1),
        "awq": lambda: formats.awq(w[4], w[5], scales, 8),
        "mxfp4": lambda: formats.mxfp4(blocks, exponents),
        "blockwise": lambda: formats.blockwise(fp8, grid, (2, 2)),
    }
    for name, call in calls.items():
        want = call()
        with torch_defaults(torch.float16):
            got = call()
        assert got.device == want.device and got.dtype == want.dtype == torch.float32, name
        assert torch.equal(got, want), name
