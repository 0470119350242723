"""Shared plumbing of the peer methods: input checks, flattening, stable merges and the trace.

Every method works on flattened heads: the caller's leading dims (batch, heads, ...) become one group
dim G.  Shape legend used in this package:
    G  groups (batch x heads)   Nq queries   Nk keys   D head dim   Dv value dim
    nb blocks (chunks)   Bq query slots per block   K key slots per block   s samples   m features
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from .._checks import check_generator, check_int, check_key_mask, check_positive_int, check_qkv, check_scale
from ..core import gather_rows, working_dtype  # gather_rows: one implementation for the core and the peers


@dataclass
class Prepared:
    """Validated inputs of one call, flattened to (G, N, .) in the working dtype."""

    lead: tuple
    n_q: int
    n_k: int
    dim: int
    dim_v: int
    scale: float
    mask: torch.Tensor | None  # (*lead, Nk) bool, True = attend (as the caller gave it, expanded)
    generator: torch.Generator | None
    q: torch.Tensor  # (G, Nq, D) unscaled
    k: torch.Tensor  # (G, Nk, D)
    v: torch.Tensor  # (G, Nk, Dv)
    valid: torch.Tensor | None  # (G, Nk) bool
    n_valid: torch.Tensor  # (G,) int64 unmasked keys per head
    out_dtype: torch.dtype

    @property
    def groups(self) -> int:
        return self.q.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def device(self) -> torch.device:
        return self.q.device

    def finish(self, out: torch.Tensor) -> torch.Tensor:
        """(G, Nq, Dv) working dtype -> (*lead, Nq, Dv) in the caller's dtype."""
        return out.reshape(*self.lead, self.n_q, self.dim_v).to(self.out_dtype)

    def per_query(self, x: torch.Tensor) -> torch.Tensor:
        """(G, Nq, ...) -> (*lead, Nq, ...)."""
        return x.reshape(*self.lead, self.n_q, *x.shape[2:])

    def per_key(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(*self.lead, self.n_k, *x.shape[2:])

    def per_group(self, x: torch.Tensor) -> torch.Tensor:
        """(G, ...) -> (*lead, ...)."""
        return x.reshape(*self.lead, *x.shape[1:])


def prepare(query, key, value, *, scale, key_mask, generator) -> Prepared:
    """Check and flatten the inputs the same way as kde_attention (same errors, same dtype rules)."""
    lead, n_q, n_k, dim, dim_v = check_qkv(query, key, value)
    scale = check_scale(scale, dim)
    mask = check_key_mask(key_mask, lead, n_k, query.device)
    generator = check_generator(generator, query.device)
    dtype = working_dtype(query.dtype)
    groups = math.prod(lead)
    q = query.reshape(groups, n_q, dim).to(dtype)  # (G, Nq, D)
    k = key.reshape(groups, n_k, dim).to(dtype)  # (G, Nk, D)
    v = value.reshape(groups, n_k, dim_v).to(dtype)  # (G, Nk, Dv)
    valid = None if mask is None else mask.reshape(groups, n_k)  # (G, Nk)
    if valid is None:
        n_valid = torch.full((groups,), n_k, dtype=torch.int64, device=query.device)
    else:
        n_valid = valid.sum(-1)
    return Prepared(lead, n_q, n_k, dim, dim_v, scale, mask, generator, q, k, v, valid, n_valid, query.dtype)


def part(name: str, value: int, minimum: int = 1) -> int:
    return check_int(name, value, minimum=minimum)


def split_block_and_samples(budget: int, block: int | None, samples: int | None, fraction: float,
                            block_name: str, fraction_name: str) -> tuple[int, int]:
    """A budget of key columns per query cut into an exact block and samples (KDEformer, HyperAttention).

    The block takes `fraction` of the budget unless given; the samples take the rest unless given.
    """
    if not 0.0 < float(fraction) < 1.0:
        raise ValueError(f"{fraction_name} must be in (0, 1), got {fraction!r}")
    if block is None:
        block = max(1, round(budget * fraction))
    if samples is None:
        samples = max(1, budget - block)
    return part(block_name, block), part("sample_size", samples)


def masked_softmax_parts(logits: torch.Tensor, allowed: torch.Tensor | None, values: torch.Tensor,
                         log_weight: torch.Tensor | None = None):
    """One attention part over a set of keys, kept as (output, log-sum-exp) so parts merge stably.

    logits (..., R, K) already scaled (overwritten: pass a fresh tensor), allowed (..., R or 1, K) bool
    or None, values (..., K, Dv), log_weight (..., 1, K) optional log importance weight of each key.
    Returns out (..., R, Dv) = sum_j w_j e^{l_j} v_j / sum_j w_j e^{l_j}  (0 where no key is allowed) and
    lse (..., R) = log sum_j w_j e^{l_j}  (-inf where no key is allowed).
    """
    if log_weight is not None:
        logits.add_(log_weight)
    if allowed is not None:
        logits.masked_fill_(~allowed, float("-inf"))
    shift = logits.amax(-1, keepdim=True)  # (..., R, 1)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    weights = logits.sub_(shift).exp_()  # 0 on masked entries
    den = weights.sum(-1, keepdim=True)  # (..., R, 1)
    out = (weights @ values) / den.clamp_min(torch.finfo(den.dtype).tiny)
    return out, (shift + den.log()).squeeze(-1)


def merge_parts(parts):
    """Merge (out, lse) parts over disjoint key sets: a softmax over their union.  -> (out, lse)."""
    lse = torch.logsumexp(torch.stack([p[1] for p in parts]), dim=0)  # (..., R)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    out = 0
    for o, l in parts:
        out = out + torch.exp(l - safe).unsqueeze(-1) * o
    return out, lse


def dense_logits(query: torch.Tensor, key: torch.Tensor, scale: float, dtype) -> torch.Tensor:
    """(..., Nq, Nk) scale * q k^T in `dtype` (for the small-N attention_matrix views)."""
    return scale * (query.to(dtype) @ key.to(dtype).mT)


@dataclass
class MethodTrace:
    """What a peer method computed, in the caller's leading dims (written `...`).

    method          the registry name
    params          the method's own parameters for this call (after split_budget)
    log_normalizer  (..., Nq) the method's estimate of log D_i = log sum_j exp(scale <q_i, k_j>), or None
                    where the method estimates no normaliser (Nystromformer)
    q_buckets, k_buckets  (..., [rounds,] N) hash buckets (LSH methods)
    q_order, k_order      (..., [rounds,] N) permutations sorting tokens by bucket
    q_blocks              (..., [rounds,] Nq) block (chunk) of each query
    sampled         (..., s) sampled key columns (sampling methods)
    landmarks       (q_landmarks (..., m, D), k_landmarks (..., m, D)) (Nystromformer)
    features        (phi(Q) (..., Nq, m), phi(K) (..., Nk, m)), each up to a positive per-row factor
    extras          anything else the method wants to show
    attention_matrix()  (..., Nq, Nk) the approximate softmax matrix (output = matrix @ value); small N only.
    """

    method: str
    query: torch.Tensor
    key: torch.Tensor
    scale: float
    key_mask: torch.Tensor | None
    params: dict
    log_normalizer: torch.Tensor | None = None
    q_buckets: torch.Tensor | None = None
    k_buckets: torch.Tensor | None = None
    q_order: torch.Tensor | None = None
    k_order: torch.Tensor | None = None
    q_blocks: torch.Tensor | None = None
    sampled: torch.Tensor | None = None
    landmarks: tuple | None = None
    features: tuple | None = None
    extras: dict = field(default_factory=dict)
    matrix_fn: Callable[[], torch.Tensor] | None = field(default=None, repr=False)

    @property
    def has_attention_matrix(self) -> bool:
        return self.matrix_fn is not None

    def attention_matrix(self) -> torch.Tensor:
        """(..., Nq, Nk) the approximate softmax matrix; materialises Nq x Nk (small N only)."""
        if self.matrix_fn is None:
            raise NotImplementedError(f"method {self.method!r} defines no attention matrix")
        return self.matrix_fn()
