"""Building the card a vector is published with: the options a card takes
(:class:`CardOptions`), the sources' licenses, rendering and the Hub's own metadata check.

``rvhub card`` shows what :func:`build_card` returns; :func:`rvhub.push_vector` uploads it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..manifest import Manifest, verify_artifact
from .metadata import hub_sources, local_source_license
from .render import Card, render_card
from .scores import Scores, lm_eval_pairs, load_scores

logger = logging.getLogger("rvhub")


@dataclass(frozen=True)
class CardOptions:
    """What a card shows beyond the manifest: scores, a template, a license, a target.

    Build it from files with :meth:`from_files`. The defaults render rvhub's template with the
    sources' licenses (looked up) and no scores.
    """

    scores: Scores | None = None
    template: str | os.PathLike[str] | None = None
    license: str | None = None
    target: str | None = None
    base_model: str | None = None  # overrides the lineage root recorded at extract
    read: tuple[str, ...] = ()  # the files and folders the options were read from

    @classmethod
    def from_files(
        cls,
        scores: Iterable[str | os.PathLike[str]] = (),
        *,
        lm_eval: Mapping[str, str | os.PathLike[str]]
        | Iterable[str | tuple[str, str | os.PathLike[str]]] = (),
        eval_dir: str | os.PathLike[str] | None = None,
        template: str | os.PathLike[str] | None = None,
        license: str | None = None,
        target: str | None = None,
        base_model: str | None = None,
    ) -> CardOptions:
        """Options from score files (rvhub's format), lm-eval results (``CONDITION=FILE``
        strings or ``(condition, file)`` pairs) and an ``rvhub eval`` output folder."""
        scores, pairs = list(scores), lm_eval_pairs(lm_eval)
        read = [*scores, *(file for _, file in pairs), eval_dir, template]
        return cls(
            scores=load_scores(scores, lm_eval=pairs, eval_dir=eval_dir),
            template=template,
            license=license,
            target=target,
            base_model=base_model,
            read=tuple(str(p) for p in read if p is not None),
        )

    def arguments(self) -> dict[str, Any]:
        """As the keyword arguments of :func:`build_card` and :func:`rvhub.push_vector`."""
        return {
            "scores": self.scores,
            "template": self.template,
            "license": self.license,
            "target": self.target,
            "base_model": self.base_model,
        }


def default_repo_id(folder: str | os.PathLike[str], origin: Mapping[str, Any] | None = None) -> str:
    """The repo a card is for when none is named: the Hub repo the vector came from, else
    ``YOUR-USER/<folder name>``."""
    if origin and origin.get("kind") == "hub" and origin.get("repo_id"):
        return str(origin["repo_id"])
    return f"YOUR-USER/{Path(folder).resolve().name}"


def source_licenses(
    manifest: Manifest, *, token: str | bool | None = None, endpoint: str | None = None
) -> dict[str, str | None]:
    """The license of each source (``a``, ``b``) where one is known: a Hub source's card at its
    recorded revision, a local source's README front matter. Best effort, never raises."""
    from huggingface_hub import HfApi, constants

    out: dict[str, str | None] = {}
    api = HfApi(endpoint=endpoint, token=token)
    for role in ("a", "b"):
        info = manifest.sources.get(role)
        if info is None:
            continue
        if info.kind == "local" and info.path:
            out[role] = local_source_license(info.path)
        elif info.kind == "hub" and info.repo_id and not constants.HF_HUB_OFFLINE:
            try:
                data = api.model_info(info.repo_id, revision=info.revision).card_data
            except Exception as e:  # a missing card, a private repo, the network: no license
                logger.info("no license for %s: %s", info.repo_id, str(e).splitlines()[0:1])
                out[role] = None
                continue
            value = data.get("license") if data is not None else None
            out[role] = value if isinstance(value, str) and value else None
    return out


def check_card(text: str) -> None:
    """Parse a card with huggingface_hub's ``ModelCard`` (front matter, model-index)."""
    from huggingface_hub import ModelCard

    try:
        ModelCard(text, ignore_metadata_errors=False)
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(
            f"the card's metadata is not valid for the Hub: {str(e).splitlines()[0]}"
        ) from None


def build_card(
    folder: str | os.PathLike[str],
    manifest: Manifest | Mapping[str, Any] | None = None,
    *,
    repo_id: str | None = None,
    scores: Scores | None = None,
    template: str | os.PathLike[str] | None = None,
    license: str | None = None,
    target: str | None = None,
    token: str | bool | None = None,
    endpoint: str | None = None,
    plot: bool | bytes = True,
    lookup_licenses: bool = True,
    verify: bool = True,
    base_model: str | None = None,
) -> Card:
    """Render and check the card for ``repo_id`` (what ``rvhub card`` shows and ``push`` uploads).

    ``repo_id`` defaults to ``YOUR-USER/<folder name>``. Without a ``license``, the sources'
    licenses are looked up on the Hub (``lookup_licenses``). ``base_model`` sets or corrects
    the lineage root the card declares (default: the one recorded at extract). The result is checked with
    huggingface_hub's ``ModelCard``. With ``verify`` the artifact's files are checked against
    their digests first: a card is not made for a damaged vector.

    Example:
        >>> options = CardOptions.from_files(lm_eval=["baseline=base.json", "plus=plus.json"])
        >>> build_card("./vec", **options.arguments()).save("README.md")
    """
    from huggingface_hub import constants

    folder = Path(folder)
    if manifest is None:
        manifest = Manifest.read(folder)
    elif not isinstance(manifest, Manifest):
        manifest = Manifest.from_json(dict(manifest))
    if verify:
        verify_artifact(folder, manifest)
    licenses = (
        source_licenses(manifest, token=token, endpoint=endpoint)
        if license is None and lookup_licenses and hub_sources(manifest)
        else None
    )
    card = render_card(
        folder,
        manifest=manifest,
        repo_id=repo_id or default_repo_id(folder),
        scores=scores,
        template=template,
        license=license,
        source_licenses=licenses,
        target=target,
        plot=plot,
        endpoint=endpoint or constants.ENDPOINT,
        base_model=base_model,
    )
    check_card(card.text)
    return card
