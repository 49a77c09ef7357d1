"""The artifact manifest, ``rvhub.json``: schema, validation, assembly and the integrity cache.

The manifest is data from a possibly hostile source. :func:`load_manifest` checks its shape
and :func:`artifact_file` refuses any file name that would leave the artifact folder
(``..``, absolute paths, symlinks pointing outside). Every encoding's writer builds its
manifest through :func:`build_manifest`, so provenance fields are the same for all of them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .architecture import layer_of
from .constants import (
    ENV_CACHE,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    SLAB_ELEMS,
)
from .errors import IntegrityError
from .io.atomic import atomic_write
from .io.hashing import FILE_HASH, combine_pieces, hash_file, piece_digest
from .io.safetensors import FileStamp, file_stamp

if TYPE_CHECKING:
    from .io.kernels import Moments

ENCODING_NAMES = ("dense", "lora", "sparse")


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def artifact_file(folder: Path, name: object) -> Path:
    """The path of artifact file ``name`` inside ``folder``; refuses anything that escapes it."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise IntegrityError(f"manifest names an invalid file {name!r}")
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts or name.startswith(("/", "\\")) or "\\" in name:
        raise IntegrityError(
            f"manifest names {name!r}, which lies outside the artifact; refusing it"
        )
    root = folder.resolve()
    candidate = root / rel
    resolved = candidate.resolve()
    if not inside_folder(root, resolved):
        raise IntegrityError(
            f"artifact file {name!r} resolves outside the artifact (a symlink?); refusing it"
        )
    return candidate


def inside_folder(root: Path, resolved: Path) -> bool:
    """Whether ``resolved`` (a resolved path) lies in the resolved folder ``root``.

    A huggingface_hub cache snapshot (``.../snapshots/<sha>/``) holds symlinks into its repo's
    ``blobs/`` folder, which huggingface_hub created itself (repos cannot ship symlinks), so
    a target there counts as inside the snapshot.
    """
    if root == resolved or root in resolved.parents:
        return True
    return root.parent.name == "snapshots" and resolved.parent == root.parent.parent / "blobs"


def _finite_or_none(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def clean_json(obj: Any) -> Any:
    """Replace NaN/Inf floats by None so the manifest is strict JSON."""
    if isinstance(obj, dict):
        return {str(k): clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    return _finite_or_none(obj)


def write_manifest(folder: Path, manifest: dict[str, Any]) -> Path:
    path = folder / MANIFEST_NAME
    path.write_text(json.dumps(clean_json(manifest), indent=2, allow_nan=False) + "\n")
    return path


def load_manifest(folder: Path) -> dict[str, Any]:
    """Read and validate ``rvhub.json`` in ``folder``."""
    path = artifact_file(folder, MANIFEST_NAME)
    if not path.is_file():
        raise IntegrityError(
            f"{folder} has no {MANIFEST_NAME}: it is not an rvhub vector (create one with rvhub extract)"
        )
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise IntegrityError(f"{path} is implausibly large; refusing it")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise IntegrityError(f"{path} is not valid JSON ({e})") from None
    validate_manifest(data)
    return data


def validate_manifest(data: Any) -> None:
    if not isinstance(data, dict):
        raise IntegrityError("rvhub.json must hold a JSON object")
    if data.get("format") != FORMAT:
        raise IntegrityError(f"rvhub.json has format {data.get('format')!r}, expected {FORMAT!r}")
    version = data.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise IntegrityError("rvhub.json lacks an integer format_version")
    if version > FORMAT_VERSION:
        raise IntegrityError(
            f"rvhub.json is format version {version}, newer than this rvhub reads "
            f"({FORMAT_VERSION}); upgrade rvhub (pip install -U rvhub)"
        )
    if data.get("encoding") not in ENCODING_NAMES:
        raise IntegrityError(f"rvhub.json has unknown encoding {data.get('encoding')!r}")
    files = data.get("files")
    if not isinstance(files, dict) or not files:
        raise IntegrityError("rvhub.json lists no files")
    algorithm = file_hash_of(version)
    for name, info in files.items():
        if not isinstance(info, dict) or not isinstance(info.get(algorithm), str):
            raise IntegrityError(f"rvhub.json: file entry {name!r} lacks a {algorithm}")
        if not isinstance(info.get("size"), int) or info["size"] < 0:
            raise IntegrityError(f"rvhub.json: file entry {name!r} lacks a valid size")
    tensors = data.get("tensors")
    if not isinstance(tensors, dict):
        raise IntegrityError("rvhub.json lacks its tensor table")
    for name, info in tensors.items():
        if not isinstance(info, dict):
            raise IntegrityError(f"rvhub.json: tensor entry {name!r} is not an object")
        shape = info.get("shape")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise IntegrityError(f"rvhub.json: tensor {name!r} has an invalid shape {shape!r}")


def file_hash_of(format_version: int) -> str:
    """The file hash a manifest of ``format_version`` records: sha256 in format 1, BLAKE3 since 2."""
    return "sha256" if format_version < 2 else FILE_HASH


def check_files_present(folder: Path, manifest: Manifest) -> list[str]:
    """Check that every file the manifest lists exists with its recorded size; returns names.

    Raises :class:`IntegrityError` naming the first file that fails (hashes are
    :func:`verify_artifact`'s job).
    """
    checked = []
    for name, info in manifest.files.items():
        path = artifact_file(folder, name)
        if not path.is_file():
            raise IntegrityError(
                f"{folder}: {name} is missing; re-download or re-create the vector"
            )
        size = path.stat().st_size
        if size != info.size:
            raise IntegrityError(
                f"{name} is {size} bytes, the manifest says {info.size}: the file was "
                "modified or truncated; re-download the vector"
            )
        checked.append(name)
    return checked


# -- building a manifest ------------------------------------------------------------------------


def tensor_json(m: Moments, shape: tuple[int, ...], dtype: Any) -> dict[str, Any]:
    """One tensor's manifest entry from its accumulated statistics."""
    from .io.safetensors import DTYPE_NAMES

    out: dict[str, Any] = {
        "shape": list(shape),
        "dtype": DTYPE_NAMES[dtype],
        "norm": math.sqrt(m.sumsq),
    }
    if m.nonfinite:
        out["nonfinite"] = m.nonfinite
    return out


def norm_summary(sumsq: Mapping[str, float]) -> dict[str, Any]:
    """Global and per-block norms from each tensor's ‖Δ‖² (blocks in numeric order)."""
    layers: dict[str, float] = {}
    for name, sq in sumsq.items():
        layers[layer_of(name)] = layers.get(layer_of(name), 0.0) + sq
    ordered = sorted(layers.items(), key=lambda kv: (0, int(kv[0])) if kv[0].isdigit() else (1, 0))
    return {
        "norm": math.sqrt(sum(sumsq.values())),
        "layer_norms": {k: math.sqrt(v) for k, v in ordered},
    }


@dataclass
class StatsBook:
    """Per-tensor statistics gathered while streaming, summarised for the manifest."""

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


class SourceFingerprint:
    """A layout-independent fingerprint of a local checkpoint's tensors.

    sha256 over the lines ``name dtype shape digest`` of every tensor the vector read, sorted
    by name, where a tensor's digest is xxh3-128 over the xxh3-128 digests of its consecutive
    ``piece``-element slabs: resharding or re-saving the same weights keeps it; changing any
    tensor changes it. Slabs may arrive from any thread in any order (:meth:`update`); only
    whole, aligned slabs count, and a tensor read otherwise has no fingerprint. It identifies
    local sources; it is not a security measure (the artifact's files carry their own hashes).
    """

    algorithm = (
        "sha256 of sorted 'name dtype shape digest' lines; digest = xxh3-128 of the xxh3-128 "
        f"digests of the tensor's {SLAB_ELEMS}-element slabs"
    )

    def __init__(self, piece: int = SLAB_ELEMS) -> None:
        self.piece = piece  # elements per slab
        self._pieces: dict[str, dict[int, bytes]] = {}  # name -> {slab index: digest}
        self._lock = threading.Lock()

    def update(self, name: str, start: int, stop: int, numel: int, data: memoryview) -> None:
        """Add ``data``, the bytes of elements ``[start, stop)`` of tensor ``name`` (``numel``
        elements in all); a read that is not one whole slab is ignored."""
        if start % self.piece or stop - start != min(self.piece, numel - start):
            return
        digest = piece_digest(data)
        with self._lock:
            self._pieces.setdefault(name, {})[start // self.piece] = digest

    def digest(self, entries: Mapping[str, Any], names: Iterable[str]) -> str | None:
        """The fingerprint over ``names``, or None unless each was read whole in slabs."""
        lines = []
        for n in sorted(names):
            count = -(-entries[n].numel // self.piece)
            got = self._pieces.get(n, {})
            if len(got) != count or any(i not in got for i in range(count)):
                return None
            tensor = combine_pieces([got[i] for i in range(count)])
            lines.append(f"{n} {entries[n].dtype} {list(entries[n].shape)} {tensor}\n")
        return hashlib.sha256("".join(lines).encode()).hexdigest()


@dataclass(frozen=True)
class BaseModel:
    """The vector's lineage root: the Hub id of the model A and B both descend from, and how
    it was found (``given`` by the user, or ``hub`` metadata walked from A and B)."""

    repo_id: str
    found: str = "given"

    @classmethod
    def from_json(cls, data: Any) -> BaseModel | None:
        if not isinstance(data, Mapping) or not isinstance(data.get("id"), str) or not data["id"]:
            return None
        return cls(data["id"], str(data.get("from") or "given"))

    def to_json(self) -> dict[str, str]:
        return {"id": self.repo_id, "from": self.found}


@dataclass(frozen=True)
class Provenance:
    """Where a vector's deltas come from, as its manifest records it: the sources (by role),
    the model identity and config, what was excluded or skipped, and for a combination of
    vectors its terms."""

    sources: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    model: Mapping[str, Any] = field(default_factory=dict)
    model_config: Mapping[str, Any] = field(default_factory=dict)
    excluded: tuple[str, ...] = ()
    exclude_patterns: tuple[str, ...] = ()
    skipped_non_float: tuple[str, ...] = ()
    combination: tuple[Mapping[str, Any], ...] | None = None
    # the lineage root: the model A and B descend from, whose descendants the vector fits
    base_model: BaseModel | None = None
    merge: Mapping[str, Any] | None = None  # a merge's method and parameters (ops/merge.py)

    @classmethod
    def of_manifest(cls, manifest: Manifest) -> Provenance:
        return cls(
            base_model=manifest.base_model,
            merge=manifest.merge,
            sources={r: s.to_json() for r, s in manifest.sources.items()},
            model=manifest.model,
            model_config=manifest.model_config,
            excluded=manifest.excluded,
            exclude_patterns=manifest.exclude_patterns,
            skipped_non_float=manifest.skipped_non_float,
            combination=manifest.combination or None,
        )

    def source(self, role: str) -> SourceRecord:
        return SourceRecord.from_json(self.sources.get(role))


def build_manifest(
    provenance: Provenance,
    encoding: str,
    *,
    excluded: list[str],
    exclude_patterns: list[str],
    fingerprints: Mapping[str, str],
    files: dict[str, dict[str, Any]],
    tensors: dict[str, Any],
    stats: dict[str, Any],
    dtypes: Iterable[str],
    compression: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The whole manifest of a new artifact, the same provenance fields for every encoding.

    ``provenance`` is the vector's (sources, model, earlier exclusions, combination);
    ``fingerprints`` the content fingerprints of local sources by role (``a``, ``b``).
    """
    sources = {
        role: {
            **info,
            "content_fingerprint": fingerprints[role],
            "fingerprint_algorithm": SourceFingerprint.algorithm,
        }
        if role in fingerprints
        else dict(info)
        for role, info in provenance.sources.items()
    }
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "encoding": encoding,
        "rvhub_version": __version__,
        "created_at": now_iso(),
        "sources": sources,
        "model": dict(provenance.model),
        **({"model_config": dict(provenance.model_config)} if provenance.model_config else {}),
        "math_dtype": "float32",
        "excluded": [*provenance.excluded, *excluded],
        "exclude_patterns": [*provenance.exclude_patterns, *exclude_patterns],
        "skipped_non_float": list(provenance.skipped_non_float),
        **(
            {"combination": list(provenance.combination)}
            if provenance.combination is not None
            else {}
        ),
        **({"base_model": provenance.base_model.to_json()} if provenance.base_model else {}),
        **({"merge": dict(provenance.merge)} if provenance.merge else {}),
        "dtype": sorted(set(dtypes)),
        "files": files,
        "tensors": tensors,
        "stats": stats,
    }
    if compression is not None:
        manifest["compression"] = compression
    return manifest


def looks_local(text: str) -> bool:
    """Whether a model name is a path (absolute, ``.``/``~``-relative, or existing here)."""
    return text.startswith(("/", ".", "~")) or Path(text).expanduser().exists()


def published(data: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest as ``rvhub push`` uploads it: no local path of the user's. A local source
    (or a combination term) keeps its folder ``name`` and content fingerprint instead of its
    ``path``; a local lineage root keeps its folder name. Digests are untouched (they cover the
    files, not the manifest)."""

    def walk(value: Any) -> Any:
        if isinstance(value, Mapping):
            out = {k: walk(v) for k, v in value.items() if k != "path"}
            if isinstance(value.get("path"), str):
                out["name"] = Path(value["path"]).name or value["path"]
            return out
        if isinstance(value, list):
            return [walk(v) for v in value]
        return value

    out = walk(data)
    root = out.get("base_model")
    if isinstance(root, dict) and isinstance(root.get("id"), str) and looks_local(root["id"]):
        root["id"] = Path(root["id"]).name
        root["from"] = "local"
    return out


def file_info(folder: Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``{name: {blake3, size}}`` of files just written into ``folder``."""
    return {
        n: {FILE_HASH: hash_file(folder / n), "size": (folder / n).stat().st_size} for n in names
    }


# -- the integrity cache ------------------------------------------------------------------------


def _cache_path() -> Path:
    base = os.environ.get(ENV_CACHE) or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "rvhub"
    )
    return Path(base) / "verified.json"


_verified_here: dict[str, tuple[list[int], str]] = {}  # this process's checks, by path


def verify_artifact(folder: Path, manifest: Manifest, *, full: bool = False) -> list[str]:
    """Check every listed file's size and digest (BLAKE3, or sha256 in a format-1 manifest).

    A file whose identity stamp (:func:`rvhub.io.safetensors.file_stamp`) matches a previous
    successful check is not hashed again unless ``full``. Checks are remembered in
    ``$RVHUB_CACHE/verified.json`` (entries for files that no longer exist are dropped on each
    write).
    """
    check_files_present(folder, manifest)  # sizes and presence first: cheap, clear errors
    todo = []
    for name, record in manifest.files.items():
        path = artifact_file(folder, name)
        key = str(path.resolve())
        stamp = list(file_stamp(path))
        algorithm, hexdigest = record.algorithm, record.digest
        want = f"{algorithm}:{hexdigest}"
        if not full and _verified_here.get(key) == (stamp, want):
            continue
        todo.append((name, algorithm, hexdigest, path, key, stamp))
    if not todo:
        return list(manifest.files)
    cache = _load_cache()
    changed = False
    for name, algorithm, hexdigest, path, key, stamp in todo:
        want = f"{algorithm}:{hexdigest}"
        hit = cache.get(key)
        if not (
            not full
            and isinstance(hit, dict)
            and hit.get("stamp") == stamp
            and hit.get("digest") == want
        ):
            if hash_file(path, algorithm) != hexdigest:
                raise IntegrityError(
                    f"{name} does not match its {algorithm} in rvhub.json: the file was "
                    "tampered with or corrupted; re-download the vector"
                )
            cache[key] = {"stamp": stamp, "digest": want}
            changed = True
        _verified_here[key] = (stamp, want)
    if changed:
        _save_cache(cache)
    return list(manifest.files)


def _load_cache() -> dict[str, Any]:
    with contextlib.suppress(OSError, ValueError):
        loaded = json.loads(_cache_path().read_text())
        return loaded if isinstance(loaded, dict) else {}
    return {}


def _save_cache(cache: dict[str, Any]) -> None:
    path = _cache_path()
    cache = {k: v for k, v in cache.items() if os.path.exists(k)}
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(cache))


def stamp_files(folder: Path, files: Iterable[str]) -> dict[str, FileStamp]:
    """The identity stamps of an artifact's files, taken right after writing them."""
    return {name: file_stamp(folder / name) for name in files}


def remember_written(
    folder: Path, files: dict[str, dict[str, Any]], stamps: Mapping[str, FileStamp]
) -> None:
    """Record files this process has just written as verified, so the next load skips
    re-hashing them.

    Their digest was computed from the very bytes written, and ``stamps`` were taken in the
    temp folder before the rename (renaming a folder keeps its files' inode and ctime), so any
    later change to a file still misses the cache, exactly as for :func:`verify_artifact`.
    """
    cache = _load_cache()
    for name, info in files.items():
        key = str((folder / name).resolve())
        want = f"{FILE_HASH}:{info[FILE_HASH]}"
        cache[key] = {"stamp": list(stamps[name]), "digest": want}
        _verified_here[key] = (list(stamps[name]), want)
    _save_cache(cache)


# -- the typed view -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceRecord:
    """One source of a vector (role ``a`` or ``b``): a Hub repo at a commit, a local folder
    with its content fingerprint, or a model in memory."""

    kind: str = "local"
    repo_id: str | None = None
    revision: str | None = None
    path: str | None = None
    content_fingerprint: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, data: Any) -> SourceRecord:
        data = data if isinstance(data, dict) else {}
        text = {k: data.get(k) for k in ("repo_id", "revision", "path", "content_fingerprint")}
        return cls(
            kind=str(data.get("kind") or "local"),
            **{k: (str(v) if v is not None else None) for k, v in text.items()},
            raw=data,
        )

    def to_json(self) -> dict[str, Any]:
        return dict(self.raw)


@dataclass(frozen=True)
class TensorRecord:
    """One tensor of the vector: its shape and storage dtype, ‖Δ‖, NaN/Inf count, and for
    compressed encodings how it is stored (``dense``, ``lora`` with its rank and error,
    ``sparse``)."""

    shape: tuple[int, ...]
    dtype: str | None = None
    norm: float = 0.0
    nonfinite: int = 0
    stored: str = "dense"
    rank: int = 0
    rel_error: float = 0.0

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TensorRecord:
        return cls(
            shape=tuple(data["shape"]),
            dtype=data.get("dtype"),
            norm=float(data.get("norm") or 0.0),
            nonfinite=int(data.get("nonfinite") or 0),
            stored=str(data.get("stored") or "dense"),
            rank=int(data.get("rank") or 0),
            rel_error=float(data.get("rel_error") or 0.0),
        )


@dataclass(frozen=True)
class FileRecord:
    """One file of the artifact: its size and digest (``algorithm``: blake3, or sha256 in
    format 1)."""

    size: int
    algorithm: str
    digest: str


@dataclass(frozen=True)
class Stats:
    """‖v‖, per-block norms and, for an extracted vector, the round-trip error ‖B + v − A‖."""

    norm: float | None = None
    layer_norms: Mapping[str, float] = field(default_factory=dict)
    roundtrip_error: Mapping[str, Any] | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, data: Any) -> Stats:
        data = data if isinstance(data, dict) else {}
        norm = data.get("norm")
        return cls(
            norm=float(norm) if isinstance(norm, (int, float)) else None,
            layer_norms=dict(data.get("layer_norms") or {}),
            roundtrip_error=data.get("roundtrip_error") or None,
            raw=data,
        )


@dataclass(frozen=True)
class Compression:
    """How a compressed artifact holds the vector: the encoding's own figures (``figures``:
    sizes, ranks, errors) and, for LoRA, the engine profile it was written for and what each
    serving engine applies of it (``engines``)."""

    encoding: str
    profile: str = "peft"
    engines: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    figures: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, data: Any) -> Compression | None:
        if not isinstance(data, dict):
            return None
        return cls(
            encoding=str(data.get("encoding") or ""),
            profile=str(data.get("profile") or "peft"),
            engines=dict(data.get("engines") or {}),
            figures=data,
        )


@dataclass(frozen=True)
class Manifest:
    """``rvhub.json``, validated and typed: what every module outside this one reads.

    Build it with :meth:`from_json` (validates, like :func:`load_manifest`) or :meth:`read`;
    :meth:`to_json` gives back the document as stored.
    """

    format_version: int
    encoding: str
    files: Mapping[str, FileRecord]
    tensors: Mapping[str, TensorRecord]
    sources: Mapping[str, SourceRecord] = field(default_factory=dict)
    model: Mapping[str, Any] = field(default_factory=dict)
    model_config: Mapping[str, Any] = field(default_factory=dict)
    dtype: tuple[str, ...] = ()
    excluded: tuple[str, ...] = ()
    exclude_patterns: tuple[str, ...] = ()
    skipped_non_float: tuple[str, ...] = ()
    stats: Stats = field(default_factory=Stats)
    compression: Compression | None = None
    lineage: Mapping[str, Any] | None = None
    combination: tuple[Mapping[str, Any], ...] = ()
    base_model: BaseModel | None = None
    merge: Mapping[str, Any] | None = None
    rvhub_version: str | None = None
    created_at: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, data: Any) -> Manifest:
        validate_manifest(data)
        algorithm = file_hash_of(data["format_version"])
        files = {
            n: FileRecord(int(f["size"]), algorithm, str(f[algorithm]))
            for n, f in data["files"].items()
        }

        def names(key: str) -> tuple[str, ...]:
            return tuple(str(x) for x in (data.get(key) or []))

        return cls(
            format_version=int(data["format_version"]),
            encoding=str(data["encoding"]),
            files=files,
            tensors={n: TensorRecord.from_json(t) for n, t in data["tensors"].items()},
            sources={r: SourceRecord.from_json(s) for r, s in (data.get("sources") or {}).items()},
            model=dict(data.get("model") or {}),
            model_config=dict(data.get("model_config") or {}),
            dtype=names("dtype"),
            excluded=names("excluded"),
            exclude_patterns=names("exclude_patterns"),
            skipped_non_float=names("skipped_non_float"),
            stats=Stats.from_json(data.get("stats")),
            compression=Compression.from_json(data.get("compression")),
            lineage=data.get("lineage") or None,
            combination=tuple(data.get("combination") or ()),
            base_model=BaseModel.from_json(data.get("base_model")),
            merge=data.get("merge") if isinstance(data.get("merge"), dict) else None,
            rvhub_version=data.get("rvhub_version"),
            created_at=data.get("created_at"),
            raw=data,
        )

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        """``folder``'s ``rvhub.json``, validated (see :func:`load_manifest`)."""
        return cls.from_json(load_manifest(folder))

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.raw))

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: t.shape for n, t in self.tensors.items()}

    @property
    def records_nonfinite(self) -> bool:
        """Whether any delta holds NaN/Inf (as recorded when the files were written)."""
        return any(t.nonfinite for t in self.tensors.values())

    @property
    def file_hash(self) -> str:
        return file_hash_of(self.format_version)

    @property
    def nbytes(self) -> int:
        return sum(f.size for f in self.files.values())

    def digest(self, name: str) -> str:
        """``algorithm:hex`` of the artifact file ``name``."""
        f = self.files[name]
        return f"{f.algorithm}:{f.digest}"

    def only(self, names: Iterable[str]) -> Manifest:
        """The same manifest listing only the files ``names`` (to verify just those)."""
        keep = set(names)
        raw = {**self.raw, "files": {n: f for n, f in self.raw["files"].items() if n in keep}}
        return Manifest.from_json(raw)
