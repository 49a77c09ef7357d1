"""Bad input: one clear line on stderr, a non-zero exit, no traceback, the output untouched."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from rvhub import extract_vector
from tests.cli_helpers import assert_clean_failure, run, tree_snapshot
from tests.models import build_model, save


@pytest.fixture
def vec(family, tmp_path):
    fam = family("qwen2")
    return extract_vector(fam["a"], fam["b"]).save(tmp_path / "vec")


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_path(family, tmp_path):
    out = tmp_path / "out"
    r = run("extract", tmp_path / "does-not-exist", family("qwen2")["b"], "-o", out)
    assert_clean_failure(r, match="no such file or folder", output=out)


def test_unknown_hub_id(hub, family, tmp_path):
    out = tmp_path / "out"
    r = run("extract", "nobody/no-such-model", family("qwen2")["b"], "-o", out)
    assert_clean_failure(r, match="no such repo on the Hub", output=out)


def test_network_down(hub, family, tmp_path, monkeypatch):
    from tests.hub_server.fixtures import HubServer  # noqa: F401  (the fixture patches endpoints)

    out = tmp_path / "out"
    with hub.use_endpoint(tmp_path / "hf-home", endpoint=hub.dead_endpoint):
        r = run("extract", "alice/some-model", family("qwen2")["b"], "-o", out)
    assert_clean_failure(r, match="cannot reach the Hub", output=out)


def test_truncated_safetensors(family, tmp_path):
    broken = _copy(family("qwen2")["a"], tmp_path / "broken")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    out = tmp_path / "out"
    r = run("extract", broken, family("qwen2")["b"], "-o", out)
    assert_clean_failure(r, match="truncated or corrupt", output=out)


def test_garbage_safetensors_header(family, tmp_path):
    broken = _copy(family("qwen2")["a"], tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(
        b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b"\0" * 64
    )
    out = tmp_path / "out"
    r = run("extract", broken, family("qwen2")["b"], "-o", out)
    assert_clean_failure(r, match="not a valid safetensors file", output=out)


def test_architecture_mismatch(family, tmp_path):
    out = tmp_path / "out"
    r = run("extract", family("qwen2")["a"], family("llama")["b"], "-o", out)
    assert_clean_failure(r, match="model_type qwen2 vs llama", output=out)


def test_shape_mismatch_on_apply(vec, tmp_path):
    other = save(
        build_model("qwen2", seed=2, dtype=torch.bfloat16, intermediate_size=48), tmp_path / "other"
    )
    out = tmp_path / "out"
    r = run("apply", vec, other, "-o", out)
    assert_clean_failure(r, match="shape differs", output=out)


def test_vocab_mismatch(vec, tmp_path):
    other = save(
        build_model("qwen2", seed=2, dtype=torch.bfloat16, vocab_size=160), tmp_path / "other"
    )
    out = tmp_path / "out"
    r = run("apply", vec, other, "-o", out)
    assert_clean_failure(r, match="--vocab overlap", output=out)


def test_nonfinite_delta_refused_unless_allowed(family, tmp_path):
    poisoned = _copy(family("qwen2")["a"], tmp_path / "poisoned")
    from safetensors.torch import load_file

    tensors = load_file(poisoned / "model.safetensors")
    tensors["model.norm.weight"][3] = float("nan")
    save_file(tensors, poisoned / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    r = run("extract", poisoned, family("qwen2")["b"], "-o", out)
    assert_clean_failure(r, match="NaN/Inf", output=out)
    assert (
        run("extract", poisoned, family("qwen2")["b"], "-o", out, "--allow-nonfinite").exit_code
        == 0
    )
    manifest = json.loads((out / "rvhub.json").read_text())
    assert manifest["tensors"]["model.norm.weight"]["nonfinite"] == 1
    # applying it is refused too, unless allowed
    applied = tmp_path / "applied"
    r = run("apply", out, family("qwen2")["target"], "-o", applied)
    assert_clean_failure(r, match="NaN/Inf", output=applied)


def test_tampered_artifact_file(vec, family, tmp_path):
    weights = vec / "vector.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # same size, one byte flipped
    weights.write_bytes(bytes(data))
    out = tmp_path / "out"
    r = run("apply", vec, family("qwen2")["target"], "-o", out)
    assert_clean_failure(r, match="does not match its blake3", output=out)
    r = run("verify", vec)
    assert_clean_failure(r, match="does not match its blake3")


@pytest.mark.parametrize("command", ["apply", "check", "card", "verify"])
def test_an_edited_hash_is_refused_by_every_command_that_reads_the_vector(
    vec, family, tmp_path, command
):
    """One digest edited in rvhub.json: apply exited 4, check and card exited 0 (issue 26,
    item 3). Check runs what apply runs before writing; a card is not made for it either."""
    manifest_path = vec / "rvhub.json"
    manifest = json.loads(manifest_path.read_text())
    record = manifest["files"]["vector.safetensors"]
    key = "blake3" if "blake3" in record else "sha256"
    record[key] = ("0" if record[key][0] != "0" else "1") + record[key][1:]
    manifest_path.write_text(json.dumps(manifest, indent=2))
    out = tmp_path / "out"
    args = {
        "apply": ["apply", vec, family("qwen2")["target"], "-o", out],
        "check": ["check", vec, family("qwen2")["target"]],
        "card": ["card", vec, "-o", out / "README.md"],
        "verify": ["verify", vec],
    }[command]
    r = run(*args)
    assert_clean_failure(r, match="does not match its", output=out)
    assert r.exit_code == 4


def test_output_exists_without_overwrite(family, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    before = tree_snapshot(out)
    r = run("extract", family("qwen2")["a"], family("qwen2")["b"], "-o", out)
    assert_clean_failure(r, match="already exists; pass --overwrite", output=out, before=before)


@pytest.mark.parametrize("scale", ["abc", "nan", "inf", ""])
def test_scale_not_a_number(vec, family, tmp_path, scale):
    out = tmp_path / "out"
    r = run("apply", vec, family("qwen2")["target"], "-o", out, "--scale", scale)
    assert_clean_failure(r, match="--scale must be a finite number", output=out)


def test_pickle_only_checkpoint(tmp_path, family):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    torch.save({"w": torch.zeros(2)}, folder / "pytorch_model.bin")
    out = tmp_path / "out"
    r = run("extract", folder, family("qwen2")["b"], "-o", out)
    line = assert_clean_failure(r, match="pickle", output=out)
    assert "save_pretrained" in line  # says how to convert


def test_unknown_dtype(family, tmp_path):
    out = tmp_path / "out"
    r = run("extract", family("qwen2")["a"], family("qwen2")["b"], "-o", out, "--dtype", "int7")
    assert_clean_failure(r, match="unknown dtype", output=out)


def test_invalid_exclude_regex(family, tmp_path):
    out = tmp_path / "out"
    r = run("extract", family("qwen2")["a"], family("qwen2")["b"], "-o", out, "--exclude", "(")
    assert_clean_failure(r, match="not a valid regular expression", output=out)


def test_not_a_vector_folder(family, tmp_path):
    out = tmp_path / "out"
    r = run("apply", family("qwen2")["a"], family("qwen2")["target"], "-o", out)
    assert_clean_failure(r, match="not an rvhub vector", output=out)


def test_cuda_requested_without_gpu(vec, family, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "out"
    r = run("apply", vec, family("qwen2")["target"], "-o", out, "--device", "cuda")
    assert_clean_failure(r, match="no CUDA GPU", output=out)


# -- compress --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--encoding", "lora", "--rank", "0"], "--rank must be a positive integer"),
        (["--encoding", "lora", "--energy", "1.5"], "--energy must be in (0, 1]"),
        (["--encoding", "lora"], "needs --rank, --energy or --max-error"),
    ],
    ids=["rank-not-positive", "energy-out-of-range", "lora-without-a-rank-rule"],
)
def test_compress_bad_lora_options(vec, tmp_path, args, message):
    out = tmp_path / "out"
    assert_clean_failure(run("compress", vec, "-o", out, *args), match=message, output=out)


def test_compress_sparse_on_a_dense_heavy_vector(vec, tmp_path):
    out = tmp_path / "out"
    r = run("compress", vec, "-o", out, "--encoding", "sparse")
    assert_clean_failure(r, match="not worth it", output=out)


# -- inspect / verify -------------------------------------------------------------------------
def test_inspect_corrupt_manifest(vec):
    (vec / "rvhub.json").write_text("{ this is not json")
    assert_clean_failure(run("inspect", vec), match="rvhub.json is not valid JSON")


def test_inspect_a_file_instead_of_a_folder(vec):
    assert_clean_failure(run("inspect", vec / "vector.safetensors"), match="is a file")


def test_verify_against_the_wrong_sources(vec, family):
    other = family("qwen2")["target"]
    r = run("verify", vec, "--against", other, family("qwen2")["b"])
    assert_clean_failure(r, match="B + v does not reproduce A")


def test_verify_a_truncated_vector_file(vec):
    weights = vec / "vector.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    assert_clean_failure(run("verify", vec), match="the file was modified or truncated")


# -- card -------------------------------------------------------------------------------------
def test_card_scores_file_with_a_typo(vec, tmp_path):
    scores = tmp_path / "scores.yaml"
    scores.write_text(
        "benchmarks:\n  - task: gsm8k\n    metric: {type: exact_match}\n    baselin: 62.1\n"
    )
    out = tmp_path / "card" / "README.md"
    r = run("card", vec, "--scores", scores, "-o", out)
    assert_clean_failure(r, match="did you mean 'baseline'", output=out)


def test_card_template_with_an_error(vec, tmp_path):
    template = tmp_path / "my.md.j2"
    template.write_text("# {{ vector.name }\n")
    out = tmp_path / "card" / "README.md"
    r = run("card", vec, "--template", template, "-o", out)
    assert_clean_failure(r, match="my.md.j2 line 1", output=out)


def test_card_lm_eval_without_a_condition(vec, tmp_path):
    out = tmp_path / "card" / "README.md"
    r = run("card", vec, "--lm-eval", str(tmp_path / "results.json"), "-o", out)
    assert_clean_failure(r, match="CONDITION=FILE", output=out)


# -- push -------------------------------------------------------------------------------------
def test_push_without_a_token(hub, vec, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with hub.use_endpoint(tmp_path / "hf-home"):
        r = run("push", vec, hub.new_repo_id("vec"))
    assert_clean_failure(r, match="no Hugging Face token found")


def test_push_into_someone_elses_namespace(hub, vec, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", hub.other_token)  # bob pushing into alice's namespace
    r = run("push", vec, hub.new_repo_id("vec"))
    assert_clean_failure(r, match="403")
    assert not any(req.method == "POST" and "/commit/" in req.path for req in hub.requests)


def test_push_a_tampered_vector(hub, vec, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", hub.token)
    weights = vec / "vector.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01
    weights.write_bytes(bytes(data))
    r = run("push", vec, hub.new_repo_id("vec"))
    assert_clean_failure(r, match="does not match its blake3")
    assert hub.requests == [], "nothing may reach the Hub before the hashes verify"


def test_apply_from_an_unknown_revision(hub, vec, monkeypatch, family, tmp_path):
    monkeypatch.setenv("HF_TOKEN", hub.token)
    repo = hub.new_repo_id("vec")
    assert run("push", vec, repo).exit_code == 0
    out = tmp_path / "out"
    r = run("apply", repo, family("qwen2")["target"], "-o", out, "--revision", "no-such-branch")
    assert_clean_failure(r, match="has no revision 'no-such-branch'", output=out)


@pytest.mark.parametrize("scale", ["1_5", "0x10", "1.5.0"])
def test_scale_written_loosely(vec, family, tmp_path, scale):
    out = tmp_path / "out"
    r = run("apply", vec, family("qwen2")["target"], "-o", out, "--scale", scale)
    assert_clean_failure(r, match="--scale must be a finite number", output=out)


def test_scale_beyond_float32(vec, family, tmp_path):
    out = tmp_path / "out"
    r = run("apply", vec, family("qwen2")["target"], "-o", out, "--scale", "1e39")
    assert_clean_failure(r, match="beyond float32's range", output=out)


@pytest.mark.parametrize("command", ["inspect", "apply", "extract"])
def test_invalid_hub_id(family, tmp_path, command):
    out = tmp_path / "out"
    args = {
        "inspect": ["inspect", "org/na--me"],
        "apply": ["apply", "org/na--me", family("qwen2")["target"], "-o", out],
        "extract": ["extract", "org/name.", family("qwen2")["b"], "-o", out],
    }[command]
    assert_clean_failure(run(*args), match="is not a valid Hub id", output=out)


def test_sharded_index_whose_weight_map_is_a_list(family, tmp_path):
    broken = _copy(family("qwen2")["a"], tmp_path / "broken")
    (broken / "model.safetensors").rename(broken / "model-00001-of-00001.safetensors")
    index = '{"weight_map": ["model-00001-of-00001.safetensors"]}'
    (broken / "model.safetensors.index.json").write_text(index)
    out = tmp_path / "out"
    r = run("extract", broken, family("qwen2")["b"], "-o", out)
    assert_clean_failure(r, match="not a valid sharded-checkpoint index", output=out)


def test_revision_with_a_local_vector(vec, family, tmp_path):
    out = tmp_path / "out"
    r = run("apply", vec, family("qwen2")["target"], "-o", out, "--revision", "main")
    assert_clean_failure(r, match="is a local path", output=out)


def test_revision_given_twice(family, tmp_path):
    out = tmp_path / "out"
    r = run("apply", "user/vector@v1", family("qwen2")["target"], "-o", out, "--revision", "v2")
    assert_clean_failure(r, match="give one of them", output=out)


def test_target_of_another_lineage(vec, tmp_path):
    other = save(build_model("qwen2", seed=42, dtype=torch.bfloat16), tmp_path / "other")
    out = tmp_path / "out"
    r = run("apply", vec, other, "-o", out)
    assert_clean_failure(r, match="not of the vector's lineage", output=out)


@pytest.mark.parametrize("where", ["the target", "inside the target", "the vector"])
def test_apply_output_that_is_or_lies_inside_an_input(vec, family, tmp_path, where):
    target = _copy(family("qwen2")["target"], tmp_path / "target")
    out = {"the target": target, "inside the target": target / "sub", "the vector": vec}[where]
    before, vec_before = tree_snapshot(target), tree_snapshot(vec)
    r = run("apply", vec, target, "-o", out, "--overwrite")
    assert_clean_failure(r, match="lies inside an input")
    assert tree_snapshot(target) == before and tree_snapshot(vec) == vec_before


def test_extract_output_that_is_a_source(family, tmp_path):
    a = _copy(family("qwen2")["a"], tmp_path / "a")
    before = tree_snapshot(a)
    r = run("extract", a, family("qwen2")["b"], "-o", a, "--overwrite")
    assert_clean_failure(r, match="lies inside an input")
    assert tree_snapshot(a) == before


def test_compress_output_inside_the_vector(vec, tmp_path):
    before = tree_snapshot(vec)
    r = run("compress", vec, "-o", vec / "lora", "--encoding", "lora", "--rank", "2")
    assert_clean_failure(r, match="lies inside an input")
    assert tree_snapshot(vec) == before


@pytest.mark.parametrize("command", ["inspect", "apply"])
def test_unreachable_hub_fails_fast(hub, family, tmp_path, command):
    import time

    out = tmp_path / "out"
    args = {
        "inspect": ["inspect", "alice/some-vector"],
        "apply": ["apply", "alice/some-vector", family("qwen2")["target"], "-o", out],
    }[command]
    started = time.perf_counter()
    with hub.use_endpoint(tmp_path / "hf-home", endpoint=hub.dead_endpoint):
        r = run(*args)
    assert_clean_failure(r, match="cannot reach the Hub", output=out)
    assert "HF_HUB_OFFLINE" not in r.stderr  # it is not set: do not tell the user to unset it
    assert time.perf_counter() - started < 10


def test_inspect_an_unknown_revision_fails_fast(hub, vec, monkeypatch):
    import time

    monkeypatch.setenv("HF_TOKEN", hub.token)
    repo = hub.new_repo_id("vec")
    assert run("push", vec, repo).exit_code == 0
    started = time.perf_counter()
    r = run("inspect", repo, "--revision", "no-such-branch")
    assert_clean_failure(r, match="has no revision 'no-such-branch'")
    assert time.perf_counter() - started < 10


def test_check_a_target_of_another_lineage(vec, tmp_path):
    other = save(build_model("qwen2", seed=42, dtype=torch.bfloat16), tmp_path / "other")
    assert_clean_failure(run("check", vec, other), match="not of the vector's lineage")


def test_float16_overflow_on_disk(family, tmp_path):
    fam = family("qwen2", torch.float16)
    vec = extract_vector(fam["a"], fam["b"]).save(tmp_path / "vec16")
    out = tmp_path / "out"
    r = run("apply", vec, fam["target"], "-o", out, "--scale", "1e30")
    assert_clean_failure(r, match="float16 overflow", output=out)


def test_target_revision_with_a_local_target(vec, family, tmp_path):
    out = tmp_path / "out"
    r = run("apply", vec, family("qwen2")["target"], "-o", out, "--target-revision", "main")
    assert_clean_failure(r, match="is a local path", output=out)


def test_scale_that_would_swamp_the_weights(vec, family, tmp_path):
    out = tmp_path / "out"
    r = run("apply", vec, family("qwen2")["target"], "-o", out, "--scale", "1e30")
    assert_clean_failure(r, match="would change the weights by", output=out)


@pytest.mark.parametrize(
    ("arch", "args", "message"),
    [
        (
            "qwen2",
            ["--rank", "600", "--for", "vllm"],
            "above vllm 0.34.0's largest --max-lora-rank",
        ),
        ("gpt2", ["--rank", "4", "--for", "vllm"], "serves LoRA for"),
        ("qwen2", ["--for", "sglang"], "need --encoding lora"),
    ],
    ids=["vllm-rank-too-high", "vllm-architecture", "profile-without-lora"],
)
def test_engine_profile_it_cannot_honour(family, tmp_path, arch, args, message):
    from tests.models import make_family

    fam = make_family(tmp_path / "fam", arch) if arch == "gpt2" else family(arch)
    out = tmp_path / "out"
    extra = [] if "need --encoding" in message else ["--encoding", "lora"]
    r = run("extract", fam["a"], fam["b"], "-o", out, *extra, *args)
    assert_clean_failure(r, match=message, output=out)


def _quantized_copy(src, dst, *, method=None, packed=True):
    """A copy of ``src`` the way GPTQ/AWQ releases look: int32 qweight/qzeros, fp16 scales,
    g_idx, and (when ``method``) a quantization_config in config.json."""
    from safetensors.torch import load_file

    folder = _copy(src, dst)
    tensors = load_file(folder / "model.safetensors")
    if packed:
        name = "model.layers.0.mlp.up_proj"
        weight = tensors.pop(f"{name}.weight")
        out, inp = weight.shape
        tensors[f"{name}.qweight"] = torch.zeros(inp // 8, out, dtype=torch.int32)
        tensors[f"{name}.qzeros"] = torch.zeros(1, out // 8, dtype=torch.int32)
        tensors[f"{name}.scales"] = torch.ones(1, out, dtype=torch.float16)
        tensors[f"{name}.g_idx"] = torch.zeros(inp, dtype=torch.int32)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    if method:
        config = json.loads((folder / "config.json").read_text())
        config["quantization_config"] = {"quant_method": method, "bits": 4, "group_size": 128}
        (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    ("method", "packed", "message"),
    [
        ("gptq", True, "is quantized with GPTQ"),
        ("awq", True, "is quantized with AWQ"),
        ("bitsandbytes", False, "is quantized with bitsandbytes"),
        ("compressed-tensors", False, "is quantized with compressed-tensors"),
        ("hqq", False, "is quantized with HQQ"),
        (None, True, "-quantized tensors (model.layers.0.mlp.up_proj."),
    ],
    ids=["gptq", "awq", "bnb", "compressed-tensors", "hqq", "packed-no-config"],
)
@pytest.mark.parametrize("role", ["source", "target"])
def test_quantized_checkpoint_refused(vec, family, tmp_path, method, packed, message, role):
    fam = family("qwen2")
    quantized = _quantized_copy(fam["a"], tmp_path / "q", method=method, packed=packed)
    out = tmp_path / "out"
    if role == "source":
        r = run("extract", quantized, fam["b"], "-o", out)
    else:
        r = run("apply", vec, quantized, "-o", out)
    line = assert_clean_failure(r, match=message, output=out)
    assert "unquantized" in line and "quantize after applying" in line


def test_int8_weights_without_config_refused(family, tmp_path):
    from safetensors.torch import load_file

    folder = _copy(family("qwen2")["a"], tmp_path / "int8")
    tensors = load_file(folder / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    tensors[name] = tensors[name].to(torch.int8)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    r = run("extract", folder, family("qwen2")["b"], "-o", out)
    assert_clean_failure(r, match="packed or quantized weights", output=out)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (None, "there is no config.json beside the weights"),
        ("[1, 2]", "config.json is not a JSON object"),
        ('{"model_type": null}', "config.json has no model_type"),
    ],
    ids=["missing", "a-list", "model-type-null"],
)
@pytest.mark.parametrize("command", ["extract", "apply", "check"])
def test_no_usable_config_refused_unless_told(vec, family, tmp_path, config, message, command):
    fam = family("qwen2")
    folder = _copy(fam["a"] if command == "extract" else fam["target"], tmp_path / "noconf")
    if config is None:
        (folder / "config.json").unlink()
    else:
        (folder / "config.json").write_text(config)
    out = tmp_path / "out"
    args = {
        "extract": ["extract", folder, fam["b"], "-o", out],
        "apply": ["apply", vec, folder, "-o", out],
        "check": ["check", vec, folder],
    }[command]
    line = assert_clean_failure(run(*args), match=message, output=out)
    assert "--no-config-check" in line
    if (
        command == "apply" or command == "extract"
    ):  # the user who knows says so; apply then copies no config
        assert run(*args, "--no-config-check").exit_code == 0


def test_dtype_on_a_target_that_is_not_fp8(vec, family, tmp_path):
    out = tmp_path / "out"
    r = run("apply", vec, family("qwen2")["target"], "-o", out, "--dtype", "bfloat16")
    assert_clean_failure(r, match="dequantizes an FP8 target", output=out)


@pytest.mark.parametrize(
    ("quantization", "message"),
    [
        ({"quant_method": "fp8", "fmt": "e4m3"}, "FP8 without block scales"),
        ({"quant_method": "fp8", "weight_block_size": [128, 128]}, "lacks a float32"),
    ],
    ids=["per-tensor-fp8", "fp8-scales-missing"],
)
def test_fp8_layouts_rvhub_cannot_read(tmp_path, quantization, message):
    from tests.fp8_models import fp8_family

    fam = fp8_family(tmp_path / "fam")
    config = json.loads((fam["a"] / "config.json").read_text())
    config["quantization_config"] = quantization
    (fam["a"] / "config.json").write_text(json.dumps(config))
    if message == "lacks a float32":
        from safetensors.torch import load_file

        tensors = load_file(fam["a"] / "model.safetensors")
        tensors.pop("model.layers.0.mlp.up_proj.weight_scale_inv")
        save_file(tensors, fam["a"] / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    r = run("extract", fam["a"], fam["b"], "-o", out)
    assert_clean_failure(r, match=message, output=out)


# -- one output check for every writer ----------------------------------------------------------
TASKS = Path(__file__).resolve().parents[1] / "examples" / "toy_transfer" / "task"


def _workspace(family, root):
    """Copies of A, B and a target, a vector of A − B and a task folder, all under ``root``."""
    fam = family("qwen2")
    paths = {role: _copy(fam[role], root / role) for role in ("a", "b", "target")}
    paths["vec"] = extract_vector(paths["a"], paths["b"]).save(root / "vec")
    paths["tasks"] = _copy(TASKS, root / "tasks")
    return paths


# (writer, the input at risk, its arguments on (paths, output))
WRITERS = {
    "extract": ("a", lambda p, o: ["extract", p["a"], p["b"], "-o", o, "--overwrite"]),
    "compress": ("vec", lambda p, o: ["compress", p["vec"], "-o", o, "--overwrite"]),
    "apply": ("target", lambda p, o: ["apply", p["vec"], p["target"], "-o", o, "--overwrite"]),
    "eval-vector": ("vec", lambda p, o: [*_eval(p), "-o", o, "--overwrite"]),
    "eval-tasks": ("tasks", lambda p, o: [*_eval(p), "-o", o, "--overwrite"]),
    "eval-target": ("target", lambda p, o: [*_eval(p), "-o", o, "--overwrite"]),
    "card": ("vec", lambda p, o: ["card", p["vec"], "-o", o]),
}


def _eval(p):
    return ["eval", p["vec"], p["target"], "--tasks", "toy_addition", "--include-path", p["tasks"]]


@pytest.mark.parametrize(
    ("writer", "where"),
    # a card is a file: it cannot contain a folder
    [
        (w, p)
        for w in WRITERS
        for p in ("is", "inside", "contains")
        if (w, p) != ("card", "contains")
    ],
)
def test_no_writer_replaces_what_it_reads(family, tmp_path, writer, where):
    """`rvhub eval -o X --overwrite` with X the vector, the target, the task folder or a parent
    of them replaced them (issue 26, item 1): every writer now runs one output check."""
    if writer.startswith("eval"):
        pytest.importorskip("lm_eval")
    root = tmp_path / "work"
    paths = _workspace(family, root)
    role, args = WRITERS[writer]
    out = {"is": paths[role], "inside": paths[role] / "README.md", "contains": root}[where]
    before = tree_snapshot(root)
    r = run(*args(paths, out))
    assert_clean_failure(
        r, match="is, contains or lies inside an input", output=root, before=before
    )
    assert r.exit_code == 2


def test_library_writers_refuse_their_inputs_too(family, tmp_path):
    from rvhub import apply_to_checkpoint, load_vector
    from rvhub.card import build_card
    from rvhub.errors import InputError

    root = tmp_path / "work"
    paths = _workspace(family, root)
    before = tree_snapshot(root)
    vec = load_vector(paths["vec"])
    with pytest.raises(InputError, match="lies inside an input"):
        vec.save(paths["a"] / "x", overwrite=True)  # a local source of the vector
    with pytest.raises(InputError, match="lies inside an input"):
        apply_to_checkpoint(vec, paths["target"], root, overwrite=True)
    with pytest.raises(InputError, match="lies inside an input"):
        build_card(paths["vec"]).save(paths["vec"] / "README.md", inputs=[paths["vec"]])
    assert tree_snapshot(root) == before


def _lock(folder: Path, locked: bool) -> None:
    """Make ``folder`` unwritable (root ignores modes: the immutable attribute binds it too)."""
    if os.geteuid() != 0:
        folder.chmod(0o555 if locked else 0o755)
        return
    done = subprocess.run(["chattr", "+i" if locked else "-i", str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot make a folder read-only for root here: {done.stderr.decode()}")


def test_read_only_output_folder_names_the_output(vec, tmp_path):
    """Was `Error: Permission denied: .../.out.rvhub-lock` with exit 1 (issue 26, item 8)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    _lock(locked, True)
    try:
        out = locked / "out"
        r = run("compress", vec, "-o", out, "--dtype", "float32")
        line = assert_clean_failure(r, match=f"cannot write {out}", output=out)
        assert r.exit_code == 2 and ("not permitted" in line or "denied" in line), line
    finally:
        _lock(locked, False)
