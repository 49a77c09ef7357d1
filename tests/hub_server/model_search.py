"""``GET /api/models`` and the metadata parts of ``GET /api/models/{id}`` for the stand-in: what
huggingface_hub 2.x's ``list_models`` and ``model_info(expand=...)`` send and read.

Behaviour followed, and where it was read:

- Query parameters as ``HfApi.list_models`` (huggingface_hub 2.4.0, ``hf_api.py``) sends them:
  ``filter`` (repeatable; a model must carry every one among its tags), ``search`` (a
  substring of the id, case-insensitive), ``author`` (the namespace), ``sort`` (``downloads``,
  ``likes``, ``lastModified``, ``createdAt``, ``trendingScore``; descending, as the Hub's
  ``direction=-1`` default), ``limit``, ``expand`` (repeatable), ``full``, ``cardData``.
- Derived tags, as the Hub documents its model tree (quoted in issue 29; not checked against
  the real Hub, which this machine cannot reach): a card's ``base_model`` adds
  ``base_model:<id>`` and ``base_model:<relation>:<id>`` (``base_model_relation``, default
  ``finetune`` for one base); ``library_name`` and ``license`` add ``<library>`` and
  ``license:<id>``; the card's ``tags`` are kept.
- ``baseModels`` as ``ModelInfo`` parses it: ``{"relation": ..., "models": [{"id": ...}]}``.
- ``evalResults``: the entries of the repo's ``.eval_results/*.yaml`` files, each as
  ``{"filename": ..., "data": <entry>}``, the shape ``parse_eval_result_entries``
  (huggingface_hub 2.4.0, ``_eval_results.py``) reads from the API.
- Private repos are listed only for their owner (the Hub's rule; the stand-in's accounts).
- ``downloads``: an assumption, not the Hub's rule read from its source: the stand-in counts
  ``GET``s of ``rvhub.json``, the file a library registration for rvhub would name
  (docs/hub.md).

One page: ``limit`` caps it and no ``Link`` header is sent (huggingface_hub's ``paginate``
stops without one).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from .git_store import REPO_TYPE_DIRS, GitRepo

SORT_KEYS = {"downloads", "likes", "lastModified", "createdAt", "trendingScore"}
DEFAULT_FIELDS = ("id", "author", "downloads", "likes", "tags", "library_name", "private", "sha")


def card_data(repo: GitRepo, sha: str) -> dict[str, Any]:
    """The README's YAML front matter at ``sha`` ({} without one)."""
    raw = repo.read_file(sha, "README.md")
    if not raw:
        return {}
    text = raw.decode("utf-8", errors="replace")
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    try:
        meta = yaml.safe_load(text[3:end]) if end > 0 else None
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def base_models(card: Mapping[str, Any]) -> dict[str, Any] | None:
    """``baseModels`` from a card: the relation and the base ids."""
    named = card.get("base_model")
    ids = [named] if isinstance(named, str) else [x for x in named or [] if isinstance(x, str)]
    if not ids:
        return None
    relation = card.get("base_model_relation") or ("finetune" if len(ids) == 1 else "merge")
    return {"relation": relation, "models": [{"id": i} for i in ids]}


def derived_tags(card: Mapping[str, Any]) -> list[str]:
    tags = [t for t in card.get("tags") or [] if isinstance(t, str)]
    if isinstance(card.get("library_name"), str):
        tags.append(card["library_name"])
    if isinstance(card.get("license"), str):
        tags.append(f"license:{card['license']}")
    bases = base_models(card)
    for model in bases["models"] if bases else []:
        tags += [f"base_model:{model['id']}", f"base_model:{bases['relation']}:{model['id']}"]
    return list(dict.fromkeys(tags))


def eval_results(repo: GitRepo, sha: str) -> list[dict[str, Any]]:
    out = []
    for path in sorted(repo.tree(sha)):
        if not (path.startswith(".eval_results/") and path.endswith((".yaml", ".yml"))):
            continue
        try:
            entries = yaml.safe_load(repo.read_file(sha, path) or b"") or []
        except yaml.YAMLError:
            out.append({"filename": path, "error": "invalid YAML"})
            continue
        out += [{"filename": path, "data": e} for e in entries if isinstance(e, dict)]
    return out


def model_entry(repo_id: str, repo: GitRepo, downloads: int) -> dict[str, Any] | None:
    """Everything the listing can return about one model repo (None for an empty repo)."""
    sha = repo.branch_head("main")
    if sha is None:
        return None
    card = card_data(repo, sha)
    log = repo.log(sha)
    return {
        "_id": repo_id,
        "id": repo_id,
        "modelId": repo_id,
        "author": repo_id.split("/", 1)[0],
        "sha": sha,
        "private": repo.get_setting("private") == "true",
        "downloads": downloads,
        "likes": 0,
        "trendingScore": downloads,
        "tags": derived_tags(card),
        "library_name": card.get("library_name"),
        "cardData": card,
        "baseModels": base_models(card),
        "evalResults": eval_results(repo, sha),
        "lastModified": log[0].get("date") if log else None,
        "createdAt": log[-1].get("date") if log else None,
    }


def list_models(
    repos_dir: Path,
    query: Mapping[str, list[str]],
    *,
    repo_of: Callable[[str], GitRepo],
    visible: Callable[[str, bool], bool],
    downloads: Callable[[str], int],
) -> list[dict[str, Any]]:
    """The ``/api/models`` answer for ``query`` (``parse_qs`` output)."""
    root = Path(repos_dir) / REPO_TYPE_DIRS["model"]
    ids = sorted(f"{o.name}/{n.name}" for o in root.glob("*") for n in o.glob("*") if n.is_dir())
    entries = [e for i in ids if (e := model_entry(i, repo_of(i), downloads(i))) is not None]
    entries = [e for e in entries if visible(e["id"], e["private"])]
    for tag in _values(query, "filter"):
        entries = [e for e in entries if tag in e["tags"] or tag == e["id"]]
    for author in _values(query, "author")[:1]:
        entries = [e for e in entries if e["author"] == author]
    for text in _values(query, "search")[:1]:
        entries = [e for e in entries if text.lower() in e["id"].lower()]
    for key in _values(query, "sort")[:1]:
        if key in SORT_KEYS:
            entries.sort(key=lambda e: (e.get(key) is not None, e.get(key) or 0), reverse=True)
    for limit in _values(query, "limit")[:1]:
        entries = entries[: max(0, int(limit))]
    return [_fields(e, query) for e in entries]


def _values(query: Mapping[str, list[str]], key: str) -> list[str]:
    return [*query.get(key, []), *query.get(f"{key}[]", [])]


def _fields(entry: Mapping[str, Any], query: Mapping[str, list[str]]) -> dict[str, Any]:
    expand = _values(query, "expand")
    if expand:
        keep: Iterable[str] = ["id", *expand]
    else:
        keep = list(DEFAULT_FIELDS)
        if _values(query, "full") or _values(query, "cardData"):
            keep = [*keep, "cardData", "lastModified", "createdAt"]
    return {"_id": entry["id"], **{k: entry[k] for k in keep if k in entry}}
