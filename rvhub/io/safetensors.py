"""Reading and writing safetensors files tensor by tensor, and chunk by chunk.

``safetensors.safe_open`` maps the whole file, which makes every byte read count towards the
process's resident memory; rvhub streams multi-GB checkpoints, so it reads byte ranges with
``os.preadv`` into reusable buffers instead. The header is parsed here with strict checks (a
header that lies about sizes or offsets, duplicate names or a huge declared shape is refused
before any data is touched). The writer lays files out as the format specifies (8-byte length,
JSON header padded to 8 bytes, data in the caller's order), so ``safetensors.safe_open`` reads
them; unlike ``save_file`` it keeps the caller's tensor order instead of sorting by dtype.
"""

from __future__ import annotations

import itertools
import json
import os
import struct
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputError
from . import sink as _sink
from .hashing import new_hasher

if TYPE_CHECKING:
    import torch

# safetensors dtype strings: their sizes, and (built on first use, so reading headers needs no
# torch) the torch dtypes they map to: DTYPES and DTYPE_NAMES, see __getattr__ below.
DTYPE_SIZES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U8": 1, "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
_TORCH_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
    "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "U16": "uint16",
    "U32": "uint32", "U64": "uint64", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}  # fmt: skip
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
_TORCH_CODES = {v: k for k, v in _TORCH_NAMES.items()}


def _dtypes() -> dict[str, torch.dtype]:
    table = globals().get("_DTYPES")
    if table is None:
        import torch

        table = globals()["_DTYPES"] = {k: getattr(torch, v) for k, v in _TORCH_NAMES.items()}
    return table


def __getattr__(name: str) -> Any:
    """``DTYPES`` (safetensors name -> torch dtype) and ``DTYPE_NAMES`` (the inverse)."""
    if name == "DTYPES":
        return _dtypes()
    if name == "DTYPE_NAMES":
        return {v: k for k, v in _dtypes().items()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the spelling the manifest's ``dtype`` list uses)."""
    return str(dtype).removeprefix("torch.")


MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit safetensors itself enforces


def parse_dtype(name: str) -> torch.dtype:
    """Accept ``bf16``/``bfloat16``/``BF16``/``float32``/... and return the torch dtype."""
    aliases = {
        "bf16": "BF16",
        "bfloat16": "BF16",
        "fp16": "F16",
        "f16": "F16",
        "float16": "F16",
        "half": "F16",
        "fp32": "F32",
        "f32": "F32",
        "float32": "F32",
        "float": "F32",
        "fp64": "F64",
        "float64": "F64",
    }
    key = aliases.get(name.lower(), name.upper())
    if key not in FLOAT_DTYPES:
        raise InputError(f"unknown dtype {name!r}: use one of bfloat16, float16, float32")
    return _dtypes()[key]


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: file, dtype, shape and absolute byte range."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: Path
    start: int  # absolute offset in the file
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def torch_dtype(self) -> torch.dtype:
        return _dtypes()[self.dtype]


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate tensor name {key!r}")
        out[key] = value
    return out


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Parse and validate a safetensors header; returns (entries by name, metadata)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise ValueError("file is shorter than a safetensors header")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise ValueError(f"header length {header_len} does not fit in a {size}-byte file")
            raw = f.read(header_len)
            header = json.loads(raw)
            # json keeps the last of duplicate keys silently; count entries to catch them, and
            # re-parse strictly (naming the duplicate) only when the counts disagree.
            if isinstance(header, dict) and raw.count(b'"data_offsets"') != len(header) - (
                "__metadata__" in header
            ):
                header = json.loads(raw, object_pairs_hook=_no_duplicates)
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(
            f"{path} is not a valid safetensors file ({e}); re-download or re-save it"
        ) from None
    if not isinstance(header, dict):
        raise InputError(f"{path} is not a valid safetensors file (header is not an object)")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    data_len = size - data_start
    entries: dict[str, TensorEntry] = {}
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        try:
            dtype = info["dtype"]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{path}: malformed header entry for {name!r}") from None
        if dtype not in DTYPE_SIZES:
            raise InputError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        if any(d < 0 for d in shape):
            raise InputError(f"{path}: tensor {name!r} has a negative dimension {shape}")
        numel = 1
        for d in shape:
            numel *= d
        expected = numel * DTYPE_SIZES[dtype]
        if not (0 <= begin <= end <= data_len) or end - begin != expected:
            raise InputError(
                f"{path}: header lies about tensor {name!r} (shape {list(shape)} {dtype} needs "
                f"{expected} bytes, offsets [{begin}, {end}] in {data_len} data bytes); "
                "the file is truncated or corrupt: re-download or re-save it"
            )
        spans.append((begin, end, name))
        entries[name] = TensorEntry(name, dtype, shape, path, data_start + begin, data_start + end)
    spans.sort()
    for (_, prev_end, prev), (begin, _, name) in itertools.pairwise(spans):
        if begin < prev_end:
            raise InputError(f"{path}: tensors {prev!r} and {name!r} overlap in the file")
    if not isinstance(metadata, dict):
        raise InputError(f"{path}: __metadata__ must be a string map")
    return entries, {str(k): str(v) for k, v in metadata.items()}


def read_bytes_into(
    entry: TensorEntry, buf: torch.Tensor, offset: int = 0, fd: int | None = None
) -> None:
    """Fill the uint8 tensor ``buf`` with ``len(buf)`` bytes of ``entry`` starting at ``offset``."""
    view = memoryview(buf.numpy())  # type: ignore[arg-type]
    pos = entry.start + offset
    own = fd is None
    if fd is None:
        fd = os.open(entry.path, os.O_RDONLY)
    try:
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], pos + done)
            if n <= 0:
                raise InputError(
                    f"{entry.path} ended early while reading {entry.name!r}: truncated file"
                )
            done += n
    finally:
        if own:
            os.close(fd)


def read_tensor(entry: TensorEntry, fd: int | None = None) -> torch.Tensor:
    """Read one whole tensor into fresh CPU memory (no mmap)."""
    import torch

    buf = torch.empty(entry.nbytes, dtype=torch.uint8)
    if entry.nbytes:
        read_bytes_into(entry, buf, 0, fd)
    return buf.view(entry.torch_dtype).reshape(entry.shape)


class FileHandles:
    """Open file descriptors by path, shared by all reads of one source (from any thread:
    reads are positional)."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            with self._lock:
                fd = self._fds.get(path)
                if fd is None:
                    fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return fd

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __del__(self, _close: Callable[[int], None] = os.close) -> None:
        # At interpreter exit module globals (os, contextlib) may already be None: this uses
        # none of them, only what it was bound to when the class was made.
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            try:  # noqa: SIM105 (contextlib may be gone at interpreter exit)
                _close(fd)
            except OSError:
                pass


def read_range(
    entry: TensorEntry,
    start: int,
    stop: int,
    handles: FileHandles,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Flat elements ``[start, stop)`` of a stored tensor, in its own dtype (into ``out``, a
    flat tensor of that dtype and length, when given)."""
    import torch

    dtype = entry.torch_dtype
    if out is None:
        out = torch.empty(stop - start, dtype=dtype)
    if stop > start:
        read_bytes_into(
            entry, out.view(torch.uint8), start * dtype.itemsize, handles.fd(entry.path)
        )
    return out


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a contiguous CPU tensor, without a copy."""
    import torch

    t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]


def build_header(
    specs: Sequence[tuple[str, torch.dtype | str, Sequence[int]]],
    metadata: dict[str, str] | None = None,
) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """Header bytes (length prefix included) and each tensor's data range, in ``specs`` order.

    Laid out like ``safetensors.torch.save_file``: tensors sorted by (dtype alignment desc,
    name) is what safetensors does; rvhub keeps the caller's order, which the format allows.
    """
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    ranges: dict[str, tuple[int, int]] = {}
    pos = 0
    for name, dtype, shape in specs:
        dname = dtype if isinstance(dtype, str) else _TORCH_CODES[str(dtype).removeprefix("torch.")]
        numel = 1
        for d in shape:
            numel *= int(d)
        n = numel * DTYPE_SIZES[dname]
        header[name] = {
            "dtype": dname,
            "shape": [int(d) for d in shape],
            "data_offsets": [pos, pos + n],
        }
        ranges[name] = (pos, pos + n)
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, ranges


class SafetensorsWriter:
    """Write a safetensors file sequentially: header first, then each tensor's bytes in order.

    The file is hashed (BLAKE3, on up to ``hash_threads`` threads) as it is written, written
    through a :mod:`rvhub.io.sink` (``O_DIRECT`` for large files where the file system takes
    it) and fsynced on :meth:`close`.
    """

    def __init__(
        self,
        path: Path,
        specs: Sequence[tuple[str, torch.dtype | str, Sequence[int]]],
        metadata: dict[str, str] | None = None,
        *,
        hash_contents: bool = True,
        hash_threads: int = 1,
    ) -> None:
        self.path = path
        header, self.ranges = build_header(specs, metadata)
        self._order = [s[0] for s in specs]
        self._data_start = len(header)
        self._expected = self._data_start + (self.ranges[self._order[-1]][1] if specs else 0)
        self._sink: _sink.Sink = _sink.open_sink(path, self._expected)
        self._hash = new_hasher(threads=hash_threads) if hash_contents else None
        self._written = 0
        self._write(memoryview(header))

    def _write(self, data: memoryview) -> None:
        self._sink.write(data)
        if self._hash is not None:
            self._hash.update(data)
        self._written += len(data)

    def write(self, data: memoryview | bytes) -> None:
        """Append raw bytes; callers write tensors in ``specs`` order."""
        self._write(memoryview(data))

    def write_tensor(self, t: torch.Tensor) -> None:
        self._write(tensor_bytes(t))

    def close(self) -> tuple[str, int]:
        """Flush, fsync and close; returns (BLAKE3 hex, or "" when not hashing, size)."""
        if self._written != self._expected:
            self._sink.abort()
            raise RuntimeError(
                f"wrote {self._written} bytes to {self.path}, expected {self._expected}"
            )
        self._sink.close()
        return (self._hash.hexdigest() if self._hash is not None else ""), self._written

    def abort(self) -> None:
        self._sink.abort()


FileStamp = tuple[int, int, int, int, int]


def file_stamp(path: Path) -> FileStamp:
    """A file's identity: (device, inode, size, mtime, ctime). Any write to the file, or a
    ``touch`` to hide one, changes its ctime, which user code cannot set."""
    st = path.stat()
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def iter_chunks(numel: int, chunk: int) -> Iterable[tuple[int, int]]:
    start = 0
    while start < numel:
        stop = min(numel, start + chunk)
        yield start, stop
        start = stop
