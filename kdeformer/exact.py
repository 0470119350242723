"""Exact softmax attention with the same signature and checks as kde_attention (the reference)."""
from __future__ import annotations

import math

import torch

from ._checks import check_key_mask, check_qkv, check_scale
from .core import working_dtype
from .trace import ExactTrace

# Queries per chunk are chosen so one chunk's logits hold about this many entries (bounded memory).
CHUNK_ENTRIES = 1 << 24


def exact_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
    return_trace: bool = False,
    **ignored,
):
    """softmax(scale * query @ key^T) @ value, stable in every dtype, chunked over queries.

    Same layout and arguments as :func:`kdeformer.kde_attention` (query (..., Nq, D), key (..., Nk, D),
    value (..., Nk, Dv), key_mask (..., Nk) True = attend); the approximation's own parameters
    (bucket_size, sample_size, ...) are accepted and ignored so the two can be swapped in one call.
    With ``return_trace=True`` returns ``(out, ExactTrace)`` holding log D.
    """
    lead, n_q, n_k, dim, dim_v = check_qkv(query, key, value)
    scale = check_scale(scale, dim)
    mask = check_key_mask(key_mask, lead, n_k, query.device)
    dtype = working_dtype(query.dtype)
    groups = math.prod(lead)
    q = query.reshape(groups, n_q, dim).to(dtype) * scale  # (G, Nq, D)
    k = key.reshape(groups, n_k, dim).to(dtype)  # (G, Nk, D)
    v = value.reshape(groups, n_k, dim_v).to(dtype)  # (G, Nk, Dv)
    invalid = None if mask is None else ~mask.reshape(groups, 1, n_k)  # (G, 1, Nk)
    out = torch.empty(groups, n_q, dim_v, dtype=dtype, device=query.device)  # (G, Nq, Dv)
    log_d = torch.empty(groups, n_q, dtype=dtype, device=query.device)  # (G, Nq)
    chunk = max(1, CHUNK_ENTRIES // max(1, groups * n_k))
    for start in range(0, n_q, chunk):
        logits = q[:, start : start + chunk] @ k.mT  # (G, c, Nk)
        if invalid is not None:
            logits.masked_fill_(invalid, float("-inf"))
        shift = logits.amax(-1, keepdim=True)  # (G, c, 1)
        weights = logits.sub_(shift).exp_()
        den = weights.sum(-1, keepdim=True)
        out[:, start : start + chunk] = (weights @ v) / den
        log_d[:, start : start + chunk] = (shift + den.log()).squeeze(-1)
    out = out.view(*lead, n_q, dim_v).to(query.dtype)
    if not return_trace:
        return out
    return out, ExactTrace(query, key, scale, mask, log_d.view(*lead, n_q))
