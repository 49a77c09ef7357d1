"""Hub repos as plain git repos, laid out the way olah's local-mirror mode reads them.

A repo ``org/name`` of type ``model`` lives at ``<repos_dir>/models/org/name`` as a non-bare git
repo on branch ``main``. LFS files are committed as git-lfs pointer blobs and their content is
stored in ``.git/lfs/objects/<aa>/<bb>/<sha256>`` (git-lfs' own layout, which olah reads
directly). Commits are written with git plumbing into a throw-away index, so no working tree is
ever checked out and concurrent readers (olah) only ever see complete commits.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

REPO_TYPE_DIRS = {"model": "models", "dataset": "datasets", "space": "spaces"}

# What the Hub commits as `.gitattributes` when it creates a repo (trimmed to the patterns that
# matter here); the format is exactly what `git lfs track "*.safetensors"` writes.
DEFAULT_LFS_PATTERNS = (
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gguf", "*.gz", "*.h5", "*.joblib",
    "*.lfs.*", "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot",
    "*.parquet", "*.pb", "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors",
    "saved_model/**/*", "*.tar.*", "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip",
    "*.zst", "*tfevents*",
)  # fmt: skip
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n" for pattern in DEFAULT_LFS_PATTERNS
)

# Files above this size go to LFS whatever their name (the Hub's rule too).
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024

_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/v1\noid sha256:"
_GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "hub-standin",
    "GIT_AUTHOR_EMAIL": "hub-standin@localhost",
    "GIT_COMMITTER_NAME": "hub-standin",
    "GIT_COMMITTER_EMAIL": "hub-standin@localhost",
}


class GitStoreError(Exception):
    """A git operation on a stored repo failed (bad revision, missing path, ...)."""


class ParentMismatchError(GitStoreError):
    """The branch moved since the commit the client based its change on."""


@dataclass(frozen=True)
class TreeEntry:
    mode: str
    blob: str  # git blob sha1 (of the pointer file, for LFS files)
    lfs_oid: str | None  # sha256 of the content, for LFS files
    size: int  # content size (LFS content size for LFS files)

    @property
    def hub_oid(self) -> str:
        """The oid the Hub's preupload endpoint reports: sha256 for LFS, git blob sha1 otherwise."""
        return self.lfs_oid or self.blob


def lfs_pointer(oid: str, size: int) -> bytes:
    return _POINTER_PREFIX + f"{oid}\nsize {size}\n".encode()


def parse_lfs_pointer(data: bytes) -> tuple[str, int] | None:
    if not data.startswith(_POINTER_PREFIX) or len(data) > 200:
        return None
    lines = data.decode("ascii", errors="replace").splitlines()
    try:
        oid = lines[1].removeprefix("oid sha256:")
        size = int(lines[2].removeprefix("size "))
    except (IndexError, ValueError):
        return None
    return oid, size


def git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_patterns(gitattributes: str) -> list[str]:
    return [
        line.split()[0]
        for line in gitattributes.splitlines()
        if line.strip() and not line.startswith("#") and "filter=lfs" in line.split()[1:]
    ]


def matches_lfs_pattern(path: str, patterns: list[str]) -> bool:
    name = path.rsplit("/", 1)[-1]
    for pattern in patterns:
        target = path if "/" in pattern else name
        if fnmatch.fnmatchcase(target, pattern.replace("**/", "*")):
            return True
    return False


class GitRepo:
    """One Hub repo stored as a git repo that olah can serve."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.lock = threading.RLock()

    # -- plumbing ----------------------------------------------------------------------------

    def git(
        self, *args: str, input: bytes | None = None, env: Mapping[str, str] | None = None
    ) -> bytes:
        full_env = {**os.environ, **_GIT_IDENTITY, "GIT_CONFIG_NOSYSTEM": "1", **(env or {})}
        result = subprocess.run(
            ["git", "-C", str(self.path), *args],
            input=input,
            capture_output=True,
            env=full_env,
            check=False,
        )
        if result.returncode != 0:
            raise GitStoreError(
                f"git {' '.join(args)}: {result.stderr.decode(errors='replace').strip()}"
            )
        return result.stdout

    @property
    def exists(self) -> bool:
        return (self.path / ".git").is_dir()

    @property
    def lfs_objects_dir(self) -> Path:
        return self.path / ".git" / "lfs" / "objects"

    def create(
        self,
        *,
        private: bool = False,
        gitattributes: str = DEFAULT_GITATTRIBUTES,
        author: str | None = None,
    ) -> None:
        """Start the repo like the Hub does: one commit holding a `.gitattributes` for LFS."""
        self.path.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["git", "init", "--quiet", "--initial-branch=main", str(self.path)],
            check=True,
            capture_output=True,
        )
        self.set_setting("private", "true" if private else "false")
        self.commit("initial commit", add={".gitattributes": gitattributes.encode()}, author=author)

    def resolve(self, revision: str) -> str | None:
        """Commit sha of a branch, tag, ``refs/pr/N`` or (abbreviated) sha; None if unknown."""
        try:
            return (
                self.git("rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}")
                .decode()
                .strip()
            )
        except GitStoreError:
            return None

    def branch_head(self, branch: str) -> str | None:
        return (
            self.resolve(f"refs/heads/{branch}")
            if not branch.startswith("refs/")
            else self.resolve(branch)
        )

    def read_blob(self, blob: str) -> bytes:
        return self.git("cat-file", "blob", blob)

    def tree(self, commit: str | None) -> dict[str, TreeEntry]:
        """All files of a commit, LFS pointers decoded."""
        if commit is None:
            return {}
        out = self.git("ls-tree", "-r", "-l", "-z", commit)
        entries: dict[str, TreeEntry] = {}
        for record in out.split(b"\0"):
            if not record:
                continue
            meta, path = record.split(b"\t", 1)
            mode, _type, blob, size = meta.decode().split()
            lfs_oid, content_size = None, int(size)
            if int(size) < 200:
                pointer = parse_lfs_pointer(self.read_blob(blob))
                if pointer is not None:
                    lfs_oid, content_size = pointer
            entries[path.decode()] = TreeEntry(mode, blob, lfs_oid, content_size)
        return entries

    def read_file(self, commit: str, path: str) -> bytes | None:
        entry = self.tree(commit).get(path)
        if entry is None:
            return None
        if entry.lfs_oid is not None:
            return self.lfs_object_path(entry.lfs_oid).read_bytes()
        return self.read_blob(entry.blob)

    def lfs_patterns_at(self, commit: str | None) -> list[str]:
        if commit is None:
            return list(DEFAULT_LFS_PATTERNS)
        entry = self.tree(commit).get(".gitattributes")
        return lfs_patterns(self.read_blob(entry.blob).decode()) if entry else []

    # -- LFS objects ---------------------------------------------------------------------------

    def lfs_object_path(self, oid: str) -> Path:
        return self.lfs_objects_dir / oid[:2] / oid[2:4] / oid

    def has_lfs_object(self, oid: str) -> bool:
        return self.lfs_object_path(oid).is_file()

    def store_lfs_object(self, data: bytes, *, expected_oid: str | None = None) -> str:
        oid = hashlib.sha256(data).hexdigest()
        if expected_oid is not None and oid != expected_oid:
            raise GitStoreError(f"sha256 mismatch: expected {expected_oid}, got {oid}")
        target = self.lfs_object_path(oid)
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
            tmp.write(data)
        os.replace(tmp.name, target)
        return oid

    # -- commits -------------------------------------------------------------------------------

    def commit(
        self,
        message: str,
        *,
        add: Mapping[str, bytes] | None = None,
        add_lfs: Mapping[str, tuple[str, int]] | None = None,
        delete: tuple[str, ...] = (),
        delete_folders: tuple[str, ...] = (),
        branch: str = "main",
        base: str | None = None,
        expected_head: str | None = None,
        allow_empty: bool = False,
        author: str | None = None,
    ) -> str | None:
        """Write one commit and move ``branch`` (a name or a full ``refs/...`` ref) to it.

        ``add`` holds regular files (bytes are committed as they are); ``add_lfs`` maps a path to
        ``(sha256, size)`` of an LFS object already stored. ``base`` is the commit to start from
        (default: the branch head). ``expected_head`` makes the commit fail with
        `ParentMismatchError` if the branch head moved. ``author`` names the pushing user. Returns the new commit sha, or None when
        nothing changed and ``allow_empty`` is false.
        """
        ref = branch if branch.startswith("refs/") else f"refs/heads/{branch}"
        with self.lock:
            head = self.resolve(ref)
            if expected_head is not None and head != expected_head:
                raise ParentMismatchError(f"{ref} is at {head}, not {expected_head}")
            parent = base if base is not None else head
            files = self.tree(parent)
            before = dict(files)
            for path in delete:
                if path not in files:
                    raise FileNotFoundError(path)
                del files[path]
            for folder in delete_folders:
                prefix = folder.rstrip("/") + "/"
                doomed = [p for p in files if p.startswith(prefix)]
                if not doomed:
                    raise FileNotFoundError(folder)
                for path in doomed:
                    del files[path]
            for path, data in (add or {}).items():
                blob = self.git("hash-object", "-w", "--stdin", input=data).decode().strip()
                files[path] = TreeEntry("100644", blob, None, len(data))
            for path, (oid, size) in (add_lfs or {}).items():
                if not self.has_lfs_object(oid):
                    raise GitStoreError(f"LFS object {oid} for {path!r} was never uploaded")
                pointer = lfs_pointer(oid, size)
                blob = self.git("hash-object", "-w", "--stdin", input=pointer).decode().strip()
                files[path] = TreeEntry("100644", blob, oid, size)
            if files == before and not allow_empty and parent is not None:
                return None
            with tempfile.TemporaryDirectory() as tmp:
                env = {"GIT_INDEX_FILE": os.path.join(tmp, "index")}
                index_info = "".join(f"{e.mode} {e.blob}\t{p}\n" for p, e in files.items())
                self.git(
                    "update-index", "--add", "--index-info", input=index_info.encode(), env=env
                )
                tree = self.git("write-tree", env=env).decode().strip()
            parents = ["-p", parent] if parent else []
            who = (
                {"GIT_AUTHOR_NAME": author, "GIT_AUTHOR_EMAIL": f"{author}@users.noreply.localhost"}
                if author
                else {}
            )
            new = self.git(
                "commit-tree", tree, *parents, "-F", "-", input=message.encode(), env=who
            )
            new_sha = new.decode().strip()
            self.git("update-ref", ref, new_sha, head or "0" * 40)
            return new_sha

    def next_pr_ref(self) -> tuple[int, str]:
        refs = self.git("for-each-ref", "--format=%(refname)", "refs/pr/").decode().split()
        numbers = [int(r.rsplit("/", 1)[-1]) for r in refs if r.rsplit("/", 1)[-1].isdigit()]
        number = max(numbers, default=0) + 1
        return number, f"refs/pr/{number}"

    def log(self, revision: str) -> list[dict[str, str]]:
        out = self.git(
            "log",
            "-z",
            "--date=format-local:%Y-%m-%dT%H:%M:%S.000Z",  # the Hub's format, in UTC (TZ below)
            "--format=%H%x1f%an%x1f%ad%x1f%s%x1f%b",
            revision,
            env={"TZ": "UTC"},
        ).decode()
        commits = []
        for record in out.split("\0"):
            if not record.strip():
                continue
            sha, author, date, subject, body = record.lstrip("\n").split("\x1f", 4)
            commits.append(
                {
                    "id": sha,
                    "author": author,
                    "date": date,
                    "title": subject,
                    "message": body.strip(),
                }
            )
        return commits

    # -- settings kept in the repo's own git config ---------------------------------------------

    def get_setting(self, key: str) -> str | None:
        try:
            return self.git("config", "--get", f"hub.{key}").decode().strip()
        except GitStoreError:
            return None

    def set_setting(self, key: str, value: str) -> None:
        self.git("config", f"hub.{key}", value)


def repo_path(repos_dir: Path, repo_id: str, repo_type: str = "model") -> Path:
    if repo_type not in REPO_TYPE_DIRS:
        raise ValueError(f"unknown repo type {repo_type!r}")
    org, sep, name = repo_id.partition("/")
    if not sep or not org or not name or "/" in name or ".." in (org, name):
        raise ValueError(f"repo id must be 'namespace/name', got {repo_id!r}")
    return Path(repos_dir) / REPO_TYPE_DIRS[repo_type] / org / name


def delete_repo(path: Path) -> None:
    shutil.rmtree(path)
