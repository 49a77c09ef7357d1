"""Long work is not thrown away (issue 26, item 7), and lm-eval's noise stays out of the
terminal (item 11): real sweeps through lm-evaluation-harness on the toy task."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rvhub import extract_vector, load_vector
from rvhub.errors import InputError
from rvhub.io.atomic import partial_dir
from rvhub.ops.live import FileScaleSwitch
from tests.cli_helpers import assert_clean_failure, run, tree_snapshot
from tests.models import finetune_like

pytest.importorskip("lm_eval")
ROOT = Path(__file__).resolve().parents[1]
TASK_DIR = ROOT / "examples" / "toy_transfer" / "task"
sys.path.insert(0, str(TASK_DIR.parent))
import toy_transfer  # noqa: E402  (the example's tokenizer and model)

SCALES = [-1.0, 0.0, 1.0, 0.5]


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("resume-toy")
    paths = {}
    for role, seed in (("a", 1), ("b", 2), ("target", 3)):
        torch.manual_seed(0)
        model = toy_transfer.new_model(toy_transfer.QUICK)
        finetune_like(model, seed, scale=0.2)
        model.save_pretrained(root / role)
        toy_transfer.toy_tokenizer().save_pretrained(root / role)
        paths[role] = root / role
    paths["vec"] = extract_vector(paths["a"], paths["b"]).save(root / "vec")
    return paths


def _model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


def _sweep(toy, out, **kw):
    return load_vector(toy["vec"]).evaluate(
        _model(toy["target"]),
        toy_transfer.toy_tokenizer(),
        tasks=["toy_addition"],
        include_path=TASK_DIR,
        scales=kw.pop("scales", SCALES),
        limit=kw.pop("limit", 16),
        batch_size=8,
        output_dir=out,
        **kw,
    )


class Stop(KeyboardInterrupt):
    """Ctrl-C after a given number of finished points."""


def _values(folder: Path) -> dict[float, float]:
    summary = json.loads((folder / "sweep.json").read_text())
    (metric,) = summary["metrics"]
    return {p["scale"]: p["value"] for p in metric["points"]}


def test_an_interrupted_sweep_keeps_its_points_and_resume_runs_only_the_rest(
    toy, tmp_path, monkeypatch
):
    full = tmp_path / "full"
    _sweep(toy, full)
    out = tmp_path / "out"
    seen: list[float] = []

    def stop_at_fourth(point):
        seen.append(point.scale)
        if len(seen) == 3:
            raise Stop

    with pytest.raises(Stop):
        _sweep(toy, out, on_point=stop_at_fourth)
    assert not out.exists()  # the output path is untouched ...
    work = partial_dir(out)
    kept = json.loads((work / "partial.json").read_text())  # ... the finished points are kept
    assert [p["scale"] for p in kept["points"]] == SCALES[:3]
    for scale in SCALES[:3]:
        assert (work / f"alpha_{scale:+g}" / "results.json").is_file()

    before = tree_snapshot(work)
    with pytest.raises(InputError, match="left 3 finished α point"):
        _sweep(toy, out)  # without resume: refused, nothing lost
    with pytest.raises(InputError, match="another settings|another "):
        _sweep(toy, out, resume=True, limit=8)  # other settings: refused, nothing lost
    assert tree_snapshot(work) == before

    switched: list[float] = []
    real = FileScaleSwitch.set_scale  # the target was loaded from its folder: θ re-read
    monkeypatch.setattr(
        FileScaleSwitch, "set_scale", lambda self, s: (switched.append(s), real(self, s))[1]
    )
    sweep = _sweep(toy, out, resume=True)

    assert switched == [0.5]  # only the missing α was evaluated
    assert [p.scale for p in sweep.points] == SCALES
    assert not work.exists() and sorted(p.name for p in out.iterdir()) == sorted(
        p.name for p in full.iterdir()
    )  # the folder a full run writes (no partial.json left in it)
    assert _values(out) == _values(full)
    for scale in SCALES:
        name = f"alpha_{scale:+g}/results.json"
        got, want = (json.loads((d / name).read_text())["results"] for d in (out, full))
        assert got == want, scale


def test_sigterm_keeps_the_finished_points_and_the_cli_resumes(toy, tmp_path):
    out = tmp_path / "cli-out"
    args = [
        sys.executable, "-m", "rvhub.cli", "eval", str(toy["vec"]), str(toy["target"]),
        "--tasks", "toy_addition", "--include-path", str(TASK_DIR), "--scales",
        "-1,0,1,0.5", "--limit", "64", "--batch-size", "4", "--device", "cpu", "-o", str(out),
    ]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    record = partial_dir(out) / "partial.json"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if record.is_file() and len(json.loads(record.read_text())["points"]) == 3:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "3 finished α point(s) are kept" in err and "--resume" in err, err
    assert not out.exists()

    again = run(*args[3:], "--resume")
    assert again.exit_code == 0, again.output + again.stderr
    assert again.output.count("α = ") == 4  # the kept points are shown too
    assert sorted(_values(out)) == sorted(SCALES)


def test_cli_refuses_to_discard_an_interrupted_sweep(toy, tmp_path):
    out = tmp_path / "out"

    def stop(point):
        raise Stop

    with pytest.raises(Stop):
        _sweep(toy, out, on_point=stop)
    before = tree_snapshot(partial_dir(out))
    r = run(
        "eval", toy["vec"], toy["target"], "--tasks", "toy_addition", "--include-path",
        TASK_DIR, "-o", out, "--overwrite",
    )  # fmt: skip
    assert_clean_failure(
        r, match="pass --resume to keep them", output=partial_dir(out), before=before
    )


def test_lm_eval_noise_goes_to_a_log_file(toy, tmp_path):
    """lm-eval printed `fatal: not a git repository` three times per sweep, plus warnings meant
    for its own CLI users, between rvhub's lines."""
    out = tmp_path / "out"
    cwd = tmp_path / "not-a-repo"
    cwd.mkdir()
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(tmp_path)}
    args = [
        sys.executable, "-m", "rvhub.cli", "eval", str(toy["vec"]), str(toy["target"]),
        "--tasks", "toy_addition", "--include-path", str(TASK_DIR), "--limit", "8",
        "--device", "cpu", "-o", str(out),
    ]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, cwd=cwd, env=env)
    assert done.returncode == 0, done.stderr
    assert "fatal" not in done.stderr, done.stderr
    assert "WARNING" not in done.stderr and "lm_eval" not in done.stderr, done.stderr
    log = out / "lm-eval.log"
    assert log.is_file() and "lm_eval" in log.read_text()
    assert f"lm-eval's log: {log}" in done.stdout
