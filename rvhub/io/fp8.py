"""Block-quantized FP8 (the format of DeepSeek-V3/R1 and Qwen3-*-FP8 releases).

A weight ``W`` of shape ``[out, in]`` is stored as ``float8_e4m3fn`` values ``Q`` and a float32
``weight_scale_inv`` ``S`` of shape ``[ceil(out/bh), ceil(in/bw)]``, one per ``bh × bw`` block
(``weight_block_size``, usually 128 × 128; the last block of a row or column may be ragged):
``W[i, j] = Q[i, j] · S[i // bh, j // bw]``. Requantizing picks each block's scale as
``amax / 448`` (448 is e4m3's largest finite value), as DeepSeek's and transformers' quantizers do.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

E4M3_MAX = 448.0
SCALE_SUFFIX = "_scale_inv"


def e4m3_values() -> np.ndarray:
    """The float32 value of each of the 256 ``float8_e4m3fn`` bytes (NaN for 0x7F and 0xFF)."""
    codes = np.arange(256, dtype=np.uint32)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exp = (codes >> 3) & 0xF
    man = (codes & 0x7).astype(np.float64)
    normal = (1.0 + man / 8.0) * np.exp2(exp.astype(np.float64) - 7.0)
    subnormal = (man / 8.0) * np.exp2(-6.0)
    values = sign * np.where(exp == 0, subnormal, normal)
    values[(codes & 0x7F) == 0x7F] = np.nan
    return values.astype(np.float32)


def block_scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """``[ceil(out/bh), ceil(in/bw)]`` for a 2-D weight."""
    out, inp = shape
    return (-(-out // block[0]), -(-inp // block[1]))


def scale_rows(scale: torch.Tensor, rows: range, columns: int, block: tuple[int, int]):
    """The per-element scales of ``rows`` of a ``[*, columns]`` weight: ``[len(rows), columns]``."""
    import torch

    idx = torch.arange(rows.start, rows.stop) // block[0]
    per_block = scale[idx]  # [rows, in_blocks]
    return per_block.repeat_interleave(block[1], dim=1)[:, :columns]


def dequantize_flat(
    q: torch.Tensor,
    scale: torch.Tensor,
    shape: tuple[int, ...],
    block: tuple[int, int],
    start: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float32 values of the flat FP8 elements ``q`` = ``W.flat[start : start + len(q)]``
    (into ``out``, a flat float32 tensor of that length, when given).

    The bytes go through a table (:func:`decode_e4m3`: numpy's ``take``, 3× faster than
    ``.to(float32)`` here); whole rows are then scaled in place, every whole column block in
    one broadcast multiply and a ragged last one apart, and the partial rows at either end
    element by element.
    """
    import torch

    columns = shape[1]
    n = q.numel()
    if out is None:
        out = torch.empty(n, dtype=torch.float32)
    decode_e4m3(q.reshape(-1).view(torch.uint8).numpy(), out.numpy())
    stop = start + n
    first_full = -(-start // columns) * columns  # the first row start at or after ``start``
    last_full = stop // columns * columns
    bh, bw = block
    if stop <= first_full:  # within one row
        partial = [(start, stop)]
    else:
        partial = [(start, first_full), (last_full, stop)]
        r0, r1 = first_full // columns, last_full // columns
        if r0 < r1:  # whole rows: whole column blocks in one broadcast, then a ragged one
            rows = out[first_full - start : last_full - start].view(r1 - r0, columns)
            per_row = scale[torch.arange(r0, r1) // bh]  # [rows, column blocks]
            whole = columns // bw
            if whole:
                rows[:, : whole * bw].view(r1 - r0, whole, bw).mul_(per_row[:, :whole, None])
            if whole * bw < columns:
                rows[:, whole * bw :].mul_(per_row[:, whole:])
    for lo, hi in partial:
        if lo < hi:
            row = lo // columns
            cols = torch.arange(lo - row * columns, hi - row * columns) // bw
            out[lo - start : hi - start].mul_(scale[row // bh][cols])
    return out


_TABLE: list[np.ndarray] = []


def _table() -> np.ndarray:
    if not _TABLE:
        _TABLE.append(e4m3_values())
    return _TABLE[0]


_PAIRS: list[np.ndarray] = []


def _pair_table() -> np.ndarray:
    """The two float32 values of every pair of e4m3 bytes, as one uint64 per little-endian
    uint16 (512 KB: it stays in L2)."""
    if not _PAIRS:
        values = _table()
        pairs = np.arange(65536)
        both = np.stack([values[pairs & 0xFF], values[pairs >> 8]], axis=1)
        _PAIRS.append(np.ascontiguousarray(both, dtype="<f4").view(np.uint64).reshape(-1))
    return _PAIRS[0]


def decode_e4m3(codes: np.ndarray, out: np.ndarray) -> None:
    """``out[i]`` = the float32 value of e4m3 byte ``codes[i]`` (NaN codes give NaN).

    Two bytes at a time through a 65536-entry table of value pairs (1.2 ns per element here,
    against 1.55 ns for one byte at a time through 256 entries); an odd last byte, or buffers
    that are not aligned for 2- and 8-byte views, go through the 256-entry table."""
    n = codes.shape[0]
    even = n - n % 2
    aligned = codes.ctypes.data % 2 == 0 and out.ctypes.data % 8 == 0 and sys.byteorder == "little"
    if even and aligned:
        np.take(_pair_table(), codes[:even].view(np.uint16), out=out[:even].view(np.uint64))
        if even < n:
            np.take(_table(), codes[even:], out=out[even:])
        return
    np.take(_table(), codes, out=out)


def dequantize(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The float32 weight of a whole FP8 tensor."""
    import torch

    (out, inp), (bh, bw) = q.shape, block
    if out % bh == 0 and inp % bw == 0:  # whole blocks: one broadcast multiply
        x = torch.empty(out, inp, dtype=torch.float32)
        codes = q.contiguous().view(torch.uint8).numpy().reshape(-1)
        decode_e4m3(codes, x.numpy().reshape(-1))
        x.view(out // bh, bh, inp // bw, bw).mul_(scale[:, None, :, None])
        return x
    return dequantize_flat(q.reshape(-1), scale, tuple(q.shape), block, 0).reshape(q.shape)


def quantize(x: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q, S)``: ``x`` (float32 ``[out, in]``) as e4m3 values and per-block ``amax / 448``
    scales (1 for an all-zero block), so that ``Q · S`` is the nearest FP8 value of ``x``."""
    import torch

    out, inp = x.shape
    bh, bw = block
    nb_r, nb_c = block_scale_shape((out, inp), block)
    if out % bh or inp % bw:  # ragged last blocks: pad with zeros (they do not change amax)
        padded = x.new_zeros(nb_r * bh, nb_c * bw)
        padded[:out, :inp] = x
    else:
        padded = x.contiguous()
    blocks = padded.view(nb_r, bh, nb_c, bw)
    # max |x| per block without an |x| copy
    amax = torch.maximum(blocks.amax(dim=(1, 3)), blocks.amin(dim=(1, 3)).neg_())
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax)).to(torch.float32)
    q = (blocks / scale[:, None, :, None]).clamp_(-E4M3_MAX, E4M3_MAX)
    q8 = q.view(nb_r * bh, nb_c * bw)[:out, :inp].to(torch.float8_e4m3fn)
    return q8.contiguous(), scale.contiguous()
