"""sampling="pps": block-centroid PPS sampling without replacement, with an exact token window.

The estimator the search of issue 12 found most accurate at honest cost (benchmarks/estimators/best.py
is its prototype; this is the core's version, with addressed draws and the trace's representation).
Per head (every step batched over the G heads):

1. `query_order`: the queries are cut into blocks of Bq in token order or in LSH (Gray) order of their
   angular hash, whichever leaves the smaller spread sum_i ||q_i - mean of its block||^2 (positional
   heads prefer token order, content heads and unordered sets the LSH order);
2. `group_centroids`: runs of consecutive blocks form ng groups, as many as ESTIMATE_SHARE of the budget
   pays for; each group's centroid is the mean of its scaled queries;
3. `column_importance`: one GEMM, centroids x keys: w_j = exp(<centroid, k_j> - max) ||[v_j, 1]|| (a
   proxy of the group's column norm of D^-1 A times the value-row norm, as approximate matrix
   multiplication asks), mixed with FLOOR of uniform so that every key keeps a chance;
4. `inclusion_probabilities`: capped PPS, pi_j = min(1, c w_j) with sum_j pi_j = C: the columns whose pi
   reaches 1 are computed exactly (attention sinks, as many as each group needs);
5. `systematic_sample`: every block draws C distinct columns from its group's pi with ONE addressed
   uniform u (the columns whose cumulative-pi interval holds u, u + 1, ..., u + C - 1): column j is in
   the sample with probability exactly pi_j, so weight 1/pi_j makes every sum unbiased (Horvitz-Thompson);
6. the window: each query also computes its +-w token neighbours (keys i + Nk - Nq + o, |o| <= w)
   exactly; a drawn column inside a query's window has weight 0 for that query (it counts once).
The output is numerator / normaliser of these sums: a ratio of two unbiased estimates (consistent; the
ratio has the small bias every self-normalised estimator has).

Knobs: the budget per query is b = bucket_size + sample_size key columns (what
`approximate("kdeformer", budget=b)` passes), spent honestly: the estimates, block GEMMs, window and
order spreads together cost at most b (D + Dv + 1) multiply-adds per query (`pps_multiply_adds`; hashing
the queries, Nq D r, is on top). b >= Nk computes every key exactly. Probabilities are computed in
float32 (pi and its cumulative sums in float64) from inputs cast to float32, detached from autograd, so
one seed draws the same columns in every dtype.

Shape legend: G heads, Nq / Nk queries / keys, D / Dv head / value dims, nqb query blocks of Bq slots,
ng estimate groups, C columns per block, W = 2 w + 1 window offsets.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

Q_BLOCK = 32  # queries per block up to LARGE_N queries (measured best at N = 512)
LARGE_N = 4096  # above it blocks grow with Nq (Bq = Q_BLOCK Nq / LARGE_N, at most MAX_Q_BLOCK): each block's
MAX_Q_BLOCK = 128  # C gathered key and value rows are then shared by more queries
FIT_ROWS = 2048  # queries (whole blocks, evenly spaced, at least one) whose spread decides the order
WINDOW = 3  # exact +-w token neighbours of every query (narrower at budgets below 8 (2 w + 1))
ESTIMATE_SHARE = 1 / 8  # largest share of the budget the centroid estimates may take
FLOOR = 0.05  # share of each group's probability spread uniformly over the keys
PLAN_ELEMENTS = 1 << 20  # heads are planned in chunks of at most this many (ng x Nk) entries
TOP_DEPTHS = (1, 16)  # capped PPS looks for its k among the 1, then 16, then all C largest weights


# --------------------------------------------------------------------------- layout and cost
@dataclass(frozen=True)
class PPSLayout:
    """Sizes of the scheme for one head, from the shapes and the budget alone."""

    q_block_len: int  # Bq
    num_q_blocks: int  # nqb = ceil(Nq / Bq)
    window: int  # w: offsets -w..w computed exactly; -1 for no window
    num_groups: int  # ng centroid estimates (0: value-row norms only, or uniform without value_weights)
    columns: int  # C columns per block
    exact: bool  # b >= Nk: every block holds every key
    value_weights: bool = True  # the value-row norms (Nk Dv) fit in the estimate share (else pi uniform)

    @property
    def window_len(self) -> int:
        """W = 2 w + 1 (0 without a window)."""
        return 2 * self.window + 1 if self.window >= 0 else 0


def pps_layout(n_queries: int, n_keys: int, dim: int, dim_v: int, budget: int) -> PPSLayout:
    """The sizes that keep `pps_multiply_adds` within budget * (D + Dv + 1) per query (C at least 1)."""
    num_q_blocks = math.ceil(n_queries / query_block_length(n_queries))
    q_block_len = math.ceil(n_queries / num_q_blocks)
    if budget >= n_keys:
        return PPSLayout(q_block_len, num_q_blocks, -1, 0, n_keys, True)
    window = min(WINDOW, (budget // 4 - 1) // 2)  # W <= b / 4
    per_col = dim + dim_v + 1
    total = n_queries * budget * per_col
    share = int(ESTIMATE_SHARE * total)
    num_groups = min(num_q_blocks, share // (n_keys * dim))
    values = n_keys * dim_v <= share  # few queries against many keys: not even the value norms are paid for
    layout = PPSLayout(q_block_len, num_q_blocks, window, num_groups, 1, False, values)
    free = total - fixed_multiply_adds(layout, n_queries, n_keys, dim, dim_v)
    columns = max(1, min(n_keys, free // (num_q_blocks * q_block_len * per_col)))
    return PPSLayout(q_block_len, num_q_blocks, window, num_groups, columns, False, values)


def query_block_length(n_queries: int) -> int:
    """Bq before balancing: Q_BLOCK, growing linearly above LARGE_N queries up to MAX_Q_BLOCK."""
    return max(Q_BLOCK, min(MAX_Q_BLOCK, Q_BLOCK * n_queries // LARGE_N))


def fit_rows(layout: PPSLayout, n_queries: int) -> int:
    """Queries whose block spread is measured per order (FIT_ROWS, in whole blocks)."""
    return min(n_queries, fit_blocks(layout) * layout.q_block_len)


def fit_blocks(layout: PPSLayout) -> int:
    """How many blocks (evenly spaced) the order choice measures."""
    return min(layout.num_q_blocks, max(1, FIT_ROWS // layout.q_block_len))


def fixed_multiply_adds(layout: PPSLayout, n_queries: int, n_keys: int, dim: int, dim_v: int) -> int:
    """Everything but the block GEMMs: centroid logits ng Nk D, value-row norms Nk Dv, the window
    Nq W (D + Dv + 1) and the two orders' block spreads (2 D per measured query)."""
    if layout.exact:
        return 0
    return (layout.num_groups * n_keys * dim + layout.value_weights * n_keys * dim_v
            + n_queries * layout.window_len * (dim + dim_v + 1) + 2 * fit_rows(layout, n_queries) * dim)


def pps_multiply_adds(n_queries: int, n_keys: int, dim: int, dim_v: int, budget: int) -> int:
    """Multiply-adds one head of the scheme performs: the fixed part plus nqb Bq C (D + Dv + 1)."""
    layout = pps_layout(n_queries, n_keys, dim, dim_v, budget)
    blocks = layout.num_q_blocks * layout.q_block_len * layout.columns * (dim + dim_v + 1)
    return fixed_multiply_adds(layout, n_queries, n_keys, dim, dim_v) + blocks


# --------------------------------------------------------------------------- 1. query blocks
def block_rows(order: torch.Tensor, layout: PPSLayout) -> torch.Tensor:
    """Token index of every block slot; the last block repeats its last query.  (G, Nq) -> (G, nqb, Bq)."""
    n_q = order.shape[-1]
    pos = torch.arange(layout.num_q_blocks * layout.q_block_len, device=order.device).clamp_max(n_q - 1)
    return order[:, pos].view(order.shape[0], layout.num_q_blocks, layout.q_block_len)


def block_sums(q_blocks: torch.Tensor, n_queries: int) -> torch.Tensor:
    """Sum of the real queries of each block (the last block's repeated slots removed).
    q_blocks (G, nqb, Bq, D) -> (G, nqb, D)."""
    sums = q_blocks.sum(2)
    repeats = q_blocks.shape[1] * q_blocks.shape[2] - n_queries
    if repeats:
        sums[:, -1] -= repeats * q_blocks[:, -1, -1]
    return sums


def block_counts(layout: PPSLayout, n_queries: int, device) -> torch.Tensor:
    """Real queries of each block.  # (nqb,)"""
    counts = torch.full((layout.num_q_blocks,), layout.q_block_len, device=device)
    counts[-1] = n_queries - (layout.num_q_blocks - 1) * layout.q_block_len
    return counts


def block_fit(q32: torch.Tensor, order: torch.Tensor, layout: PPSLayout) -> torch.Tensor:
    """sum_b ||sum of block b||^2 / n_b over `fit_blocks` evenly spaced blocks: the spread
    sum_i ||q_i - block mean||^2 is sum_i ||q_i||^2 minus this, so the order with the larger fit has the
    smaller spread.  q32 (G, Nq, D), order (G, Nq) -> (G,)."""
    n_q = q32.shape[1]
    rows = block_rows(order, layout)  # (G, nqb, Bq)
    chosen = torch.linspace(0, layout.num_q_blocks - 1, fit_blocks(layout), device=q32.device).long()
    counts = block_counts(layout, n_q, q32.device)[chosen]
    from .core import gather_rows

    blocks = gather_rows(q32, rows[:, chosen])  # (G, nf, Bq, D)
    sums = blocks.sum(2)
    last = chosen == layout.num_q_blocks - 1
    if bool(last.any()):  # the last block's repeated slots counted once
        sums[:, -1] -= (layout.num_q_blocks * layout.q_block_len - n_q) * blocks[:, -1, -1]
    return (sums.square().sum(-1) / counts).sum(-1)


def query_order(q32: torch.Tensor, lsh_order: torch.Tensor, layout: PPSLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head the order (token or LSH) whose blocks have the smaller spread.

    q32 (G, Nq, D), lsh_order (G, Nq) -> order (G, Nq), token_order (G,) bool.
    """
    token = torch.arange(q32.shape[1], device=q32.device).expand_as(lsh_order)
    use_token = block_fit(q32, token, layout) >= block_fit(q32, lsh_order, layout)  # (G,)
    return torch.where(use_token.unsqueeze(-1), token, lsh_order), use_token


def slot_of_tokens(order: torch.Tensor) -> torch.Tensor:
    """Slot of each query in the blocks cut from `order` (its position in the order).  (G, Nq) -> (G, Nq)."""
    position = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, position)


# --------------------------------------------------------------------------- 2-3. estimates
def group_of_blocks(num_q_blocks: int, num_groups: int, device=None) -> torch.Tensor:
    """Estimate group of each block: consecutive runs whose sizes differ by at most one.  # (nqb,)"""
    return torch.arange(num_q_blocks, device=device) * max(1, num_groups) // num_q_blocks


def group_centroids(q_blocks: torch.Tensor, layout: PPSLayout, n_queries: int, scale: float) -> torch.Tensor:
    """Mean scaled query of each group of consecutive blocks.  q_blocks (G, nqb, Bq, D) float32 -> (G, ng, D)."""
    sums = block_sums(q_blocks, n_queries)  # (G, nqb, D)
    block_group = group_of_blocks(layout.num_q_blocks, layout.num_groups, q_blocks.device)
    counts = block_counts(layout, n_queries, q_blocks.device)
    group_sums = sums.new_zeros(sums.shape[0], layout.num_groups, sums.shape[-1]).index_add_(1, block_group, sums)
    group_counts = counts.new_zeros(layout.num_groups).index_add_(0, block_group, counts)
    return group_sums * (scale / group_counts.unsqueeze(-1))


def column_importance(centroids: torch.Tensor | None, k32: torch.Tensor, value_norm: torch.Tensor) -> torch.Tensor:
    """Sampling weights with the floor, up to a factor per row: w_j + FLOOR / (1 - FLOOR) mean(w), i.e.
    proportional to (1 - FLOOR) w / sum w + FLOOR / Nk, with w_j = exp(<c, k_j> - max) ||v~_j||.

    centroids (G, ng, D) scaled (None: no estimate, w = ||v~||), k32 (G, Nk, D), value_norm (G, Nk)
    -> (G, ng or 1, Nk) float32, every entry > 0 (`inclusion_probabilities` scales each row).
    """
    if centroids is None:
        weight = value_norm.unsqueeze(1).clone()  # (G, 1, Nk)
    else:
        weight = torch.bmm(centroids, k32.mT)  # (G, ng, Nk)
        weight = weight.sub_(weight.amax(-1, keepdim=True)).exp_().mul_(value_norm.unsqueeze(1))
    return weight.add_(weight.mean(-1, keepdim=True) * (FLOOR / (1 - FLOOR)))


# --------------------------------------------------------------------------- 4-5. sampling
def inclusion_probabilities(weight: torch.Tensor, count: int) -> torch.Tensor:
    """Capped PPS: pi = min(1, c w) with sum pi = min(count, Nk).  (..., Nk) > 0 float32 -> (..., Nk) float32.

    With w_(0) >= w_(1) >= ..., the smallest k for which (count - k) w_(k) <= sum_{j >= k} w_(j) leaves
    the k largest at pi = 1 and scales the rest by c = (count - k) / sum_{j >= k} w_(j) (found in float64).
    """
    n_keys = weight.shape[-1]
    n = min(count, n_keys)
    if n == n_keys:
        return torch.ones_like(weight)
    rows = weight.reshape(-1, n_keys)  # (rows, Nk) a view
    total = weight.sum(-1, keepdim=True).double().reshape(-1, 1)  # (rows, 1)
    scale = total.new_empty(rows.shape[0], 1)  # (rows, 1) float64: c of each row
    pending = None  # rows whose k is not found yet (None: all)
    for depth in sorted({min(n, d) for d in TOP_DEPTHS} | {n}):  # most rows settle at k = 0 or a few sinks
        found, value = capped_scale(rows if pending is None else rows[pending],
                                    total if pending is None else total[pending], n, depth)
        if pending is None:
            pending = torch.arange(rows.shape[0], device=weight.device)
        scale[pending[found]] = value[found]
        pending = pending[~found]
        if not pending.numel():
            break
    return weight.mul_(scale.float().view(*weight.shape[:-1], 1)).clamp_max_(1.0)


def capped_scale(rows: torch.Tensor, total: torch.Tensor, n: int, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The search of `inclusion_probabilities` among the `depth` largest weights of each row.

    rows (r, Nk) float32, total (r, 1) float64 row sums -> found (r,) bool (the smallest fitting k is
    below depth; always at depth n, as k = n - 1 fits) and c (r, 1) float64 where found. The prefix of
    a descending top-n and of its float64 cumulative sum is the same at every depth, so c is the same
    number the full top-n search gives.
    """
    top = (rows.amax(-1, keepdim=True) if depth == 1 else rows.topk(depth, dim=-1).values).double()  # (r, depth)
    rest = total - (top.cumsum(-1) - top)  # sum of w_(k), w_(k+1), ...
    scale = (n - torch.arange(depth, device=rows.device, dtype=torch.float64)) / rest  # (r, depth)
    fits = scale * top <= 1 + 1e-6  # (r, depth)
    first = fits.to(torch.int8).argmax(-1, keepdim=True)  # the first fitting k (0 when none fits)
    found = fits.any(-1) if depth < n else torch.ones(rows.shape[0], dtype=torch.bool, device=rows.device)
    return found, torch.gather(scale, -1, first)


def block_slots(block_group: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, int]:
    """Position of each block inside its (consecutive) group, and the most blocks a group has.  # (nqb,)"""
    counts = torch.bincount(block_group, minlength=num_groups)  # (ng,)
    first = torch.cumsum(counts, 0) - counts  # (ng,) first block of each group
    return torch.arange(block_group.numel(), device=block_group.device) - first[block_group], int(counts.max())


def systematic_sample(pi: torch.Tensor, count: int, uniform: torch.Tensor, block_group: torch.Tensor):
    """`count` distinct columns per block from its group's pi with one uniform per block.

    pi (G, ng, Nk) float32, uniform (G, nqb) in (0, 1), block_group (nqb,) consecutive runs.
    Returns cols (G, nqb, C) int64, non-decreasing along C (an unused slot repeats the last used column),
    weights (G, nqb, C) float64 = 1/pi (0 for an unused slot) and exact (G, nqb, C) bool (pi = 1).
    One float64 cumulative sum runs over all groups of a head (group g starts where g - 1 ends), so a
    column's chance is its pi to float64 rounding and 1/pi is its exact weight; each group's targets
    are searched in its own row (a cache-sized search, not one over all groups).
    """
    groups, num_groups, n_keys = pi.shape
    cum = pi.to(torch.float64, copy=True).view(groups, -1).cumsum_(-1).view(groups, num_groups, n_keys)  # increasing, in place
    ends = cum[..., -1]  # (G, ng) where each group's interval ends
    start = torch.nn.functional.pad(ends[:, :-1], (1, 0))[:, block_group]  # (G, nqb) where each block's group starts
    target = (uniform + start).unsqueeze(-1) + torch.arange(count, device=pi.device, dtype=torch.float64)  # (G, nqb, C)
    used = target < ends[:, block_group].unsqueeze(-1)
    used[..., 0] = True  # u < 1 <= C: the first slot always holds a column (whatever the rounding of the total)
    slot, per_group = block_slots(block_group, num_groups)
    grouped = target.new_zeros(groups, num_groups, per_group, count)
    grouped[:, block_group, slot] = target  # (G, ng, bpg, C): each group's blocks side by side
    found = torch.searchsorted(cum, grouped.view(groups, num_groups, -1), right=True)  # (G, ng, bpg*C)
    cols = found.view(groups, num_groups, per_group, count)[:, block_group, slot].clamp_(0, n_keys - 1)
    used[..., 1:] &= cols[..., 1:] != cols[..., :-1]  # rounding can land twice in one pi = 1 interval
    last = cols.masked_fill(~used, -1).amax(-1, keepdim=True)  # (G, nqb, 1) slot 0 is always used
    cols = torch.where(used, cols, last)
    offsets = (block_group * n_keys).view(1, -1, 1)  # first flat index of each block's group
    p = torch.gather(pi.view(groups, -1), 1, (cols + offsets).flatten(1)).view_as(cols)
    return cols, torch.where(used, 1.0 / p.double(), 0.0), used & (p >= 1.0)


# --------------------------------------------------------------------------- the plan
@dataclass
class PPSPlan:
    """What the scheme decided for G heads (see `plan_pps`)."""

    layout: PPSLayout
    rows: torch.Tensor  # (G, nqb, Bq) token index of each block slot
    cols: torch.Tensor  # (G, nqb, C) key index of each block column, non-decreasing
    weights: torch.Tensor  # (G, nqb, C) float64: 1 exact, 1/pi sampled, 0 unused
    exact: torch.Tensor  # (G, nqb, C) bool: pi = 1
    order: torch.Tensor  # (G, Nq) the order the blocks were cut from
    token_order: torch.Tensor  # (G,) bool, blocks cut in token order
    q_codes: torch.Tensor  # (G, Nq) hash codes of the queries
    block_group: torch.Tensor  # (nqb,) estimate group of each block
    pi: torch.Tensor | None  # (G, ng, Nk) float32 inclusion probabilities (kept for the trace only)


def exact_columns(groups: int, n_keys: int, layout: PPSLayout, device) -> tuple:
    """b >= Nk: every block's columns are all keys, weight 1 (and pi = 1)."""
    cols = torch.arange(n_keys, device=device).expand(groups, layout.num_q_blocks, n_keys)
    ones = torch.ones(groups, layout.num_q_blocks, n_keys, dtype=torch.float64, device=device)
    return cols, ones, ones.bool(), torch.ones(groups, 1, n_keys, device=device)


def draw_block_columns(q32, k32, value_norm, rows, layout: PPSLayout, uniform, scale: float, keep_pi: bool) -> tuple:
    """Steps 2-5 for a chunk of heads: centroids, importance, pi, systematic draws.

    q32 (g, Nq, D), k32 (g, Nk, D), value_norm (g, Nk), rows (g, nqb, Bq), uniform (g, nqb) -> cols,
    weights, exact (g, nqb, C) and pi (g, ng, Nk) or None.
    """
    centroids = None
    if layout.num_groups:
        from .core import gather_rows

        centroids = group_centroids(gather_rows(q32, rows), layout, q32.shape[1], scale)  # (g, ng, D)
    pi = inclusion_probabilities(column_importance(centroids, k32, value_norm), layout.columns)  # (g, ng, Nk)
    block_group = group_of_blocks(layout.num_q_blocks, layout.num_groups, q32.device)
    cols, weights, exact = systematic_sample(pi, layout.columns, uniform, block_group)
    return cols, weights, exact, pi if keep_pi else None


def plan_pps(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, budget: int, q_codes, lsh_order,
             draws, keep_pi: bool = False) -> PPSPlan:
    """The scheme's column plan.  q (G, Nq, D), k (G, Nk, D), v (G, Nk, Dv) unscaled, working dtype;
    q_codes / lsh_order (G, Nq) the queries' hash codes and their Gray-order sort (`kdeformer.core`)."""
    groups, n_q, dim = q.shape
    n_k, dim_v = k.shape[1], v.shape[-1]
    layout = pps_layout(n_q, n_k, dim, dim_v, budget)
    q32 = q.detach().float()
    order, token_order = query_order(q32, lsh_order, layout)
    rows = block_rows(order, layout)  # (G, nqb, Bq)
    block_group = group_of_blocks(layout.num_q_blocks, layout.num_groups, q.device)  # (nqb,)
    plan = PPSPlan(layout, rows, None, None, None, order, token_order, q_codes, block_group, None)
    if layout.exact:
        plan.cols, plan.weights, plan.exact, plan.pi = exact_columns(groups, n_k, layout, q.device)
        return plan
    k32 = k.detach().float()
    value_norm = torch.linalg.vector_norm(v.detach().float(), dim=-1).square_().add_(1.0).sqrt_() \
        if layout.value_weights else torch.ones(groups, n_k, device=q.device)  # (G, Nk)
    uniform = draws.uniform("systematic", (layout.num_q_blocks,))  # (G, nqb) one per block
    step = max(1, PLAN_ELEMENTS // (max(1, layout.num_groups) * n_k))
    pieces = [draw_block_columns(q32[g0:g0 + step], k32[g0:g0 + step], value_norm[g0:g0 + step], rows[g0:g0 + step],
                                 layout, uniform[g0:g0 + step], scale, keep_pi) for g0 in range(0, groups, step)]
    plan.cols, plan.weights, plan.exact = (torch.cat([p[i] for p in pieces]) if len(pieces) > 1 else pieces[0][i]
                                           for i in range(3))
    plan.pi = torch.cat([p[3] for p in pieces]) if keep_pi else None
    return plan


# --------------------------------------------------------------------------- 6. the window
def window_keys(n_queries: int, n_keys: int, window: int, device=None) -> torch.Tensor:
    """Key of each query's window offset, bottom-right aligned (query i ~ key i + Nk - Nq), -1 outside.
    -> (Nq, W) int64."""
    centre = torch.arange(n_queries, device=device).unsqueeze(-1) + (n_keys - n_queries)
    index = centre + torch.arange(-window, window + 1, device=device)  # (Nq, W)
    return torch.where((index >= 0) & (index < n_keys), index, -1)


def window_slab(x: torch.Tensor, n_queries: int, window: int, r0: int, r1: int) -> tuple[torch.Tensor, bool]:
    """Rows i + Nk - Nq - w .. i + Nk - Nq + w of x for the queries r0..r1-1, zero-padded outside the keys.
    x (G, Nk, C) -> slab (G, R + 2w, C) (row o + i - r0 serves query i at offset o - w), padded or not."""
    n_k = x.shape[1]
    lo, hi = r0 + n_k - n_queries - window, r1 + n_k - n_queries + window
    start, end = min(max(lo, 0), n_k), min(max(hi, 0), n_k)
    slab = x[:, start:end]
    if start == lo and end == hi:
        return slab, False
    return torch.nn.functional.pad(slab, (0, 0, start - lo, hi - end)), True


def window_logits(q: torch.Tensor, k: torch.Tensor, scale: float, window: int, r0: int, r1: int) -> torch.Tensor:
    """Logits of the windows of queries r0..r1-1, -inf outside the keys: the queries against a sliding
    view of the keys (token order, no gather).  q (G, Nq, D) unscaled, k (G, Nk, D) -> (G, R, W)."""
    n_q, n_k, width = q.shape[1], k.shape[1], 2 * window + 1
    slab, padded = window_slab(k, n_q, window, r0, r1)  # (G, R + 2w, D)
    logits = (q[:, r0:r1].unsqueeze(-1) * slab.unfold(1, width, 1)).sum(-2) * scale  # (G, R, D, W) -> (G, R, W)
    if padded:
        keys = torch.arange(r0, r1, device=q.device).unsqueeze(-1) + (n_k - n_q) + torch.arange(-window, window + 1,
                                                                                                 device=q.device)
        logits = logits.masked_fill((keys < 0) | (keys >= n_k), float("-inf"))
    return logits


def window_values(terms: torch.Tensor, v: torch.Tensor, n_queries: int, window: int, r0: int,
                  inplace: bool) -> torch.Tensor:
    """sum_o terms[:, i, o] v[:, i + Nk - Nq + o] for the queries r0..r0+R-1.  terms (G, R, W) (0 outside
    the keys), v (G, Nk, Dv) -> (G, R, Dv); accumulated in place when autograd is not recording."""
    rows = terms.shape[1]
    slab, _ = window_slab(v, n_queries, window, r0, r0 + rows)  # (G, R + 2w, Dv)
    total = terms[..., :1] * slab[:, :rows]
    for slot in range(1, 2 * window + 1):
        if inplace:
            total.addcmul_(terms[..., slot:slot + 1], slab[:, slot:slot + rows])
        else:
            total = total + terms[..., slot:slot + 1] * slab[:, slot:slot + rows]
    return total


def window_positions(cols: torch.Tensor, centre: torch.Tensor, window: int, n_keys: int) -> tuple:
    """Where each query's window keys sit among its block's (non-decreasing) columns.

    cols (m, C), centre (m, Bq) key index i + Nk - Nq of each query -> positions (m, Bq, W) into C and
    hit (m, Bq, W) bool: the window key is one of the block's columns (its first occurrence).
    """
    keys = centre.unsqueeze(-1) + torch.arange(-window, window + 1, device=cols.device)  # (m, Bq, W)
    pos = torch.searchsorted(cols, keys.flatten(1)).view_as(keys).clamp_max_(cols.shape[-1] - 1)
    # every column lies in 0..Nk-1, so a window key equal to one is inside the keys (no bounds test)
    return pos, torch.gather(cols, 1, pos.flatten(1)).view_as(keys) == keys


# --------------------------------------------------------------------------- the trace
def trace_parts(plan: PPSPlan, dtype, n_keys: int) -> dict:
    """The trace's fields (G-leading) in its unified representation: block columns with their weights
    and exact flags, and each query's own exact columns (its window) in query_cols / query_weights."""
    layout, rows = plan.layout, plan.rows
    groups, nqb, n_cols = plan.cols.shape
    n_q = plan.order.shape[-1]
    device = rows.device
    row_block = slot_of_tokens(plan.order) // layout.q_block_len  # (G, Nq)
    keys = window_keys(n_q, n_keys, layout.window, device) if layout.window_len else \
        torch.zeros(n_q, 0, dtype=torch.int64, device=device)  # (Nq, W)
    sampled = plan.weights > 0
    drawn = sampled & ~plan.exact  # slots holding a random draw (pi < 1)
    slot_group = plan.block_group.view(1, -1, 1).expand(groups, nqb, n_cols)
    pi = plan.pi  # (G, ng, Nk)
    return {
        "row_block": row_block, "q_blocks": row_block, "q_groups": plan.block_group[row_block],
        "q_buckets": plan.q_codes, "q_order": plan.order,
        "k_blocks": torch.full((groups, n_keys), -1, dtype=torch.int64, device=device),
        "key_block_len": torch.full((groups,), n_cols, device=device),
        "num_blocks": 1 if layout.exact else nqb, "num_groups": pi.shape[1],
        "block_cols": plan.cols, "block_weights": plan.weights.to(dtype), "block_exact": plan.exact & sampled,
        "query_cols": keys.clamp_min(0).expand(groups, -1, -1), "query_weights": (keys >= 0).to(dtype).expand(groups, -1, -1),
        "sampled": plan.cols.flatten(1), "weights": plan.weights.flatten(1).to(dtype),
        "sample_group": torch.where(drawn, slot_group, -1).flatten(1),
        "group_probs": (pi / pi.sum(-1, keepdim=True)).to(dtype), "probs": (pi / pi.sum(-1, keepdim=True)).mean(1).to(dtype),
        "inclusion_probs": pi.to(dtype), "token_order": plan.token_order, "window": layout.window,
    }
