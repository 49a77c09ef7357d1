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
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..architecture import model_identity
from ..checkpoint import Checkpoint
from ..constants import APPLIED_RECORD, CARD_NAME, SAFE_INDEX, SLAB_ELEMS
from ..errors import CompatibilityError, InputError
from ..io.atomic import atomic_dir, check_output
from ..io.cores import resolve_threads
from ..io.device import resolve_device
from ..io.kernels import APPLY_BLOCK, ThreadScratch, axpy_into, single_thread
from ..io.safetensors import (
    FileHandles,
    SafetensorsWriter,
    TensorEntry,
    iter_chunks,
    read_header,
    read_range,
)
from ..io.stream import Blob, SlabPool, ordered, pool_limit, write_streams
from ..options import ApplyOptions
from ..sources import VectorSource
from .plan import ApplyReport
from .prepare import ApplyTarget, PreparedApply, VectorFacts, prepare_apply

SIDE_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")
SKIP_SIDE = {SAFE_INDEX, CARD_NAME, APPLIED_RECORD}


def apply_to_checkpoint_files(
    vector: VectorFacts,
    source: VectorSource,
    ckpt: Checkpoint,
    out: str | os.PathLike[str],
    options: ApplyOptions,
    *,
    provenance: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike[str] | None] = (),
) -> ApplyReport:
    """Write a new model folder ``out`` = ``ckpt + scale · v``; see :func:`rvhub.apply_to_checkpoint`.

    ``options.dtype="bfloat16"`` writes an FP8 target's weights dequantized, as bfloat16 (the
    scales and the config's quantization_config dropped); by default FP8 stays FP8, requantized.

    ``provenance`` (the vector's origin and sources) is recorded in ``rvhub_applied.json``.
    Slabs are computed on ``options.threads`` threads (default: every core this process may
    use); the output's bytes are the same on any number.
    """
    dev = resolve_device(options.device)
    workers = resolve_threads(options.threads)
    if options.dtype is not None and not ckpt.fp8_scales:
        raise InputError(
            '`dtype="bfloat16"` dequantizes an FP8 target; this target is not FP8 (its dtype '
            "is kept)"
        )
    out_path = Path(out)
    inputs = [ckpt.path, *inputs]  # the vector's own paths, given by the caller
    check_output(out_path, overwrite=overwrite, inputs=inputs)
    prepared = prepare_apply(vector, ApplyTarget.of_checkpoint(ckpt), options)
    report = prepared.report
    handles = FileHandles()
    pool = SlabPool(SLAB_ELEMS, limit=pool_limit(workers))
    add = _SlabAdder(source, prepared.plan.targets, options.alpha, dev, handles, pool)
    fp8 = _Fp8Requantizer(ckpt, prepared.plan.targets, source, options.alpha, handles)
    dequant = options.dtype is not None
    scale_names = {e.name: w for w, e in ckpt.fp8_scales.items()}
    with atomic_dir(out_path, overwrite=overwrite, inputs=inputs) as tmp, single_thread():
        streams = [
            (_opener(ckpt, path, entries, tmp, dequant), _blobs(entries, add, fp8, dequant))
            for path, entries in _file_entries(ckpt)
        ]
        try:
            write_streams(
                streams, total_bytes=ckpt.nbytes, desc="applying vector", pool=pool, threads=workers
            )
        finally:
            handles.close()
        _copy_side_files(ckpt, tmp)
        if dequant:
            _drop_quantization(ckpt, tmp, set(scale_names))
        _note_requantization(report, fp8)
        record = {
            **(provenance or {}),
            "target": ckpt.source,
            "model": model_identity(ckpt.config),
            **report.as_json(),
        }
        (tmp / APPLIED_RECORD).write_text(json.dumps(record, indent=2, default=str) + "\n")
    report.output = str(out_path.absolute())
    return report


def prepare_streamed(vector: VectorFacts, ckpt: Checkpoint, options: ApplyOptions) -> PreparedApply:
    """The apply pre-flight of an apply streamed by :func:`stream_applied` into a live model or
    an engine. FP8 targets are refused: they would have to be requantized (``rvhub apply``
    writes them)."""
    if ckpt.fp8_scales:
        raise CompatibilityError(
            f"{ckpt.path} is block-quantized FP8: set α in an engine only on its bfloat16 "
            "release (or `rvhub apply --dtype bfloat16` and evaluate that output)"
        )
    return prepare_apply(vector, ApplyTarget.of_checkpoint(ckpt), options)


def stream_applied(
    source: VectorSource,
    ckpt: Checkpoint,
    targets: Mapping[str, tuple[str, int | None]],
    alpha: float,
    only: Iterable[str] | None = None,
    threads: int | None = None,
    reuse: bool = False,
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for each tensor of ``ckpt`` (or of ``only``) in file order (a
    layer's tensors together): θ as stored, or ``round(θ + α·v)`` for the ``targets`` of an
    apply plan (target name → vector name and rows), on the CPU, one tensor at a time. Slabs
    are computed on ``threads`` threads (default: every core), as ``rvhub apply`` does.
    ``reuse``: every tensor is a view of one buffer the size of the largest, valid only until
    the next is yielded (for a consumer that copies each at once: no allocation per tensor,
    so the allocator has nothing to fragment)."""
    wanted = None if only is None else set(only)
    entries = [e for _, es in _file_entries(ckpt) for e in es if wanted is None or e.name in wanted]
    nbytes = [e.numel * e.torch_dtype.itemsize for e in entries]
    buffer = torch.empty(max(nbytes, default=0), dtype=torch.uint8) if reuse else None
    workers = resolve_threads(threads)
    handles = FileHandles()
    pool = SlabPool(SLAB_ELEMS, limit=pool_limit(workers))
    add = _SlabAdder(source, targets, alpha, torch.device("cpu"), handles, pool)
    tasks = (
        partial(add.slab, e, start, stop)
        for e in entries
        for start, stop in iter_chunks(e.numel, SLAB_ELEMS)
    )
    results = ordered(tasks, workers)
    try:
        with single_thread():
            for e, size in zip(entries, nbytes, strict=True):
                if buffer is None:
                    out = torch.empty(e.numel, dtype=e.torch_dtype)
                else:
                    out = buffer[:size].view(e.torch_dtype)
                for start, stop in iter_chunks(e.numel, SLAB_ELEMS):
                    part = next(results)
                    out[start:stop].copy_(part)
                    pool.give(part)
                yield e.name, out.reshape(e.shape)
    finally:
        results.close()
        handles.close()


def _file_entries(ckpt: Checkpoint) -> Iterator[tuple[Path, list[TensorEntry]]]:
    """Each of the target's files with the tensors it stores (FP8 scales included), in order."""
    stored = [*ckpt.entries.values(), *ckpt.fp8_scales.values()]
    for path in ckpt.files:
        yield path, sorted((e for e in stored if e.path == path), key=lambda e: e.start)


class _SlabAdder:
    """``θ + α·v`` for one slab of a plain (not FP8) target tensor, rounded once."""

    def __init__(
        self,
        source: VectorSource,
        targets: Mapping[str, tuple[str, int | None]],
        scale: float,
        device: torch.device,
        handles: FileHandles,
        pool: SlabPool,
    ) -> None:
        self.source, self.targets, self.scale, self.device = source, targets, scale, device
        self.handles, self.pool = handles, pool
        self.scratch = ThreadScratch(count=2, block=APPLY_BLOCK)

    def slab(self, entry: TensorEntry, start: int, stop: int) -> torch.Tensor:
        pool = self.pool
        raw = read_range(
            entry, start, stop, self.handles, pool.take(stop - start, entry.torch_dtype)
        )
        spec = self.targets.get(entry.name)
        if spec is None:
            return raw
        vname, rows = spec
        limit = entry.numel if rows is None else rows * math.prod(entry.shape[1:])
        if start >= limit:
            return raw
        d = self.source.raw_chunk(vname, start, min(stop, limit), pool.take)
        if self.device.type != "cpu":
            t = raw.to(self.device).float()
            t[: d.numel()].add_(d.to(self.device), alpha=self.scale)
            result = t.to(raw.dtype).cpu()
        else:
            result = pool.take(raw.numel(), raw.dtype)
            axpy_into(raw, d, self.scale, result, self.scratch.get())
        pool.give(raw, d)  # the writer gives ``result`` back once written
        self._check_overflow(entry, raw.dtype, result)
        return result

    def _check_overflow(self, entry: TensorEntry, dtype: torch.dtype, result: torch.Tensor) -> None:
        # float16 overflows at ordinary scales; wider dtypes only where |α| is large
        if not (dtype == torch.float16 or abs(self.scale) > 1.0):
            return
        if not bool(torch.isfinite(result).all()):
            name = str(dtype).removeprefix("torch.")
            raise InputError(
                f"{name} overflow in {entry.name} at scale {self.scale:g}: the result holds "
                "Inf; use a smaller `scale`"
                + (" or a bfloat16/float32 target" if name == "float16" else "")
            )


def _blobs(
    entries: list[TensorEntry], add: _SlabAdder, fp8: _Fp8Requantizer, dequant: bool
) -> Iterator[Blob]:
    """The slab tasks of one output file, in file order."""
    ckpt, targets = fp8.ckpt, add.targets
    scale_names = {e.name: w for w, e in ckpt.fp8_scales.items()}
    for e in entries:
        weight = scale_names.get(e.name, e.name if e.name in ckpt.fp8_scales else None)
        if dequant and weight is not None:
            if weight != e.name:
                continue  # the scales are folded into the bfloat16 weight
            kind, index = "bf16", 0
        elif weight is not None and weight in targets:
            # an FP8 weight and its scales: θ + α·v requantized block by block, whole
            kind, index = "q", 0 if weight == e.name else 1
        else:
            for start, stop in iter_chunks(e.numel, SLAB_ELEMS):
                yield partial(add.slab, e, start, stop)
            continue
        # the first slab's task computes the whole tensor once; later slabs slice it
        for start, stop in iter_chunks(e.numel, SLAB_ELEMS):
            yield partial(fp8.slab, kind, index, weight, start, stop)


def _opener(
    ckpt: Checkpoint, path: Path, entries: list[TensorEntry], tmp: Path, dequant: bool
) -> Callable[[], SafetensorsWriter]:
    """The writer of the output file for the target's file ``path``."""
    _, metadata = read_header(path)
    scale_names = {e.name for e in ckpt.fp8_scales.values()}
    specs = [
        (e.name, "BF16" if dequant and e.name in ckpt.fp8_scales else e.dtype, e.shape)
        for e in entries
        if not (dequant and e.name in scale_names)
    ]  # FP8 scales included, unless dequantized
    # A model folder records no hashes: skip ~1 s/GB of sha256.
    return lambda: SafetensorsWriter(
        tmp / path.name, specs, metadata or {"format": "pt"}, hash_contents=False
    )


def _note_requantization(report: ApplyReport, fp8: _Fp8Requantizer) -> None:
    if fp8.tensors:
        report.requantization = fp8.summary()
        kept = report.requantization["kept"]
        line = (
            f"FP8 target: requantizing each {'×'.join(map(str, report.requantization['block']))} "
            f"block kept {kept:.1%} of ‖α·v‖ "
            f"(relative error {report.requantization['rel_error']:.3f} against θ + α·v)"
        )
        if kept < 0.5:
            report.warn(
                f"{line}: most of the vector is below one FP8 step of its blocks; write a "
                "bfloat16 model instead (apply onto the unquantized release)"
            )
        else:
            report.notes.append(line)


class _Fp8Requantizer:
    """θ + α·v for a block-quantized FP8 target, one row of blocks at a time (blocks are
    independent, and cache-sized float32 temporaries avoid the page faults of whole-tensor
    ones): dequantize, add in float32, then requantize with each block's new ``amax / 448``
    (measuring what of α·v the FP8 grid kept), or keep it dequantized as bfloat16."""

    def __init__(
        self,
        ckpt: Checkpoint,
        targets: Mapping[str, tuple[str, int | None]],
        source: VectorSource,
        scale: float,
        handles: FileHandles,
    ) -> None:
        self.ckpt, self.targets, self.source, self.scale = ckpt, targets, source, scale
        self.handles = handles
        # results by weight name, each computed once under its own lock (slab tasks of one
        # tensor may run on several threads); dropped once both of its tensors are written
        self._results: dict[str, tuple[torch.Tensor, ...]] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self.tensors: dict[str, dict[str, float]] = {}

        self._left: dict[str, int] = {}  # slabs not yet taken, by result

    def slab(self, kind: str, index: int, name: str, start: int, stop: int) -> torch.Tensor:
        """Flat elements ``[start, stop)`` of tensor ``index`` of a result of weight ``name``:
        ``kind`` "q" is ``(Q, S)`` requantized (:meth:`result`), "bf16" the dequantized
        weight (:meth:`dequantized`). Each result is computed once, by whichever slab's task
        comes first, and dropped when its last slab has been taken."""
        key = f"{kind}:{name}"
        with self._lock:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            held = self._results.get(key)
            if held is None:
                held = self._results[key] = (
                    self._requantize(name) if kind == "q" else (self._dequantize(name),)
                )
                self._left[key] = sum(-(-t.numel() // SLAB_ELEMS) for t in held)
            self._left[key] -= 1
            if not self._left[key]:
                del self._results[key]
        return held[index].reshape(-1)[start:stop]

    def _row_blocks(self, name: str) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
        """``(r0, r1, θ rows, α·v rows)`` for each row of blocks of ``name``, in float32."""
        from ..io.fp8 import dequantize

        block = self.ckpt.fp8_block
        assert block is not None
        w, s = self.ckpt.entries[name], self.ckpt.fp8_scales[name]
        scales = read_range(s, 0, s.numel, self.handles).reshape(s.shape)
        vname, rows = self.targets.get(name, ("", 0))
        out_rows, columns = w.shape
        limit = out_rows if rows is None else rows  # --vocab overlap: the shared rows only
        for b, r0 in enumerate(range(0, out_rows, block[0])):
            r1 = min(out_rows, r0 + block[0])
            q = read_range(w, r0 * columns, r1 * columns, self.handles).view(r1 - r0, columns)
            theta = dequantize(q, scales[b : b + 1], block)
            delta = torch.zeros_like(theta)
            if r0 < limit:
                hi = min(r1, limit)
                d = self.source.chunk(vname, r0 * columns, hi * columns)
                delta[: hi - r0] = d.view(hi - r0, columns)
                delta.mul_(self.scale)
            yield r0, r1, theta, delta

    def _requantize(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Q, S)`` of weight ``name`` after the add."""
        from ..io.fp8 import dequantize, quantize

        block = self.ckpt.fp8_block
        assert block is not None
        w, s = self.ckpt.entries[name], self.ckpt.fp8_scales[name]
        new_q = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
        new_s = torch.empty(s.shape, dtype=torch.float32)
        want = err = 0.0
        for b, (r0, r1, theta, delta) in enumerate(self._row_blocks(name)):
            bq, bs = quantize(theta + delta, block)
            new_q[r0:r1], new_s[b : b + 1] = bq, bs
            got = dequantize(bq, bs, block).sub_(theta).sub_(delta)
            want += float(torch.dot(delta.reshape(-1), delta.reshape(-1)))
            err += float(torch.dot(got.reshape(-1), got.reshape(-1)))
        self.tensors[name] = {"norm": math.sqrt(want), "error": math.sqrt(err)}
        return new_q, new_s

    def _dequantize(self, name: str) -> torch.Tensor:
        """``θ + α·v`` of FP8 weight ``name`` (θ alone when the vector lacks it), in bfloat16."""
        out = torch.empty(self.ckpt.entries[name].shape, dtype=torch.bfloat16)
        for r0, r1, theta, delta in self._row_blocks(name):
            out[r0:r1] = theta.add_(delta)
        return out

    def summary(self) -> dict[str, Any]:
        want = math.sqrt(sum(t["norm"] ** 2 for t in self.tensors.values()))
        err = math.sqrt(sum(t["error"] ** 2 for t in self.tensors.values()))
        rel = err / want if want > 0 else 0.0
        return {
            "block": list(self.ckpt.fp8_block or ()),
            "rel_error": rel,
            "kept": max(0.0, 1.0 - rel),
            "tensors": {
                n: {"rel_error": t["error"] / t["norm"] if t["norm"] > 0 else 0.0}
                for n, t in sorted(self.tensors.items())
            },
        }


def _drop_quantization(ckpt: Checkpoint, dest: Path, scale_names: set[str]) -> None:
    """A dequantized output: no quantization_config, and an index without the scales."""
    config_path = dest / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        for cfg in (config, config.get("text_config")):
            if isinstance(cfg, dict):
                cfg.pop("quantization_config", None)
        config["torch_dtype" if "torch_dtype" in config else "dtype"] = "bfloat16"
        config_path.write_text(json.dumps(config, indent=2) + "\n")
    index_path = dest / SAFE_INDEX
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        index["weight_map"] = {
            k: v for k, v in index.get("weight_map", {}).items() if k not in scale_names
        }
        index_path.write_text(json.dumps(index, indent=2) + "\n")


def _copy_side_files(ckpt: Checkpoint, dest: Path) -> None:
    folder = ckpt.path if ckpt.path.is_dir() else ckpt.path.parent
    if ckpt.index is not None:  # listing every tensor the shards hold (see open_checkpoint)
        index = dict(ckpt.index)
        weight_map = dict(index.get("weight_map", {}))
        for e in [*ckpt.entries.values(), *ckpt.fp8_scales.values()]:
            weight_map.setdefault(e.name, e.path.relative_to(folder.resolve()).as_posix())
        index["weight_map"] = weight_map
        (dest / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
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
