"""Faults: a killed process, a full disk, two writers on one output."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from rvhub import extract_vector
from tests.cli_helpers import assert_clean_failure, run, tree_snapshot
from tests.models import build_model, finetune_like, save


@pytest.fixture(scope="module")
def big_pair(tmp_path_factory):
    """A pair large enough (~60 MB each) that extraction takes a moment to kill."""
    root = tmp_path_factory.mktemp("big")
    out = {}
    for i, role in enumerate(("a", "b")):
        model = build_model(
            "llama",
            seed=0,
            vocab_size=32000,
            hidden_size=512,
            intermediate_size=512,
            num_hidden_layers=1,
        )
        finetune_like(model, seed=i)
        out[role] = save(model, root / role)
    return out


def _rvhub(*args: object) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "rvhub.cli", *map(str, args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "RVHUB_DISABLE_PROGRESS_BARS": "1"},
    )


def _kill_when_temp_appears(proc: subprocess.Popen, parent: Path, name: str) -> None:
    deadline = time.time() + 60
    while time.time() < deadline:
        if any(p.name.startswith(f".{name}.rvhub-tmp-") for p in parent.iterdir()):
            time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        if proc.poll() is not None:
            pytest.fail(
                f"finished before it could be killed: {proc.stderr.read().decode() if proc.stderr else ''}"
            )
        time.sleep(0.005)
    pytest.fail("no temp folder appeared")


def _wait_for_temp(proc: subprocess.Popen, parent: Path, name: str) -> None:
    deadline = time.time() + 60
    while time.time() < deadline:
        if any(p.name.startswith(f".{name}.rvhub-tmp-") for p in parent.iterdir()):
            return
        if proc.poll() is not None:
            pytest.fail("finished before the temp folder appeared")
        time.sleep(0.005)
    pytest.fail("no temp folder appeared")


def _long_command(command: str, big_pair: dict, tmp_path: Path, out: Path) -> list[object]:
    """An extract or apply of the big pair into ``out``, long enough to interrupt."""
    if command == "extract":
        return ["extract", big_pair["a"], big_pair["b"], "-o", out, "--dtype", "float32"]
    vec = extract_vector(big_pair["a"], big_pair["b"]).save(tmp_path / "vec", dtype="float32")
    return ["apply", vec, big_pair["b"], "-o", out]


@pytest.mark.parametrize("command", ["extract", "apply"])
def test_sigterm_removes_the_temp_output_and_the_lock(big_pair, tmp_path, command):
    out = tmp_path / "out"
    proc = _rvhub(*_long_command(command, big_pair, tmp_path, out))
    _wait_for_temp(proc, tmp_path, "out")
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert b"Terminated; the output path was left as it was." in err
    assert b"Traceback" not in err
    assert not out.exists()
    left = [p.name for p in tmp_path.iterdir() if ".rvhub-" in p.name]
    assert left == [], left


@pytest.mark.parametrize("command", ["extract", "apply"])
def test_sigkill_leaves_no_output_and_the_rerun_cleans_up(big_pair, tmp_path, command):
    out = tmp_path / "out"
    args = _long_command(command, big_pair, tmp_path, out)
    proc = _rvhub(*args)
    _kill_when_temp_appears(proc, tmp_path, "out")
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists(), "a killed run must not leave a partial output"
    stale = [p for p in tmp_path.iterdir() if ".rvhub-tmp-" in p.name]
    assert stale, "the killed run's temp folder is what the rerun must clean"
    assert run(*args).exit_code == 0
    assert out.is_dir()
    assert [
        p.name for p in tmp_path.iterdir() if ".rvhub-tmp-" in p.name or "rvhub-lock" in p.name
    ] == []


def test_concurrent_writer_on_the_same_output_is_refused(family, tmp_path):
    fam = family("qwen2")
    vec = extract_vector(fam["a"], fam["b"]).save(tmp_path / "vec")
    out = tmp_path / "out"
    lock = tmp_path / ".out.rvhub-lock"
    fd = os.open(lock, os.O_CREAT | os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another rvhub run holds the output
    try:
        r = run("apply", vec, fam["target"], "-o", out)
        assert_clean_failure(r, match="another rvhub process is writing", output=out)
    finally:
        os.close(fd)
    assert run("apply", vec, fam["target"], "-o", out).exit_code == 0


def test_two_real_apply_runs_do_not_interleave(big_pair, tmp_path):
    vec = extract_vector(big_pair["a"], big_pair["b"]).save(tmp_path / "vec")
    out = tmp_path / "out"
    procs = [_rvhub("apply", vec, big_pair["b"], "-o", out, "--overwrite") for _ in range(2)]
    codes = [p.wait() for p in procs]
    errors = [p.stderr.read().decode() for p in procs if p.stderr]
    assert 0 in codes, errors
    for code, err in zip(codes, errors, strict=True):
        assert code == 0 or "another rvhub process is writing" in err, err
    from safetensors.torch import load_file

    load_file(out / "model.safetensors")  # whole and readable: one writer's complete output


@pytest.fixture
def tiny_disk(tmp_path):
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("needs root and mount(8) to make a size-limited tmpfs")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"this machine does not allow mounting a tmpfs: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_full_disk_gives_a_clear_error_and_keeps_the_old_output(tiny_disk, tmp_path):
    a = save(build_model("llama", seed=0, dtype=torch.bfloat16, vocab_size=16384), tmp_path / "a")
    model = build_model("llama", seed=0, dtype=torch.bfloat16, vocab_size=16384)
    finetune_like(model, seed=1)
    b = save(model, tmp_path / "b")
    out = tiny_disk / "vec"
    out.mkdir()
    (out / "old.txt").write_text("the previous vector")
    before = tree_snapshot(out)
    r = run("extract", a, b, "-o", out, "--overwrite")
    assert_clean_failure(r, match="no space left", output=out, before=before)


def test_sigkill_during_compress_leaves_no_output(big_pair, tmp_path):
    vec = extract_vector(big_pair["a"], big_pair["b"]).save(tmp_path / "vec", dtype="float32")
    out = tmp_path / "out"
    args = ["compress", vec, "-o", out, "--encoding", "lora", "--rank", "8", "--svd", "exact"]
    proc = _rvhub(*args)
    _kill_when_temp_appears(proc, tmp_path, "out")
    assert not out.exists()
    assert run(*args).exit_code == 0
    assert (out / "adapter_config.json").exists()
    assert [p.name for p in tmp_path.iterdir() if ".rvhub-tmp-" in p.name] == []
