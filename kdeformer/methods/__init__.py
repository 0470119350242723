"""KDEformer and the methods it is compared with, behind one call.

    from kdeformer.methods import approximate, METHODS, split_budget
    out = approximate("performer", q, k, v, budget=128)              # (..., Nq, Dv)
    out, trace = approximate("nystrom", q, k, v, budget=64, return_trace=True)
    trace.attention_matrix()                                          # (..., Nq, Nk), small N only
    out = approximate("uniform", q, k, v, budget=64, is_causal=True)  # bottom-right aligned causal mask

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
    thinformer      subset_size = budget key/value pairs kept by kernel halving (a power of two)
Any of these parameters may be given as an option to override the split.  What a call really costs is
`kdeformer.multiply_adds(method, Nq, Nk, D, Dv, budget=...)`: the budget convention flatters some methods
(Nystromformer's pseudo-inverse, ScatterBrain's two parts, HyperAttention's causal levels).

Each entry of METHODS declares what the method can do, like xformers' operators: supports_causal
(is_causal=True; the others refuse it with a ValueError naming "causal"), supports_mask, supports_cross,
random (whether the generator matters).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .._checks import check_flag, check_positive_int
from . import exact_method as _exact
from . import hyperattention as _hyper
from . import kdeformer as _kde
from . import nystrom as _nystrom
from . import performer as _performer
from . import reformer as _reformer
from . import scatterbrain as _scatter
from . import thinformer as _thin
from . import uniform as _uniform
from ._common import MethodTrace


@dataclass(frozen=True, kw_only=True)
class MethodInfo:
    """One entry of METHODS: a method and its declared abilities.

    fn(query, key, value, *, scale, key_mask, generator, return_trace, is_causal, **params) is the method's
    own function, taking its own parameters (as returned by split_budget); use `approximate` for budgets.
    split_budget(budget, **options) -> params; multiply_adds(Nq, Nk, D, Dv, *, is_causal, **params) -> int.
    """

    name: str
    label: str
    fn: Callable
    doc: str
    split_budget: Callable
    options: tuple[str, ...]
    multiply_adds: Callable
    random: bool = True  # the generator changes the result
    supports_causal: bool = False  # is_causal=True (bottom-right aligned); otherwise refused
    supports_mask: bool = True  # key_mask
    supports_cross: bool = True  # Nq != Nk, query not key


def _first_paragraph(module) -> str:
    return (module.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")


def _entry(module, **fields) -> MethodInfo:
    """A registry entry whose doc, budget split, options and multiply-add count are the module's own."""
    return MethodInfo(doc=_first_paragraph(module), split_budget=module.split_budget, options=tuple(module.OPTIONS),
                      multiply_adds=module.multiply_adds, **fields)


METHODS: dict[str, MethodInfo] = {info.name: info for info in (
    _entry(_exact, name="exact", label="Exact", fn=_exact.exact_method, random=False, supports_causal=True),
    _entry(_kde, name="kdeformer", label="KDEformer", fn=_kde.kdeformer_method, supports_causal=True),
    _entry(_performer, name="performer", label="Performer", fn=_performer.performer_attention, supports_causal=True),
    _entry(_reformer, name="reformer", label="Reformer", fn=_reformer.reformer_attention, supports_causal=True),
    _entry(_scatter, name="scatterbrain", label="ScatterBrain", fn=_scatter.scatterbrain_attention),
    _entry(_nystrom, name="nystrom", label="Nyströmformer", fn=_nystrom.nystrom_attention, random=False),
    _entry(_hyper, name="hyperattention", label="HyperAttention", fn=_hyper.hyper_attention, supports_causal=True),
    _entry(_uniform, name="uniform", label="Uniform sampling", fn=_uniform.uniform_attention, supports_causal=True),
    _entry(_thin, name="thinformer", label="Thinformer", fn=_thin.thinformer_attention),
)}


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
    if method == "exact":  # any valid budget is accepted and ignored, so one harness calls every method alike
        if budget is not None:
            check_positive_int("budget", budget)
        return info.split_budget(budget)
    budget = check_positive_int("budget", budget)
    return info.split_budget(budget, **options)


def approximate(method: str, query, key, value, *, budget: int | None = None, scale=None, key_mask=None,
                generator=None, return_trace: bool = False, is_causal: bool = False, **options):
    """Run `method` with `budget` key columns (features, landmarks) per query.  -> out or (out, trace).

    out (..., Nq, Dv) in the inputs' dtype.  is_causal: query i sees keys j <= Nk - Nq + i (bottom-right
    aligned); methods without a causal form (METHODS[m].supports_causal False) raise a ValueError.  The
    trace is the method's own (KDETrace for kdeformer, ExactTrace for exact, MethodTrace otherwise); each
    has `log_normalizer` ((..., Nq) or None) and `attention_matrix()` (NotImplementedError where the
    method defines none).
    """
    info = get_method(method)
    check_flag("return_trace", return_trace)
    check_flag("is_causal", is_causal)
    params = split_budget(method, budget, **options)
    return info.fn(query, key, value, scale=scale, key_mask=key_mask, generator=generator,
                   return_trace=return_trace, is_causal=is_causal, **params)


__all__ = ["METHODS", "MethodInfo", "MethodTrace", "approximate", "split_budget", "get_method"]
