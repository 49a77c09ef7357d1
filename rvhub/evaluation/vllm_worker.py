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

Where vLLM computes with the very tensors it loaded (unquantized layers on a GPU: vLLM 0.32.0's
``UnquantizedLinearMethod`` and ``UnquantizedEmbeddingMethod`` process nothing there, as read
from ``layers/linear.py`` and ``layers/vocab_parallel_embedding.py``), a switch can skip the
rebuild: only the tensors the vector touches are streamed, each written by vLLM's own weight
loader into the parameter it already holds (the shard of a fused QKV or gate/up parameter,
this worker's slice under tensor parallelism). :meth:`RvhubWorker.rvhub_processed` names the layers where that would be
wrong (packed or quantized weights); on a CPU :meth:`RvhubWorker.rvhub_make_live` first turns
vLLM's packed linear layers into plain ones that compute with their parameters.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

WORKER_CLS = "rvhub.evaluation.vllm_worker.RvhubWorker"


class RvhubWorker:
    """Mixed into vLLM's worker class: ``self`` is the worker (``self.model_runner``)."""

    model_runner: Any

    def rvhub_open(self, vector: str, target: str, options: dict[str, Any]) -> list[list[str]]:
        """Open the vector folder and the target folder (local paths) and run the apply
        pre-flight; returns the groups of the target's tensors vLLM holds in one parameter
        where the vector touches one of them (vLLM re-ties an ``lm_head`` identical to the
        embedding: no switch can give them different values; the driver refuses)."""
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
        held: dict[int, list[str]] = {}
        named = self.model_runner.get_model().named_parameters(remove_duplicate=False)
        for name, param in named:
            if name in ckpt.entries and param.numel():
                held.setdefault(param.untyped_storage().data_ptr(), []).append(name)
        touched = set(prepared.plan.targets)
        return [sorted(n) for n in held.values() if len(n) > 1 and touched & set(n)]

    def rvhub_set_scale(self, alpha: float, in_place: bool = False) -> dict[str, Any]:
        """Set this worker's weights to ``round(θ + α·v)``: every target tensor through vLLM's
        layerwise reload, or (``in_place``, refused where :meth:`rvhub_processed` names a
        layer) only the touched ones, each into the parameter vLLM already holds. Returns the
        tensors vLLM's model did not place (``missed``: the vector's among them are refused
        by the driver), how many it placed, and the seconds spent making the tensors and in
        vLLM's loading."""
        import torch
        from vllm.model_executor.model_loader.reload import (
            finalize_layerwise_reload,
            initialize_layerwise_reload,
        )

        from rvhub.ops.disk import stream_applied

        source, ckpt, targets = self._rvhub
        runner = self.model_runner
        model = runner.get_model()
        if in_place:
            processed = self.rvhub_processed()
            if processed:  # the driver checked; never write where vLLM computes from a copy
                raise RuntimeError(f"in-place switch refused: {', '.join(processed[:3])}")
            # each tensor is copied into its parameter before the next is made (vLLM's loaders
            # copy at once; from host memory to a GPU too), so one buffer serves them all
            tensors = stream_applied(source, ckpt, targets, alpha, only=targets, reuse=True)
            result = _load_in_place(model, tensors)
        else:
            tensors = stream_applied(source, ckpt, targets, alpha)
            with torch.no_grad():
                initialize_layerwise_reload(model)
                try:
                    result = _load_each(model, tensors)
                finally:
                    start = time.perf_counter()
                    finalize_layerwise_reload(model, runner.model_config)
                    end = time.perf_counter()
            result.pop("storage")
            result["seconds"]["vllm"] += end - start
        for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):
            if hasattr(runner, reset):
                getattr(runner, reset)()
        result["missed_touched"] = sorted(set(targets) & set(result["missed"]))
        return result

    def rvhub_check_in_place(self) -> list[str]:
        """Write θ, read from the target's files, in place for every tensor the vector
        touches, and return the parameters that changed: none where the engine holds the
        files' values in the form vLLM's loaders write them, so an in-place switch is exact.
        Catches what :meth:`rvhub_processed` cannot know (a kernel that keeps its weights in
        another layout, weights changed since loading) before any α is set; afterwards the
        driver falls back to the layerwise switch, which rewrites every tensor, or refuses.
        Parameters are compared by :func:`_checksum` (no copy of the model)."""
        from rvhub.ops.disk import stream_applied

        source, ckpt, targets = self._rvhub
        model = self.model_runner.get_model()
        params = dict(model.named_parameters())
        before = {n: _checksum(p) for n, p in params.items()}
        _load_in_place(model, stream_applied(source, ckpt, {}, 0.0, only=targets, reuse=True))
        return [n for n, p in params.items() if _checksum(p) != before[n]]

    def rvhub_processed(self) -> list[str]:
        """What makes an in-place write wrong in this worker's model: layers whose weights
        vLLM computes from a processed copy (packed for a CPU kernel, quantized, repacked),
        attention layers that derive weights after loading (MLA's from ``kv_b_proj``), a
        model-level post-load hook. Empty where the in-place
        switch is exact. Only what is known to use its parameters as loaded passes (vLLM
        0.32.0's unquantized linear and embedding layers on a GPU or made live on a CPU, and
        its plain ``Attention`` with no parameters of its own), as read from vLLM 0.32.0's
        ``model_loader/utils.py: process_weights_after_loading``."""
        from vllm.model_executor.layers.attention import is_deferred_attention_layer
        from vllm.platforms import current_platform

        gpu = current_platform.is_cuda_alike()
        model = self.model_runner.get_model()
        out = []
        for name, module in model.named_modules():
            method = getattr(module, "quant_method", None)
            if is_deferred_attention_layer(module):
                own = list(module.parameters(recurse=False))
                if type(module).__name__ != "Attention" or own:
                    out.append(f"{name} ({type(module).__name__} processes weights)")
            if method is None:
                continue
            kind = type(method).__name__
            if kind not in ("UnquantizedLinearMethod", "UnquantizedEmbeddingMethod"):
                out.append(f"{name or 'model'} ({kind})")
            elif not gpu and not getattr(module, "_rvhub_live", False):
                out.append(f"{name} (packed for the CPU)")
        if callable(getattr(model, "process_weights_after_loading", None)):
            out.append(f"model ({type(model).__name__}.process_weights_after_loading)")
        return out

    def rvhub_make_live(self, folder: str) -> int:
        """CPU only: reload ``folder``'s tensors (the model the engine was started on) so that
        every unquantized linear and embedding layer computes with its parameter (PyTorch's
        ``F.linear``, the fallback vLLM 0.32.0 uses for layers it does not pack) instead of a
        packed oneDNN copy, which makes :meth:`rvhub_set_scale`'s in-place path exact here.
        Returns how many layers were changed."""
        from pathlib import Path

        import torch
        import torch.nn.functional as F
        from vllm.model_executor.model_loader.reload import (
            finalize_layerwise_reload,
            initialize_layerwise_reload,
        )
        from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info

        from rvhub.checkpoint import open_local_checkpoint
        from rvhub.ops.disk import stream_applied

        def plain(x: torch.Tensor, weight: torch.Tensor, bias: Any = None) -> torch.Tensor:
            return F.linear(x, weight, bias)

        runner = self.model_runner
        model = runner.get_model()
        linear, embedding = [], []
        for module in model.modules():
            kind = type(getattr(module, "quant_method", None)).__name__
            if kind == "UnquantizedLinearMethod":
                linear.append(module)
            elif kind == "UnquantizedEmbeddingMethod":
                embedding.append(module)
        for module in linear:  # vLLM's own switch (set for MLA's kv_b_proj): no packing
            module._cpu_skip_gemm_dispatch = True
        ckpt = open_local_checkpoint(Path(folder))
        with torch.no_grad():
            initialize_layerwise_reload(model)
            for module in linear:  # the packed layer's parameters are empty: keep the new ones
                get_layerwise_info(module).kernel_tensors = None
            try:
                _load_each(model, stream_applied(None, ckpt, {}, 0.0))  # type: ignore[arg-type]
            finally:
                finalize_layerwise_reload(model, runner.model_config)
        for module in linear:
            if module.weight.numel() == 0 or module.cpu_linear is not F.linear:
                raise RuntimeError(f"{type(module).__name__} kept a packed weight")
            module._rvhub_live = True
        for module in embedding:  # the weight stays; only the output projection was packed
            module.cpu_linear = plain
            module._rvhub_live = True
        return len(linear) + len(embedding)

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


def _load_in_place(model: Any, tensors: Iterator[tuple[str, Any]]) -> dict[str, Any]:
    """:func:`_load_each` for tensors that share one reused buffer (``stream_applied(...,
    reuse=True)``): refused if a vLLM weight loader kept the buffer as a parameter instead of
    copying from it."""
    import torch

    with torch.no_grad():
        result = _load_each(model, tensors)
    shared = result.pop("storage")
    if any(p.untyped_storage().data_ptr() == shared for p in model.parameters()):
        raise RuntimeError("a vLLM weight loader kept rvhub's buffer as a parameter")
    return result


def _load_each(model: Any, tensors: Iterator[tuple[str, Any]]) -> dict[str, Any]:
    """Hand each ``(name, tensor)`` to vLLM's ``load_weights`` on its own; what it did not
    place, how many it did, and the seconds spent making tensors and inside vLLM."""
    missed: list[str] = []
    placed = 0
    storage = None  # the last tensor's storage
    clock = {"rvhub": 0.0, "vllm": 0.0}
    start = time.perf_counter()
    while True:
        mark = time.perf_counter()
        clock["vllm"] += mark - start
        item = next(tensors, None)
        start = time.perf_counter()
        clock["rvhub"] += start - mark
        if item is None:
            break
        name, tensor = item
        storage = tensor.untyped_storage().data_ptr()
        try:
            loaded = model.load_weights([(name, tensor)])
        except (KeyError, ValueError):  # AutoWeightsLoader: no such parameter
            loaded = set()
        if loaded is not None and not loaded:
            missed.append(name)
        else:
            placed += 1
    clock["vllm"] += time.perf_counter() - start
    return {"missed": missed, "placed": placed, "seconds": clock, "storage": storage}


_INT_VIEW = {1: "uint8", 2: "int16", 4: "int32", 8: "int64"}


def _checksum(tensor: Any, slab: int = 1 << 24) -> tuple[int, Any, Any]:
    """A tensor's raw values, summarized so that any change of a value or of where one sits
    shows: on the CPU the BLAKE3 digest of its bytes (read in place); on a GPU, where copying
    them out would cost more, ``(Σ bits, Σ bits · (position mod 65521 + 1))`` computed there,
    a slab at a time."""
    import torch

    from rvhub.io.hashing import new_hasher

    flat = tensor.detach().reshape(-1)
    if flat.numel() == 0:
        return (0, 0, 0)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    raw = flat.view(getattr(torch, _INT_VIEW[flat.element_size()]))
    if raw.device.type == "cpu":
        hasher = new_hasher()
        hasher.update(raw.view(torch.uint8).numpy())
        return (raw.numel(), hasher.hexdigest(), None)
    plain = total = 0
    for start in range(0, raw.numel(), slab):
        part = raw[start : start + slab].to(torch.int64)
        where = torch.arange(start, start + part.numel(), device=part.device) % 65521 + 1
        plain += int(part.sum())
        total += int((part * where).sum())
    return (raw.numel(), plain, total)


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
