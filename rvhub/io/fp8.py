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


class BlockScales:
    """A weight's block scales laid out for flat element ranges: for each band of ``bh`` rows,
    one float32 scale per column (``[bands, columns]``, 430 KB for a 8960 × 1536 weight), so
    that a run of whole rows is scaled by one broadcast multiply and a part of a row by one
    plain multiply, whatever the range's alignment."""

    def __init__(self, scale: torch.Tensor, shape: tuple[int, ...], block: tuple[int, int]) -> None:
        self.columns = shape[1]
        self.bh = block[0]
        self.rows = scale.repeat_interleave(block[1], dim=1)[:, : self.columns].contiguous()

    def apply_(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Multiply ``x`` (flat float32 values of ``W.flat[start : start + len(x)]``) by their
        scales in place; one multiply per partial row or run of whole rows within a band."""
        cols, bh = self.columns, self.bh
        p, stop = start, start + x.numel()
        while p < stop:
            row, col = divmod(p, cols)
            band = row // bh
            if col or stop - p < cols:  # part of one row
                e = min(stop, (row + 1) * cols)
                x[p - start : e - start].mul_(self.rows[band, col : col + e - p])
            else:  # whole rows up to the band's end
                last = min((band + 1) * bh, stop // cols)
                e = last * cols
                x[p - start : e - start].view(last - row, cols).mul_(self.rows[band])
            p = e
        return x


class Fp8Slab:
    """Flat e4m3 codes of ``W.flat[start : start + len(codes)]`` with their block scales,
    decoded on request one cache-sized block at a time (:func:`rvhub.io.kernels.diff_into`):
    decoding a whole 1 M-element slab into a 4 MB float32 buffer runs from memory at 2.2 ns per
    element here, a 64 K block that stays in L2 at 0.6 ns."""

    def __init__(self, codes: torch.Tensor, scales: BlockScales, start: int) -> None:
        import torch

        self.codes = codes
        self._bytes = codes.reshape(-1).view(torch.uint8).numpy()
        self.scales = scales
        self.start = start

    def numel(self) -> int:
        return int(self._bytes.shape[0])

    def decode(self, s: int, e: int, out: torch.Tensor) -> torch.Tensor:
        """The float32 values of the slab's elements ``[s, e)`` in ``out`` (``e − s`` long)."""
        decode_e4m3(self._bytes[s:e], out.numpy())
        return self.scales.apply_(out, self.start + s)


def dequantize_flat(
    q: torch.Tensor, scales: BlockScales, start: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Float32 values of the flat FP8 elements ``q`` = ``W.flat[start : start + len(q)]``
    (into ``out``, a flat float32 tensor of that length, when given).

    The bytes go through a table (:func:`decode_e4m3`: numpy's ``take``, 3× faster than
    ``.to(float32)`` here), then :meth:`BlockScales.apply_` scales them in place.
    """
    import torch

    if out is None:
        out = torch.empty(q.numel(), dtype=torch.float32)
    decode_e4m3(q.reshape(-1).view(torch.uint8).numpy(), out.numpy())
    return scales.apply_(out, start)


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
    scales = BlockScales(scale, tuple(q.shape), block)
    return dequantize_flat(q.reshape(-1), scales, 0).reshape(q.shape)


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
