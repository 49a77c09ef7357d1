"""A stand-in for the Hub's write API, fronting olah so that one endpoint does reads and writes.

`WriteStandin` is a stdlib ``ThreadingHTTPServer`` on 127.0.0.1. It answers what olah cannot:

- ``POST /api/repos/create``, ``DELETE /api/repos/delete``: create_repo (``private``; 409 with
  the ``url`` when it exists, which is what ``exist_ok=True`` needs), delete_repo
- ``GET /api/whoami-v2``: whoami (fixed tokens -> users; unknown token -> 401)
- ``POST /api/validate-yaml``: the README front-matter check create_commit makes first
- ``POST /api/{type}s/{id}/preupload/{rev}``: upload mode per file and the file's remote oid
  (sha256 for LFS, git blob sha1 otherwise), which lets the client drop unchanged files
- ``POST /{id}.git/info/lfs/objects/batch``: LFS batch; upload actions point back here with a
  one-time grant in the URL (like a pre-signed S3 URL), none when the object is already stored
- ``PUT /_standin/lfs/{type}/{id}/{oid}``: the LFS upload (size and sha256 checked)
- ``POST /api/{type}s/{id}/commit/{rev}``: the NDJSON commit (file, lfsFile, deletedFile,
  deletedFolder; ``parentCommit`` -> 412 when stale; ``create_pr=1`` -> ``refs/pr/N``)
- ``POST /api/{type}s/{id}/branch/{name}``: create_branch
- ``GET /api/{type}s/{id}/commits/{rev}``: list_repo_commits (git log; olah's lacks ``user``)

Writes need a known token whose user owns the namespace or is a member of the org (401 without
or with an unknown token, 403 for another namespace).

Every other request is reverse-proxied to olah after the Hub's access rules are applied (private
repos, invalid tokens) and the revision is pinned to a commit sha, so olah serves one consistent
snapshot and ``refs/pr/N`` revisions work. Missing repos, revisions and files are answered here
with the Hub's ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) so
huggingface_hub raises the same exception classes as against the real Hub.

Each commit is a real git commit in the repos folder olah serves (LFS content in
``.git/lfs/objects``, pointer files committed), so a push is checked by pulling it back through
olah with unmodified client code.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import re
import secrets
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import yaml

from .git_store import (
    LFS_SIZE_THRESHOLD,
    REPO_TYPE_DIRS,
    GitRepo,
    GitStoreError,
    ParentMismatchError,
    delete_repo,
    matches_lfs_pattern,
    repo_path,
)
from .model_search import base_models, card_data, list_models

_TYPE_FROM_PLURAL = {plural: singular for singular, plural in REPO_TYPE_DIRS.items()}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_REPO_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")
_HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "date", "server",
}  # fmt: skip
_INVALID_CREDENTIALS = "Invalid credentials in Authorization header"

# /api/{models|datasets|spaces}/{org}/{name}[/{action}[/{rest}]]
_API_REPO = re.compile(r"^/api/(models|datasets|spaces)/([^/]+)/([^/]+)(?:/([^/]+)(?:/(.*))?)?$")
# /[datasets/|spaces/]{org}/{name}/resolve/{rev}/{file}
_RESOLVE = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+)/([^/]+)/resolve/([^/]+)/(.+)$")
# /[datasets/|spaces/]{org}/{name}.git/info/lfs/objects/batch
_LFS_BATCH = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+)/([^/]+)\.git/info/lfs/objects/batch$")
# /_standin/lfs/{type}/{org}/{name}/{oid}
_LFS_UPLOAD = re.compile(r"^/_standin/lfs/(model|dataset|space)/([^/]+)/([^/]+)/([0-9a-f]{64})$")


@dataclass
class Accounts:
    """Who may do what: tokens name users; orgs list their members."""

    tokens: dict[str, str] = field(default_factory=dict)  # token -> user name
    orgs: dict[str, set[str]] = field(default_factory=dict)  # org name -> member user names

    def namespaces_of(self, user: str) -> set[str]:
        return {user} | {org for org, members in self.orgs.items() if user in members}


@dataclass(frozen=True)
class LoggedRequest:
    method: str
    path: str
    status: int
    user: str | None


class HubError(Exception):
    """An error answered to the client in the Hub's shape (status, X-Error-Code, JSON body)."""

    def __init__(self, status: int, message: str, code: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.extra = extra  # more fields of the JSON body


@dataclass(frozen=True)
class _RepoRef:
    repo_type: str  # "model" | "dataset" | "space"
    repo_id: str

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/", 1)[0]

    @property
    def url_path(self) -> str:
        return _URL_PREFIX[self.repo_type] + self.repo_id


class WriteStandin:
    """The single Hub endpoint for tests: writes here, reads proxied to olah (``upstream``).

    Bind first (``start()``), so olah can be told this server's address, then set ``upstream``.
    """

    def __init__(self, repos_dir: Path, accounts: Accounts) -> None:
        self.repos_dir = Path(repos_dir)
        self.accounts = accounts
        self.upstream: str | None = None  # olah's base URL
        self.requests: list[LoggedRequest] = []
        self._repos: dict[Path, GitRepo] = {}
        self._repos_lock = threading.Lock()
        self._upload_grants: dict[str, tuple[_RepoRef, str, int]] = {}
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "start() first"
        return f"http://127.0.0.1:{self._server.server_port}"

    def start(self) -> None:
        standin = self

        class Handler(_Handler):
            server_state = standin

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="hub-standin", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # -- repos -----------------------------------------------------------------------------

    def git_repo(self, ref: _RepoRef) -> GitRepo:
        path = repo_path(self.repos_dir, ref.repo_id, ref.repo_type)
        with self._repos_lock:
            if path not in self._repos:
                self._repos[path] = GitRepo(path)
            return self._repos[path]

    def git_repo_by_id(self, repo_id: str, repo_type: str = "model") -> GitRepo:
        return self.git_repo(_RepoRef(repo_type, repo_id))

    def forget_repo(self, ref: _RepoRef) -> None:
        with self._repos_lock:
            self._repos.pop(repo_path(self.repos_dir, ref.repo_id, ref.repo_type), None)


def _hub_error_headers(error: HubError) -> dict[str, str]:
    headers = {"X-Error-Message": error.message}
    if error.code:
        headers["X-Error-Code"] = error.code
    return headers


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_state: WriteStandin

    # -- plumbing ------------------------------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read `requests`
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(
        self, status: int, body: bytes = b"", headers: Mapping[str, str] | None = None
    ) -> None:
        self.send_response(status)
        sent_length = False
        for key, value in (headers or {}).items():
            if key.lower() == "content-length":
                sent_length = True
            self.send_header(key, value)
        if not sent_length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)
        self._status = status

    def _send_json(
        self, status: int, payload: Any, headers: Mapping[str, str] | None = None
    ) -> None:
        body = json.dumps(payload).encode()
        self._send(status, body, {"Content-Type": "application/json", **(headers or {})})

    def _send_error(self, error: HubError) -> None:
        self._send_json(
            error.status, {"error": error.message, **error.extra}, _hub_error_headers(error)
        )

    def _dispatch(self) -> None:
        state = self.server_state
        self._status = 0
        self._user: str | None = None
        split = urlsplit(self.path)
        self._path, self._query = split.path, parse_qs(split.query)
        body = self._read_body() if self.command in ("POST", "PUT", "DELETE", "PATCH") else b""
        try:
            self._user = self._authenticate()
            self._route(body)
        except HubError as error:
            self._send_error(error)
        except Exception as error:
            # A stand-in bug must reach the test at once: 501, which huggingface_hub does not
            # retry (it retries 500/502/503/504 with back-off for up to ~25 s).
            self.close_connection = True
            self._send_error(HubError(501, f"stand-in failure: {type(error).__name__}: {error}"))
        finally:
            state.requests.append(LoggedRequest(self.command, self.path, self._status, self._user))

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = _dispatch

    # -- auth ----------------------------------------------------------------------------------

    def _authenticate(self) -> str | None:
        """The token's user; None without a token. An unknown token is refused everywhere (Hub)."""
        header = self.headers.get("Authorization", "")
        if not header:
            return None
        scheme, _, token = header.partition(" ")
        user = (
            self.server_state.accounts.tokens.get(token.strip())
            if scheme.lower() == "bearer"
            else None
        )
        if user is None:
            raise HubError(401, _INVALID_CREDENTIALS)
        return user

    def _require_user(self) -> str:
        if self._user is None:
            raise HubError(401, "You must be authenticated to access this resource.")
        return self._user

    def _existing_repo(self, ref: _RepoRef) -> GitRepo:
        """The repo if it exists and the caller may read it; the Hub's RepoNotFound otherwise."""
        repo = self.server_state.git_repo(ref)
        visible = repo.exists and (
            repo.get_setting("private") != "true"
            or (
                self._user is not None
                and ref.namespace in self.server_state.accounts.namespaces_of(self._user)
            )
        )
        if not visible:
            raise HubError(
                401 if self._user is None else 404, "Repository not found", "RepoNotFound"
            )
        return repo

    def _writable_repo(self, ref: _RepoRef) -> GitRepo:
        user = self._require_user()
        repo = self._existing_repo(ref)
        if ref.namespace not in self.server_state.accounts.namespaces_of(user):
            raise HubError(
                403, f"You don't have the rights to write to {ref.repo_id} (you are {user})."
            )
        return repo

    @staticmethod
    def _resolve(repo: GitRepo, revision: str) -> str:
        sha = repo.resolve(unquote(revision))
        if sha is None:
            raise HubError(404, f"Invalid rev id: {unquote(revision)}", "RevisionNotFound")
        return sha

    # -- routing -------------------------------------------------------------------------------

    def _route(self, body: bytes) -> None:
        path, method = self._path, self.command
        if path == "/api/whoami-v2" and method == "GET":
            return self._whoami()
        if path == "/api/repos/create" and method == "POST":
            return self._create_repo(json.loads(body or b"{}"))
        if path == "/api/repos/delete" and method == "DELETE":
            return self._delete_repo(json.loads(body or b"{}"))
        if path == "/api/validate-yaml" and method == "POST":
            return self._validate_yaml(json.loads(body or b"{}"))
        if path == "/api/models" and method == "GET":
            return self._list_models()
        if (match := _LFS_BATCH.match(path)) and method == "POST":
            ref = _RepoRef(
                _TYPE_FROM_PLURAL.get(match[1] or "models", "model"), f"{match[2]}/{match[3]}"
            )
            return self._lfs_batch(ref, json.loads(body or b"{}"))
        if (match := _LFS_UPLOAD.match(path)) and method == "PUT":
            return self._lfs_upload(_RepoRef(match[1], f"{match[2]}/{match[3]}"), match[4], body)
        if match := _API_REPO.match(path):
            ref = _RepoRef(_TYPE_FROM_PLURAL[match[1]], f"{match[2]}/{match[3]}")
            action, rest = match[4], match[5]
            if action == "preupload" and method == "POST" and rest:
                return self._preupload(ref, rest, json.loads(body or b"{}"))
            if action == "commit" and method == "POST" and rest:
                return self._commit(ref, rest, body)
            if action == "branch" and method == "POST" and rest:
                return self._create_branch(ref, rest, json.loads(body or b"{}"))
            if action == "commits" and method == "GET" and rest:
                return self._list_commits(ref, rest)
            if method in ("GET", "HEAD") or action in ("paths-info",):
                return self._proxy_api(ref, match[1], action, rest, body)
        if (match := _RESOLVE.match(path)) and method in ("GET", "HEAD"):
            ref = _RepoRef(
                _TYPE_FROM_PLURAL.get(match[1] or "models", "model"), f"{match[2]}/{match[3]}"
            )
            return self._proxy_resolve(ref, match[4], match[5])
        if method in ("GET", "HEAD"):
            return self._proxy(self.path, body)
        raise HubError(501, f"The Hub stand-in does not implement {method} {path}")

    # -- account endpoints ---------------------------------------------------------------------

    def _whoami(self) -> None:
        user = self._user
        if user is None:
            raise HubError(401, _INVALID_CREDENTIALS)
        orgs = sorted(self.server_state.accounts.namespaces_of(user) - {user})
        self._send_json(
            200,
            {
                "type": "user",
                "id": hashlib.sha1(user.encode()).hexdigest()[:24],
                "name": user,
                "fullname": user.title(),
                "email": f"{user}@example.com",
                "emailVerified": True,
                "isPro": False,
                "canPay": False,
                "orgs": [{"type": "org", "name": org, "roleInOrg": "write"} for org in orgs],
                "auth": {
                    "type": "access_token",
                    "accessToken": {"displayName": "tests", "role": "write"},
                },
            },
        )

    def _create_repo(self, payload: dict[str, Any]) -> None:
        user = self._require_user()
        name = payload.get("name") or ""
        namespace = payload.get("organization") or user
        repo_type = payload.get("type") or "model"
        if (
            repo_type not in REPO_TYPE_DIRS
            or not _REPO_NAME.match(name)
            or not _REPO_NAME.match(namespace)
        ):
            raise HubError(400, f"Invalid repo name or type: {namespace}/{name} ({repo_type})")
        if namespace not in self.server_state.accounts.namespaces_of(user):
            raise HubError(
                403,
                f'You don\'t have the rights to create a {repo_type} under the namespace "{namespace}"',
            )
        ref = _RepoRef(repo_type, f"{namespace}/{name}")
        url = f"{self.server_state.url}/{ref.url_path}"
        repo = self.server_state.git_repo(ref)
        with repo.lock:
            if repo.exists:
                # huggingface_hub reads `url` from the 409 body when exist_ok=True
                raise HubError(409, f"You already created this {repo_type} repo", url=url)
            private = payload.get("visibility") == "private" or payload.get("private") is True
            repo.create(private=private, author=user)
        self._send_json(
            200,
            {"url": url, "name": ref.repo_id, "id": hashlib.sha1(url.encode()).hexdigest()[:24]},
        )

    def _delete_repo(self, payload: dict[str, Any]) -> None:
        user = self._require_user()
        namespace = payload.get("organization") or user
        ref = _RepoRef(payload.get("type") or "model", f"{namespace}/{payload.get('name')}")
        repo = self._writable_repo(ref)
        with repo.lock:
            delete_repo(repo.path)
        self.server_state.forget_repo(ref)
        self._send(200)

    def _validate_yaml(self, payload: dict[str, Any]) -> None:
        content = payload.get("content") or ""
        match = re.match(r"^\s*---\r?\n(.*?)\r?\n---", content, flags=re.S)
        errors = []
        if match:
            try:
                metadata = yaml.safe_load(match[1])
            except yaml.YAMLError as error:
                errors.append({"message": f"Invalid YAML: {error}"})
            else:
                if metadata is not None and not isinstance(metadata, dict):
                    errors.append({"message": "The metadata must be a YAML mapping"})
        self._send_json(400 if errors else 200, {"errors": errors, "warnings": []})

    # -- upload endpoints ----------------------------------------------------------------------

    def _preupload(self, ref: _RepoRef, revision: str, payload: dict[str, Any]) -> None:
        repo = self._writable_repo(ref)
        head = self._resolve(repo, revision)
        existing = repo.tree(head)
        patterns = repo.lfs_patterns_at(head)
        files = []
        for item in payload.get("files", []):
            path = item["path"]
            sample = base64.b64decode(item.get("sample") or "")
            lfs = (
                matches_lfs_pattern(path, patterns)
                or int(item.get("size") or 0) >= LFS_SIZE_THRESHOLD
                or b"\0" in sample
            )
            entry = existing.get(path)
            files.append(
                {
                    "path": path,
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": False,
                    "oid": entry.hub_oid if entry is not None else None,
                }
            )
        self._send_json(200, {"files": files, "commitOid": head})

    def _lfs_batch(self, ref: _RepoRef, payload: dict[str, Any]) -> None:
        repo = self._writable_repo(ref)
        if payload.get("operation") != "upload":
            raise HubError(400, "Only LFS uploads go through the stand-in; downloads use /resolve/")
        objects = []
        for item in payload.get("objects", []):
            oid, size = str(item["oid"]), int(item["size"])
            answer: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if not repo.has_lfs_object(oid):
                grant = secrets.token_urlsafe(16)
                self.server_state._upload_grants[grant] = (ref, oid, size)
                href = f"{self.server_state.url}/_standin/lfs/{ref.repo_type}/{ref.repo_id}/{oid}?grant={grant}"
                answer["actions"] = {"upload": {"href": href, "expires_in": 3600}}
            objects.append(answer)
        self._send_json(
            200,
            {"transfer": "basic", "objects": objects},
            {"Content-Type": "application/vnd.git-lfs+json"},
        )

    def _lfs_upload(self, ref: _RepoRef, oid: str, body: bytes) -> None:
        # Like a pre-signed S3 URL: the grant in the URL is the authorization, no token is sent.
        grant = (self._query.get("grant") or [""])[0]
        granted = self.server_state._upload_grants.pop(grant, None)
        if granted is None or granted[0] != ref or granted[1] != oid:
            raise HubError(
                403, "Upload URL not granted by the LFS batch endpoint (or already used)"
            )
        if len(body) != granted[2]:
            raise HubError(
                400, f"Size mismatch: announced {granted[2]} bytes, received {len(body)}"
            )
        try:
            self.server_state.git_repo(ref).store_lfs_object(body, expected_oid=oid)
        except GitStoreError as error:
            raise HubError(400, str(error)) from error
        self._send(200, headers={"ETag": f'"{hashlib.md5(body).hexdigest()}"'})

    def _commit(self, ref: _RepoRef, revision: str, body: bytes) -> None:
        user = self._require_user()
        repo = self._writable_repo(ref)
        branch = unquote(revision)
        head = self._resolve(repo, branch)
        create_pr = (self._query.get("create_pr") or ["0"])[0] in ("1", "true", "True")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The commit payload must start with a header line")
        header = lines[0]["value"]
        parent = header.get("parentCommit")
        add: dict[str, bytes] = {}
        add_lfs: dict[str, tuple[str, int]] = {}
        delete: list[str] = []
        delete_folders: list[str] = []
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value") or {}
            path = _checked_repo_path(value.get("path", ""))
            if key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise HubError(400, f"Unsupported encoding {value.get('encoding')!r}")
                add[path] = base64.b64decode(value.get("content", ""))
            elif key == "lfsFile":
                oid = value.get("oid", "")
                if not repo.has_lfs_object(oid):
                    raise HubError(
                        400,
                        f"Your push was rejected because an LFS pointer pointed to a file that does not exist ({path})",
                    )
                size = value.get("size")
                add_lfs[path] = (
                    oid,
                    int(size) if size is not None else repo.lfs_object_path(oid).stat().st_size,
                )
            elif key == "deletedFile":
                delete.append(path)
            elif key == "deletedFolder":
                delete_folders.append(path)
            else:
                raise HubError(400, f"Unknown commit operation {key!r}")
        message = header.get("summary") or ""
        if header.get("description"):
            message += "\n\n" + header["description"]
        if create_pr:
            pr_number, target = repo.next_pr_ref()
            base, expected = (parent or head), None
        else:
            pr_number, target = (
                None,
                f"refs/heads/{branch}" if not branch.startswith("refs/") else branch,
            )
            base, expected = None, parent
            if target.startswith("refs/heads/") and repo.resolve(target) is None:
                raise HubError(404, f"Cannot commit to {branch}: not a branch", "RevisionNotFound")
        try:
            sha = repo.commit(
                message,
                add=add,
                add_lfs=add_lfs,
                delete=tuple(delete),
                delete_folders=tuple(delete_folders),
                branch=target,
                base=base,
                expected_head=expected,
                allow_empty=True,
                author=user,
            )
        except ParentMismatchError as error:
            raise HubError(
                412, f"A commit has happened since. Please refresh and try again. ({error})"
            ) from error
        except FileNotFoundError as error:
            raise HubError(
                404, f"A file with this name doesn't exist: {error}", "EntryNotFound"
            ) from error
        base_url = f"{self.server_state.url}/{ref.url_path}"
        response: dict[str, Any] = {
            "commitOid": sha,
            "commitUrl": f"{base_url}/commit/{sha}",
            "success": True,
        }
        if pr_number is not None:
            response["pullRequestUrl"] = f"{base_url}/discussions/{pr_number}"
        self._send_json(200, response)

    def _create_branch(self, ref: _RepoRef, branch: str, payload: dict[str, Any]) -> None:
        repo = self._writable_repo(ref)
        name = unquote(branch)
        start = self._resolve(repo, payload.get("startingPoint") or "main")
        with repo.lock:
            if repo.resolve(f"refs/heads/{name}") is not None:
                raise HubError(409, f"Reference refs/heads/{name} already exists")
            repo.git("update-ref", f"refs/heads/{name}", start, "0" * 40)
        self._send(200)

    def _list_commits(self, ref: _RepoRef, revision: str) -> None:
        repo = self._existing_repo(ref)
        sha = self._resolve(repo, revision)
        self._send_json(
            200,
            [
                {
                    "id": c["id"],
                    "title": c["title"],
                    "message": c["message"],
                    "authors": [{"user": c["author"]}],
                    "date": c["date"],
                }
                for c in repo.log(sha)
            ],
        )

    # -- search: the model listing (tests/hub_server/model_search.py) ---------------------------

    def _list_models(self) -> None:
        state = self.server_state
        user = self._user
        mine = state.accounts.namespaces_of(user) if user else set()

        def visible(repo_id: str, private: bool) -> bool:
            return not private or repo_id.split("/", 1)[0] in mine

        def downloads(repo_id: str) -> int:
            wanted = f"/{repo_id}/resolve/"
            return sum(
                1
                for r in list(state.requests)
                if r.method == "GET" and wanted in r.path and r.path.endswith("/rvhub.json")
            )

        entries = list_models(
            state.repos_dir,
            self._query,
            repo_of=state.git_repo_by_id,
            visible=visible,
            downloads=downloads,
        )
        self._send_json(200, entries)

    # -- reads: checked here, served by olah --------------------------------------------------

    def _proxy_api(
        self, ref: _RepoRef, plural: str, action: str | None, rest: str | None, body: bytes
    ) -> None:
        repo = self._existing_repo(ref)
        base = f"/api/{plural}/{ref.repo_id}"
        if (
            action is None
        ):  # model_info without revision: olah (offline) only serves /revision/<rev>
            action, rest = "revision", "main"
        if action in ("revision", "tree", "paths-info") and rest:
            revision, _, subpath = rest.partition("/")
            sha = self._resolve(repo, revision)
            # olah routes the tree root as `/tree/<rev>/` (it redirects the slash-less form)
            upstream = f"{base}/{action}/{sha}" + (
                f"/{subpath}" if subpath or action == "tree" else ""
            )
        else:
            upstream = f"{base}/{action}" + (f"/{rest}" if rest else "")
        query = urlsplit(self.path).query
        upstream += f"?{query}" if query else ""
        patch = None
        if action == "revision":
            private = repo.get_setting("private") == "true"

            card = card_data(repo, sha) if rest else {}
            extra = {"baseModels": base_models(card)} if card.get("base_model") else {}

            def patch(info: dict[str, Any]) -> dict[str, Any]:
                return {**info, **extra, "private": private}

        self._proxy(upstream, body, patch_json=patch)

    def _proxy_resolve(self, ref: _RepoRef, revision: str, file_path: str) -> None:
        repo = self._existing_repo(ref)
        sha = self._resolve(repo, revision)
        if unquote(file_path) not in repo.tree(sha):
            raise HubError(404, f"Entry not found: {unquote(file_path)}", "EntryNotFound")
        query = urlsplit(self.path).query
        self._proxy(
            f"/{ref.url_path}/resolve/{sha}/{file_path}" + (f"?{query}" if query else ""), b""
        )

    def _proxy(self, upstream_path: str, body: bytes, *, patch_json: Any = None) -> None:
        state = self.server_state
        if state.upstream is None:
            raise HubError(501, "No read server (olah) behind the stand-in")
        target = urlsplit(state.upstream)
        connection = http.client.HTTPConnection(
            target.hostname or "127.0.0.1", target.port, timeout=60
        )
        headers = {
            k: v
            for k, v in self.headers.items()
            if k.lower() not in _HOP_BY_HOP | {"host", "content-length"}
        }
        if body:
            headers["Content-Length"] = str(len(body))
        try:
            connection.request(
                self.command,
                quote(upstream_path, safe="/%?=&+:@,;"),
                body=body or None,
                headers=headers,
            )
            response = connection.getresponse()
            out_headers = {
                k: v
                for k, v in response.getheaders()
                if k.lower() not in _HOP_BY_HOP
                and not (patch_json and k.lower() == "content-length")
            }
            if "location" in {k.lower() for k in out_headers}:
                out_headers = {
                    k: (v.replace(state.upstream, state.url) if k.lower() == "location" else v)
                    for k, v in out_headers.items()
                }
            if self.command == "HEAD":
                self._send(response.status, b"", out_headers)
                return
            length = response.getheader("Content-Length")
            if patch_json is None and length is not None:
                self._stream(response, out_headers)
                return
            payload = response.read()
            if patch_json is not None and response.status == 200:
                payload = json.dumps(patch_json(json.loads(payload))).encode()
            out_headers.pop("Content-Length", None)
            out_headers.pop("content-length", None)
            self._send(response.status, payload, out_headers)
        finally:
            connection.close()

    def _stream(self, response: http.client.HTTPResponse, headers: Mapping[str, str]) -> None:
        self.send_response(response.status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        while chunk := response.read(1 << 16):
            self.wfile.write(chunk)
        self._status = response.status


def _checked_repo_path(path: str) -> str:
    parts = path.split("/")
    if (
        not path
        or path.startswith("/")
        or any(p in ("", ".", "..") for p in parts)
        or parts[0] == ".git"
    ):
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return path
