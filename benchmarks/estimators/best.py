"""Block-centroid PPS sampling: the columns each query block computes, their weights, which are exact.

Shape legend:  G groups (batch x heads)   Nq, Nk queries, keys   D, Dv head and value dims
               nqb query blocks   Bq queries per block   Bk keys of a block's own (exact) key block
               C  columns per query block beyond its key block

Per query block (the queries sorted by LSH, cut into nqb blocks of Bq):
1. `block_centroids`: the mean of the block's (already scaled) queries;
2. `centroid_importance`: its logits against every key, one GEMM (nqb x D x Nk per head), give
   w_j = exp(l_j - max) x ||v_j - o|| (o: the centroid's own softmax output) -- a proxy of the block's
   column norm of D^-1 A times the value's distance from the output, i.e. the column's share of the
   error of a ratio estimate; a uniform floor keeps every column possible;
3. `inclusion_probabilities`: pi_j = min(1, c w_j) with sum_j pi_j = C exactly (capped PPS): the
   columns whose pi reaches 1 are computed exactly -- attention sinks become exact columns by
   themselves, as many as each block needs;
4. `systematic_sample`: C columns without replacement from one uniform per block (inverse CDF of the
   cumulative pi at u, u+1, ..., u+C-1); column j is in the sample with probability exactly pi_j, so
   weight 1/pi_j makes every sum over the block's columns unbiased (Horvitz-Thompson).
The block's queries then attend [key block, C columns] with weights [1, ..., 1, 1/pi] in one GEMM, as
today's core does; numerator / normaliser is a ratio of two unbiased estimates.

Multiply-adds per head (`multiply_adds`): nqb (Nk D + 2 Nk Dv)  [centroid logits, its output, the
distances]  +  nqb Bq (Bk + C) (D + Dv + 1)  [the block GEMMs], hashing (Nq + Nk) D r on top.
Probabilities are computed in float32 from inputs cast to float32.
"""
from __future__ import annotations

import torch

FLOOR = 0.05  # share of the block's probability mass spread uniformly over its allowed columns


def block_centroids(q_blocks: torch.Tensor, row_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean query of each block.  q_blocks (G, nqb, Bq, D) scaled, row_valid (G, nqb, Bq) -> (G, nqb, D)."""
    if row_valid is None:
        return q_blocks.float().mean(2)
    weight = row_valid.float().unsqueeze(-1)  # (G, nqb, Bq, 1)
    return (q_blocks.float() * weight).sum(2) / weight.sum(2).clamp_min(1.0)


def centroid_importance(
    centroids: torch.Tensor, key: torch.Tensor, value: torch.Tensor, allowed: torch.Tensor,
    value_factor: str = "centered", temperature: float = 1.0,
) -> torch.Tensor:
    """Sampling importance of every key for every block.  -> (G, nqb, Nk) float32, 0 where not allowed.

    centroids (G, nqb, D), key (G, Nk, D), value (G, Nk, Dv), allowed (G, nqb, Nk) bool (unmasked and
    not in the block's exact key block).  value_factor: "centered" ||v_j - o_b|| with o_b the centroid's
    softmax output, "norm" ||[v_j, 1]||, "none" 1.
    """
    logits = torch.bmm(centroids, key.float().mT) * temperature  # (G, nqb, Nk)
    logits = logits.masked_fill(~allowed, float("-inf"))
    shift = logits.amax(-1, keepdim=True).clamp_min(-3e38)  # finite even for a block with nothing allowed
    weight = torch.exp(logits - shift)  # (G, nqb, Nk), 0 where not allowed
    v = value.float()
    if value_factor == "centered":
        out = torch.bmm(weight / weight.sum(-1, keepdim=True).clamp_min(1e-30), v)  # (G, nqb, Dv)
        sq = v.square().sum(-1).unsqueeze(1) - 2 * torch.bmm(out, v.mT) + out.square().sum(-1, keepdim=True)
        weight = weight * sq.clamp_min(0).sqrt()
    elif value_factor == "norm":
        weight = weight * (v.square().sum(-1) + 1).sqrt().unsqueeze(1)
    elif value_factor == "meancentered":  # ||[v_j - mean v, 1]||: no extra multiply-adds
        centred = v - v.mean(1, keepdim=True)
        weight = weight * (centred.square().sum(-1) + 1).sqrt().unsqueeze(1)
    return weight


def with_floor(weight: torch.Tensor, allowed: torch.Tensor, floor: float = FLOOR) -> torch.Tensor:
    """(1 - floor) w / sum w + floor / n_allowed on allowed columns; uniform where w has no mass."""
    allowed_f = allowed.float()
    uniform = allowed_f / allowed_f.sum(-1, keepdim=True).clamp_min(1.0)
    total = weight.sum(-1, keepdim=True)
    shaped = torch.where(total > 0, weight / total.clamp_min(1e-30), uniform)
    return (1 - floor) * shaped + floor * uniform


def inclusion_probabilities(weight: torch.Tensor, count: int) -> torch.Tensor:
    """Capped PPS: pi = min(1, c w) with sum pi = min(count, #positive w).  (..., Nk) -> (..., Nk).

    c is found from the `count` largest weights: with w_(0) >= w_(1) >= ..., the first k for which
    (count - k) w_(k) <= sum_{j >= k} w_(j) leaves the k largest at pi = 1 and scales the rest.
    """
    n_keys = weight.shape[-1]
    n = min(count, n_keys)
    top = weight.topk(n, dim=-1).values  # (..., n) descending
    rest = weight.sum(-1, keepdim=True) - (top.cumsum(-1) - top)  # (..., n): sum of w_(k), w_(k+1), ...
    k = torch.arange(n, device=weight.device, dtype=weight.dtype)
    scale = (n - k) / rest.clamp_min(1e-30)  # (..., n) candidate c for k exact columns
    fits = scale * top <= 1 + 1e-6
    first = fits.to(torch.int8).argmax(-1, keepdim=True)  # (..., 1): smallest k that fits
    c = torch.gather(scale, -1, first)
    pi = (c * weight).clamp_max(1.0)
    few = (weight > 0).sum(-1, keepdim=True) <= n  # no more positive weights than slots: all exact
    return torch.where(few, (weight > 0).to(weight.dtype), pi)


def systematic_sample(pi: torch.Tensor, count: int, uniform: torch.Tensor):
    """`count` columns with inclusion probabilities pi from one uniform per row.

    pi (..., Nk) with sum <= count, uniform (...) in [0, 1) -> columns (..., count) int64,
    weights (..., count) 1/pi (0 for a slot left empty or a repeated column), exact (..., count) bool.
    """
    cum = pi.cumsum(-1)  # (..., Nk)
    total = cum[..., -1:]  # (..., 1)
    slots = torch.arange(count, device=pi.device, dtype=pi.dtype)
    target = uniform.unsqueeze(-1) + slots  # (..., count), increasing
    used = target < total  # a row with fewer than `count` columns leaves slots empty
    cols = torch.searchsorted(cum, torch.where(used, target, 0).contiguous(), right=True).clamp_max(pi.shape[-1] - 1)
    repeat = torch.zeros_like(used)
    repeat[..., 1:] = cols[..., 1:] == cols[..., :-1]  # rounding can land twice in one pi = 1 interval
    keep = used & ~repeat
    p = torch.gather(pi, -1, cols)
    weights = torch.where(keep, 1.0 / p.clamp_min(1e-30), 0.0)
    return cols, weights, keep & (p >= 1.0)


def multiply_adds(n_q: int, n_k: int, dim: int, dim_v: int, *, q_block: int, key_block: int, columns: int,
                  value_factor: str = "centered") -> int:
    """Multiply-adds per head: centroid logits (+ its output and distances when centered) and the GEMMs."""
    nqb = -(-n_q // q_block)
    bq = -(-n_q // nqb)
    per_block = n_k * dim + (2 * n_k * dim_v if value_factor == "centered" else 0)
    return nqb * per_block + nqb * bq * (key_block + columns) * (dim + dim_v + 1)
