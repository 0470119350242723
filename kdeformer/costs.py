"""What a call really costs: multiply-adds per head for every method of kdeformer.methods.

    kdeformer.multiply_adds("nystrom", 512, 512, 64, 64, budget=64)      # -> int
    kdeformer.multiply_adds("exact", 512, 512, 64, 64, is_causal=True)   # the visible lower triangle only

A budget of "key columns per query" hides what a method pays outside it (Nystromformer's m x m
pseudo-inverse, Performer's feature maps, KDEformer's estimation rows, HyperAttention's causal levels), so
comparisons at equal cost use this count.  Each method module declares its own count next to its algorithm
(`multiply_adds` in kdeformer/methods/<method>.py; KDEformer's is kdeformer.core.kde_multiply_adds);
this module only checks the arguments and dispatches.  Conventions shared by every count: a (query, key)
pair that is attended costs D (logit) + Dv (value row) + 1 (normaliser term); shapes are the ones the code
really uses (a block padded to K slots counts K); hashing, sorting and the drawing of random directions are
left out (KDEformer's count can add its hashing: include_hashing=True).
"""
from __future__ import annotations

from ._checks import check_flag, check_positive_int
from .methods import get_method, split_budget


def multiply_adds(method: str, n_queries: int, n_keys: int, dim: int, dim_v: int, *, budget: int | None = None,
                  is_causal: bool = False, **options) -> int:
    """Multiply-adds one head of `method` performs for these shapes, budget and options.

    The budget is split as `approximate` splits it (options override the split); exact attention needs no
    budget.  is_causal: the causal form's count (methods without one raise a ValueError naming "causal").
    """
    info = get_method(method)
    sizes = [check_positive_int(name, x) for name, x in
             (("n_queries", n_queries), ("n_keys", n_keys), ("dim", dim), ("dim_v", dim_v))]
    if check_flag("is_causal", is_causal) and not info.supports_causal:
        raise ValueError(f"{info.label} has no causal form; its multiply-adds under is_causal=True are undefined")
    include_hashing = options.pop("include_hashing", False) if method == "kdeformer" else False
    params = split_budget(method, budget, **options)
    if info.supports_causal:
        params["is_causal"] = is_causal
    if include_hashing:
        params["include_hashing"] = check_flag("include_hashing", include_hashing)
    return int(info.multiply_adds(*sizes, **params))


__all__ = ["multiply_adds"]
