"""Adding ``α·v`` to a checkpoint on disk: a new model folder, streamed and atomic.

``θ + α·v`` is computed in float32 and rounded once to the target's dtype, slab by slab; the
output keeps the target's shard layout, config, tokenizer and generation files, so
transformers loads it as it loaded the target.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from ..architecture import model_identity
from ..checkpoint import Checkpoint
from ..constants import APPLIED_RECORD, CARD_NAME, SAFE_INDEX, SLAB_ELEMS
from ..errors import InputError
from ..io.atomic import atomic_dir, check_output
from ..io.device import resolve_device
from ..io.kernels import APPLY_BLOCK, Scratch, axpy_into, single_thread
from ..io.safetensors import (
    FileHandles,
    SafetensorsWriter,
    TensorEntry,
    iter_chunks,
    read_header,
    read_range,
)
from ..io.stream import SlabPool, write_streams
from ..sources import VectorSource, split_excluded
from .lineage import check_change_size, checkpoint_lineage, enforce
from .plan import ApplyReport, check_finite, check_scale, plan_apply, zero_scale_note

SIDE_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")
SKIP_SIDE = {SAFE_INDEX, CARD_NAME, APPLIED_RECORD}


def apply_to_checkpoint_files(
    source: VectorSource,
    model_info: Mapping[str, Any],
    ckpt: Checkpoint,
    out: str | os.PathLike[str],
    *,
    manifest: Mapping[str, Any] | None = None,
    provenance: Mapping[str, Any] | None = None,
    scale: float = 1.0,
    exclude: Iterable[str] = (),
    vocab: str = "strict",
    overwrite: bool = False,
    allow_nonfinite: bool = False,
    allow_unrelated: bool = False,
    device: str = "cpu",
) -> ApplyReport:
    """Write a new model folder ``out`` = ``ckpt + scale · v``; see :func:`rvhub.apply_to_checkpoint`.

    ``provenance`` (the vector's origin and sources) is recorded in ``rvhub_applied.json``.
    """
    given, scale = scale, check_scale(scale)
    dev = resolve_device(device)
    out_path = Path(out)
    check_output(out_path, overwrite=overwrite)
    _, excluded = split_excluded(source.shapes, exclude)
    plan = plan_apply(
        source.shapes,
        model_info,
        {n: e.shape for n, e in ckpt.entries.items()},
        ckpt.config,
        vocab=vocab,
        excluded=excluded,
        target_tied=ckpt.tie_word_embeddings and "lm_head.weight" not in ckpt.entries,
    )
    check_finite(source, manifest, sorted({v for v, _ in plan.targets.values()}), allow_nonfinite)
    report = ApplyReport.from_plan(plan, scale)
    zero = zero_scale_note(scale, given)
    if zero:
        report.notes.append(zero)
    reference = source.lineage()
    wide = [v for t, (v, _) in plan.targets.items() if ckpt.entries[t].dtype != "F16"]
    check_change_size(reference, scale, wide)
    lineage = checkpoint_lineage(reference, source.shapes, ckpt)
    note = enforce(lineage, allow_unrelated=allow_unrelated)
    report.lineage = lineage.as_json()
    if note:
        report.notes.append(note)
    handles = FileHandles()
    total = ckpt.nbytes

    scratch = Scratch(count=2, block=APPLY_BLOCK)
    pool = SlabPool(SLAB_ELEMS)

    def _slab(entry: TensorEntry, start: int, stop: int) -> torch.Tensor:
        raw = read_range(entry, start, stop, handles, pool.take(stop - start, entry.torch_dtype))
        spec = plan.targets.get(entry.name)
        if spec is None:
            return raw
        vname, rows = spec
        limit = entry.numel if rows is None else rows * math.prod(entry.shape[1:])
        if start >= limit:
            return raw
        d = source.raw_chunk(vname, start, min(stop, limit), pool.take)
        if dev.type != "cpu":
            t = raw.to(dev).float()
            t[: d.numel()].add_(d.to(dev), alpha=scale)
            result = t.to(raw.dtype).cpu()
        else:
            result = pool.take(raw.numel(), raw.dtype)
            axpy_into(raw, d, scale, result, scratch)
        pool.give(raw, d)  # the writer gives ``result`` back once written
        # float16 overflows at ordinary scales; wider dtypes only where |α| is large
        may_overflow = raw.dtype == torch.float16 or abs(scale) > 1.0
        if may_overflow and not bool(torch.isfinite(result).all()):
            dtype = str(raw.dtype).removeprefix("torch.")
            raise InputError(
                f"{dtype} overflow in {entry.name} at scale {scale:g}: the result holds Inf; "
                "use a smaller --scale"
                + (" or a bfloat16/float32 target" if dtype == "float16" else "")
            )
        return result

    def blobs(entries: list[TensorEntry]) -> Iterator[torch.Tensor]:
        for e in entries:
            for start, stop in iter_chunks(e.numel, SLAB_ELEMS):
                yield _slab(e, start, stop)

    def opener(path: Path, entries: list[TensorEntry]) -> Callable[[], SafetensorsWriter]:
        _, metadata = read_header(path)
        specs = [(e.name, e.dtype, e.shape) for e in entries]
        # A model folder records no hashes: skip ~1 s/GB of sha256.
        return lambda: SafetensorsWriter(
            tmp / path.name, specs, metadata or {"format": "pt"}, hash_contents=False
        )

    with atomic_dir(out_path, overwrite=overwrite) as tmp, single_thread():
        streams = []
        for path in ckpt.files:
            entries = sorted(
                (e for e in ckpt.entries.values() if e.path == path), key=lambda e: e.start
            )
            streams.append((opener(path, entries), blobs(entries)))
        try:
            write_streams(streams, total_bytes=total, desc="applying vector", pool=pool)
        finally:
            handles.close()
        _copy_side_files(ckpt, tmp)
        record = {
            **(provenance or {}),
            "target": ckpt.source,
            "model": model_identity(ckpt.config),
            **report.as_json(),
        }
        (tmp / APPLIED_RECORD).write_text(json.dumps(record, indent=2, default=str) + "\n")
    report.output = str(out_path.absolute())
    return report


def _copy_side_files(ckpt: Checkpoint, dest: Path) -> None:
    folder = ckpt.path if ckpt.path.is_dir() else ckpt.path.parent
    if ckpt.index is not None:
        (dest / SAFE_INDEX).write_text(json.dumps(ckpt.index, indent=2) + "\n")
    weight_files = {p.name for p in ckpt.files}
    for item in sorted(folder.iterdir()):
        if (
            item.is_file()
            and not item.is_symlink()
            and item.name not in SKIP_SIDE
            and item.name not in weight_files
            and item.suffix in SIDE_SUFFIXES
            and not item.name.startswith(".")
        ):
            shutil.copy2(item, dest / item.name)
        elif (
            item.is_symlink()
            and item.is_file()
            and item.suffix in SIDE_SUFFIXES
            and item.name not in SKIP_SIDE
            and item.name not in weight_files
        ):
            # Hub cache snapshots are symlinks into blobs/: copy the content, not the link.
            shutil.copyfile(item, dest / item.name)
