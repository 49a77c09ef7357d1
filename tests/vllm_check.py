"""One vLLM engine, run inside the vLLM environment by tests/test_vllm.py (vLLM pins a
transformers the project's venv does not have): its parameters, greedy generations with
logprobs and lm-eval results, written to ``--out`` for the test to compare.

    switched: one engine on TARGET; for each α, rvhub's VllmSwitch sets θ + α·v inside it and
              run_sweep evaluates (the code `rvhub eval --engine vllm` runs); --switch picks
              how (VllmOptions.switch);
    fresh:    one engine on an `rvhub apply` output folder (the reference), evaluated by the
              same run_sweep with nothing switched (--live: its packed CPU layers made plain
              first, as an in-place switch makes them);
    tampered: one engine on TARGET, made plain, one weight then changed inside it (what no
              file holds); VllmSwitch(--switch) is opened on it and, unless refused, sets
              α = 0.5: its refusal or the mode it chose and the parameters after;
    lora:     one engine on TARGET with LoRA enabled; each of --adapters through a LoRARequest
              (its generations, or the error vLLM raised), and TARGET itself;
    plain:    one engine on TARGET, its generations.
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


# Fixed sequences, scored token by token (teacher-forced): a greedy continuation of a tiny
# random model can flip at a near-tie and then compares different sequences.
SEQUENCES = [[*p, 3, 4, 5, 6, 7, 8, 2] for p in PROMPTS]


def scored(llm, lora_request=None) -> list[list[dict]]:
    """Per sequence, per prefix of it (from the prompt on): the top 5 next-token logprobs,
    each prefix a one-token greedy request (vLLM 0.32's CPU LoRA path fails on
    ``prompt_logprobs``: an einsum shape error)."""
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=5)
    cut = len(PROMPTS[0])
    prefixes = [s[:n] for s in SEQUENCES for n in range(cut, len(s) + 1)]
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prefixes], params,
                        lora_request=lora_request, use_tqdm=False)  # fmt: skip
    rows = [{str(k): v.logprob for k, v in o.outputs[0].logprobs[0].items()} for o in outs]
    per = len(SEQUENCES[0]) - cut + 1
    return [rows[k : k + per] for k in range(0, len(rows), per)]


def lora(args) -> None:
    from vllm import LLM
    from vllm.lora.request import LoRARequest

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    llm = LLM(model=args.target, enable_lora=True, max_lora_rank=args.max_lora_rank, max_loras=1,
              enforce_eager=True, max_model_len=64, seed=0)  # fmt: skip
    (out / "gen-base.json").write_text(json.dumps(scored(llm)))
    for i, adapter in enumerate(args.adapters.split(",")):
        request = LoRARequest(f"adapter{i}", i + 1, adapter)
        try:
            rows = scored(llm, request)
        except Exception as e:  # vLLM's refusal, recorded for the test
            (out / f"error{i}.txt").write_text(f"{type(e).__name__}: {e}")
            continue
        (out / f"gen{i}.json").write_text(json.dumps(rows))


def plain(args) -> None:
    from vllm import LLM

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    llm = LLM(model=args.target, enforce_eager=True, max_model_len=64, seed=0)
    (out / "gen.json").write_text(json.dumps(scored(llm)))


def _bump(self) -> None:
    """Runs in the worker: one weight no longer what the target's file holds."""
    import torch

    model = self.model_runner.get_model()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] += 1.0


def tampered(args) -> None:
    from safetensors.torch import save_file

    from rvhub.errors import CompatibilityError
    from rvhub.evaluation.vllm_engine import VllmOptions, VllmSwitch, start_engine
    from rvhub.evaluation.vllm_worker import as_tensors
    from rvhub.options import ApplyOptions

    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # the test's own callable
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    options = VllmOptions(model_args={"enforce_eager": True, "max_model_len": 64})
    llm = start_engine(Path(args.target), options, batch_size=8, seed=0).model
    llm.collective_rpc("rvhub_make_live", args=(args.target,))
    llm.collective_rpc(_bump)
    try:
        switch = VllmSwitch(llm, Path(args.vector), Path(args.target), ApplyOptions(),
                            switch=args.switch)  # fmt: skip
    except CompatibilityError as e:
        (out / "error.txt").write_text(str(e))
        return
    (out / "mode.json").write_text(json.dumps(switch.mode))
    switch.set_scale(0.5)
    params = as_tensors(llm.collective_rpc("rvhub_parameters")[0])
    save_file({k: v.contiguous() for k, v in params.items()}, out / "params+0.5.safetensors")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["switched", "fresh", "lora", "plain", "tampered"])
    ap.add_argument("--target", required=True)
    ap.add_argument("--vector")
    ap.add_argument("--scales", default="0")
    ap.add_argument("--tasks")
    ap.add_argument("--include-path")
    ap.add_argument("--out", required=True)
    ap.add_argument("--adapters", default="")
    ap.add_argument("--max-lora-rank", type=int, default=8)
    ap.add_argument("--switch", default="auto")
    ap.add_argument("--live", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if args.mode in ("lora", "plain", "tampered"):
        {"lora": lora, "plain": plain, "tampered": tampered}[args.mode](args)
        return

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
        switch = VllmSwitch(lm.model, Path(args.vector), Path(args.target), ApplyOptions(),
                            switch=args.switch)  # fmt: skip
        (out / "mode.json").write_text(json.dumps(switch.mode))
    else:
        switch = Fixed()
        if args.live:
            lm.model.collective_rpc("rvhub_make_live", args=(args.target,))
    (out / "processed.json").write_text(json.dumps(lm.model.collective_rpc("rvhub_processed")))

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
