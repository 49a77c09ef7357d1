"""How long a command that does no work takes: ``rvhub --help`` and ``import rvhub``.

    python benchmarks/cli_startup.py [--repeat 7]

Baselines measured in the same run: a bare interpreter (``python -c pass``) and
``import torch`` (what ``rvhub --help`` cost while the package root imported everything).
Prints medians and ratios.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

CASES = {
    "python -c pass (floor)": [sys.executable, "-c", "pass"],
    "import torch (old --help's cost)": [sys.executable, "-c", "import torch"],
    "import rvhub": [sys.executable, "-c", "import rvhub"],
    "rvhub --help": [sys.executable, "-m", "rvhub.cli", "--help"],
}


def median_seconds(cmd: list[str], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    results = {name: median_seconds(cmd, args.repeat) for name, cmd in CASES.items()}
    floor, torch_import = (
        results["python -c pass (floor)"],
        results["import torch (old --help's cost)"],
    )
    for name, seconds in results.items():
        print(
            f"{name:34s} {seconds:6.3f} s  {seconds / floor:5.2f}x the floor  "
            f"{seconds / torch_import:5.2f}x import torch"
        )


if __name__ == "__main__":
    main()
