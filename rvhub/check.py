"""``check_target``: does a vector fit a model, and does the model descend from its base?

Runs the pre-flight every apply runs (:func:`rvhub.ops.prepare.prepare_apply`, the same
checks in the same order with the same messages), reading only what that needs: the manifest,
the hash-checked lineage fingerprint, the target's safetensors headers and a few values per
tensor. It imports no torch, so ``rvhub check`` answers in well under a second.

Every artifact file already on this machine (all of them for a local vector) is checked
against its digest, as ``load_vector`` checks it before an apply: a vector an apply would
refuse as damaged is refused here too. A Hub vector's weights are not downloaded for a check.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .checkpoint import Checkpoint, check_config
from .constants import LINEAGE_FILE
from .hub.resolve import open_checkpoint, resolve_artifact
from .lineage import LineageReport, read_lineage
from .manifest import Manifest, artifact_file, verify_artifact
from .ops.plan import ApplyPlan
from .ops.prepare import ApplyTarget, VectorFacts, prepare_apply
from .options import ApplyOptions, either


def check_target(
    vector: str | os.PathLike[str],
    target: str | os.PathLike[str] | Checkpoint,
    *,
    revision: str | None = None,
    target_revision: str | None = None,
    vocab: str = "strict",
    config_check: bool = True,
    allow_unrelated: bool = False,
    options: ApplyOptions | None = None,
) -> CheckResult:
    """Whether ``vector`` fits ``target``: raises exactly what an apply would raise before
    writing (model type, shapes, vocabulary, lineage, non-finite deltas), else returns the
    plan and the lineage figures.

    ``options`` (an :class:`~rvhub.options.ApplyOptions`) replaces ``vocab`` and
    ``allow_unrelated`` to check one particular apply.

    Example:
        >>> check_target("user/vector", "./my-instruct-model").lineage.describe()
    """
    options = either(options, ApplyOptions(vocab=vocab, allow_unrelated=allow_unrelated))
    folder, _ = resolve_artifact(vector, revision=revision, only=[LINEAGE_FILE])
    manifest = Manifest.read(folder)
    present = [n for n in manifest.files if artifact_file(folder, n).is_file()]
    verify_artifact(folder, manifest.only(present))  # what an apply's load would refuse
    ckpt = (
        target
        if isinstance(target, Checkpoint)
        else open_checkpoint(target, revision=target_revision)
    )
    if config_check:
        check_config(ckpt)
    facts = VectorFacts(
        manifest.shapes, manifest.model, manifest, read_lineage(folder, manifest), source=None
    )
    prepared = prepare_apply(facts, ApplyTarget.of_checkpoint(ckpt), options)
    absent = [n for n in manifest.files if n not in present]
    return CheckResult(
        plan=prepared.plan, lineage=prepared.lineage, verified=present, absent=absent
    )


@dataclass
class CheckResult:
    """What :func:`check_target` found: the apply plan and the lineage figures."""

    plan: ApplyPlan
    lineage: LineageReport
    verified: list[str] = field(default_factory=list)  # artifact files checked against digests
    absent: list[str] = field(default_factory=list)  # not downloaded: an apply checks them


__all__ = ["CheckResult", "check_target"]
