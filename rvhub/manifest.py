"""The artifact manifest, ``rvhub.json``: schema, validation and file hashes.

The manifest is data from a possibly hostile source. :func:`load_manifest` checks its shape
and :func:`artifact_file` refuses any file name that would leave the artifact folder
(``..``, absolute paths, symlinks pointing outside).
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import IntegrityError
from .safetensors_io import sha256_file

MANIFEST_NAME = "rvhub.json"
FORMAT = "rvhub.reasoning-vector"
FORMAT_VERSION = 1
ENCODINGS = ("dense", "lora", "sparse")
MAX_MANIFEST_BYTES = 64 * 1024 * 1024


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
    if data.get("encoding") not in ENCODINGS:
        raise IntegrityError(f"rvhub.json has unknown encoding {data.get('encoding')!r}")
    files = data.get("files")
    if not isinstance(files, dict) or not files:
        raise IntegrityError("rvhub.json lists no files")
    for name, info in files.items():
        if not isinstance(info, dict) or not isinstance(info.get("sha256"), str):
            raise IntegrityError(f"rvhub.json: file entry {name!r} lacks a sha256")
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


def verify_files(folder: Path, manifest: dict[str, Any], *, quick: bool = False) -> list[str]:
    """Check every file the manifest lists (size, and sha256 unless ``quick``); returns names.

    Raises :class:`IntegrityError` naming the first file that fails.
    """
    checked = []
    for name, info in manifest["files"].items():
        path = artifact_file(folder, name)
        if not path.is_file():
            raise IntegrityError(
                f"{folder}: {name} is missing; re-download or re-create the vector"
            )
        size = path.stat().st_size
        if size != info["size"]:
            raise IntegrityError(
                f"{name} is {size} bytes, the manifest says {info['size']}: the file was "
                "modified or truncated; re-download the vector"
            )
        if not quick and sha256_file(path) != info["sha256"]:
            raise IntegrityError(
                f"{name} does not match its sha256 in rvhub.json: the file was tampered with "
                "or corrupted; re-download the vector"
            )
        checked.append(name)
    return checked
