"""The winning scheme end to end, in sparse form, from the functions of `best` (what the core will run).

`plan` makes the column plan (orders, blocks, estimates, draws); `attend` computes the output from it:
one GEMM per query block over its C columns plus the +-w window, merged under one per-query shift.
The harness measures this code (variant "best"), and `plan_factor` turns a plan into the dense factor
W so that the tests can check sparse == dense and the unbiasedness of the draws.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kdeformer.core import bucket_ranks, draw_projections, gather_rows, hash_codes, sort_by_bucket

from . import best
from .dense import block_factor, query_factor, with_window


@dataclass
class Plan:
    rows: torch.Tensor  # (G, nqb, Bq) token index of each block slot (the last block padded by repetition)
    cols: torch.Tensor  # (G, nqb, C) key index of each block's columns
    weights: torch.Tensor  # (G, nqb, C) 1 exact, 1/pi sampled, 0 empty
    exact: torch.Tensor  # (G, nqb, C) bool, pi = 1
    window: int
    block_group: torch.Tensor  # (nqb,) estimate group of each block
    pi: torch.Tensor  # (G, ng, Nk) inclusion probabilities of each group


def lsh_query_order(q: torch.Tensor, num_projs: int, generator) -> torch.Tensor:
    """The core's SimHash of the queries only, sorted in Gray order.  -> (G, Nq)."""
    proj = draw_projections(q.shape[0], q.shape[-1], num_projs, dtype=q.dtype, device=q.device, generator=generator)
    return sort_by_bucket(hash_codes(q, proj), bucket_ranks(num_projs, "gray", q.device), None)


def cut_blocks(order: torch.Tensor, q_block: int) -> torch.Tensor:
    """Balanced blocks of an order, the last padded with its last query.  (G, Nq) -> (G, nqb, Bq)."""
    n_q = order.shape[1]
    nqb = -(-n_q // q_block)
    bq = -(-n_q // nqb)
    pos = torch.arange(nqb * bq, device=order.device).clamp_max(n_q - 1)
    return order[:, pos].view(order.shape[0], nqb, bq)


@torch.no_grad()
def plan(q_scaled, key, value, budget: int, generator, *, key_valid=None, q_block=best.Q_BLOCK,
         window=best.WINDOW, share=best.ESTIMATE_SHARE, num_projs: int = 7, temperature: float = 1.0) -> Plan:
    """Column plan of the scheme for (G, Nq, D) scaled queries, (G, Nk, D) keys, (G, Nk, Dv) values.

    The plan is the sampling design: it is made without autograd (its probabilities are constants of the
    draw, so the Horvitz-Thompson weights 1/pi carry no gradient); `attend` is differentiable in q, k, v.
    """
    groups, n_q, dim = q_scaled.shape
    n_k, dim_v = key.shape[1], value.shape[-1]
    token = torch.arange(n_q, device=q_scaled.device).expand(groups, -1)  # (G, Nq)
    lsh = lsh_query_order(q_scaled, num_projs, generator)
    spread_token, spread_lsh = (best.block_spread(gather_rows(q_scaled, cut_blocks(o, q_block))) for o in (token, lsh))
    rows = cut_blocks(best.choose_query_order(spread_token, spread_lsh, token, lsh), q_block)  # (G, nqb, Bq)
    nqb = rows.shape[1]
    num_groups = best.plan_estimates(nqb, n_q, n_k, dim, dim_v, budget, share)
    block_group = best.group_of_blocks(nqb, num_groups, q_scaled.device)
    centroids = best.group_centroids(gather_rows(q_scaled, rows), block_group, num_groups)  # (G, ng, D)
    importance = best.column_importance(centroids, key, value, key_valid, temperature)  # (G, ng, Nk)
    probs = best.with_floor(importance, None if key_valid is None else key_valid.unsqueeze(1))
    count = best.columns_for_budget(n_q, n_k, dim, dim_v, budget, q_block=q_block, window=window, share=share)
    if best.is_exact(n_k, budget):
        window = -1  # every column is in the block: no window (an empty +-w band)
    pi = best.inclusion_probabilities(probs, count)  # (G, ng, Nk)
    uniform = torch.rand(groups, nqb, generator=generator, device=q_scaled.device)  # one per block
    cols, weights, exact = best.systematic_sample(pi, count, uniform, block_group)
    return Plan(rows, cols, weights, exact, window, block_group, pi)


def attend(q_scaled, key, value, p: Plan, key_valid=None) -> torch.Tensor:
    """Output (G, Nq, Dv) of a plan: block GEMMs over the drawn columns plus the exact window."""
    groups, n_q, _ = q_scaled.shape
    n_k = key.shape[1]
    q_blocks = gather_rows(q_scaled.float(), p.rows)  # (G, nqb, Bq, D)
    k_cols, v_cols = gather_rows(key.float(), p.cols), gather_rows(value.float(), p.cols)  # (G, nqb, C, .)
    weight = p.weights.unsqueeze(-2) * ~best.window_exclusion(p.rows, p.cols, p.window, n_q, n_k)  # (G, nqb, Bq, C)
    logits = (q_blocks @ k_cols.mT).masked_fill(weight <= 0, float("-inf"))  # (G, nqb, Bq, C)
    if p.window < 0:  # exact budget: every column is in the block
        shift = logits.amax(-1, keepdim=True)
        terms = torch.exp(logits - shift) * weight
        num, den = terms @ v_cols, terms.sum(-1, keepdim=True)
    else:
        num, den = with_window_part(q_scaled, key, value, p, logits, weight, v_cols, key_valid)
    out = torch.empty(groups, n_q, value.shape[-1], device=q_scaled.device)
    out.scatter_(1, p.rows.flatten(1).unsqueeze(-1).expand(-1, -1, out.shape[-1]), (num / den).flatten(1, 2))
    return out


def with_window_part(q_scaled, key, value, p: Plan, logits, weight, v_cols, key_valid):
    """Numerator (G, nqb, Bq, Dv) and normaliser (G, nqb, Bq, 1) of the block columns plus the window,
    both under one per-query shift (the max over every used logit)."""
    groups, n_q, _ = q_scaled.shape
    n_k = key.shape[1]
    win = gather_rows(best.window_logits(q_scaled.float(), key.float(), p.window, key_valid), p.rows)  # (G, nqb, Bq, W)
    shift = torch.maximum(logits.amax(-1), win.amax(-1)).clamp_min(-3e38).unsqueeze(-1)  # (G, nqb, Bq, 1)
    terms = torch.exp(logits - shift) * weight
    win_terms = torch.exp(win - shift)  # (G, nqb, Bq, W)
    index = best.window_key_index(n_q, n_k, p.window, q_scaled.device)  # (Nq, W)
    v_win = gather_rows(value.float(), index.clamp_min(0).expand(groups, -1, -1))  # (G, Nq, W, Dv)
    v_win = gather_rows(v_win.flatten(2), p.rows).unflatten(-1, (index.shape[1], -1))  # (G, nqb, Bq, W, Dv)
    num = terms @ v_cols + (win_terms.unsqueeze(-2) @ v_win).squeeze(-2)  # (G, nqb, Bq, Dv)
    return num, terms.sum(-1, keepdim=True) + win_terms.sum(-1, keepdim=True)


def plan_factor(p: Plan, n_q: int, n_k: int) -> torch.Tensor:
    """The dense factor W (G, Nq, Nk) of a plan: 1 in the window, 1/pi on drawn columns, else 0."""
    return with_window(query_factor(block_factor(n_k, p.cols, p.weights), p.rows, n_q), p.window)


def best_attention(q, k, v, scale: float, budget: int, seed: int, **options):
    """The scheme on (G, N, D) float32 inputs.  -> output (G, Nq, Dv), multiply-adds per query."""
    generator = torch.Generator().manual_seed(seed)
    q_s = q.float() * scale
    p = plan(q_s, k.float(), v.float(), budget, generator, **options)
    n_q, n_k, dim, dim_v = q.shape[1], k.shape[1], q.shape[2], v.shape[2]
    keep = {name: options[name] for name in ("q_block", "window", "share") if name in options}
    work = best.multiply_adds(n_q, n_k, dim, dim_v, budget, **keep)
    return attend(q_s, k, v, p), work / n_q
