"""L4, model cards: scores (:mod:`.scores`), Hub metadata (:mod:`.metadata`), the norm plot
(:mod:`.plot`), rendering (:mod:`.render`) and the card a vector is published with
(:mod:`.build`)."""

from ..constants import PLOT_NAME
from .build import CardOptions, build_card
from .plot import norms_plot
from .render import Card, render_card
from .scores import Benchmark, Scores, load_scores, parse_lm_eval, parse_scores_file

__all__ = [
    "PLOT_NAME",
    "Benchmark",
    "Card",
    "CardOptions",
    "Scores",
    "build_card",
    "load_scores",
    "norms_plot",
    "parse_lm_eval",
    "parse_scores_file",
    "render_card",
]
