"""Extract, apply and compress on several threads give the bytes of the one-thread run, and the
hashes: BLAKE3 file digests (format 2), format-1 (sha256) artifacts still read and checked."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from rvhub import IntegrityError, extract_vector, load_vector
from rvhub.io.hashing import hash_file
from rvhub.io.stream import ordered
from tests.cli_helpers import assert_clean_failure, run
from tests.fp8_models import fp8_family
from tests.models import make_family

# the embedding (4608 × 256) and the FP8 MLP weights (4200 × 256, ragged blocks) are more
# than one 1M-element slab, so one tensor's slabs run on several threads at once
BIG = {"vocab_size": 4608, "hidden_size": 256, "intermediate_size": 4200}
SAME_MANIFEST_KEYS = ("tensors", "stats", "files", "sources", "dtype", "excluded")


@pytest.fixture(scope="module")
def big_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("big")
    return make_family(root, "qwen2", torch.bfloat16, num_attention_heads=4, **BIG)


@pytest.fixture(scope="module")
def big_fp8(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return fp8_family(tmp_path_factory.mktemp("big-fp8"), **BIG)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix == ".safetensors"}


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "rvhub.json").read_text())


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_extract_is_bit_identical_on_any_number_of_threads(big_family, big_fp8, tmp_path, fp8):
    fam = big_fp8 if fp8 else big_family
    outs = [
        extract_vector(fam["a"], fam["b"]).save(tmp_path / f"v{n}", threads=n) for n in (1, 2, 3)
    ]
    first, manifest = _files(outs[0]), _manifest(outs[0])
    embed = manifest["tensors"]["model.embed_tokens.weight"]["shape"]
    assert embed[0] * embed[1] > 1024 * 1024  # several slabs of one tensor
    assert manifest["sources"]["a"]["content_fingerprint"]  # read whole, in slabs
    for out in outs[1:]:
        assert _files(out) == first
        again = _manifest(out)
        for key in SAME_MANIFEST_KEYS:
            assert again[key] == manifest[key], key


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("scale", ["1", "0.7"])
def test_apply_is_bit_identical_on_any_number_of_threads(big_family, big_fp8, tmp_path, fp8, scale):
    fam = big_fp8 if fp8 else big_family
    vec = extract_vector(fam["a"], fam["b"]).save(tmp_path / "v")
    outs = []
    for n in (1, 3):
        out = tmp_path / f"out{n}"
        r = run("apply", vec, fam["target"], "-o", out, "--scale", scale, "--threads", n)
        assert r.exit_code == 0, r.output
        outs.append(out)
    assert _files(outs[0]) == _files(outs[1])
    one, three = (json.loads((o / "rvhub_applied.json").read_text()) for o in outs)
    assert one.get("requantization") == three.get("requantization")
    assert ("requantization" in one) == fp8


def test_cli_threads_option_on_extract_and_compress(big_family, tmp_path):
    vec, lora = tmp_path / "v", tmp_path / "lora"
    r = run("extract", big_family["a"], big_family["b"], "-o", vec, "--threads", "2")
    assert r.exit_code == 0, r.output
    r = run("compress", vec, "-o", lora, "--encoding", "lora", "--rank", "4", "--threads", "1")
    assert r.exit_code == 0, r.output
    assert (lora / "adapter_model.safetensors").is_file()


def test_threads_below_one_are_refused(big_family, tmp_path):
    out = tmp_path / "v"
    r = run("extract", big_family["a"], big_family["b"], "-o", out, "--threads", "0")
    assert_clean_failure(r, match="--threads", output=out, before=None)


def test_ordered_keeps_order_and_raises_at_the_failing_task():
    seen: list[str] = []

    def task(i: int):
        def run_it() -> int:
            seen.append(threading.current_thread().name)
            if i == 5:
                raise ValueError("task 5")
            return i * i

        return run_it

    results = ordered((task(i) for i in range(5)), 3)
    assert list(results) == [0, 1, 4, 9, 16]
    assert any(name.startswith("rvhub-slab") for name in seen)
    got = []
    with pytest.raises(ValueError, match="task 5"):
        for r in ordered((task(i) for i in range(20)), 3):
            got.append(r)
    assert got == [i * i for i in range(5)]


# -- hashes ---------------------------------------------------------------------------------


def _as_format_1(folder: Path) -> None:
    """Rewrite a fresh artifact's manifest as rvhub 0.1 wrote it: sha256 per file."""
    m = _manifest(folder)
    m["format_version"] = 1
    for name, info in m["files"].items():
        del info["blake3"]
        info["sha256"] = hash_file(folder / name, "sha256")
    (folder / "rvhub.json").write_text(json.dumps(m))


def test_format_1_artifacts_are_read_and_checked_by_sha256(family, tmp_path):
    fam = family("qwen2")
    out = extract_vector(fam["a"], fam["b"]).save(tmp_path / "v")
    loaded = load_vector(out)
    fresh = {n: loaded.get(n) for n in loaded}
    _as_format_1(out)
    r = run("verify", out)
    assert r.exit_code == 0 and "match their sha256" in r.output, r.output
    v = load_vector(out)
    assert all(torch.equal(v.get(n), t) for n, t in fresh.items())
    weights = out / "vector.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="does not match its sha256"):
        load_vector(out)


def test_a_manifest_of_format_2_needs_blake3_digests(family, tmp_path):
    fam = family("qwen2")
    out = extract_vector(fam["a"], fam["b"]).save(tmp_path / "v")
    m = _manifest(out)
    assert m["format_version"] == 2
    info = m["files"]["vector.safetensors"]
    info["sha256"] = hash_file(out / "vector.safetensors", "sha256")
    del info["blake3"]  # a format-2 manifest with only a sha256: refused, not trusted
    (out / "rvhub.json").write_text(json.dumps(m))
    with pytest.raises(IntegrityError, match="lacks a blake3"):
        load_vector(out)


def test_blake3_of_a_file_matches_on_any_number_of_threads(tmp_path):
    import blake3

    path = tmp_path / "blob"
    data = torch.randint(0, 255, (3 << 20,), dtype=torch.uint8).numpy().tobytes()
    path.write_bytes(data)
    expected = blake3.blake3(data).hexdigest()
    assert hash_file(path, threads=1) == hash_file(path, threads=4) == expected
    (tmp_path / "empty").write_bytes(b"")
    assert hash_file(tmp_path / "empty") == blake3.blake3(b"").hexdigest()
