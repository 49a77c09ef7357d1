"""Fused-expert MoE models: a vector in checkpoint names lands on transformers 5's live params."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from rvhub import apply_to_checkpoint, extract_vector, load_vector
from tests.models import finetune_like, state_dict_of

SMALL = dict(
    hidden_size=32,
    intermediate_size=16,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
)


def _moe_family(tmp_path, config):
    out = {}
    for i, role in enumerate(("a", "b", "target")):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        finetune_like(model, seed=50 + i)
        model.save_pretrained(tmp_path / role)
        out[role] = tmp_path / role
    return out


CONFIGS = {
    "mixtral": lambda: transformers.MixtralConfig(
        **SMALL, num_local_experts=4, num_experts_per_tok=2
    ),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        **SMALL,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
    ),
}


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_live_apply_on_fused_experts_equals_loading_the_sum(tmp_path, arch):
    fam = _moe_family(tmp_path, CONFIGS[arch]())
    names = state_dict_of(fam["a"]).keys()
    assert any(".experts.0." in n for n in names), "the checkpoint should hold per-expert tensors"
    v = load_vector(extract_vector(fam["a"], fam["b"]).save(tmp_path / "v", dtype="float32"))
    model = AutoModelForCausalLM.from_pretrained(fam["b"])
    live = dict(model.named_parameters())
    assert any(n.endswith("experts.gate_up_proj") for n in live), (
        "transformers should fuse experts live"
    )
    report = v.apply_to(model)
    expected = AutoModelForCausalLM.from_pretrained(fam["a"])
    for name, p in expected.named_parameters():
        assert torch.allclose(live[name], p, atol=1e-6), name
    assert report.missing == [] and any("experts" in n for n in report.applied)


def test_on_disk_apply_keeps_checkpoint_names_for_moe(tmp_path):
    fam = _moe_family(tmp_path, CONFIGS["mixtral"]())
    v = load_vector(extract_vector(fam["a"], fam["b"]).save(tmp_path / "v", dtype="float32"))
    apply_to_checkpoint(v, fam["b"], tmp_path / "out")
    out, a = state_dict_of(tmp_path / "out"), state_dict_of(fam["a"])
    assert out.keys() == a.keys()
    for name in a:
        assert torch.allclose(out[name], a[name], atol=1e-6), name


def test_live_moe_apply_refuses_offloaded_experts(tmp_path):
    fam = _moe_family(tmp_path, CONFIGS["mixtral"]())
    v = load_vector(extract_vector(fam["a"], fam["b"]).save(tmp_path / "v", dtype="float32"))
    model = AutoModelForCausalLM.from_pretrained(fam["b"])
    experts = model.model.layers[1].mlp.experts
    experts.gate_up_proj = torch.nn.Parameter(torch.empty_like(experts.gate_up_proj, device="meta"))
    before = model.model.embed_tokens.weight.detach().clone()
    with pytest.raises(Exception, match="offloaded"):
        v.apply_to(model)
    assert torch.equal(model.model.embed_tokens.weight, before)
