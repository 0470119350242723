"""Adapter: exact softmax attention (kdeformer.exact_attention) behind the registry interface."""
from __future__ import annotations

from ..exact import exact_attention

OPTIONS = ()


def split_budget(budget: int | None) -> dict:
    """Exact attention pays for every key column; the budget is ignored."""
    return {}


def exact_method(query, key, value, *, scale=None, key_mask=None, generator=None, return_trace=False):
    """Exact attention; `generator` is accepted and unused (nothing is random)."""
    return exact_attention(query, key, value, scale=scale, key_mask=key_mask, return_trace=return_trace)
