"""The arithmetic of each supported format: stored codes and scales in, the float32 weight they
encode out. Pure torch, computed on whatever device the inputs are on; nothing here knows about
files or names (:mod:`esdtool.dequant.layout` decides which tensors go together).

Every function is written from the format's definition and checked in the tests against the
format's own reference code (transformers' FP8 and MXFP4 integrations, compressed-tensors'
decompressors, GPTQModel's and AutoAWQ's unpacking).
"""

from __future__ import annotations

import torch

# FP4 E2M1 values by 4-bit code (sign bit 3): the OCP MX specification's table.
FP4_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
# AWQ (GEMM) packs the eight 4-bit columns of a word in this order; nibble i holds column
# AWQ_ORDER[i] of its group of eight.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def scale_values(scale: torch.Tensor) -> torch.Tensor:
    """A stored scale as float32 values (``float8_e8m0fnu`` converts to its power of two)."""
    return scale.to(torch.float32)


def exponent_bytes(scales: torch.Tensor) -> torch.Tensor:
    """E8M0 scales as their biased exponent bytes b (the scale is 2**(b - 127)), whether stored
    as ``uint8`` or as ``float8_e8m0fnu``."""
    if scales.dtype == getattr(torch, "float8_e8m0fnu", None):
        return scales.view(torch.uint8)
    return scales


def expand(grid: torch.Tensor, block: tuple[int, int], shape: tuple[int, ...]) -> torch.Tensor:
    """A per-block ``grid`` [..., ceil(R/bm), ceil(C/bn)] spread over ``shape`` [..., R, C]:
    entry (i, j) gets grid[i // bm, j // bn]. Edge blocks may be partial (DeepSeek's 576-row
    projections with 128-row blocks)."""
    rows, cols = shape[-2], shape[-1]
    bm, bn = min(block[0], rows), min(block[1], cols)  # a block past the edge is the edge
    if grid.ndim < 2:  # one scale for the whole tensor, stored as [] or [1]
        grid = grid.reshape(1, 1)
    if grid.shape[-2:] != (-(-rows // bm), -(-cols // bn)):  # the layout checked it; a guard
        raise ValueError(f"scale grid {list(grid.shape)} does not fit {list(shape)}")
    out = grid.repeat_interleave(bm, dim=-2)[..., :rows, :]
    return out.repeat_interleave(bn, dim=-1)[..., :cols]


def blockwise(
    values: torch.Tensor,
    scale: torch.Tensor,
    block: tuple[int, int],
    zero: torch.Tensor | None = None,
) -> torch.Tensor:
    """(values - zero) * scale, scale and zero given per ``block`` of the last two dims.

    One rule covers every scaling layout: per tensor is one block of the whole matrix,
    per channel (output row) a block of (1, C), per group a block of (1, g), and 2-D blocks
    (FP8 128x128) themselves.
    """
    out = values.to(torch.float32)
    if zero is not None:
        out = out - expand(zero.to(torch.float32), block, tuple(out.shape))
    return out * expand(scale_values(scale), block, tuple(out.shape))


def by_group_index(
    values: torch.Tensor,
    scale: torch.Tensor,
    g_idx: torch.Tensor,
    zero: torch.Tensor | None = None,
) -> torch.Tensor:
    """(values - zero[:, g]) * scale[:, g] where column j belongs to group ``g_idx[j]`` (GPTQ's
    activation order: groups are not contiguous). values [R, C]; scale, zero [R, G]. A group
    index outside [0, G) is an error (torch would wrap a negative one around silently)."""
    index = g_idx.to(device=values.device, dtype=torch.long)
    groups = scale.shape[-1]
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= groups):
        raise ValueError(
            f"g_idx holds group {int(index.min()) if int(index.min()) < 0 else int(index.max())}"
            f", outside 0..{groups - 1}"
        )
    out = values.to(torch.float32)
    if zero is not None:
        out = out - zero.to(torch.float32)[:, index]
    return out * scale_values(scale)[:, index]


def unpack(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """The unsigned ``bits``-bit fields of int32 words, lowest bits first, laid out along
    ``dim`` (word k of ``dim`` becomes entries k*32/bits ... (k+1)*32/bits - 1). 3-bit fields
    run on across words: every 3 words hold 32 fields as one 96-bit little-endian stream."""
    if bits == 3:
        return _unpack3(packed, dim)
    per_word = 32 // bits
    mask = (1 << bits) - 1
    # int32 arithmetic shifts copy the sign bit in from the left; the mask drops those bits.
    words = packed.to(torch.int32).movedim(dim, -1)
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    fields = torch.bitwise_and(words.unsqueeze(-1) >> shifts, mask)
    fields = fields.reshape(*words.shape[:-1], words.shape[-1] * per_word)
    return fields.movedim(-1, dim)


def _unpack3(packed: torch.Tensor, dim: int) -> torch.Tensor:
    words = torch.bitwise_and(packed.to(torch.int64), 0xFFFFFFFF).movedim(dim, -1)
    triples = words.reshape(*words.shape[:-1], -1, 3)
    w0, w1, w2 = triples.unbind(-1)
    low = (w0 | (w1 << 32)).unsqueeze(-1)  # stream bits 0..63
    high = (w1 | (w2 << 32)).unsqueeze(-1)  # stream bits 32..95
    j = torch.arange(32, device=packed.device)
    first = torch.bitwise_and(low >> (3 * j[:21]), 7)  # fields 0..20 end by stream bit 62
    rest = torch.bitwise_and(high >> (3 * j[21:] - 32), 7)  # fields 21..31 start at bit 63
    fields = torch.cat((first, rest), dim=-1).reshape(*words.shape[:-1], -1)
    return fields.to(torch.int32).movedim(-1, dim)


def mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """OCP MXFP4: ``blocks`` [..., G, B] bytes, each two E2M1 codes (low nibble first), and
    ``scales`` [..., G] E8M0 exponents, one per 2B values. Returns [..., G * 2B]."""
    lut = torch.tensor(FP4_E2M1, dtype=torch.float32, device=blocks.device)
    codes = blocks.to(torch.uint8)
    low = lut[torch.bitwise_and(codes, 0x0F).long()]
    high = lut[torch.bitwise_right_shift(codes, 4).long()]
    values = torch.stack((low, high), dim=-1).flatten(-2)  # [..., G, 2B]
    exponents = exponent_bytes(scales).to(torch.int32).unsqueeze(-1) - 127
    values = torch.ldexp(values, exponents.to(torch.float32))
    return values.flatten(-2)


def gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    *,
    zero_offset: int,
) -> torch.Tensor:
    """GPTQ: ``qweight`` [C*bits/32, R] packs the codes along the input dimension, ``qzeros``
    [G, R*bits/32] the zero points along the output dimension, ``scales`` [G, R]; input column
    i belongs to group ``g_idx[i]``. Format v1 (AutoGPTQ's ``gptq``) stores the zero points
    minus one, so ``zero_offset`` is 1; ``gptq_v2`` stores them as they are (0). The offset is
    added to whole words, as GPTQModel (the maintained implementation) writes and reads v1: a
    zero point of 0, stored as -1, borrows from the next field, and a whole-word addition gives
    both back. Returns the [R, C] weight as ``nn.Linear`` holds it."""
    codes = unpack(qweight, bits, dim=0)  # [C, R]
    if zero_offset and bits == 3:  # fields cross words: GPTQModel adds the offset field by field
        zeros = unpack(qzeros, bits, dim=1)[:, : scales.shape[1]] + zero_offset
        return by_group_index(codes.T, scales.T, g_idx, zeros.T)
    if zero_offset:
        ones = sum(zero_offset << (bits * k) for k in range(32 // bits))  # 0x11111111 at 4 bits
        qzeros = torch.bitwise_and(qzeros.to(torch.int64) + ones, 0xFFFFFFFF)
    zeros = unpack(qzeros, bits, dim=1)[:, : scales.shape[1]]  # [G, R]
    return by_group_index(codes.T, scales.T, g_idx, zeros.T)


def awq(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int
) -> torch.Tensor:
    """AWQ (GEMM layout): ``qweight`` [C, R/8] and ``qzeros`` [G, R/8] pack eight 4-bit output
    columns per word in :data:`AWQ_ORDER`; ``scales`` [G, R]. Returns the [R, C] weight."""
    order = torch.tensor(AWQ_ORDER, device=qweight.device)
    inverse = torch.argsort(order)  # column c of a group of eight sits in nibble inverse[c]

    def columns(packed: torch.Tensor) -> torch.Tensor:
        fields = unpack(packed, 4, dim=1)
        groups = fields.reshape(fields.shape[0], -1, 8)
        return groups[:, :, inverse].reshape(fields.shape)

    codes = columns(qweight)  # [C, R]
    return blockwise(codes.T, scales.T, (1, group_size), columns(qzeros).T)
