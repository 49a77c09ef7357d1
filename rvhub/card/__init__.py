"""L4, model cards: scores (:mod:`.scores`), Hub metadata (:mod:`.metadata`), the norm plot
(:mod:`.plot`) and rendering (:mod:`.render`)."""

from ..constants import PLOT_NAME
from .plot import norms_plot
from .render import Card, render_card
from .scores import Benchmark, Scores, load_scores, parse_lm_eval, parse_scores_file

__all__ = [
    "PLOT_NAME",
    "Benchmark",
    "Card",
    "Scores",
    "load_scores",
    "norms_plot",
    "parse_lm_eval",
    "parse_scores_file",
    "render_card",
]
