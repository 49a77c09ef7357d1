"""Applying θ + α·v: on disk (a new model folder) and live (in place), checked independently."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from rvhub import CompatibilityError, apply_to_checkpoint, extract_vector, load_vector
from tests.cli_helpers import run
from tests.models import build_model, finetune_like, save, state_dict_of

ARCHS = ["qwen2", "llama", "gemma2"]


def _vector(family, tmp_path, arch, dtype=torch.bfloat16, **save_kw):
    fam = family(arch, dtype)
    return fam, load_vector(extract_vector(fam["a"], fam["b"]).save(tmp_path / "v", **save_kw))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("scale", [1.0, -1.0, 0.5])
def test_apply_on_disk_equals_state_dict_arithmetic(family, tmp_path, arch, scale):
    fam, v = _vector(family, tmp_path, arch)
    report = apply_to_checkpoint(v, fam["target"], tmp_path / "out", scale=scale)
    target = state_dict_of(fam["target"])
    a, b = state_dict_of(fam["a"]), state_dict_of(fam["b"])
    expected = {}
    for name, t in target.items():
        delta = (a[name].float() - b[name].float()).bfloat16().float()  # the stored bf16 vector
        expected[name] = (t.float() + scale * delta).to(t.dtype)
    out = state_dict_of(tmp_path / "out")
    assert set(out) == set(target)
    for name in target:
        assert torch.equal(out[name], expected[name]), name
    assert sorted(report.applied) == sorted(target)
    # the folder is a model transformers loads, and its logits are those of θ + α·v
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    reference = AutoModelForCausalLM.from_pretrained(fam["target"])
    reference.load_state_dict(expected, strict=False)
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    assert json.loads((tmp_path / "out" / "rvhub_applied.json").read_text())["scale"] == scale


def test_apply_copies_config_and_keeps_shard_layout(family, tmp_path):
    fam, v = _vector(family, tmp_path, "llama")
    sharded = tmp_path / "sharded-target"
    AutoModelForCausalLM.from_pretrained(fam["target"]).save_pretrained(
        sharded, max_shard_size="20KB"
    )
    (sharded / "tokenizer_config.json").write_text("{}")
    apply_to_checkpoint(v, sharded, tmp_path / "out")
    src_files = sorted(p.name for p in sharded.iterdir())
    out_files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert out_files == sorted([*src_files, "rvhub_applied.json"])
    assert (
        json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
        == json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    )
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_target_whose_index_omits_tensors_is_read_as_transformers_reads_it(family, tmp_path):
    """An index listing fewer tensors than its shards hold: transformers loads every tensor of
    each shard it names; rvhub applied to the listed ones only and wrote shards without the
    others, which then loaded as MISSING, initialised at random (issue 26, item 2)."""
    fam, v = _vector(family, tmp_path, "llama")
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(fam["target"]).save_pretrained(
        sharded, max_shard_size="20KB"
    )
    apply_to_checkpoint(v, sharded, tmp_path / "whole")
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    dropped = sorted(index["weight_map"])[:2]
    for name in dropped:
        del index["weight_map"][name]
    index_path.write_text(json.dumps(index))

    apply_to_checkpoint(v, sharded, tmp_path / "out")

    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"], info
    out, whole = state_dict_of(tmp_path / "out"), state_dict_of(tmp_path / "whole")
    assert set(out) == set(whole)
    for name in whole:
        assert torch.equal(out[name], whole[name]), name
    written = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(dropped) <= set(written["weight_map"])


def _rounded_once(t: torch.Tensor, delta: torch.Tensor, scale: float) -> torch.Tensor:
    """round(t + scale·delta): exact sum (float64), one float32 rounding, then t's dtype."""
    s32 = float(torch.tensor(scale, dtype=torch.float32))
    return (t.double() + s32 * delta.double()).float().to(t.dtype)


@pytest.mark.parametrize("scale", [1.5, 0.3, -0.7])
def test_any_scale_rounds_once_on_disk_and_live_in_bf16(family, tmp_path, scale):
    # torch's own bf16 add_ on CPU rounds scale·v to bf16 before adding (α = 1.5 changed
    # 5 elements in 300 K); both apply paths must round once.
    fam, v = _vector(family, tmp_path, "qwen2")
    target = state_dict_of(fam["target"])
    a, b = state_dict_of(fam["a"]), state_dict_of(fam["b"])
    expected = {
        n: _rounded_once(t, (a[n].float() - b[n].float()).bfloat16(), scale)
        for n, t in target.items()
    }
    apply_to_checkpoint(v, fam["target"], tmp_path / "out", scale=scale)
    on_disk = state_dict_of(tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(fam["target"], dtype=torch.bfloat16)
    v.apply_to(model, scale=scale)
    live = model.state_dict()
    for name, want in expected.items():
        assert torch.equal(on_disk[name], want), name
        assert torch.equal(live[name], want), name


@pytest.mark.parametrize("arch", ARCHS)
def test_apply_to_live_model_equals_state_dict_arithmetic(family, tmp_path, arch):
    fam, v = _vector(family, tmp_path, arch, dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(fam["target"])
    before = {k: t.clone() for k, t in model.state_dict().items()}
    report = v.apply_to(model, scale=0.75)
    after = model.state_dict()
    for name, value in before.items():
        ckpt_name = name
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            ckpt_name = "model.embed_tokens.weight"
        expected = value + 0.75 * v[ckpt_name] if ckpt_name in v else value
        assert torch.allclose(after[name], expected, atol=1e-7, rtol=1e-6), name
    assert report.missing == [] and len(report.applied) == len(v)


def test_negative_scale_removes_what_positive_added(family, tmp_path):
    fam, v = _vector(family, tmp_path, "qwen2", dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(fam["target"])
    before = {k: t.clone() for k, t in model.state_dict().items()}
    v.apply_to(model)
    (-v).apply_to(model)
    for name, value in model.state_dict().items():
        assert torch.allclose(value, before[name], atol=1e-6), name


def test_tied_embeddings_get_the_delta_exactly_once(family, tmp_path):
    fam, v = _vector(family, tmp_path, "gemma2", dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(fam["target"])
    assert model.lm_head.weight is model.model.embed_tokens.weight
    before = model.model.embed_tokens.weight.detach().clone()
    report = v.apply_to(model, scale=1.0)
    assert "lm_head.weight" not in report.applied
    assert torch.allclose(
        model.model.embed_tokens.weight, before + v["model.embed_tokens.weight"], atol=1e-7
    )


def test_vector_from_tied_sources_moves_an_untied_targets_lm_head_too(family, tmp_path):
    fam, v = _vector(family, tmp_path, "qwen2-tied", dtype=torch.float32)
    untied = build_model("qwen2", seed=0)
    finetune_like(untied, seed=7)
    target = save(untied, tmp_path / "untied")
    report = apply_to_checkpoint(v, target, tmp_path / "out")
    before, out = state_dict_of(target), state_dict_of(tmp_path / "out")
    delta = v["model.embed_tokens.weight"]
    assert torch.allclose(out["lm_head.weight"], before["lm_head.weight"] + delta, atol=1e-7)
    assert torch.allclose(
        out["model.embed_tokens.weight"], before["model.embed_tokens.weight"] + delta, atol=1e-7
    )
    assert any("lm_head" in note for note in report.notes)


def test_vocab_mismatch_is_refused_unless_overlap(family, tmp_path):
    fam, v = _vector(family, tmp_path, "llama", dtype=torch.float32)
    bigger = save(build_model("llama", seed=3, vocab_size=136), tmp_path / "big-vocab")
    with pytest.raises(CompatibilityError, match="vocabulary size differs.*`vocab='overlap'`"):
        apply_to_checkpoint(v, bigger, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # another init with another vocabulary: the lineage guard is tested in test_lineage.py
    report = apply_to_checkpoint(v, bigger, tmp_path / "out", vocab="overlap", allow_unrelated=True)
    before, out = state_dict_of(bigger), state_dict_of(tmp_path / "out")
    emb = "model.embed_tokens.weight"
    assert torch.allclose(out[emb][:128], before[emb][:128] + v[emb], atol=1e-7)
    assert torch.equal(out[emb][128:], before[emb][128:])  # new tokens untouched
    assert any("first 128 rows" in n for n in report.notes)


def test_live_apply_with_vocab_overlap(family, tmp_path):
    fam, v = _vector(family, tmp_path, "llama", dtype=torch.float32)
    model = build_model("llama", seed=3, vocab_size=120)
    before = model.model.embed_tokens.weight.detach().clone()
    with pytest.raises(CompatibilityError):
        v.apply_to(model)
    assert torch.equal(model.model.embed_tokens.weight, before)  # refused before touching anything
    v.apply_to(model, vocab="overlap", allow_unrelated=True)  # another init (see test_lineage.py)
    assert torch.allclose(
        model.model.embed_tokens.weight, before + v["model.embed_tokens.weight"][:120], atol=1e-7
    )


def test_exclude_on_apply_leaves_tensors_alone_and_reports_them(family, tmp_path):
    fam, v = _vector(family, tmp_path, "qwen2")
    report = apply_to_checkpoint(v, fam["target"], tmp_path / "out", exclude=["norm"])
    before, out = state_dict_of(fam["target"]), state_dict_of(tmp_path / "out")
    for name in before:
        if "norm" in name:
            assert torch.equal(out[name], before[name])
            assert name in report.skipped
    assert not any("norm" in n for n in report.applied)


def test_tensors_only_in_target_are_left_alone_and_listed(family, tmp_path):
    fam = family("qwen2")
    v = load_vector(extract_vector(fam["a"], fam["b"], exclude=["lm_head"]).save(tmp_path / "v"))
    report = apply_to_checkpoint(v, fam["target"], tmp_path / "out")
    assert report.untouched == ["lm_head.weight"]
    assert torch.equal(
        state_dict_of(tmp_path / "out")["lm_head.weight"],
        state_dict_of(fam["target"])["lm_head.weight"],
    )


def test_apply_refuses_another_architecture(family, tmp_path):
    _, v = _vector(family, tmp_path, "qwen2")
    with pytest.raises(CompatibilityError, match="model_type qwen2, the target is llama"):
        apply_to_checkpoint(v, family("llama")["target"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_fp16_overflow_is_refused_with_the_tensor_name(family, tmp_path):
    fam, v = _vector(family, tmp_path, "llama", dtype=torch.float16)
    with pytest.raises(Exception, match="float16 overflow in"):
        apply_to_checkpoint(v, fam["target"], tmp_path / "out", scale=1e9)
    assert not (tmp_path / "out").exists()


def test_live_fp16_overflow_warns_with_the_tensor_name(family, tmp_path, caplog):
    fam, v = _vector(family, tmp_path, "llama", dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(fam["target"], dtype=torch.float16)
    with caplog.at_level("WARNING", logger="rvhub"):
        report = v.apply_to(model, scale=1e9)
    assert any("float16 overflow" in n for n in report.notes)
    assert re.search(r"float16 overflow: \S+\.weight", caplog.text), caplog.text


def test_live_apply_refuses_offloaded_parameters_before_touching_any(family, tmp_path):
    fam, v = _vector(family, tmp_path, "llama", dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(fam["target"])
    model.model.layers[1].mlp.up_proj.weight = torch.nn.Parameter(
        torch.empty(64, 32, device="meta")
    )
    before = model.model.embed_tokens.weight.detach().clone()
    with pytest.raises(CompatibilityError, match="offloaded"):
        v.apply_to(model)
    assert torch.equal(model.model.embed_tokens.weight, before)


@pytest.mark.parametrize("scale", ["-0", "1e-400"])
def test_a_zero_scale_says_the_output_is_the_target(family, tmp_path, scale):
    fam = family("qwen2")
    vec = extract_vector(fam["a"], fam["b"]).save(tmp_path / "vec")
    r = run("apply", vec, fam["target"], "-o", tmp_path / "out", "--scale", scale)
    assert r.exit_code == 0, r.output
    assert r.stderr.count("is 0: the result equals the target") == 1, r.stderr  # once (item 9)
    assert state_dict_of(tmp_path / "out").keys() == state_dict_of(fam["target"]).keys()
    for name, t in state_dict_of(tmp_path / "out").items():
        assert torch.equal(t, state_dict_of(fam["target"])[name]), name
