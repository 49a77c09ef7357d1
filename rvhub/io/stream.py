"""The slab pipeline: recycled buffers, compute threads, a writer thread, and streams of blobs
into files.

Each slab is a task (read, compute, return the bytes to write); tasks run on ``threads``
compute threads (:func:`ordered`), their results come back in order, and one background
thread writes and hashes them, so reads, compute, I/O and hashing overlap. Element-wise work
gives the same bytes on any number of threads; statistics are summed per slab and merged in
slab order by the callers, so they do too.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from ..constants import QUEUE_SLABS, VECTOR_STEM
from .progress import bar
from .safetensors import SafetensorsWriter


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


def pool_limit(threads: int) -> int:
    """Pooled buffers per element size for ``threads`` compute threads: the slabs in flight
    (two tasks ahead per thread, each holding its output and its two inputs) plus the
    writer's queue."""
    return QUEUE_SLABS + 2 + 6 * threads


def shard_file_names(count: int, stem: str = VECTOR_STEM) -> list[str]:
    if count == 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


T = TypeVar("T")


def _one_torch_thread() -> None:
    torch.set_num_threads(1)


def ordered(tasks: Iterable[Callable[[], T]], threads: int) -> Generator[T, None, None]:
    """The results of ``tasks``, in order, computed on ``threads`` threads (in the calling
    thread when 1). At most ``2 × threads`` tasks run or wait ahead of the consumer, so
    memory stays at a few slabs per thread. Each thread runs torch on one intra-op thread: the
    parallelism is across slabs. An error is raised at its task's turn; stopping early (or
    an error) cancels what has not started and waits for what has.
    """
    if threads <= 1:
        for task in tasks:
            yield task()
        return
    window: deque[Future[T]] = deque()
    pool = ThreadPoolExecutor(threads, "rvhub-slab", initializer=_one_torch_thread)
    try:
        for task in tasks:
            window.append(pool.submit(task))
            if len(window) >= 2 * threads:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()
    finally:
        for future in window:
            future.cancel()
        pool.shutdown(wait=True)


class SlabPool:
    """Recycled slab buffers, so the steady state of a stream allocates nothing (a fresh
    ``torch.empty`` per slab is a fresh ``mmap``, faulted in page by page: docs/design.md).

    Buffers are taken by
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


Blob = Callable[[], torch.Tensor]  # one slab's task: computes the bytes to write


def write_streams(
    streams: Iterable[tuple[Callable[[], SafetensorsWriter], Iterable[Blob]]],
    *,
    total_bytes: int,
    desc: str,
    pool: SlabPool | None = None,
    threads: int = 1,
) -> list[tuple[str, int]]:
    """Write each stream's blobs to its file from a background thread; fsync and close them all.

    ``streams`` pairs a function that opens a :class:`SafetensorsWriter` with the tasks that
    compute its blobs, in file order. Tasks run on ``threads`` threads (:func:`ordered`,
    across file boundaries) while the writer thread writes and hashes earlier blobs.
    Buffers of each blob that came from ``pool`` go back to it once written and hashed.
    Returns ``(digest, size)`` per file; on any error every file is closed unfinished and the
    error re-raised (callers write inside :func:`rvhub.io.atomic.atomic_dir`).
    """
    progress = bar(total_bytes, desc)
    bg = BackgroundWriter(pool)
    openers: list[Callable[[], SafetensorsWriter]] = []
    writers: list[SafetensorsWriter] = []

    def tagged() -> Iterator[tuple[int, Blob]]:
        for open_writer, blobs in streams:
            openers.append(open_writer)
            index = len(openers) - 1
            for blob in blobs:
                yield index, blob

    def run(index: int, blob: Blob) -> Callable[[], tuple[int, torch.Tensor]]:
        return lambda: (index, blob())

    try:
        results = ordered((run(i, b) for i, b in tagged()), threads)
        try:
            for index, blob in results:
                while len(writers) <= index:  # files open in order, empty ones too
                    writers.append(openers[len(writers)]())
                bg.put(writers[index], blob)
                progress.update(blob.numel() * blob.element_size())
        finally:
            results.close()
        while len(writers) < len(openers):
            writers.append(openers[len(writers)]())
        bg.finish()
        return [w.close() for w in writers]
    except BaseException:
        bg.q.put(None)
        for w in writers:
            w.abort()
        raise
    finally:
        progress.close()
