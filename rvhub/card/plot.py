"""The card's per-layer norm plot, drawn with matplotlib when it is installed."""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

from ..io.progress import logger


def norms_plot(layer_norms: Mapping[str, float], *, title: str = "‖v‖ per layer") -> bytes | None:
    """A bar chart of per-layer norms as PNG bytes (deterministic); None without matplotlib."""
    if not layer_norms:
        return None
    try:
        # A bare Figure renders with Agg without pyplot: the user's backend is left alone.
        from matplotlib.figure import Figure
    except ImportError:
        logger.info(
            "matplotlib is not installed: the card has no norm plot (pip install 'rvhub[examples]')"
        )
        return None
    labels = list(layer_norms)
    values = [float(v) for v in layer_norms.values()]
    fig = Figure(figsize=(max(4.0, 0.28 * len(labels) + 1.5), 2.8), dpi=100)
    ax = fig.add_subplot()
    colors = ["#4c72b0" if label.isdigit() else "#999999" for label in labels]
    ax.bar(range(len(labels)), values, color=colors)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=90 if len(labels) > 16 else 0, fontsize=7)
    ax.set_xlabel("layer")
    ax.set_ylabel("Frobenius norm")
    ax.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def sweep_plot(sweep: Mapping[str, Any], *, title: str = "score against α") -> bytes | None:
    """Each metric of an ``rvhub eval`` sweep against α (error bars: lm-eval's stderr), the
    baseline (α = 0) dashed and the best α circled; PNG bytes, or None without matplotlib."""
    metrics = [m for m in sweep.get("metrics") or [] if m.get("points")]
    if not metrics:
        return None
    try:
        from matplotlib.figure import Figure
    except ImportError:
        logger.info("matplotlib is not installed: no sweep plot (pip install 'rvhub[eval]')")
        return None
    cols = min(3, len(metrics))
    rows = (len(metrics) + cols - 1) // cols
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows), dpi=100)
    for i, m in enumerate(metrics):
        ax = fig.add_subplot(rows, cols, i + 1)
        pts = m["points"]
        xs = [p["scale"] for p in pts]
        ys = [p["value"] for p in pts]
        errs = [p.get("stderr") or 0.0 for p in pts]
        ax.errorbar(xs, ys, yerr=errs, marker="o", color="#4c72b0", capsize=3)
        if m.get("baseline") is not None:
            ax.axhline(m["baseline"], color="#999999", linestyle="--", linewidth=1, label="α = 0")
        best = m.get("best") or {}
        if best.get("scale") is not None:
            ax.plot(
                [best["scale"]],
                [best["value"]],
                "o",
                mfc="none",
                mec="#c44e52",
                ms=12,
                label="best α",
            )
        ax.set_xlabel("α")
        ax.set_ylabel(str(m.get("label") or m.get("metric")))
        ax.set_title(str(m.get("alias") or m.get("task")), fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()
