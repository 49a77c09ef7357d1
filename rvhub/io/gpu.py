"""Applying a dense vector to GPU-resident parameters at host-to-device copy speed.

Each vector file is ``mmap``ed read-only and pre-faulted (``MAP_POPULATE``: straight from the
page cache, no read() copy) and pinned for DMA with ``cudaHostRegister`` (read-only flag: no
page is dirtied or copied). Each tensor then reaches its parameter's GPU in one asynchronous
DMA and is added in place on the same stream, one tensor at a time, so the vector is never
whole on the GPU. Pinning costs about as much as the copy itself, so a registration is kept
for the next apply of the same file (an α sweep on one model is the usual case), keyed by the
file's identity stamp, up to ``RVHUB_GPU_PIN_CACHE_GB`` (default 16) of pinned page cache;
:func:`release_pinned` drops it. docs/design.md has the H200 measurements behind this.
"""

from __future__ import annotations

import atexit
import contextlib
import mmap
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..constants import ENV_GPU_PIN_CACHE_GB, GPU_PIN_CACHE_GB
from .progress import logger
from .safetensors import FileStamp, TensorEntry, file_stamp, read_tensor

CUDA_HOST_REGISTER_PORTABLE = 1
CUDA_HOST_REGISTER_READ_ONLY = 8

# (target tensor on a CUDA device, vector entry, rows to apply or None)
GpuWork = tuple[torch.Tensor, TensorEntry, int | None]


@dataclass
class _Pinned:
    mm: mmap.mmap
    base: torch.Tensor
    nbytes: int


_pinned: OrderedDict[FileStamp, _Pinned] = OrderedDict()
_lock = threading.Lock()


def _budget() -> int:
    try:
        return int(float(os.environ.get(ENV_GPU_PIN_CACHE_GB, GPU_PIN_CACHE_GB)) * 1e9)
    except ValueError:
        return int(GPU_PIN_CACHE_GB * 1e9)


def _unpin(entry: _Pinned) -> None:
    torch.cuda.synchronize()  # no DMA may still read these pages
    torch.cuda.cudart().cudaHostUnregister(entry.base.data_ptr())
    del entry.base
    with contextlib.suppress(BufferError):
        entry.mm.close()


def release_pinned() -> None:
    """Unpin every vector file kept pinned for later applies."""
    with _lock:
        while _pinned:
            _unpin(_pinned.popitem()[1])


def _pin(path: Path) -> torch.Tensor | None:
    """The file's bytes as a registered (pinned) uint8 CPU tensor, or None if CUDA refuses."""
    key = file_stamp(path)
    with _lock:
        hit = _pinned.get(key)
        if hit is not None:
            _pinned.move_to_end(key)
            return hit.base
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            mm = mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "buffer is not writable": read only
            base = torch.frombuffer(mm, dtype=torch.uint8)
        flags = CUDA_HOST_REGISTER_PORTABLE | CUDA_HOST_REGISTER_READ_ONLY
        if int(torch.cuda.cudart().cudaHostRegister(base.data_ptr(), size, flags)) != 0:
            del base
            with contextlib.suppress(BufferError):
                mm.close()
            return None
        _pinned[key] = _Pinned(mm, base, size)
        return base


def _evict_over_budget() -> None:
    """Unpin least recently used files until the pinned total fits ``RVHUB_GPU_PIN_CACHE_GB``
    (0 unpins everything, i.e. no caching); called once a file's copies are queued."""
    budget = _budget()
    with _lock:
        while _pinned and sum(p.nbytes for p in _pinned.values()) > budget:
            _unpin(_pinned.popitem(last=False)[1])


atexit.register(release_pinned)


def apply_dense_cuda(work: Sequence[GpuWork], scale: float) -> None:
    """``target += scale · vector`` for every item; every target is on a CUDA device."""
    by_file: dict[Path, list[GpuWork]] = {}
    for item in work:
        if item[1].nbytes:
            by_file.setdefault(item[1].path, []).append(item)
    for path, items in by_file.items():
        base = _pin(path)
        if base is None:
            logger.info("cudaHostRegister refused %s; using pageable copies", path)
        for target, entry, rows in items:
            if base is not None:
                src = base[entry.start : entry.end].view(entry.torch_dtype).view(entry.shape)
            else:
                src = read_tensor(entry)
            if rows is not None:
                src, target = src[:rows], target[:rows]
            target.add_(src.to(target.device, non_blocking=base is not None), alpha=scale)
        _evict_over_budget()
