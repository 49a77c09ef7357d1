"""Run olah (PyPI ``olah``, a self-hosted Hub mirror) offline on 127.0.0.1 over local git repos.

olah 0.5.x in offline mode serves, for every git repo at ``<repos_dir>/models/<org>/<name>``,
the Hub's read API: ``/api/models/<id>/revision/<rev>``, ``/paths-info``, ``/tree``, ``/refs``
and ``/<id>/resolve/<rev>/<file>`` (LFS content read from ``.git/lfs/objects``). New commits
are visible at once (``metadata-cache-ttl = 0``). It has no auth, no private repos and no write
endpoints: `write_standin.WriteStandin` adds those in front of it.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

OLAH_CLI = "olah-cli"


def olah_cli_path() -> str | None:
    """Path of ``olah-cli``: next to the running interpreter first (a venv not on PATH), else PATH."""
    beside_python = Path(sys.executable).parent / OLAH_CLI
    if beside_python.is_file():
        return str(beside_python)
    return shutil.which(OLAH_CLI)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class OlahServer:
    """One olah process. ``start()`` blocks until it answers; ``stop()`` ends it by PID."""

    def __init__(
        self, repos_dir: Path, work_dir: Path, *, public_netloc: str | None = None
    ) -> None:
        self.repos_dir = Path(repos_dir)
        self.work_dir = Path(work_dir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # Where olah says its own files live when it builds absolute URLs (the stand-in, when
        # it fronts olah, so redirects come back through it).
        self.public_netloc = public_netloc or f"127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.work_dir / "olah.out"

    def write_config(self) -> Path:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        (self.work_dir / "cache").mkdir(exist_ok=True)
        config = self.work_dir / "olah.toml"
        config.write_text(
            "[basic]\n"
            'host = "127.0.0.1"\n'
            f"port = {self.port}\n"
            f'repos-path = "{self.work_dir / "cache"}"\n'
            f'mirrors-path = ["{self.repos_dir}"]\n'
            'mirror-scheme = "http"\n'
            f'mirror-netloc = "{self.public_netloc}"\n'
            f'mirror-lfs-netloc = "{self.public_netloc}"\n'
            "metadata-cache-ttl = 0\n"
            "\n[accessibility]\n"
            "offline = true\n"
        )
        return config

    def start(
        self, *, ready_path: str = "/api/models/olah-probe/ready/revision/main", timeout: float = 60
    ) -> None:
        cli = olah_cli_path()
        if cli is None:
            raise RuntimeError("olah-cli not found; run .ci/hub-setup.sh (pip install olah)")
        config = self.write_config()
        self.repos_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [cli, "-c", str(config)],
            cwd=self.work_dir,  # olah writes ./logs
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        atexit.register(self.stop)  # if a session dies before its teardown
        self._wait_ready(ready_path, timeout)

    def _wait_ready(self, path: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"olah exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(self.url + path, timeout=2) as response:
                    response.read()
                return
            except urllib.error.HTTPError:
                return  # it answers: any HTTP status means the app is up
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"olah did not answer within {timeout}s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        pid = self.process.pid
        os.kill(pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(pid, signal.SIGKILL)
            self.process.wait(timeout=10)
