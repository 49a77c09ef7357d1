"""Publishing a vector: the model card, and every file of the artifact in one commit."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .._version import __version__
from ..card.build import build_card, check_card
from ..card.metadata import split_front_matter
from ..card.plot import norms_plot
from ..card.render import Card, card_extra_files
from ..card.scores import Scores
from ..constants import CARD_NAME, MANIFEST_NAME
from ..errors import HubError, InputError, RvhubError
from ..manifest import Manifest, artifact_file, published, verify_artifact
from .errors import TOKEN_HELP, network_errors, push_error
from .resolve import parse_hub_id

logger = logging.getLogger("rvhub")


# Files an earlier push may have left that the artifact being pushed no longer has (another
# shard count, another encoding): deleted in the same commit so the repo equals the artifact.
ARTIFACT_PATTERNS = (
    "vector.safetensors",
    "vector-*-of-*.safetensors",
    "vector.safetensors.index.json",
    "adapter_config.json",
    "adapter_model.safetensors",
    "lineage.safetensors",
)


@dataclass(frozen=True)
class PushResult:
    """What :func:`push_vector` did: the commit (or the unchanged head) and where it lives."""

    repo_id: str
    url: str  # the repo (at the branch, when not main)
    commit_sha: str
    commit_url: str
    changed: bool  # False: the Hub already held these exact files, no commit was made
    revision: str  # the branch pushed to
    pr_url: str | None = None


def resolve_token(token: str | None = None) -> str:
    """The token to write with: ``token``, else ``HF_TOKEN``, else the ``hf auth login`` one."""
    if token:
        return token
    from huggingface_hub import get_token

    try:
        found = get_token()
    except Exception as e:  # an OIDC exchange that failed, an unreadable token file
        raise HubError(f"cannot read your Hugging Face token ({e}); {TOKEN_HELP}") from None
    if not found:
        raise HubError(f"no Hugging Face token found: {TOKEN_HELP}")
    return found


def _upload_operations(folder: Path, manifest: Manifest, card: Card) -> list[Any]:
    """One CommitOperationAdd per artifact file, the manifest and the card files.

    A format-1 manifest's sha256 of every file was just checked, so it is handed to
    huggingface_hub instead of being computed a second time; for format 2 (BLAKE3)
    huggingface_hub 2.x computes the LFS sha256 itself, once, lazily and on parallel threads
    (``_commit_api._compute_missing_sha256s``).
    """
    from huggingface_hub import CommitOperationAdd

    ops = []
    for name, record in manifest.files.items():
        op = CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(artifact_file(folder, name)))
        if record.algorithm == "sha256":
            op.upload_info.sha256 = bytes.fromhex(record.digest)
        ops.append(op)
    public = published(manifest.to_json())  # no local path of the user's goes up
    ops.append(
        CommitOperationAdd(
            path_in_repo=MANIFEST_NAME,
            path_or_fileobj=(json.dumps(public, indent=2, ensure_ascii=False) + "\n").encode(),
        )
    )
    for name, data in card.files.items():
        ops.append(CommitOperationAdd(path_in_repo=name, path_or_fileobj=data))
    return ops


def _ready_card(
    card: str | os.PathLike[str] | None,
    path: Path,
    manifest: Manifest,
    card_args: dict[str, Any],
    endpoint: str,
) -> str | None:
    """The text of a ready card to upload (``card``), checked; else None, after rendering the
    card once so a template or metadata error shows before any hashing or request."""
    if card is not None:
        card_path = Path(card).expanduser()
        if not card_path.is_file():
            raise InputError(f"card {card_path}: no such file")
        text = card_path.read_text(encoding="utf-8")
        check_card(text)
        return text
    if (path / CARD_NAME).is_file():
        logger.warning(
            "%s is not uploaded: rvhub renders the card (pass `card=%s` to upload it instead)",
            path / CARD_NAME,
            path / CARD_NAME,
        )
    build_card(
        path,
        manifest,
        **card_args,
        endpoint=endpoint,
        plot=False,
        lookup_licenses=False,
        verify=False,
    )
    return None


def _push_target(
    folder: str | os.PathLike[str], repo_id: str, revision: str | None
) -> tuple[Path, str, str]:
    """The vector folder, the validated repo id and the branch to push to."""
    from huggingface_hub import constants

    path = Path(folder).expanduser()
    if not path.is_dir():
        raise InputError(f"{path}: no such folder (push takes a vector folder made by rvhub)")
    repo_id, _ = parse_hub_id(repo_id, what="push's repo id")
    branch = revision or constants.DEFAULT_REVISION
    if len(branch) == 40 and constants.REGEX_COMMIT_OID.fullmatch(branch):
        raise InputError(f"`revision` {branch} is a commit sha; push to a branch name")
    return path, repo_id, branch


def _verify_and_plot(path: Path, manifest: Manifest) -> bytes | None:
    """Check every file's digest (a damaged artifact is refused before any request) while
    matplotlib imports and draws the norm plot (~1 s) on another thread."""
    with ThreadPoolExecutor(1) as pool:
        plot = pool.submit(norms_plot, manifest.stats.layer_norms)
        verify_artifact(path, manifest, full=True)
        return plot.result()


def _ready_card_files(
    text: str, plot_png: bytes | None, scores: Scores | None, target: str | None
) -> Card:
    """A ready card as uploaded: its text, the norm plot and the scores' ``.eval_results``."""
    meta, _ = split_front_matter(text)
    return Card(
        text=text,
        metadata=meta or {},
        plot_png=plot_png,
        extra_files=card_extra_files(scores, target=target),
    )


def _commit_message(manifest: Manifest) -> str:
    return (
        f"Upload reasoning vector ({manifest.encoding}, {len(manifest.tensors)} tensors) "
        f"with rvhub {__version__}"
    )


def _commit(
    api: Any,
    repo_id: str,
    branch: str,
    operations: list[Any],
    message: str,
    *,
    private: bool,
    create_pr: bool,
) -> tuple[str, Any]:
    """Create the repo and branch where missing, delete the files of an earlier push the
    artifact no longer has, and make one commit; ``(head before, commit info)``."""
    from huggingface_hub import CommitOperationDelete
    from huggingface_hub import errors as hf_errors
    from huggingface_hub.utils import filter_repo_objects

    api.create_repo(repo_id, private=private, exist_ok=True)
    try:
        info = api.model_info(repo_id, revision=branch)
    except hf_errors.RevisionNotFoundError:
        if branch.startswith("refs/"):
            raise InputError(f"{repo_id} has no revision {branch!r}") from None
        api.create_branch(repo_id, branch=branch, exist_ok=True)
        info = api.model_info(repo_id, revision=branch)
    head = info.sha
    assert head is not None
    if private and not getattr(info, "private", True):
        logger.warning("%s already exists and is public; `private` applies to new repos", repo_id)
    uploading = {op.path_in_repo for op in operations}
    remote = [s.rfilename for s in info.siblings or []]  # the file list comes with the info
    stale = [
        f
        for f in filter_repo_objects(remote, allow_patterns=list(ARTIFACT_PATTERNS))
        if f not in uploading
    ]
    operations = [*operations, *(CommitOperationDelete(path_in_repo=f) for f in stale)]
    commit = api.create_commit(
        repo_id,
        operations,
        commit_message=message,
        revision=branch,
        create_pr=create_pr,
        parent_commit=head,
    )
    return head, commit


def _card_for_push(
    card: Card | str | os.PathLike[str] | None,
    path: Path,
    manifest: Manifest,
    card_args: dict[str, Any],
    endpoint: str,
) -> Callable[[str], Card]:
    """Check the card and every file's digest before any request; returns the step that
    gives the card to upload (rendering it may look the sources' licenses up on the Hub)."""
    if isinstance(card, Card):
        check_card(card.text)
        verify_artifact(path, manifest, full=True)
        return lambda token: card
    text = _ready_card(card, path, manifest, card_args, endpoint)
    plot_png = _verify_and_plot(path, manifest)
    if text is not None:
        ready = _ready_card_files(text, plot_png, card_args["scores"], card_args["target"])
        return lambda token: ready
    return lambda token: build_card(
        path,
        manifest,
        **card_args,
        token=token,
        endpoint=endpoint,
        plot=plot_png or False,
        verify=False,  # just checked in full
    )


def push_vector(
    folder: str | os.PathLike[str],
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    token: str | None = None,
    scores: Scores | None = None,
    template: str | os.PathLike[str] | None = None,
    card: Card | str | os.PathLike[str] | None = None,
    license: str | None = None,
    target: str | None = None,
    endpoint: str | None = None,
    base_model: str | None = None,
) -> PushResult:
    """Publish the artifact ``folder`` to the Hub repo ``repo_id`` in one commit.

    Checks every file against its digest in ``rvhub.json`` (and refuses the push on a
    mismatch) before talking to the Hub, renders the model card (``README.md`` + the norm
    plot; ``card=`` uploads a ready card instead: a :class:`rvhub.card.Card` from
    :func:`rvhub.card.build.build_card`, uploaded with its plot and ``.eval_results``, or a README
    file), creates the repo if missing
    (``private``), the branch ``revision`` if missing, and commits the manifest, every listed
    file and the card together (``create_pr`` opens a pull request instead). Files of an
    earlier push that the artifact no longer has are deleted in the same commit. Pushing
    unchanged files makes no commit (``changed`` False). The token is ``token``, else
    ``HF_TOKEN``, else the one saved by ``hf auth login``.

    Example:
        >>> result = push_vector("./reasoning-vector", "user/qwen2.5-1.5b-reasoning-vector")
        >>> print(result.url, result.commit_sha)
    """
    from huggingface_hub import HfApi

    path, repo_id, branch = _push_target(folder, repo_id, revision)
    manifest = Manifest.read(path)
    write_token = resolve_token(token)
    api = HfApi(endpoint=endpoint, token=write_token)
    url_base = api.endpoint.rstrip("/")
    card_args: dict[str, Any] = dict(repo_id=repo_id, scores=scores, template=template)
    card_args.update(license=license, target=target, base_model=base_model)
    render = _card_for_push(card, path, manifest, card_args, url_base)
    failures: tuple[type[BaseException], ...] = (ValueError, *network_errors())
    try:
        rendered = render(write_token)
        message = commit_message or _commit_message(manifest)
        operations = _upload_operations(path, manifest, rendered)
        head, commit = _commit(
            api, repo_id, branch, operations, message, private=private, create_pr=create_pr
        )
    except RvhubError:
        raise
    except failures as e:
        from huggingface_hub import errors as hf_errors

        if isinstance(e, ValueError) and not isinstance(e, hf_errors.HfHubHTTPError):
            raise InputError(f"push to {repo_id} refused: {str(e).splitlines()[0]}") from None
        raise push_error(e, repo_id, url_base, branch) from None
    changed = commit.oid != head or commit.pr_url is not None
    url = f"{url_base}/{repo_id}" + ("" if branch == "main" else f"/tree/{quote(branch, safe='')}")
    return PushResult(
        repo_id=repo_id,
        url=url,
        commit_sha=commit.oid,
        commit_url=commit.commit_url,
        changed=changed,
        revision=branch,
        pr_url=commit.pr_url,
    )
