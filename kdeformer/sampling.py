"""The sampling schemes of kde_attention, behind one interface: which key columns each query block draws.

Every scheme answers `plan_sampling(...) -> SamplePlan`: the sampling groups (runs of query blocks that
share their draws), each group's probabilities over the keys, optional heavy columns computed exactly,
and the draws with their weights 1 / (s p). Probabilities are computed in float32 from the inputs cast
to float32 and drawn by inverse CDF from addressed uniforms (kdeformer.random), so one seed draws the
same columns in every dtype and for every batch size. They are detached from autograd.

"column_norm" follows the paper's theory: the variance of the sampled part is smallest
when key column j is drawn with probability proportional to ||column j of D^-1 A|| * ||v~_j||
(approximate matrix multiplication). The squared column norm, sum_i exp(2 <q_i, k_j>) / D_i^2, is a
kernel density over the queries; we estimate it by sampling queries, i.e. a sampling-based KDE:

- every head draws R *estimation rows* (queries), stratified along the sorted query order, and
  computes their attention rows exactly: R x Nk logits (R * Nk * D multiply-adds), which also gives
  their exact D_i;
- query blocks are cut into groups (one group per block when R allows `MIN_ROWS` rows per block);
  a group's squared column norms are the mean of P_ij^2 over its own rows, mixed with the mean over
  all R rows (GLOBAL_MIX), times the value-row norms, with a uniform floor (UNIFORM_FLOOR) so every
  allowed column keeps a chance and the estimator stays unbiased;
- each group draws its own samples; when groups are single blocks, keys of the block's own key block
  get probability 0 (they are computed exactly anyway, so no draw is wasted);
- the `heavy_columns` largest estimated columns of each group (attention sinks such as [CLS], [SEP] or
  punctuation in BERT) are computed exactly for the group's queries and removed from its sampling.

Default R = ceil(sample_size * Nq / (2 Nk)): the estimation costs at most half the sampling's
multiply-adds (R * Nk * D versus Nq * s * D), at any N.

"value_norm" is the authors' choice (value-row norms mixed with uniform, ignoring A); "uniform" is 1/n.

"pps" (kdeformer.pps: block-centroid PPS sampling without replacement) plans its own query blocks and
has no key blocks, so it is registered in OWN_PASS and `kdeformer.core.kde_unmasked` runs its own
attention pass (`kdeformer.core.kde_pps`); its knobs are the budget bucket_size + sample_size only.
Causal attention has no pps form yet: with is_causal=True, sampling="pps" runs the causal kernel's
"column_norm" (`resolve_sampling`; the trace records the scheme that ran).

To add a scheme: write its `plan_<name>` below, register it in SCHEMES (or OWN_PASS when it needs its
own attention pass), and give its options' check in `check_scheme_options`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import pps
from ._checks import check_int
from .random import Draws, inverse_cdf

SAMPLINGS = ("pps", "column_norm", "value_norm", "uniform")  # the default first
OWN_PASS = {"pps": pps.plan_pps}  # schemes that plan their own blocks and attention pass
GLOBAL_MIX = 0.3  # weight of the all-rows estimate in each group's column norms
UNIFORM_FLOOR = 0.1  # probability mass spread uniformly over the allowed columns
MIN_ROWS = 2  # fewest estimation rows a group is given (2 measured best on MiniLM at 32/64)


@dataclass
class SamplePlan:
    """What one scheme decided for G heads: groups of query blocks, probabilities, heavy columns, draws."""

    block_group: torch.Tensor  # (nqb,) sampling group of each query block
    probs: torch.Tensor  # (G, ng, Nk) float64, each group's distribution (0 on excluded keys)
    samples: torch.Tensor  # (G, ng, s') int64 drawn key indices
    weights: torch.Tensor  # (G, ng, s') float64, 1 / (s' p)
    heavy: torch.Tensor | None = None  # (G, ng, h) key indices computed exactly for the group
    heavy_valid: torch.Tensor | None = None  # (G, ng, h) bool
    extras: dict | None = None  # scheme-specific trace fields

    @property
    def num_groups(self) -> int:
        return self.probs.shape[1]

    def heavy_table(self) -> torch.Tensor:
        """(G, ng * Nk) bool lookup: is key j a heavy column of group g (row g * Nk + j)."""
        groups, ng, n_k = self.probs.shape
        table = torch.zeros(groups, ng, n_k, dtype=torch.bool, device=self.probs.device)
        return table.scatter_(-1, self.heavy, self.heavy_valid).view(groups, ng * n_k)

    def trace_parts(self, dtype) -> dict:
        """The trace's sampling fields (G-leading), probabilities in the working dtype."""
        groups, ng, draws = self.samples.shape
        parts = {
            "sampled": self.samples.reshape(groups, ng * draws),
            "weights": self.weights.reshape(groups, ng * draws).to(dtype),
            "sample_group": torch.arange(ng, device=self.samples.device).repeat_interleave(draws).expand(groups, -1),
            "probs": self.probs.mean(1).to(dtype),
            "group_probs": self.probs.to(dtype),
            "num_groups": ng,
        }
        if self.heavy is not None:
            parts.update(heavy_columns=self.heavy, heavy_columns_valid=self.heavy_valid)
        parts.update({name: t.to(dtype) if t.is_floating_point() else t for name, t in (self.extras or {}).items()})
        return parts


# --------------------------------------------------------------------------- options
def resolve_sampling(sampling: str, is_causal: bool) -> str:
    """The scheme that runs: causal attention has no "pps" form yet and runs "column_norm" instead."""
    return "column_norm" if is_causal and sampling in OWN_PASS else sampling


def check_scheme_options(sampling: str, sample_size: int, heavy_columns, estimate_rows) -> tuple[int, int | None]:
    """heavy_columns and estimate_rows resolved for the scheme (they belong to "column_norm" only)."""
    if sampling == "column_norm":
        heavy_columns = sample_size // 4 if heavy_columns is None else heavy_columns
        heavy_columns = check_int("heavy_columns", heavy_columns, minimum=0, maximum=sample_size - 1)
        if estimate_rows is not None:
            estimate_rows = check_int("estimate_rows", estimate_rows, minimum=1)
        return heavy_columns, estimate_rows
    for name, given in (("heavy_columns", heavy_columns), ("estimate_rows", estimate_rows)):
        if given not in (None, 0) or isinstance(given, bool):
            raise ValueError(
                f"{name} needs sampling='column_norm' (it uses the estimated column norms), got sampling={sampling!r}"
            )
    return 0, None


# --------------------------------------------------------------------------- shared steps
def value_row_norms(value: torch.Tensor) -> torch.Tensor:
    """||v~_j|| = ||[v_j, 1]||, the norm of each value row with the ones column appended.  (..., Nk)"""
    return torch.linalg.vector_norm(value, dim=-1).square().add(1.0).sqrt()


def draw_columns(probs: torch.Tensor, num_draws: int, draws: Draws) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """s' key columns per group with replacement by inverse CDF, and their weights 1 / (s' p).

    probs (G, ng, Nk) >= 0 (float32) -> index (G, ng, s') int64, weight (G, ng, s') float64, and the
    normalised distribution actually drawn from (G, ng, Nk) float64.
    """
    groups, ng, _ = probs.shape
    exact_probs = probs.to(torch.float64)  # (G, ng, Nk) a copy: normalised in place
    exact_probs = exact_probs.div_(exact_probs.sum(-1, keepdim=True))
    uniforms = draws.uniform("samples", (ng, num_draws))  # (G, ng, s') independent of Nk and the batch
    index = inverse_cdf(exact_probs, uniforms)
    weight = 1.0 / (num_draws * torch.gather(exact_probs, -1, index))
    return index, weight, exact_probs


def single_group(plan) -> torch.Tensor:
    return torch.zeros(plan.num_q_blocks, dtype=torch.long, device=plan.pair.device)


# --------------------------------------------------------------------------- value_norm / uniform
def plan_value_norm(q, k, v, *, scale, plan, q_order, k_blocks, opts, draws) -> SamplePlan:
    """The authors' probabilities: p_j proportional to ||v~_j|| / ||V~||_F^2 + 1/n, one group per head."""
    norm = value_row_norms(v.detach().float())  # (G, Nk)
    weight = norm / norm.square().sum(-1, keepdim=True) + 1.0 / v.shape[1]
    return finish_single_group(weight, plan, opts, draws)


def plan_uniform(q, k, v, *, scale, plan, q_order, k_blocks, opts, draws) -> SamplePlan:
    """p_j = 1/n, one group per head."""
    return finish_single_group(torch.ones(v.shape[0], v.shape[1], device=v.device), plan, opts, draws)


def finish_single_group(weight: torch.Tensor, plan, opts, draws) -> SamplePlan:
    """Draw one group's columns per head from unnormalised weights (G, Nk)."""
    samples, weights, probs = draw_columns(weight.unsqueeze(1), opts.num_draws, draws)
    return SamplePlan(single_group(plan), probs, samples, weights)


# --------------------------------------------------------------------------- column_norm
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


def draw_estimation_rows(num_groups: int, rows_per_group: int, n_queries: int, num_q_blocks: int,
                         q_block_len: int, draws: Draws) -> torch.Tensor:
    """Sorted positions of the estimation rows: stratified inside each group's span.  # (G, ng, m)"""
    device = draws.heads.device
    block_of_group_start = torch.arange(num_groups + 1, device=device) * num_q_blocks
    start = (block_of_group_start[:-1] + num_groups - 1) // num_groups * q_block_len  # first block of group
    end = ((block_of_group_start[1:] + num_groups - 1) // num_groups * q_block_len).clamp_max(n_queries)
    span = (end - start).clamp_min(1).to(torch.float64)  # (ng,)
    jitter = draws.uniform("estimation_rows", (num_groups, rows_per_group))  # (G, ng, m)
    offsets = (torch.arange(rows_per_group, device=device) + jitter) * (span / rows_per_group).unsqueeze(-1)
    return (start.unsqueeze(-1) + offsets.long()).clamp_max(n_queries - 1)


def estimate_column_norms(q_est: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared entries of the estimation rows of D^-1 A, and their exact log D.

    q_est (G, R, D) already scaled, k (G, Nk, D) -> P^2 (G, R, Nk), log D (G, R).
    """
    logits = q_est @ k.mT  # (G, R, Nk)
    shift = logits.amax(-1, keepdim=True)  # (G, R, 1)
    rows = logits.sub_(shift).exp_()  # exp(l - shift), one pass (no autograd: inputs are detached)
    den = rows.sum(-1, keepdim=True)  # (G, R, 1)
    return rows.div_(den).square_(), (shift + den.log()).squeeze(-1)


def column_norm_probabilities(row_sq: torch.Tensor, value: torch.Tensor, allowed: torch.Tensor,
                              num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group sampling importance from the estimated column norms.

    row_sq (G, ng*m, Nk) squared rows of D^-1 A, grouped; value (G, Nk, Dv); allowed (G, ng, Nk) bool.
    Returns importance (G, ng, Nk): estimated ||col_j|| * ||v~_j||, 0 where not allowed (it picks the
    heavy columns; `mix_with_floor` turns it into probabilities), and each group's estimated column
    norms (G, ng, Nk).
    """
    groups, rows, n_keys = row_sq.shape
    group_norm = row_sq.view(groups, num_groups, rows // num_groups, n_keys).mean(2).sqrt_()  # (G, ng, Nk)
    global_norm = row_sq.mean(1, keepdim=True).sqrt_()  # (G, 1, Nk)
    # in place on one fresh (G, ng, Nk) buffer, the same operations in the same order as
    # ((1 - mix) g / sum g + mix n / sum n) * ||v~|| * allowed
    importance = torch.mul(group_norm, 1 - GLOBAL_MIX).div_(group_norm.sum(-1, keepdim=True).clamp_min(1e-30))
    importance.add_(GLOBAL_MIX * global_norm / global_norm.sum(-1, keepdim=True).clamp_min(1e-30))
    importance.mul_(value_row_norms(value).unsqueeze(1)).mul_(allowed)  # (G, ng, Nk)
    return importance, group_norm


def mix_with_floor(importance: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """(1 - floor) * importance / sum + floor * uniform over the allowed columns.  # (G, ng, Nk)

    A group with no importance left gets the uniform distribution over `allowed`. `importance` is
    overwritten (the result is written into it).
    """
    uniform = allowed.to(importance.dtype)  # (G, ng, Nk) a fresh buffer, scaled in place
    uniform = uniform.div_(uniform.sum(-1, keepdim=True).clamp_min(1.0))
    total = importance.sum(-1, keepdim=True)  # (G, ng, 1)
    shaped = importance.div_(total.clamp_min(1e-30))
    if not bool((total > 0).all()):
        shaped = torch.where(total > 0, shaped, uniform)
    return shaped.mul_(1 - UNIFORM_FLOOR).add_(uniform.mul_(UNIFORM_FLOOR))


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


def column_norm_groups(opts, plan, n_queries: int, n_keys: int) -> tuple[int, int]:
    """(groups, estimation rows per group) for these settings."""
    rows_budget = opts.estimate_rows or default_estimate_rows(opts.sample_size, n_queries, n_keys)
    return plan_sample_groups(plan.num_q_blocks, rows_budget)


def plan_column_norm(q, k, v, *, scale, plan, q_order, k_blocks, opts, draws) -> SamplePlan:
    """Estimated column norms of D^-1 A per group of query blocks (see the module docstring)."""
    if plan.num_blocks == 1:  # one block holds every key: all is exact, nothing to estimate or draw from
        return plan_uniform(q, k, v, scale=scale, plan=plan, q_order=q_order, k_blocks=k_blocks, opts=opts,
                            draws=draws)
    groups, n_q, n_k = q.shape[0], q.shape[1], k.shape[1]
    q32, k32, v32 = q.detach().float(), k.detach().float(), v.detach().float()
    num_groups, rows_per_group = column_norm_groups(opts, plan, n_q, n_k)
    block_group = group_of_blocks(plan.num_q_blocks, num_groups, q.device)  # (nqb,)
    est_pos = draw_estimation_rows(num_groups, rows_per_group, n_q, plan.num_q_blocks, plan.q_block_len, draws)
    est_rows = torch.gather(q_order, 1, est_pos.flatten(1))  # (G, R) token index
    from .core import gather_rows

    row_sq, est_log_d = estimate_column_norms(gather_rows(q32, est_rows) * scale, k32)
    allowed = torch.ones(groups, num_groups, n_k, dtype=torch.bool, device=q.device)  # (G, ng, Nk)
    if num_groups == plan.num_q_blocks:  # one block per group: its own key block is exact, never draw from it
        allowed = allowed & (k_blocks.unsqueeze(1) != plan.pair.view(1, -1, 1))
    importance, group_norm = column_norm_probabilities(row_sq, v32, allowed, num_groups)
    heavy = heavy_valid = None
    heavy_count = min(opts.heavy_columns, n_k)
    if heavy_count:
        heavy, heavy_valid = pick_heavy_columns(importance, allowed, heavy_count)
        allowed = allowed.scatter(-1, heavy, False)
        importance = importance.mul_(allowed)
    empty = ~allowed.any(-1, keepdim=True)  # a group with nothing left to draw falls back to all keys
    samples, weights, probs = draw_columns(mix_with_floor(importance, allowed | empty), opts.num_draws, draws)
    extras = {"estimate_rows": est_rows, "estimate_log_normalizer": est_log_d, "group_column_norms": group_norm}
    return SamplePlan(block_group, probs, samples, weights, heavy, heavy_valid, extras)


def estimation_multiply_adds(opts, plan, n_queries: int, n_keys: int, dim: int) -> int:
    """Multiply-adds of a scheme's own estimation work (column_norm: R x Nk logits; others: none)."""
    if opts.sampling != "column_norm" or plan.num_blocks == 1:  # one block: no estimate is made
        return 0
    num_groups, rows_per_group = column_norm_groups(opts, plan, n_queries, n_keys)
    return num_groups * rows_per_group * n_keys * dim


SCHEMES = {"column_norm": plan_column_norm, "value_norm": plan_value_norm, "uniform": plan_uniform}


def plan_sampling(q, k, v, *, scale, plan, q_order, k_blocks, opts, draws) -> SamplePlan:
    """Run the scheme `opts.sampling` for G heads.  q (G, Nq, D), k (G, Nk, D), v (G, Nk, Dv)."""
    return SCHEMES[opts.sampling](q, k, v, scale=scale, plan=plan, q_order=q_order, k_blocks=k_blocks,
                                  opts=opts, draws=draws)
