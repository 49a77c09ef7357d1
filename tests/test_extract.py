"""Extraction: v = A − B streamed into a dense artifact, on real tiny transformers checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from rvhub import CompatibilityError, extract_vector, load_vector
from rvhub.encodings import dense as writer_mod
from rvhub.manifest import FORMAT, FORMAT_VERSION
from tests.cli_helpers import run
from tests.models import build_model, save, state_dict_of

ARCHS = ["qwen2", "llama", "gemma2"]


@pytest.mark.parametrize("arch", ARCHS)
def test_float32_vector_reproduces_a_exactly_from_bf16_sources(family, tmp_path, arch):
    fam = family(arch)
    out = extract_vector(fam["a"], fam["b"]).save(tmp_path / "v", dtype="float32")
    v = load_vector(out)
    a, b = state_dict_of(fam["a"]), state_dict_of(fam["b"])
    assert set(v.names) == set(a)
    for name in a:
        assert torch.equal(b[name].float() + v[name], a[name].float()), name
    manifest = json.loads((out / "rvhub.json").read_text())
    assert manifest["stats"]["roundtrip_error"]["abs"] == 0.0


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_vector_is_within_one_bf16_rounding(family, tmp_path, arch):
    fam = family(arch)
    v = load_vector(extract_vector(fam["a"], fam["b"]).save(tmp_path / "v"))
    a, b = state_dict_of(fam["a"]), state_dict_of(fam["b"])
    for name in a:
        exact = a[name].float() - b[name].float()
        stored = v.get(name, dtype=None)
        assert stored.dtype == torch.bfloat16
        # one rounding to bf16: error at most half an ulp of the delta (2^-8 relative)
        assert torch.all((stored.float() - exact).abs() <= exact.abs() * 2.0**-8), name
        assert torch.all(
            (b[name].float() + stored.float() - a[name].float()).abs() <= exact.abs() * 2.0**-8
        )


def test_manifest_records_sources_shapes_hashes_and_norms(family, tmp_path):
    fam = family("qwen2")
    out = extract_vector(fam["a"], fam["b"]).save(tmp_path / "v")
    m = json.loads((out / "rvhub.json").read_text())
    assert m["format"] == FORMAT and m["format_version"] == FORMAT_VERSION
    assert m["encoding"] == "dense" and m["math_dtype"] == "float32"
    assert m["sources"]["a"]["kind"] == "local" and m["sources"]["a"]["path"] == str(
        fam["a"].resolve()
    )
    assert len(m["sources"]["a"]["content_fingerprint"]) == 64
    assert m["sources"]["a"]["content_fingerprint"] != m["sources"]["b"]["content_fingerprint"]
    assert m["model"]["model_type"] == "qwen2" and m["model"]["architectures"] == [
        "Qwen2ForCausalLM"
    ]
    a = state_dict_of(fam["a"])
    b = state_dict_of(fam["b"])
    for name, info in m["tensors"].items():
        assert info["shape"] == list(a[name].shape)
        assert info["dtype"] == "BF16"
        expected = float(torch.linalg.vector_norm((a[name].float() - b[name].float()).double()))
        assert info["norm"] == pytest.approx(expected, rel=1e-5)
    assert "model.layers.0.self_attn.q_proj.bias" in m["tensors"]  # Qwen2's biases kept
    assert set(m["stats"]["layer_norms"]) == {"0", "1", "other"}
    import blake3

    weights = (out / "vector.safetensors").read_bytes()
    assert m["files"]["vector.safetensors"]["blake3"] == blake3.blake3(weights).hexdigest()
    assert "sha256" not in m["files"]["vector.safetensors"]


def test_content_hash_is_independent_of_sharding(family, tmp_path):
    fam = family("llama")
    from transformers import AutoModelForCausalLM

    resharded = tmp_path / "a-sharded"
    AutoModelForCausalLM.from_pretrained(fam["a"], dtype=torch.bfloat16).save_pretrained(
        resharded, max_shard_size="20KB"
    )
    assert (resharded / "model.safetensors.index.json").exists()
    one = json.loads(
        (extract_vector(fam["a"], fam["b"]).save(tmp_path / "v1") / "rvhub.json").read_text()
    )
    two = json.loads(
        (extract_vector(resharded, fam["b"]).save(tmp_path / "v2") / "rvhub.json").read_text()
    )
    assert one["sources"]["a"]["content_fingerprint"] == two["sources"]["a"]["content_fingerprint"]
    assert (
        one["files"]["vector.safetensors"]["blake3"] == two["files"]["vector.safetensors"]["blake3"]
    )


def test_large_vectors_are_sharded_like_transformers_checkpoints(family, tmp_path):
    fam = family("qwen2")
    out = extract_vector(fam["a"], fam["b"]).save(tmp_path / "v", max_shard_size="20KB")
    index = json.loads((out / "vector.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"vector-00001-of-{len(shards):05d}.safetensors"
    v = load_vector(out)
    a, b = state_dict_of(fam["a"]), state_dict_of(fam["b"])
    for name in a:
        assert torch.allclose(b[name].float() + v[name], a[name].float(), atol=1e-2)


def test_streaming_slabs_give_the_same_bytes(family, tmp_path, monkeypatch):
    fam = family("gemma2")
    whole = extract_vector(fam["a"], fam["b"]).save(tmp_path / "whole")
    monkeypatch.setattr(writer_mod, "SLAB_ELEMS", 1000)  # many slabs per tensor, odd boundaries
    sliced = extract_vector(fam["a"], fam["b"]).save(tmp_path / "sliced")
    assert (whole / "vector.safetensors").read_bytes() == (
        sliced / "vector.safetensors"
    ).read_bytes()


@pytest.mark.parametrize("writeback", ["every 4 KB", "unavailable"])
def test_early_writeback_leaves_the_bytes_alone(family, tmp_path, monkeypatch, writeback):
    from rvhub.io import sink as safetensors_io  # small files: buffered writes

    fam = family("qwen2")
    plain = extract_vector(fam["a"], fam["b"]).save(tmp_path / "plain")
    calls = []
    real = safetensors_io._sync_file_range
    if writeback == "unavailable":
        monkeypatch.setattr(safetensors_io, "_sync_file_range", None)
    else:

        def counting(fd, offset, nbytes, flags):
            calls.append(offset)
            return real(fd, offset, nbytes, flags)

        monkeypatch.setattr(safetensors_io, "_sync_file_range", counting)
        monkeypatch.setattr(safetensors_io, "WRITEBACK_BYTES", 4096)
    kicked = extract_vector(fam["a"], fam["b"]).save(tmp_path / "kicked")
    assert (plain / "vector.safetensors").read_bytes() == (
        kicked / "vector.safetensors"
    ).read_bytes()
    if writeback == "unavailable":
        assert calls == []
    else:
        assert real is not None, "this Linux C library has sync_file_range"
        # one run of increasing offsets per file written (the vector, lineage.safetensors)
        runs: list[list[int]] = []
        for offset in calls:
            if offset == 0:
                runs.append([])
            runs[-1].append(offset)
        assert calls[0] == 0 and max(len(run) for run in runs) >= 5
        assert all(run == sorted(run) and len(set(run)) == len(run) for run in runs)


def test_slab_pool_recycles_buffers_and_never_blocks():
    pool = writer_mod.SlabPool(1000, limit=2)
    a = pool.take(1000, torch.bfloat16)
    b = pool.take(10, torch.float32)  # another element size: another set of buffers
    pool.give(a, b, torch.empty(1000, dtype=torch.bfloat16))  # foreign tensors are ignored
    again = pool.take(700, torch.bfloat16)
    assert again.data_ptr() == a.data_ptr() and again.numel() == 700
    assert again.dtype == torch.bfloat16
    second = pool.take(1000, torch.float16)  # itemsize 2: the second pooled buffer
    extra = pool.take(1000, torch.bfloat16)  # past the limit: a plain allocation, no wait
    assert len({again.data_ptr(), second.data_ptr(), extra.data_ptr()}) == 3
    pool.give(again, second, extra)
    pool.give(again)  # giving twice does not hand one buffer out twice
    ptrs = {pool.take(1000, torch.bfloat16).data_ptr() for _ in range(3)}
    assert len(ptrs) == 3
    assert pool.take(5000, torch.bfloat16).numel() == 5000  # larger than a slab: not pooled


def test_a_fresh_extract_loads_without_rehashing_but_tampering_is_still_caught(
    family, tmp_path, monkeypatch
):
    import rvhub.manifest as load_mod
    from rvhub import IntegrityError

    fam = family("qwen2")
    out = extract_vector(fam["a"], fam["b"]).save(tmp_path / "v")
    monkeypatch.setattr(load_mod, "_verified_here", {})  # only the on-disk record is left

    def no_hashing(path, *args, **kwargs):
        raise AssertionError(f"re-hashed {path}")

    monkeypatch.setattr(load_mod, "hash_file", no_hashing)
    v = load_vector(out)  # the writer's own digest was recorded: no second pass
    assert set(v.names) == set(state_dict_of(fam["a"]))
    monkeypatch.undo()

    weights = out / "vector.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="does not match its blake3"):
        load_vector(out)


def test_exclude_skips_matching_tensors_and_records_them(family, tmp_path):
    fam = family("qwen2")
    out = extract_vector(fam["a"], fam["b"], exclude=["embed_tokens", r"norm\.weight$"]).save(
        tmp_path / "v"
    )
    v = load_vector(out)
    assert not any("embed_tokens" in n or n.endswith("norm.weight") for n in v.names)
    m = json.loads((out / "rvhub.json").read_text())
    assert "model.embed_tokens.weight" in m["excluded"]
    assert "model.norm.weight" in m["excluded"]


def test_dtype_option_sets_the_storage_dtype(family, tmp_path):
    fam = family("llama", torch.float32)
    v = load_vector(extract_vector(fam["a"], fam["b"]).save(tmp_path / "v", dtype="bfloat16"))
    assert v.dtype == torch.bfloat16


def test_extract_refuses_different_architectures(family):
    with pytest.raises(CompatibilityError, match="model_type qwen2 vs llama"):
        extract_vector(family("qwen2")["a"], family("llama")["b"])


def test_extract_refuses_shape_mismatch_and_lists_differences(family, tmp_path):
    other = save(
        build_model("qwen2", seed=1, dtype=torch.bfloat16, intermediate_size=48), tmp_path / "wide"
    )
    with pytest.raises(
        CompatibilityError,
        match=r"shape differs: model\.layers\.0\.mlp\.down_proj\.weight \[32, 64\] vs \[32, 48\]",
    ):
        extract_vector(family("qwen2")["a"], other)


def test_extract_is_lazy_until_saved(family):
    v = extract_vector(family("qwen2")["a"], family("qwen2")["b"])
    assert len(v) == 27 and v.shapes["model.embed_tokens.weight"] == (128, 32)
    assert "ReasoningVector(27 tensors" in repr(v)


def test_a_pair_of_identical_checkpoints_warns_and_records_it(family, tmp_path, caplog):
    fam = family("qwen2")
    r = run("extract", fam["a"], fam["a"], "-o", tmp_path / "zero")
    assert r.exit_code == 0, r.output
    assert "every delta is zero" in caplog.text
    manifest = json.loads((tmp_path / "zero" / "rvhub.json").read_text())
    assert manifest["stats"]["norm"] == 0.0
    assert manifest["notes"] == ["every delta is zero: the two sources hold the same weights"]
