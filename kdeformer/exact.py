"""Exact softmax attention with the same signature and checks as kde_attention (the reference)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._checks import check_flag
from ._inputs import prepare
from .trace import ExactTrace

# Queries per chunk are chosen so one chunk's logits hold about this many entries (bounded memory).
CHUNK_ENTRIES = 1 << 24


def causal_visible(n_q: int, n_k: int, start: int, stop: int, device) -> torch.Tensor:
    """Bool (stop - start, Nk): query i sees key j <= Nk - Nq + i (bottom-right aligned)."""
    limit = torch.arange(start, stop, device=device) + (n_k - n_q)  # (c,)
    return torch.arange(n_k, device=device) <= limit.unsqueeze(-1)


@dataclass
class CausalExactTrace(ExactTrace):
    """ExactTrace of a causal call: the matrix keeps its upper (future) triangle at 0."""

    is_causal: bool = True

    def attention_matrix(self) -> torch.Tensor:
        n_q, n_k = self.query.shape[-2], self.key.shape[-2]
        visible = causal_visible(n_q, n_k, 0, n_q, self.query.device)  # (Nq, Nk)
        return torch.where(visible, super().attention_matrix(), 0.0).nan_to_num(0.0)  # rows seeing no key: 0


def grad_free(*tensors: torch.Tensor) -> bool:
    """True when autograd records nothing for these tensors, so in-place ops on them are safe."""
    return not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors)


def masked_softmax_parts(logits: torch.Tensor, allowed: torch.Tensor | None, values: torch.Tensor,
                         log_weight: torch.Tensor | None = None):
    """One attention part over a set of keys, kept as (output, log-sum-exp) so parts merge stably.

    logits (..., R, K) already scaled (a fresh tensor: overwritten when autograd is not recording),
    allowed (..., R or 1, K) bool or None, values (..., K, Dv), log_weight (..., 1, K) optional log
    importance weight of each key.
    Returns out (..., R, Dv) = sum_j w_j e^{l_j} v_j / sum_j w_j e^{l_j}  (0 where no key is allowed) and
    lse (..., R) = log sum_j w_j e^{l_j}  (-inf where no key is allowed).
    """
    in_place = grad_free(logits)
    if log_weight is not None:
        logits = logits.add_(log_weight) if in_place else logits + log_weight
    if allowed is not None:
        logits = logits.masked_fill_(~allowed, float("-inf")) if in_place else logits.masked_fill(~allowed, float("-inf"))
    shift = logits.amax(-1, keepdim=True).detach()  # (..., R, 1); any shift is exact, so it needs no gradient
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    weights = logits.sub_(shift).exp_() if in_place else torch.exp(logits - shift)  # 0 on masked entries
    den = weights.sum(-1, keepdim=True)  # (..., R, 1)
    out = (weights @ values) / den.clamp_min(torch.finfo(den.dtype).tiny)
    return out, (shift + den.log()).squeeze(-1)


def exact_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
    query_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    generator: torch.Generator | None = None,
    return_trace: bool = False,
    **ignored,
):
    """softmax(scale * query @ key^T) @ value, stable in every dtype, chunked over queries.

    Same layout and arguments as :func:`kdeformer.kde_attention` (query (..., Nq, D), key (..., Nk, D),
    value (..., Nk, Dv), key_mask (..., Nk) True = attend, query_mask (..., Nq) True = real query: masked
    queries give 0 rows); the approximation's own parameters (bucket_size, sample_size, ...) are accepted
    and ignored so the two can be swapped in one call, and `generator` is checked and unused.
    is_causal: query i sees keys j <= Nk - Nq + i (bottom-right aligned as in flash-attention; torch's
    SDPA aligns top-left when Nq != Nk); a query that sees no key gives a 0 row.
    Gradients flow (in-place steps only where autograd is not recording).
    With ``return_trace=True`` returns ``(out, ExactTrace)`` holding log D.
    """
    p = prepare(query, key, value, scale=scale, key_mask=key_mask, generator=generator, query_mask=query_mask,
                return_trace=return_trace)
    check_flag("is_causal", is_causal)
    q = p.q * p.scale  # (G, Nq, D)
    invalid = None if p.valid is None else ~p.valid.unsqueeze(1)  # (G, 1, Nk)
    chunk = max(1, CHUNK_ENTRIES // max(1, p.groups * p.n_k))
    outs, log_ds = [], []
    for start in range(0, p.n_q, chunk):
        stop = min(p.n_q, start + chunk)
        bad = invalid
        if is_causal:
            future = ~causal_visible(p.n_q, p.n_k, start, stop, p.device).unsqueeze(0)  # (1, c, Nk)
            bad = future if bad is None else bad | future
        out, log_d = masked_softmax_parts(q[:, start:stop] @ p.k.mT, None if bad is None else ~bad, p.v)
        outs.append(out)
        log_ds.append(log_d)
    out, log_d = torch.cat(outs, 1), torch.cat(log_ds, 1)  # (G, Nq, Dv), (G, Nq)
    if p.query_valid is not None:
        out = out * p.query_valid.unsqueeze(-1)
    out = p.finish(out)
    if not return_trace:
        return out
    trace_cls = CausalExactTrace if is_causal else ExactTrace
    return out, trace_cls(query, key, p.scale, p.mask, p.per_query(log_d))
