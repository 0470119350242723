"""HyperAttention (Han et al., ICLR 2024): sortLSH heavy blocks plus uniform column samples, merged in log space.

Per head:
  1. hash queries and keys with r shared random hyperplanes (SimHash), sort both by bucket in Gray order;
  2. cut the sorted tokens into nb = ceil(Nk / block_size) balanced blocks; each query block attends
     exactly to its key block (masked keys sorted out first);
  3. draw s key columns uniformly with replacement from the n unmasked keys, weight n / s; a query skips
     the drawn keys that already lie in its own block (so nothing is counted twice — the authors' float32
     path does count them twice), which keeps the off-block estimate unbiased;
  4. merge the exact block part and the sampled part by log-sum-exp: out = sum_p e^{lse_p - L} out_p,
     L = log(e^{lse_block} + e^{lse_sampled}) is the normaliser estimate log D~.
Causal (is_causal=True, bottom-right aligned): the authors' recursive split.  Queries sit at their key
positions Nk - Nq + i; a span of positions up to `block_size + sample_size` long is computed exactly under
the causal mask; a longer span is halved, both halves recurse (the diagonal), and the later half's queries
meet the earlier half's keys — all in their past — through steps 1-4 without a mask; parts are merged by
log-sum-exp.  Sorting those queries together would let a later query move an earlier one's block, so in
the causal form each query looks its own Gray rank up among the sorted past keys and takes that key
block; the samples of a span are drawn from its keys only.  So output i depends on tokens <= i alone.
Each query pays its block and samples once per level of the split it sits in the later half of: the
causal form costs more than its budget (see multiply_adds).
Budget (key columns each query pays for) = block_size + sample_size; default split one third / two
thirds, the authors' convention (block m/2 with m samples).  Cost: see multiply_adds.
"""
from __future__ import annotations

import math

import torch

from ..core import MAX_PROJS
from ..random import inverse_cdf
from ._common import (
    MethodTrace, attend_per_query, block_support, dense_logits, gather_rows, masked_softmax_parts,
    merge_parts, part, prepare, split_block_and_samples,
)
from ._lsh import gaussian_directions, gray_rank, in_block, make_blocks, sign_codes, sort_tokens, unblock_queries
from .uniform import draw_uniform_columns

OPTIONS = ("block_size", "sample_size", "num_projs", "block_fraction")


def split_budget(budget: int, block_size: int | None = None, sample_size: int | None = None,
                 num_projs: int = 7, block_fraction: float = 1 / 3) -> dict:
    block_size, sample_size = split_block_and_samples(
        budget, block_size, sample_size, block_fraction, "block_size", "block_fraction")
    return {"block_size": block_size, "sample_size": sample_size, "num_projs": part("num_projs", num_projs)}


def sort_lsh(p, num_projs: int):
    """SimHash both sides with the same directions and sort by Gray rank.  -> codes and orders (G, N)."""
    directions = gaussian_directions(p.groups, p.dim, num_projs, dtype=p.dtype, device=p.device,
                                     generator=p.generator)  # (G, D, r)
    q_codes = sign_codes(p.q if p.scale >= 0 else -p.q, directions)  # (G, Nq)
    k_codes = sign_codes(p.k, directions)  # (G, Nk)
    q_order = sort_tokens(gray_rank(q_codes, num_projs), None)
    k_order = sort_tokens(gray_rank(k_codes, num_projs), p.valid)
    return q_codes, k_codes, q_order, k_order


def check_params(block_size, sample_size, num_projs) -> tuple[int, int, int]:
    block_size, sample_size, num_projs = (part(n, x) for n, x in (("block_size", block_size),
                                                                  ("sample_size", sample_size),
                                                                  ("num_projs", num_projs)))
    if num_projs > MAX_PROJS:
        raise ValueError(f"num_projs must be an integer in [1, {MAX_PROJS}], got {num_projs}")
    return block_size, sample_size, num_projs


def hyper_attention(query, key, value, *, block_size: int = 64, sample_size: int = 128, num_projs: int = 7,
                    scale=None, key_mask=None, generator=None, return_trace=False, is_causal=False):
    """HyperAttention: exact sortLSH blocks + uniformly sampled columns (causal: the recursive split)."""
    block_size, sample_size, num_projs = check_params(block_size, sample_size, num_projs)
    p = prepare(query, key, value, scale=scale, key_mask=key_mask, generator=generator, return_trace=return_trace)
    params = {"block_size": block_size, "sample_size": sample_size, "num_projs": num_projs}
    if is_causal:
        out, log_d = causal_hyper(p, block_size, sample_size, num_projs)
        if not return_trace:
            return p.finish(out)
        return p.finish(out), MethodTrace("hyperattention", query, key, p.scale, p.mask, {**params, "is_causal": True},
                                          log_normalizer=p.per_query(log_d))
    q_codes, k_codes, q_order, k_order = sort_lsh(p, num_projs)
    blocks = make_blocks(q_order, k_order, p.n_valid, max(1, -(-p.n_k // block_size)))
    q_blk = gather_rows(p.q * p.scale, blocks.q_index)  # (G, nb, Bq, D)
    k_blk = gather_rows(p.k, blocks.k_index)  # (G, nb, K, D)
    v_blk = gather_rows(p.v, blocks.k_index)  # (G, nb, K, Dv)
    block_part = masked_softmax_parts(q_blk @ k_blk.mT, blocks.k_valid.unsqueeze(-2), v_blk)

    cols = draw_uniform_columns(p.valid, p.groups, p.n_k, sample_size, dtype=p.dtype, device=p.device,
                                generator=p.generator)  # (G, s)
    kept = ~in_block(blocks, torch.gather(blocks.k_pos, 1, cols))  # (G, nb, s)
    log_w = (p.n_valid.to(p.dtype).log() - math.log(sample_size)).view(-1, 1, 1, 1)  # log(n / s)
    k_s, v_s = gather_rows(p.k, cols), gather_rows(p.v, cols)  # (G, s, D), (G, s, Dv)
    groups, nb, bq, _ = q_blk.shape
    s_logits = (q_blk.reshape(groups, nb * bq, -1) @ k_s.mT).view(groups, nb, bq, sample_size)
    sample_part = masked_softmax_parts(s_logits, kept.unsqueeze(-2), v_s.unsqueeze(1), log_w)
    out_blk, lse_blk = merge_parts([block_part, sample_part])  # (G, nb, Bq, Dv), (G, nb, Bq)
    out = unblock_queries(out_blk, blocks)  # (G, Nq, Dv)
    if not return_trace:
        return p.finish(out)
    log_d = unblock_queries(lse_blk.unsqueeze(-1), blocks).squeeze(-1)  # (G, Nq)

    def matrix():
        heavy = block_support(blocks)  # (G, Nq, Nk)
        counts = torch.zeros(groups, p.n_k, dtype=p.dtype, device=p.device).scatter_add_(
            1, cols, torch.ones_like(cols, dtype=p.dtype))
        col_w = (counts * log_w.view(-1, 1).exp()).unsqueeze(1)  # (G, 1, Nk)
        factor = torch.where(heavy, torch.ones_like(col_w), col_w)
        return p.per_query(torch.exp(dense_logits(p.q, p.k, p.scale, p.dtype) - log_d.unsqueeze(-1)) * factor)

    trace = MethodTrace(
        "hyperattention", query, key, p.scale, p.mask, params,
        log_normalizer=p.per_query(log_d), q_buckets=p.per_query(q_codes), k_buckets=p.per_key(k_codes),
        q_order=p.per_query(q_order), k_order=p.per_key(k_order), q_blocks=p.per_query(blocks.q_block),
        sampled=p.per_group(cols),
        extras={"num_blocks": blocks.num_blocks, "k_start": p.per_group(blocks.k_start),
                "k_end": p.per_group(blocks.k_end),
                "heavy_fraction": p.per_query(unblock_queries((block_part[1] - lse_blk).exp().unsqueeze(-1),
                                                              blocks).squeeze(-1))},
        matrix_fn=matrix)
    return p.finish(out), trace


# --------------------------------------------------------------------------- causal form
def causal_spans(lo: int, hi: int, leaf: int):
    """The recursive split of key positions [lo, hi): yields ("leaf", lo, hi) spans computed exactly and
    ("cross", lo, mid, hi) spans where queries at [mid, hi) meet keys [lo, mid).  The one plan both the
    algorithm and multiply_adds walk."""
    if hi - lo <= leaf:
        yield ("leaf", lo, hi)
        return
    mid = (lo + hi) // 2
    yield from causal_spans(lo, mid, leaf)
    yield from causal_spans(mid, hi, leaf)
    yield ("cross", lo, mid, hi)


def leaf_part(p, q_s, lo: int, hi: int, qa: int, qb: int):
    """Exact causal attention of the queries [qa, qb) (at positions [lo, hi)) over keys [lo, hi)."""
    limit = torch.arange(qa, qb, device=p.device) + (p.n_k - p.n_q)  # (c,) last visible key of each query
    allowed = (torch.arange(lo, hi, device=p.device) <= limit.unsqueeze(-1)).unsqueeze(0)  # (1, c, n)
    if p.valid is not None:
        allowed = allowed & p.valid[:, None, lo:hi]
    return masked_softmax_parts(q_s[:, qa:qb] @ p.k[:, lo:hi].mT, allowed, p.v[:, lo:hi])


def cross_part(p, q_s, ranks, lo: int, mid: int, qa: int, qb: int, block_size: int, sample_size: int):
    """Queries [qa, qb) against their past keys [lo, mid), no mask: each query's own key block (found by its
    Gray rank among the sorted keys) plus uniform samples of the span.  -> (out (G, c, Dv), lse (G, c))."""
    q_rank, k_rank = ranks
    valid = None if p.valid is None else p.valid[:, lo:mid]  # (G, n)
    n_span = mid - lo
    order = sort_tokens(k_rank[:, lo:mid], valid)  # (G, n) span-local
    n = torch.full((p.groups,), n_span, device=p.device) if valid is None else valid.sum(-1)  # (G,)
    top = (1 << MAX_PROJS) + 1  # above every Gray rank: masked keys sort last
    sorted_rank = torch.gather(k_rank[:, lo:mid], 1, order)
    if valid is not None:
        sorted_rank = torch.where(torch.arange(n_span, device=p.device) < n.unsqueeze(-1), sorted_rank, top)
    nb = max(1, -(-n_span // block_size))
    t = torch.arange(nb, device=p.device)
    start = (t * n.unsqueeze(-1)) // nb  # (G, nb) balanced blocks of the unmasked sorted keys, never empty
    end = torch.maximum(((t + 1) * n.unsqueeze(-1)) // nb, start + 1)
    pos = torch.minimum(torch.searchsorted(sorted_rank, q_rank[:, qa:qb].contiguous()), (n - 1).clamp_min(0).unsqueeze(-1))
    block = torch.searchsorted(start, pos, right=True) - 1  # (G, c) block holding that sorted position
    b_start, b_end = torch.gather(start, 1, block), torch.gather(end, 1, block)  # (G, c)
    slots = b_start.unsqueeze(-1) + torch.arange(-(-n_span // nb), device=p.device)  # (G, c, K) sorted positions
    in_blk = (slots < b_end.unsqueeze(-1)) & (n > 0).view(-1, 1, 1)
    index = torch.gather(order, 1, slots.clamp_max(n_span - 1).flatten(1)).view_as(slots) + lo  # (G, c, K)
    block_part = attend_per_query(q_s[:, qa:qb], p.k, p.v, index, in_blk)
    weights = torch.ones(p.groups, n_span, dtype=torch.float64, device=p.device) if valid is None else valid.double()
    u = torch.rand(p.groups, sample_size, dtype=torch.float64, device=p.device, generator=p.generator)
    cols = inverse_cdf(weights, u)  # (G, s) span-local
    col_pos = torch.gather(torch.argsort(order, dim=-1), 1, cols)  # (G, s) sorted position of each sample
    kept = (col_pos.unsqueeze(1) < b_start.unsqueeze(-1)) | (col_pos.unsqueeze(1) >= b_end.unsqueeze(-1))  # (G, c, s)
    log_w = (n.to(p.dtype).log() - math.log(sample_size)).view(-1, 1, 1)  # log(n / s)
    k_s, v_s = gather_rows(p.k, cols + lo), gather_rows(p.v, cols + lo)  # (G, s, D), (G, s, Dv)
    sample_part = masked_softmax_parts(q_s[:, qa:qb] @ k_s.mT, kept & (n > 0).view(-1, 1, 1), v_s, log_w)
    return merge_parts([block_part, sample_part])


def causal_hyper(p, block_size: int, sample_size: int, num_projs: int):
    """The causal form.  -> out (G, Nq, Dv) (0 for a query that sees no key), log D~ (G, Nq)."""
    directions = gaussian_directions(p.groups, p.dim, num_projs, dtype=p.dtype, device=p.device,
                                     generator=p.generator)  # (G, D, r)
    q_rank = gray_rank(sign_codes(p.q if p.scale >= 0 else -p.q, directions), num_projs)  # (G, Nq)
    k_rank = gray_rank(sign_codes(p.k, directions), num_projs)  # (G, Nk)
    q_s = p.q * p.scale  # (G, Nq, D)
    offset = p.n_k - p.n_q  # query i sits at key position i + offset

    def queries(lo, hi):  # query rows at positions [lo, hi)
        return max(0, lo - offset), max(0, min(p.n_q, hi - offset))

    out = p.v.new_zeros(p.groups, p.n_q, p.dim_v)
    lse = p.v.new_full((p.groups, p.n_q), float("-inf"))
    parts = {}  # query range -> list of parts over it
    for span in causal_spans(0, p.n_k, block_size + sample_size):
        if span[0] == "leaf":
            qa, qb = queries(span[1], span[2])
            if qb > qa:
                parts.setdefault((qa, qb), []).append(leaf_part(p, q_s, span[1], span[2], qa, qb))
        else:
            qa, qb = queries(span[2], span[3])
            if qb > qa:
                parts.setdefault((qa, qb), []).append(
                    cross_part(p, q_s, (q_rank, k_rank), span[1], span[2], qa, qb, block_size, sample_size))
    return merge_spans(parts, out, lse)


def merge_spans(parts: dict, out, lse):
    """Merge the parts of every query range into (out (G, Nq, Dv), lse (G, Nq)), out of place."""
    pieces_out, pieces_lse, at = [], [], 0
    bounds = sorted({b for rng in parts for b in rng} | {0, out.shape[1]})
    for a, b in zip(bounds[:-1], bounds[1:]):
        here = [(o[:, a - qa:b - qa], l[:, a - qa:b - qa]) for (qa, qb), ps in parts.items() if qa <= a and b <= qb
                for o, l in ps]
        o, l = merge_parts(here) if here else (out[:, a:b], lse[:, a:b])
        pieces_out.append(o)
        pieces_lse.append(l)
    return torch.cat(pieces_out, 1), torch.cat(pieces_lse, 1)


def multiply_adds(n_queries: int, n_keys: int, dim: int, dim_v: int, *, block_size: int, sample_size: int,
                  num_projs: int = 7, is_causal: bool = False) -> int:
    """Non-causal, with nb = ceil(Nk / block_size) blocks of Bq = ceil(Nq / nb) query slots and K = ceil(Nk / nb)
    key slots (padded slots count): blocks nb Bq K (D + Dv + 1), samples nb Bq s (D + Dv + 1), the merge 2 Nq Dv.
    Causal, over the recursive split of causal_spans (leaves of at most block_size + sample_size positions): a
    leaf of n positions and c queries c n (D + Dv + 1); a cross span with n past keys and c queries c (K + s)
    (D + Dv + 1) + 2 c Dv, K = ceil(n / ceil(n / block_size)).  Hashing (SimHash, sorting) is left out."""
    pair = dim + dim_v + 1
    if not is_causal:
        nb = max(1, -(-n_keys // block_size))
        return nb * -(-n_queries // nb) * (-(-n_keys // nb) + sample_size) * pair + 2 * n_queries * dim_v
    offset, total = n_keys - n_queries, 0
    for span in causal_spans(0, n_keys, block_size + sample_size):
        lo, hi = (span[1], span[2]) if span[0] == "leaf" else (span[2], span[3])
        c = max(0, min(n_queries, hi - offset) - max(0, lo - offset))
        if span[0] == "leaf":
            total += c * (hi - lo) * pair
        else:
            n = span[2] - span[1]
            total += c * (-(-n // max(1, -(-n // block_size))) + sample_size) * pair + 2 * c * dim_v
    return total
