"""The hashes rvhub computes, and which one protects what (docs/reliability.md).

- **File digests** of an artifact (manifest format 2): BLAKE3, written as the bytes stream to
  disk and checked with every core at memory speed (``update_mmap`` with BLAKE3's own thread
  pool). Format-1 artifacts carry sha256 and are still read and checked.
- **Source fingerprints** (a local checkpoint's identity in the manifest): xxh3-128 of each
  slab, combined per tensor, so slabs can be hashed by whichever thread read them.

Neither protects against a hostile uploader who rewrites the manifest with the files; a pinned
revision (commit sha) does that.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Protocol

FILE_HASH = "blake3"  # what new manifests record per file
FILE_HASHES = ("blake3", "sha256")  # what rvhub can check (format 2, format 1)


class Hasher(Protocol):
    def update(self, data: Any, /) -> object: ...

    def hexdigest(self) -> str: ...


def new_hasher(algorithm: str = FILE_HASH, *, threads: int = 1) -> Hasher:
    """An incremental hasher; BLAKE3 hashes large updates on up to ``threads`` threads."""
    if algorithm == "blake3":
        import blake3

        return blake3.blake3(max_threads=max(1, threads))
    if algorithm == "sha256":
        return hashlib.sha256()
    raise ValueError(f"unknown file hash {algorithm!r}")


def hash_file(path: Path, algorithm: str = FILE_HASH, *, threads: int | None = None) -> str:
    """The hex digest of a whole file. BLAKE3 maps the file and hashes it on ``threads``
    threads (default: every core this process may use); sha256 reads it in 16 MB blocks."""
    if algorithm == "blake3":
        import blake3

        from .cores import resolve_threads

        h = blake3.blake3(max_threads=resolve_threads(threads))
        if path.stat().st_size:
            h.update_mmap(path)
        return h.hexdigest()
    h256 = hashlib.sha256()
    with open(path, "rb") as f:
        buf = bytearray(16 << 20)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h256.update(view[:n])
    return h256.hexdigest()


def piece_digest(data: Any) -> bytes:
    """xxh3-128 of one slab of a source tensor (bytes-like), for its content fingerprint."""
    import xxhash

    return xxhash.xxh3_128_digest(data)


def combine_pieces(pieces: list[bytes]) -> str:
    """One tensor's fingerprint from its slabs' digests, in order."""
    import xxhash

    return xxhash.xxh3_128_hexdigest(b"".join(pieces))
