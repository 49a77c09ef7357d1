"""The rvhub side of a vLLM engine: a worker extension that sets the weights each worker holds
to exactly ``round(θ + α·v)``, in place, without a second copy of the model.

vLLM imports this module in every worker process (``LLM(worker_extension_cls=WORKER_CLS)``)
and the driver calls its methods through ``llm.collective_rpc`` (:mod:`.vllm_engine`). Each
switch streams the target's checkpoint tensors (θ re-read from its files, v from the vector's;
:func:`rvhub.ops.disk.stream_applied`, the code ``rvhub apply`` writes with) into vLLM's own
layerwise reload (``vllm.model_executor.model_loader.reload``, read from vLLM 0.32.0): each
layer is rebuilt in checkpoint format as its tensors arrive, then processed again by vLLM
(fused QKV and gate/up shards, CPU weight packing), so what vLLM computes with is what it would
have loaded from ``rvhub apply``'s output. Every tensor of the target is fed, touched or not:
vLLM processes a layer once all of its weights arrived, and a fused parameter needs all of its
shards.
"""

from __future__ import annotations

from typing import Any

WORKER_CLS = "rvhub.evaluation.vllm_worker.RvhubWorker"


class RvhubWorker:
    """Mixed into vLLM's worker class: ``self`` is the worker (``self.model_runner``)."""

    model_runner: Any

    def rvhub_open(self, vector: str, target: str, options: dict[str, Any]) -> int:
        """Open the vector folder and the target folder (local paths) and run the apply
        pre-flight; returns how many target tensors the vector touches."""
        from pathlib import Path

        from rvhub.checkpoint import open_local_checkpoint
        from rvhub.encodings import open_source
        from rvhub.manifest import Manifest, Provenance, check_files_present
        from rvhub.ops.disk import prepare_streamed
        from rvhub.ops.prepare import VectorFacts
        from rvhub.options import ApplyOptions

        folder = Path(vector)  # verified by the driver (load_vector) before the engine started
        manifest = Manifest.read(folder)
        check_files_present(folder, manifest)
        source = open_source(folder, manifest)
        facts = VectorFacts.of_source(source, Provenance.of_manifest(manifest).model, manifest)
        ckpt = open_local_checkpoint(Path(target))
        prepared = prepare_streamed(facts, ckpt, ApplyOptions(**options))
        self._rvhub = (source, ckpt, prepared.plan.targets)
        return len(prepared.plan.targets)

    def rvhub_set_scale(self, alpha: float) -> dict[str, Any]:
        """Set this worker's weights to ``round(θ + α·v)``; returns the checkpoint tensors
        vLLM's model did not place (``missed``: the vector's among them are refused by the
        driver), how many it placed, and the seconds spent making the tensors and in vLLM's
        loading."""
        import time

        import torch
        from vllm.model_executor.model_loader.reload import (
            finalize_layerwise_reload,
            initialize_layerwise_reload,
        )

        from rvhub.ops.disk import stream_applied

        source, ckpt, targets = self._rvhub
        tensors = stream_applied(source, ckpt, targets, alpha)
        touched = set(targets)
        runner = self.model_runner
        model = runner.get_model()
        missed: list[str] = []
        placed = 0
        clock = {"rvhub": 0.0, "vllm": 0.0}  # seconds making tensors / in vLLM's loading
        with torch.no_grad():
            start = time.perf_counter()
            initialize_layerwise_reload(model)
            try:
                while True:
                    mark = time.perf_counter()
                    clock["vllm"] += mark - start
                    item = next(tensors, None)
                    start = time.perf_counter()
                    clock["rvhub"] += start - mark
                    if item is None:
                        break
                    name, tensor = item
                    try:
                        loaded = model.load_weights([(name, tensor)])
                    except (KeyError, ValueError):  # AutoWeightsLoader: no such parameter
                        loaded = set()
                    if loaded is not None and not loaded:
                        missed.append(name)
                    else:
                        placed += 1
            finally:
                finalize_layerwise_reload(model, runner.model_config)
                clock["vllm"] += time.perf_counter() - start
        for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):
            if hasattr(runner, reset):
                getattr(runner, reset)()
        return {
            "missed": missed,
            "placed": placed,
            "missed_touched": sorted(touched & set(missed)),
            "seconds": clock,
        }

    def rvhub_parameters(self) -> dict[str, Any]:
        """Every parameter and buffer of this worker's model as ``(dtype, shape, bytes)``
        (what an RPC carries intact; :func:`as_tensors` rebuilds them), for tests: compared
        with a fresh engine on ``rvhub apply``'s output."""
        import torch

        model = self.model_runner.get_model()
        items = [(f"param:{n}", p) for n, p in model.named_parameters()]
        items += [(f"buffer:{n}", b) for n, b in model.named_buffers()]
        out = {}
        for name, t in items:
            t = t.detach().to("cpu").contiguous()
            raw = (
                t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
            )
            out[name] = (str(t.dtype).removeprefix("torch."), list(t.shape), raw.numpy().tobytes())
        return out


def as_tensors(parameters: dict[str, Any]) -> dict[str, Any]:
    """:meth:`RvhubWorker.rvhub_parameters`' answer as tensors."""
    import torch

    out = {}
    for name, (dtype, shape, data) in parameters.items():
        kind = getattr(torch, dtype)
        flat = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else None
        out[name] = (
            flat.view(kind).reshape(shape).clone()
            if flat is not None
            else torch.empty(shape, dtype=kind)
        )
    return out
