"""``search_vectors``: which rvhub vectors on the Hub fit a model, and what they did.

A vector's card declares its lineage root as ``base_model`` (an adapter); the Hub derives the
tag ``base_model:adapter:<root>`` from it. So: walk MODEL up its ``base_model`` chain, list the
rvhub models carrying that tag for MODEL or any ancestor, and check each candidate as
``rvhub check`` does, reading its ``rvhub.json`` and ``lineage.safetensors`` only (never its
weights): model type always; shapes, vocabulary and the lineage distance when the target's
files are on this machine (a local folder, or in the Hub cache). The per-task Δ comes from the
candidate's ``.eval_results`` (the best reported α against α = 0), else its card's
``model-index`` (+vector minus baseline).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint import Checkpoint
from .errors import HubError, InputError, RvhubError
from .hub.lineage import ancestors
from .hub.resolve import looks_like_hub_id, open_checkpoint, split_revision

LIBRARY = "rvhub"


@dataclass
class VectorMatch:
    """One vector found for a model: where it is, what it is, what it did, whether it fits."""

    repo_id: str
    revision: str | None
    base_model: str  # the ancestor of the model it is listed under
    encoding: str | None = None
    size: int | None = None
    downloads: int | None = None
    # "task metric" -> best reported value minus the baseline, and the α it was reported at
    deltas: dict[str, float] = field(default_factory=dict)
    best_scales: dict[str, float] = field(default_factory=dict)
    fits: bool | None = None  # None: not checked (the target's files are not here)
    reason: str = ""

    def metric(self, task: str | None) -> str | None:
        """The first metric whose name contains ``task`` (the first of any without one)."""
        return next((n for n in self.deltas if task is None or task.lower() in n.lower()), None)

    def delta(self, task: str | None) -> float | None:
        """The Δ of :meth:`metric` (None when no metric matches)."""
        name = self.metric(task)
        return None if name is None else self.deltas[name]

    def as_json(self) -> dict[str, Any]:
        return {
            "repo_id": self.repo_id,
            "revision": self.revision,
            "base_model": self.base_model,
            "encoding": self.encoding,
            "size": self.size,
            "downloads": self.downloads,
            "deltas": self.deltas,
            "best_scales": self.best_scales,
            "fits": self.fits,
            "reason": self.reason,
        }


def search_vectors(
    model: str | os.PathLike[str],
    *,
    task: str | None = None,
    token: str | bool | None = None,
    endpoint: str | None = None,
    limit: int = 100,
) -> list[VectorMatch]:
    """The rvhub vectors on the Hub that were made for ``model``'s lineage, checked against it.

    ``model`` is a Hub id or a local model folder (its card's ``base_model`` and config's
    ``_name_or_path`` place it in the tree). Sorted by ``task``'s Δ when given (best first),
    else by downloads. Needs the Hub (refused with ``HF_HUB_OFFLINE=1``).

    Example:
        >>> for m in search_vectors("Qwen/Qwen2.5-1.5B-Instruct", task="gsm8k"):
        ...     print(m.repo_id, m.delta("gsm8k"), m.fits, m.reason)
    """
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        raise HubError("searching needs the Hub: unset HF_HUB_OFFLINE")
    api = HfApi(endpoint=endpoint, token=token)
    lineage, target = _lineage_of(model, api)
    found: dict[str, VectorMatch] = {}
    for base in lineage:
        for info in _listed(api, base, limit):
            if info.id not in found:
                found[info.id] = _match(info, base)
    for match in found.values():
        _check(match, target, model, api)
    key = (
        (lambda m: m.delta(task) if m.delta(task) is not None else float("-inf"))
        if task
        else (lambda m: m.downloads or 0)
    )
    return sorted(found.values(), key=lambda m: (m.fits is not False, key(m)), reverse=True)


def _lineage_of(model: str | os.PathLike[str], api: Any) -> tuple[list[str], Checkpoint | None]:
    """``model``'s own id (when a Hub id) and its ancestors, nearest first; and its checkpoint
    when its files are on this machine (a folder, or the Hub cache)."""
    text = str(model)
    if Path(text).expanduser().is_dir():
        ckpt = open_checkpoint(Path(text).expanduser())
        named = _local_names(Path(text).expanduser(), ckpt)
        if not named:
            raise InputError(
                f"{text}: a local model whose card and config name no Hub model; search for the "
                "Hub id it was made from (its base model)"
            )
        out: list[str] = []
        for name in named:
            out += [name, *ancestors(name, api=api)]
        return list(dict.fromkeys(out)), ckpt
    repo_id, revision = split_revision(text)
    if not looks_like_hub_id(repo_id):
        raise InputError(f"{text}: no such folder, and not a Hub id (org/name)")
    cached: Checkpoint | None
    try:
        cached = open_checkpoint(text, local_files_only=True)  # only when already in the cache
    except RvhubError:
        cached = None
    return [repo_id, *ancestors(repo_id, api=api, revision=revision)], cached


def _local_names(folder: Path, ckpt: Checkpoint) -> list[str]:
    from .card.metadata import split_front_matter

    names: list[str] = []
    readme = folder / "README.md"
    if readme.is_file():
        meta, _ = split_front_matter(readme.read_text(encoding="utf-8", errors="replace"))
        value = (meta or {}).get("base_model")
        names += (
            [value] if isinstance(value, str) else [v for v in value or [] if isinstance(v, str)]
        )
    origin = ckpt.config.get("_name_or_path") if isinstance(ckpt.config, Mapping) else None
    if isinstance(origin, str) and looks_like_hub_id(origin) and not Path(origin).exists():
        names.append(origin)
    return list(dict.fromkeys(names))


def _listed(api: Any, base: str, limit: int) -> Iterable[Any]:
    from huggingface_hub import errors as hf_errors

    try:
        return list(
            api.list_models(
                filter=[f"base_model:adapter:{base}", LIBRARY],
                expand=["cardData", "downloads", "sha", "library_name", "evalResults"],
                limit=limit,
            )
        )
    except (hf_errors.HfHubHTTPError, OSError) as e:
        raise HubError(f"the Hub's model search failed: {str(e).splitlines()[0]}") from None


def _match(info: Any, base: str) -> VectorMatch:
    match = VectorMatch(info.id, getattr(info, "sha", None), base)
    match.downloads = getattr(info, "downloads", None)
    card = info.card_data.to_dict() if getattr(info, "card_data", None) is not None else {}
    match.deltas, match.best_scales = eval_deltas(getattr(info, "eval_results", None) or [])
    if not match.deltas:
        match.deltas = card_deltas(card)
        match.best_scales = dict.fromkeys(match.deltas, 1.0)
    return match


_POINT = re.compile(
    r"^(?P<label>.*?): .* (?:(?P<alone>alone)|(?P<sign>[+−]) (?P<scale>[0-9.e+-]+)·v)"
)


def eval_deltas(entries: Iterable[Any]) -> tuple[dict[str, float], dict[str, float]]:
    """From a vector's ``.eval_results`` entries (rvhub writes the metric and α in ``notes``:
    ``"exact match: org/model + 0.5·v (rvhub eval)"``): per task and metric, the best
    reported value minus the α = 0 one, and the α it was reported at."""
    points: dict[str, dict[float, float]] = {}
    for entry in entries:
        m = _POINT.match(str(getattr(entry, "notes", "") or ""))
        value = getattr(entry, "value", None)
        if m is None or not isinstance(value, (int, float)):
            continue
        scale = 0.0 if m["alone"] else float(m["scale"]) * (-1.0 if m["sign"] == "−" else 1.0)
        points.setdefault(f"{entry.task_id} {m['label']}", {})[scale] = float(value)
    deltas, best = {}, {}
    for key, by_scale in points.items():
        if 0.0 not in by_scale:
            continue
        scale = max(by_scale, key=lambda a: (by_scale[a], -abs(a)))
        deltas[key], best[key] = by_scale[scale] - by_scale[0.0], scale
    return deltas, best


def card_deltas(card: Mapping[str, Any]) -> dict[str, float]:
    """``{"<dataset> <metric>": +vector − baseline}`` from an rvhub card's ``model-index``
    (each metric's name carries its condition: ``"exact match (+vector)"``)."""
    values: dict[tuple[str, str], dict[str, float]] = {}
    for entry in card.get("model-index") or []:
        for result in entry.get("results") or [] if isinstance(entry, dict) else []:
            dataset = (result.get("dataset") or {}).get("name") or ""
            for metric in result.get("metrics") or []:
                name, value = str(metric.get("name") or ""), metric.get("value")
                base, _, cond = name.rpartition(" (")
                if not isinstance(value, (int, float)) or not base:
                    continue
                values.setdefault((dataset, base), {})[cond.rstrip(")")] = float(value)
    return {
        f"{dataset} {metric}".strip(): v["+vector"] - v["baseline"]
        for (dataset, metric), v in values.items()
        if "+vector" in v and "baseline" in v
    }


def _check(match: VectorMatch, target: Checkpoint | None, model: Any, api: Any) -> None:
    """Fill ``fits``/``reason`` and the artifact facts from its manifest and fingerprint."""
    from .check import check_target
    from .hub.resolve import resolve_artifact
    from .manifest import Manifest

    spec = f"{match.repo_id}@{match.revision}" if match.revision else match.repo_id
    try:
        folder, _ = resolve_artifact(spec, only=["lineage.safetensors"])
        manifest = Manifest.read(folder)
    except RvhubError as e:
        match.fits, match.reason = False, str(e)
        return
    match.encoding, match.size = manifest.encoding, manifest.nbytes
    try:
        if target is not None:
            result = check_target(folder, target)  # the files just fetched, not a second fetch
            match.fits, match.reason = True, result.lineage.describe()
            return
        config = _hub_config(api, str(model))
        from .ops.prepare import check_model_type

        check_model_type(manifest.model, config)
        match.reason = "model type matches; shapes and lineage not checked (target not here)"
    except RvhubError as e:
        match.fits, match.reason = False, str(e)


def _hub_config(api: Any, model: str) -> dict[str, Any]:
    import json

    from huggingface_hub import hf_hub_download

    repo_id, revision = split_revision(model)
    try:
        path = hf_hub_download(repo_id, "config.json", revision=revision, endpoint=api.endpoint)
        data = json.loads(Path(path).read_text())
    except Exception as e:  # no config: nothing to compare
        raise InputError(f"{model} has no readable config.json ({e})".splitlines()[0]) from None
    return data if isinstance(data, dict) else {}


__all__ = ["VectorMatch", "card_deltas", "search_vectors"]
