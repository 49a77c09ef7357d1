"""rvhub: extract, compress, publish and apply reasoning vectors.

A reasoning vector is the weight difference between two fine-tunes of one base model
(``v = θ_RL − θ_SFT``); adding ``α·v`` to a compatible model transfers what it encodes.

Example:
    >>> from rvhub import extract_vector, load_vector
    >>> extract_vector("org/qwen-grpo", "org/qwen-sft").save("./reasoning-vector")
    >>> load_vector("./reasoning-vector").apply_to(model, scale=1.0)
"""

from __future__ import annotations

__version__ = "0.1.0"

from .apply import ApplyReport, apply_to_checkpoint
from .card import Scores, load_scores, render_card
from .checkpoint import Checkpoint, open_checkpoint
from .errors import (
    CompatibilityError,
    HubError,
    InputError,
    IntegrityError,
    RvhubError,
)
from .extract import extract_vector
from .hub import PushResult, push_vector
from .load import load_vector
from .vector import ReasoningVector

__all__ = [
    "ApplyReport",
    "Checkpoint",
    "CompatibilityError",
    "HubError",
    "InputError",
    "IntegrityError",
    "PushResult",
    "ReasoningVector",
    "RvhubError",
    "Scores",
    "__version__",
    "apply_to_checkpoint",
    "extract_vector",
    "load_scores",
    "load_vector",
    "open_checkpoint",
    "push_vector",
    "render_card",
]
