"""Hostile artifacts: a stranger controls every byte of a vector, hashes included.

Each case rewrites the manifest's hashes to match the tampered files, so only rvhub's own
checks (paths, headers, declarations) stand between the artifact and the user's model.
"""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rvhub import InputError, IntegrityError, extract_vector, load_vector
from rvhub.io.hashing import hash_file
from rvhub.io.safetensors import read_header
from rvhub.manifest import validate_manifest
from tests.cli_helpers import assert_clean_failure, run


@pytest.fixture
def vec(family, tmp_path):
    fam = family("qwen2")
    return extract_vector(fam["a"], fam["b"]).save(tmp_path / "vec")


def _manifest(vec):
    return json.loads((vec / "rvhub.json").read_text())


def _rehash(vec, manifest=None):
    """What an attacker does after tampering: make every listed hash match again."""
    m = manifest or _manifest(vec)
    for name, info in m["files"].items():
        path = vec / name
        if path.is_file():
            info["blake3"] = hash_file(path)
            info["size"] = path.stat().st_size
    (vec / "rvhub.json").write_text(json.dumps(m))


def _write_raw_safetensors(path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize(
    "bad_name", ["../secret.safetensors", "/etc/passwd", "a/../../x.safetensors", "..\\x"]
)
def test_manifest_naming_a_file_outside_the_artifact_is_refused(vec, tmp_path, bad_name):
    (tmp_path / "secret.safetensors").write_bytes(b"not yours")
    m = _manifest(vec)
    m["files"][bad_name] = {"blake3": "0" * 64, "size": 9}
    (vec / "rvhub.json").write_text(json.dumps(m))
    with pytest.raises(IntegrityError, match="outside the artifact"):
        load_vector(vec)


def test_symlink_out_of_the_artifact_is_refused(vec, tmp_path):
    outside = tmp_path / "outside.safetensors"
    os.replace(vec / "vector.safetensors", outside)
    os.symlink(outside, vec / "vector.safetensors")
    with pytest.raises(IntegrityError, match="resolves outside the artifact"):
        load_vector(vec)


def test_header_that_lies_about_offsets_is_refused(vec):
    weights = vec / "vector.safetensors"
    entries, _ = read_header(weights)
    data = weights.read_bytes()
    (hlen,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + hlen])
    first = next(k for k in header if k != "__metadata__")
    header[first]["data_offsets"] = [0, 10**12]  # points far past the end of the file
    _write_raw_safetensors(weights, header, data[8 + hlen :])
    _rehash(vec)
    with pytest.raises(InputError, match="header lies about tensor"):
        load_vector(vec)


def test_huge_declared_shape_is_refused_before_allocating(vec):
    weights = vec / "vector.safetensors"
    huge = {"model.norm.weight": {"dtype": "F32", "shape": [2**31, 2**31], "data_offsets": [0, 16]}}
    _write_raw_safetensors(weights, huge, b"\0" * 16)
    m = _manifest(vec)
    m["tensors"] = {"model.norm.weight": {"shape": [2**31, 2**31], "dtype": "F32", "norm": 0.0}}
    _rehash(vec, m)
    with pytest.raises(InputError, match="header lies"):
        load_vector(vec)


def test_duplicate_tensor_names_are_refused(vec):
    weights = vec / "vector.safetensors"
    raw = b'{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"x":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}'
    weights.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 8)
    _rehash(vec)
    with pytest.raises(InputError, match="duplicate tensor name"):
        load_vector(vec)


def test_undeclared_tensor_is_refused(vec):
    weights = vec / "vector.safetensors"
    _write_raw_safetensors(
        weights,
        {"sneaky.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
        b"\0" * 8,
    )
    _rehash(vec)
    with pytest.raises(IntegrityError, match="not declared in rvhub.json"):
        load_vector(vec)


def test_pickle_file_in_a_vector_is_refused(vec, family, tmp_path):
    torch.save({"x": 1}, vec / "pytorch_model.bin")
    out = tmp_path / "out"
    r = run("apply", vec, family("qwen2")["target"], "-o", out)
    assert_clean_failure(r, match="pickle", output=out)


def test_newer_format_version_asks_to_upgrade(vec):
    m = _manifest(vec)
    m["format_version"] = 99
    (vec / "rvhub.json").write_text(json.dumps(m))
    with pytest.raises(IntegrityError, match="upgrade rvhub"):
        load_vector(vec)


def test_nothing_from_an_artifact_is_imported_or_executed(vec, family, tmp_path):
    """A .py file shipped in a vector is neither imported nor copied into an applied model."""
    marker = tmp_path / "executed"
    (vec / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    (vec / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    assert run("apply", vec, family("qwen2")["target"], "-o", tmp_path / "out").exit_code == 0
    assert run("inspect", vec).exit_code == 0
    assert not marker.exists()
    assert not any(p.suffix == ".py" for p in (tmp_path / "out").iterdir())


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=25,
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "format": st.sampled_from(["rvhub.reasoning-vector", "other"]) | json_values,
            "format_version": st.integers(-2, 3) | json_values,
            "encoding": st.sampled_from(["dense", "lora", "sparse", "zip"]) | json_values,
            "files": st.dictionaries(st.text(max_size=30), json_values, max_size=3) | json_values,
            "tensors": st.dictionaries(st.text(max_size=30), json_values, max_size=3) | json_values,
        },
    )
)
def test_manifest_validation_never_fails_with_anything_but_a_clear_error(data):
    try:
        validate_manifest(data)
    except IntegrityError as e:
        assert str(e) and "\n" not in str(e)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(header=st.binary(max_size=200))
def test_safetensors_header_parser_fuzz(tmp_path_factory, header):
    path = tmp_path_factory.mktemp("fuzz") / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
    try:
        read_header(path)
    except InputError as e:
        assert "\n" not in str(e)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(header=st.dictionaries(st.text(max_size=10), json_values, max_size=4))
def test_safetensors_structured_header_fuzz(tmp_path_factory, header):
    path = tmp_path_factory.mktemp("fuzz") / "x.safetensors"
    _write_raw_safetensors(path, header, b"\0" * 64)
    try:
        read_header(path)
    except InputError as e:
        assert "\n" not in str(e)


score_keys = st.sampled_from(
    [
        "benchmarks",
        "target",
        "scale",
        "source",
        "task",
        "metric",
        "type",
        "baseline",
        "plus_vector",
        "minus_vector",
        "stderr",
        "dataset",
        "id",
        "name",
        "split",
        "baselin",
        "results",
        "configs",
    ]
)
score_docs = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 5)
    | st.floats(allow_nan=True)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(score_keys, children, max_size=5)
    ),
    max_leaves=30,
)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(doc=score_docs, as_lm_eval=st.booleans())
def test_score_parsers_fuzz(tmp_path_factory, doc, as_lm_eval):
    """Any JSON document is either scores or one clear InputError line, never a crash."""
    from rvhub.card import parse_lm_eval, parse_scores_file

    path = tmp_path_factory.mktemp("scores") / "scores.json"
    path.write_text(json.dumps(doc, allow_nan=True))
    try:
        if as_lm_eval:
            parse_lm_eval(path, "baseline")
        else:
            parse_scores_file(path)
    except InputError as e:
        assert str(e) and "\n" not in str(e)
