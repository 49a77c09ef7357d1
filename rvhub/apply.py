"""Adding ``α·v`` to a model: a live ``nn.Module`` in place, or a checkpoint on disk.

Both paths compute ``θ + α·v`` in float32 (or the parameter's wider dtype) and round once to
the target's dtype. The on-disk path streams, writes shards named like the target's and
appears atomically; the live path moves one delta at a time to each parameter's own device.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_dir, check_output
from .checkpoint import SAFE_INDEX, Checkpoint, open_checkpoint
from .compat import ApplyPlan, model_identity, plan_apply
from .errors import CompatibilityError, InputError
from .extract import FileHandles, read_range
from .kernels import APPLY_BLOCK, Scratch, add_scaled_, axpy_into, single_thread
from .progress import logger
from .safetensors_io import SafetensorsWriter, TensorEntry, iter_chunks, read_header
from .vector import ReasoningVector, compile_excludes, is_excluded
from .writer import SLAB_ELEMS, SlabPool, write_streams

APPLIED_RECORD = "rvhub_applied.json"
SIDE_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")
SKIP_SIDE = {SAFE_INDEX, "README.md", APPLIED_RECORD}


@dataclass
class ApplyReport:
    """What an apply did: target tensor names changed, and vector/target names left alone."""

    applied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # vector tensors excluded by --exclude
    missing: list[str] = field(default_factory=list)  # vector tensors the target lacks
    untouched: list[str] = field(default_factory=list)  # target tensors the vector lacks
    notes: list[str] = field(default_factory=list)
    scale: float = 1.0
    output: str | None = None

    def summary(self) -> str:
        parts = [f"applied {len(self.applied)} tensors at scale {self.scale:g}"]
        if self.skipped:
            parts.append(f"excluded {len(self.skipped)}")
        if self.missing:
            parts.append(f"{len(self.missing)} vector tensors absent from the target")
        if self.untouched:
            parts.append(f"{len(self.untouched)} target tensors left as they were")
        return ", ".join(parts)

    def as_json(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "applied": self.applied,
            "skipped": self.skipped,
            "missing": self.missing,
            "untouched": self.untouched,
            "notes": self.notes,
        }


def check_scale(scale: float | str) -> float:
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise InputError(f"scale must be a number, not {scale!r}") from None
    if not math.isfinite(value):
        raise InputError(f"scale must be a finite number, not {scale!r}")
    return value


def _report_from_plan(plan: ApplyPlan, scale: float) -> ApplyReport:
    return ApplyReport(
        applied=list(plan.targets),
        skipped=list(plan.excluded),
        missing=list(plan.missing),
        untouched=list(plan.untouched),
        notes=list(plan.notes),
        scale=scale,
    )


def _manifest_nonfinite(vec: ReasoningVector) -> bool | None:
    """Whether the verified manifest records non-finite values (None when unknown)."""
    manifest = vec.meta.get("manifest")
    if not isinstance(manifest, dict):
        return None
    tensors = manifest.get("tensors") or {}
    return any((info or {}).get("nonfinite") for info in tensors.values())


def _check_finite(vec: ReasoningVector, names: list[str], allow_nonfinite: bool) -> None:
    if allow_nonfinite:
        return
    recorded = _manifest_nonfinite(vec)
    if recorded is False:
        return  # hashes verified against a manifest that records none
    for name in names:
        d = vec.source.get(name, None)
        if d.is_floating_point() and not bool(torch.isfinite(d).all()):
            raise InputError(
                f"the vector's delta for {name} holds NaN/Inf values; pass --allow-nonfinite "
                "(allow_nonfinite=True) to apply it anyway"
            )


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto`` -> cuda when available, else cpu; refuses a device this machine lacks."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(str(device))
    except RuntimeError:
        raise InputError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(
            f"--device {device} asked for, but this machine has no CUDA GPU; use --device cpu"
        )
    return dev


# -- live models ------------------------------------------------------------------------------
def apply_to_model(
    vec: ReasoningVector,
    model: torch.nn.Module,
    *,
    scale: float = 1.0,
    exclude: list[str] | None = None,
    vocab: str = "strict",
    allow_nonfinite: bool = False,
) -> ApplyReport:
    """Add ``scale · vec`` to ``model`` in place; see :meth:`ReasoningVector.apply_to`."""
    scale = check_scale(scale)
    patterns = compile_excludes(exclude or [])
    excluded = [n for n in vec.names if is_excluded(n, patterns)]
    params = dict(model.named_parameters())  # tied weights appear once
    config = getattr(model, "config", None)
    config_dict = config.to_dict() if config is not None and hasattr(config, "to_dict") else {}
    wanted = [n for n in vec.names if n not in excluded]
    if _needs_conversion(model, wanted, params):
        return _apply_converted(vec, model, params, config_dict, excluded, scale, allow_nonfinite)
    plan = plan_apply(
        vec.shapes,
        vec.model_info,
        {n: tuple(p.shape) for n, p in params.items()},
        config_dict,
        vocab=vocab,
        excluded=excluded,
        target_tied=_live_tied(model),
    )
    _check_finite(vec, sorted({v for v, _ in plan.targets.values()}), allow_nonfinite)
    report = _report_from_plan(plan, scale)
    work = [(params[t], vname, rows) for t, (vname, rows) in plan.targets.items()]
    _refuse_offloaded(plan.targets, params)
    _add_live(vec, work, scale)
    _warn_overflow(model, report)
    return report


def _refuse_offloaded(names: Iterable[str], params: dict[str, torch.nn.Parameter]) -> None:
    """A parameter on the meta device (accelerate's disk offload) would ignore an add_."""
    offloaded = [n for n in names if n in params and params[n].device.type == "meta"]
    if offloaded:
        raise CompatibilityError(
            f"{offloaded[0]} (and {len(offloaded) - 1} more) are offloaded (meta device): an "
            "in-place add would be lost; apply to the checkpoint on disk with `rvhub apply` "
            "instead, or load the model without disk offload"
        )


def _needs_conversion(model: torch.nn.Module, names: list[str], params: dict[str, Any]) -> bool:
    """True when the vector's checkpoint names are not the model's live parameter names."""
    # A tied lm_head is not in named_parameters(); compat.plan_apply handles it.
    unknown = [n for n in names if n not in params and n != "lm_head.weight"]
    if not unknown:
        return False
    from .conversion import has_conversions

    return has_conversions(model)


def _apply_converted(
    vec: ReasoningVector,
    model: torch.nn.Module,
    params: dict[str, torch.nn.Parameter],
    config_dict: dict[str, Any],
    excluded: list[str],
    scale: float,
    allow_nonfinite: bool,
) -> ApplyReport:
    """Map checkpoint-format deltas through transformers' own conversion ops (fused MoE)."""
    from .conversion import plan_live_mapping

    live = plan_live_mapping(model, [n for n in vec.names if n not in excluded])
    vt = vec.model_info.get("model_type")
    tt = config_dict.get("model_type")
    if vt and tt and vt != tt:
        raise CompatibilityError(f"the vector was made for model_type {vt}, the target is {tt}")
    _check_finite(vec, [n for n in vec.names if n not in excluded], allow_nonfinite)
    report = ApplyReport(scale=scale, skipped=excluded, missing=list(live.unmapped))
    _refuse_offloaded((t for g in live.groups for t in g.targets), params)
    seen: set[int] = set()
    with torch.no_grad():
        for pname, delta in live.deltas(lambda n: vec.source.get(n, None)):
            p = params[pname]
            if p.data_ptr() in seen:
                report.notes.append(
                    f"{pname}: shares storage with a tensor already changed; skipped"
                )
                continue
            seen.add(p.data_ptr())
            if tuple(p.shape) != tuple(delta.shape):
                raise CompatibilityError(
                    f"the vector does not fit the target: {pname} is {list(p.shape)}, "
                    f"the mapped delta {list(delta.shape)}"
                )
            add_scaled_(p.data, delta.to(p.device, non_blocking=False), scale)
            report.applied.append(pname)
    report.untouched = [n for n in params if n not in set(report.applied)]
    _warn_overflow(model, report)
    return report


def _live_tied(model: torch.nn.Module) -> bool:
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    if get_in is None or get_out is None:
        return False
    try:
        emb, head = get_in(), get_out()
    except (AttributeError, NotImplementedError):
        return False
    return emb is not None and head is not None and head.weight is emb.weight


def _add_live(
    vec: ReasoningVector, work: list[tuple[torch.nn.Parameter, str, int | None]], scale: float
) -> None:
    from .load import DenseSource

    seen: set[int] = set()
    gpu_work = []
    dense = vec.source if isinstance(vec.source, DenseSource) else None
    with torch.no_grad():
        for param, vname, rows in work:
            key = param.data_ptr()
            if key in seen:
                continue  # a tied weight reached twice: one storage, one delta
            seen.add(key)
            if dense is not None and param.device.type == "cuda":
                gpu_work.append((param.data, dense.entries[vname], rows))
                continue
            delta_on = getattr(vec.source, "delta_on", None)
            if delta_on is not None:  # LoRA: B @ A on the parameter's own device
                delta = delta_on(vname, param.device)
            else:
                delta = vec.source.get(vname, None)
            target = param.data
            if rows is not None:
                target = target[:rows]
                delta = delta[:rows]
            add_scaled_(target, delta.to(param.device), scale)
        if gpu_work:
            from .gpu import apply_dense_cuda

            apply_dense_cuda(gpu_work, scale)


def _warn_overflow(model: torch.nn.Module, report: ApplyReport) -> None:
    params = {n: p for n, p in model.named_parameters() if p.dtype == torch.float16}
    if not params:
        return
    bad = [
        n
        for n in report.applied
        if n in params
        and params[n].dtype == torch.float16
        and not bool(torch.isfinite(params[n]).all())
    ]
    if bad:
        msg = (
            f"float16 overflow: {bad[0]} (and {len(bad) - 1} more) now hold Inf/NaN after "
            f"adding {report.scale:g}·v; use a smaller scale or a bfloat16/float32 model"
        )
        report.notes.append(msg)
        logger.warning(msg)


# -- checkpoints on disk ----------------------------------------------------------------------
def apply_to_checkpoint(
    vec: ReasoningVector,
    target: str | os.PathLike[str] | Checkpoint,
    out: str | os.PathLike[str],
    *,
    scale: float = 1.0,
    exclude: list[str] | None = None,
    vocab: str = "strict",
    overwrite: bool = False,
    allow_nonfinite: bool = False,
    revision: str | None = None,
    device: str = "cpu",
) -> ApplyReport:
    """Write a new model folder ``out`` = ``target + scale · vec``, streamed and atomic.

    Weights keep the target's dtype and shard layout; config, tokenizer and generation files
    are copied, so ``AutoModelForCausalLM.from_pretrained(out)`` loads it.

    Example:
        >>> apply_to_checkpoint(load_vector("user/vec"), "Qwen/Qwen2.5-1.5B-Instruct", "out/")
    """
    scale = check_scale(scale)
    dev = resolve_device(device)
    out_path = Path(out)
    check_output(out_path, overwrite=overwrite)
    ckpt = target if isinstance(target, Checkpoint) else open_checkpoint(target, revision=revision)
    patterns = compile_excludes(exclude or [])
    excluded = [n for n in vec.names if is_excluded(n, patterns)]
    plan = plan_apply(
        vec.shapes,
        vec.model_info,
        {n: e.shape for n, e in ckpt.entries.items()},
        ckpt.config,
        vocab=vocab,
        excluded=excluded,
        target_tied=ckpt.tie_word_embeddings and "lm_head.weight" not in ckpt.entries,
    )
    _check_finite(vec, sorted({v for v, _ in plan.targets.values()}), allow_nonfinite)
    report = _report_from_plan(plan, scale)
    handles = FileHandles()
    source = vec.source
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
        if raw.dtype == torch.float16 and not bool(torch.isfinite(result).all()):
            raise InputError(
                f"float16 overflow in {entry.name} at scale {scale:g}: the result holds Inf; "
                "use a smaller --scale or a bfloat16/float32 target"
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
            "vector": vec.meta.get("origin") or (str(vec.path) if vec.path else None),
            "vector_sources": vec.meta.get("sources"),
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
