"""Streaming ``A − B``: the vector between two checkpoints of one architecture."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from .checkpoint import Checkpoint, open_checkpoint
from .compat import check_pair, model_identity
from .errors import CompatibilityError
from .safetensors_io import FLOAT_DTYPES, TensorEntry, read_bytes_into
from .vector import ReasoningVector, VectorSource, compile_excludes, is_excluded


class FileHandles:
    """Open file descriptors by path, shared by all reads of one source."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}

    def fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self) -> None:
        self.close()


def read_range(
    entry: TensorEntry,
    start: int,
    stop: int,
    handles: FileHandles,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Flat elements ``[start, stop)`` of a stored tensor, in its own dtype (into ``out``, a
    flat tensor of that dtype and length, when given)."""
    dtype = entry.torch_dtype
    if out is None:
        out = torch.empty(stop - start, dtype=dtype)
    if stop > start:
        read_bytes_into(
            entry, out.view(torch.uint8), start * dtype.itemsize, handles.fd(entry.path)
        )
    return out


_CHUNK_SLAB = 1 << 20  # elements of A and B read at a time by DifferenceSource.chunk


class DifferenceSource(VectorSource):
    """``A − B`` computed in float32, one flat chunk at a time."""

    def __init__(self, a: Checkpoint, b: Checkpoint, names: list[str]) -> None:
        shapes = {n: a.entries[n].shape for n in names}
        dtypes = {n: a.entries[n].torch_dtype for n in names}
        super().__init__(shapes, dtypes)
        self.a, self.b = a, b
        self._handles = FileHandles()

    def entries_of(self, key: str) -> dict[str, TensorEntry]:
        """``"a"`` or ``"b"``: that source's entries."""
        return (self.a if key == "a" else self.b).entries

    def parts(
        self, name: str, start: int, stop: int, take: Callable[..., torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The raw A and B chunks (source dtypes), in buffers from ``take(numel, dtype)``
        when given (e.g. :meth:`rvhub.writer.SlabPool.take`)."""
        ea, eb = self.a.entries[name], self.b.entries[name]
        n = stop - start
        return (
            read_range(ea, start, stop, self._handles, take and take(n, ea.torch_dtype)),
            read_range(eb, start, stop, self._handles, take and take(n, eb.torch_dtype)),
        )

    def chunk(self, name: str, start: int, stop: int) -> torch.Tensor:
        """``A − B`` in float32, read and subtracted one slab at a time into the result, so a
        whole embedding costs its float32 result, not float32 copies of A and B as well."""
        out = torch.empty(stop - start, dtype=torch.float32)
        for s in range(start, stop, _CHUNK_SLAB):
            e = min(stop, s + _CHUNK_SLAB)
            a, b = self.parts(name, s, e)
            part = out[s - start : e - start]
            part.copy_(a)
            part.sub_(b)  # float32 math, as a.float() - b.float()
        return out


def extract_vector(
    a: str | os.PathLike[str] | Checkpoint,
    b: str | os.PathLike[str] | Checkpoint,
    *,
    revision_a: str | None = None,
    revision_b: str | None = None,
    exclude: Iterable[str] = (),
) -> ReasoningVector:
    """The reasoning vector ``v = A − B`` between two checkpoints, computed lazily.

    ``a`` and ``b`` are local folders, ``.safetensors`` files or Hub ids (``org/name`` or
    ``org/name@revision``). Nothing is read beyond the headers until the vector is saved or
    applied; the math is float32.

    Example:
        >>> v = extract_vector("org/qwen-grpo", "org/qwen-sft")
        >>> v.save("./reasoning-vector")
    """
    ca = a if isinstance(a, Checkpoint) else open_checkpoint(a, revision=revision_a)
    cb = b if isinstance(b, Checkpoint) else open_checkpoint(b, revision=revision_b)
    check_pair(ca, cb)
    patterns = compile_excludes(exclude)
    names, excluded, skipped = [], [], []
    for entry in ca.in_file_order():
        if is_excluded(entry.name, patterns):
            excluded.append(entry.name)
        elif entry.dtype not in FLOAT_DTYPES or cb.entries[entry.name].dtype not in FLOAT_DTYPES:
            skipped.append(entry.name)  # integer buffers (position ids, ...) carry no delta
        else:
            names.append(entry.name)
    if not names:
        raise CompatibilityError("every tensor was excluded: the vector would be empty")
    meta: dict[str, Any] = {
        "sources": {"a": _describe(ca), "b": _describe(cb)},
        "model": model_identity(ca.config),
        "excluded": excluded,
        "skipped_non_float": skipped,
        "exclude_patterns": list(exclude),
    }
    return ReasoningVector(DifferenceSource(ca, cb, names), meta)


def _describe(ckpt: Checkpoint) -> dict[str, Any]:
    info = dict(ckpt.source)
    info.setdefault("kind", "local")
    info["dtype"] = sorted({e.dtype for e in ckpt.entries.values()})
    info["nbytes"] = ckpt.nbytes
    return info
