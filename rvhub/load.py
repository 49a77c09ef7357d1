"""``load_vector``: open an artifact (folder or Hub id), verify it, return a ReasoningVector."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .checkpoint import PICKLE_SUFFIXES, looks_like_hub_id, split_revision
from .errors import InputError, IntegrityError
from .extract import FileHandles, read_range
from .manifest import artifact_file, load_manifest, verify_files
from .safetensors_io import TensorEntry, read_header, read_tensor, sha256_file
from .vector import ReasoningVector, VectorSource


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

    def raw_chunk(
        self, name: str, start: int, stop: int, take: Callable[..., torch.Tensor] | None = None
    ) -> torch.Tensor:
        entry = self.entries[name]
        return read_range(
            entry, start, stop, self._handles, take and take(stop - start, entry.torch_dtype)
        )

    def get(self, name: str, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        t = read_tensor(self.entries[name], self._handles.fd(self.entries[name].path))
        return t if dtype is None or t.dtype == dtype else t.to(dtype)


def _cache_dir() -> Path:
    base = os.environ.get("RVHUB_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "rvhub"
    )
    return Path(base)


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


_verified_here: dict[str, tuple[list[int], str]] = {}  # this process's checks, by path


def verify_artifact(folder: Path, manifest: dict[str, Any], *, full: bool = False) -> list[str]:
    """Check every listed file's size and sha256.

    A file whose (device, inode, size, mtime, ctime) match a previous successful check is not
    hashed again unless ``full``: any write to it, or a ``touch`` to hide one, changes its
    ctime, which user code cannot set. Checks are remembered in ``$RVHUB_CACHE/verified.json``
    (entries for files that no longer exist are dropped on each write).
    """
    verify_files(folder, manifest, quick=True)  # sizes and presence first: cheap, clear errors
    todo = []
    for name, info in manifest["files"].items():
        path = artifact_file(folder, name)
        key = str(path.resolve())
        stamp = _stamp(path)
        if not full and _verified_here.get(key) == (stamp, info["sha256"]):
            continue
        todo.append((name, info["sha256"], path, key, stamp))
    if not todo:
        return list(manifest["files"])
    cache = _load_cache()
    changed = False
    for name, sha, path, key, stamp in todo:
        hit = cache.get(key)
        if not (
            not full
            and isinstance(hit, dict)
            and hit.get("stamp") == stamp
            and hit.get("sha256") == sha
        ):
            if sha256_file(path) != sha:
                raise IntegrityError(
                    f"{name} does not match its sha256 in rvhub.json: the file was tampered "
                    "with or corrupted; re-download the vector"
                )
            cache[key] = {"stamp": stamp, "sha256": sha}
            changed = True
        _verified_here[key] = (stamp, sha)
    if changed:
        _save_cache(cache)
    return list(manifest["files"])


def _load_cache() -> dict[str, Any]:
    with contextlib.suppress(OSError, ValueError):
        loaded = json.loads((_cache_dir() / "verified.json").read_text())
        return loaded if isinstance(loaded, dict) else {}
    return {}


def _save_cache(cache: dict[str, Any]) -> None:
    cache_path = _cache_dir() / "verified.json"
    cache = {k: v for k, v in cache.items() if os.path.exists(k)}
    with contextlib.suppress(OSError):
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(cache, f)
        os.replace(tmp, cache_path)


def stamp_files(folder: Path, files: dict[str, dict[str, Any]]) -> dict[str, list[int]]:
    """The identity stamps of an artifact's files, taken right after writing them."""
    return {name: _stamp(folder / name) for name in files}


def remember_written(
    folder: Path, files: dict[str, dict[str, Any]], stamps: dict[str, list[int]]
) -> None:
    """Record files this process has just written as verified, so the next load skips
    re-hashing them (~1.5 s per 3 GB).

    Their sha256 was computed from the very bytes written, and ``stamps`` were taken in the
    temp folder before the rename (renaming a folder keeps its files' inode and ctime), so any
    later change to a file still misses the cache, exactly as for :func:`verify_artifact`.
    """
    cache = _load_cache()
    for name, info in files.items():
        key = str((folder / name).resolve())
        cache[key] = {"stamp": stamps[name], "sha256": info["sha256"]}
        _verified_here[key] = (stamps[name], info["sha256"])
    _save_cache(cache)


def resolve_artifact(
    source: str | os.PathLike[str], *, revision: str | None = None
) -> tuple[Path, dict[str, Any]]:
    """A local folder for ``source`` (downloading a Hub id) and where it came from."""
    text = str(source)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise InputError(f"{path} is a file; a vector is a folder holding rvhub.json")
        return path, {"kind": "local", "path": str(path.resolve())}
    repo_id, rev = split_revision(text)
    if looks_like_hub_id(repo_id):
        from .hub import download_vector

        return download_vector(repo_id, revision=revision or rev)
    raise InputError(f"{text}: no such folder, and not a Hub id (user/name)")


def load_vector(
    source: str | os.PathLike[str],
    *,
    revision: str | None = None,
    verify: bool = True,
) -> ReasoningVector:
    """Open a reasoning vector from a folder or a Hub repo (``user/name[@revision]``).

    Every file is checked against the sha256 in ``rvhub.json`` before use (``verify=False``
    skips the hashes, never the path checks). Works for every encoding.

    Example:
        >>> v = load_vector("user/qwen2.5-1.5b-reasoning-vector")
        >>> v.apply_to(model, scale=1.0)
    """
    folder, origin = resolve_artifact(source, revision=revision)
    manifest = load_manifest(folder)
    for entry in folder.iterdir():
        if entry.suffix in PICKLE_SUFFIXES:
            raise IntegrityError(
                f"{folder} contains a pickle file ({entry.name}); rvhub never loads pickles, "
                "and refuses artifacts that ship them"
            )
    if verify:
        verify_artifact(folder, manifest)
    else:
        verify_files(folder, manifest, quick=True)
    encoding = manifest["encoding"]
    src: VectorSource
    if encoding == "dense":
        src = dense_source(folder, manifest)
    else:
        from .encodings.readers import open_encoded

        src = open_encoded(folder, manifest)
    meta = {k: manifest.get(k) for k in ("sources", "model", "excluded", "stats", "encoding")}
    meta["manifest"] = manifest
    meta["origin"] = origin
    return ReasoningVector(src, meta, path=folder)


def dense_entries(folder: Path, manifest: dict[str, Any]) -> dict[str, TensorEntry]:
    """Every tensor in the artifact's listed ``*.safetensors`` files, checked against the manifest."""
    entries: dict[str, TensorEntry] = {}
    for name in manifest["files"]:
        if not name.endswith(".safetensors") or name.startswith("adapter_model"):
            continue
        found, _ = read_header(artifact_file(folder, name))
        for tname, entry in found.items():
            if tname in entries:
                raise IntegrityError(f"tensor {tname!r} appears in two files of {folder}")
            entries[tname] = entry
    return entries


def dense_source(folder: Path, manifest: dict[str, Any]) -> DenseSource:
    entries = dense_entries(folder, manifest)
    declared = manifest["tensors"]
    for name, entry in entries.items():
        info = declared.get(name)
        if info is None:
            raise IntegrityError(f"{folder}: tensor {name!r} is not declared in rvhub.json")
        if list(entry.shape) != info["shape"]:
            raise IntegrityError(
                f"{folder}: tensor {name!r} has shape {list(entry.shape)}, rvhub.json says {info['shape']}"
            )
    missing = [n for n in declared if n not in entries]
    if missing:
        raise IntegrityError(f"{folder}: rvhub.json declares {missing[0]!r}, which no file holds")
    return DenseSource(entries)
