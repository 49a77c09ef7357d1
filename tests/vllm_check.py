"""One vLLM engine, run inside the vLLM environment by tests/test_vllm.py (vLLM pins a
transformers the project's venv does not have): its parameters, greedy generations with
logprobs and lm-eval results, written to ``--out`` for the test to compare.

    switched: one engine on TARGET; for each α, rvhub's VllmSwitch sets θ + α·v inside it and
              run_sweep evaluates (the code `rvhub eval --engine vllm` runs);
    fresh:    one engine on an `rvhub apply` output folder (the reference), evaluated by the
              same run_sweep with nothing switched.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

PROMPTS = [[1, 3, 4, 13, 5, 6, 14], [1, 9, 9, 13, 3, 3, 14], [1, 15, 4, 5, 6, 7, 16]]


class Fixed:
    """No switch: the engine evaluates the folder it was started on."""

    def set_scale(self, scale: float) -> None:
        pass

    def restore(self) -> None:
        pass


def generations(llm) -> list[dict]:
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=6, logprobs=3, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in PROMPTS], params, use_tqdm=False)
    rows = []
    for out in outs:
        c = out.outputs[0]
        rows.append(
            {
                "tokens": list(c.token_ids),
                "logprobs": [{str(k): v.logprob for k, v in step.items()} for step in c.logprobs],
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["switched", "fresh"])
    ap.add_argument("--target", required=True)
    ap.add_argument("--vector")
    ap.add_argument("--scales", default="0")
    ap.add_argument("--tasks", required=True)
    ap.add_argument("--include-path", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    from safetensors.torch import save_file

    from rvhub.evaluation.sweep import results_json, run_sweep
    from rvhub.evaluation.vllm_engine import VllmOptions, VllmSwitch, start_engine
    from rvhub.evaluation.vllm_worker import as_tensors
    from rvhub.options import ApplyOptions

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    options = VllmOptions(model_args={"enforce_eager": True, "max_model_len": 64})
    lm = start_engine(Path(args.target), options, batch_size=8, seed=0)
    if args.mode == "switched":
        switch = VllmSwitch(lm.model, Path(args.vector), Path(args.target), ApplyOptions())
    else:
        switch = Fixed()

    def keep(point) -> None:
        tag = f"{point.scale:+g}"
        params = as_tensors(lm.model.collective_rpc("rvhub_parameters")[0])
        save_file({k: v.contiguous() for k, v in params.items()}, out / f"params{tag}.safetensors")
        (out / f"results{tag}.json").write_text(results_json(point.results))
        (out / f"gen{tag}.json").write_text(json.dumps(generations(lm.model)))

    scales = [float(s) for s in args.scales.split(",")]
    run_sweep(
        switch, None, None,
        tasks=args.tasks.split(","), scales=scales, include_path=args.include_path,
        batch_size=8, lm_eval_options={"log_samples": True}, lm=lm, on_point=keep,
        engine=options.record("test"),
    )  # fmt: skip
    if args.mode == "switched":
        (out / "missed.json").write_text(json.dumps(switch.missed))


if __name__ == "__main__":  # vLLM's workers are spawned: the guard is required
    main()
