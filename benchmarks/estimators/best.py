"""Block-centroid PPS sampling, the estimator the search found best at honest cost (issue 12).

Shape legend:  G groups (batch x heads)   Nq, Nk queries, keys   D, Dv head and value dims
               nqb query blocks   Bq queries per block   ng estimate groups (runs of consecutive blocks)
               C  sampled-or-exact columns per query block   W = 2 w + 1 window offsets

The scheme, per head (every step batched over G; no loop over heads or blocks):
1. `choose_query_order`: the queries are cut into blocks of Bq in token order or in LSH (Gray) order,
   whichever leaves the smaller within-block spread sum ||q_i - block mean||^2 (per head: positional
   heads of text models prefer token order, content heads and unordered sets the LSH order);
2. `plan_estimates` / `group_centroids`: consecutive blocks form ng groups, as many as
   ESTIMATE_SHARE of the budget pays for (one group per block at N = 512; fewer at large N, so the
   estimate stays a fixed share of the cost at any N); each group's centroid is its mean scaled query;
3. `column_importance`: one GEMM, centroids x keys: w_j = exp(<centroid, k_j> - max) ||[v_j, 1]||, a proxy
   of the group's column norm of D^-1 A times the value row norm (approximate matrix multiplication),
   0 on masked keys; `with_floor` mixes in FLOOR of uniform so every unmasked key keeps a chance;
4. `inclusion_probabilities`: capped PPS, pi_j = min(1, c w_j) with sum_j pi_j = C exactly: columns whose
   pi reaches 1 are computed exactly (attention sinks, as many as each group needs);
5. `systematic_sample`: every block draws its own C columns from its group's pi with ONE uniform
   (inverse CDF of the cumulative pi at u, u + 1, ..., u + C - 1): column j is drawn with probability
   exactly pi_j and never twice, so weight 1/pi_j makes every sum unbiased (Horvitz-Thompson);
6. `window_exclusion`: each query also computes its +-w token neighbours exactly (`window_logits`, shifted
   element-wise products in token order, no gather); a drawn column inside a query's window gets weight 0
   for that query, so nothing is counted twice.
The block's queries attend their C columns in one GEMM with the weights (1 exact, 1/pi sampled, 0 in the
window); numerator / normaliser is the ratio of two unbiased estimates (the output itself is a ratio
estimate: consistent, with a small bias measured in RESULTS.md).

Cost (`multiply_adds`, per head): ng Nk D [centroid logits] + Nk Dv [value-row norms]
+ nqb Bq C (D + Dv + 1) [block GEMMs] + Nq (2w + 1) (D + Dv + 1) [window] + 2 Nq D [block spreads of
the two orders]; hashing the queries
Nq D r (keys are not hashed: there is no key block) and the sort are on top.  `columns_for_budget` gives
the C that keeps the total within b (D + Dv + 1) per query.
Probabilities are computed in float32 from inputs cast to float32.

Porting into the core (winner.py shows the wiring end to end, in sparse form, checked against a dense
evaluation in test_best.py):
- random numbers: the LSH directions as today (draw_projections, queries only) and ONE uniform per query
  block, addressed by the block's index (e.g. Draws.uniform("pps", (nqb,))), mapped by inverse CDF in
  `systematic_sample`; nothing else is random;
- the block plan: blocks of Bq = Q_BLOCK sorted queries, no paired key block (measured: it costs more than
  it holds on MiniLM); if the core keeps one, pass its keys as not allowed (weight 0) -- the draws stay
  unbiased for the rest;
- masks: key_valid gives importance 0 (never drawn) and -inf window logits; a query mask goes to
  `block_centroids`/`block_spread` as row_valid; the window is for self-attention (Nq == Nk; bottom-right
  aligned otherwise) -- a caller may set it to -1 (none) for cross-attention;
- autograd: the plan (orders, pi, draws, weights) is a sampling design, made under no_grad; the block
  GEMMs and the window are differentiable in q, k, v;
- memory: pi is (G, ng, Nk) float32 with ng <= nqb (48 groups at N = 16384, D 64, b = 192: 3 MB a head);
  `systematic_sample` never forms a (G, nqb, Nk) tensor.
"""
from __future__ import annotations

import torch

Q_BLOCK = 32  # queries per block
WINDOW = 3  # exact +-w token neighbours of every query
ESTIMATE_SHARE = 1 / 8  # largest share of the budget the centroid estimates may take
FLOOR = 0.05  # share of each group's probability spread uniformly over its unmasked keys


# --------------------------------------------------------------------------- 1. blocks
def block_spread(q_blocks: torch.Tensor, row_valid: torch.Tensor | None = None) -> torch.Tensor:
    """sum over blocks and rows of ||q_i - block mean||^2.  q_blocks (G, nqb, Bq, D) -> (G,)."""
    centred = q_blocks.float() - block_centroids(q_blocks, row_valid).unsqueeze(2)
    sq = centred.square().sum(-1)  # (G, nqb, Bq)
    return (sq if row_valid is None else sq * row_valid).sum((1, 2))


def block_centroids(q_blocks: torch.Tensor, row_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean query of each block.  q_blocks (G, nqb, Bq, D), row_valid (G, nqb, Bq) -> (G, nqb, D)."""
    if row_valid is None:
        return q_blocks.float().mean(2)
    weight = row_valid.float().unsqueeze(-1)  # (G, nqb, Bq, 1)
    return (q_blocks.float() * weight).sum(2) / weight.sum(2).clamp_min(1.0)


def choose_query_order(spread_token: torch.Tensor, spread_lsh: torch.Tensor, token_order: torch.Tensor,
                       lsh_order: torch.Tensor) -> torch.Tensor:
    """Per head the order with the smaller block spread.  spreads (G,), orders (G, Nq) -> (G, Nq)."""
    return torch.where((spread_token <= spread_lsh).unsqueeze(-1), token_order, lsh_order)


# --------------------------------------------------------------------------- 2-3. estimates
def plan_estimates(num_q_blocks: int, n_queries: int, n_keys: int, dim: int, dim_v: int, budget: int,
                   share: float = ESTIMATE_SHARE) -> int:
    """ng: as many centroid estimates (Nk D multiply-adds each) as `share` of the budget pays, <= nqb."""
    affordable = int(share * n_queries * budget * (dim + dim_v + 1)) // max(1, n_keys * dim)
    return max(1, min(num_q_blocks, affordable))


def group_of_blocks(num_q_blocks: int, num_groups: int, device=None) -> torch.Tensor:
    """Group of each query block: consecutive runs, sizes differing by at most one.  # (nqb,)"""
    return torch.arange(num_q_blocks, device=device) * num_groups // num_q_blocks


def group_centroids(q_blocks: torch.Tensor, block_group: torch.Tensor, num_groups: int,
                    row_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean scaled query of each group.  q_blocks (G, nqb, Bq, D) -> (G, ng, D) float32."""
    groups, _, _, dim = q_blocks.shape
    weight = torch.ones(q_blocks.shape[:3], device=q_blocks.device) if row_valid is None else row_valid.float()
    sums = torch.zeros(groups, num_groups, dim, device=q_blocks.device)
    sums.index_add_(1, block_group, (q_blocks.float() * weight.unsqueeze(-1)).sum(2))
    counts = torch.zeros(groups, num_groups, device=q_blocks.device).index_add_(1, block_group, weight.sum(2))
    return sums / counts.clamp_min(1.0).unsqueeze(-1)


def column_importance(centroids: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      key_valid: torch.Tensor | None = None, temperature: float = 1.0) -> torch.Tensor:
    """w_j = exp(t <centroid, k_j> - max) ||[v_j, 1]||.  centroids (G, ng, D) scaled, key (G, Nk, D),
    value (G, Nk, Dv), key_valid (G, Nk) bool -> (G, ng, Nk) float32, 0 on masked keys."""
    logits = torch.bmm(centroids.float(), key.float().mT) * temperature  # (G, ng, Nk)
    if key_valid is not None:
        logits = logits.masked_fill(~key_valid.unsqueeze(1), float("-inf"))
    shift = logits.amax(-1, keepdim=True).clamp_min(-3e38)  # finite for a head with every key masked
    value_norm = (value.float().square().sum(-1) + 1).sqrt()  # (G, Nk)
    return torch.exp(logits - shift) * value_norm.unsqueeze(1)


def with_floor(weight: torch.Tensor, allowed: torch.Tensor | None = None, floor: float = FLOOR) -> torch.Tensor:
    """(1 - floor) w / sum w + floor / n on the n allowed keys; uniform where w has no mass.
    weight (G, ng, Nk), allowed bool broadcastable to it (e.g. key_valid.unsqueeze(1)) -> (G, ng, Nk)."""
    allowed = torch.ones_like(weight) if allowed is None else allowed.float().expand_as(weight)
    uniform = allowed / allowed.sum(-1, keepdim=True).clamp_min(1.0)
    total = weight.sum(-1, keepdim=True)
    shaped = torch.where(total > 0, weight / total.clamp_min(1e-30), uniform)
    return (1 - floor) * shaped + floor * uniform


# --------------------------------------------------------------------------- 4-5. sampling
def inclusion_probabilities(weight: torch.Tensor, count: int) -> torch.Tensor:
    """Capped PPS: pi = min(1, c w) with sum pi = min(count, #positive w).  (..., Nk) -> (..., Nk).

    c is found from the `count` largest weights: with w_(0) >= w_(1) >= ..., the first k for which
    (count - k) w_(k) <= sum_{j >= k} w_(j) leaves the k largest at pi = 1 and scales the rest.
    """
    n = min(count, weight.shape[-1])
    top = weight.topk(n, dim=-1).values  # (..., n) descending
    rest = weight.sum(-1, keepdim=True) - (top.cumsum(-1) - top)  # (..., n): sum of w_(k), w_(k+1), ...
    k = torch.arange(n, device=weight.device, dtype=weight.dtype)
    scale = (n - k) / rest.clamp_min(1e-30)  # (..., n) candidate c when the k largest are exact
    fits = scale * top <= 1 + 1e-6
    first = fits.to(torch.int8).argmax(-1, keepdim=True)  # (..., 1) smallest k that fits
    pi = (torch.gather(scale, -1, first) * weight).clamp_max(1.0)
    few = (weight > 0).sum(-1, keepdim=True) <= n  # no more positive weights than slots: all exact
    return torch.where(few, (weight > 0).to(weight.dtype), pi)


def systematic_sample(pi: torch.Tensor, count: int, uniform: torch.Tensor, block_group: torch.Tensor | None = None):
    """`count` columns per block from its group's pi with one uniform per block.

    pi (G, ng, Nk) with sum <= count; uniform (G, nqb) in [0, 1); block_group (nqb,) group of each block,
    consecutive runs (None: ng = nqb, one group per block).  Returns columns (G, nqb, C) int64, weights
    (G, nqb, C) = 1/pi (0 for a slot left empty or a column repeated by rounding), exact (G, nqb, C) bool.
    The inverse CDF is searched per group for all its blocks at once: no (G, nqb, Nk) tensor is formed.
    """
    groups, num_groups, n_keys = pi.shape
    nqb = uniform.shape[1]
    if block_group is None:
        block_group = torch.arange(nqb, device=pi.device)
    cum = pi.cumsum(-1)  # (G, ng, Nk)
    target = uniform.unsqueeze(-1) + torch.arange(count, device=pi.device, dtype=pi.dtype)  # (G, nqb, C)
    used = target < cum[..., -1][:, block_group].unsqueeze(-1)  # a group with fewer columns leaves slots empty
    slot = block_slot(block_group, num_groups)  # (nqb,) position of each block inside its group
    per_group = int(slot.max()) + 1
    grouped = target.new_zeros(groups, num_groups, per_group, count)
    grouped[:, block_group, slot] = torch.where(used, target, 0)  # (G, ng, bpg, C)
    found = torch.searchsorted(cum, grouped.view(groups, num_groups, -1), right=True)  # (G, ng, bpg*C)
    cols = found.view(groups, num_groups, per_group, count)[:, block_group, slot].clamp_max(n_keys - 1)
    repeat = torch.zeros_like(used)
    repeat[..., 1:] = cols[..., 1:] == cols[..., :-1]  # rounding can land twice in one pi = 1 interval
    keep = used & ~repeat
    p = group_values(pi, block_group, cols)  # (G, nqb, C)
    weights = torch.where(keep, 1.0 / p.clamp_min(1e-30), 0.0)
    return cols, weights, keep & (p >= 1.0)


def block_slot(block_group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Position of each block inside its (consecutive) group.  # (nqb,)"""
    first = torch.full((num_groups,), block_group.numel(), device=block_group.device, dtype=block_group.dtype)
    first.scatter_reduce_(0, block_group, torch.arange(block_group.numel(), device=block_group.device), "amin")
    return torch.arange(block_group.numel(), device=block_group.device) - first[block_group]


def group_values(pi: torch.Tensor, block_group: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """pi of each block's drawn columns, read from its group's row.  pi (G, ng, Nk), cols (G, nqb, C)."""
    n_keys = pi.shape[-1]
    flat = (block_group.view(1, -1, 1) * n_keys + cols).flatten(1)  # (G, nqb*C) into ng*Nk
    return torch.gather(pi.flatten(1), 1, flat).view_as(cols)


# --------------------------------------------------------------------------- 6. window
def window_key_index(n_queries: int, n_keys: int, window: int, device=None) -> torch.Tensor:
    """Key of each query's window offset, bottom-right aligned (query i ~ key i + Nk - Nq), -1 outside.
    -> (Nq, 2w+1) int64."""
    centre = torch.arange(n_queries, device=device).unsqueeze(-1) + (n_keys - n_queries)
    index = centre + torch.arange(-window, window + 1, device=device)  # (Nq, W)
    return torch.where((index >= 0) & (index < n_keys), index, -1)


def window_logits(q_scaled: torch.Tensor, key: torch.Tensor, window: int,
                  key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of each query's +-w window: shifted element-wise products, -inf outside or masked.
    q_scaled (G, Nq, D), key (G, Nk, D) -> (G, Nq, 2w+1); offset o of query i is key i + Nk - Nq + o."""
    groups, n_q, _ = q_scaled.shape
    n_k = key.shape[1]
    index = window_key_index(n_q, n_k, window, q_scaled.device)  # (Nq, W)
    out = q_scaled.new_full((groups, n_q, 2 * window + 1), float("-inf"))
    for slot in range(2 * window + 1):  # 2w+1 passes of Nq D multiply-adds, in token order
        rows = (index[:, slot] >= 0).nonzero().flatten()
        if rows.numel() == 0:
            continue
        keys = index[rows, slot]  # contiguous run of keys
        out[:, rows, slot] = (q_scaled[:, rows] * key[:, keys[0]: keys[-1] + 1]).sum(-1)
        if key_valid is not None:
            out[:, rows, slot] = out[:, rows, slot].masked_fill(~key_valid[:, keys[0]: keys[-1] + 1], float("-inf"))
    return out


def window_exclusion(q_tokens: torch.Tensor, cols: torch.Tensor, window: int, n_queries: int,
                     n_keys: int) -> torch.Tensor:
    """True where a block's column lies in a query's window (computed there, weight 0 in the block).
    q_tokens (G, nqb, Bq) token index, cols (G, nqb, C) key index -> (G, nqb, Bq, C) bool."""
    centre = (q_tokens + (n_keys - n_queries)).unsqueeze(-1)  # (G, nqb, Bq, 1)
    return (cols.unsqueeze(-2) - centre).abs() <= window


# --------------------------------------------------------------------------- cost
def is_exact(n_keys: int, budget: int) -> bool:
    """A budget of Nk columns per query pays for exact attention, which is then what runs."""
    return budget >= n_keys


def columns_for_budget(n_queries: int, n_keys: int, dim: int, dim_v: int, budget: int, *, q_block: int = Q_BLOCK,
                       window: int = WINDOW, share: float = ESTIMATE_SHARE) -> int:
    """C per block so that `multiply_adds` <= Nq b (D + Dv + 1) (at least 1); a budget >= Nk buys every
    column (exact attention, no estimate and no window needed: see `is_exact`)."""
    if is_exact(n_keys, budget):
        return n_keys
    nqb = -(-n_queries // q_block)
    bq = -(-n_queries // nqb)
    per_col = dim + dim_v + 1
    ng = plan_estimates(nqb, n_queries, n_keys, dim, dim_v, budget, share)
    fixed = ng * n_keys * dim + n_keys * dim_v + n_queries * (2 * window + 1) * per_col + 2 * n_queries * dim
    return max(1, min(n_keys, (n_queries * budget * per_col - fixed) // (nqb * bq * per_col)))


def multiply_adds(n_queries: int, n_keys: int, dim: int, dim_v: int, budget: int, *, q_block: int = Q_BLOCK,
                  window: int = WINDOW, share: float = ESTIMATE_SHARE) -> int:
    """Multiply-adds per head of the scheme at `budget` (hashing and sorting apart)."""
    if is_exact(n_keys, budget):
        return n_queries * n_keys * (dim + dim_v + 1)
    nqb = -(-n_queries // q_block)
    bq = -(-n_queries // nqb)
    per_col = dim + dim_v + 1
    ng = plan_estimates(nqb, n_queries, n_keys, dim, dim_v, budget, share)
    count = columns_for_budget(n_queries, n_keys, dim, dim_v, budget, q_block=q_block, window=window, share=share)
    return (ng * n_keys * dim + n_keys * dim_v + nqb * bq * count * per_col + n_queries * (2 * window + 1) * per_col
            + 2 * n_queries * dim)
