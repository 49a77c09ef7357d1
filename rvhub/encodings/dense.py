"""The dense encoding: every delta as a plain tensor in ``vector.safetensors`` (sharded as
``vector-0000i-of-0000N.safetensors`` + an index above ``max_shard_size``), tensor names as
in the checkpoint. Written slab by slab: reads, the float32 math and the write + hash
overlap in the slab pipeline (:mod:`rvhub.io.stream`), so memory stays at a few slabs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..constants import SLAB_ELEMS, VECTOR_INDEX
from ..errors import InputError, IntegrityError
from ..io.cores import beside_writer, resolve_threads
from ..io.hashing import FILE_HASH
from ..io.kernels import Moments, Scratch, ThreadScratch, single_thread
from ..io.safetensors import (
    FileHandles,
    SafetensorsWriter,
    TensorEntry,
    dtype_name,
    iter_chunks,
    read_range,
    read_tensor,
)
from ..io.stream import (
    Blob,
    SlabPool,
    plan_shards,
    pool_limit,
    shard_file_names,
    write_streams,
)
from ..manifest import Manifest, StatsBook, file_info, tensor_json
from ..options import WriteOptions
from ..sources import Slab, Take, VectorSource
from .base import Encoded, WriteJob, declared, stored_entries


class DenseSource(VectorSource):
    """Deltas stored as plain tensors in safetensors files (read without mmap)."""

    def __init__(self, entries: dict[str, TensorEntry]) -> None:
        super().__init__(
            {n: e.shape for n, e in entries.items()}, {n: e.torch_dtype for n, e in entries.items()}
        )
        self.entries = entries
        self._handles = FileHandles()

    def chunk(self, name: str, start: int, stop: int) -> torch.Tensor:
        return read_range(self.entries[name], start, stop, self._handles).float()

    def raw_chunk(self, name: str, start: int, stop: int, take: Take | None = None) -> torch.Tensor:
        entry = self.entries[name]
        return read_range(
            entry, start, stop, self._handles, take and take(stop - start, entry.torch_dtype)
        )

    def get(self, name: str, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        t = read_tensor(self.entries[name], self._handles.fd(self.entries[name].path))
        return t if dtype is None or t.dtype == dtype else t.to(dtype)

    def stored_entry(self, name: str) -> TensorEntry | None:
        return self.entries[name]


def must_be_finite(name: str, moments: Moments, options: WriteOptions) -> None:
    if moments.nonfinite and not options.allow_nonfinite:
        raise InputError(
            f"the delta of {name} has {moments.nonfinite} NaN/Inf values (the sources hold "
            "non-finite weights); pass `allow_nonfinite=True` to keep them"
        )


@dataclass
class DenseWrite:
    """What :func:`write_dense_files` wrote: file hashes and each tensor's statistics."""

    files: dict[str, dict[str, Any]]
    book: StatsBook
    dtypes: dict[str, torch.dtype]
    shapes: dict[str, tuple[int, ...]]

    def tensor_table(self) -> dict[str, dict[str, Any]]:
        return {
            n: tensor_json(m, self.shapes[n], self.dtypes[n]) for n, m in self.book.tensors.items()
        }


def write_dense_files(
    source: VectorSource,
    names: list[str],
    folder: Path,
    options: WriteOptions,
    *,
    desc: str = "writing vector",
) -> DenseWrite:
    """Stream the deltas ``names`` of ``source`` into ``vector*.safetensors`` files in ``folder``,
    computing slabs on ``options.threads`` threads (the same bytes and statistics on any
    number: each slab's sums are kept apart and merged in slab order). The writer thread,
    which writes and hashes, counts as one of them (:func:`rvhub.io.cores.beside_writer`)."""
    threads = resolve_threads(options.threads)
    workers = beside_writer(threads)
    dtypes = {n: options.dtype or source.dtypes[n] for n in names}
    shapes = {n: tuple(source.shapes[n]) for n in names}
    sizes = [(n, math.prod(shapes[n]) * dtypes[n].itemsize) for n in names]
    shards = plan_shards(sizes, options.max_shard_bytes)
    files = shard_file_names(len(shards))
    slab_moments: dict[str, list[Moments]] = {n: [] for n in names}
    scratch = ThreadScratch()
    pool = SlabPool(SLAB_ELEMS, limit=pool_limit(workers))

    def _slab(name: str, start: int, stop: int, moments: Moments) -> torch.Tensor:
        stored = pool.take(stop - start, dtypes[name])
        source.store_slab(Slab(name, start, stop, stored, moments), scratch.get(), pool, True)
        must_be_finite(name, moments, options)
        return stored

    def blobs(shard: list[str]) -> Iterator[Blob]:
        for name in shard:
            for start, stop in iter_chunks(math.prod(shapes[name]), SLAB_ELEMS):
                moments = Moments()
                slab_moments[name].append(moments)
                yield partial(_slab, name, start, stop, moments)

    def opener(fname: str, shard: list[str]) -> Callable[[], SafetensorsWriter]:
        specs = [(n, dtypes[n], shapes[n]) for n in shard]
        return lambda: SafetensorsWriter(
            folder / fname, specs, {"format": "pt"}, hash_threads=threads
        )

    with single_thread():
        hashes = write_streams(
            [(opener(f, shard), blobs(shard)) for f, shard in zip(files, shards, strict=True)],
            total_bytes=sum(s for _, s in sizes),
            desc=desc,
            pool=pool,
            threads=workers,
        )
    book = StatsBook({n: Moments.merged(slab_moments[n]) for n in names})
    info = {
        f: {FILE_HASH: digest, "size": size}
        for f, (digest, size) in zip(files, hashes, strict=True)
    }
    if len(files) > 1:
        weight_map = {n: f for f, shard in zip(files, shards, strict=True) for n in shard}
        index = {"metadata": {"total_size": sum(s for _, s in sizes)}, "weight_map": weight_map}
        (folder / VECTOR_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        info.update(file_info(folder, [VECTOR_INDEX]))
    return DenseWrite(info, book, dtypes, shapes)


def stored_delta(
    source: VectorSource, name: str, dtype: torch.dtype, pool: SlabPool, scratch: Scratch
) -> tuple[torch.Tensor, Moments]:
    """One whole delta as stored (``dtype``), built slab by slab, and its statistics.

    Holds the result and one slab of each source, never float32 copies of the whole tensor
    (for a 1.5B model's embedding that was 2.8 GB instead of 0.5 GB).
    """
    shape = tuple(source.shapes[name])
    numel = math.prod(shape)
    out = torch.empty(numel, dtype=dtype)
    moments = Moments()
    for start, stop in iter_chunks(numel, SLAB_ELEMS):
        source.store_slab(Slab(name, start, stop, out[start:stop], moments), scratch, pool, False)
    return out.reshape(shape), moments


class DenseEncoding:
    name = "dense"

    def write(self, job: WriteJob) -> Encoded:
        w = write_dense_files(job.source, job.names, job.folder, job.options)
        return Encoded(
            files=w.files,
            tensors=w.tensor_table(),
            stats=w.book.summary(job.source.measures_roundtrip),
            dtypes=[dtype_name(d) for d in w.dtypes.values()],
        )

    def open(self, folder: Path, manifest: Manifest) -> DenseSource:
        entries = stored_entries(folder, manifest)
        shapes, _ = declared(manifest)
        for name, entry in entries.items():
            if name not in shapes:
                raise IntegrityError(f"{folder}: tensor {name!r} is not declared in rvhub.json")
            if entry.shape != shapes[name]:
                raise IntegrityError(
                    f"{folder}: tensor {name!r} has shape {list(entry.shape)}, rvhub.json says "
                    f"{list(shapes[name])}"
                )
        missing = [n for n in shapes if n not in entries]
        if missing:
            raise IntegrityError(
                f"{folder}: rvhub.json declares {missing[0]!r}, which no file holds"
            )
        return DenseSource(entries)
