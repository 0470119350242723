"""Shared plumbing of the peer methods: input checks, flattening, stable merges, causal masks and the trace.

Every method works on flattened heads: the caller's leading dims (batch, heads, ...) become one group
dim G.  Shape legend used in this package:
    G  groups (batch x heads)   Nq queries   Nk keys   D head dim   Dv value dim
    nb blocks (chunks)   Bq query slots per block   K key slots per block   s samples   m features
Causal masks are bottom-right aligned, as flash-attention and KV-cache decoding need: query i sees the
keys j <= Nk - Nq + i (torch's SDPA `is_causal` is top-left aligned when Nq != Nk).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .._checks import check_flag, check_int
from .._inputs import Prepared, prepare  # one input step for the core, exact attention and the peers
from ..exact import grad_free, masked_softmax_parts  # the one stable softmax over a set of keys
from ..core import gather_rows  # gather_rows: one implementation for the core and the peers

# Entries of one chunk of per-query gathered keys (G x queries x keys x D): bounded memory.
CHUNK_ENTRIES = 1 << 23


def part(name: str, value: int, minimum: int = 1) -> int:
    return check_int(name, value, minimum=minimum)


def refuse_causal(is_causal, method: str, why: str) -> None:
    """The ValueError of a method that has no causal form (`why` says what needs the future)."""
    if check_flag("is_causal", is_causal):
        raise ValueError(f"{method} has no causal form ({why}); is_causal=True is not supported: use exact, "
                         "kdeformer, performer, reformer, hyperattention or uniform for causal attention")


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


def merge_parts(parts):
    """Merge (out, lse) parts over disjoint key sets: a softmax over their union.  -> (out, lse)."""
    lse = torch.logsumexp(torch.stack([p[1] for p in parts]), dim=0)  # (..., R)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).detach()
    out = 0
    for o, l in parts:
        out = out + torch.exp(l - safe).unsqueeze(-1) * o
    return out, lse


def dense_logits(query: torch.Tensor, key: torch.Tensor, scale: float, dtype) -> torch.Tensor:
    """(..., Nq, Nk) scale * q k^T in `dtype` (for the small-N attention_matrix views)."""
    return scale * (query.to(dtype) @ key.to(dtype).mT)


# --------------------------------------------------------------------------- causal helpers
def causal_limit(n_q: int, n_k: int, device) -> torch.Tensor:
    """Last key each query may see, bottom-right aligned: Nk - Nq + i (negative: none).  # (Nq,)"""
    return torch.arange(n_q, device=device) + (n_k - n_q)


def causal_allowed(n_q: int, n_k: int, device) -> torch.Tensor:
    """Bool (Nq, Nk): key j is visible to query i (j <= Nk - Nq + i)."""
    return torch.arange(n_k, device=device) <= causal_limit(n_q, n_k, device).unsqueeze(-1)


def visible_pairs(n_q: int, n_k: int) -> int:
    """Number of (query, key) pairs under the bottom-right causal mask."""
    return sum(min(n_k, max(0, n_k - n_q + i + 1)) for i in range(n_q))


def attend_per_query(q_scaled: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor,
                     allowed: torch.Tensor, log_weight: torch.Tensor | None = None):
    """Each query attends to its own list of keys (causal peers), chunked over queries for memory.

    q_scaled (G, Nq, D), k (G, Nk, D), v (G, Nk, Dv), index (G, Nq, S) key of each slot, allowed
    (G, Nq, S) bool, log_weight (G, Nq, S) or None.  -> (out (G, Nq, Dv), lse (G, Nq)) as
    masked_softmax_parts.  Every row is computed with the same shapes whatever the other rows hold, so a
    query's result never depends on another query's keys (the strict causality tests rely on it).
    """
    groups, n_q, slots = index.shape
    chunk = max(1, CHUNK_ENTRIES // max(1, groups * slots * max(k.shape[-1], v.shape[-1])))
    outs, lses = [], []
    for start in range(0, n_q, chunk):
        idx = index[:, start:start + chunk]  # (G, c, S)
        k_sel, v_sel = gather_rows(k, idx), gather_rows(v, idx)  # (G, c, S, D), (G, c, S, Dv)
        logits = (k_sel @ q_scaled[:, start:start + chunk].unsqueeze(-1)).squeeze(-1)  # (G, c, S)
        w = None if log_weight is None else log_weight[:, start:start + chunk].unsqueeze(-2)  # (G, c, 1, S)
        out, lse = masked_softmax_parts(logits.unsqueeze(-2), allowed[:, start:start + chunk].unsqueeze(-2), v_sel, w)
        outs.append(out.squeeze(-2))
        lses.append(lse.squeeze(-1))
    return torch.cat(outs, 1), torch.cat(lses, 1)


def block_support(blocks, q_block: torch.Tensor | None = None) -> torch.Tensor:
    """Bool (G, Nq, Nk): key j lies in the key block of query i (the exact part of the LSH methods).

    blocks: an _lsh.Blocks; q_block (G, Nq) block of each query (default: blocks.q_block)."""
    q_block = blocks.q_block if q_block is None else q_block
    q_start = torch.gather(blocks.k_start, 1, q_block).unsqueeze(-1)  # (G, Nq, 1)
    q_end = torch.gather(blocks.k_end, 1, q_block).unsqueeze(-1)
    kp = blocks.k_pos.unsqueeze(1)  # (G, 1, Nk)
    return (kp >= q_start) & (kp < q_end)


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
    features        (phi(Q) (..., Nq, m), phi(K) (..., Nk, m)): phi(Q) phi(K)^T is the estimate of A up to a
                    positive factor per query
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
