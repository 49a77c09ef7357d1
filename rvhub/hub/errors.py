"""One line for each way the Hub or the network can fail (:func:`hub_error` for reads,
:func:`push_error` for writes), and the exception types a Hub request can raise."""

from __future__ import annotations

from ..errors import HubError, InputError

TOKEN_HELP = "log in with `hf auth login` or set HF_TOKEN to a token with write access"


def hub_error(exc: BaseException, repo_id: str, revision: str | None) -> HubError | InputError:
    """Turn huggingface_hub / network exceptions into one clear line."""
    from huggingface_hub import errors as hf_errors

    rev = f" at revision {revision}" if revision else ""
    if isinstance(exc, hf_errors.RevisionNotFoundError):
        return InputError(f"{repo_id} has no revision {revision!r}; check the branch, tag or sha")
    if isinstance(exc, hf_errors.GatedRepoError):
        return HubError(
            f"{repo_id} is gated: accept its terms on the Hub, then log in (hf auth login)"
        )
    if isinstance(exc, hf_errors.RepositoryNotFoundError):
        return InputError(
            f"{repo_id}: no such repo on the Hub (or it is private: log in with hf auth login "
            "or set HF_TOKEN); for a local folder, check the path"
        )
    if isinstance(exc, hf_errors.LocalEntryNotFoundError):
        from huggingface_hub import constants

        fix = (
            "unset HF_HUB_OFFLINE"
            if constants.HF_HUB_OFFLINE
            else "check the network and HF_ENDPOINT"
        )
        return HubError(
            f"cannot reach the Hub for {repo_id}{rev} and it is not in the local cache "
            f"(offline or network down); {fix}"
        )
    if isinstance(exc, hf_errors.EntryNotFoundError):
        return InputError(f"{repo_id}{rev} lacks a file rvhub needs ({exc})".split("\n")[0])
    if isinstance(exc, hf_errors.HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            return HubError(
                f"the Hub refused access to {repo_id} (HTTP {status}): check your token "
                "(HF_TOKEN or hf auth login) and its permissions"
            )
        return HubError(f"the Hub failed a request for {repo_id}{rev}: {str(exc).splitlines()[0]}")
    return HubError(
        f"cannot reach the Hub for {repo_id}{rev}: {str(exc).splitlines()[0] or type(exc).__name__}"
    )


def transport_errors() -> tuple[type[BaseException], ...]:
    """httpx's errors under both names huggingface_hub has used (``httpx``, then ``httpx2``)."""
    out: list[type[BaseException]] = []
    for module in ("httpx2", "httpx"):
        try:
            out.append(__import__(module).HTTPError)
        except (ImportError, AttributeError):
            continue
    return tuple(out)


def network_errors() -> tuple[type[BaseException], ...]:
    """Every exception a Hub request can end with: HTTP errors, a cache miss offline, the
    transport's errors and OS errors."""
    from huggingface_hub import errors as hf_errors

    return (
        hf_errors.HfHubHTTPError,
        hf_errors.LocalEntryNotFoundError,
        *transport_errors(),
        OSError,
    )


def push_error(
    exc: BaseException, repo_id: str, endpoint: str, revision: str | None
) -> HubError | InputError:
    """One line for a failed push; every such failure leaves the repo as it was."""
    from huggingface_hub import errors as hf_errors

    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, hf_errors.HfHubHTTPError) and status == 401:
        return HubError(
            f"the Hub rejected the token (HTTP 401): it is invalid or expired; {TOKEN_HELP}"
        )
    if isinstance(exc, hf_errors.HfHubHTTPError) and status == 403:
        namespace = repo_id.split("/", 1)[0]
        return HubError(
            f"no write access to {repo_id} (HTTP 403): {namespace!r} is not your namespace or one "
            "of your organizations, or the token is read-only; nothing was pushed"
        )
    if isinstance(exc, hf_errors.HfHubHTTPError) and status == 412:
        return HubError(
            f"{repo_id} changed while pushing (HTTP 412); nothing was committed: push again"
        )
    if isinstance(exc, hf_errors.OfflineModeIsEnabled):
        return HubError("cannot push with HF_HUB_OFFLINE=1; unset it to publish")
    if isinstance(exc, (hf_errors.HfHubHTTPError, hf_errors.LocalEntryNotFoundError)):
        return hub_error(exc, repo_id, revision)
    if isinstance(exc, (*transport_errors(), OSError)):
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return HubError(f"cannot reach the Hub at {endpoint} ({reason}); nothing was pushed")
    return HubError(f"push to {repo_id} failed: {str(exc).splitlines()[0]}")
