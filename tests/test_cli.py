"""The CLI end to end, through click's runner and once through the installed script."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM

from tests.cli_helpers import run
from tests.models import state_dict_of


def test_extract_inspect_apply_verify(family, tmp_path):
    fam = family("qwen2")
    vec, out = tmp_path / "vec", tmp_path / "out"
    r = run("extract", fam["a"], fam["b"], "-o", vec)
    assert r.exit_code == 0, r.output
    assert "wrote" in r.output and "round-trip error" in r.output

    r = run("inspect", vec)
    assert r.exit_code == 0, r.output
    for expected in (
        "encoding   dense (bfloat16)",
        "qwen2 Qwen2ForCausalLM",
        str(fam["a"].resolve()),
        "layer norms",
        "round trip",
    ):
        assert expected in r.output

    r = run("inspect", vec, "--json")
    summary = json.loads(r.output)
    assert summary["tensors"] == 27 and summary["encoding"] == "dense"

    r = run("apply", vec, fam["target"], "-o", out, "--scale", "-0.5", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "applied 27 tensors at scale -0.5" in r.output
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == "qwen2"

    r = run("verify", vec, "--against", fam["a"], fam["b"])
    assert r.exit_code == 0, r.output
    assert "2 files match" in r.output and "B + v reproduces A" in r.output


def test_apply_with_exclude_and_overwrite(family, tmp_path):
    fam = family("llama")
    vec, out = tmp_path / "vec", tmp_path / "out"
    assert run("extract", fam["a"], fam["b"], "-o", vec, "--dtype", "float32").exit_code == 0
    assert run("apply", vec, fam["target"], "-o", out).exit_code == 0
    r = run("apply", vec, fam["target"], "-o", out, "--overwrite", "--exclude", "embed|lm_head")
    assert r.exit_code == 0, r.output
    before, after = state_dict_of(fam["target"]), state_dict_of(out)
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    assert not torch.equal(after["model.norm.weight"], before["model.norm.weight"])


def test_help_lists_every_command():
    r = run("--help")
    assert r.exit_code == 0
    for command in ("extract", "inspect", "apply", "verify"):
        assert command in r.output
    r = run("apply", "--help")
    assert "--scale" in r.output and "--vocab" in r.output and "--exclude" in r.output


def test_installed_console_script_runs_end_to_end(family, tmp_path):
    exe = shutil.which("rvhub") or str(__import__("pathlib").Path(sys.executable).parent / "rvhub")
    fam = family("gemma2")
    vec = tmp_path / "vec"
    done = subprocess.run(
        [exe, "extract", str(fam["a"]), str(fam["b"]), "-o", str(vec)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    # the script leaves through os._exit: everything printed must still arrive, in full
    shown = subprocess.run([exe, "inspect", str(vec)], capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    in_process = run("inspect", vec)
    assert shown.stdout == in_process.output and shown.stdout.count("\n") > 10
    done = subprocess.run(
        [exe, "apply", str(vec), str(tmp_path / "nope"), "-o", str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "no such file or folder" in done.stderr
    assert "Traceback" not in done.stderr
