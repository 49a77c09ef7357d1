"""Writing a vector as a dense artifact: streamed, chunked, hashed, atomic.

Large tensors (an embedding is ~1 GB in float32 for a 1.5B model) are processed in flat
chunks so peak memory stays at a few chunk buffers whatever the model size. Reads, the
float32 math and the write + sha256 of the output overlap in a small pipeline.
"""

from __future__ import annotations

import json
import math
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .atomic import atomic_dir, check_output
from .errors import InputError
from .manifest import FORMAT, FORMAT_VERSION, now_iso, write_manifest
from .progress import bar
from .safetensors_io import DTYPE_NAMES, SafetensorsWriter, iter_chunks, parse_dtype
from .vector import ReasoningVector, compile_excludes, is_excluded, layer_of

CHUNK_ELEMS = 8 * 1024 * 1024  # 32 MB of float32 per chunk
VECTOR_FILE = "vector.safetensors"
VECTOR_INDEX = "vector.safetensors.index.json"


@dataclass
class TensorStats:
    """Running statistics of one delta, accumulated chunk by chunk."""

    sumsq: float = 0.0
    max_abs: float = 0.0
    nonzero: int = 0
    nonfinite: int = 0
    err_sumsq: float = 0.0  # ‖B + v_stored − A‖² when the vector is a difference

    def update(self, d: torch.Tensor) -> None:
        sq = float(torch.dot(d, d)) if d.numel() else 0.0
        if not math.isfinite(sq):
            finite = torch.isfinite(d)
            self.nonfinite += int(d.numel() - int(finite.sum()))
            d = d[finite]
            sq = float(torch.dot(d, d)) if d.numel() else 0.0
        self.sumsq += sq
        if d.numel():
            lo, hi = torch.aminmax(d)
            self.max_abs = max(self.max_abs, float(-lo), float(hi))
            self.nonzero += int(torch.count_nonzero(d))

    def as_json(self, shape: tuple[int, ...], dtype: torch.dtype) -> dict[str, Any]:
        return {
            "shape": list(shape),
            "dtype": DTYPE_NAMES[dtype],
            "norm": math.sqrt(self.sumsq),
            "max_abs": self.max_abs,
            "nonzero": self.nonzero,
        }


@dataclass
class StatsBook:
    tensors: dict[str, TensorStats] = field(default_factory=dict)

    def summary(self, has_roundtrip: bool) -> dict[str, Any]:
        layers: dict[str, float] = {}
        total = err = 0.0
        nnz = 0
        for name, st in self.tensors.items():
            layers[layer_of(name)] = layers.get(layer_of(name), 0.0) + st.sumsq
            total += st.sumsq
            err += st.err_sumsq
            nnz += st.nonzero
        out: dict[str, Any] = {
            "norm": math.sqrt(total),
            "layer_norms": {k: math.sqrt(v) for k, v in sorted(layers.items(), key=_layer_key)},
            "nonzero": nnz,
        }
        if has_roundtrip:
            out["roundtrip_error"] = {
                "abs": math.sqrt(err),
                "rel": math.sqrt(err) / math.sqrt(total) if total > 0 else 0.0,
                "what": "‖B + v − A‖ (Frobenius, all tensors) with v as stored; rel is ÷‖A − B‖",
            }
        return out


def _layer_key(item: tuple[str, float]) -> tuple[int, int | str]:
    k = item[0]
    return (0, int(k)) if k.isdigit() else (1, k)


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


class Pipeline:
    """Run ``produce`` for each job in a reader thread, hand results to the caller in order,
    and write byte blobs in a writer thread. Any exception is re-raised in the caller."""

    def __init__(self, depth: int = 3) -> None:
        self.depth = depth
        self._error: BaseException | None = None

    def map_ordered(self, jobs: list[Any], produce: Callable[[Any], Any]) -> Iterator[Any]:
        q: queue.Queue[Any] = queue.Queue(self.depth)
        stop = threading.Event()
        done = object()

        def worker() -> None:
            try:
                for job in jobs:
                    if stop.is_set():
                        return
                    q.put((job, produce(job)))
            except BaseException as e:  # handed to the consumer
                q.put(e)
                return
            q.put(done)

        t = threading.Thread(target=worker, daemon=True)
        t.start()
        try:
            while True:
                item = q.get()
                if item is done:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while t.is_alive():
                try:
                    q.get_nowait()
                except queue.Empty:
                    t.join(0.01)


class BackgroundWriter:
    """Writes blobs to a SafetensorsWriter from one thread so I/O and hashing overlap compute."""

    def __init__(self) -> None:
        self.q: queue.Queue[Any] = queue.Queue(3)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            writer, blob = item
            if self.error is not None:
                continue
            try:
                writer.write_tensor(blob)
            except BaseException as e:
                self.error = e

    def put(self, writer: SafetensorsWriter, blob: torch.Tensor) -> None:
        if self.error is not None:
            raise self.error
        self.q.put((writer, blob))

    def finish(self) -> None:
        self.q.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def write_dense(
    vec: ReasoningVector,
    out: Path,
    *,
    dtype: torch.dtype | str | None,
    overwrite: bool,
    exclude: list[str],
    allow_nonfinite: bool,
    max_shard_size: int,
    extra_meta: dict[str, Any] | None = None,
) -> Path:
    """Stream ``vec`` into a new artifact folder ``out``; returns its path."""
    from .extract import DifferenceSource

    check_output(out, overwrite=overwrite)
    out_dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    patterns = compile_excludes(exclude)
    source = vec.source
    names = [n for n in vec.names if not is_excluded(n, patterns)]
    newly_excluded = [n for n in vec.names if is_excluded(n, patterns)]
    if not names:
        raise InputError("every tensor was excluded: the vector would be empty")
    dtypes = {n: out_dtype or source.dtypes[n] for n in names}
    shapes = {n: tuple(source.shapes[n]) for n in names}
    sizes = [(n, math.prod(shapes[n]) * dtypes[n].itemsize) for n in names]
    shards = plan_shards(sizes, max_shard_size)
    files = shard_file_names(len(shards))
    diff = source if isinstance(source, DifferenceSource) else None
    book = StatsBook({n: TensorStats() for n in names})
    total_bytes = sum(s for _, s in sizes)

    def produce(job: tuple[str, int, int]) -> tuple[torch.Tensor, torch.Tensor, float]:
        name, start, stop = job
        st = book.tensors[name]
        if diff is not None:
            a, b = diff.parts(name, start, stop)
            af = a.float()
            d = af - b.float()
        else:
            d = source.chunk(name, start, stop)
        st.update(d)
        if st.nonfinite and not allow_nonfinite:
            raise InputError(
                f"the delta of {name} has {st.nonfinite} NaN/Inf values (the sources hold "
                "non-finite weights); pass --allow-nonfinite to keep them"
            )
        stored = d.to(dtypes[name])
        err = 0.0
        if diff is not None:
            r = b.float().add_(stored.float() if stored.dtype != torch.float32 else stored).sub_(af)
            r = r[torch.isfinite(r)] if st.nonfinite else r
            err = float(torch.dot(r, r))
        return d, stored, err

    with atomic_dir(out, overwrite=overwrite) as tmp:
        file_info: dict[str, dict[str, Any]] = {}
        weight_map: dict[str, str] = {}
        progress = bar(total_bytes, "writing vector")
        bg = BackgroundWriter()
        writers = []
        try:
            for fname, shard in zip(files, shards, strict=True):
                specs = [(n, dtypes[n], shapes[n]) for n in shard]
                writer = SafetensorsWriter(tmp / fname, specs, {"format": "pt"})
                writers.append(writer)
                jobs = [
                    (n, s, e)
                    for n in shard
                    for s, e in iter_chunks(math.prod(shapes[n]), CHUNK_ELEMS)
                ]
                for (name, _, _), (_, stored, err) in Pipeline().map_ordered(jobs, produce):
                    book.tensors[name].err_sumsq += err
                    bg.put(writer, stored)
                    progress.update(stored.numel() * stored.element_size())
                for n in shard:
                    weight_map[n] = fname
            bg.finish()
            for fname, writer in zip(files, writers, strict=True):
                sha, size = writer.close()
                file_info[fname] = {"sha256": sha, "size": size}
        except BaseException:
            bg.q.put(None)
            for w in writers:
                w.abort()
            raise
        finally:
            progress.close()
        if len(files) > 1:
            index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
            (tmp / VECTOR_INDEX).write_text(json.dumps(index, indent=2) + "\n")
            from .safetensors_io import sha256_file

            file_info[VECTOR_INDEX] = {
                "sha256": sha256_file(tmp / VECTOR_INDEX),
                "size": (tmp / VECTOR_INDEX).stat().st_size,
            }
        meta = dict(vec.meta)
        excluded = list(meta.get("excluded", [])) + newly_excluded
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "encoding": "dense",
            "rvhub_version": __version__,
            "created_at": now_iso(),
            "sources": meta.get("sources", {}),
            "model": meta.get("model", {}),
            "dtype": sorted({str(d).removeprefix("torch.") for d in dtypes.values()}),
            "math_dtype": "float32",
            "excluded": excluded,
            "exclude_patterns": list(meta.get("exclude_patterns", [])) + exclude,
            "skipped_non_float": meta.get("skipped_non_float", []),
            "files": file_info,
            "tensors": {n: book.tensors[n].as_json(shapes[n], dtypes[n]) for n in names},
            "stats": book.summary(diff is not None),
        }
        if "combination" in meta:
            manifest["combination"] = meta["combination"]
        if extra_meta:
            manifest.update(extra_meta)
        write_manifest(tmp, manifest)
    return out.absolute()
