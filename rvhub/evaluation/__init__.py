"""Evaluation: the α sweep with lm-evaluation-harness, the only package that imports
``lm_eval`` (lazily, when a sweep runs or its results are written).

:func:`evaluate_vector` is what :meth:`rvhub.ReasoningVector.evaluate` and ``rvhub eval`` run:
check the output, hold the model at exactly ``round(θ + α·v)`` for each α
(:class:`~rvhub.ops.live.ScaleSwitch`, whose first α runs the apply pre-flight), run lm-eval,
and write each point's results, ``sweep.json`` and the plot.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..io.atomic import atomic_dir, check_output
from ..ops.live import ScaleSwitch
from ..options import ApplyOptions
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
    on_point: Callable[[SweepPoint], None] | None = None,
    lm_eval_options: Mapping[str, Any] | None = None,
    record: Mapping[str, Any] | None = None,
) -> Sweep:
    """Run lm-evaluation-harness on ``model`` at ``θ + α·v`` for each α of ``scales``; see
    :meth:`rvhub.ReasoningVector.evaluate`. ``vector`` is what the apply pre-flight reads of
    the vector, ``source`` its deltas, ``record`` its origin for ``sweep.json``. ``apply``
    holds the apply options (``exclude``, ``vocab``, ``allow_unrelated``); its ``scale`` is
    ignored."""
    task_list, alpha = parse_tasks(tasks), parse_scales(scales)
    count, batch = parse_limit(limit), parse_batch_size(batch_size)
    if output_dir is not None:
        check_output(Path(output_dir), overwrite=overwrite)
    switch = ScaleSwitch(source, vector, model, options=apply or ApplyOptions())
    sweep = run_sweep(
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
        on_point=on_point,
    )
    sweep.vector = dict(record or {})
    config = getattr(model, "config", None)
    sweep.target = {"name": target or getattr(config, "_name_or_path", None) or None}
    if output_dir is not None:
        from ..card.plot import sweep_plot

        with atomic_dir(output_dir, overwrite=overwrite) as tmp:
            write_sweep(sweep, tmp, plot=sweep_plot(sweep.summary()))
    return sweep


__all__ = [
    "INSTALL_HINT",
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
