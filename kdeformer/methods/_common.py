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

from .._checks import check_int
from .._inputs import Prepared, prepare  # one input step for the core, exact attention and the peers
from ..core import gather_rows  # gather_rows: one implementation for the core and the peers


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
