"""The block-level sampling schemes measured, as one configurable prototype (`run_plan`).

Every scheme: LSH-sort the queries (the core's hashing, Gray order), cut them into blocks of Bq, give
each block an optional exact key block of Bk (the core's pairing: key block t of the sorted keys), pick
C more columns per block from an importance estimate, and evaluate densely (benchmarks.estimators.dense).
C is what the budget leaves: b (D + Dv + 1) per query, minus the estimation, the window and the key
block, all counted (see `estimation_cost`).

Options (`Scheme` fields):
    estimator  "centroid" (block mean query, one GEMM), "centroid_diag" (plus the diagonal query spread:
               log w += sum_d var_d k_d^2, a Jensen correction), "rows:R" (R exact attention rows per
               block, stratified), "oracle" (exact per-block column norms: a lower reference, not a method)
    value      "centered" ||v_j - o_b||, "norm" ||[v_j, 1]||, "none"
    sampler    "systematic" (capped PPS, one uniform per block), "stratified" (capped PPS, one uniform
               per slot), "multinomial" (with replacement, weights 1/(C p), no cap), "poisson"
               (independent Bernoulli(pi): C columns on average, a variable count; for reference)
    floor      uniform share of each block's probabilities;  window  exact +-w band (self-attention)
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from kdeformer.core import bucket_ranks, draw_projections, gather_rows, hash_codes, sort_by_bucket

from . import best
from .dense import block_factor, dense_output, query_factor, with_window


@dataclass(frozen=True)
class Scheme:
    name: str
    q_block: int = 32
    key_block: int = 0
    estimator: str = "centroid"
    value: str = "centered"
    sampler: str = "systematic"
    floor: float = best.FLOOR
    window: int = 0
    temperature: float = 1.0
    num_projs: int = 7
    estimate_share: float | None = None  # None: one estimate per block; else at most this share of the budget
    shared_draws: bool = False  # one sample per estimate group (True) or one per block (False)
    segments: int = 1  # queries sorted by (token segment, LSH rank): S contiguous segments, LSH within each
    auto_order: bool = False  # per head: token order or LSH order, whichever leaves less query spread in blocks

    def but(self, **changes) -> "Scheme":
        return replace(self, **changes)


# --------------------------------------------------------------------------- structure
def sort_queries_and_keys(q, k, num_projs: int, generator):
    """The core's SimHash and Gray-order sort (num_projs 0: token order).  -> q_order (G, Nq), k_order (G, Nk)."""
    groups, _, dim = q.shape
    if num_projs == 0:
        return (torch.arange(q.shape[1]).expand(groups, -1), torch.arange(k.shape[1]).expand(groups, -1))
    proj = draw_projections(groups, dim, num_projs, dtype=q.dtype, device=q.device, generator=generator)
    ranks = bucket_ranks(num_projs, "gray", q.device)
    return sort_by_bucket(hash_codes(q, proj), ranks, None), sort_by_bucket(hash_codes(k, proj), ranks, None)


def segment_major(q_order: torch.Tensor, segments: int) -> torch.Tensor:
    """Re-sort an LSH order by token segment first (S contiguous segments), LSH rank within each."""
    n_q = q_order.shape[1]
    rank = torch.empty_like(q_order).scatter_(1, q_order, torch.arange(n_q).expand_as(q_order))  # (G, Nq)
    segment = torch.arange(n_q) * segments // n_q  # (Nq,) segment of each token
    return torch.sort(segment * n_q + rank, dim=1).indices


def block_spread(q: torch.Tensor, order: torch.Tensor, q_block: int) -> torch.Tensor:
    """Sum over blocks of sum_i ||q_i - block mean||^2 for blocks cut from `order`.  -> (G,)."""
    rows = block_rows(order, q_block)  # (G, nqb, Bq)
    blocks = gather_rows(q, rows)  # (G, nqb, Bq, D)
    return (blocks - blocks.mean(2, keepdim=True)).square().sum((1, 2, 3))


def tighter_order(q, order_a, order_b, q_block: int) -> torch.Tensor:
    """Per head, the order whose blocks spread less (the centroid then stands for its block better)."""
    pick_b = block_spread(q, order_b, q_block) < block_spread(q, order_a, q_block)  # (G,)
    return torch.where(pick_b.unsqueeze(-1), order_b, order_a)


def block_rows(q_order: torch.Tensor, q_block: int) -> torch.Tensor:
    """Balanced blocks of sorted queries, the last padded with its last query.  -> (G, nqb, Bq)."""
    n_q = q_order.shape[1]
    nqb = -(-n_q // q_block)
    bq = -(-n_q // nqb)
    pos = torch.arange(nqb * bq, device=q_order.device).clamp_max(n_q - 1)
    return q_order[:, pos].view(q_order.shape[0], nqb, bq)


def key_blocks(k_order: torch.Tensor, nqb: int, key_block: int) -> torch.Tensor:
    """Key block t: sorted keys [t Nk / nqb, + Bk).  -> (G, nqb, Bk) key index."""
    n_k = k_order.shape[1]
    start = torch.arange(nqb, device=k_order.device) * n_k // nqb  # (nqb,)
    pos = (start.unsqueeze(-1) + torch.arange(key_block, device=k_order.device)).clamp_max(n_k - 1)
    return k_order[:, pos.flatten()].view(k_order.shape[0], nqb, key_block)


# --------------------------------------------------------------------------- estimators
def centroid_importance(centroids, key, value, allowed, value_factor: str = "norm", temperature: float = 1.0):
    """best.column_importance with a choice of value factor and a per-block `allowed` (G, nqb, Nk):
    "norm" ||[v_j, 1]|| (the winner's), "centered" ||v_j - o_b|| (o_b the centroid's softmax output,
    2 Nk Dv more multiply-adds per block), "meancentered" ||[v_j - mean v, 1]||, "none" 1."""
    logits = (torch.bmm(centroids, key.mT) * temperature).masked_fill(~allowed, float("-inf"))  # (G, nqb, Nk)
    weight = torch.exp(logits - logits.amax(-1, keepdim=True).clamp_min(-3e38))
    if value_factor == "centered":
        out = torch.bmm(weight / weight.sum(-1, keepdim=True).clamp_min(1e-30), value)  # (G, nqb, Dv)
        sq = value.square().sum(-1).unsqueeze(1) - 2 * torch.bmm(out, value.mT) + out.square().sum(-1, keepdim=True)
        return weight * sq.clamp_min(0).sqrt()
    if value_factor == "none":
        return weight
    if value_factor == "meancentered":
        value = value - value.mean(1, keepdim=True)
    return weight * (value.square().sum(-1) + 1).sqrt().unsqueeze(1)


def estimation_cost(scheme: Scheme, nqb: int, n_k: int, dim: int, dim_v: int) -> int:
    """Multiply-adds of the importance estimate per head (the oracle is charged like a centroid)."""
    centered = 2 * n_k * dim_v if scheme.value == "centered" else 0
    if scheme.estimator == "centroid":
        return nqb * (n_k * dim + centered)
    if scheme.estimator == "centroid_diag":
        return nqb * (2 * n_k * dim + centered) + n_k * dim  # k^2 once per head, var . k^2 per block
    if scheme.estimator.startswith("rows:"):
        rows = int(scheme.estimator.split(":")[1])
        return nqb * (rows * n_k * (dim + dim_v + 1) + (n_k * dim_v if centered else 0))
    return nqb * (n_k * dim + centered)


def row_importance(q_blocks, k, v, scheme: Scheme, allowed, generator):
    """R stratified rows per block: sqrt(mean_i P_ij^2 ||v_j - o_i||^2) (or the chosen value factor)."""
    groups, nqb, bq, dim = q_blocks.shape
    rows = int(scheme.estimator.split(":")[1])
    step = bq / rows
    pick = ((torch.arange(rows) + torch.rand(groups, nqb, rows, generator=generator)) * step).long().clamp_max(bq - 1)
    q_est = torch.gather(q_blocks, 2, pick.unsqueeze(-1).expand(-1, -1, -1, dim))  # (G, nqb, R, D)
    return exact_row_importance(q_est, k, v, scheme.value, allowed)


def exact_row_importance(q_rows, k, v, value: str, allowed):
    """sqrt(mean over rows of P_ij^2 f_ij^2), P the exact softmax rows.  q_rows (G, nqb, R, D)."""
    groups, nqb, rows, dim = q_rows.shape
    logits = (q_rows.reshape(groups, nqb * rows, dim) @ k.mT).view(groups, nqb, rows, -1)  # (G, nqb, R, Nk)
    p = torch.softmax(logits, -1)
    if value == "centered":
        out = p @ v.unsqueeze(1)  # (G, nqb, R, Dv)
        f2 = (v.square().sum(-1)[:, None, None] - 2 * out @ v.unsqueeze(1).mT + out.square().sum(-1, keepdim=True)).clamp_min(0)
    elif value == "norm":
        f2 = (v.square().sum(-1) + 1)[:, None, None]
    else:
        f2 = torch.ones(1)
    return ((p.square() * f2).mean(2)).sqrt() * allowed


def diag_importance(q_blocks, centroids, k, v, scheme, allowed):
    """Centroid importance with log w_j += sum_d var_d k_jd^2 (the block's query spread)."""
    var = q_blocks.var(2, unbiased=False)  # (G, nqb, D)
    spread = torch.bmm(var, k.square().mT)  # (G, nqb, Nk)
    base = centroid_importance(centroids, k, v, allowed, "none", scheme.temperature)
    logw = torch.log(base.clamp_min(1e-38)) + spread
    logw = logw.masked_fill(~allowed, float("-inf"))
    w = torch.exp(logw - logw.amax(-1, keepdim=True))
    if scheme.value == "none":
        return w
    factor = centroid_importance(centroids, k, v, allowed, scheme.value, scheme.temperature) / base.clamp_min(1e-38)
    return w * factor * allowed


def importance(scheme, q_blocks, k, v, allowed, generator):
    centroids = best.block_centroids(q_blocks)  # (G, nqb, D)
    if scheme.estimator == "centroid":
        return centroid_importance(centroids, k, v, allowed, scheme.value, scheme.temperature)
    if scheme.estimator == "centroid_diag":
        return diag_importance(q_blocks, centroids, k, v, scheme, allowed)
    if scheme.estimator.startswith("rows:"):
        return row_importance(q_blocks, k, v, scheme, allowed, generator)
    if scheme.estimator == "oracle":
        return exact_row_importance(q_blocks, k, v, scheme.value, allowed)
    raise ValueError(scheme.estimator)


# --------------------------------------------------------------------------- samplers
def sample_columns(scheme, probs, count, generator):
    """-> cols, weights (G, nqb, C) from the floored probabilities (G, nqb, Nk)."""
    shape = probs.shape[:-1]
    if scheme.sampler == "multinomial":
        u = torch.rand(*shape, count, generator=generator)
        cols = torch.searchsorted(probs.cumsum(-1), (u * probs.sum(-1, keepdim=True)).contiguous()).clamp_max(probs.shape[-1] - 1)
        return cols, 1.0 / (count * torch.gather(probs, -1, cols))
    pi = best.inclusion_probabilities(probs, count)
    if scheme.sampler == "systematic":
        cols, weights, _ = best.systematic_sample(pi, count, torch.rand(*shape, generator=generator))
        return cols, weights
    if scheme.sampler == "stratified":
        cum = pi.cumsum(-1)
        target = torch.arange(count, dtype=pi.dtype) + torch.rand(*shape, count, generator=generator)
        used = target < cum[..., -1:]
        cols = torch.searchsorted(cum, torch.where(used, target, 0).contiguous(), right=True).clamp_max(pi.shape[-1] - 1)
        return cols, torch.where(used, 1.0 / torch.gather(pi, -1, cols).clamp_min(1e-30), 0.0)
    if scheme.sampler == "poisson":  # every column independently: weight 1/pi where drawn
        drawn = torch.rand(pi.shape, generator=generator) < pi
        cols = torch.arange(pi.shape[-1]).expand_as(pi)
        return cols, torch.where(drawn, 1.0 / pi.clamp_min(1e-30), 0.0)
    raise ValueError(scheme.sampler)


# --------------------------------------------------------------------------- the whole plan
def estimate_groups(scheme, budget, nqb, n_q, n_k, dim, dim_v) -> int:
    """Number of importance estimates: one per block, or as many as `estimate_share` of the budget buys."""
    if scheme.estimate_share is None:
        return nqb
    per_estimate = estimation_cost(scheme, 1, n_k, dim, dim_v)
    affordable = int(scheme.estimate_share * n_q * budget * (dim + dim_v + 1) // per_estimate)
    return max(1, min(nqb, affordable))


def columns_for_budget(scheme, budget, n_est, nqb, bq, n_q, n_k, dim, dim_v) -> int:
    """C: what b (D + Dv + 1) per query leaves after the estimate, the window and the key block."""
    per_col = dim + dim_v + 1
    total = n_q * budget * per_col
    spare = total - estimation_cost(scheme, n_est, n_k, dim, dim_v) - n_q * (2 * scheme.window + 1 if scheme.window else 0) * per_col
    return max(1, spare // (nqb * bq * per_col) - scheme.key_block)


def run_plan(scheme: Scheme, q, k, v, scale: float, budget: int, seed: int):
    """Output (G, Nq, Dv) and multiply-adds per query of `scheme` at `budget`."""
    generator = torch.Generator().manual_seed(seed)
    groups, n_q, dim = q.shape
    n_k, dim_v = k.shape[1], v.shape[-1]
    q_order, k_order = sort_queries_and_keys(q, k, scheme.num_projs, generator)
    if scheme.segments > 1:
        q_order = segment_major(q_order, scheme.segments)
    if scheme.auto_order:
        q_order = tighter_order(q, q_order, torch.arange(n_q).expand(groups, -1), scheme.q_block)
    rows = block_rows(q_order, scheme.q_block)  # (G, nqb, Bq)
    nqb, bq = rows.shape[1:]
    allowed = torch.ones(groups, nqb, n_k, dtype=torch.bool)
    if scheme.key_block:
        kb = key_blocks(k_order, nqb, scheme.key_block)  # (G, nqb, Bk)
        allowed.scatter_(-1, kb, False)
    q_blocks = gather_rows(q * scale, rows)  # (G, nqb, Bq, D)
    n_est = estimate_groups(scheme, budget, nqb, n_q, n_k, dim, dim_v)
    count = columns_for_budget(scheme, budget, n_est, nqb, bq, n_q, n_k, dim, dim_v)
    count = min(count, n_k - scheme.key_block)
    group_of = torch.arange(nqb) * n_est // nqb  # (nqb,) consecutive blocks share an estimate
    if n_est < nqb:  # the group's queries, as one block of the group's length (padded by repetition)
        member = [torch.nonzero(group_of == t).flatten() for t in range(n_est)]
        longest = max(len(m) for m in member)
        pick = torch.stack([m[torch.arange(longest).clamp_max(len(m) - 1)] for m in member])  # (ng, longest)
        est_blocks = q_blocks[:, pick].flatten(2, 3)  # (G, ng, longest * Bq, D)
        est_allowed = allowed[:, pick[:, 0]]
    else:
        est_blocks, est_allowed = q_blocks, allowed
    weight = importance(scheme, est_blocks, k, v, est_allowed, generator)  # (G, ng, Nk)
    probs = best.with_floor(weight, est_allowed, scheme.floor)
    if scheme.shared_draws:
        cols, weights = sample_columns(scheme, probs, count, generator)
        cols, weights = cols[:, group_of], weights[:, group_of]
    else:
        cols, weights = sample_columns(scheme, probs[:, group_of], count, generator)
    factor = block_factor(n_k, cols, weights)
    if scheme.key_block:
        factor.scatter_(-1, kb, 1.0)
    factor = with_window(query_factor(factor, rows, n_q), scheme.window if scheme.window else -1)  # 0: none
    out = dense_output(q, k, v, scale, factor)
    per_col = dim + dim_v + 1
    work = estimation_cost(scheme, n_est, n_k, dim, dim_v) + nqb * bq * (count + scheme.key_block) * per_col
    work += n_q * (2 * scheme.window + 1 if scheme.window else 0) * per_col
    return out, work / n_q
