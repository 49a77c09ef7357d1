"""Where a model sits in the Hub's model tree: its ``base_model`` ancestors, read from Hub
metadata (the card's ``base_model``, or ``ModelInfo.base_models``), and the lineage root two
fine-tunes share (what a vector's card declares as its ``base_model``).

Best effort and bounded: a model whose metadata cannot be read (offline, private, missing)
ends its branch; at most ``MAX_DEPTH`` generations are walked.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

logger = logging.getLogger("rvhub")

MAX_DEPTH = 8


def parents(repo_id: str, *, api: Any, revision: str | None = None) -> list[str]:
    """The ``base_model`` ids ``repo_id``'s Hub metadata names (empty when none or unreadable)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return []
    try:
        info = api.model_info(repo_id, revision=revision, expand=["cardData", "baseModels"])
    except Exception as e:  # offline, private, gone: this branch of the tree ends here
        logger.info("no Hub metadata for %s: %s", repo_id, str(e).splitlines()[:1])
        return []
    found: list[str] = []
    card = getattr(info, "card_data", None)
    named = card.get("base_model") if card is not None else None
    for value in [named] if isinstance(named, str) else named or []:
        if isinstance(value, str) and value and value not in found:
            found.append(value)
    base_models = getattr(info, "base_models", None) or {}
    for model in base_models.get("models", []) if isinstance(base_models, dict) else []:
        value = model.get("id") if isinstance(model, dict) else None
        if isinstance(value, str) and value and value not in found:
            found.append(value)
    return [f for f in found if f != repo_id]


def ancestors(repo_id: str, *, api: Any, revision: str | None = None) -> Iterator[str]:
    """``repo_id``'s ancestors, nearest first (breadth first, each once)."""
    seen = {repo_id}
    level = [(repo_id, revision)]
    for _ in range(MAX_DEPTH):
        nxt: list[tuple[str, str | None]] = []
        for node, rev in level:
            for parent in parents(node, api=api, revision=rev):
                if parent not in seen:
                    seen.add(parent)
                    nxt.append((parent, None))
                    yield parent
        if not nxt:
            return
        level = nxt


def shared_root(
    a: str, b: str, *, api: Any, revision_a: str | None = None, revision_b: str | None = None
) -> str | None:
    """The nearest model both ``a`` and ``b`` descend from, other than ``a`` and ``b``
    themselves (RL run from the SFT model: their shared root is the SFT model's base, which
    is what the vector's targets descend from); None when the metadata names none."""
    of_a = [a, *ancestors(a, api=api, revision=revision_a)]
    shared = set(of_a)
    for node in [b, *ancestors(b, api=api, revision=revision_b)]:
        if node in shared and node not in (a, b):
            return node
    return None


__all__ = ["MAX_DEPTH", "ancestors", "parents", "shared_root"]
