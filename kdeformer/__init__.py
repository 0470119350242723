"""kdeformer-explorer: KDEformer attention you can see and tune.

The core (this package) depends on torch and numpy only; the widgets live in ``kdeformer.widgets``.
"""
from .core import SAMPLINGS, check_kde_options, kde_attention
from .defaults import KDE_DEFAULTS
from .exact import exact_attention
from .methods import METHODS, approximate, split_budget
from .costs import multiply_adds
from . import sources
from .sources import AttentionSource
from .metrics import (
    normalizer_relative_error,
    relative_frobenius_error,
    relative_spectral_error,
    spectral_norm,
    theory_spectral_error,
)
from .trace import ExactTrace, KDETrace

__version__ = "0.1.0"

__all__ = [
    "kde_attention",
    "check_kde_options",
    "SAMPLINGS",
    "KDE_DEFAULTS",
    "exact_attention",
    "approximate",
    "METHODS",
    "multiply_adds",
    "split_budget",
    "sources",
    "AttentionSource",
    "KDETrace",
    "ExactTrace",
    "relative_spectral_error",
    "relative_frobenius_error",
    "theory_spectral_error",
    "normalizer_relative_error",
    "spectral_norm",
]
