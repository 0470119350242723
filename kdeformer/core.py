"""KDEformer attention: sort-LSH heavy blocks plus importance-sampled columns, in plain torch.

Shape legend (the caller's leading dims are flattened into one group dim G = B * H * ...):
    G   batch x heads        Nq  queries       Nk  keys         D  head dim      Dv  value dim
    r   hash bits (num_projs)  nb  blocks        Bk  key block slots (= bucket_size)
    Bq  query block length      s   samples per head

One function per step of the algorithm, in the order `kde_attention` calls them:
    draw_projections -> hash_codes -> bucket_ranks -> sort_by_bucket -> plan_blocks
    -> gather_heavy_blocks -> sampling_probabilities -> draw_samples
    -> heavy_and_sampled_sums -> (divide by the normaliser) -> unsort_queries
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._checks import (
    check_choice,
    check_generator,
    check_key_mask,
    check_positive_int,
    check_qkv,
    check_scale,
)
from .trace import KDETrace

MAX_PROJS = 16
BUCKET_ORDERS = ("gray", "authors", "binary")
SAMPLINGS = ("value_norm", "uniform")


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half types are computed in float32 (exp and sums need the range); float32/64 stay as they are."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# --------------------------------------------------------------------------- step 1: hashing
def draw_projections(groups: int, dim: int, num_projs: int, *, dtype, device, generator) -> torch.Tensor:
    """r Gaussian hyperplane normals per head, shared by its queries and keys.  # (G, D, r)"""
    return torch.randn(groups, dim, num_projs, dtype=dtype, device=device, generator=generator)


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
        sq_norm = value.pow(2).sum(-1) + 1.0  # (G, Nk): ||v~_j||^2
        if valid is not None:
            sq_norm = sq_norm * valid
        weight = sq_norm.sqrt() / sq_norm.sum(-1, keepdim=True) + 1.0 / n_valid
    if valid is not None:
        weight = weight * valid
    return weight / weight.sum(-1, keepdim=True)


def draw_samples(probs: torch.Tensor, num_samples: int, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """s key columns per head with replacement and their weights 1/(s p).  -> (G, s) int64, (G, s)."""
    index = torch.multinomial(probs, num_samples, replacement=True, generator=generator)  # (G, s)
    weight = 1.0 / (num_samples * torch.gather(probs, 1, index))  # (G, s)
    return index, weight


# --------------------------------------------------------------------------- step 4: the two sums
def heavy_and_sampled_sums(
    q_blocks: torch.Tensor,
    k_heavy: torch.Tensor,
    v_heavy: torch.Tensor,
    heavy_valid: torch.Tensor,
    k_samples: torch.Tensor | None,
    v_samples: torch.Tensor | None,
    sample_weight: torch.Tensor | None,
    sample_kept: torch.Tensor | None,
):
    """Numerators and normalisers of both parts, shifted by one per-query max so nothing overflows.

    q_blocks  (G, nqb, Bq, D)  sorted, padded, already scaled queries
    k_heavy   (G, nqb, Bk, D), v_heavy (G, nqb, Bk, Dv), heavy_valid (G, nqb, Bk)
    k_samples (G, s, D), v_samples (G, s, Dv), sample_weight (G, s), sample_kept (G, nqb, s) bool
    Returns shift (G, nqb, Bq), heavy_num (G, nqb, Bq, Dv), heavy_den (G, nqb, Bq),
            sampled_num, sampled_den (same shapes, or None without samples).
    """
    neg_inf = float("-inf")
    heavy_logits = q_blocks @ k_heavy.mT  # (G, nqb, Bq, Bk)
    heavy_logits.masked_fill_(~heavy_valid.unsqueeze(-2), neg_inf)
    shift = heavy_logits.amax(-1)  # (G, nqb, Bq); finite: each block holds an unmasked key
    sampled_logits = None
    if k_samples is not None:
        groups, nqb, bq, dim = q_blocks.shape
        sampled_logits = (q_blocks.view(groups, nqb * bq, dim) @ k_samples.mT).view(groups, nqb, bq, -1)
        sampled_logits.masked_fill_(~sample_kept.unsqueeze(-2), neg_inf)  # (G, nqb, Bq, s)
        shift = torch.maximum(shift, sampled_logits.amax(-1))
    heavy_logits.sub_(shift.unsqueeze(-1)).exp_()  # now exp(l - shift), 0 where masked
    heavy_num = heavy_logits @ v_heavy  # (G, nqb, Bq, Dv)
    heavy_den = heavy_logits.sum(-1)  # (G, nqb, Bq)
    if sampled_logits is None:
        return shift, heavy_num, heavy_den, None, None
    sampled_logits.sub_(shift.unsqueeze(-1)).exp_().mul_(sample_weight.view(groups, 1, 1, -1))
    sampled_num = (sampled_logits.view(groups, nqb * bq, -1) @ v_samples).view(groups, nqb, bq, -1)
    sampled_den = sampled_logits.sum(-1)
    return shift, heavy_num, heavy_den, sampled_num, sampled_den


def unsort_queries(x_sorted: torch.Tensor, q_order: torch.Tensor) -> torch.Tensor:
    """Put rows computed in sorted (padded) query order back in token order.

    x_sorted (G, Nq_padded, C), q_order (G, Nq) -> (G, Nq, C).
    """
    inverse = torch.empty_like(q_order)
    inverse.scatter_(1, q_order, torch.arange(q_order.shape[1], device=q_order.device).expand_as(q_order))
    return gather_rows(x_sorted, inverse)


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
        sampling: "value_norm" (authors': value-row norms mixed with uniform) or "uniform".
        bucket_order: "gray" (true Gray order), "authors" (sort by gray(code), as the authors' code) or
            "binary".
        generator: a ``torch.Generator`` on the inputs' device; the same generator state gives the
            same output.
        return_trace: also return a :class:`KDETrace` of every intermediate step.

    Half-precision inputs are computed in float32 and returned in their own dtype; logits are
    shifted by their per-row maximum before ``exp``, so any finite input gives a finite output.
    """
    lead, n_q, n_k, dim, dim_v = check_qkv(query, key, value)
    bucket_size = check_positive_int("bucket_size", bucket_size)
    sample_size = check_positive_int("sample_size", sample_size)
    num_projs = check_positive_int("num_projs", num_projs, maximum=MAX_PROJS)
    check_choice("sampling", sampling, SAMPLINGS)
    check_choice("bucket_order", bucket_order, BUCKET_ORDERS)
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

    # 3. blocks: padded sorted queries and, per query block, the keys of its paired key block
    plan = plan_blocks(n_q, n_k, bucket_size, n_valid)
    n_q_padded = plan.num_q_blocks * plan.q_block_len
    q_pos = torch.arange(n_q_padded, device=device).clamp_max(n_q - 1)  # (Nq_padded,)
    q_sorted = gather_rows(q, q_order[:, q_pos])  # (G, Nq_padded, D)
    q_sorted.mul_(scale)  # scale before any matmul
    q_blocks = q_sorted.view(groups, plan.num_q_blocks, plan.q_block_len, dim)  # (G, nqb, Bq, D)
    heavy_index, heavy_valid = heavy_key_index(plan, k_order, n_valid)  # (G, nqb, Bk) each
    k_heavy = gather_rows(k, heavy_index)  # (G, nqb, Bk, D)
    v_heavy = gather_rows(v, heavy_index)  # (G, nqb, Bk, Dv)

    # 4. sampling: probabilities, draws, and which query blocks must skip each drawn key
    probs = sampling_probabilities(v, valid, sampling)  # (G, Nk)
    samples, sample_weight = draw_samples(probs, sample_size, generator)  # (G, s), (G, s)
    sorted_block = key_block_of_sorted(plan, n_valid, n_k)  # (G, Nk) block of each sorted position
    k_blocks = torch.empty_like(sorted_block).scatter_(1, k_order, sorted_block)  # (G, Nk) token order
    k_samples = v_samples = sample_kept = None
    if plan.num_blocks > 1:
        sample_block = torch.gather(k_blocks, 1, samples)  # (G, s)
        sample_kept = plan.pair.unsqueeze(-1) != sample_block.unsqueeze(1)  # (G, nqb, s)
        k_samples = gather_rows(k, samples)  # (G, s, D)
        v_samples = gather_rows(v, samples)  # (G, s, Dv)

    # 5. both sums in one shifted pass, then divide by the estimated normaliser
    shift, heavy_num, heavy_den, sampled_num, sampled_den = heavy_and_sampled_sums(
        q_blocks, k_heavy, v_heavy, heavy_valid, k_samples, v_samples, sample_weight, sample_kept
    )
    numerator = heavy_num if sampled_num is None else heavy_num + sampled_num  # (G, nqb, Bq, Dv)
    denominator = heavy_den if sampled_den is None else heavy_den + sampled_den  # (G, nqb, Bq)
    out_sorted = numerator / denominator.unsqueeze(-1)
    out = unsort_queries(out_sorted.view(groups, n_q_padded, dim_v), q_order)  # (G, Nq, Dv)
    out = out.view(*lead, n_q, dim_v).to(out_dtype)
    if not return_trace:
        return out

    def token_order(x):  # (G, nqb, Bq, ...) sorted -> (..., Nq, ...) token order
        flat = x.reshape(groups, n_q_padded, -1)
        return unsort_queries(flat, q_order).view(*lead, n_q, *x.shape[3:])

    q_key_block = plan.pair.repeat_interleave(plan.q_block_len, dim=1)[:, :n_q]  # (G, Nq) sorted order
    sampled_part = torch.zeros_like(numerator) if sampled_num is None else sampled_num
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
        sampled=samples.view(*lead, sample_size),
        probs=probs.view(*lead, n_k),
        weights=sample_weight.view(*lead, sample_size),
        log_normalizer=token_order((shift + denominator.log()).unsqueeze(-1)).squeeze(-1),
        heavy_fraction=token_order((heavy_den / denominator).unsqueeze(-1)).squeeze(-1),
        heavy_output=token_order(heavy_num / denominator.unsqueeze(-1)),
        sampled_output=token_order(sampled_part / denominator.unsqueeze(-1)),
        sampling=sampling,
        bucket_order=bucket_order,
    )
    return out, trace
