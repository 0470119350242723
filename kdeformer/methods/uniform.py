"""Uniform column sampling: the plain Monte-Carlo estimate of softmax attention.

Per head, draw s key columns uniformly with replacement from the unmasked keys (n of them) and weight
each by n / s.  Both sums come from the same draws:
    D~_i = (n / s) sum_t exp(l_{i j_t}),   N~_i = (n / s) sum_t exp(l_{i j_t}) v_{j_t},   out_i = N~_i / D~_i
D~ and N~ are unbiased (E[count_j] n / s = 1); their ratio is the usual (slightly biased) self-normalised
estimate.  Causal (is_causal=True, bottom-right aligned): each query draws its own s columns uniformly from
the n_i unmasked keys it may see (j <= Nk - Nq + i), weight n_i / s, from its own slice of the random
stream, so a later token never changes an earlier output.  Cost Nq s (D + Dv + 1) multiply-adds either
way.  Budget: s = budget columns per query.
"""
from __future__ import annotations

import math

import torch

from ._common import (
    MethodTrace, attend_per_query, causal_limit, dense_logits, gather_rows, masked_softmax_parts, part, prepare,
)

OPTIONS = ("sample_size",)


def split_budget(budget: int, sample_size: int | None = None) -> dict:
    return {"sample_size": part("sample_size", budget if sample_size is None else sample_size)}


def draw_uniform_columns(valid: torch.Tensor | None, groups: int, n_k: int, num: int, *, dtype, device, generator):
    """s columns per head, uniform over the unmasked keys, with replacement.  -> (G, s) int64.

    The weights are float32 in every dtype, so one generator state draws the same columns."""
    weight = torch.ones(groups, n_k, dtype=torch.float32, device=device) if valid is None else valid.float()
    return torch.multinomial(weight, num, replacement=True, generator=generator)


def draw_past_columns(p, num: int):
    """s columns per query, uniform over the unmasked keys it may see under the causal mask.

    -> cols (G, Nq, s) int64 and n_i (G, Nq) visible unmasked keys (0: the query sees none; its columns
    are then key 0 and must be ignored).  Query i's uniforms are entries [i, :] of one (G, Nq, s) float64
    draw, so they do not depend on any other token."""
    valid = torch.ones(p.groups, p.n_k, dtype=torch.int64, device=p.device) if p.valid is None else p.valid.long()
    seen = torch.cumsum(valid, 1)  # (G, Nk) unmasked keys up to each position
    limit = causal_limit(p.n_q, p.n_k, p.device).clamp_max(p.n_k - 1)  # (Nq,)
    n_seen = torch.where(limit >= 0, seen[:, limit.clamp_min(0)], 0)  # (G, Nq)
    u = torch.rand(p.groups, p.n_q, num, dtype=torch.float64, device=p.device, generator=p.generator)
    rank = (u * n_seen.unsqueeze(-1)).long() + 1  # (G, Nq, s) in [1, n_i]: the rank-th visible unmasked key
    cols = torch.searchsorted(seen, rank.flatten(1)).view_as(rank).clamp_max(p.n_k - 1)
    return cols, n_seen


def causal_uniform(p, sample_size: int):
    """Causal uniform sampling.  -> out (G, Nq, Dv), log D~ (G, Nq), cols (G, Nq, s)."""
    cols, n_seen = draw_past_columns(p, sample_size)
    allowed = (n_seen > 0).unsqueeze(-1).expand_as(cols)  # (G, Nq, s)
    out, lse = attend_per_query(p.q * p.scale, p.k, p.v, cols, allowed)
    log_w = n_seen.to(p.dtype).log() - math.log(sample_size)  # (G, Nq): log(n_i / s), -inf where n_i = 0
    return out, lse + log_w, cols


def uniform_attention(query, key, value, *, sample_size: int = 128, scale=None, key_mask=None, generator=None,
                      return_trace=False, is_causal=False):
    """Softmax attention estimated from `sample_size` uniformly drawn key columns per head."""
    sample_size = part("sample_size", sample_size)
    p = prepare(query, key, value, scale=scale, key_mask=key_mask, generator=generator, return_trace=return_trace)
    if is_causal:
        out, log_d, cols = causal_uniform(p, sample_size)
        if not return_trace:
            return p.finish(out)
        return p.finish(out), MethodTrace("uniform", query, key, p.scale, p.mask,
                                          {"sample_size": sample_size, "is_causal": True},
                                          log_normalizer=p.per_query(log_d), sampled=p.per_query(cols))
    cols = draw_uniform_columns(p.valid, p.groups, p.n_k, sample_size, dtype=p.dtype, device=p.device,
                                generator=p.generator)  # (G, s)
    k_s = gather_rows(p.k, cols)  # (G, s, D)
    v_s = gather_rows(p.v, cols)  # (G, s, Dv)
    logits = (p.q * p.scale) @ k_s.mT  # (G, Nq, s)
    out, lse = masked_softmax_parts(logits, None, v_s)  # (G, Nq, Dv), (G, Nq)
    log_w = (p.n_valid.to(p.dtype).log() - math.log(sample_size)).unsqueeze(-1)  # (G, 1): log(n / s)
    log_d = lse + log_w  # (G, Nq)
    if not return_trace:
        return p.finish(out)

    def matrix():
        counts = torch.zeros(p.groups, p.n_k, dtype=p.dtype, device=p.device).scatter_add_(
            1, cols, torch.ones_like(cols, dtype=p.dtype))  # (G, Nk)
        col_w = counts * log_w.exp()  # (G, Nk) count_j n / s
        logits_full = dense_logits(p.q, p.k, p.scale, p.dtype)  # (G, Nq, Nk)
        m = torch.exp(logits_full - log_d.unsqueeze(-1)) * col_w.unsqueeze(1)
        return p.per_query(m)

    trace = MethodTrace("uniform", query, key, p.scale, p.mask, {"sample_size": sample_size},
                        log_normalizer=p.per_query(log_d), sampled=p.per_group(cols),
                        extras={"column_weight": p.per_group(log_w.exp())}, matrix_fn=matrix)
    return p.finish(out), trace


def multiply_adds(n_queries: int, n_keys: int, dim: int, dim_v: int, *, sample_size: int,
                  is_causal: bool = False) -> int:
    """Nq s (D + Dv + 1): every query pays s logits, s value rows and s normaliser terms."""
    return n_queries * sample_size * (dim + dim_v + 1)
