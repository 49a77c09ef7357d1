"""Calibrate the "already carries" guard: the share of v = A − B that a target holds, measured
at the lineage fingerprint's positions, for targets that hold none, part, all or several times
the vector, on the toy transfer's really trained models (base → sft → rl, base → instruct).

    python benchmarks/carried_calibration.py --seeds 0 1 2            # trains 3 toys (--quick)
    python benchmarks/carried_calibration.py --toy toy-transfer-out   # an existing toy folder

Prints one row per target: the measured share, its standard error and the share that was put
in (None where the target was trained, not built). docs/reliability.md quotes the output.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file, save_file

from rvhub import check_target, extract_vector


def _built(root: Path, name: str, start: Path, a: Path, b: Path, k: float) -> Path:
    """``start + k·(A − B)`` as a model folder (float32 arithmetic, the start's dtype)."""
    folder = root / name
    folder.mkdir(exist_ok=True)
    s, wa, wb = (load_file(p / "model.safetensors") for p in (start, a, b))
    out = {n: (t.float() + k * (wa[n].float() - wb[n].float())).to(t.dtype) for n, t in s.items()}
    save_file(out, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_bytes((start / "config.json").read_bytes())
    return folder


def measure(toy: Path, work: Path) -> list[tuple[str, float | None, float, float, float]]:
    """(target, share put in, share measured, its standard error, share of ‖T − B‖² along v)
    for one toy folder."""
    a, b = toy / "rl", toy / "sft"
    vector = extract_vector(a, b).save(work / "vector", overwrite=True)
    targets: list[tuple[str, Path, float | None]] = [
        ("instruct (other fine-tune of the base)", toy / "instruct", None),
        ("base (the common ancestor)", toy / "base", None),
        ("B = sft", b, 0.0),
        ("A = rl", a, 1.0),
    ]
    for k in (0.25, 0.5, 1.0, 2.0):
        targets.append((f"instruct + {k:g}·v", _built(work, f"i{k}", toy / "instruct", a, b, k), k))
    targets.append(("B + 3·v", _built(work, "b3", b, a, b, 3.0), 3.0))
    rows = []
    for name, folder, put in targets:
        lineage = check_target(vector, folder, config_check=False, allow_unrelated=True).lineage
        assert lineage.carried is not None and lineage.carried_se is not None
        rows.append((name, put, lineage.carried, lineage.carried_se, lineage.carried_fit or 0.0))
    return rows


def main() -> None:
    logging.getLogger("rvhub").setLevel(
        logging.ERROR
    )  # the guard's own warnings: the table says it
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--toy", type=Path, nargs="*", default=[], help="existing toy folders")
    parser.add_argument("--seeds", type=int, nargs="*", default=[], help="train --quick toys")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        toys = list(args.toy)
        for seed in args.seeds:
            out = Path(tmp) / f"toy-{seed}"
            script = Path(__file__).parents[1] / "examples" / "toy_transfer" / "toy_transfer.py"
            subprocess.run(
                [sys.executable, str(script), "--out", str(out), "--quick", "--seed", str(seed)],
                check=True,
                capture_output=True,
            )
            toys.append(out)
        print(f"{'toy':<10} {'target':<42} {'put in':>7} {'carried':>8} {'± se':>7} {'fit':>6}")
        for i, toy in enumerate(toys):
            work = Path(tmp) / f"work-{i}"
            work.mkdir()
            for name, put, share, se, fit in measure(toy, work):
                shown = "-" if put is None else f"{put:g}"
                print(f"{toy.name:<10} {name:<42} {shown:>7} {share:>8.3f} {se:>7.3f} {fit:>6.3f}")


if __name__ == "__main__":
    main()
