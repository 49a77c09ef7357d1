"""Shared fixtures: tiny real model families on disk, built once per session."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers

from tests.models import make_family

pytest_plugins = ["tests.hub_server.fixtures"]

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
os.environ.setdefault("RVHUB_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(autouse=True)
def _isolated_rvhub_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keep the verification cache out of the user's home."""
    monkeypatch.setenv("RVHUB_CACHE", str(tmp_path_factory.getbasetemp() / "rvhub-cache"))


@pytest.fixture(scope="session")
def family(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., dict[str, Path]]:
    """``family(arch, dtype=torch.bfloat16)`` -> {"a", "b", "target"} checkpoint folders (cached)."""
    cache: dict[tuple[str, torch.dtype], dict[str, Path]] = {}

    def build(arch: str, dtype: torch.dtype = torch.bfloat16) -> dict[str, Path]:
        key = (arch, dtype)
        if key not in cache:
            root = tmp_path_factory.mktemp(f"{arch}-{str(dtype).split('.')[-1]}")
            cache[key] = make_family(root, arch, dtype)
        return cache[key]

    return build


BAD_INPUT_SUITE = "tests/test_bad_inputs.py::"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the bad-input suite's count (the README's reliability section quotes it)."""
    passed = [
        r.nodeid
        for r in terminalreporter.stats.get("passed", [])
        if r.nodeid.startswith(BAD_INPUT_SUITE)
    ]
    if not passed:
        return
    failed = [
        r for r in terminalreporter.stats.get("failed", []) if r.nodeid.startswith(BAD_INPUT_SUITE)
    ]
    distinct = {n.split("::", 1)[1].split("[")[0] for n in passed}
    terminalreporter.write_line(
        f"bad-input suite: {len(passed)} cases ({len(distinct)} kinds of bad input) each refused "
        f"with one clear line, a non-zero exit, no traceback and the output untouched; {len(failed)} failed"
    )
