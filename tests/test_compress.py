"""Compressed encodings end to end: LoRA as a stock PEFT adapter, and lossless sparse."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from rvhub import apply_to_checkpoint, compress_vector, extract_vector, load_vector
from tests.cli_helpers import assert_clean_failure, run
from tests.models import build_model, finetune_like, save, state_dict_of

ARCHS = ["qwen2", "llama", "gemma2"]


def _lowrank_family(tmp_path, arch, rank=3):
    """B, then A = B + a low-rank update on every matrix + changed biases/norms, and a target."""
    b = build_model(arch, seed=0)
    a = build_model(arch, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in a.parameters():
            if p.ndim == 2:
                u = torch.randn(p.shape[0], rank, generator=g)
                v = torch.randn(rank, p.shape[1], generator=g)
                p.add_(0.01 * u @ v)
            else:
                p.add_(0.01 * torch.randn(p.shape, generator=g))
    target = build_model(arch, seed=0)  # a third fine-tune of the same base
    finetune_like(target, seed=5)
    return save(a, tmp_path / "a"), save(b, tmp_path / "b"), save(target, tmp_path / "target")


@pytest.mark.parametrize("arch", ARCHS)
def test_stock_peft_merge_equals_rvhub_apply_on_what_peft_changes(tmp_path, arch):
    a, b, target = _lowrank_family(tmp_path, arch)
    path = compress_vector(extract_vector(a, b), tmp_path / "lora", encoding="lora", rank=2)
    base = AutoModelForCausalLM.from_pretrained(target).state_dict()
    merged = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(target), path
    ).merge_and_unload()
    ours = AutoModelForCausalLM.from_pretrained(target)
    load_vector(path).apply_to(ours)
    peft_changed = [k for k, t in merged.state_dict().items() if not torch.equal(t, base[k])]
    assert peft_changed, "PEFT should change the LoRA targets"
    for name in peft_changed:
        assert torch.allclose(merged.state_dict()[name], ours.state_dict()[name], atol=1e-6), name
    manifest = json.loads((path / "rvhub.json").read_text())
    comp = manifest["compression"]
    assert manifest["encoding"] == "lora" and comp["ranks"]["max"] == 2
    # biases (Qwen2) and norms are deltas PEFT does not hold: rvhub applies them from vector.safetensors
    dense = [n for n, t in manifest["tensors"].items() if t["stored"] == "dense"]
    assert any("norm" in n for n in dense)
    if arch == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in dense
    assert 0 < comp["rvhub_norm_share"] < 1 and comp["peft_norm_share"] + comp[
        "rvhub_norm_share"
    ] == pytest.approx(1)
    adapter = json.loads((path / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["lora_alpha"] == adapter["r"]
    assert not adapter.get("modules_to_save")


@pytest.mark.parametrize("arch", ARCHS)
def test_full_rank_lora_reproduces_the_dense_vector_on_every_tensor(tmp_path, arch):
    a, b, target = _lowrank_family(tmp_path, arch)
    vec = extract_vector(a, b)
    lora = load_vector(compress_vector(vec, tmp_path / "lora", encoding="lora", rank=10_000))
    dense = load_vector(vec.save(tmp_path / "dense"))
    ours, ref = (
        AutoModelForCausalLM.from_pretrained(target),
        AutoModelForCausalLM.from_pretrained(target),
    )
    lora.apply_to(ours)
    dense.apply_to(ref)
    for name, t in ref.state_dict().items():
        assert torch.allclose(ours.state_dict()[name], t, atol=1e-6), name
    # and on disk
    apply_to_checkpoint(lora, target, tmp_path / "out")
    on_disk = state_dict_of(tmp_path / "out")
    for name, t in ref.state_dict().items():
        if name in on_disk:
            assert torch.allclose(on_disk[name], t, atol=1e-6), name


def test_energy_and_max_error_bounds_hold_on_every_module(tmp_path):
    a = build_model("llama", seed=0)
    b = build_model("llama", seed=1)  # unrelated weights: a full-rank, slowly decaying spectrum
    sa, sb = save(a, tmp_path / "a"), save(b, tmp_path / "b")
    vec = extract_vector(sa, sb)
    m = json.loads(
        (
            compress_vector(vec, tmp_path / "e", encoding="lora", energy=0.9) / "rvhub.json"
        ).read_text()
    )
    lora = {n: t for n, t in m["tensors"].items() if t["stored"] == "lora"}
    assert lora and all(t["energy_kept"] >= 0.9 - 1e-6 for t in lora.values())
    m = json.loads(
        (
            compress_vector(vec, tmp_path / "m", encoding="lora", max_error=0.3) / "rvhub.json"
        ).read_text()
    )
    lora = {n: t for n, t in m["tensors"].items() if t["stored"] == "lora"}
    assert all(t["rel_error"] <= 0.3 + 1e-5 for t in lora.values())
    assert any(t["rank"] < min(t["shape"]) for t in lora.values()), (
        "the bound should allow some truncation"
    )
    m = json.loads(
        (
            compress_vector(vec, tmp_path / "c", encoding="lora", max_error=0.01, rank=4)
            / "rvhub.json"
        ).read_text()
    )
    assert all(t["rank"] <= 4 for t in m["tensors"].values() if t["stored"] == "lora")


def test_sparse_round_trip_is_bit_exact(tmp_path):
    b = build_model("qwen2", seed=0, dtype=torch.bfloat16)
    a = build_model("qwen2", seed=0, dtype=torch.bfloat16)
    with torch.no_grad():  # an RL-like update: a few rows of a few matrices change
        a.model.layers[0].mlp.up_proj.weight[:3] += 0.5
        a.model.embed_tokens.weight[7] -= 0.25
        a.model.layers[1].self_attn.q_proj.bias[2] = 0.125
    sa, sb = save(a, tmp_path / "a"), save(b, tmp_path / "b")
    vec = extract_vector(sa, sb)
    dense = load_vector(vec.save(tmp_path / "dense"))
    r = run("compress", tmp_path / "dense", "-o", tmp_path / "sparse", "--encoding", "sparse")
    assert r.exit_code == 0, r.output
    assert "sparse" in r.output and "of dense" in r.output
    sparse = load_vector(tmp_path / "sparse")
    for name in dense.names:
        x, y = dense.get(name, dtype=None), sparse.get(name, dtype=None)
        assert x.dtype == y.dtype and torch.equal(x.view(torch.int16), y.view(torch.int16)), name
    m = json.loads((tmp_path / "sparse" / "rvhub.json").read_text())
    assert m["compression"]["ratio"] < 0.2 and m["compression"]["lossless"] is True
    r = run("inspect", tmp_path / "sparse")
    assert "lossless" in r.output
    # straight from the checkpoints: the same dtype and bits as the dense extract, one file
    r = run("extract", sa, sb, "-o", tmp_path / "direct", "--encoding", "sparse")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "direct" / "vector.safetensors").read_bytes() == (
        tmp_path / "sparse" / "vector.safetensors"
    ).read_bytes()
    assert not any(p.suffix == ".spool" for p in (tmp_path / "direct").iterdir())
    direct = json.loads((tmp_path / "direct" / "rvhub.json").read_text())
    for name, info in direct["tensors"].items():
        assert info["norm"] == pytest.approx(m["tensors"][name]["norm"], rel=1e-2, abs=1e-6)


def test_extract_straight_to_lora_and_inspect_reports_the_peft_share(family, tmp_path):
    fam = family("qwen2")
    r = run(
        "extract", fam["a"], fam["b"], "-o", tmp_path / "v", "--encoding", "lora", "--rank", "4"
    )
    assert r.exit_code == 0, r.output
    assert "LoRA error" in r.output
    r = run("inspect", tmp_path / "v")
    assert "worst modules" in r.output
    manifest = json.loads((tmp_path / "v" / "rvhub.json").read_text())
    engines = manifest["compression"]["engines"]
    assert set(engines) == {"peft", "vllm", "sglang", "llama.cpp"}
    # every engine's line in inspect, with the share of the whole vector it applies
    for name, report in engines.items():
        assert f"{name:<10} {report['version']}: " in r.output
    peft = engines["peft"]
    assert peft["loads"] and f"= {peft['share']:.1%} of ‖v‖²" in r.output
    assert "only rvhub apply adds" in r.output
    # Qwen2 declares no embedding LoRA in vLLM: the default (peft) adapter holds embed_tokens
    assert not engines["vllm"]["loads"] and "takes no LoRA on" in engines["vllm"]["problems"][0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--encoding", "lora", "--rank", "0"], "--rank must be a positive integer"),
        (["--encoding", "lora", "--rank", "-3"], "--rank must be a positive integer"),
        (["--encoding", "lora", "--energy", "1.5"], "--energy must be in (0, 1]"),
        (["--encoding", "lora", "--energy", "0"], "--energy must be in (0, 1]"),
        (["--encoding", "lora", "--max-error", "1"], "--max-error must be in [0, 1)"),
        (["--encoding", "lora"], "needs --rank, --energy or --max-error"),
        (["--rank", "8"], "need --encoding lora"),
        (["--encoding", "sparse"], "not worth it"),
    ],
)
def test_bad_compression_options_get_one_clear_line(family, tmp_path, args, message):
    fam = family("qwen2")
    dense = extract_vector(fam["a"], fam["b"]).save(tmp_path / "dense")
    out = tmp_path / "out"
    r = run("compress", dense, "-o", out, *args)
    assert_clean_failure(r, match=message, output=out)
