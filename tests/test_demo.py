"""The README's first command: examples/demo.py end to end, at its real size (the mechanics,
then the toy transfer's `rvhub eval` sweep and card), and the effect it must show: +v helps
and −v hurts, each by at least three standard errors of the baseline (issue 27)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo.py"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    work = tmp_path_factory.mktemp("demo")
    proc = subprocess.run(
        [sys.executable, str(DEMO), "--workdir", str(work)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work, proc


def test_demo_prints_accuracy_at_three_alphas_and_renders_the_card(demo) -> None:
    work, proc = demo
    printed = dict(re.findall(r"α = ([+-]\d+): (\d\.\d{3}) ±", proc.stdout))
    assert sorted(printed) == ["+0", "+1", "-1"], proc.stdout[-2000:]
    sweep = json.loads((work / "toy" / "eval" / "sweep.json").read_text())
    (metric,) = sweep["metrics"]
    assert {f"{p['scale']:+g}": f"{p['value']:.3f}" for p in metric["points"]} == printed
    card = (work / "toy" / "card" / "README.md").read_text()
    assert card.startswith("---") and "## Score against α" in card
    assert (work / "toy" / "card" / "eval_sweep.png").is_file()
    assert (work / "instruct-plus-reasoning" / "config.json").is_file()


def test_the_effect_stands_three_standard_errors_clear_each_way(demo) -> None:
    """A change that weakens the toy (or the evaluation) below this fails here, in CI."""
    work, proc = demo
    (metric,) = json.loads((work / "toy" / "eval" / "sweep.json").read_text())["metrics"]
    points = {p["scale"]: p for p in metric["points"]}
    base = points[0.0]
    assert base["n"] == 1000  # every held-out problem, none seen in training
    assert points[1.0]["value"] - base["value"] >= 3 * base["stderr"], points
    assert base["value"] - points[-1.0]["value"] >= 3 * base["stderr"], points
    line = next(line for line in proc.stdout.splitlines() if line.startswith("reading: "))
    plus, minus = (float(x) for x in re.findall(r"([+-]\d+\.\d) points", line))
    assert plus == pytest.approx(100 * (points[1.0]["value"] - base["value"]), abs=0.06)
    assert minus == pytest.approx(100 * (points[-1.0]["value"] - base["value"]), abs=0.06)
    assert "n = 1000" in line


def test_the_demo_reads_cleanly_and_names_the_next_command(demo) -> None:
    work, proc = demo
    out = proc.stdout + proc.stderr
    for noise in ("fatal: not a git repository", "WARNING", "Warning", "it/s]", "Traceback"):
        assert noise not in out, noise
    assert (work / "demo.log").is_file() and (work / "toy" / "eval" / "lm-eval.log").is_file()
    last = proc.stdout.strip().splitlines()
    assert last[-1].strip().startswith(f"rvhub push {work / 'toy' / 'vector'} YOUR-USER/")
    assert f"everything is in {work}" in proc.stdout
