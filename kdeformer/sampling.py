"""Sampling that follows the paper's theory: column norms of D^-1 A, estimated per group of query blocks.

The variance of the sampled part is smallest when key column j is drawn with probability proportional
to ||column j of D^-1 A|| * ||v~_j|| (approximate matrix multiplication). The squared column norm,
sum_i exp(2 <q_i, k_j>) / D_i^2, is a kernel density over the queries (kernel exp(2 <q, k>), weights
1 / D_i^2); we estimate it by sampling queries, i.e. a sampling-based KDE:

- every head draws R *estimation rows* (queries), stratified along the sorted query order, and
  computes their attention rows exactly: R x Nk logits (R * Nk * D multiply-adds), which also gives
  their exact D_i;
- query blocks are cut into groups (one group per block when R allows `min_rows` rows per block);
  a group's squared column norms are the mean of P_ij^2 over its own rows, mixed with the mean over
  all R rows (GLOBAL_MIX), times the value-row norms, with a uniform floor (UNIFORM_FLOOR) so every
  allowed column keeps a chance and the estimator stays unbiased;
- each group draws its own samples; when groups are single blocks, keys of the block's own key block
  get probability 0 (they are computed exactly anyway, so no draw is wasted);
- optionally the `heavy_columns` largest estimated columns of each group (attention sinks such as
  [CLS], [SEP] or punctuation in BERT) are computed exactly for the group's queries and removed from
  its sampling.

Default R = ceil(sample_size * Nq / (2 Nk)): the estimation costs at most half the sampling's
multiply-adds (R * Nk * D versus Nq * s * D), at any N.
"""
from __future__ import annotations

import math

import torch

GLOBAL_MIX = 0.3  # weight of the all-rows estimate in each group's column norms
UNIFORM_FLOOR = 0.1  # probability mass spread uniformly over the allowed columns
MIN_ROWS = 2  # fewest estimation rows a group is given (2 measured best on MiniLM at 32/64)


def plan_sample_groups(num_q_blocks: int, estimate_rows: int) -> tuple[int, int]:
    """Number of sampling groups and estimation rows per group.

    One group per query block when estimate_rows >= MIN_ROWS * blocks; otherwise consecutive blocks
    (similar buckets, thanks to the Gray order) share a group of MIN_ROWS rows.
    """
    rows_per_group = max(MIN_ROWS, estimate_rows // num_q_blocks)
    num_groups = max(1, min(num_q_blocks, estimate_rows // rows_per_group))
    return num_groups, rows_per_group


def group_of_blocks(num_q_blocks: int, num_groups: int, device) -> torch.Tensor:
    """Group index of each query block: consecutive runs of equal size.  # (nqb,)"""
    return torch.arange(num_q_blocks, device=device) * num_groups // num_q_blocks


def draw_estimation_rows(
    groups: int, num_groups: int, rows_per_group: int, n_queries: int, num_q_blocks: int, q_block_len: int,
    generator, device,
) -> torch.Tensor:
    """Sorted positions of the estimation rows: stratified inside each group's span.  # (G, ng, m)"""
    block_of_group_start = torch.arange(num_groups + 1, device=device) * num_q_blocks
    start = (block_of_group_start[:-1] + num_groups - 1) // num_groups * q_block_len  # first block of group
    end = ((block_of_group_start[1:] + num_groups - 1) // num_groups * q_block_len).clamp_max(n_queries)
    span = (end - start).clamp_min(1).to(torch.float32)  # (ng,)
    step = span / rows_per_group  # (ng,)
    jitter = torch.rand(groups, num_groups, rows_per_group, device=device, generator=generator)
    offsets = (torch.arange(rows_per_group, device=device) + jitter) * step.unsqueeze(-1)  # (G, ng, m)
    return (start.unsqueeze(-1) + offsets.long()).clamp_max(n_queries - 1)


def estimate_column_norms(
    q_est: torch.Tensor, k: torch.Tensor, valid: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared entries of the estimation rows of D^-1 A, and their exact log D.

    q_est (G, R, D) already scaled, k (G, Nk, D) -> P^2 (G, R, Nk), log D (G, R).
    """
    logits = q_est @ k.mT  # (G, R, Nk)
    if valid is not None:
        logits.masked_fill_(~valid.unsqueeze(1), float("-inf"))
    shift = logits.amax(-1, keepdim=True)  # (G, R, 1)
    rows = logits.sub_(shift).exp_()  # exp(l - shift), one pass
    den = rows.sum(-1, keepdim=True)  # (G, R, 1)
    return rows.div_(den).square_(), (shift + den.log()).squeeze(-1)


def value_row_norms(value: torch.Tensor) -> torch.Tensor:
    """||v~_j|| = ||[v_j, 1]||, the norm of each value row with the ones column appended.  (..., Nk)"""
    return torch.linalg.vector_norm(value, dim=-1).square_().add_(1.0).sqrt_()


def column_norm_probabilities(
    row_sq: torch.Tensor, value: torch.Tensor, allowed: torch.Tensor, num_groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group sampling importance from the estimated column norms.

    row_sq (G, ng*m, Nk) squared rows of D^-1 A, grouped; value (G, Nk, Dv); allowed (G, ng, Nk) bool.
    Returns importance (G, ng, Nk): estimated ||col_j|| * ||v~_j||, 0 where not allowed (it picks the
    heavy columns; `mix_with_floor` turns it into probabilities), and each group's estimated column
    norms (G, ng, Nk).
    """
    groups, rows, n_keys = row_sq.shape
    group_sq = row_sq.view(groups, num_groups, rows // num_groups, n_keys).mean(2)  # (G, ng, Nk)
    global_sq = row_sq.mean(1, keepdim=True)  # (G, 1, Nk)
    group_norm = group_sq.sqrt()
    global_norm = global_sq.sqrt()
    mixed = (1 - GLOBAL_MIX) * group_norm / group_norm.sum(-1, keepdim=True).clamp_min(1e-30)
    mixed = mixed + GLOBAL_MIX * global_norm / global_norm.sum(-1, keepdim=True).clamp_min(1e-30)
    importance = mixed * value_row_norms(value).unsqueeze(1) * allowed  # (G, ng, Nk)
    return importance, group_norm


def mix_with_floor(importance: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """(1 - floor) * importance / sum + floor * uniform over the allowed columns.  # (G, ng, Nk)

    A group with no importance left gets the uniform distribution over `allowed` (the caller widens
    `allowed` to every unmasked key when nothing else is left to draw).
    """
    allowed_f = allowed.to(importance.dtype)
    uniform = allowed_f / allowed_f.sum(-1, keepdim=True).clamp_min(1.0)
    total = importance.sum(-1, keepdim=True)
    shaped = torch.where(total > 0, importance / total.clamp_min(1e-300), uniform)
    return (1 - UNIFORM_FLOOR) * shaped + UNIFORM_FLOOR * uniform


def pick_heavy_columns(importance: torch.Tensor, allowed: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `count` largest-importance allowed columns of each group, and whether each is allowed.

    importance, allowed (G, ng, Nk) -> index (G, ng, h), valid (G, ng, h) bool.
    """
    score = torch.where(allowed, importance, -1.0)
    index = score.topk(count, dim=-1).indices  # (G, ng, h)
    return index, torch.gather(allowed, -1, index)


def default_estimate_rows(sample_size: int, n_queries: int, n_keys: int) -> int:
    """R so that estimating costs at most half the sampling: R * Nk <= Nq * s / 2."""
    return max(1, math.ceil(sample_size * n_queries / (2 * n_keys)))
