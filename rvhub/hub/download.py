"""Downloads from the Hub: a model checkpoint's safetensors weights and side files, or a
vector artifact (its manifest first, then exactly the files the manifest lists), through
huggingface_hub's cache, and one line for each way the Hub or the network can fail.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..constants import MANIFEST_NAME, SAFE_INDEX, SAFE_SINGLE
from ..errors import InputError
from ..manifest import Manifest, artifact_file
from .errors import hub_error, network_errors

# What a model checkpoint download fetches: weights as safetensors, config and tokenizer.
CHECKPOINT_PATTERNS = [
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "*.model",
    "chat_template.jinja",
    "added_tokens.json",
    "preprocessor_config.json",
]


def download_checkpoint(
    repo_id: str, *, revision: str | None = None, **hub: Any
) -> tuple[Path, dict[str, Any]]:
    """Download a model's safetensors weights and side files; returns (folder, provenance).

    ``hub`` passes huggingface_hub's ``token``, ``cache_dir`` and ``local_files_only`` on.
    """
    from huggingface_hub import snapshot_download

    # The weights transformers' from_pretrained would load (5.24: model.safetensors, else the
    # index and the shards it names), and only those: a stale index or leftover shards beside
    # model.safetensors are not downloaded.
    first = [*CHECKPOINT_PATTERNS, SAFE_SINGLE, SAFE_INDEX]
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=first, **hub))
        if not (folder / SAFE_SINGLE).is_file():
            shards = ["*.safetensors"]
            if (folder / SAFE_INDEX).is_file():
                try:
                    weight_map = json.loads((folder / SAFE_INDEX).read_text())["weight_map"]
                    shards = sorted({str(v) for v in dict(weight_map).values()})
                except (ValueError, KeyError, TypeError):
                    shards = []  # open_local_checkpoint names the broken index
                for shard in shards:  # no ../ or absolute names
                    if Path(shard).is_absolute() or ".." in Path(shard).parts or "\\" in shard:
                        raise InputError(f"{repo_id}: {SAFE_INDEX} names {shard!r}; refusing it")
            if shards:
                snapshot_download(repo_id, revision=revision, allow_patterns=shards, **hub)
    except network_errors() as e:
        raise hub_error(e, repo_id, revision) from None
    if not any(folder.glob("*.safetensors")):
        raise InputError(
            f"{repo_id} has no safetensors weights (only pickle .bin files?); rvhub refuses "
            "pickles: convert the model with save_pretrained(safe_serialization=True) and push it"
        )
    info = {
        "kind": "hub",
        "repo_id": repo_id,
        "revision": folder.name,  # snapshot folders are named by commit sha
        "requested_revision": revision or "main",
    }
    return folder, info


def download_vector_snapshot(
    repo_id: str, *, revision: str | None = None, only: list[str] | None = None, **hub: Any
) -> tuple[Path, dict[str, Any]]:
    """Download a vector repo: its manifest first, then exactly the files it lists; returns
    (snapshot folder, provenance). ``only``: of the listed files, just these, and not the card
    (``rvhub check`` and ``rvhub search`` fetch ``rvhub.json`` and ``lineage.safetensors``
    alone). ``hub``: huggingface_hub's ``token``, ``cache_dir``, ``local_files_only``."""
    from huggingface_hub import snapshot_download

    try:
        # snapshot_download asks for the repo's info once and fails at once when the Hub is
        # unreachable; hf_hub_download retried its HEAD request for ~25 s first.
        snapshot = snapshot_download(
            repo_id, revision=revision, allow_patterns=[MANIFEST_NAME], **hub
        )
        manifest_path = Path(snapshot) / MANIFEST_NAME
    except network_errors() as e:
        raise hub_error(e, repo_id, revision) from None
    folder = manifest_path.parent
    if not manifest_path.is_file():
        raise InputError(
            f"{repo_id} lacks a file rvhub needs ({MANIFEST_NAME}): it is not an rvhub vector "
            "(for a model, use it as the target of apply, or as A or B of extract)"
        )
    try:
        data = json.loads(manifest_path.read_text())
    except ValueError:
        raise InputError(f"{repo_id}: {MANIFEST_NAME} is not valid JSON") from None
    names = list(Manifest.from_json(data).files)
    for name in names:
        artifact_file(folder, name)  # refuse ../ and absolute names before fetching anything
    sha = folder.name
    side = ["README.md", "*.png"]  # the card, for a full download (apply, inspect, card)
    if only is not None:  # a check or a search: what it reads, nothing else
        names, side = [n for n in names if n in only], []
    try:
        snapshot_download(repo_id, revision=sha, allow_patterns=[*names, *side], **hub)
    except network_errors() as e:
        raise hub_error(e, repo_id, revision) from None
    return folder, {
        "kind": "hub",
        "repo_id": repo_id,
        "revision": sha,
        "requested_revision": revision or "main",
    }
