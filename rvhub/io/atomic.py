"""Atomic outputs: folders built in a hidden temp folder beside the target, then renamed, and
single files written through a temp file, then renamed.

A run that fails, is interrupted or is killed leaves the output path as it was. Temp folders
carry the writer's PID, so a later run removes those whose writer is gone; a lock file
serialises two runs writing the same output.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from ..errors import InputError, RvhubError

TMP_MARK = ".rvhub-tmp-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(parent: Path, name: str) -> None:
    """Remove temp folders for ``name`` left by runs that no longer exist (e.g. SIGKILLed)."""
    prefix = f".{name}{TMP_MARK}"
    with contextlib.suppress(OSError):
        for entry in parent.iterdir():
            if not entry.name.startswith(prefix):
                continue
            pid_text = entry.name[len(prefix) :].split("-", 1)[0]
            if pid_text.isdigit() and not _pid_alive(int(pid_text)):
                shutil.rmtree(entry, ignore_errors=True)


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def check_output(path: Path, *, overwrite: bool) -> None:
    """Refuse an existing output path unless ``overwrite``; call before any long work."""
    if path.exists() and not overwrite:
        raise InputError(f"{path} already exists; pass `overwrite=True` to replace it")
    if path.exists() and not path.is_dir():
        raise InputError(f"{path} exists and is not a folder")


def check_disjoint(out: Path, inputs: Iterable[str | os.PathLike[str] | None]) -> None:
    """Refuse an output that is, contains or lies inside one of ``inputs`` (with --overwrite
    it would destroy what it reads)."""
    o = Path(out).expanduser().resolve()
    for inp in inputs:
        if inp is None:
            continue
        i = Path(inp).expanduser().resolve()
        if o == i or i in o.parents or o in i.parents:
            raise InputError(
                f"the output {out} is, contains or lies inside an input ({inp}); write to "
                "another folder"
            )


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temp folder; on success it replaces ``final`` in one rename.

    Example:
        >>> with atomic_dir("out/vector") as tmp:
        ...     (tmp / "rvhub.json").write_text("{}")
    """
    final = Path(final).expanduser().absolute()
    parent = final.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create {parent}: {e.strerror}") from None
    check_output(final, overwrite=overwrite)
    lock_path = parent / f".{final.name}.rvhub-lock"
    lock_fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(
                f"another rvhub process is writing {final}; wait for it or choose another output"
            ) from None
        clean_stale_temps(parent, final.name)
        tmp = parent / f".{final.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            yield tmp
            check_output(final, overwrite=overwrite)  # someone may have created it meanwhile
            fsync_dir(tmp)
            if final.exists():
                trash = parent / f".{final.name}{TMP_MARK}{os.getpid()}-old-{uuid.uuid4().hex[:8]}"
                os.rename(final, trash)
                os.rename(tmp, final)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.rename(tmp, final)
            fsync_dir(parent)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                raise RvhubError(
                    f"no space left on the device while writing {final}; free space and retry "
                    "(nothing was written there)"
                ) from None
            raise
    finally:
        os.close(lock_fd)
        with contextlib.suppress(OSError):
            os.unlink(lock_path)


def atomic_write(path: Path, data: bytes | str | Callable[[Path], object]) -> None:
    """Write one file through a temp file in the same folder, then rename it over ``path``.

    ``data`` is the content, or a function that writes the file at the path it is given.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    temporary = Path(tmp)
    try:
        if callable(data):
            data(temporary)
        elif isinstance(data, str):
            temporary.write_text(data, encoding="utf-8")
        else:
            temporary.write_bytes(data)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
