"""What every encoding shares: the options a writer takes, what it returns, and the reading
helpers for the tensor files an artifact lists.

An encoding is a small class with a ``name`` and two methods (:class:`Encoding`) (its options
were checked when :class:`~rvhub.options.WriteOptions` was built): ``write`` streams the chosen tensors of a source into
an artifact folder (a :class:`WriteJob`), ``open`` reads such a folder back as a source. The registry in
:mod:`rvhub.encodings` assembles the manifest around ``write`` the same way for all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from ..constants import ADAPTER_WEIGHTS_NAME, LINEAGE_FILE
from ..errors import IntegrityError
from ..io.safetensors import DTYPES, TensorEntry, read_header
from ..manifest import Manifest, Provenance, artifact_file
from ..options import WriteOptions
from ..sources import VectorSource


@dataclass(frozen=True)
class WriteJob:
    """One write: the deltas ``names`` of ``source`` into ``folder`` (a fresh temp folder),
    with the vector's ``provenance``."""

    source: VectorSource
    names: list[str]
    folder: Path
    options: WriteOptions
    provenance: Provenance


@dataclass
class Encoded:
    """What an encoding wrote into the folder, for the manifest."""

    files: dict[str, dict[str, Any]]  # name -> {blake3, size}
    tensors: dict[str, dict[str, Any]]  # the manifest's tensor table
    stats: dict[str, Any]
    dtypes: list[str]
    compression: dict[str, Any] | None = None


class Encoding(Protocol):
    name: str

    def write(self, job: WriteJob) -> Encoded:
        """Write ``job``'s deltas into its folder; return what the manifest needs."""
        ...

    def open(self, folder: Path, manifest: Manifest) -> VectorSource:
        """The source of an artifact of this encoding (hashes were checked by the caller)."""
        ...


def declared(
    manifest: Manifest,
) -> tuple[dict[str, tuple[int, ...]], dict[str, torch.dtype]]:
    """Shapes and dtypes of the tensors the manifest declares."""
    shapes, dtypes = {}, {}
    for name, info in manifest.tensors.items():
        if info.dtype not in DTYPES:
            raise IntegrityError(f"rvhub.json: tensor {name!r} has unknown dtype {info.dtype!r}")
        shapes[name] = info.shape
        dtypes[name] = DTYPES[info.dtype]
    return shapes, dtypes


def stored_entries(folder: Path, manifest: Manifest) -> dict[str, TensorEntry]:
    """Every tensor in the artifact's listed ``*.safetensors`` files (adapter and lineage aside)."""
    entries: dict[str, TensorEntry] = {}
    for name in manifest.files:
        if not name.endswith(".safetensors") or name in (ADAPTER_WEIGHTS_NAME, LINEAGE_FILE):
            continue
        found, _ = read_header(artifact_file(folder, name))
        for tname, entry in found.items():
            if tname in entries:
                raise IntegrityError(f"tensor {tname!r} appears in two files of {folder}")
            entries[tname] = entry
    return entries
