"""rvhub: extract, compress, publish and apply reasoning vectors.

A reasoning vector is the weight difference between two fine-tunes of one base model
(``v = θ_RL − θ_SFT``); adding ``α·v`` to a compatible model transfers what it encodes.

Example:
    >>> from rvhub import extract_vector, load_vector
    >>> extract_vector("org/qwen-grpo", "org/qwen-sft").save("./reasoning-vector")
    >>> load_vector("./reasoning-vector").apply_to(model, scale=1.0)

Names are imported on first use (as huggingface_hub's ``__init__`` does), so ``import rvhub``
and ``rvhub --help`` do not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

# public name -> the module that defines it
_LAZY = {
    "ApplyOptions": "rvhub.options",
    "HubOptions": "rvhub.options",
    "LoraOptions": "rvhub.options",
    "WriteOptions": "rvhub.options",
    "Manifest": "rvhub.manifest",
    "ApplyReport": "rvhub.ops.plan",
    "Checkpoint": "rvhub.checkpoint",
    "CompatibilityError": "rvhub.errors",
    "HubError": "rvhub.errors",
    "InputError": "rvhub.errors",
    "IntegrityError": "rvhub.errors",
    "PushResult": "rvhub.hub.push",
    "ReasoningVector": "rvhub.vector",
    "RvhubError": "rvhub.errors",
    "Scores": "rvhub.card.scores",
    "apply_to_checkpoint": "rvhub.vector",
    "check_target": "rvhub.check",
    "combine": "rvhub.vector",
    "compress_vector": "rvhub.vector",
    "download_vector": "rvhub.vector",
    "extract_vector": "rvhub.vector",
    "load_scores": "rvhub.card.scores",
    "load_vector": "rvhub.vector",
    "merge_vectors": "rvhub.vector",
    "open_checkpoint": "rvhub.hub.resolve",
    "push_vector": "rvhub.hub.push",
    "render_card": "rvhub.card.render",
    "search_vectors": "rvhub.search",
}

__all__ = [
    "ApplyOptions",
    "ApplyReport",
    "Checkpoint",
    "CompatibilityError",
    "HubError",
    "HubOptions",
    "InputError",
    "IntegrityError",
    "LoraOptions",
    "Manifest",
    "PushResult",
    "ReasoningVector",
    "RvhubError",
    "Scores",
    "WriteOptions",
    "__version__",
    "apply_to_checkpoint",
    "check_target",
    "combine",
    "compress_vector",
    "download_vector",
    "extract_vector",
    "load_scores",
    "load_vector",
    "merge_vectors",
    "open_checkpoint",
    "push_vector",
    "render_card",
    "search_vectors",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'rvhub' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:  # what type checkers and IDEs see
    from .card.render import render_card
    from .card.scores import Scores, load_scores
    from .check import check_target
    from .checkpoint import Checkpoint
    from .errors import CompatibilityError, HubError, InputError, IntegrityError, RvhubError
    from .hub.push import PushResult, push_vector
    from .hub.resolve import open_checkpoint
    from .manifest import Manifest
    from .ops.plan import ApplyReport
    from .options import ApplyOptions, HubOptions, LoraOptions, WriteOptions
    from .search import search_vectors
    from .vector import (
        ReasoningVector,
        apply_to_checkpoint,
        combine,
        compress_vector,
        download_vector,
        extract_vector,
        load_vector,
        merge_vectors,
    )
