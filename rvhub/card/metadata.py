"""A card's Hub metadata: the YAML front matter (``library_name: rvhub``, tags, ``base_model``,
``license``, ``model-index`` with one result per benchmark and condition), and reading and
writing front matter.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from ..constants import CARD_NAME
from ..errors import InputError
from ..manifest import Manifest, looks_local
from .scores import CONDITION_LABELS, CONDITIONS, Scores

logger = logging.getLogger("rvhub")

TAGS = ("rvhub", "reasoning-vector", "task-arithmetic")


def model_index(name: str, scores: Scores | None) -> list[dict[str, Any]]:
    """The Hub's ``model-index``: one result per benchmark and condition (empty without scores).

    The condition is named in each metric's ``name`` (``"exact_match (+vector)"``), so the Hub
    lists baseline, +vector and −vector side by side.
    """
    if not scores:
        return []
    results = []
    for bench in scores.benchmarks:
        for condition in CONDITIONS:
            if condition not in bench.values:
                continue
            dataset: dict[str, Any] = {"name": bench.dataset_name, "type": bench.dataset_id}
            for key, value in (
                ("config", bench.dataset_config),
                ("split", bench.dataset_split),
                ("revision", bench.dataset_revision),
                ("args", bench.dataset_args),
            ):
                if value is not None:
                    dataset[key] = value
            result: dict[str, Any] = {
                "task": {"type": bench.task_type},
                "dataset": dataset,
                "metrics": [
                    {
                        "type": bench.metric_type,
                        "value": bench.values[condition],
                        "name": f"{bench.metric_name} ({CONDITION_LABELS[condition]})",
                    }
                ],
            }
            if scores.source_name and scores.source_url:
                result["source"] = {"name": scores.source_name, "url": scores.source_url}
            results.append(result)
    return [{"name": name, "results": results}]


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def is_local_name(name: str) -> bool:
    """Whether a model name is a local path (absolute, relative with ``.``/``~``, existing
    here, or not shaped like a Hub id ``org/name``) rather than a Hub id."""
    return not HUB_ID.fullmatch(name) or looks_local(name)


def public_model(name: str | None, *, local: bool | None = None) -> tuple[str | None, bool]:
    """``(what a published card may call a model, whether it is local)``: a Hub id as it is; a
    local path by its folder name only (a card never publishes the user's paths)."""
    if not name:
        return None, False
    if local is None:
        local = is_local_name(name)
    return (Path(name).name or name if local else name), local


def lineage_root(manifest: Manifest, override: str | None = None) -> str | None:
    """The Hub id a card declares as ``base_model``: ``override``, else the root recorded at
    extract; None when unknown or a local path."""
    root = override or (manifest.base_model.repo_id if manifest.base_model else None)
    return root if root and not is_local_name(root) else None


def hub_sources(manifest: Manifest) -> list[str]:
    """The Hub ids of the vector's sources (A, B), for ``base_model``."""
    out = []
    for role in ("a", "b"):
        record = manifest.sources.get(role)
        repo_id = record.repo_id if record is not None and record.kind == "hub" else None
        if repo_id and repo_id not in out:
            out.append(repo_id)
    return out


def local_source_license(path: str | os.PathLike[str]) -> str | None:
    """The ``license`` in a local model folder's README front matter, if any."""
    readme = Path(path) / CARD_NAME
    try:
        text = readme.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    meta = split_front_matter(text)[0]
    value = meta.get("license") if meta else None
    return value if isinstance(value, str) and value else None


def carried_license(licenses: Mapping[str, str | None]) -> str | None:
    """The sources' license when every known one agrees (the vector derives from all of them)."""
    known = {v for v in licenses.values() if v}
    if len(known) == 1:
        return known.pop()
    if len(known) > 1:
        logger.warning(
            "the sources have different licenses (%s); the card names none: pass `license`",
            ", ".join(sorted(known)),
        )
    return None


def card_metadata(
    manifest: Manifest,
    *,
    name: str,
    scores: Scores | None = None,
    license: str | None = None,
    base_model: str | None = None,
) -> dict[str, Any]:
    """The card's YAML front matter as a dict (Hub keys, in the Hub's spelling).

    ``base_model`` is the vector's lineage root (:func:`lineage_root`), declared with
    ``base_model_relation: adapter`` so the Hub lists the vector in that model's tree, where the
    models it fits are; A and B are named in the card's body, not here (a list of base models
    reads as a merge on the Hub)."""
    meta: dict[str, Any] = {"library_name": "rvhub"}
    if license:
        meta["license"] = license
    tags = [*TAGS, manifest.encoding]
    meta["tags"] = tags
    if base_model:
        meta["base_model"] = base_model
        meta["base_model_relation"] = "adapter"
    index = model_index(name, scores)
    if index:
        meta["model-index"] = index
    return meta


def split_front_matter(text: str) -> tuple[dict[str, Any] | None, str]:
    """``(metadata, body)`` of a Markdown card; metadata is None without front matter."""
    m = re.match(r"\A---\s*\n(.*?\n)?---\s*(?:\n|\Z)", text, flags=re.S)
    if not m:
        return None, text
    try:
        meta = yaml.safe_load(m.group(1) or "") or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 2}" if mark is not None else ""
        raise InputError(
            f"the card's YAML front matter{where} is invalid: {getattr(e, 'problem', e)}"
        ) from None
    if not isinstance(meta, dict):
        raise InputError("the card's YAML front matter must be a mapping")
    return meta, text[m.end() :]


def dump_front_matter(meta: Mapping[str, Any]) -> str:
    """``meta`` as a card's ``---``-fenced YAML front matter (keys in the given order)."""
    return "---\n" + yaml.safe_dump(dict(meta), sort_keys=False, allow_unicode=True) + "---\n"
