"""Sweeps that survive an interruption: each finished α is kept in the output's work folder
(:func:`rvhub.io.atomic.partial_dir`) with its lm-eval results, under a key naming everything
the numbers depend on; ``resume=True`` takes up the points whose key matches and evaluates only
the missing α.

A point is kept once lm-eval has returned its results: a kill during a point loses that point
only. The finished folder holds exactly what an uninterrupted run writes (the key file is
removed before the rename).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..io.atomic import atomic_write
from .sweep import SweepPoint, write_point

PARTIAL_NAME = "partial.json"
PARTIAL_FORMAT = "rvhub.eval-partial"


def model_sample(model: Any) -> str:
    """A digest of the model's parameter names, shapes, dtypes and 64 values of each: enough
    to tell one target from another without reading all of it."""
    import torch

    h = hashlib.blake2b(digest_size=16)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // 64)
            h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
            h.update(flat[::step][:64].float().cpu().numpy().tobytes())
    return h.hexdigest()


def checkpoint_sample(ckpt: Any) -> str:
    """:func:`model_sample` of a checkpoint's files (names, shapes, dtypes, 64 values each)."""
    import torch

    from ..io.safetensors import FileHandles, read_range

    h = hashlib.blake2b(digest_size=16)
    handles = FileHandles()
    try:
        for name, entry in sorted(ckpt.entries.items()):
            step = max(1, entry.numel // 64)
            h.update(f"{name}{tuple(entry.shape)}{entry.torch_dtype}".encode())
            at = range(0, entry.numel, step)[:64]
            values = [read_range(entry, i, i + 1, handles) for i in at]
            h.update(torch.cat(values).float().numpy().tobytes() if values else b"")
    finally:
        handles.close()
    return h.hexdigest()


def sweep_key(**parts: Any) -> dict[str, Any]:
    """The key of a sweep's points, as JSON would round-trip it (so a stored key compares
    equal to a fresh one)."""
    return json.loads(json.dumps(parts, default=str, sort_keys=True))


def _differs(stored: Mapping[str, Any], key: Mapping[str, Any]) -> str:
    names = [k for k in sorted({*stored, *key}) if stored.get(k) != key.get(k)]
    return ", ".join(names) or "format"


def finished_points(
    work: Path, key: Mapping[str, Any], *, resume: bool, final: Path
) -> dict[float, SweepPoint]:
    """The points an interrupted run left in ``work`` for this ``key`` (none without one).

    Refuses an interrupted run's points unless ``resume`` (they may be hours of work), and
    points made with another key: another vector, target, tasks or settings.
    """
    record_path = work / PARTIAL_NAME
    if not record_path.is_file():
        for leftover in work.iterdir():  # killed before its first point was recorded
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        return {}
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        stored, entries = record["key"], record["points"]
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError(f"{record_path}: not a readable interrupted sweep; delete it") from None
    if entries and not resume:
        raise InputError(
            f"an interrupted sweep of {final} left {len(entries)} finished α point(s) in "
            f"{work}; pass `resume=True` to keep them, or delete that folder to start over"
        )
    if entries and stored != dict(key):
        raise InputError(
            f"the interrupted sweep in {work} was run with another {_differs(stored, key)}; "
            "resume it with the same settings, or delete that folder to start over"
        )
    done: dict[float, SweepPoint] = {}
    for entry in entries:
        point = SweepPoint(
            float(entry["scale"]), {}, entry["switch_seconds"], entry["eval_seconds"]
        )
        results = work / point.dirname / "results.json"
        try:
            point.results = json.loads(results.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise InputError(f"{results}: a finished point's results are unreadable") from None
        done[point.scale] = point
    return done


def keep_point(
    work: Path, key: Mapping[str, Any], point: SweepPoint, points: list[SweepPoint]
) -> None:
    """Write ``point``'s results, then the record naming every finished point."""
    write_point(work, point)
    record = {
        "format": PARTIAL_FORMAT,
        "key": dict(key),
        "points": [
            {"scale": p.scale, "switch_seconds": p.switch_seconds, "eval_seconds": p.eval_seconds}
            for p in points
        ],
    }
    atomic_write(work / PARTIAL_NAME, (json.dumps(record, indent=2) + "\n").encode())


def forget_key(work: Path) -> None:
    """Before the rename: the finished folder is what a full run writes."""
    (work / PARTIAL_NAME).unlink(missing_ok=True)


__all__ = ["finished_points", "forget_key", "keep_point", "model_sample", "sweep_key"]
