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
Budget (key columns each query pays for) = block_size + sample_size; default split one third / two
thirds, the authors' convention (block m/2 with m samples).  Cost O(Nq (B + s) D + (Nq + Nk) D r).
"""
from __future__ import annotations

import math

import torch

from ._common import (
    MethodTrace, dense_logits, gather_rows, masked_softmax_parts, merge_parts, part, prepare, split_block_and_samples,
)
from ._lsh import gaussian_directions, gray_rank, in_block, make_blocks, sign_codes, sort_tokens, unblock_queries
from .uniform import draw_uniform_columns

OPTIONS = ("block_size", "sample_size", "num_projs", "block_fraction")
MAX_PROJS = 16


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


def hyper_attention(query, key, value, *, block_size: int = 64, sample_size: int = 128, num_projs: int = 7,
                    scale=None, key_mask=None, generator=None, return_trace=False):
    """HyperAttention without causal masking: exact sortLSH blocks + uniformly sampled columns."""
    block_size = part("block_size", block_size)
    sample_size = part("sample_size", sample_size)
    num_projs = part("num_projs", num_projs)
    if num_projs > MAX_PROJS:
        raise ValueError(f"num_projs must be an integer in [1, {MAX_PROJS}], got {num_projs}")
    p = prepare(query, key, value, scale=scale, key_mask=key_mask, generator=generator)
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
        q_start = torch.gather(blocks.k_start, 1, blocks.q_block).unsqueeze(-1)  # (G, Nq, 1)
        q_end = torch.gather(blocks.k_end, 1, blocks.q_block).unsqueeze(-1)
        kp = blocks.k_pos.unsqueeze(1)  # (G, 1, Nk)
        heavy = (kp >= q_start) & (kp < q_end)  # (G, Nq, Nk)
        counts = torch.zeros(groups, p.n_k, dtype=p.dtype, device=p.device).scatter_add_(
            1, cols, torch.ones_like(cols, dtype=p.dtype))
        col_w = (counts * log_w.view(-1, 1).exp()).unsqueeze(1)  # (G, 1, Nk)
        factor = torch.where(heavy, torch.ones_like(col_w), col_w)
        return p.per_query(torch.exp(dense_logits(p.q, p.k, p.scale, p.dtype) - log_d.unsqueeze(-1)) * factor)

    trace = MethodTrace(
        "hyperattention", query, key, p.scale, p.mask,
        {"block_size": block_size, "sample_size": sample_size, "num_projs": num_projs},
        log_normalizer=p.per_query(log_d), q_buckets=p.per_query(q_codes), k_buckets=p.per_key(k_codes),
        q_order=p.per_query(q_order), k_order=p.per_key(k_order), q_blocks=p.per_query(blocks.q_block),
        sampled=p.per_group(cols),
        extras={"num_blocks": blocks.num_blocks, "k_start": p.per_group(blocks.k_start),
                "k_end": p.per_group(blocks.k_end),
                "heavy_fraction": p.per_query(unblock_queries((block_part[1] - lse_blk).exp().unsqueeze(-1),
                                                              blocks).squeeze(-1))},
        matrix_fn=matrix)
    return p.finish(out), trace
