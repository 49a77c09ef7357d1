"""The public API as a library user meets it: one manifest shape for every encoding, the
mapping protocol, in-memory vectors, and one spelling of a revision."""

from __future__ import annotations

import pytest
import torch

import rvhub.manifest as manifest_mod
from rvhub import InputError, ReasoningVector, extract_vector, load_vector
from rvhub.manifest import load_manifest
from tests.models import build_model, state_dict_of

ENCODING_OPTIONS = {"dense": {}, "lora": {"rank": 4}, "sparse": {}}
PROVENANCE = ("kind", "path", "dtype", "nbytes", "content_fingerprint", "fingerprint_algorithm")


@pytest.fixture
def sparse_pair(tmp_path):
    """A and B where A changes a tenth of B's entries (so sparse pays off)."""
    from tests.models import save

    b = build_model("qwen2", seed=0)
    a = build_model("qwen2", seed=0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in a.parameters():
            mask = torch.rand(p.shape, generator=g) < 0.1
            p.add_(mask * 0.01)
    return save(a, tmp_path / "a"), save(b, tmp_path / "b")


@pytest.mark.parametrize("encoding", list(ENCODING_OPTIONS))
def test_every_encoding_records_the_same_provenance(sparse_pair, tmp_path, encoding):
    a, b = sparse_pair
    dense = load_manifest(extract_vector(a, b).save(tmp_path / "reference"))
    path = extract_vector(a, b).save(
        tmp_path / encoding, encoding=encoding, **ENCODING_OPTIONS[encoding]
    )
    m = load_manifest(path)
    assert m["encoding"] == encoding
    for role in ("a", "b"):
        assert set(PROVENANCE) <= set(m["sources"][role])
        # the same weights read give the same fingerprint, whatever the encoding
        assert m["sources"][role] == dense["sources"][role]
    shared = ("format", "format_version", "rvhub_version", "model", "math_dtype", "excluded")
    assert {k: m[k] for k in shared} == {k: dense[k] for k in shared}


@pytest.mark.parametrize("encoding", list(ENCODING_OPTIONS))
def test_a_fresh_artifact_of_any_encoding_loads_without_rehashing(
    sparse_pair, tmp_path, monkeypatch, encoding
):
    a, b = sparse_pair
    path = extract_vector(a, b).save(
        tmp_path / "v", encoding=encoding, **ENCODING_OPTIONS[encoding]
    )
    monkeypatch.setattr(manifest_mod, "_verified_here", {})

    def no_hashing(p, *args, **kwargs):
        raise AssertionError(f"re-hashed {p}")

    monkeypatch.setattr(manifest_mod, "hash_file", no_hashing)
    assert len(load_vector(path)) == len(extract_vector(a, b))


def test_a_vector_is_a_mapping_of_deltas(family, tmp_path):
    fam = family("qwen2")
    v = load_vector(extract_vector(fam["a"], fam["b"]).save(tmp_path / "v"))
    name = v.keys()[0]
    assert list(v) == v.keys() == v.names
    assert torch.equal(v.get(name), v[name]) and v[name].dtype == torch.float32
    assert v.get("no.such.tensor") is None and v.get("no.such.tensor", 0) == 0
    assert v.delta(name, dtype=None).dtype == torch.bfloat16
    with pytest.raises(KeyError):
        v.delta("no.such.tensor")


def test_from_state_dicts_equals_extracting_the_saved_checkpoints(family, tmp_path):
    fam = family("llama")
    a, b = state_dict_of(fam["a"]), state_dict_of(fam["b"])
    from_memory = ReasoningVector.from_state_dicts(a, b, config={"model_type": "llama"})
    from_disk = extract_vector(fam["a"], fam["b"])
    assert set(from_memory) == set(from_disk)
    for name in from_disk:
        assert torch.equal(from_memory[name], from_disk[name]), name
    saved = load_vector(from_memory.save(tmp_path / "mem"))
    assert saved.model_info["model_type"] == "llama"
    target = build_model("llama", seed=9)
    before = {n: p.detach().clone() for n, p in target.named_parameters()}
    report = saved.apply_to(target)
    assert report.applied
    changed = [n for n, p in target.named_parameters() if not torch.equal(p, before[n])]
    assert changed


def test_state_dicts_of_two_architectures_are_refused():
    a = build_model("qwen2", seed=0).state_dict()
    b = dict(a)
    b.pop(next(iter(b)))
    with pytest.raises(Exception, match="not of one architecture"):
        ReasoningVector.from_state_dicts(a, b)


def test_a_revision_given_twice_must_agree():
    with pytest.raises(InputError, match="give one of them"):
        load_vector("user/vector@v1", revision="v2")


def test_a_revision_with_a_local_vector_is_refused(family, tmp_path):
    fam = family("qwen2")
    path = extract_vector(fam["a"], fam["b"]).save(tmp_path / "v")
    with pytest.raises(InputError, match="local path"):
        load_vector(path, revision="main")


@pytest.mark.parametrize(
    "repo_id", ["org/..", "a..b/c", "org/na--me", "org/name.", "o/" + "x" * 97]
)
def test_invalid_hub_ids_are_refused_before_any_request(repo_id):
    with pytest.raises(InputError, match="not a valid Hub id"):
        load_vector(repo_id)


@pytest.mark.parametrize("scale", [1e39, "1_5", float("nan")])
def test_apply_to_refuses_a_scale_it_cannot_compute(family, scale):
    fam = family("qwen2")
    model = build_model("qwen2", seed=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(InputError, match="scale"):
        extract_vector(fam["a"], fam["b"]).apply_to(model, scale=scale)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_file_handles_close_quietly_at_interpreter_exit(family, tmp_path, monkeypatch):
    """`load_vector(p).get(name)` at module level printed `Exception ignored in: <function
    FileHandles.__del__> ... 'NoneType' object has no attribute 'suppress'` at exit (issue 26,
    item 10): at teardown module globals may be None; __del__ must need none of them."""
    import os

    import rvhub.io.safetensors as st

    fam = family("qwen2")
    folder = extract_vector(fam["a"], fam["b"]).save(tmp_path / "v")
    handles = st.FileHandles()
    fd = handles.fd(folder / "vector.safetensors")
    monkeypatch.setattr(st, "contextlib", None, raising=False)
    monkeypatch.setattr(st, "os", None)
    handles.__del__()  # what the interpreter does at exit, with the globals gone
    monkeypatch.undo()
    with pytest.raises(OSError):
        os.fstat(fd)  # closed
