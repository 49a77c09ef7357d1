"""Writing a vector as a dense artifact: streamed, chunked, hashed, atomic.

Large tensors (an embedding is ~1 GB in float32 for a 1.5B model) are processed in flat
chunks so peak memory stays at a few chunk buffers whatever the model size. Reads, the
float32 math and the write + sha256 of the output overlap in a small pipeline.
"""

from __future__ import annotations

import hashlib
import json
import math
import queue
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .atomic import atomic_dir, check_output
from .errors import InputError
from .kernels import Moments, Scratch, diff_into, single_thread, store_into
from .load import remember_written, stamp_files
from .manifest import FORMAT, FORMAT_VERSION, now_iso, write_manifest
from .progress import bar
from .safetensors_io import (
    DTYPE_NAMES,
    SafetensorsWriter,
    iter_chunks,
    parse_dtype,
    sha256_file,
    tensor_bytes,
)
from .vector import ReasoningVector, compile_excludes, dtype_name, is_excluded, norm_summary

CHUNK_ELEMS = 8 * 1024 * 1024  # elements per chunk asked of a generic source
# Elements per read/compute/write unit (2 MB of bf16), and how many finished slabs may wait for
# the writer thread. Small slabs keep a slab's A, B and output in L3 from the read through the
# CRC, the kernel and the writer's sha256; a deeper queue absorbs the two threads' jitter.
# 1.5B extract, CLI, median of 4 (docs/performance.md): 4 M elements with 3 queued 5.6 s;
# 2 M 5.7 s; 512 K 5.3 s; 1 M 5.1 s; 1 M with 8 queued 4.7 s; 16 queued 4.7 s.
SLAB_ELEMS = 1024 * 1024
QUEUE_SLABS = 8
VECTOR_FILE = "vector.safetensors"
VECTOR_INDEX = "vector.safetensors.index.json"


def tensor_json(m: Moments, shape: tuple[int, ...], dtype: torch.dtype) -> dict[str, Any]:
    out: dict[str, Any] = {
        "shape": list(shape),
        "dtype": DTYPE_NAMES[dtype],
        "norm": math.sqrt(m.sumsq),
    }
    if m.nonfinite:
        out["nonfinite"] = m.nonfinite
    return out


@dataclass
class StatsBook:
    tensors: dict[str, Moments] = field(default_factory=dict)

    def summary(self, has_roundtrip: bool) -> dict[str, Any]:
        out = norm_summary({n: st.sumsq for n, st in self.tensors.items()})
        total = sum(st.sumsq for st in self.tensors.values())
        err = sum(st.err_sumsq for st in self.tensors.values())
        if has_roundtrip:
            out["roundtrip_error"] = {
                "abs": math.sqrt(err),
                "rel": math.sqrt(err) / math.sqrt(total) if total > 0 else 0.0,
                "what": "‖B + v − A‖ (Frobenius, all tensors) with v as stored; rel is ÷‖A − B‖",
            }
        return out


class _Crc32:
    """A running CRC-32 with hashlib's update/hexdigest shape (zlib releases the GIL)."""

    def __init__(self) -> None:
        self.value = 0

    def update(self, data: memoryview) -> None:
        self.value = zlib.crc32(data, self.value)

    def hexdigest(self) -> str:
        return f"{self.value:08x}"


class SourceFingerprint:
    """A layout-independent fingerprint of a local checkpoint's tensors.

    ``sha256`` over the lines ``name dtype shape crc32(bytes)`` of every tensor the vector
    read, sorted by name: resharding or re-saving the same weights keeps it; changing any
    tensor changes it (barring a CRC collision). It identifies local sources; it is not a
    security measure (the artifact's own files carry sha256 hashes). CRC-32 runs at ~7 GB/s
    against sha256's ~1.3 here, so fingerprinting both sources of a 1.5B model costs ~1 s of
    the writer thread instead of ~5 s.
    """

    algorithm = "sha256 of sorted 'name dtype shape crc32' lines"

    def __init__(self) -> None:
        self.tensors: dict[str, _Crc32] = {}

    def hasher(self, name: str) -> _Crc32:
        h = self.tensors.get(name)
        if h is None:
            h = self.tensors[name] = _Crc32()
        return h

    def digest(self, entries: dict[str, Any]) -> str:
        lines = [
            f"{n} {entries[n].dtype} {list(entries[n].shape)} {self.tensors[n].hexdigest()}\n"
            for n in sorted(self.tensors)
        ]
        return hashlib.sha256("".join(lines).encode()).hexdigest()


def plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes:
        if shards[-1] and used + nbytes > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


def shard_file_names(count: int, stem: str = "vector") -> list[str]:
    if count == 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


class SlabPool:
    """Recycled slab buffers, so the steady state of a stream allocates nothing.

    A fresh 8 MB ``torch.empty`` per slab is a fresh ``mmap`` from glibc: every 4 KB page is
    faulted in and zeroed by the kernel on first touch. Extracting a 1.5B model took ~670 K
    page faults that way (``perf stat``), over a second of system time. Buffers are taken by
    the producing thread and given back by whichever thread is done with them (the writer,
    after writing and hashing). Past ``limit`` buffers of one element size ``take`` falls back
    to plain allocation, so a buffer never given back costs speed, never a deadlock; the
    writer's bounded queue already keeps the number in flight below the default.
    """

    def __init__(self, slab_elems: int, limit: int = 24) -> None:
        self.slab_elems = slab_elems
        self.limit = limit
        self._free: dict[int, list[torch.Tensor]] = {}
        self._made: dict[int, int] = {}
        self._pooled: dict[int, tuple[int, torch.Tensor]] = {}  # data_ptr -> (itemsize, buffer)
        self._lock = threading.Lock()

    def take(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A flat ``dtype`` tensor of ``numel`` elements, uninitialised."""
        size = dtype.itemsize
        if numel > self.slab_elems:
            return torch.empty(numel, dtype=dtype)  # not a slab: not pooled
        with self._lock:
            free = self._free.setdefault(size, [])
            if free:
                buf = free.pop()
            elif self._made.get(size, 0) < self.limit:
                buf = torch.empty(self.slab_elems * size, dtype=torch.uint8)
                self._pooled[buf.data_ptr()] = (size, buf)
                self._made[size] = self._made.get(size, 0) + 1
            else:
                return torch.empty(numel, dtype=dtype)
        return buf[: numel * size].view(dtype)

    def give(self, *tensors: torch.Tensor) -> None:
        """Return buffers from :meth:`take` (anything else is ignored)."""
        with self._lock:
            for t in tensors:
                entry = self._pooled.get(t.data_ptr()) if t.numel() else None
                if entry is not None and all(b is not entry[1] for b in self._free[entry[0]]):
                    self._free[entry[0]].append(entry[1])


class BackgroundWriter:
    """Writes blobs to a SafetensorsWriter from one thread so I/O and hashing overlap compute."""

    def __init__(self, pool: SlabPool | None = None) -> None:
        self.q: queue.Queue[Any] = queue.Queue(QUEUE_SLABS)
        self.pool = pool
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            writer, blob = item
            try:
                if self.error is None:
                    writer.write_tensor(blob)
            except BaseException as e:
                self.error = e
            finally:
                if self.pool is not None:
                    self.pool.give(blob)

    def put(self, writer: SafetensorsWriter, blob: torch.Tensor) -> None:
        """Queue ``blob`` for writing (and the writer's sha256)."""
        if self.error is not None:
            raise self.error
        self.q.put((writer, blob))

    def finish(self) -> None:
        self.q.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def write_streams(
    streams: Iterable[tuple[Callable[[], SafetensorsWriter], Iterable[torch.Tensor]]],
    *,
    total_bytes: int,
    desc: str,
    pool: SlabPool | None = None,
) -> list[tuple[str, int]]:
    """Write each stream's blobs to its file from a background thread; fsync and close them all.

    ``streams`` pairs a function that opens a :class:`SafetensorsWriter` with the blobs for it,
    produced lazily (the caller's compute overlaps the previous blob's write and hashing).
    Buffers of each blob that came from ``pool`` go back to it once written and hashed.
    Returns ``(sha256, size)`` per file; on any error every file is closed unfinished and the
    error re-raised (callers write inside :func:`rvhub.atomic.atomic_dir`).
    """
    progress = bar(total_bytes, desc)
    bg = BackgroundWriter(pool)
    writers: list[SafetensorsWriter] = []
    try:
        for open_writer, blobs in streams:
            writer = open_writer()
            writers.append(writer)
            for blob in blobs:
                bg.put(writer, blob)
                progress.update(blob.numel() * blob.element_size())
        bg.finish()
        return [w.close() for w in writers]
    except BaseException:
        bg.q.put(None)
        for w in writers:
            w.abort()
        raise
    finally:
        progress.close()


@dataclass
class DenseWrite:
    """What :func:`write_dense_files` wrote: file hashes, statistics, source fingerprints."""

    files: dict[str, dict[str, Any]]
    book: StatsBook
    dtypes: dict[str, torch.dtype]
    shapes: dict[str, tuple[int, ...]]
    roundtrip: bool
    content_hashes: dict[str, str]


def write_dense_files(
    vec: ReasoningVector,
    names: list[str],
    folder: Path,
    *,
    dtype: torch.dtype | None,
    allow_nonfinite: bool,
    max_shard_size: int,
    desc: str = "writing vector",
) -> DenseWrite:
    """Stream the deltas ``names`` of ``vec`` into ``vector*.safetensors`` files in ``folder``."""
    from .extract import DifferenceSource

    source = vec.source
    dtypes = {n: dtype or source.dtypes[n] for n in names}
    shapes = {n: tuple(source.shapes[n]) for n in names}
    sizes = [(n, math.prod(shapes[n]) * dtypes[n].itemsize) for n in names]
    shards = plan_shards(sizes, max_shard_size)
    files = shard_file_names(len(shards))
    diff = source if isinstance(source, DifferenceSource) else None
    book = StatsBook({n: Moments() for n in names})
    total_bytes = sum(s for _, s in sizes)
    scratch = Scratch()
    pool = SlabPool(SLAB_ELEMS)

    # Local sources have no commit sha: fingerprint their tensors while they stream past.
    fingerprints = (
        {"a": SourceFingerprint(), "b": SourceFingerprint()}
        if diff is not None and "revision" not in vec.meta.get("sources", {}).get("a", {})
        else {}
    )

    def _slab(name: str, start: int, stop: int) -> torch.Tensor:
        moments = book.tensors[name]
        stored = pool.take(stop - start, dtypes[name])
        delta_into(vec, name, start, stop, stored, moments, pool, scratch, fingerprints)
        if moments.nonfinite and not allow_nonfinite:
            raise InputError(
                f"the delta of {name} has {moments.nonfinite} NaN/Inf values (the sources hold "
                "non-finite weights); pass --allow-nonfinite to keep them"
            )
        return stored

    def blobs(shard: list[str]) -> Iterator[torch.Tensor]:
        for name in shard:
            for start, stop in iter_chunks(math.prod(shapes[name]), SLAB_ELEMS):
                yield _slab(name, start, stop)

    def opener(fname: str, shard: list[str]) -> Callable[[], SafetensorsWriter]:
        specs = [(n, dtypes[n], shapes[n]) for n in shard]
        return lambda: SafetensorsWriter(folder / fname, specs, {"format": "pt"})

    with single_thread():
        hashes = write_streams(
            [(opener(f, shard), blobs(shard)) for f, shard in zip(files, shards, strict=True)],
            total_bytes=total_bytes,
            desc=desc,
            pool=pool,
        )
    file_info = {
        f: {"sha256": sha, "size": size} for f, (sha, size) in zip(files, hashes, strict=True)
    }
    weight_map = {n: f for f, shard in zip(files, shards, strict=True) for n in shard}
    if len(files) > 1:
        index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
        (folder / VECTOR_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        file_info[VECTOR_INDEX] = {
            "sha256": sha256_file(folder / VECTOR_INDEX),
            "size": (folder / VECTOR_INDEX).stat().st_size,
        }
    content = (
        {k: f.digest(diff.entries_of(k)) for k, f in fingerprints.items()}
        if fingerprints and diff is not None
        else {}
    )
    return DenseWrite(file_info, book, dtypes, shapes, diff is not None, content)


def delta_into(
    vec: ReasoningVector,
    name: str,
    start: int,
    stop: int,
    out: torch.Tensor,
    moments: Moments,
    pool: SlabPool,
    scratch: Scratch,
    fingerprints: dict[str, SourceFingerprint] | None = None,
    *,
    roundtrip: bool = True,
) -> None:
    """Elements ``[start, stop)`` of the delta ``name``, rounded into ``out``; adds to
    ``moments`` (the round-trip error too, for a difference, when ``roundtrip``), and to
    ``fingerprints`` the CRCs of A's and B's bytes when given."""
    from .extract import DifferenceSource

    source = vec.source
    if not isinstance(source, DifferenceSource):
        store_into(source.chunk(name, start, stop), out, moments, scratch)
        return
    a, b = source.parts(name, start, stop, pool.take)
    diff_into(a, b, out, moments, scratch, roundtrip=roundtrip)
    if fingerprints:
        # Here, not in the writer thread: with the output's sha256 and the write, the writer
        # is the busier of the two threads (docs/design.md).
        fingerprints["a"].hasher(name).update(tensor_bytes(a))
        fingerprints["b"].hasher(name).update(tensor_bytes(b))
    pool.give(a, b)


def stored_delta(
    vec: ReasoningVector, name: str, dtype: torch.dtype, pool: SlabPool, scratch: Scratch
) -> tuple[torch.Tensor, Moments]:
    """One whole delta as stored (``dtype``), built slab by slab, and its statistics.

    Holds the result and one slab of each source, never float32 copies of the whole tensor
    (for a 1.5B model's embedding that was 2.8 GB instead of 0.5 GB).
    """
    shape = tuple(vec.source.shapes[name])
    numel = math.prod(shape)
    out = torch.empty(numel, dtype=dtype)
    moments = Moments()
    for start, stop in iter_chunks(numel, SLAB_ELEMS):
        delta_into(vec, name, start, stop, out[start:stop], moments, pool, scratch, roundtrip=False)
    return out.reshape(shape), moments


def base_manifest(
    vec: ReasoningVector, encoding: str, excluded: list[str], exclude: list[str]
) -> dict[str, Any]:
    """The manifest fields every encoding shares (files, tensors and stats are added after)."""
    meta = vec.meta
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "encoding": encoding,
        "rvhub_version": __version__,
        "created_at": now_iso(),
        "sources": meta.get("sources", {}),
        "model": meta.get("model", {}),
        "math_dtype": "float32",
        "excluded": list(meta.get("excluded", [])) + excluded,
        "exclude_patterns": list(meta.get("exclude_patterns", [])) + exclude,
        "skipped_non_float": meta.get("skipped_non_float", []),
        **({"combination": meta["combination"]} if "combination" in meta else {}),
    }


def with_content_hashes(sources: dict[str, Any], hashes: dict[str, str]) -> dict[str, Any]:
    return {
        k: {
            **v,
            "content_fingerprint": hashes[k],
            "fingerprint_algorithm": SourceFingerprint.algorithm,
        }
        if k in hashes
        else v
        for k, v in sources.items()
    }


def write_dense(
    vec: ReasoningVector,
    out: Path,
    *,
    dtype: torch.dtype | str | None,
    overwrite: bool,
    exclude: list[str],
    allow_nonfinite: bool,
    max_shard_size: int,
) -> Path:
    """Stream ``vec`` into a new dense artifact folder ``out``; returns its path."""
    check_output(out, overwrite=overwrite)
    out_dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    patterns = compile_excludes(exclude)
    names = [n for n in vec.names if not is_excluded(n, patterns)]
    newly_excluded = [n for n in vec.names if is_excluded(n, patterns)]
    if not names:
        raise InputError("every tensor was excluded: the vector would be empty")
    with atomic_dir(out, overwrite=overwrite) as tmp:
        w = write_dense_files(
            vec,
            names,
            tmp,
            dtype=out_dtype,
            allow_nonfinite=allow_nonfinite,
            max_shard_size=max_shard_size,
        )
        manifest = base_manifest(vec, "dense", newly_excluded, exclude)
        manifest["sources"] = with_content_hashes(manifest["sources"], w.content_hashes)
        manifest["dtype"] = sorted({dtype_name(d) for d in w.dtypes.values()})
        manifest["files"] = w.files
        manifest["tensors"] = {
            n: tensor_json(w.book.tensors[n], w.shapes[n], w.dtypes[n]) for n in names
        }
        manifest["stats"] = w.book.summary(w.roundtrip)
        write_manifest(tmp, manifest)
        stamps = stamp_files(tmp, w.files)
    remember_written(out, w.files, stamps)
    return out.absolute()
