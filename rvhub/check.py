"""``check_target``: does a vector fit a model, and does the model descend from its base?

Reads only what that needs (the manifest, the hash-checked lineage fingerprint, the target's
safetensors headers and a few values per tensor) and imports no torch, so ``rvhub check``
answers in well under a second.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .checkpoint import Checkpoint, check_config
from .constants import LINEAGE_FILE
from .hub.resolve import open_checkpoint, resolve_artifact
from .lineage import LineageReport, read_lineage
from .manifest import load_manifest, verify_artifact
from .ops.lineage import checkpoint_lineage
from .ops.plan import ApplyPlan, plan_apply


def check_target(
    vector: str | os.PathLike[str],
    target: str | os.PathLike[str] | Checkpoint,
    *,
    revision: str | None = None,
    target_revision: str | None = None,
    vocab: str = "strict",
    config_check: bool = True,
) -> CheckResult:
    """Whether ``vector`` fits ``target``, reading only what that needs: the manifest, the
    lineage fingerprint (hash-checked), the target's headers and a few values per tensor.

    Raises :class:`~rvhub.CompatibilityError` where an apply would refuse for shapes, model
    type or vocabulary; the lineage verdict is in the result (``result.lineage.verdict``).

    Example:
        >>> check_target("user/vector", "./my-instruct-model").lineage.describe()
    """
    folder, _ = resolve_artifact(vector, revision=revision, only=[LINEAGE_FILE])
    manifest = load_manifest(folder)
    if LINEAGE_FILE in manifest["files"]:  # the only artifact file the check reads
        one = {
            "format_version": manifest["format_version"],
            "files": {LINEAGE_FILE: manifest["files"][LINEAGE_FILE]},
        }
        verify_artifact(folder, one)
    ckpt = (
        target
        if isinstance(target, Checkpoint)
        else open_checkpoint(target, revision=target_revision)
    )
    if config_check:
        check_config(ckpt)
    shapes = {n: tuple(i["shape"]) for n, i in manifest["tensors"].items()}
    plan = plan_apply(
        shapes,
        manifest.get("model") or {},
        {n: e.shape for n, e in ckpt.entries.items()},
        ckpt.config,
        vocab=vocab,
        target_tied=ckpt.tie_word_embeddings and "lm_head.weight" not in ckpt.entries,
    )
    report = checkpoint_lineage(read_lineage(folder, manifest), shapes, ckpt)
    return CheckResult(plan=plan, lineage=report)


@dataclass
class CheckResult:
    """What :func:`check_target` found: the apply plan and the lineage figures."""

    plan: ApplyPlan
    lineage: LineageReport


__all__ = ["CheckResult", "check_target"]
