"""KDEformer attention: sort-LSH heavy blocks plus importance-sampled columns, in plain torch.

Shape legend (the caller's leading dims are flattened into one group dim G = B * H * ...):
    G   batch x heads        Nq  queries       Nk  keys         D  head dim      Dv  value dim
    r   hash bits (num_projs)  nb  blocks        Bk  key block slots (= bucket_size)
    Bq  query block length      s   samples per head

One function per step of the algorithm, in the order `kde_attention` calls them:
    draw_projections -> hash_codes -> bucket_ranks -> sort_by_bucket -> plan_blocks
    -> heavy_key_index -> sampling_probabilities (or kdeformer.sampling for "column_norm")
    -> draw_samples -> attend_block_columns (per chunk of query blocks) -> divide by D~, in token order
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._checks import (
    check_choice,
    check_generator,
    check_int,
    check_key_mask,
    check_positive_int,
    check_qkv,
    check_scale,
)
from . import sampling as colnorm
from ._inputs import working_dtype  # re-exported: the methods import it from here
from .trace import KDETrace

MAX_PROJS = 16
BUCKET_ORDERS = ("gray", "authors", "binary")
SAMPLINGS = ("value_norm", "uniform", "column_norm")


# --------------------------------------------------------------------------- step 1: hashing
def draw_projections(groups: int, dim: int, num_projs: int, *, dtype, device, generator) -> torch.Tensor:
    """r Gaussian hyperplane normals per head, shared by its queries and keys.  # (G, D, r)

    Drawn in float32 whatever the dtype, so one seed makes the same random choices in every dtype.
    """
    return torch.randn(groups, dim, num_projs, device=device, generator=generator).to(dtype)


def hash_codes(x: torch.Tensor, projections: torch.Tensor) -> torch.Tensor:
    """Angular LSH: bit i of a vector's code is 1 when it lies on the positive side of hyperplane i.

    x (G, N, D), projections (G, D, r) -> codes (G, N) int64 in [0, 2^r).
    """
    num_projs = projections.shape[-1]
    bits = (x @ projections) > 0  # (G, N, r)
    powers = 2 ** torch.arange(num_projs, device=x.device, dtype=torch.int64)  # (r,)
    return (bits.to(torch.int64) * powers).sum(-1)


def gray_code(n: torch.Tensor) -> torch.Tensor:
    """The n-th word of the reflected binary Gray sequence."""
    return n ^ (n >> 1)


def inverse_gray_code(g: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Position of code g in the Gray sequence (so that gray_code(inverse_gray_code(g)) == g)."""
    n = g.clone()
    shift = 1
    while shift < num_bits:
        n = n ^ (n >> shift)
        shift *= 2
    return n


def bucket_ranks(num_projs: int, order: str, device) -> torch.Tensor:
    """Sort key of every bucket code: table[code] = rank.  # (2^r,)

    "gray":    codes in Gray-sequence order, so buckets next to each other differ in exactly one bit.
    "authors": the authors' code sorts by gray_code(code); neighbours may differ in several bits.
    "binary":  plain numeric order of the codes (neighbours may differ in all bits).
    """
    codes = torch.arange(2**num_projs, device=device, dtype=torch.int64)
    if order == "gray":
        return inverse_gray_code(codes, num_projs)
    if order == "authors":
        return gray_code(codes)
    return codes


def sort_by_bucket(codes: torch.Tensor, ranks: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Stable sort of tokens by bucket rank; masked tokens go last.  codes (G, N) -> order (G, N)."""
    key = ranks[codes]  # (G, N)
    if valid is not None:
        key = torch.where(valid, key, ranks.numel())
    return torch.sort(key, dim=-1, stable=True).indices


# --------------------------------------------------------------------------- step 2: blocks
@dataclass
class BlockPlan:
    """How sorted queries and keys are cut into blocks (see `plan_blocks`)."""

    num_blocks: int  # nb = ceil(Nk / bucket_size): key blocks
    key_slots: int  # Bk = bucket_size, capped at Nk: slots per key block
    q_block_len: int  # Bq = ceil(Nq / nb)
    num_q_blocks: int  # ceil(Nq / Bq) <= nb
    key_block_len: torch.Tensor  # (G,) keys per block of each head: ceil(n_valid / nb) <= Bk
    pair: torch.Tensor  # (G, num_q_blocks) key block computed exactly for each query block


def plan_blocks(n_queries: int, n_keys: int, bucket_size: int, n_valid: torch.Tensor) -> BlockPlan:
    """Cut the sorted keys into nb = ceil(Nk / bucket_size) balanced blocks and the sorted queries into
    as many blocks of equal length; query block b is paired with key block b.

    With a key mask, each head cuts only its n_valid unmasked keys (blocks of ceil(n_valid / nb)), and
    when that leaves fewer non-empty key blocks than query blocks, query blocks are spread evenly over
    the non-empty ones, so every query sees at least one unmasked key exactly.
    """
    num_blocks = max(1, math.ceil(n_keys / bucket_size))
    key_slots = min(bucket_size, n_keys)
    q_block_len = math.ceil(n_queries / num_blocks)
    num_q_blocks = math.ceil(n_queries / q_block_len)
    key_block_len = (n_valid + num_blocks - 1) // num_blocks  # (G,)
    used_key_blocks = (n_valid + key_block_len - 1) // key_block_len  # (G,)
    q_block = torch.arange(num_q_blocks, device=n_valid.device)  # (num_q_blocks,)
    pair = (q_block * used_key_blocks.unsqueeze(-1)) // num_q_blocks  # (G, num_q_blocks)
    return BlockPlan(num_blocks, key_slots, q_block_len, num_q_blocks, key_block_len, pair)


def key_block_of_sorted(plan: BlockPlan, n_valid: torch.Tensor, n_keys: int) -> torch.Tensor:
    """Block index of each key in sorted order, -1 past the unmasked keys.  # (G, Nk)"""
    pos = torch.arange(n_keys, device=n_valid.device)  # (Nk,)
    block = pos // plan.key_block_len.unsqueeze(-1)  # (G, Nk)
    return torch.where(pos < n_valid.unsqueeze(-1), block, -1)


def heavy_key_index(plan: BlockPlan, k_order: torch.Tensor, n_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For every query block, the keys of its paired key block.

    Returns (index into keys, original order) (G, nqb, Bk) and its validity (G, nqb, Bk) bool.
    """
    offset = torch.arange(plan.key_slots, device=k_order.device)  # (Bk,)
    block_len = plan.key_block_len.view(-1, 1, 1)  # (G, 1, 1)
    sorted_pos = plan.pair.unsqueeze(-1) * block_len + offset  # (G, nqb, Bk)
    valid = (offset < block_len) & (sorted_pos < n_valid.view(-1, 1, 1))  # (G, nqb, Bk)
    sorted_pos = torch.where(valid, sorted_pos, 0)
    index = torch.gather(k_order, 1, sorted_pos.flatten(1)).view_as(sorted_pos)  # (G, nqb, Bk)
    return index, valid


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (G, N, C), index (G, ...) into dim N -> (G, ..., C), one flat index_select."""
    groups, n = x.shape[0], x.shape[1]
    flat = index + (torch.arange(groups, device=index.device) * n).view(-1, *([1] * (index.dim() - 1)))
    return x.reshape(groups * n, x.shape[-1]).index_select(0, flat.flatten()).view(*index.shape, x.shape[-1])


# --------------------------------------------------------------------------- step 3: sampling
def sampling_probabilities(value: torch.Tensor, valid: torch.Tensor | None, method: str) -> torch.Tensor:
    """Probability of drawing each key column.  value (G, Nk, Dv) -> probs (G, Nk), 0 on masked keys.

    "value_norm" (the authors' choice): p_j proportional to ||v~_j|| / ||V~||_F^2 + 1/n, with v~_j the
        value row with the ones column appended (so the normaliser is covered too), n unmasked keys.
    "uniform": p_j = 1/n.
    """
    groups, n_keys = value.shape[0], value.shape[1]
    if valid is None:
        n_valid = torch.full((groups, 1), n_keys, dtype=value.dtype, device=value.device)
    else:
        n_valid = valid.sum(-1, keepdim=True).to(value.dtype)
    if method == "uniform":
        weight = torch.ones(groups, n_keys, dtype=value.dtype, device=value.device)
    else:
        norm = colnorm.value_row_norms(value)  # (G, Nk): ||v~_j||
        if valid is not None:
            norm = norm * valid
        weight = norm / norm.square().sum(-1, keepdim=True) + 1.0 / n_valid
    if valid is not None:
        weight = weight * valid
    return weight / weight.sum(-1, keepdim=True)


def draw_samples(probs: torch.Tensor, num_samples: int, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """s key columns per head with replacement and their weights 1/(s p).  -> (G, s) int64, (G, s).

    Draws from float32 probabilities whatever the dtype, so one seed draws the same columns in every dtype.
    """
    index = torch.multinomial(probs.float(), num_samples, replacement=True, generator=generator)  # (G, s)
    weight = 1.0 / (num_samples * torch.gather(probs, 1, index))  # (G, s)
    return index, weight


# --------------------------------------------------------------------------- step 4: the two sums
# Work is done in chunks of about this many query rows: the temporaries stay in cache and below the
# allocator's mmap threshold (a fresh 30 MB buffer costs more in page faults than its exp).
CHUNK_ROWS = 4096


def attend_block_columns(
    q_blocks: torch.Tensor,
    k_cols: torch.Tensor,
    v_cols: torch.Tensor,
    col_weight: torch.Tensor,
    exact_valid: torch.Tensor | None,
):
    """Each query block against its columns (its key block, then its sampled keys) in one pass.

    q_blocks   (m, Bq, D)      sorted, padded, already scaled queries of m query blocks
    k_cols     (m, C, D)       C = E + s columns: E exact ones (the paired key block's Bk keys, then any
                               heavy columns), then the s sampled keys
    v_cols     (m, C, Dv)
    col_weight (m, C)          1 for exact columns (0 for a block key that is also a heavy column),
                               1/(s p) for kept samples, 0 for samples already computed exactly
    exact_valid (m, E) bool    False for padding slots (masked logits); None when all E hold real keys
    Returns shift (m, Bq), the shifted weighted terms P = exp(l - shift) * weight (m, Bq, C),
    numerator P @ V (m, Bq, Dv) and normaliser P @ 1 (m, Bq).

    The shift is the max over every column logit: a sample (or block key) given weight 0 is also an
    exact column of weight 1, so the max is attained by a weight-1 term and the normaliser is >= 1.
    """
    logits = torch.bmm(q_blocks, k_cols.mT)  # (m, Bq, C)
    if exact_valid is not None:
        logits[..., : exact_valid.shape[-1]].masked_fill_(~exact_valid.unsqueeze(-2), float("-inf"))
    shift = logits.amax(-1)  # (m, Bq); finite: each block holds an unmasked key
    terms = logits.sub_(shift.unsqueeze(-1)).exp_().mul_(col_weight.unsqueeze(-2))  # (m, Bq, C)
    numerator = torch.bmm(terms, v_cols)  # (m, Bq, Dv)
    normaliser = terms.sum(-1)  # (m, Bq)
    return shift, terms, numerator, normaliser


def chunk_ranges(groups: int, num_q_blocks: int, q_block_len: int):
    """Yield (g0, g1, b0, b1): either one head and a run of its query blocks, or whole heads."""
    blocks_per_chunk = max(1, CHUNK_ROWS // q_block_len)
    if blocks_per_chunk >= num_q_blocks:
        heads = max(1, blocks_per_chunk // num_q_blocks)
        for g0 in range(0, groups, heads):
            yield g0, min(groups, g0 + heads), 0, num_q_blocks
    else:
        for g0 in range(groups):
            for b0 in range(0, num_q_blocks, blocks_per_chunk):
                yield g0, g0 + 1, b0, min(num_q_blocks, b0 + blocks_per_chunk)


def flat_index(index: torch.Tensor, g0: int, n: int) -> torch.Tensor:
    """Row indices (g, ...) of heads g0.. into a (G * n, C) flattened tensor."""
    offsets = (torch.arange(index.shape[0], device=index.device) + g0) * n
    return (index + offsets.view(-1, *([1] * (index.dim() - 1)))).flatten()


# --------------------------------------------------------------------------- the function
def kde_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    bucket_size: int = 64,
    sample_size: int = 128,
    num_projs: int = 7,
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
    sampling: str = "value_norm",
    bucket_order: str = "gray",
    generator: torch.Generator | None = None,
    return_trace: bool = False,
    heavy_columns: int | None = None,
    estimate_rows: int | None = None,
):
    r"""KDEformer approximation of softmax(scale * query @ key^T) @ value.

    Shapes, like ``torch.nn.functional.scaled_dot_product_attention``::

        query (..., Nq, D)   key (..., Nk, D)   value (..., Nk, Dv)   ->   output (..., Nq, Dv)

    where ``...`` are any leading dims (batch, heads) shared by all three. Nq may differ from Nk
    (cross-attention), and neither needs to be a multiple of ``bucket_size``.

    Algorithm per head (Zandieh et al., ICML 2023, practical version):

    1. hash queries and keys with ``num_projs`` shared random hyperplanes (angular LSH);
    2. sort both by bucket, buckets in Gray order (``bucket_order``);
    3. cut sorted keys into ceil(Nk / bucket_size) blocks and sorted queries into as many; compute
       each query block against its key block exactly (the "heavy" block diagonal);
    4. draw ``sample_size`` key columns with replacement from ``sampling`` probabilities p, weight
       each by 1 / (s p), and add them for every query whose block does not already hold that key;
    5. the same pass gives the row sums D~ (the ones column of V~ = [V, 1]); output = numerator / D~.

    A reference in plain torch (exact when ``bucket_size >= Nk``)::

        A = exp(scale * Q @ K.T - m)                  # m: per-row shift, any value
        H = heavy entries (same block), C_j = count_j / (s p_j) for sampled columns
        out = ((A * H + A * ~H * C) @ V) / (A * H + A * ~H * C).sum(-1)

    Args:
        bucket_size: keys per block computed exactly (>= 1). ``bucket_size >= Nk`` gives exact attention.
        sample_size: key columns sampled per head (>= 1).
        num_projs: hash bits r, in [1, 16]; 2^r buckets.
        scale: logit scale, default 1/sqrt(D).
        key_mask: bool (..., Nk), broadcastable against the leading dims, **True = attend** (like SDPA's
            boolean ``attn_mask`` and Hugging Face's ``attention_mask``; the opposite of
            ``nn.MultiheadAttention``'s ``key_padding_mask``, hence the different name). Masked keys take
            no part in the blocks, the sampling or the normaliser. Every row needs one unmasked key.
        sampling: "value_norm" (authors': value-row norms mixed with uniform), "uniform", or
            "column_norm" (the theory's choice: estimated column norms of D^-1 A times value-row norms,
            drawn per group of query blocks; see :mod:`kdeformer.sampling` for the estimator and its cost).
        bucket_order: "gray" (true Gray order), "authors" (sort by gray(code), as the authors' code) or
            "binary".
        generator: a ``torch.Generator`` on the inputs' device; the same generator state gives the
            same output.
        return_trace: also return a :class:`KDETrace` of every intermediate step.
        heavy_columns: with "column_norm" only: how many of the ``sample_size`` columns each query pays
            for are spent on the group's largest estimated columns (attention sinks), computed exactly
            instead of sampled. Default ``sample_size // 4`` for "column_norm", 0 otherwise.
        estimate_rows: with "column_norm" only: queries per head whose attention rows are computed
            exactly to estimate the column norms. Default ceil(sample_size * Nq / (2 Nk)), i.e. at most
            half the sampling's multiply-adds.

    Half-precision inputs are computed in float32 and returned in their own dtype; logits are
    shifted by their per-row maximum before ``exp``, so any finite input gives a finite output.
    """
    lead, n_q, n_k, dim, dim_v = check_qkv(query, key, value)
    bucket_size = check_positive_int("bucket_size", bucket_size)
    sample_size = check_positive_int("sample_size", sample_size)
    num_projs = check_positive_int("num_projs", num_projs, maximum=MAX_PROJS)
    check_choice("sampling", sampling, SAMPLINGS)
    check_choice("bucket_order", bucket_order, BUCKET_ORDERS)
    if sampling == "column_norm":
        heavy_columns = sample_size // 4 if heavy_columns is None else heavy_columns
        heavy_columns = check_int("heavy_columns", heavy_columns, minimum=0, maximum=sample_size - 1)
        if estimate_rows is not None:
            estimate_rows = check_positive_int("estimate_rows", estimate_rows)
    else:
        for name, given in (("heavy_columns", heavy_columns), ("estimate_rows", estimate_rows)):
            if given not in (None, 0):
                raise ValueError(f"{name} needs sampling='column_norm' (it uses the estimated column norms), got sampling={sampling!r}")
        heavy_columns = 0
    num_draws = sample_size - heavy_columns  # the heavy columns are paid for out of sample_size
    heavy_columns = min(heavy_columns, n_k)  # (cannot pick more columns than there are keys)
    scale = check_scale(scale, dim)
    mask = check_key_mask(key_mask, lead, n_k, query.device)
    generator = check_generator(generator, query.device)

    out_dtype, dtype, device = query.dtype, working_dtype(query.dtype), query.device
    groups = math.prod(lead)
    q = query.reshape(groups, n_q, dim).to(dtype)  # (G, Nq, D)
    k = key.reshape(groups, n_k, dim).to(dtype)  # (G, Nk, D)
    v = value.reshape(groups, n_k, dim_v).to(dtype)  # (G, Nk, Dv)
    valid = None if mask is None else mask.reshape(groups, n_k)  # (G, Nk) bool
    n_valid = (
        torch.full((groups,), n_k, device=device, dtype=torch.int64) if valid is None else valid.sum(-1)
    )  # (G,)

    # 1-2. hash and sort (a negative scale flips which keys are "close": hash -q then)
    projections = draw_projections(groups, dim, num_projs, dtype=dtype, device=device, generator=generator)
    q_codes = hash_codes(q if scale >= 0 else -q, projections)  # (G, Nq)
    k_codes = hash_codes(k, projections)  # (G, Nk)
    ranks = bucket_ranks(num_projs, bucket_order, device)  # (2^r,)
    q_order = sort_by_bucket(q_codes, ranks, None)  # (G, Nq)
    k_order = sort_by_bucket(k_codes, ranks, valid)  # (G, Nk)

    # 3. blocks: query block b of a head computes its paired key block exactly
    plan = plan_blocks(n_q, n_k, bucket_size, n_valid)
    nqb, bq, bk = plan.num_q_blocks, plan.q_block_len, plan.key_slots
    q_pos = torch.arange(nqb * bq, device=device).clamp_max(n_q - 1)  # (Nq_padded,): pad = last query
    q_rows = q_order[:, q_pos].view(groups, nqb, bq)  # (G, nqb, Bq) token index of each sorted slot
    heavy_index, heavy_valid = heavy_key_index(plan, k_order, n_valid)  # (G, nqb, Bk) each

    # 4. sampling: per-group probabilities, heavy columns, draws, and which blocks skip which draws
    sorted_block = key_block_of_sorted(plan, n_valid, n_k)  # (G, Nk) block of each sorted position
    k_blocks = torch.empty_like(sorted_block).scatter_(1, k_order, sorted_block)  # (G, Nk) token order
    extras = {}
    if sampling == "column_norm":
        unmasked = torch.ones(groups, n_k, dtype=torch.bool, device=device) if valid is None else valid  # (G, Nk)
        rows_budget = estimate_rows or colnorm.default_estimate_rows(sample_size, n_q, n_k)
        num_groups, rows_per_group = colnorm.plan_sample_groups(nqb, rows_budget)
        block_group = colnorm.group_of_blocks(nqb, num_groups, device)  # (nqb,)
        est_pos = colnorm.draw_estimation_rows(
            groups, num_groups, rows_per_group, n_q, nqb, bq, generator, device
        )  # (G, ng, m) sorted positions
        est_rows = torch.gather(q_order, 1, est_pos.flatten(1))  # (G, R) token index
        row_sq, est_log_d = colnorm.estimate_column_norms(gather_rows(q, est_rows) * scale, k, valid)
        allowed = unmasked.unsqueeze(1).expand(groups, num_groups, n_k)  # (G, ng, Nk)
        if num_groups == nqb:  # one block per group: its own key block is exact, never draw from it
            allowed = allowed & (k_blocks.unsqueeze(1) != plan.pair.unsqueeze(-1))
        importance, group_norm = colnorm.column_norm_probabilities(row_sq, v, allowed, num_groups)
        if heavy_columns:
            heavy_cols, heavy_cols_valid = colnorm.pick_heavy_columns(importance, allowed, heavy_columns)
            extras.update(heavy_columns=heavy_cols, heavy_columns_valid=heavy_cols_valid)
            allowed = allowed.scatter(-1, heavy_cols, False)
            importance = importance * allowed
        empty = ~allowed.any(-1, keepdim=True)  # a group with nothing left to draw falls back to all keys
        group_probs = colnorm.mix_with_floor(importance, allowed | (empty & unmasked.unsqueeze(1)))
        extras.update(estimate_rows=est_rows, estimate_log_normalizer=est_log_d, group_column_norms=group_norm)
    else:
        num_groups, block_group = 1, torch.zeros(nqb, dtype=torch.long, device=device)
        group_probs = sampling_probabilities(v, valid, sampling).unsqueeze(1)  # (G, 1, Nk)
    samples, sample_weight = draw_samples(group_probs.flatten(0, 1), num_draws, generator)
    samples = samples.view(groups, num_groups, num_draws)  # (G, ng, s')
    sample_weight = sample_weight.view(groups, num_groups, num_draws)  # (G, ng, s')

    ones = torch.ones(groups, nqb, bk, dtype=dtype, device=device)  # (G, nqb, Bk) block slot weights
    if plan.num_blocks == 1 and not heavy_columns:
        col_index, col_weight = heavy_index, ones  # one block: every other column is already exact
    else:
        block_samples = samples[:, block_group]  # (G, nqb, s')
        kept = plan.pair.unsqueeze(-1) != torch.gather(k_blocks, 1, block_samples.flatten(1)).view_as(block_samples)
        parts_index, parts_weight = [heavy_index], [ones]
        if heavy_columns:
            block_heavy = heavy_cols[:, block_group]  # (G, nqb, h)
            block_heavy_valid = heavy_cols_valid[:, block_group]
            is_heavy = torch.zeros(groups, num_groups, n_k, dtype=torch.bool, device=device)
            is_heavy.scatter_(-1, heavy_cols, heavy_cols_valid)  # (G, ng, Nk) lookup table
            table = is_heavy.flatten(1)  # (G, ng * Nk)
            block_offset = (block_group * n_k).view(1, nqb, 1)  # row of each block's group in the table
            block_key_heavy = torch.gather(table, 1, (heavy_index + block_offset).flatten(1)).view_as(heavy_index)
            sample_heavy = torch.gather(table, 1, (block_samples + block_offset).flatten(1)).view_as(block_samples)
            parts_weight[0] = ones * ~block_key_heavy  # a block key that is a heavy column counts once
            kept = kept & ~sample_heavy
            parts_index.append(block_heavy)
            parts_weight.append(block_heavy_valid.to(dtype))
        parts_index.append(block_samples)
        parts_weight.append(sample_weight[:, block_group] * kept)
        col_index, col_weight = torch.cat(parts_index, -1), torch.cat(parts_weight, -1)  # (G, nqb, C)
    exact_valid = heavy_valid  # (G, nqb, Bk + h): which exactly computed columns hold a real key
    if heavy_columns:
        exact_valid = torch.cat([heavy_valid, heavy_cols_valid[:, block_group]], -1)
    if bool(exact_valid.all()):
        exact_valid = None  # no masking pass needed
    n_cols = col_index.shape[-1]  # C = Bk + h + s'
    n_exact = bk + heavy_columns  # columns computed exactly: the block and the heavy columns

    # 5. one shifted pass per chunk of query blocks, divided by the estimated normaliser and written
    #    straight back to token order
    q_flat, k_flat, v_flat = q.reshape(-1, dim), k.reshape(-1, dim), v.reshape(-1, dim_v)  # copies if strided
    out = torch.empty(groups * n_q, dim_v, dtype=dtype, device=device)  # (G*Nq, Dv) token order
    if return_trace:
        parts = {
            "log_normalizer": torch.empty(groups * n_q, 1, dtype=dtype, device=device),
            "heavy_fraction": torch.empty(groups * n_q, 1, dtype=dtype, device=device),
            "sampled_output": torch.zeros(groups * n_q, dim_v, dtype=dtype, device=device),
        }
    for g0, g1, b0, b1 in chunk_ranges(groups, nqb, bq):
        m = (g1 - g0) * (b1 - b0)  # query blocks in this chunk
        rows = flat_index(q_rows[g0:g1, b0:b1], g0, n_q)  # (m*Bq,)
        q_chunk = q_flat.index_select(0, rows).mul_(scale).view(m, bq, dim)  # scale before the matmul
        cols = flat_index(col_index[g0:g1, b0:b1], g0, n_k)  # (m*C,)
        v_cols = v_flat.index_select(0, cols).view(m, n_cols, dim_v)  # (m, C, Dv)
        shift, terms, numerator, normaliser = attend_block_columns(
            q_chunk,
            k_flat.index_select(0, cols).view(m, n_cols, dim),
            v_cols,
            col_weight[g0:g1, b0:b1].reshape(m, n_cols),
            None if exact_valid is None else exact_valid[g0:g1, b0:b1].reshape(m, n_exact),
        )
        out.index_copy_(0, rows, numerator.div_(normaliser.unsqueeze(-1)).view(-1, dim_v))
        if return_trace:
            parts["log_normalizer"].index_copy_(0, rows, (shift + normaliser.log()).view(-1, 1))
            heavy_den = terms[..., :n_exact].sum(-1)
            parts["heavy_fraction"].index_copy_(0, rows, (heavy_den / normaliser).view(-1, 1))
            if n_cols > n_exact:
                sampled = torch.bmm(terms[..., n_exact:], v_cols[:, n_exact:]) / normaliser.unsqueeze(-1)
                parts["sampled_output"].index_copy_(0, rows, sampled.view(-1, dim_v))
    out = out.view(*lead, n_q, dim_v)
    if not return_trace:
        return out.to(out_dtype)
    parts["heavy_output"] = out - parts["sampled_output"].view(*lead, n_q, dim_v)

    q_key_block = plan.pair.repeat_interleave(bq, dim=1)[:, :n_q]  # (G, Nq) in sorted order
    q_group = block_group.repeat_interleave(bq)[:n_q].expand(groups, n_q)  # (G, Nq) in sorted order
    extras = {name: t.view(*lead, *t.shape[1:]) for name, t in extras.items()}  # (G, ...) -> (..., ...)
    total_draws = num_groups * num_draws
    trace = KDETrace(
        query=query,
        key=key,
        scale=scale,
        key_mask=mask,
        projections=projections.view(*lead, dim, num_projs),
        q_buckets=q_codes.view(*lead, n_q),
        k_buckets=k_codes.view(*lead, n_k),
        q_order=q_order.view(*lead, n_q),
        k_order=k_order.view(*lead, n_k),
        q_blocks=torch.empty_like(q_key_block).scatter_(1, q_order, q_key_block).view(*lead, n_q),
        k_blocks=k_blocks.view(*lead, n_k),
        block_size=bucket_size,
        num_blocks=plan.num_blocks,
        key_block_len=plan.key_block_len.view(lead),
        sampled=samples.view(*lead, total_draws),
        probs=group_probs.mean(1).view(*lead, n_k),
        weights=sample_weight.view(*lead, total_draws),
        log_normalizer=parts["log_normalizer"].view(*lead, n_q),
        heavy_fraction=parts["heavy_fraction"].view(*lead, n_q),
        heavy_output=parts["heavy_output"],
        sampled_output=parts["sampled_output"].view(*lead, n_q, dim_v),
        sampling=sampling,
        bucket_order=bucket_order,
        q_groups=torch.empty_like(q_group).scatter_(1, q_order, q_group).view(*lead, n_q),
        group_probs=group_probs.view(*lead, num_groups, n_k),
        sample_group=torch.arange(num_groups, device=device).repeat_interleave(num_draws).expand(groups, -1).reshape(*lead, total_draws),
        num_groups=num_groups,
        extras=extras,
    )
    return out.to(out_dtype), trace
