"""Checkpoints as users publish them: the weights transformers loads, and live = disk."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from rvhub import extract_vector, load_vector
from tests.cli_helpers import run
from tests.models import make_family, state_dict_of


def _stale_folder(fam: dict[str, Path], tmp_path: Path) -> Path:
    """A's folder with model.safetensors plus a stale index and shard holding B's weights."""
    folder = tmp_path / "stale"
    shutil.copytree(fam["a"], folder)
    shard = "model-00001-of-00001.safetensors"
    shutil.copy(fam["b"] / "model.safetensors", folder / shard)
    weights = load_file(fam["b"] / "model.safetensors")
    index = {"metadata": {}, "weight_map": dict.fromkeys(weights, shard)}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def test_a_folder_with_both_layouts_reads_what_transformers_loads(family, tmp_path, caplog):
    fam = family("qwen2")
    stale = _stale_folder(fam, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(stale, dtype=torch.float32).state_dict()
    single = load_file(stale / "model.safetensors")
    assert all(torch.equal(loaded[n].to(single[n].dtype), single[n]) for n in single)

    with caplog.at_level(logging.WARNING, logger="rvhub"):
        vec = extract_vector(stale, fam["b"])
    assert "holds both model.safetensors and model.safetensors.index.json" in caplog.text
    # v = A − B, as transformers sees the folder (the index would give A's folder ‖v‖ = 0)
    expected = extract_vector(fam["a"], fam["b"])
    names = vec.keys()
    for name in names:
        assert torch.equal(vec.delta(name), expected.delta(name)), name
    assert any(float(vec.delta(n).abs().max()) > 0 for n in names)


def test_a_hub_checkpoint_downloads_only_the_weights_it_resolves_to(hub, family, tmp_path):
    fam = family("qwen2")
    stale = _stale_folder(fam, tmp_path)
    repo_id = hub.new_repo_id("stale")
    hub.seed_repo(repo_id, {p.name: p for p in stale.iterdir() if p.is_file()})
    vec = extract_vector(repo_id, fam["b"])
    from huggingface_hub import snapshot_download

    snapshot = Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=["*.json"]))
    files = sorted(p.name for p in snapshot.iterdir())
    assert "model.safetensors" in files and "model-00001-of-00001.safetensors" not in files
    expected = extract_vector(fam["a"], fam["b"])
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(vec.delta(name), expected.delta(name))


def test_live_apply_equals_disk_apply_on_deepseek_v3_buffers(tmp_path):
    """e_score_correction_bias is a persistent buffer MoE training updates: both applies add it."""
    fam = make_family(tmp_path, "deepseek_v3")
    weights = load_file(fam["a"] / "model.safetensors")
    buffers = [n for n in weights if n.endswith("e_score_correction_bias")]
    assert buffers
    for n in buffers:
        weights[n] = weights[n] + torch.linspace(0.1, 0.4, weights[n].numel())
    save_file(weights, fam["a"] / "model.safetensors", metadata={"format": "pt"})
    vec = tmp_path / "vec"
    assert run("extract", fam["a"], fam["b"], "-o", vec).exit_code == 0
    on_disk = tmp_path / "applied"
    assert run("apply", vec, fam["target"], "-o", on_disk, "--scale", "0.5").exit_code == 0

    model = AutoModelForCausalLM.from_pretrained(fam["target"], dtype=torch.float32)
    report = load_vector(vec).apply_to(model, scale=0.5)
    assert not report.missing
    assert set(buffers) <= set(report.applied)
    live = model.state_dict()
    disk = state_dict_of(on_disk)
    reloaded = AutoModelForCausalLM.from_pretrained(on_disk, dtype=torch.float32).state_dict()
    for name, tensor in reloaded.items():  # live == disk, tensor by tensor, in the live layout
        assert torch.equal(live[name], tensor), name
    for n in buffers:
        assert not torch.equal(disk[n], state_dict_of(fam["target"])[n])
