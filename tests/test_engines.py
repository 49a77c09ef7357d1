"""LoRA adapters in the engines users serve them with, run for real where they run here.

* llama.cpp: llama.cpp's own converters (from PyPI's llama-cpp-python sdist) turn a tiny base
  model and rvhub adapters into GGUF; ``llama_cpp`` runs the model with and without the adapter
  (in a subprocess: llama.cpp aborts the process on an adapter it cannot use).
  ``bash .ci/engines-setup.sh`` installs them; without them these tests skip, unless
  ``RVHUB_REQUIRE_ENGINES=1`` (``.ci/run`` sets it) turns the skip into a failure.
* PEFT: unmerged and merged inference, ``load_adapter``, ``add_weighted_adapter``, and what
  stock ``merge_and_unload()`` changes, on every architecture the profiles know.
* vLLM and SGLang need a GPU build: their profiles are checked against the rules as data
  (``rvhub/engines.py``, read from vllm 0.34.0 and sglang 0.5.23).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rvhub.encodings.lora import read_peft_adapter
from rvhub.engines import ENGINES, VLLM_MAX_LORA_RANKS, engine_takes
from tests.cli_helpers import run
from tests.models import make_family, state_dict_of

ROOT = Path(__file__).resolve().parents[1]
LLAMA_CPP = Path(
    os.environ.get(
        "RVHUB_LLAMA_CPP_DIR",
        ROOT / ".cache/engines/llama-cpp-python-0.3.36/vendor/llama.cpp",
    )
)
IDS = [1, 5, 9, 77, 3, 40, 100, 17]


def _missing_llama_cpp() -> str | None:
    if not (LLAMA_CPP / "convert_lora_to_gguf.py").is_file():
        return f"llama.cpp's converters are not at {LLAMA_CPP} (bash .ci/engines-setup.sh)"
    for module in ("llama_cpp", "sentencepiece"):
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed (bash .ci/engines-setup.sh)"
    return None


@pytest.fixture(scope="session")
def llama_cpp() -> Path:
    why = _missing_llama_cpp()
    if why:
        if os.environ.get("RVHUB_REQUIRE_ENGINES") == "1":
            pytest.fail(why)
        pytest.skip(why)
    return LLAMA_CPP


@pytest.fixture(scope="session")
def tokenizer_model(tmp_path_factory: pytest.TempPathFactory, llama_cpp: Path) -> Path:
    """A 128-piece SentencePiece model: llama.cpp's converter needs a tokenizer."""
    import sentencepiece as spm

    root = tmp_path_factory.mktemp("spm")
    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    words = ["".join(rng.choice(alphabet) for _ in range(rng.randint(2, 7))) for _ in range(400)]
    lines = (" ".join(rng.choice(words) for _ in range(12)) for _ in range(2000))
    (root / "corpus.txt").write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(
        input=str(root / "corpus.txt"),
        model_prefix=str(root / "tok"),
        vocab_size=128,
        model_type="bpe",
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    return root / "tok.model"


def _gguf_family(root: Path, tokenizer: Path, **overrides: object) -> dict[str, Path]:
    fam = make_family(root, "llama", **overrides)
    for folder in fam.values():
        shutil.copy(tokenizer, folder / "tokenizer.model")
    return fam


def _convert(script: str, *args: object, env: dict[str, str] | None = None) -> None:
    full_env = {**os.environ, **(env or {}), "PYTHONPATH": str(LLAMA_CPP / "gguf-py")}
    done = subprocess.run(
        [sys.executable, str(LLAMA_CPP / script), *map(str, args), "--outtype", "f32"],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]


_RUN_LLAMA = """
import json, sys, numpy as np
from llama_cpp import Llama
model, lora, ids, out = sys.argv[1], sys.argv[2] or None, json.loads(sys.argv[3]), sys.argv[4]
m = Llama(model_path=model, lora_path=lora, logits_all=True, verbose=False, n_ctx=64, n_threads=2)
m.eval(ids)
np.save(out, np.array(m.scores[: len(ids)], dtype=np.float64))
"""


def _llama_logits(model: Path, lora: Path | None, out: Path) -> np.ndarray | None:
    """llama.cpp's logits for IDS, or None when llama.cpp aborted."""
    done = subprocess.run(
        [sys.executable, "-c", _RUN_LLAMA, str(model), str(lora or ""), json.dumps(IDS), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0:
        return None
    return np.load(out)


def _hf_logits(folder: Path, deltas: dict[str, torch.Tensor] | None = None) -> np.ndarray:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, delta in (deltas or {}).items():
            model.get_parameter(name).add_(delta)
        return model(torch.tensor([IDS])).logits[0].double().numpy()


def _rel(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.linalg.norm(x - y) / np.linalg.norm(y))


@pytest.mark.parametrize(
    "rank_args", [["--rank", "8"], ["--energy", "0.9"]], ids=["uniform", "mixed-ranks"]
)
def test_llama_cpp_applies_the_adapter_exactly(
    llama_cpp: Path, tokenizer_model: Path, tmp_path: Path, rank_args: list[str]
) -> None:
    fam = _gguf_family(tmp_path, tokenizer_model)
    vec = tmp_path / "vec"
    r = run("extract", fam["a"], fam["b"], "-o", vec, "--encoding", "lora", *rank_args,
            "--for", "llama.cpp", "--base-model", fam["b"])  # fmt: skip
    assert r.exit_code == 0, r.output
    config = json.loads((vec / "adapter_config.json").read_text())
    assert config["alpha_pattern"] == {}
    if rank_args[0] == "--energy":  # the case alpha_pattern got wrong: ranks 10-25 here
        assert config["rank_pattern"]
    _convert("convert_hf_to_gguf.py", fam["b"], "--outfile", tmp_path / "b.gguf")
    _convert("convert_lora_to_gguf.py", vec, "--base", fam["b"], "--outfile", tmp_path / "l.gguf")

    base_ll = _llama_logits(tmp_path / "b.gguf", None, tmp_path / "base.npy")
    lora_ll = _llama_logits(tmp_path / "b.gguf", tmp_path / "l.gguf", tmp_path / "lora.npy")
    assert base_ll is not None and lora_ll is not None
    factors = {name: b @ a for name, (a, b) in read_peft_adapter(vec).items()}
    assert "model.embed_tokens.weight" in factors and "lm_head.weight" in factors
    base_hf = _hf_logits(fam["b"])
    lora_hf = _hf_logits(fam["b"], factors)  # B + B_f @ A_f, by rvhub's reader

    numerics = _rel(base_ll, base_hf)  # llama.cpp's f32 kernels against torch's
    assert numerics < 1e-3
    effect = _rel(lora_hf, base_hf)
    assert _rel(lora_ll, lora_hf) < 3 * numerics + 1e-4 < effect / 30

    # The whole vector (rvhub apply) also changes the norms, which no engine applies.
    applied = tmp_path / "applied"
    assert run("apply", vec, fam["b"], "-o", applied).exit_code == 0
    assert _rel(lora_ll, _hf_logits(applied)) > 10 * _rel(lora_ll, lora_hf)


def test_llama_cpp_on_tied_embeddings(
    llama_cpp: Path, tokenizer_model: Path, tmp_path: Path
) -> None:
    fam = _gguf_family(tmp_path, tokenizer_model, tie_word_embeddings=True)
    _convert("convert_hf_to_gguf.py", fam["b"], "--outfile", tmp_path / "b.gguf")
    outputs = {}
    for engine in ("peft", "llama.cpp"):
        vec = tmp_path / engine
        r = run("extract", fam["a"], fam["b"], "-o", vec, "--encoding", "lora", "--rank", "8",
                "--for", engine, "--base-model", fam["b"])  # fmt: skip
        assert r.exit_code == 0, r.output
        gguf = tmp_path / f"{engine}.gguf"
        _convert("convert_lora_to_gguf.py", vec, "--base", fam["b"], "--outfile", gguf)
        outputs[engine] = (vec, _llama_logits(tmp_path / "b.gguf", gguf, tmp_path / "o.npy"))

    # The default adapter holds the tied embedding: llama.cpp aborts on it, as rvhub says.
    peft_vec, aborted = outputs["peft"]
    assert aborted is None
    manifest = json.loads((peft_vec / "rvhub.json").read_text())
    report = manifest["compression"]["engines"]["llama.cpp"]
    assert not report["loads"] and "model.embed_tokens.weight" in report["problems"][0]

    # The llama.cpp profile keeps it dense, and llama.cpp applies the rest exactly.
    vec, logits = outputs["llama.cpp"]
    assert logits is not None
    factors = {name: b @ a for name, (a, b) in read_peft_adapter(vec).items()}
    assert not any("embed_tokens" in n for n in factors)
    assert (
        json.loads((vec / "rvhub.json").read_text())["tensors"]["model.embed_tokens.weight"][
            "stored"
        ]
        == "dense"
    )
    expected = _hf_logits(fam["b"], factors)
    assert _rel(logits, expected) < 1e-3 < _rel(expected, _hf_logits(fam["b"])) / 10


def test_llama_cpp_finds_the_base_model_from_the_adapter_alone(
    llama_cpp: Path, tokenizer_model: Path, hub, tmp_path: Path
) -> None:
    """Without --base the converter reads base_model_name_or_path and asks the Hub for it."""
    fam = _gguf_family(tmp_path, tokenizer_model)
    a_id, b_id = hub.new_repo_id("grpo"), hub.new_repo_id("sft")
    for repo_id, folder in ((a_id, fam["a"]), (b_id, fam["b"])):
        hub.seed_repo(repo_id, {p.name: p for p in folder.iterdir() if p.is_file()})
    vec = tmp_path / "vec"
    r = run("extract", a_id, b_id, "-o", vec, "--encoding", "lora", "--rank", "4")
    assert r.exit_code == 0, r.output
    assert json.loads((vec / "adapter_config.json").read_text())["base_model_name_or_path"] == a_id
    env = {k: os.environ[k] for k in ("HF_ENDPOINT", "HF_HOME") if k in os.environ}
    _convert("convert_lora_to_gguf.py", vec, "--outfile", tmp_path / "l.gguf", env=env)
    assert (tmp_path / "l.gguf").stat().st_size > 0

    named = tmp_path / "named"
    r = run("compress", vec, "-o", named, "--encoding", "lora", "--rank", "4",
            "--base-model", "org/instruct")  # fmt: skip
    assert r.exit_code == 0, r.output
    config = json.loads((named / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "org/instruct"


# -- PEFT ----------------------------------------------------------------------------------------


def _peft(base: Path, adapter: Path, name: str = "default"):
    from peft import PeftModel

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(model, adapter, adapter_name=name)


@pytest.mark.parametrize(
    "arch", ["qwen2", "llama", "gemma2", "mistral", "gpt2", "qwen3_moe", "deepseek_v3"]
)
def test_stock_peft_merge_equals_rvhub_apply_on_every_tensor_it_changes(
    arch: str, tmp_path: Path
) -> None:
    fam = make_family(tmp_path, arch)
    vec = tmp_path / "vec"
    r = run("extract", fam["a"], fam["b"], "-o", vec, "--encoding", "lora", "--energy", "0.9")
    assert r.exit_code == 0, r.output
    manifest = json.loads((vec / "rvhub.json").read_text())
    comp = manifest["compression"]
    assert comp["peft_modules"] == "measured"
    in_adapter = {n for n, t in manifest["tensors"].items() if t["stored"] == "lora"}

    merged = _peft(fam["target"], vec).merge_and_unload().state_dict()
    target = state_dict_of(fam["target"])
    changed = {n for n in target if n in merged and not torch.equal(merged[n], target[n])}
    # what PEFT changes is exactly what rvhub measured and reported
    assert changed == in_adapter
    assert comp["engines"]["peft"]["lora_tensors"] == len(in_adapter)
    applied = tmp_path / "applied"
    assert run("apply", vec, fam["target"], "-o", applied).exit_code == 0
    ours = state_dict_of(applied)
    for name in changed:
        torch.testing.assert_close(merged[name], ours[name], atol=1e-6, rtol=1e-5)
    if arch == "gpt2":  # Conv1D: [in, out] weights, fan_in_fan_out
        assert json.loads((vec / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    if arch == "deepseek_v3":  # PEFT 0.21 + transformers 5 leave the dense MLPs unwrapped
        dense = {n for n, t in manifest["tensors"].items() if t["stored"] == "dense"}
        assert "model.layers.0.mlp.gate_proj.weight" in dense
        assert "model.layers.1.mlp.shared_experts.up_proj.weight" in dense


def test_peft_unmerged_merged_and_load_adapter_agree(tmp_path: Path) -> None:
    fam = make_family(tmp_path, "llama")
    vec = tmp_path / "vec"
    assert run("extract", fam["a"], fam["b"], "-o", vec, "--encoding", "lora",
               "--energy", "0.9").exit_code == 0  # fmt: skip
    ids = torch.tensor([IDS])
    peft_model = _peft(fam["target"], vec)
    with torch.no_grad():
        unmerged = peft_model(ids).logits
        merged = peft_model.merge_and_unload()(ids).logits
    torch.testing.assert_close(unmerged, merged, atol=1e-5, rtol=1e-5)

    model = AutoModelForCausalLM.from_pretrained(fam["target"], dtype=torch.float32).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.load_adapter(str(vec), adapter_name="rv")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, unmerged, atol=1e-5, rtol=1e-5)

    factors = {name: b @ a for name, (a, b) in read_peft_adapter(vec).items()}
    expected = torch.from_numpy(_hf_logits(fam["target"], factors)).float()
    torch.testing.assert_close(merged[0], expected, atol=1e-4, rtol=1e-4)


def test_peft_add_weighted_adapter_linear_on_two_rvhub_adapters(tmp_path: Path) -> None:
    """PEFT's ``linear`` combines the factors, not the products: with weights w it builds
    (Σ √w_i·B_i)(Σ √w_i·A_i), cross terms included; ``cat`` is Σ w_i·B_i A_i."""
    fam = make_family(tmp_path, "llama")
    other = make_family(tmp_path / "other", "llama")
    vecs = []
    for i, (a, b) in enumerate(((fam["a"], fam["b"]), (other["a"], fam["b"]))):
        vecs.append(tmp_path / f"v{i}")
        r = run("extract", a, b, "-o", vecs[-1], "--encoding", "lora", "--rank", "4")
        assert r.exit_code == 0, r.output
    model = _peft(fam["target"], vecs[0], "one")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.load_adapter(str(vecs[1]), adapter_name="two")
    weights = [0.7, 0.3]
    model.add_weighted_adapter(["one", "two"], weights, "lin", combination_type="linear")
    model.add_weighted_adapter(["one", "two"], weights, "cat", combination_type="cat")
    f1, f2 = read_peft_adapter(vecs[0]), read_peft_adapter(vecs[1])
    target = state_dict_of(fam["target"])
    results = {}
    for adapter in ("lin", "cat"):
        model.set_adapter(adapter)
        results[adapter] = {
            n: model.base_model.model.get_submodule(n[:-7]).get_delta_weight(adapter)
            for n in f1
            if "embed" not in n
        }
    for name in results["lin"]:
        (a1, b1), (a2, b2) = f1[name], f2[name]
        s1, s2 = weights[0] ** 0.5, weights[1] ** 0.5
        cross = (s1 * b1 + s2 * b2) @ (s1 * a1 + s2 * a2)
        exact = weights[0] * (b1 @ a1) + weights[1] * (b2 @ a2)
        torch.testing.assert_close(results["lin"][name], cross, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(results["cat"][name], exact, atol=1e-5, rtol=1e-4)
        assert target[name].shape == exact.shape


# -- vLLM and SGLang: the profiles against the rules as data -----------------------------------


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gemma2"])
def test_vllm_profile_holds_only_what_vllm_loads(arch: str, tmp_path: Path) -> None:
    fam = make_family(tmp_path, arch)
    vec = tmp_path / "vec"
    r = run("extract", fam["a"], fam["b"], "-o", vec, "--encoding", "lora", "--energy", "0.95",
            "--for", "vllm")  # fmt: skip
    assert r.exit_code == 0, r.output
    config = json.loads((vec / "adapter_config.json").read_text())
    manifest = json.loads((vec / "rvhub.json").read_text())
    architecture = manifest["model"]["architectures"][0]
    vllm = ENGINES["vllm"]
    # vLLM's checks (PEFTHelper.validate_legal, check_unexpected_modules), from the data
    assert not config["use_dora"] and not config["lora_bias"] and not config["modules_to_save"]
    assert config["bias"] == "none"
    for module in config["target_modules"]:
        assert engine_takes(vllm, module + ".weight", architecture)
    keys = load_file(vec / "adapter_model.safetensors").keys()
    embeds = any("embed_tokens" in k or "lm_head" in k for k in keys)
    assert embeds == (arch == "llama")  # Qwen2/Gemma2 declare no embedding_modules in vLLM
    report = manifest["compression"]["engines"]["vllm"]
    max_rank = max([config["r"], *config["rank_pattern"].values()])
    server = int(report["server"].split()[-1])
    assert report["loads"] and server in VLLM_MAX_LORA_RANKS and max_rank <= server
    assert f"--max-lora-rank {server}" in r.output  # the line extract prints
    assert report["share"] <= manifest["compression"]["engines"]["peft"]["share"]
    # nothing lost: what vLLM does not take is dense beside the adapter, and rvhub applies it
    dense = {n for n, t in manifest["tensors"].items() if t["stored"] == "dense"}
    if arch != "llama":
        assert "model.embed_tokens.weight" in dense


def test_sglang_profile_has_one_rank_and_the_same_products(tmp_path: Path) -> None:
    fam = make_family(tmp_path, "qwen2")
    out = {}
    for engine in ("peft", "sglang"):
        out[engine] = tmp_path / engine
        r = run("extract", fam["a"], fam["b"], "-o", out[engine], "--encoding", "lora",
                "--energy", "0.9", "--for", engine)  # fmt: skip
        assert r.exit_code == 0, r.output
    config = json.loads((out["sglang"] / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {} and config["r"] == config["lora_alpha"]
    stored = load_file(out["sglang"] / "adapter_model.safetensors")
    assert {t.shape[0] for k, t in stored.items() if k.endswith("lora_A.weight")} == {config["r"]}
    peft, sglang = read_peft_adapter(out["peft"]), read_peft_adapter(out["sglang"])
    for name, (a, b) in sglang.items():  # zero padding: the same B @ A
        pa, pb = peft[name]
        torch.testing.assert_close(b @ a, pb @ pa, atol=1e-6, rtol=1e-5)
    # the default adapter's mixed ranks are what SGLang (one lora_alpha / r) gets wrong
    peft_manifest = json.loads((out["peft"] / "rvhub.json").read_text())
    problems = peft_manifest["compression"]["engines"]["sglang"]["problems"]
    assert any("scales" in p for p in problems)


def test_inspect_for_an_engine_and_for_old_adapters(tmp_path: Path) -> None:
    fam = make_family(tmp_path, "qwen2")
    vec = tmp_path / "vec"
    assert run("extract", fam["a"], fam["b"], "-o", vec, "--encoding", "lora",
               "--energy", "0.9").exit_code == 0  # fmt: skip
    r = run("inspect", vec, "--for", "vllm")
    assert r.exit_code == 0 and "refuses this adapter" in r.output and "embed_tokens" in r.output
    # an adapter written before rvhub recorded the engines (alpha_pattern, no report)
    manifest = json.loads((vec / "rvhub.json").read_text())
    del manifest["compression"]["engines"]
    config = json.loads((vec / "adapter_config.json").read_text())
    config["alpha_pattern"] = dict(config["rank_pattern"])
    from rvhub.ops.summary import engine_report

    old = tmp_path / "old"
    shutil.copytree(vec, old)
    (old / "adapter_config.json").write_text(json.dumps(config))
    report = engine_report(manifest, old, "llama.cpp")
    assert report["loads"] and any("scales" in p for p in report["problems"])
    assert engine_report(manifest, old, "peft")["problems"] == []


def test_card_lists_what_each_engine_applies(tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    fam = make_family(tmp_path, "qwen2")
    vec = tmp_path / "vec"
    assert run("extract", fam["a"], fam["b"], "-o", vec, "--encoding", "lora",
               "--rank", "4", "--for", "vllm").exit_code == 0  # fmt: skip
    assert run("card", vec, "-o", tmp_path / "README.md").exit_code == 0
    card = ModelCard.load(tmp_path / "README.md")
    assert "## Serving engines" in card.text
    engines = json.loads((vec / "rvhub.json").read_text())["compression"]["engines"]
    for report in engines.values():
        row = next(
            line for line in card.text.splitlines() if line.startswith(f"| {report['version']} |")
        )
        assert f"{100 * report['share']:.3g}%" in row or f"{100 * report['share']:.2f}" in row
    assert "`--max-lora-rank 8`" in card.text
