"""A Hub on 127.0.0.1 for tests: olah (reads) behind a write stand-in, one endpoint for both.

Use it from pytest (register the fixtures once, in ``tests/conftest.py``: ``pytest_plugins =
["tests.hub_server.fixtures"]``; importing the fixture names into a test module works too but
trips ruff's F811 and pytest's assertion rewriting)::

    def test_push_then_pull(hub):                 # `hub` = the session's server, client pointed at it
        repo_id = hub.new_repo_id("vec")          # "alice/vec-1": unique in the session
        api = HfApi(endpoint=hub.endpoint, token=hub.token)
        api.create_repo(repo_id)
        api.upload_file(path_or_fileobj=b"x", path_in_repo="a.txt", repo_id=repo_id)
        assert hf_hub_download(repo_id, "a.txt")  # module-level helpers work too (see below)

    def test_download(hub):
        repo_id = hub.new_repo_id("model", namespace="some-org")
        sha = hub.seed_repo(repo_id, {"config.json": "{}", "model.safetensors": weights})

Pointing huggingface_hub at the server inside one process: huggingface_hub reads ``HF_ENDPOINT``,
``HF_HOME``, ``HF_HUB_OFFLINE`` (and more) once, at import, into ``huggingface_hub.constants``,
and builds the URL template ``constants.HUGGINGFACE_CO_URL_TEMPLATE`` and the module-level
``HfApi`` behind ``huggingface_hub.model_info``/``create_repo``/... (``hf_api.api``) from them.
Setting the environment variable after import therefore changes nothing. `HubServer.use_endpoint`
patches all of those (plus the env vars, for subprocesses) and restores them on exit;
``HfApi(endpoint=hub.endpoint)`` or ``endpoint=`` on download functions works without it.
It also disables Xet (``HF_HUB_DISABLE_XET``: uploads use the classic LFS protocol the stand-in
speaks, even if ``hf_xet`` gets installed) and telemetry, and drops ``HF_TOKEN`` so no real token
of the developer leaks into tests.
"""

from __future__ import annotations

import contextlib
import itertools
import shutil
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from .git_store import LFS_SIZE_THRESHOLD, GitRepo, matches_lfs_pattern
from .olah_fixture import OlahServer, olah_cli_path
from .write_standin import Accounts, LoggedRequest, WriteStandin

USER = "alice"
OTHER_USER = "bob"
ORG = "rvhub-org"  # alice is a member, bob is not
TOKENS = {USER: "hf_standin_alice_write_token", OTHER_USER: "hf_standin_bob_write_token"}


def missing_requirements() -> str | None:
    """Why the local Hub cannot run here, or None. (git-lfs is not needed by the servers.)"""
    if olah_cli_path() is None:
        return "olah is not installed (pip install olah; see .ci/hub-setup.sh)"
    if shutil.which("git") is None:
        return "git is not installed"
    return None


class HubServer:
    """olah + write stand-in over one repos folder. ``start()``/``stop()``, or use ``with``."""

    user = USER
    other_user = OTHER_USER
    org = ORG
    token = TOKENS[USER]
    other_token = TOKENS[OTHER_USER]

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = Path(work_dir)
        self.repos_dir = self.work_dir / "repos"
        self.standin = WriteStandin(
            self.repos_dir,
            Accounts(tokens={token: user for user, token in TOKENS.items()}, orgs={ORG: {USER}}),
        )
        self.olah: OlahServer | None = None
        self._dead_socket: socket.socket | None = None
        self._names = itertools.count(1)

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> HubServer:
        self.repos_dir.mkdir(parents=True, exist_ok=True)
        self.standin.start()
        netloc = self.standin.url.removeprefix("http://")
        self.olah = OlahServer(self.repos_dir, self.work_dir / "olah", public_netloc=netloc)
        try:
            self.olah.start()
        except Exception:
            self.standin.stop()
            raise
        self.standin.upstream = self.olah.url
        # A port that is bound but never listens: connecting fails at once ("network down").
        self._dead_socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._dead_socket.bind(("127.0.0.1", 0))
        return self

    def stop(self) -> None:
        if self.olah is not None:
            self.olah.stop()
        self.standin.stop()
        if self._dead_socket is not None:
            self._dead_socket.close()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- addresses -----------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """The one URL for reads and writes (``HF_ENDPOINT`` / ``HfApi(endpoint=...)``)."""
        return self.standin.url

    @property
    def olah_url(self) -> str:
        """olah itself: reads only, no auth checks. Tests normally want `endpoint`."""
        assert self.olah is not None
        return self.olah.url

    @property
    def dead_endpoint(self) -> str:
        """An endpoint where nothing listens, to test behaviour with the network down."""
        assert self._dead_socket is not None
        return f"http://127.0.0.1:{self._dead_socket.getsockname()[1]}"

    @property
    def requests(self) -> list[LoggedRequest]:
        """Every request the endpoint answered (method, path, status, user); clear it freely."""
        return self.standin.requests

    # -- repos ---------------------------------------------------------------------------------

    def new_repo_id(self, stem: str = "repo", *, namespace: str | None = None) -> str:
        """A repo id not used before in this session, e.g. ``alice/vec-3``."""
        return f"{namespace or self.user}/{stem}-{next(self._names)}"

    def repo(self, repo_id: str, repo_type: str = "model") -> GitRepo:
        """The stored git repo (shares the stand-in's lock)."""
        return self.standin.git_repo_by_id(repo_id, repo_type)

    def seed_repo(
        self,
        repo_id: str,
        files: Path | str | Mapping[str, bytes | str | Path],
        *,
        message: str = "seed",
        branch: str = "main",
        repo_type: str = "model",
        private: bool = False,
    ) -> str:
        """Commit ``files`` straight into the repo (created if missing, like the Hub does), bypassing
        the HTTP API. ``files`` is a folder or ``{path_in_repo: bytes | text | local path}``.
        Weights (``*.safetensors`` and the Hub's other LFS patterns, binary or >10 MB files) are
        stored as LFS. Returns the new commit sha."""
        repo = self.repo(repo_id, repo_type)
        with repo.lock:
            if not repo.exists:
                repo.create(private=private)
            if isinstance(files, (str, Path)):
                root = Path(files)
                contents = {
                    p.relative_to(root).as_posix(): p.read_bytes()
                    for p in sorted(root.rglob("*"))
                    if p.is_file() and ".git" not in p.relative_to(root).parts
                }
            else:
                contents = {path: _as_bytes(value) for path, value in files.items()}
            # a new branch starts at main
            base = repo.branch_head(branch) or repo.branch_head("main")
            patterns = repo.lfs_patterns_at(base)
            regular, lfs = {}, {}
            for path, data in contents.items():
                if (
                    matches_lfs_pattern(path, patterns)
                    or len(data) >= LFS_SIZE_THRESHOLD
                    or b"\0" in data[:512]
                ):
                    lfs[path] = (repo.store_lfs_object(data), len(data))
                else:
                    regular[path] = data
            sha = repo.commit(
                message, add=regular, add_lfs=lfs, branch=branch, base=base, allow_empty=True
            )
        assert sha is not None
        return sha

    # -- pointing huggingface_hub at the server -------------------------------------------------

    @contextlib.contextmanager
    def use_endpoint(self, hf_home: Path, *, endpoint: str | None = None) -> Iterator[None]:
        """Point huggingface_hub (and transformers, which reads the same constants) at
        ``endpoint`` (default: this server), with ``hf_home`` as HF_HOME and cache, online."""
        import huggingface_hub.constants as constants
        import huggingface_hub.hf_api as hf_api

        url = (endpoint or self.endpoint).rstrip("/")
        hf_home = Path(hf_home)
        hub_cache = hf_home / "hub"
        hub_cache.mkdir(parents=True, exist_ok=True)
        with pytest.MonkeyPatch.context() as mp:
            for name, value in {
                "HF_ENDPOINT": url,
                "HF_HOME": str(hf_home),
                "HF_HUB_CACHE": str(hub_cache),
                "HF_HUB_DISABLE_XET": "1",
                "HF_HUB_DISABLE_TELEMETRY": "1",
            }.items():
                mp.setenv(name, value)
            for name in (
                "HF_TOKEN",
                "HUGGING_FACE_HUB_TOKEN",
                "HF_HUB_OFFLINE",
                "TRANSFORMERS_OFFLINE",
                "HF_TOKEN_PATH",
            ):
                mp.delenv(name, raising=False)
            constant_values: dict[str, object] = {
                "ENDPOINT": url,
                "HUGGINGFACE_CO_URL_TEMPLATE": url + "/{repo_id}/resolve/{revision}/{filename}",
                "HF_HOME": str(hf_home),
                "HF_HUB_CACHE": str(hub_cache),
                "HUGGINGFACE_HUB_CACHE": str(hub_cache),
                "HF_ASSETS_CACHE": str(hf_home / "assets"),
                "HF_XET_CACHE": str(hf_home / "xet"),
                "HF_TOKEN_PATH": str(hf_home / "token"),
                "HF_STORED_TOKENS_PATH": str(hf_home / "stored_tokens"),
                "HF_HUB_OFFLINE": False,
                "HF_HUB_DISABLE_XET": True,
                "HF_HUB_DISABLE_TELEMETRY": True,
            }
            for constant, constant_value in constant_values.items():
                mp.setattr(constants, constant, constant_value)
            mp.setattr(hf_api.api, "endpoint", url)
            yield

    @staticmethod
    @contextlib.contextmanager
    def offline() -> Iterator[None]:
        """``HF_HUB_OFFLINE=1`` for the block (env var and the constant read at import)."""
        import huggingface_hub.constants as constants

        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("HF_HUB_OFFLINE", "1")
            mp.setattr(constants, "HF_HUB_OFFLINE", True)
            yield


def _as_bytes(value: bytes | str | Path) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return Path(value).read_bytes()


@contextlib.contextmanager
def start_hub_server(work_dir: Path) -> Iterator[HubServer]:
    """Outside pytest fixtures: ``with start_hub_server(tmp) as hub: ...``."""
    reason = missing_requirements()
    if reason is not None:
        raise RuntimeError(reason)
    with HubServer(work_dir) as server:
        yield server


@pytest.fixture(scope="session")
def hub_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    """The session's local Hub (skips the test if olah is not installed). Repos persist for the
    whole session: name them with `HubServer.new_repo_id`."""
    reason = missing_requirements()
    if reason is not None:
        pytest.skip(reason)
    with HubServer(tmp_path_factory.mktemp("hub")) as server:
        yield server


@pytest.fixture
def hub(hub_server: HubServer, tmp_path: Path) -> Iterator[HubServer]:
    """`hub_server` with huggingface_hub pointed at it and a fresh HF_HOME for this test."""
    hub_server.requests.clear()
    with hub_server.use_endpoint(tmp_path / "hf_home"):
        yield hub_server


__all__ = [
    "ORG",
    "OTHER_USER",
    "TOKENS",
    "USER",
    "HubServer",
    "hub",
    "hub_server",
    "missing_requirements",
    "start_hub_server",
]
