"""L2, encodings: one registry; each encoding module owns its writer and its reader.

``dense`` (:mod:`.dense`): every delta as a plain tensor. ``lora`` (:mod:`.lora`): Linear and
Embedding deltas as a stock PEFT adapter by truncated SVD, the rest dense beside it.
``sparse`` (:mod:`.sparse`): only the changed entries, bit-exact.

:func:`write_artifact` is the one way a vector becomes an artifact folder: it splits off
excluded tensors, lets the encoding write into a temp folder, builds the manifest with the
same provenance for every encoding (content fingerprints of local sources included), and
remembers the files it hashed while writing, so the first load does not hash them again.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import InputError, IntegrityError
from ..io.atomic import atomic_dir, check_output
from ..io.cores import resolve_threads
from ..io.kernels import torch_threads
from ..io.progress import logger
from ..lineage import ALGORITHM, read_lineage
from ..manifest import (
    Manifest,
    Provenance,
    build_manifest,
    file_info,
    remember_written,
    stamp_files,
    write_manifest,
)
from ..options import WriteOptions, exclude_patterns, one_of, split_excluded
from ..sources import VectorSource
from .base import Encoding, WriteJob
from .dense import DenseEncoding
from .lora import LoraEncoding
from .sparse import SparseEncoding

ENCODINGS: dict[str, Encoding] = {
    e.name: e for e in (DenseEncoding(), LoraEncoding(), SparseEncoding())
}


def get_encoding(name: str) -> Encoding:
    one_of("encoding", name, ENCODINGS)
    return ENCODINGS[name]


def write_artifact(
    source: VectorSource,
    provenance: Provenance,
    out: str | os.PathLike[str],
    *,
    exclude: Iterable[str] = (),
    overwrite: bool = False,
    options: WriteOptions | None = None,
    inputs: Iterable[str | os.PathLike[str] | None] = (),
) -> Path:
    """Write ``source`` (with its ``provenance``) as a new artifact folder ``out``, atomically,
    in ``options.encoding``. ``inputs`` are the paths the vector reads (:func:`check_output`)."""
    out_path = Path(out)
    inputs = list(inputs)
    check_output(out_path, overwrite=overwrite, inputs=inputs)
    options = options or WriteOptions()
    codec = get_encoding(options.encoding)
    encoding = options.encoding
    exclude = exclude_patterns(exclude)
    names, excluded = split_excluded(source.shapes, exclude)
    if not names:
        raise InputError("every tensor was excluded: the vector would be empty")
    lineage = source.lineage()
    with atomic_dir(out_path, overwrite=overwrite, inputs=inputs) as tmp:
        source.track_fingerprints()
        with torch_threads(resolve_threads(options.threads)):  # LoRA's SVDs, sparse encoding
            encoded = codec.write(WriteJob(source, names, tmp, options, provenance))
        extra: dict[str, Any] = {}
        if lineage is not None:
            lineage_file = lineage.write(tmp, names)
            encoded.files.update(file_info(tmp, [lineage_file]))
            extra["lineage"] = {"file": lineage_file, "algorithm": ALGORITHM}
        if encoded.stats.get("norm") == 0.0:
            note = "every delta is zero: the two sources hold the same weights"
            logger.warning("%s; the vector changes nothing (%s)", note, out_path)
            extra["notes"] = [note]
        manifest = build_manifest(
            provenance,
            encoding,
            excluded=excluded,
            exclude_patterns=exclude,
            fingerprints=source.fingerprints(names),
            files=encoded.files,
            tensors=encoded.tensors,
            stats=encoded.stats,
            dtypes=encoded.dtypes,
            compression=encoded.compression,
        )
        manifest.update(extra)
        write_manifest(tmp, manifest)
        stamps = stamp_files(tmp, encoded.files)
    remember_written(out_path, encoded.files, stamps)
    return out_path.absolute()


def open_source(folder: Path, manifest: Manifest) -> VectorSource:
    """The source of a verified artifact folder, in whatever encoding it was written."""
    codec = ENCODINGS.get(manifest.encoding)
    if codec is None:
        raise IntegrityError(
            f"{folder}: encoding {manifest.encoding!r} is not readable by this rvhub version"
        )
    source = codec.open(folder, manifest)
    source.recorded_lineage = read_lineage(folder, manifest)
    return source


__all__ = ["ENCODINGS", "Encoding", "WriteOptions", "get_encoding", "open_source", "write_artifact"]
