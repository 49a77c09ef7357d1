"""The README's first command: examples/demo.py end to end (the mechanics, then the toy
transfer's `rvhub eval` sweep and card)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo.py"


def test_demo_prints_accuracy_at_three_alphas_and_renders_the_card(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(DEMO), "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    printed = dict(re.findall(r"α = ([+-]\d+): (\d\.\d{3}) ±", proc.stdout))
    assert sorted(printed) == ["+0", "+1", "-1"], proc.stdout[-2000:]
    sweep = json.loads((tmp_path / "toy" / "eval" / "sweep.json").read_text())
    (metric,) = sweep["metrics"]
    assert {f"{p['scale']:+g}": f"{p['value']:.3f}" for p in metric["points"]} == printed
    card = (tmp_path / "toy" / "card" / "README.md").read_text()
    assert card.startswith("---") and "## Score against α" in card
    assert (tmp_path / "instruct-plus-reasoning" / "config.json").is_file()
