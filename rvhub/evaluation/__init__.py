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
from ..ops.live import ScaleSwitch
from ..options import ApplyOptions
from .resume import finished_points, forget_key, keep_point, model_sample, sweep_key
from .sweep import (
    INSTALL_HINT,
    SWEEP_NAME,
    SWEEP_PLOT,
    MetricValue,
    Sweep,
    SweepPoint,
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
) -> Sweep:
    """Run lm-evaluation-harness on ``model`` at ``θ + α·v`` for each α of ``scales``; see
    :meth:`rvhub.ReasoningVector.evaluate`. ``vector`` is what the apply pre-flight reads of
    the vector, ``source`` its deltas, ``record`` its origin for ``sweep.json``. ``apply``
    holds the apply options (``exclude``, ``vocab``, ``allow_unrelated``); its ``scale`` is
    ignored. ``inputs`` are the vector's paths; with the model's folder and ``include_path``
    they may not be, contain or lie inside ``output_dir``.

    With ``output_dir`` each finished α is kept (:mod:`.resume`): an interrupted sweep leaves
    them in ``.<name>.rvhub-partial`` beside it, and ``resume=True`` evaluates only the
    missing α. lm-eval's log lines go to ``lm-eval.log`` in the output."""
    task_list, alpha = parse_tasks(tasks), parse_scales(scales)
    count, batch = parse_limit(limit), parse_batch_size(batch_size)
    inputs = [*inputs, include_path, _model_folder(model)]
    if output_dir is not None:
        check_output(Path(output_dir), overwrite=overwrite, inputs=inputs)
    elif resume:
        raise InputError("`resume` takes up a sweep written to `output_dir`; give one")
    options = apply or ApplyOptions()
    switch = ScaleSwitch(source, vector, model, options=options)
    config = getattr(model, "config", None)
    name = target or getattr(config, "_name_or_path", None) or None
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
        lm_eval_options=lm_eval_options,
    )
    if output_dir is None:
        sweep = run(on_point=on_point)
    else:
        settings: dict[str, Any] = {
            "limit": count,
            "batch_size": batch,
            "num_fewshot": num_fewshot,
            "include_path": include_path,
            "lm_eval_options": lm_eval_options,
            "exclude": options.exclude,
            "vocab": options.vocab,
        }
        key = sweep_key(
            vector=dict(record or {}),
            target=name,
            target_sample=model_sample(model),
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
    "load_eval_target",
    "metric_values",
    "read_sweep",
    "require_lm_eval",
    "results_model_name",
    "write_sweep",
]
