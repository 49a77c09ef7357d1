"""TIES of three inputs on the Qwen2.5-1.5B shape: `rvhub merge` against `mergekit-yaml`.

    python benchmarks/merge.py [--layers 28] [--repeat 3] [--dir DIR]

Builds a base B and three fine-tunes A1..A3 (bf16, hidden 1536, intermediate 8960, vocab
151936; ``--layers`` of the 28), extracts ``vi = Ai − B`` with rvhub (not timed), then times in
one run, alternating:

* ``mergekit-yaml`` (TIES, density 0.5, weights 1/0.7/0.4, ``base_model: B``, float32 math,
  bf16 out; ``--lazy-unpickle``, ``--no-copy-tokenizer``), which writes the merged *model*;
* ``rvhub merge v1 v2 v3 --method ties`` (the same parameters), which writes the merged
  *vector*, plus ``rvhub apply`` of it onto B, so both sides end with the same model.

Prints medians, peak RSS and the ratios rvhub / mergekit. Needs mergekit
(``bash .ci/mergekit-setup.sh``) and about 9 × the model size of free disk.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))

from common import (
    Run,
    base_tensor,
    finetuned_tensor,
    qwen2_config,
    run_measured,
    rvhub_cmd,
    work_dir,
    write_checkpoint,
)

ROOT = Path(__file__).resolve().parents[1]
MERGEKIT = ROOT / ".cache" / "mergekit-venv" / "bin" / "mergekit-yaml"
WEIGHTS, DENSITY = (1.0, 0.7, 0.4), 0.5


def _finetune(k: int):
    def make(name: str, shape: tuple[int, ...], index: int):
        return finetuned_tensor(name, shape, index + 1000 * k)

    return make


def build(root: Path, layers: int) -> dict[str, Path]:
    cfg = qwen2_config(num_hidden_layers=layers)
    paths = {"b": write_checkpoint(root / "b", cfg, base_tensor)}
    for k in (1, 2, 3):
        paths[f"a{k}"] = write_checkpoint(root / f"a{k}", cfg, _finetune(k))
    for k in (1, 2, 3):
        out = root / f"v{k}"
        subprocess.run([*rvhub_cmd("extract", str(paths[f"a{k}"]), str(paths["b"]), "-o", str(out),
                        "--overwrite")], check=True, stdout=subprocess.DEVNULL)  # fmt: skip
        paths[f"v{k}"] = out
    return paths


def mergekit_cmd(paths: dict[str, Path], out: Path) -> list[str]:
    config = {
        "merge_method": "ties",
        "base_model": str(paths["b"]),
        "models": [
            {"model": str(paths[f"a{k}"]), "parameters": {"weight": w, "density": DENSITY}}
            for k, w in zip((1, 2, 3), WEIGHTS, strict=True)
        ],
        "dtype": "float32",
        "out_dtype": "bfloat16",
    }
    path = out.parent / "ties.yml"
    path.write_text(yaml.safe_dump(config))
    return [str(MERGEKIT), str(path), str(out), "--lazy-unpickle", "--no-copy-tokenizer"]


def rvhub_merge_apply(paths: dict[str, Path], root: Path) -> Run:
    vec, model = root / "rv-merged", root / "rv-model"
    weights = ",".join(f"{w:g}" for w in WEIGHTS)
    merge = run_measured(rvhub_cmd("merge", *(str(paths[f"v{k}"]) for k in (1, 2, 3)), "-o",
                                   str(vec), "--method", "ties", "--density", str(DENSITY),
                                   "--weights", weights, "--overwrite"))  # fmt: skip
    apply = run_measured(rvhub_cmd("apply", str(vec), str(paths["b"]), "-o", str(model),
                                   "--overwrite"))  # fmt: skip
    return Run(merge.seconds + apply.seconds, max(merge.peak_rss_mb, apply.peak_rss_mb))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()
    if not MERGEKIT.is_file():
        sys.exit(f"{MERGEKIT} missing: run bash .ci/mergekit-setup.sh")
    root = work_dir("rvhub-merge-bench-", args.dir)
    try:
        paths = build(root, args.layers)
        ours: list[Run] = []
        theirs: list[Run] = []
        for _ in range(args.repeat):
            out = root / "mk-model"
            shutil.rmtree(out, ignore_errors=True)
            theirs.append(run_measured(mergekit_cmd(paths, out)))
            ours.append(rvhub_merge_apply(paths, root))
        size = sum(f.stat().st_size for f in paths["b"].glob("*.safetensors")) / 1e9
        print(f"TIES of 3 inputs, Qwen2.5-1.5B shape with {args.layers} layers ({size:.2f} GB "
              f"each), median of {args.repeat}:")  # fmt: skip
        t_m = statistics.median(r.seconds for r in theirs)
        t_r = statistics.median(r.seconds for r in ours)
        m_m = statistics.median(r.peak_rss_mb for r in theirs)
        m_r = statistics.median(r.peak_rss_mb for r in ours)
        print(f"  mergekit-yaml               {t_m:8.1f} s  peak RSS {m_m:8.0f} MB")
        print(f"  rvhub merge + rvhub apply   {t_r:8.1f} s  peak RSS {m_r:8.0f} MB")
        print(f"  ratio rvhub / mergekit      {t_r / t_m:8.2f}×   RSS {m_r / m_m:8.2f}×")
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
