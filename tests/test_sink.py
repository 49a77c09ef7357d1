"""Output files written with O_DIRECT (``rvhub.io.sink``) hold the same bytes as through the
page cache, for the artifact and the applied model alike."""

from __future__ import annotations

import errno
import fcntl
import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rvhub import apply_to_checkpoint, extract_vector, load_vector
from rvhub.constants import ENV_BUFFERED_WRITES
from rvhub.io import sink
from tests.models import state_dict_of

SIZES = [0, 1, sink.ALIGN, 3 * sink.ALIGN, 3 * sink.ALIGN + 1, 10 * sink.ALIGN + 123]


@pytest.fixture
def small_stages(monkeypatch):
    """Three-block staging buffers and no size threshold, so tiny files take every path:
    full buffers, the buffer switch, and a padded, truncated last block."""
    monkeypatch.setattr(sink, "STAGE_BYTES", 3 * sink.ALIGN)
    monkeypatch.setattr(sink, "DIRECT_MIN_BYTES", 0)


def _write(path, pieces, size):
    s = sink.open_sink(path, size)
    for p in pieces:
        s.write(memoryview(p))
    s.close()
    return s.mode


def _pieces(data: bytes) -> list[bytes]:
    """Odd-sized pieces: a stage boundary falls inside most of them."""
    out, i, k = [], 0, 1
    while i < len(data):
        out.append(data[i : i + k])
        i += k
        k = k * 3 + 7
    return out


def _direct_ok(tmp_path) -> bool:
    probe = sink.open_sink(tmp_path / "probe", sink.DIRECT_MIN_BYTES)
    probe.abort()
    return probe.mode == "direct"


@pytest.mark.parametrize("size", SIZES)
def test_direct_and_buffered_files_hold_the_same_bytes(tmp_path, monkeypatch, small_stages, size):
    if not hasattr(os, "O_DIRECT") or not _direct_ok(tmp_path):
        pytest.skip("this file system refuses O_DIRECT")
    data = os.urandom(size)
    assert _write(tmp_path / "direct", _pieces(data), size) == "direct"
    monkeypatch.setenv(ENV_BUFFERED_WRITES, "1")
    assert _write(tmp_path / "buffered", _pieces(data), size) == "buffered"
    assert (tmp_path / "direct").read_bytes() == data == (tmp_path / "buffered").read_bytes()


def test_small_files_go_through_the_page_cache(tmp_path):
    assert _write(tmp_path / "f", [b"x" * 100], 100) == "buffered"
    assert (tmp_path / "f").read_bytes() == b"x" * 100


def test_a_file_system_that_refuses_o_direct_gets_buffered_writes(tmp_path, monkeypatch):
    """No file system here refuses O_DIRECT (tmpfs takes it on this Linux 6.18), so the refusal
    the probe write would meet (EINVAL) is raised for it."""
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this platform")
    real = os.pwrite

    def refusing(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", refusing)
    size = sink.DIRECT_MIN_BYTES + 5
    data = os.urandom(size)
    assert _write(tmp_path / "f", _pieces(data), size) == "buffered"
    assert (tmp_path / "f").read_bytes() == data


def test_extract_and_apply_write_the_same_files_direct_or_buffered(
    family, tmp_path, monkeypatch, small_stages
):
    if not hasattr(os, "O_DIRECT") or not _direct_ok(tmp_path):
        pytest.skip("this file system refuses O_DIRECT")
    fam = family("qwen2")
    modes: list[str] = []
    real_open = sink.open_sink

    def recording(path, size):
        s = real_open(path, size)
        modes.append(s.mode)
        return s

    monkeypatch.setattr(sink, "open_sink", recording)
    out = {}
    for how in ("direct", "buffered"):
        monkeypatch.setenv(ENV_BUFFERED_WRITES, "1" if how == "buffered" else "0")
        modes.clear()
        vec = extract_vector(fam["a"], fam["b"]).save(tmp_path / f"v-{how}")
        model = tmp_path / f"m-{how}"
        apply_to_checkpoint(load_vector(vec), fam["b"], model, scale=0.7)
        assert set(modes) == {how}, modes
        out[how] = (vec, model)
    for name in ("vector.safetensors", "lineage.safetensors"):
        assert (out["direct"][0] / name).read_bytes() == (out["buffered"][0] / name).read_bytes()
    # the manifests too, but for the time each was made (CI saw two saves a second apart)
    made = [json.loads((out[how][0] / "rvhub.json").read_text()) for how in ("direct", "buffered")]
    for manifest in made:
        manifest.pop("created_at")
    assert made[0] == made[1]
    direct_weights = sorted(p.name for p in out["direct"][1].glob("*.safetensors"))
    assert direct_weights
    for name in direct_weights:
        assert (out["direct"][1] / name).read_bytes() == (out["buffered"][1] / name).read_bytes()
    # the direct files are whole: the BLAKE3 check passes and transformers loads the model
    load_vector(out["direct"][0])
    model = AutoModelForCausalLM.from_pretrained(out["direct"][1], dtype=torch.bfloat16)
    written = {}
    for name in direct_weights:
        written.update(load_file(out["buffered"][1] / name))
    loaded = model.state_dict()
    assert set(written) <= set(loaded) and len(written) == len(state_dict_of(fam["b"]))
    for name, t in written.items():
        assert torch.equal(loaded[name], t), name
