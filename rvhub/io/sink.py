"""Where a written file's bytes go: straight to the disk (``O_DIRECT``) or through the page cache.

Writing gigabytes through the page cache costs the kernel a page allocation, a copy and dirty
accounting per 4 KB, and then the disk must still be waited for (rvhub fsyncs every file it
writes). On this project's VMs that path ran at 0.2–1.2 GB/s of *CPU* time (``dd ... bs=16M
conv=fsync`` of a 3.09 GB file: 7.9–16.8 s, 6.8–15.5 s of it system time), while
``oflag=direct`` wrote the same file in 2.1 s with 0.5 s of CPU. So large files are written
with ``O_DIRECT`` from two page-aligned staging buffers: the caller's thread copies and
hashes into one while a helper thread writes the other to the disk. The last block is padded
to the alignment and the file then truncated to its size.

Where ``O_DIRECT`` is missing (macOS, Windows) or refused (the first aligned write is a
probe; some FUSE file systems refuse it, while tmpfs on this project's Linux 6.18 takes it),
or turned off (``RVHUB_BUFFERED_WRITES=1``), and for files under :data:`DIRECT_MIN_BYTES`,
writes go through the page cache with early writeback (``sync_file_range``), as before.
The bytes are the same either way (tests/test_sink.py).
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from pathlib import Path
from typing import IO, Any, Protocol

from ..constants import ENV_BUFFERED_WRITES

ALIGN = 4096  # O_DIRECT offset, length and address alignment: covers 512 B and 4 KB sectors
STAGE_BYTES = 8 << 20  # each of the two staging buffers
DIRECT_MIN_BYTES = STAGE_BYTES  # smaller files are written through the page cache
WRITEBACK_BYTES = 64 << 20  # buffered: start the disk on each 64 MB as soon as it is written


def _libc_sync_file_range() -> Any:
    """``sync_file_range(2)`` where the C library has it (Linux), else None."""
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _libc_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


class Sink(Protocol):
    """A file being written sequentially."""

    mode: str  # "direct" or "buffered"

    def write(self, data: memoryview) -> None: ...

    def close(self) -> None:
        """Write what is left, fsync and close."""

    def abort(self) -> None:
        """Close without finishing (the caller removes the file)."""


class BufferedSink:
    """Writes through the page cache, starting the disk on each :data:`WRITEBACK_BYTES`."""

    mode = "buffered"

    def __init__(self, path: Path) -> None:
        self._file: IO[bytes] = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._written = 0
        self._kicked = 0

    def write(self, data: memoryview) -> None:
        self._file.write(data)
        self._written += len(data)
        if self._written - self._kicked >= WRITEBACK_BYTES and _sync_file_range is not None:
            # Start writing back what is written so far, without waiting: the disk works
            # while we compute, and the fsync in close() finds little left to do.
            self._file.flush()
            _sync_file_range(self._file.fileno(), self._kicked, 0, _SYNC_FILE_RANGE_WRITE)
            self._kicked = self._written

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def abort(self) -> None:
        self._file.close()


class DirectSink:
    """Writes with ``O_DIRECT`` from two aligned staging buffers, one on the disk while the
    caller fills the other."""

    mode = "direct"

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._bufs = [mmap.mmap(-1, STAGE_BYTES) for _ in range(2)]  # page-aligned
        self._views = [memoryview(b) for b in self._bufs]
        self._cur = 0  # the buffer being filled
        self._fill = 0
        self._offset = 0  # file offset of the buffer being filled
        self._io: threading.Thread | None = None
        self._error: BaseException | None = None

    def write(self, data: memoryview) -> None:
        data = data.cast("B") if data.format != "B" or data.ndim != 1 else data
        i, n = 0, len(data)
        while i < n:
            k = min(STAGE_BYTES - self._fill, n - i)
            self._views[self._cur][self._fill : self._fill + k] = data[i : i + k]
            self._fill += k
            i += k
            if self._fill == STAGE_BYTES:
                self._submit(STAGE_BYTES)

    def _submit(self, nbytes: int) -> None:
        """Hand the filled buffer's first ``nbytes`` (aligned) to the I/O thread and switch."""
        self._wait()
        view, offset = self._views[self._cur][:nbytes], self._offset
        self._io = threading.Thread(target=self._pwrite, args=(view, offset), daemon=True)
        self._io.start()
        self._offset += nbytes
        self._cur ^= 1
        self._fill = 0

    def _pwrite(self, view: memoryview, offset: int) -> None:
        try:
            done = 0
            while done < len(view):
                done += os.pwrite(self._fd, view[done:], offset + done)
        except BaseException as e:
            self._error = e

    def _wait(self) -> None:
        if self._io is not None and self._io.ident is not None:  # started (see abort)
            self._io.join()
        self._io = None
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        size = self._offset + self._fill
        tail = -self._fill % ALIGN
        try:
            self._views[self._cur][self._fill : self._fill + tail] = bytes(tail)
            if self._fill:
                self._submit(self._fill + tail)
            self._wait()
            os.ftruncate(self._fd, size)  # drop the last block's padding
            os.fsync(self._fd)
        finally:
            self.abort()

    def abort(self) -> None:
        try:
            # a SIGTERM raised between creating the I/O thread and starting it leaves one
            # that was never started: joining it would raise instead of the Terminated
            if self._io is not None and self._io.ident is not None:
                self._io.join()
            self._io = None
        finally:
            self._release()

    def _release(self) -> None:
        if self._fd < 0:
            return
        os.close(self._fd)
        self._fd = -1
        # Drop the staging buffers rather than close them: a slice of one may still be alive
        # (an I/O thread's argument, a frame in an exception's traceback), and an mmap with
        # exports cannot be closed. Each is unmapped when its last reference goes.
        self._views, self._bufs = [], []


def direct_writes_allowed() -> bool:
    return hasattr(os, "O_DIRECT") and os.environ.get(ENV_BUFFERED_WRITES, "") in ("", "0")


def open_sink(path: Path, size: int) -> Sink:
    """A sink for a new file of ``size`` bytes: direct where allowed and the file system
    accepts it (probed with one aligned block), else buffered."""
    if size < DIRECT_MIN_BYTES or not direct_writes_allowed():
        return BufferedSink(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        return BufferedSink(path)
    probe = mmap.mmap(-1, ALIGN)
    try:
        os.pwrite(fd, probe, 0)
    except OSError as e:
        os.close(fd)
        if e.errno != errno.EINVAL:
            raise
        return BufferedSink(path)
    finally:
        probe.close()
    return DirectSink(fd)
