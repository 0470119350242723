"""KDEformer and the methods it is compared with, behind one call.

    from kdeformer.methods import approximate, METHODS, split_budget
    out = approximate("performer", q, k, v, budget=128)              # (..., Nq, Dv)
    out, trace = approximate("nystrom", q, k, v, budget=64, return_trace=True)
    trace.attention_matrix()                                          # (..., Nq, Nk), small N only

Layout as torch's scaled_dot_product_attention: query (..., Nq, D), key (..., Nk, D), value (..., Nk, Dv);
key_mask bool (..., Nk), True = attend.  `budget` means the same for every method: the key columns (or
random features, or landmarks) each query pays for.  How each method splits it (see split_budget):

    exact           all Nk columns; budget ignored
    kdeformer       bucket_size = budget/3 exact block + sample_size = 2 budget/3 sampled columns
                    (the authors' block m/2 with m samples, 1.5 m columns)
    hyperattention  block_size = budget/3 + sample_size = 2 budget/3 uniform samples (same split)
    performer       num_features = budget positive orthogonal random features
    scatterbrain    block_size = budget/2 LSH support + num_features = budget/2 Performer features
    reformer        num_rounds (2) x 2 chunks of chunk_size = budget / (2 num_rounds)
    nystrom         num_landmarks = budget
    uniform         sample_size = budget uniformly sampled columns
Any of these parameters may be given as an option to override the split.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .._checks import check_positive_int
from . import exact as _exact
from . import hyperattention as _hyper
from . import kdeformer as _kde
from . import nystrom as _nystrom
from . import performer as _performer
from . import reformer as _reformer
from . import scatterbrain as _scatter
from . import uniform as _uniform
from ._common import MethodTrace


@dataclass(frozen=True)
class MethodInfo:
    """One entry of METHODS.

    fn(query, key, value, *, scale, key_mask, generator, return_trace, **params) is the method's own
    function, taking its own parameters (as returned by split_budget); use `approximate` for budgets.
    """

    name: str
    label: str
    fn: Callable
    supports_cross: bool
    supports_mask: bool
    doc: str
    split: Callable = None
    option_names: Callable = None
    random: bool = True

    @property
    def options(self) -> tuple[str, ...]:
        return tuple(self.option_names())


def _first_paragraph(module) -> str:
    return (module.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")


METHODS: dict[str, MethodInfo] = {
    "exact": MethodInfo("exact", "Exact", _exact.exact_method, True, True, _first_paragraph(_exact),
                        _exact.split_budget, lambda: _exact.OPTIONS, random=False),
    "kdeformer": MethodInfo("kdeformer", "KDEformer", _kde.kdeformer_method, True, True, _first_paragraph(_kde),
                            _kde.split_budget, _kde.core_options),
    "performer": MethodInfo("performer", "Performer", _performer.performer_attention, True, True,
                            _first_paragraph(_performer), _performer.split_budget, lambda: _performer.OPTIONS),
    "reformer": MethodInfo("reformer", "Reformer", _reformer.reformer_attention, True, True,
                           _first_paragraph(_reformer), _reformer.split_budget, lambda: _reformer.OPTIONS),
    "scatterbrain": MethodInfo("scatterbrain", "ScatterBrain", _scatter.scatterbrain_attention, True, True,
                               _first_paragraph(_scatter), _scatter.split_budget, lambda: _scatter.OPTIONS),
    "nystrom": MethodInfo("nystrom", "Nyströmformer", _nystrom.nystrom_attention, True, True,
                          _first_paragraph(_nystrom), _nystrom.split_budget, lambda: _nystrom.OPTIONS, random=False),
    "hyperattention": MethodInfo("hyperattention", "HyperAttention", _hyper.hyper_attention, True, True,
                                 _first_paragraph(_hyper), _hyper.split_budget, lambda: _hyper.OPTIONS),
    "uniform": MethodInfo("uniform", "Uniform sampling", _uniform.uniform_attention, True, True,
                          _first_paragraph(_uniform), _uniform.split_budget, lambda: _uniform.OPTIONS),
}


def get_method(method: str) -> MethodInfo:
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    return METHODS[method]


def split_budget(method: str, budget: int | None, **options) -> dict:
    """The parameters `method` runs with for `budget` key columns per query (options override the split).

    >>> split_budget("kdeformer", 192)
    {'bucket_size': 64, 'sample_size': 128}
    """
    info = get_method(method)
    unknown = sorted(set(options) - set(info.options))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method {method!r}; allowed: {sorted(info.options)}")
    if method == "exact":
        return info.split(budget)
    budget = check_positive_int("budget", budget)
    return info.split(budget, **options)


def approximate(method: str, query, key, value, *, budget: int | None = None, scale=None, key_mask=None,
                generator=None, return_trace: bool = False, **options):
    """Run `method` with `budget` key columns (features, landmarks) per query.  -> out or (out, trace).

    out (..., Nq, Dv) in the inputs' dtype.  The trace is the method's own (KDETrace for kdeformer,
    ExactTrace for exact, MethodTrace otherwise); each has `log_normalizer` ((..., Nq) or None) and
    `attention_matrix()` (NotImplementedError where the method defines none).
    """
    info = get_method(method)
    params = split_budget(method, budget, **options)
    return info.fn(query, key, value, scale=scale, key_mask=key_mask, generator=generator,
                   return_trace=return_trace, **params)


__all__ = ["METHODS", "MethodInfo", "MethodTrace", "approximate", "split_budget", "get_method"]
