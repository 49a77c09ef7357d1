"""From what a user types to a local folder: a path, or a Hub id (``org/name[@revision]``)
downloaded through huggingface_hub's cache.

A Hub id is validated by huggingface_hub's own rules before anything is sent, and a revision
is given once: ``org/name@rev`` and ``revision=`` together must agree.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from ..checkpoint import Checkpoint, open_local_checkpoint
from ..errors import InputError
from .download import download_checkpoint, download_vector_snapshot

# The shape of a Hub id, told apart from a path: one slash, no leading . / ~ (validated below).
_HUB_ID_SHAPE = re.compile(r"^[^/\\~.][^/\\]*/[^/\\]+$")


def split_revision(source: str) -> tuple[str, str | None]:
    """``org/name@rev`` -> (``org/name``, ``rev``); local paths never carry a revision."""
    if "@" in source and not Path(source).exists():
        repo, _, rev = source.rpartition("@")
        if repo and rev:
            return repo, rev
    return source, None


def looks_like_hub_id(source: str) -> bool:
    """Whether ``source`` (not an existing path) is written like ``org/name``."""
    return bool(_HUB_ID_SHAPE.match(source))


def parse_hub_id(
    text: str, revision: str | None = None, *, what: str = "Hub id"
) -> tuple[str, str | None]:
    """``(repo_id, revision)`` from ``org/name[@rev]`` and an optional ``revision``.

    Raises :class:`InputError` for an id huggingface_hub would refuse, and for a revision
    given twice with different values.
    """
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    repo_id, rev = split_revision(text)
    if not looks_like_hub_id(repo_id):
        raise InputError(f"{text!r} is not a {what}; write it as user/name or org/name")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        reason = str(e).splitlines()[0].rstrip(".")
        raise InputError(f"{repo_id!r} is not a valid {what}: {reason}") from None
    if rev and revision and rev != revision:
        raise InputError(
            f"{text} names revision {rev!r} but `revision` says {revision!r}; give one of them"
        )
    return repo_id, revision or rev


def _hub_kwargs(
    token: str | bool | None, cache_dir: str | os.PathLike[str] | None, local_files_only: bool
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if token is not None:
        out["token"] = token
    if cache_dir is not None:
        out["cache_dir"] = str(cache_dir)
    if local_files_only:
        out["local_files_only"] = True
    return out


def _local_path(text: str, revision: str | None, what: str) -> Path | None:
    path = Path(text).expanduser()
    if not path.exists():
        return None
    if revision:
        raise InputError(f"`revision` applies to Hub ids, but {what} {text} is a local path")
    return path


def open_checkpoint(
    source: str | os.PathLike[str],
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
) -> Checkpoint:
    """Open a checkpoint from a local folder or file, or a Hub id (``org/name[@revision]``).

    Only safetensors weights and small side files (config, tokenizer) are downloaded from the
    Hub; the resolved commit sha is recorded in ``checkpoint.source``.

    Example:
        >>> ckpt = open_checkpoint("./my-model")
        >>> ckpt.get("model.embed_tokens.weight").shape
    """
    text = str(source)
    path = _local_path(text, revision, "the model")
    if path is not None:
        return open_local_checkpoint(path)
    repo_id, rev = split_revision(text)
    if not looks_like_hub_id(repo_id):
        raise InputError(f"{text}: no such file or folder, and not a Hub id (org/name)")
    repo_id, rev = parse_hub_id(text, revision)
    folder, info = download_checkpoint(
        repo_id, revision=rev, **_hub_kwargs(token, cache_dir, local_files_only)
    )
    ckpt = open_local_checkpoint(folder)
    ckpt.source = info
    return ckpt


def resolve_artifact(
    source: str | os.PathLike[str],
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
    only: list[str] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """A local folder for a vector ``source`` (downloading a Hub id) and where it came from.

    ``only``: of the files the manifest lists, download just these (those present)."""
    text = str(source)
    path = _local_path(text, revision, "the vector")
    if path is not None:
        if not path.is_dir():
            raise InputError(f"{path} is a file; a vector is a folder holding rvhub.json")
        return path, {"kind": "local", "path": str(path.resolve())}
    repo_id, rev = split_revision(text)
    if not looks_like_hub_id(repo_id):
        raise InputError(f"{text}: no such folder, and not a Hub id (user/name)")
    repo_id, rev = parse_hub_id(text, revision)
    return download_vector_snapshot(
        repo_id, revision=rev, only=only, **_hub_kwargs(token, cache_dir, local_files_only)
    )
