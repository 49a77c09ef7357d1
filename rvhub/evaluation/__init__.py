"""Evaluation: the α sweep with lm-evaluation-harness, the only package that imports
``lm_eval`` (lazily, when a sweep runs or its results are written).

:func:`evaluate_vector` is what :meth:`rvhub.ReasoningVector.evaluate` and ``rvhub eval`` run:
check the output, hold the model at exactly ``round(θ + α·v)`` for each α
(:class:`~rvhub.ops.live.ScaleSwitch`, whose first α runs the apply pre-flight), run lm-eval,
and write each point's results, ``sweep.json`` and the plot.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputError
from ..io.atomic import atomic_dir, check_output
from ..io.progress import logger
from ..ops.live import FileScaleSwitch, ScaleSwitch
from ..options import ApplyOptions
from .resume import (
    checkpoint_sample,
    finished_points,
    forget_key,
    keep_point,
    model_sample,
    sweep_key,
)
from .sweep import (
    INSTALL_HINT,
    SWEEP_NAME,
    SWEEP_PLOT,
    MetricValue,
    Sweep,
    SweepPoint,
    check_lm_eval_options,
    metric_values,
    parse_batch_size,
    parse_limit,
    parse_scales,
    parse_tasks,
    read_sweep,
    require_lm_eval,
    results_model_name,
    run_sweep,
    write_sweep,
)
from .target import load_eval_target

if TYPE_CHECKING:
    import torch

    from ..ops.prepare import VectorFacts
    from ..sources import VectorSource
    from .vllm_engine import VllmOptions


def _model_folder(model: Any) -> str | None:
    """The local folder ``model`` was loaded from, when it was (transformers' ``_name_or_path``)."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    return name if isinstance(name, str) and name and Path(name).exists() else None


LOG_NAME = "lm-eval.log"


def evaluate_vector(
    vector: VectorFacts,
    source: VectorSource,
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    tasks: Iterable[str] | str,
    scales: Iterable[float] | str = (-1.0, 0.0, 1.0),
    output_dir: str | os.PathLike[str] | None = None,
    target: str | None = None,
    include_path: str | os.PathLike[str] | None = None,
    limit: int | float | None = None,
    batch_size: int | str = 1,
    num_fewshot: int | None = None,
    apply: ApplyOptions | None = None,
    overwrite: bool = False,
    resume: bool = False,
    on_point: Callable[[SweepPoint], None] | None = None,
    lm_eval_options: Mapping[str, Any] | None = None,
    record: Mapping[str, Any] | None = None,
    inputs: Iterable[str | os.PathLike[str] | None] = (),
    seed: int = 0,
    model_args: Mapping[str, Any] | None = None,
) -> Sweep:
    """Run lm-evaluation-harness on ``model`` at ``θ + α·v`` for each α of ``scales``; see
    :meth:`rvhub.ReasoningVector.evaluate`. ``vector`` is what the apply pre-flight reads of
    the vector, ``source`` its deltas, ``record`` its origin for ``sweep.json``. ``apply``
    holds the apply options (``exclude``, ``vocab``, ``allow_unrelated``); its ``scale`` is
    ignored. ``inputs`` are the vector's paths; with the model's folder and ``include_path``
    they may not be, contain or lie inside ``output_dir``.

    With ``output_dir`` each finished α is kept (:mod:`.resume`): an interrupted sweep leaves
    them in ``.<name>.rvhub-partial`` beside it, and ``resume=True`` evaluates only the
    missing α. lm-eval's log lines go to ``lm-eval.log`` in the output. ``model_args`` go to
    lm-eval's ``HFLM`` (e.g. ``max_length``)."""
    options = apply or ApplyOptions()
    hf_args = dict(model_args or {})
    taken = sorted({"pretrained", "tokenizer", "batch_size"} & set(hf_args))
    if taken:
        raise InputError(f"`model_args` may not set {', '.join(taken)}: rvhub sets them")
    inputs = [*inputs, include_path, _model_folder(model)]
    _check_sweep_output(output_dir, overwrite, resume, inputs)
    switch = _switch_for(source, vector, model, options)
    config = getattr(model, "config", None)
    name = target or getattr(config, "_name_or_path", None) or None
    return _evaluate(
        switch, model, tokenizer, None, _hf_record(hf_args), model_sample(model),
        tasks=tasks, scales=scales, output_dir=output_dir, name=name,
        include_path=include_path, limit=limit, batch_size=batch_size,
        num_fewshot=num_fewshot, options=options, overwrite=overwrite, resume=resume,
        on_point=on_point, lm_eval_options=lm_eval_options, record=record, inputs=inputs,
        seed=seed,
    )  # fmt: skip


def _switch_for(
    source: VectorSource, vector: VectorFacts, model: Any, options: ApplyOptions
) -> FileScaleSwitch | ScaleSwitch:
    """Re-read θ from the model's files at each α when it holds exactly what they hold (no
    copy kept); otherwise keep the touched tensors' pristine θ in host memory."""
    from ..checkpoint import open_local_checkpoint
    from ..errors import RvhubError

    folder = _model_folder(model)
    switch = None
    if folder is not None:
        try:
            ckpt = open_local_checkpoint(Path(folder))
        except (RvhubError, OSError):
            ckpt = None
        if ckpt is not None:
            switch = FileScaleSwitch.open(source, vector, model, ckpt, options)
    if switch is not None:
        logger.info("α switches re-read θ from %s (no copy of the model is kept)", folder)
        return switch
    logger.info("α switches keep the touched tensors' θ in host memory (no files behind them)")
    return ScaleSwitch(source, vector, model, options=options, keep_deltas=False)


def _hf_record(model_args: Mapping[str, Any]) -> dict[str, Any]:
    import transformers

    out: dict[str, Any] = {"name": "hf", "transformers": transformers.__version__}
    if model_args:
        out["model_args"] = dict(model_args)
    return out


def evaluate_vector_vllm(
    vector: Any,
    target: str | os.PathLike[str],
    *,
    tasks: Iterable[str] | str,
    scales: Iterable[float] | str = (-1.0, 0.0, 1.0),
    output_dir: str | os.PathLike[str] | None = None,
    revision: str | None = None,
    include_path: str | os.PathLike[str] | None = None,
    limit: int | float | None = None,
    batch_size: int | str = "auto",
    num_fewshot: int | None = None,
    apply: ApplyOptions | None = None,
    overwrite: bool = False,
    resume: bool = False,
    on_point: Callable[[SweepPoint], None] | None = None,
    lm_eval_options: Mapping[str, Any] | None = None,
    engine: VllmOptions | None = None,
    seed: int = 0,
    config_check: bool = True,
) -> Sweep:
    """:func:`evaluate_vector` on a vLLM engine (:mod:`.vllm_engine`): ``target`` (a model
    folder or Hub id) is loaded once by vLLM through lm-eval's ``vllm`` model, and each α is
    set inside the running engine from the target's and the vector's files (no copy of θ or v
    is kept). ``engine`` holds vLLM's arguments (tensor parallelism, memory, pass-through)."""
    from ..checkpoint import check_config
    from ..hub.resolve import open_checkpoint
    from ..ops.disk import prepare_streamed
    from .vllm_engine import (
        VllmOptions,
        VllmSwitch,
        engine_environment,
        require_vllm,
        start_engine,
        vector_folder,
    )

    require_lm_eval()
    version = require_vllm()
    engine = engine or VllmOptions()
    options = apply or ApplyOptions()
    ckpt = open_checkpoint(target, revision=revision)
    if config_check:
        check_config(ckpt)
    folder = ckpt.path if ckpt.path.is_dir() else ckpt.path.parent
    inputs = [*vector.input_paths(), include_path, folder]
    _check_sweep_output(output_dir, overwrite, resume, inputs)
    facts = vector.facts()
    prepared = prepare_streamed(facts, ckpt, options)  # the pre-flight, before vLLM starts
    count = parse_batch_size(batch_size)
    vec_dir, tmp = vector_folder(vector)
    try:
        engine_environment()
        lm = start_engine(folder, engine, batch_size=count, seed=seed)
        changed = [v for v, _ in prepared.plan.targets.values()]
        switch = VllmSwitch(
            lm.model, vec_dir, folder, options, lineage=facts.lineage, changed=changed,
            switch=engine.switch,
        )  # fmt: skip
        name = str(ckpt.source.get("repo_id") or target) if ckpt.source else str(target)
        return _evaluate(
            switch, None, None, lm, engine.record(version, switch.mode), checkpoint_sample(ckpt),
            tasks=tasks, scales=scales, output_dir=output_dir, name=name,
            include_path=include_path, limit=limit, batch_size=count,
            num_fewshot=num_fewshot, options=options, overwrite=overwrite, resume=resume,
            on_point=on_point, lm_eval_options=lm_eval_options,
            record=vector.origin_record(), inputs=inputs, seed=seed,
        )  # fmt: skip
    finally:
        if tmp is not None:
            tmp.cleanup()


def _check_sweep_output(
    output_dir: str | os.PathLike[str] | None,
    overwrite: bool,
    resume: bool,
    inputs: list[str | os.PathLike[str] | None],
) -> None:
    if output_dir is not None:
        check_output(Path(output_dir), overwrite=overwrite, inputs=inputs)
    elif resume:
        raise InputError("`resume` takes up a sweep written to `output_dir`; give one")


def _evaluate(
    switch: Any,
    model: Any,
    tokenizer: Any,
    lm: Any,
    engine: Mapping[str, Any],
    target_sample: str,
    *,
    tasks: Iterable[str] | str,
    scales: Iterable[float] | str,
    output_dir: str | os.PathLike[str] | None,
    name: str | None,
    include_path: str | os.PathLike[str] | None,
    limit: int | float | None,
    batch_size: int | str,
    num_fewshot: int | None,
    options: ApplyOptions,
    overwrite: bool,
    resume: bool,
    on_point: Callable[[SweepPoint], None] | None,
    lm_eval_options: Mapping[str, Any] | None,
    record: Mapping[str, Any] | None,
    inputs: list[str | os.PathLike[str] | None],
    seed: int,
) -> Sweep:
    """The sweep on either engine: points kept in the output as they finish, then written."""
    task_list, alpha = parse_tasks(tasks), parse_scales(scales)
    count, batch = parse_limit(limit), parse_batch_size(batch_size)
    lm_options = check_lm_eval_options(lm_eval_options)
    run = functools.partial(
        run_sweep,
        switch,
        model,
        tokenizer,
        tasks=task_list,
        scales=alpha,
        include_path=include_path,
        limit=count,
        batch_size=batch,
        num_fewshot=num_fewshot,
        seed=seed,
        lm_eval_options=lm_options,
        lm=lm,
        engine=engine,
    )
    if output_dir is None:
        sweep = run(on_point=on_point)
    else:
        settings: dict[str, Any] = {
            "limit": count,
            "batch_size": batch,
            "num_fewshot": num_fewshot,
            "include_path": include_path,
            "lm_eval_options": lm_options,
            "exclude": options.exclude,
            "vocab": options.vocab,
            "seed": seed,
            "engine": dict(engine),
        }
        key = sweep_key(
            vector=dict(record or {}),
            target=name,
            target_sample=target_sample,
            tasks=task_list,
            settings=settings,
        )
        sweep = _sweep_into(
            Path(output_dir), run, key, overwrite, inputs, resume, on_point, record, name
        )
    sweep.vector, sweep.target = dict(record or {}), {"name": name}
    return sweep


def _sweep_into(
    folder: Path,
    run: Callable[..., Sweep],
    key: Mapping[str, Any],
    overwrite: bool,
    inputs: list[str | os.PathLike[str] | None],
    resume: bool,
    on_point: Callable[[SweepPoint], None] | None,
    record: Mapping[str, Any] | None,
    name: str | None,
) -> Sweep:
    """Run the sweep in the output's work folder, keeping each point as it finishes; write
    ``sweep.json`` and the plot, and move the folder into place."""
    from ..card.plot import sweep_plot

    with atomic_dir(folder, overwrite=overwrite, inputs=inputs, resumable=True) as work:
        finished = finished_points(work, key, resume=resume, final=folder)
        for point in finished.values():
            if on_point is not None:
                on_point(point)

        def keep(point: SweepPoint) -> None:
            finished[point.scale] = point
            keep_point(work, key, point, list(finished.values()))
            if on_point is not None:
                on_point(point)

        try:
            sweep = run(on_point=keep, done=finished, log_path=work / LOG_NAME)
        except BaseException:
            if finished:
                logger.warning(
                    "%d finished α point(s) are kept in %s: run the same command with "
                    "`resume=True` to evaluate only the rest",
                    len(finished),
                    work,
                )
            raise
        sweep.vector, sweep.target = dict(record or {}), {"name": name}
        forget_key(work)
        write_sweep(sweep, work, plot=sweep_plot(sweep.summary()))
    return sweep


__all__ = [
    "INSTALL_HINT",
    "LOG_NAME",
    "SWEEP_NAME",
    "SWEEP_PLOT",
    "MetricValue",
    "Sweep",
    "SweepPoint",
    "evaluate_vector",
    "evaluate_vector_vllm",
    "load_eval_target",
    "metric_values",
    "read_sweep",
    "require_lm_eval",
    "results_model_name",
    "write_sweep",
]
