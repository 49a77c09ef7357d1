"""The element-wise inner loops of extract and apply, tuned for cache-sized blocks.

A 1.5B model is 1.5 G elements; the float32 math per element is a handful of passes. Done on
32 MB buffers each pass goes to main memory; done on cache-sized blocks the same passes run
several times faster on one core. So callers hand over a slab (a few MB read with one
``preadv``) and these functions walk it in blocks into preallocated scratch buffers (one set
per thread), each call on one torch thread: the parallelism is across slabs
(:func:`rvhub.io.stream.ordered`).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

# Elements per inner block of extract: small blocks pay in torch dispatch what they win in
# cache; 64 K (768 KB of float32 scratch) stays in a 2 MB L2 with the slab's inputs, and each
# compute thread has its own core's L2 (docs/design.md has the measurements).
BLOCK = 64 * 1024


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run torch ops on ``n`` threads inside the block, then restore the previous setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(n, before)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def single_thread() -> contextlib.AbstractContextManager[None]:
    """One torch thread for the streaming kernels: the other core belongs to the writer
    thread, and with two OpenMP's barrier waits for a thread the writer displaced."""
    return torch_threads(1)


# Elements per block of apply's float32 loop (α other than ±1): 4 torch calls per block.
APPLY_BLOCK = 64 * 1024


class Scratch:
    """Reusable float32 blocks, so the inner loop never allocates."""

    def __init__(self, count: int = 3, block: int = BLOCK) -> None:
        self.block = block
        self.bufs = [torch.empty(block, dtype=torch.float32) for _ in range(count)]


class ThreadScratch:
    """One :class:`Scratch` per thread, for kernels run on several threads at once."""

    def __init__(self, count: int = 3, block: int = BLOCK) -> None:
        self.count, self.block = count, block
        self._local = threading.local()

    def get(self) -> Scratch:
        scratch = getattr(self._local, "scratch", None)
        if scratch is None:
            scratch = self._local.scratch = Scratch(self.count, self.block)
        return scratch


@dataclass
class Moments:
    """Accumulated sums over blocks (float64 on the Python side)."""

    sumsq: float = 0.0
    err_sumsq: float = 0.0
    nonfinite: int = 0

    @classmethod
    def merged(cls, parts: Iterable[Moments]) -> Moments:
        """The sums of ``parts`` added in the order given (slab order: the same floats
        whichever thread computed each part)."""
        out = cls()
        for m in parts:
            out.sumsq += m.sumsq
            out.err_sumsq += m.err_sumsq
            out.nonfinite += m.nonfinite
        return out

    def add_sumsq(self, d: torch.Tensor) -> None:
        sq = float(torch.dot(d, d))
        if math.isfinite(sq):
            self.sumsq += sq
            return
        finite = torch.isfinite(d)
        self.nonfinite += int(d.numel() - int(finite.sum()))
        kept = d[finite]
        self.sumsq += float(torch.dot(kept, kept))


class Encoded(Protocol):
    """Slab elements stored in a format torch cannot read directly (:class:`rvhub.io.fp8.Fp8Slab`),
    decoded to float32 one block at a time so the values never leave the cache."""

    def numel(self) -> int: ...

    def decode(self, s: int, e: int, out: torch.Tensor) -> torch.Tensor: ...


def _reader(x: torch.Tensor | Encoded, buf: torch.Tensor) -> Callable[[int, int], torch.Tensor]:
    """Float32 values of ``x[s:e]``: float32 read in place (never modified), other dtypes
    cast into ``buf``, encoded slabs decoded into it."""
    if not isinstance(x, torch.Tensor):
        return lambda s, e: x.decode(s, e, buf[: e - s])
    if x.dtype == torch.float32:
        return lambda s, e: x[s:e]
    return lambda s, e: buf[: e - s].copy_(x[s:e])


def diff_into(
    a: torch.Tensor | Encoded,
    b: torch.Tensor | Encoded,
    out: torch.Tensor,
    moments: Moments,
    scratch: Scratch,
    *,
    roundtrip: bool = True,
) -> None:
    """``out = round(a − b)`` in float32 math; accumulates ‖d‖² and ‖b + out − a‖².

    ``a``, ``b``, ``out`` are flat, of one length: tensors of any float dtypes, or encoded
    slabs (FP8) decoded block by block.
    """
    fa, fb, fr = scratch.bufs[:3]
    n = a.numel()
    exact_out = out.dtype == torch.float32
    read_a, read_b = _reader(a, fa), _reader(b, fb)
    for s in range(0, n, scratch.block):
        e = min(n, s + scratch.block)
        vr = fr[: e - s]
        va, vb = read_a(s, e), read_b(s, e)
        torch.sub(va, vb, out=vr)
        moments.add_sumsq(vr)
        out[s:e].copy_(vr)
        if roundtrip:
            if not exact_out:
                vr.copy_(out[s:e])
            vr.add_(vb).sub_(va)  # b + v_stored − a
            sq = float(torch.dot(vr, vr))
            if math.isfinite(sq):
                moments.err_sumsq += sq
            else:
                kept = vr[torch.isfinite(vr)]
                moments.err_sumsq += float(torch.dot(kept, kept))


def store_into(d: torch.Tensor, out: torch.Tensor, moments: Moments, scratch: Scratch) -> None:
    """``out = round(d)`` for a float32 delta chunk from any source; accumulates ‖d‖²."""
    n = d.numel()
    for s in range(0, n, scratch.block):
        e = min(n, s + scratch.block)
        moments.add_sumsq(d[s:e])
        out[s:e].copy_(d[s:e])


def axpy_into(
    t: torch.Tensor,
    v: torch.Tensor,
    alpha: float,
    out: torch.Tensor,
    scratch: Scratch,
) -> None:
    """``out = round(t + alpha·v)`` with float32 math and one rounding; ``v`` may be shorter
    than ``t`` (vocab overlap): the tail of ``t`` is copied unchanged."""
    n = v.numel()
    if alpha in (1.0, -1.0) and v.dtype == t.dtype == out.dtype:
        # Adding or removing a vector (the usual α) is one torch.add per slab, much faster
        # than the blocked loop. Only for ±1: torch's bf16/fp16 CPU add computes in float32
        # but may round alpha·v to the tensors' dtype first, which is exact only for ±1
        # (tests/test_kernels.py; docs/design.md).
        torch.add(t[:n], v, alpha=alpha, out=out[:n])
        if t.numel() > n:
            out[n:].copy_(t[n:])
        return
    ft, fv = scratch.bufs[:2]
    for s in range(0, n, scratch.block):
        e = min(n, s + scratch.block)
        k = e - s
        vt, vv = ft[:k], fv[:k]
        vt.copy_(t[s:e])
        vv.copy_(v[s:e])
        vt.add_(vv, alpha=alpha)
        out[s:e].copy_(vt)
    if t.numel() > n:
        out[n:].copy_(t[n:])


def add_scaled_(target: torch.Tensor, delta: torch.Tensor, alpha: float) -> None:
    """``target += alpha·delta`` in place, float32 math and one rounding, on any device.

    ``delta`` must already be on ``target``'s device. CUDA's ``add_`` computes in float32
    with alpha as a float32 already. On the CPU, ``add_`` on bf16/fp16 tensors rounds
    ``alpha·delta`` to their dtype before the sum, so the CPU goes through :func:`axpy_into`
    (one ``torch.add`` for α = ±1, float32 blocks otherwise).
    """
    set_scaled_(target, target, delta, alpha)


def set_scaled_(
    target: torch.Tensor, base: torch.Tensor, delta: torch.Tensor, alpha: float
) -> None:
    """``target = round(base + alpha·delta)`` with float32 math and one rounding, in one pass
    (``delta`` on ``target``'s device, ``base`` its dtype; ``base`` may be ``target`` itself,
    which is :func:`add_scaled_`)."""
    exact_product = alpha in (1.0, -1.0) and delta.dtype == target.dtype
    if target.device.type != "cpu" or target.dtype == torch.float32 or exact_product:
        torch.add(base, delta, alpha=alpha, out=target)
        return
    if target.is_contiguous() and base.is_contiguous():
        flat = target.view(-1)
        axpy_into(
            base.reshape(-1), delta.reshape(-1), alpha, flat, Scratch(count=2, block=APPLY_BLOCK)
        )
    else:
        target.copy_(base.float().add_(delta.float(), alpha=alpha))
