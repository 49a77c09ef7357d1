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

from ..errors import InputError

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


def check_output(
    path: str | os.PathLike[str],
    *,
    overwrite: bool,
    inputs: Iterable[str | os.PathLike[str] | None] = (),
    folder: bool = True,
) -> None:
    """The one output check every writer (extract, compress, apply, eval, card, merge) runs
        before any long work, and again when it renames its result into place: an output that is,
        contains or lies inside one of ``inputs`` is refused (with ``overwrite`` it would destroy
        what it reads), and so is an existing one unless ``overwrite`` (or, for a ``folder`` output,
    an existing file)."""
    out = Path(path)
    resolved = out.expanduser().resolve()
    for inp in inputs:
        if inp is None:
            continue
        i = Path(inp).expanduser().resolve()
        if not i.exists():  # a Hub id, not a local path
            continue
        if resolved == i or i in resolved.parents or resolved in i.parents:
            raise InputError(
                f"the output {out} is, contains or lies inside an input ({inp}); write to "
                "another folder"
            )
    if out.exists() and not overwrite:
        raise InputError(f"{out} already exists; pass `overwrite=True` to replace it")
    if folder and out.exists() and not out.is_dir():
        raise InputError(f"{out} exists and is not a folder")


def _unwritable(final: Path, exc: OSError) -> InputError:
    reason = exc.strerror or type(exc).__name__
    return InputError(f"cannot write {final}: {reason} (in {final.parent})")


PARTIAL_MARK = ".rvhub-partial"


def partial_dir(final: str | os.PathLike[str]) -> Path:
    """Where a resumable writer of ``final`` keeps its work between runs (see :func:`atomic_dir`)."""
    final = Path(final).expanduser().absolute()
    return final.parent / f".{final.name}{PARTIAL_MARK}"


@contextlib.contextmanager
def _output_lock(final: Path) -> Iterator[None]:
    """One writer per output path at a time (a lock file beside it)."""
    lock_path = final.parent / f".{final.name}.rvhub-lock"
    try:
        lock_fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o644)
    except OSError as e:
        raise _unwritable(final, e) from None
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(
                f"another rvhub process is writing {final}; wait for it or choose another output"
            ) from None
        yield
    finally:
        os.close(lock_fd)
        with contextlib.suppress(OSError):
            os.unlink(lock_path)


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished ``tmp`` over ``final`` (an old ``final`` goes in one more rename)."""
    fsync_dir(tmp)
    parent = final.parent
    if final.exists():
        trash = parent / f".{final.name}{TMP_MARK}{os.getpid()}-old-{uuid.uuid4().hex[:8]}"
        os.rename(final, trash)
        os.rename(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, final)
    fsync_dir(parent)


@contextlib.contextmanager
def atomic_dir(
    final: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike[str] | None] = (),
    resumable: bool = False,
) -> Iterator[Path]:
    """Yield a fresh temp folder; on success it replaces ``final`` in one rename.

    ``final`` passes :func:`check_output` (``overwrite``, ``inputs``) before and at the rename.
    ``resumable``: the work folder is :func:`partial_dir` (``.<name>.rvhub-partial``), reused
    as found and kept when the work fails or is interrupted, so a later run can take up what
    was finished; the caller decides what in it is still valid.

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
    inputs = list(inputs)
    check_output(final, overwrite=overwrite, inputs=inputs)
    with _output_lock(final):
        clean_stale_temps(parent, final.name)
        if resumable:
            tmp = partial_dir(final)
        else:
            tmp = parent / f".{final.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir(exist_ok=resumable)
        except OSError as e:
            raise _unwritable(final, e) from None
        try:
            yield tmp
            check_output(final, overwrite=overwrite, inputs=inputs)  # created meanwhile?
            _publish(tmp, final)
        except BaseException as exc:
            if not resumable:
                shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                raise InputError(
                    f"no space left on the device while writing {final}; free space and retry "
                    "(nothing was written there)"
                ) from None
            raise


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
