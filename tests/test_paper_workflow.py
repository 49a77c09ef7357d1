"""Every rvhub command in examples/paper_qwen2.5.md, run on tiny models and a local Hub.

The page's placeholders point at Hub repos seeded with tiny Qwen2 (tied embeddings, like
Qwen2.5) checkpoints; lm-eval's results files are written by hand in lm-eval's format.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import torch
from huggingface_hub import HfApi
from transformers import AutoModelForCausalLM

from tests.cli_helpers import run
from tests.models import make_family

DOC = Path(__file__).resolve().parent.parent / "examples" / "paper_qwen2.5.md"


def rvhub_commands(text: str) -> list[str]:
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("rvhub "):
                commands.append(line)
    return commands


def lm_eval_results(model_name: str, shift: float) -> dict:
    tasks = {"gsm8k": 0.62, "sciq": 0.93}
    return {
        "results": {
            t: {
                "alias": t,
                "exact_match,strict-match": v + shift,
                "exact_match_stderr,strict-match": 0.01,
            }
            for t, v in tasks.items()
        },
        "configs": {t: {"dataset_path": f"example/{t}", "test_split": "test"} for t in tasks},
        "n-shot": {t: 5 for t in tasks},
        "model_name": model_name,
    }


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_every_rvhub_command_of_the_paper_workflow_runs(hub, tmp_path, monkeypatch):
    commands = rvhub_commands(DOC.read_text())
    assert len(commands) >= 10, commands
    fam = make_family(tmp_path / "models", "qwen2-tied", torch.bfloat16)
    env = {
        "GRPO": hub.new_repo_id("Qwen2.5-1.5B-GRPO", namespace=hub.org),
        "SFT": hub.new_repo_id("Qwen2.5-1.5B-SFT", namespace=hub.org),
        "INSTRUCT": hub.new_repo_id("Qwen2.5-1.5B-Instruct", namespace=hub.org),
        "VEC_REPO": hub.new_repo_id("qwen2.5-1.5b-reasoning-vector"),
    }
    for key, role in (("GRPO", "a"), ("SFT", "b"), ("INSTRUCT", "target")):
        hub.seed_repo(env[key], _files(fam[role]))
    work = tmp_path / "work"
    (work / "results").mkdir(parents=True)
    for cond, shift in (("baseline", 0.0), ("plus", 0.05), ("minus", -0.1)):
        (work / "results" / f"{cond}.json").write_text(
            json.dumps(lm_eval_results(env["INSTRUCT"], shift))
        )
    monkeypatch.chdir(work)
    monkeypatch.setenv("HF_TOKEN", hub.token)

    for command in commands:
        expanded = re.sub(r"\$(\w+)", lambda m: env[m.group(1)], command)
        r = run(*shlex.split(expanded)[1:])
        assert r.exit_code == 0, f"{command}\n{r.output}"

    # what the page promises came true
    model = AutoModelForCausalLM.from_pretrained(work / "instruct-plus-reasoning")
    assert model.config.model_type == "qwen2"
    files = HfApi(endpoint=hub.endpoint).list_repo_files(env["VEC_REPO"])
    assert {"rvhub.json", "vector.safetensors", "README.md"} <= set(files)
    card = (work / "card-preview" / "README.md").read_text()
    assert "library_name: rvhub" in card and "gsm8k" in card.lower()
    assert (work / "rv-lora" / "adapter_config.json").exists()
    assert os.path.isdir(work / "instruct-minus-v")
