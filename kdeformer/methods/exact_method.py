"""Exact softmax attention (kdeformer.exact_attention) behind the registry interface.

Every (query, key) pair is computed: Nq Nk (D + Dv + 1) multiply-adds per head (logit, value row and
normaliser term), only the visible lower triangle under a causal mask.  The budget and the generator are
checked and ignored, so one harness can call every method the same way.
"""
from __future__ import annotations

from ..exact import exact_attention
from ._common import visible_pairs

OPTIONS = ()


def split_budget(budget: int | None) -> dict:
    """Exact attention pays for every key column; the budget is ignored."""
    return {}


def exact_method(query, key, value, *, scale=None, key_mask=None, generator=None, return_trace=False,
                 is_causal=False):
    """Exact attention; `generator` is checked and unused (nothing is random)."""
    return exact_attention(query, key, value, scale=scale, key_mask=key_mask, generator=generator,
                           return_trace=return_trace, is_causal=is_causal)


def multiply_adds(n_queries: int, n_keys: int, dim: int, dim_v: int, *, is_causal: bool = False) -> int:
    """Nq Nk (D + Dv + 1), or the visible pairs times (D + Dv + 1) when causal.

    The code computes the full logits block and masks it; the count is the work an exact kernel that skips
    the future (flash-attention) does, the honest reference for the causal track."""
    pairs = visible_pairs(n_queries, n_keys) if is_causal else n_queries * n_keys
    return pairs * (dim + dim_v + 1)
