"""The card's per-layer norm plot, drawn with matplotlib when it is installed."""

from __future__ import annotations

import io
from collections.abc import Mapping

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
