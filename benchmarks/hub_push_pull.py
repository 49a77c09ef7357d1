"""rvhub push / load_vector through a local Hub vs huggingface_hub's upload_folder / snapshot_download.

    python benchmarks/hub_push_pull.py [--repeat 3] [--layers 28] [--dir DIR]

Builds the Qwen2.5-1.5B-shaped bf16 pair of ``common.py`` (``--layers`` fewer for a quick run),
extracts the dense vector with ``rvhub extract`` (3.09 GB at 28 layers), renders its card,
starts the local Hub of the tests (olah serving git repos + the write stand-in, on 127.0.0.1)
and times, each in a fresh client process against a fresh repo and an empty cache:

* push: ``rvhub.push_vector(folder, repo)`` (hash check of every file, card + plot rendering,
  create_repo, one create_commit) vs ``HfApi.create_repo`` + ``HfApi.upload_folder`` of a
  folder holding the same files (vector, manifest, README.md, plot);
* pull: ``rvhub.load_vector(repo)`` (manifest first, then exactly the listed files, then the
  sha256 of every file against the manifest) vs ``snapshot_download(repo)``.

The wall and CPU time of the operation itself are measured inside each client (imports
excluded, reported apart; every client imports huggingface_hub up front). The local servers
set the pace of transfers (olah streams files in 4 KB chunks, ~30 MB/s here), so the client's
CPU time shows rvhub's own extra work (hashing, card, plot) with less noise than wall time.
Before each client, pending writes are flushed (``sync``: the previous contender's writeback
would slow the next one) and the files it reads are put in the page cache. Contenders alternate
within each repetition; medians of ``--repeat`` are printed with rvhub's overhead over the plain
calls. Needs ~4× the vector's size of free disk.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT))

from common import (  # noqa: E402
    base_tensor,
    drop_cache_hint,
    finetuned_tensor,
    qwen2_config,
    work_dir,
    write_checkpoint,
)

# Each client prints {"import": s, "op": s} as its last line.
CLIENT = {
    "rvhub push": r"""
import json, sys, time
t0 = time.perf_counter()
import huggingface_hub.hf_api
from rvhub.hub.push import push_vector
t1, c1 = time.perf_counter(), time.process_time()
push_vector(sys.argv[1], sys.argv[2])
t2, c2 = time.perf_counter(), time.process_time()
print(json.dumps({"import": t1 - t0, "op": t2 - t1, "cpu": c2 - c1}))
""",
    "upload_folder": r"""
import json, sys, time
t0 = time.perf_counter()
from huggingface_hub import HfApi
t1, c1 = time.perf_counter(), time.process_time()
api = HfApi()
api.create_repo(sys.argv[2], exist_ok=True)
api.upload_folder(repo_id=sys.argv[2], folder_path=sys.argv[1], commit_message="upload")
t2, c2 = time.perf_counter(), time.process_time()
print(json.dumps({"import": t1 - t0, "op": t2 - t1, "cpu": c2 - c1}))
""",
    "rvhub load_vector": r"""
import json, sys, time
t0 = time.perf_counter()
import huggingface_hub.hf_api
from rvhub import load_vector
t1, c1 = time.perf_counter(), time.process_time()
load_vector(sys.argv[2])
t2, c2 = time.perf_counter(), time.process_time()
print(json.dumps({"import": t1 - t0, "op": t2 - t1, "cpu": c2 - c1}))
""",
    "snapshot_download": r"""
import json, sys, time
t0 = time.perf_counter()
import huggingface_hub.hf_api
from huggingface_hub import snapshot_download
t1, c1 = time.perf_counter(), time.process_time()
snapshot_download(sys.argv[2])
t2, c2 = time.perf_counter(), time.process_time()
print(json.dumps({"import": t1 - t0, "op": t2 - t1, "cpu": c2 - c1}))
""",
}


def build_vector(work: Path, layers: int) -> Path:
    """The dense vector of a 1.5B-shaped pair (reused from an earlier run in the same --dir)."""
    vec = work / f"vector-{layers}"
    if (vec / "rvhub.json").is_file():
        return vec
    cfg = qwen2_config(num_hidden_layers=layers)
    a, b = work / "a", work / "b"
    print(f"writing the pair ({layers} layers) ...", flush=True)
    write_checkpoint(a, cfg, finetuned_tensor)
    write_checkpoint(b, cfg, base_tensor)
    print("rvhub extract ...", flush=True)
    subprocess.run(
        [sys.executable, "-m", "rvhub.cli", "extract", str(a), str(b), "-o", str(vec)], check=True
    )
    shutil.rmtree(a)
    shutil.rmtree(b)
    return vec


def plain_folder(vec: Path, work: Path) -> Path:
    """The files rvhub uploads (artifact + rendered card), as one folder for upload_folder."""
    from rvhub.card.build import build_card
    from rvhub.manifest import load_manifest

    folder = work / "plain-upload"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    for f in vec.iterdir():
        os.link(f, folder / f.name)
    manifest = load_manifest(vec)
    build_card(vec, manifest, repo_id="alice/benchmark").save(folder / "README.md")
    return folder


def settle(warm: list[Path]) -> None:
    """Same start for every contender: the previous writes flushed (their writeback would slow
    whoever runs next), and the files about to be read in the page cache."""
    os.sync()
    drop_cache_hint(warm)


def run_client(name: str, folder: Path, repo_id: str, env: dict[str, str]) -> dict[str, float]:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", CLIENT[name], str(folder), repo_id],
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed: {proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall"] = wall
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--layers", type=int, default=28, help="decoder layers (28 = Qwen2.5-1.5B)")
    ap.add_argument("--dir", type=Path, default=None, help="where the temp work folder goes")
    args = ap.parse_args()

    from huggingface_hub import HfApi

    from rvhub.manifest import load_manifest
    from tests.hub_server import start_hub_server

    # Like the other benchmarks, --dir is where the temp work folder goes (needs ~4× the vector).
    work = work_dir("rvhub-hub-bench-", args.dir)
    try:
        vec = build_vector(work, args.layers)
        size = sum(f["size"] for f in load_manifest(vec)["files"].values())
        plain = plain_folder(vec, work)
        print(f"vector: {vec} ({size / 1e9:.2f} GB in {len(load_manifest(vec)['files'])} file(s))")

        times: dict[str, list[dict[str, float]]] = {name: [] for name in CLIENT}
        with start_hub_server(work / "hub") as hub:
            api = HfApi(endpoint=hub.endpoint, token=hub.token)
            base_env = {
                **os.environ,
                "HF_ENDPOINT": hub.endpoint,
                "HF_TOKEN": hub.token,
                "HF_HUB_DISABLE_XET": "1",
                "HF_HUB_DISABLE_TELEMETRY": "1",
                "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                "RVHUB_DISABLE_PROGRESS_BARS": "1",
                "PYTHONWARNINGS": "ignore",
                # olah streams LFS files at a few tens of MB/s and the stand-in buffers them before
                # answering: the first byte of a GB-sized file comes after the client's 10 s default
                "HF_HUB_DOWNLOAD_TIMEOUT": "900",
                "HF_HUB_ETAG_TIMEOUT": "900",
            }
            base_env.pop("HF_HUB_OFFLINE", None)
            for i in range(args.repeat):
                order = [("rvhub push", vec), ("upload_folder", plain)]
                if i % 2:
                    order.reverse()
                pushed = []
                for name, folder in order:
                    repo_id = hub.new_repo_id("bench")
                    home = work / "client-home"
                    env = {**base_env, "HF_HOME": str(home), "RVHUB_CACHE": str(home / "rvhub")}
                    settle([folder])
                    times[name].append(run_client(name, folder, repo_id, env))
                    shutil.rmtree(home, ignore_errors=True)
                    pushed.append(repo_id)
                    print(f"  {name}: {times[name][-1]['op']:.2f} s", flush=True)
                source = pushed[0] if order[0][0] == "rvhub push" else pushed[1]
                pulls = ["rvhub load_vector", "snapshot_download"]
                for name in pulls if i % 2 == 0 else pulls[::-1]:
                    home = work / "client-home"
                    env = {**base_env, "HF_HOME": str(home), "RVHUB_CACHE": str(home / "rvhub")}
                    settle([hub.repo(source).path / ".git" / "lfs"])
                    times[name].append(run_client(name, plain, source, env))
                    shutil.rmtree(home, ignore_errors=True)
                    print(f"  {name}: {times[name][-1]['op']:.2f} s", flush=True)
                for repo_id in pushed:
                    api.delete_repo(repo_id)

        keys = ("op", "cpu", "import", "wall")
        med = {n: {k: statistics.median(r[k] for r in rs) for k in keys} for n, rs in times.items()}
        print(f"\nmedians of {args.repeat} (vector {size / 1e9:.2f} GB, {args.layers} layers):")
        print(
            f"  {'contender':<20}{'op s':>8}{'GB/s':>7}{'client CPU s':>14}{'import s':>10}{'process s':>11}"
        )
        for name, m in med.items():
            print(
                f"  {name:<20}{m['op']:>8.2f}{size / 1e9 / m['op']:>7.2f}{m['cpu']:>14.2f}"
                f"{m['import']:>10.2f}{m['wall']:>11.2f}"
            )
        for key, label in (("op", "wall time of the call"), ("cpu", "client CPU time")):
            push = med["rvhub push"][key] / med["upload_folder"][key] - 1
            pull = med["rvhub load_vector"][key] / med["snapshot_download"][key] - 1
            both = (med["rvhub push"][key] + med["rvhub load_vector"][key]) / (
                med["upload_folder"][key] + med["snapshot_download"][key]
            ) - 1
            print(
                f"  rvhub overhead, {label}: push {push:+.1%}, pull {pull:+.1%}, push + pull {both:+.1%}"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
