"""Checkpoint-format deltas land on live parameters exactly as ``from_pretrained`` would load them.

Each test builds two tiny models A and B of one architecture from a config, saves both with
``save_pretrained`` (so the files hold checkpoint-format names), takes ``v = A − B`` from the
files, loads B with ``from_pretrained``, adds the mapped deltas in place and expects A.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.core_model_loading import ConversionOps, WeightConverter

from rvhub.ops.conversion import live_deltas, plan_live_mapping

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

SMALL: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
}
CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    "mixtral": lambda: transformers.MixtralConfig(
        **SMALL, num_local_experts=4, num_experts_per_tok=2
    ),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        **SMALL,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=8,
        shared_expert_intermediate_size=16,
    ),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **SMALL, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8
    ),
    # renamings only: transformer.h.N.attn.attention.* -> model.layers.N.self_attn.*
    "exaone": lambda: transformers.ExaoneConfig(**SMALL),
    # one-to-many: a fused linear_attn.in_proj is split into four live projections
    "lara_mini": lambda: transformers.LaraMiniConfig(**{**SMALL, "num_hidden_layers": 1}),
    "qwen2": lambda: transformers.Qwen2Config(**SMALL, tie_word_embeddings=False),
    "qwen2_tied": lambda: transformers.Qwen2Config(**SMALL, tie_word_embeddings=True),
}


def _build(config: PretrainedConfig, seed: int) -> PreTrainedModel:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # some inits leave zeros or ones; every tensor must differ A vs B
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    return model


def _pair(tmp_path: Path, arch: str) -> tuple[Path, Path]:
    """Save tiny models A and B of ``arch`` (one config, other weights) in checkpoint format."""
    config = CONFIGS[arch]()
    folders = tmp_path / "a", tmp_path / "b"
    for seed, folder in enumerate(folders):
        _build(config, seed).save_pretrained(folder)
    return folders


def _vector(a: Path, b: Path) -> dict[str, torch.Tensor]:
    ckpt_a, ckpt_b = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert ckpt_a.keys() == ckpt_b.keys()
    return {name: ckpt_a[name].float() - ckpt_b[name].float() for name in ckpt_a}


def _load(folder: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def _apply(model: PreTrainedModel, vector: dict[str, torch.Tensor]) -> list[str]:
    params = dict(model.named_parameters())
    applied = []
    with torch.no_grad():
        for name, delta in live_deltas(model, vector.keys(), vector.__getitem__):
            params[name].add_(delta)
            applied.append(name)
    return applied


def _assert_same_weights(model: PreTrainedModel, reference: PreTrainedModel) -> None:
    ours, theirs = dict(model.named_parameters()), dict(reference.named_parameters())
    assert ours.keys() == theirs.keys()
    for name, param in ours.items():
        torch.testing.assert_close(param, theirs[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe", "exaone", "lara_mini"])
def test_converted_vector_on_b_gives_a(tmp_path: Path, arch: str) -> None:
    a, b = _pair(tmp_path, arch)
    vector = _vector(a, b)
    model_b = _load(b)
    assert set(vector) != {n for n, _ in model_b.named_parameters()}  # names really differ

    mapping = plan_live_mapping(model_b, vector)
    assert mapping.unmapped == []
    assert not mapping.identity

    applied = _apply(model_b, vector)
    assert sorted(applied) == sorted(n for n, _ in model_b.named_parameters())
    _assert_same_weights(model_b, _load(a))


def test_model_built_from_config_maps_through_registered_conversions(tmp_path: Path) -> None:
    a, b = _pair(tmp_path, "mixtral")
    vector = _vector(a, b)
    model_b = _load(b)
    fresh = _build(CONFIGS["mixtral"](), seed=1)  # no _weight_conversions attribute
    fresh.load_state_dict(model_b.state_dict())
    assert getattr(fresh, "_weight_conversions", None) is None

    _apply(fresh, vector)
    _assert_same_weights(fresh, _load(a))


def test_fused_expert_delta_is_built_from_its_parts_in_order(tmp_path: Path) -> None:
    a, b = _pair(tmp_path, "mixtral")
    vector = _vector(a, b)
    model_b = _load(b)
    deltas = dict(live_deltas(model_b, vector.keys(), vector.__getitem__))

    fused = deltas["model.layers.1.mlp.experts.gate_up_proj"]
    prefix = "model.layers.1.block_sparse_moe.experts"
    w1, w3 = vector[f"{prefix}.2.w1.weight"], vector[f"{prefix}.2.w3.weight"]
    assert fused.shape == (4, w1.shape[0] + w3.shape[0], w1.shape[1])
    torch.testing.assert_close(fused[2], torch.cat([w1, w3]), rtol=0, atol=0)


def test_groups_fetch_only_their_own_tensors_one_group_at_a_time(tmp_path: Path) -> None:
    a, b = _pair(tmp_path, "mixtral")
    vector = _vector(a, b)
    model_b = _load(b)
    mapping = plan_live_mapping(model_b, vector)
    group_of = {source: i for i, group in enumerate(mapping.groups) for source in group.sources}
    fetched: list[int] = []

    def get(name: str) -> torch.Tensor:
        fetched.append(group_of[name])
        return vector[name]

    deltas = mapping.deltas(get)
    assert fetched == []  # planning reads names only
    next(deltas)
    assert fetched == [0] * len(mapping.groups[0].sources)
    for _ in deltas:
        pass
    assert fetched == sorted(fetched)  # each group's fetches come together, group after group
    assert len(fetched) == len(vector)
    assert max(len(g.sources) for g in mapping.groups) == 8  # 4 experts x (w1, w3)


def test_missing_expert_part_is_refused_before_any_delta(tmp_path: Path) -> None:
    a, b = _pair(tmp_path, "mixtral")
    vector = _vector(a, b)
    del vector["model.layers.0.block_sparse_moe.experts.3.w1.weight"]
    model_b = _load(b)

    with pytest.raises(ValueError, match=r"experts\.3\.w1\.weight"):
        live_deltas(model_b, vector.keys(), vector.__getitem__)


def test_missing_last_expert_is_refused(tmp_path: Path) -> None:
    a, b = _pair(tmp_path, "qwen2_moe")
    vector = _vector(a, b)
    for part in ("gate_proj", "up_proj"):
        del vector[f"model.layers.1.mlp.experts.3.{part}.weight"]
    model_b = _load(b)

    with pytest.raises(ValueError, match="missing from the vector"):
        plan_live_mapping(model_b, vector)


def test_shape_check_guards_a_group_the_plan_could_not_check(tmp_path: Path) -> None:
    a, b = _pair(tmp_path, "mixtral")
    vector = _vector(a, b)
    model_b = _load(b)
    mapping = plan_live_mapping(model_b, vector)
    name = "model.layers.0.block_sparse_moe.experts.1.w2.weight"

    def get(key: str) -> torch.Tensor:
        return vector[key][:, :-1] if key == name else vector[key]

    with pytest.raises(ValueError, match="every one of its parts"):
        list(mapping.deltas(get))


def test_dense_model_maps_by_identity(tmp_path: Path) -> None:
    a, b = _pair(tmp_path, "qwen2")
    vector = _vector(a, b)
    model_b = _load(b)

    mapping = plan_live_mapping(model_b, vector)
    assert mapping.identity and mapping.unmapped == []
    assert all(g.converter is None and g.sources == g.targets for g in mapping.groups)
    _apply(model_b, vector)
    _assert_same_weights(model_b, _load(a))


def test_tied_embedding_is_yielded_once(tmp_path: Path) -> None:
    a, b = _pair(tmp_path, "qwen2_tied")
    vector = _vector(a, b)
    assert "lm_head.weight" not in vector  # save_pretrained drops the tied copy
    model_b = _load(b)
    assert model_b.lm_head.weight is model_b.model.embed_tokens.weight

    applied = _apply(model_b, vector)
    assert applied.count("model.embed_tokens.weight") == 1
    _assert_same_weights(model_b, _load(a))


def test_tied_alias_name_maps_to_the_shared_parameter(tmp_path: Path) -> None:
    a, b = _pair(tmp_path, "qwen2_tied")
    vector = _vector(a, b)
    vector["lm_head.weight"] = vector.pop("model.embed_tokens.weight")
    model_b = _load(b)

    applied = _apply(model_b, vector)
    assert applied.count("model.embed_tokens.weight") == 1
    assert "lm_head.weight" not in applied
    _assert_same_weights(model_b, _load(a))


def test_names_the_model_lacks_are_reported_unmapped(tmp_path: Path) -> None:
    a, b = _pair(tmp_path, "qwen2")
    vector = _vector(a, b)
    vector["model.layers.7.mlp.up_proj.weight"] = torch.zeros(16, 32)
    model_b = _load(b)

    mapping = plan_live_mapping(model_b, vector)
    assert mapping.unmapped == ["model.layers.7.mlp.up_proj.weight"]
    assert len(mapping.groups) == len(vector) - 1


def test_base_model_vector_maps_onto_causal_lm(tmp_path: Path) -> None:
    a, b = _pair(tmp_path, "qwen2")
    vector = {
        k.removeprefix("model."): v for k, v in _vector(a, b).items() if k.startswith("model.")
    }
    model_b = _load(b)

    mapping = plan_live_mapping(model_b, vector)
    assert mapping.unmapped == []
    assert {t for g in mapping.groups for t in g.targets} == {
        n for n, _ in model_b.named_parameters() if n != "lm_head.weight"
    }


def test_both_tied_names_in_the_vector_give_two_groups_on_one_parameter(tmp_path: Path) -> None:
    a, b = _pair(tmp_path, "qwen2_tied")
    vector = _vector(a, b)
    vector["lm_head.weight"] = vector["model.embed_tokens.weight"]
    model_b = _load(b)

    mapping = plan_live_mapping(model_b, vector)
    tied = [g for g in mapping.groups if g.targets == ("model.embed_tokens.weight",)]
    assert sorted(s for g in tied for s in g.sources) == [
        "lm_head.weight",
        "model.embed_tokens.weight",
    ]


class _Square(ConversionOps):
    def convert(
        self,
        input_dict: dict[str, Any],
        source_patterns: list[str],
        target_patterns: list[str],
        **kwargs: Any,
    ) -> dict[str, Any]:
        return {k: [t * t for t in v] for k, v in input_dict.items()}


def test_conversion_that_is_not_linear_is_refused(tmp_path: Path) -> None:
    a, b = _pair(tmp_path, "qwen2")
    vector = _vector(a, b)
    model_b = _load(b)
    squaring = WeightConverter("mlp.up_proj.weight", "mlp.up_proj.weight", operations=[_Square()])

    with pytest.raises(ValueError, match="_Square, which is not a linear op"):
        plan_live_mapping(model_b, vector, conversions=[squaring])


def test_two_names_for_one_parameter_are_refused(tmp_path: Path) -> None:
    a, b = _pair(tmp_path, "qwen2")
    vector = _vector(a, b)
    vector["norm.weight"] = vector["model.norm.weight"]  # base-model name of the same tensor
    model_b = _load(b)

    with pytest.raises(ValueError, match=r"both map to the live parameter 'model\.norm\.weight'"):
        plan_live_mapping(model_b, vector)
