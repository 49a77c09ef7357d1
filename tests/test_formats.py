"""Checkpoints as users publish them: the weights transformers loads, and live = disk."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rvhub import extract_vector


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
