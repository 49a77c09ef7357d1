"""Tiny real transformers models built from configs, saved as real checkpoints."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3Config,
    Gemma2Config,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3MoeConfig,
)

COMMON = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=64,
)


def config_for(arch: str, **overrides: object) -> PretrainedConfig:
    """A tiny config: qwen2 (q/k/v biases, untied), llama (untied), gemma2 (tied embeddings),
    mistral, gpt2 (Conv1D, tied), qwen3_moe and deepseek_v3 (MoE; a dense first layer, shared
    experts, MLA attention)."""
    kw = {**COMMON, **overrides}
    if arch == "gpt2":
        return GPT2Config(
            n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64,
            bos_token_id=1, eos_token_id=2, **overrides,
        )  # fmt: skip
    if arch == "mistral":
        kw.setdefault("tie_word_embeddings", False)
        return MistralConfig(**kw)
    if arch == "qwen3_moe":
        kw.setdefault("tie_word_embeddings", False)
        return Qwen3MoeConfig(**kw, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
    if arch == "deepseek_v3":
        kw.update(num_key_value_heads=4, moe_intermediate_size=16, n_routed_experts=4)
        kw.update(num_experts_per_tok=2, first_k_dense_replace=1, q_lora_rank=16)
        kw.update(kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
        kw.update(n_group=1, topk_group=1)
        kw.setdefault("tie_word_embeddings", False)
        return DeepseekV3Config(**kw)
    if arch == "qwen2":
        kw.setdefault("tie_word_embeddings", False)
        return Qwen2Config(**kw)
    if arch == "qwen2-tied":
        kw.setdefault("tie_word_embeddings", True)
        return Qwen2Config(**kw)
    if arch == "llama":
        kw.setdefault("tie_word_embeddings", False)
        return LlamaConfig(**kw)
    if arch == "gemma2":
        kw.setdefault("head_dim", 8)
        kw.setdefault("tie_word_embeddings", True)
        return Gemma2Config(**kw)
    raise ValueError(arch)


def build_model(arch: str, seed: int, dtype: torch.dtype = torch.float32, **overrides: object):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config_for(arch, **overrides))
    return model.to(dtype).eval()


def finetune_like(model, seed: int, scale: float = 0.02) -> None:
    """Perturb every floating parameter in place, the way a fine-tune moves weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=g) * scale * (p.float().abs().mean() + 1e-3)
            p.add_(noise.to(p.dtype))


def save(model, path: Path, **kwargs: object) -> Path:
    model.save_pretrained(path, **kwargs)
    return path


def make_family(
    root: Path, arch: str, dtype: torch.dtype = torch.float32, **overrides: object
) -> dict[str, Path]:
    """base -> A (e.g. GRPO) and B (e.g. SFT) fine-tunes, plus a target (e.g. instruct)."""
    out = {}
    for i, role in enumerate(("a", "b", "target")):
        model = build_model(arch, seed=0, dtype=torch.float32, **overrides)
        finetune_like(model, seed=100 + i)
        out[role] = save(model.to(dtype), root / f"{arch}-{role}")
    return out


def state_dict_of(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(f))
    return out
