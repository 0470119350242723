"""ScatterBrain (Chen et al., NeurIPS 2021): sparse LSH part computed exactly plus a Performer low-rank part.

A~ = L + (A - L) o S, with L = phi(Q) phi(K)^T the Performer estimate of A = exp(scale Q K^T) and S the
sparse support found by LSH.  So on the support the entries are exact and elsewhere the low-rank estimate
fills in; nothing is counted twice because L is subtracted on S:
    N~_i = sum_{j in S_i} e^{l_ij} v_j + [phi(q_i) (phi(K)^T V) - sum_{j in S_i} phi(q_i).phi(k_j) v_j]
    D~_i = the same with v = 1;   out_i = N~_i / D~_i
Support: Reformer's angular LSH (one round), queries and keys sorted by bucket and cut into
nb = ceil(Nk / block_size) balanced chunks; query chunk t meets key chunk t.
Stability (finite at logits of +-1e4): the Performer features carry the shifts of performer.favor_features
(per key feature and per query row, so the low-rank normaliser's largest term is exactly 1); every term is
then carried relative to one per-query reference c_i (the larger of the sparse max logit and the log of the
low-rank normaliser), and the low-rank remainder of D~ is clamped at 0 against rounding.
Masked keys: out of the support and phi = 0.  No causal form: the low-rank part sums over every key and
the support is cut from all tokens sorted together.
Budget = block_size + num_features, split half and half by default.  Cost: see multiply_adds.
"""
from __future__ import annotations

import torch

from ._common import MethodTrace, block_support, dense_logits, gather_rows, part, prepare, refuse_causal
from ._lsh import angular_buckets, gaussian_directions, make_blocks, sort_tokens, unblock_queries
from .performer import draw_feature_directions, favor_features, scaled_pair
from .reformer import default_num_buckets

OPTIONS = ("block_size", "num_features", "num_buckets", "orthogonal")


def split_budget(budget: int, block_size: int | None = None, num_features: int | None = None,
                 num_buckets: int | None = None, orthogonal: bool = True) -> dict:
    if block_size is None:
        block_size = max(1, budget // 2)
    if num_features is None:
        num_features = max(1, budget - block_size)
    out = {"block_size": part("block_size", block_size), "num_features": part("num_features", num_features),
           "orthogonal": bool(orthogonal)}
    if num_buckets is not None:
        out["num_buckets"] = num_buckets
    return out


def scatterbrain_attention(query, key, value, *, block_size: int = 64, num_features: int = 64, num_buckets=None,
                           orthogonal: bool = True, scale=None, key_mask=None, generator=None, return_trace=False,
                           is_causal=False):
    """ScatterBrain: exact attention on an LSH support plus Performer features everywhere else."""
    refuse_causal(is_causal, "ScatterBrain", "its low-rank part sums over every key")
    block_size = part("block_size", block_size)
    num_features = part("num_features", num_features)
    p = prepare(query, key, value, scale=scale, key_mask=key_mask, generator=generator, return_trace=return_trace)
    num_chunks = max(1, -(-p.n_k // block_size))
    num_buckets = part("num_buckets", default_num_buckets(num_chunks) if num_buckets is None else num_buckets,
                       minimum=2)
    if num_buckets % 2:
        raise ValueError(f"num_buckets must be an even integer >= 2, got {num_buckets}")
    # sparse support: one round of angular LSH, sorted and chunked
    rotation = gaussian_directions(p.groups, p.dim, num_buckets // 2, dtype=p.dtype, device=p.device,
                                   generator=p.generator)  # (G, D, b/2)
    q_bk = angular_buckets(p.q if p.scale >= 0 else -p.q, rotation)  # (G, Nq)
    k_bk = angular_buckets(p.k, rotation)  # (G, Nk)
    q_order, k_order = sort_tokens(q_bk, None), sort_tokens(k_bk, p.valid)
    blocks = make_blocks(q_order, k_order, p.n_valid, num_chunks)
    # low-rank part: Performer features
    directions = draw_feature_directions(p.groups, num_features, p.dim, orthogonal=bool(orthogonal),
                                         dtype=p.dtype, device=p.device, generator=p.generator)  # (G, m, D)
    q_s, k_s = scaled_pair(p)
    phi_q, phi_k, lr_factor = favor_features(q_s, k_s, directions, p.valid)  # (G, Nq, m), (G, Nk, m), (G, Nq)
    lr_num = phi_q @ (phi_k.mT @ p.v)  # (G, Nq, Dv)  times e^{lr_factor_i}
    lr_den = (phi_q @ phi_k.sum(1).unsqueeze(-1)).squeeze(-1)  # (G, Nq)

    def blocked(x):  # (G, Nq, ...) token order -> (G, nb, Bq, ...)
        return gather_rows(x.reshape(p.groups, p.n_q, -1), blocks.q_index)

    k_blk, v_blk = gather_rows(p.k, blocks.k_index), gather_rows(p.v, blocks.k_index)  # (G, nb, K, .)
    fk_blk = gather_rows(phi_k, blocks.k_index)  # (G, nb, K, m)
    q_blk = blocked(p.q * p.scale)  # (G, nb, Bq, D)
    fq_blk = blocked(phi_q)  # (G, nb, Bq, m)
    lr_log = blocked(lr_factor.unsqueeze(-1)).squeeze(-1)  # (G, nb, Bq) log factor of L entries
    valid = blocks.k_valid.unsqueeze(-2)  # (G, nb, 1, K)
    logits = (q_blk @ k_blk.mT).masked_fill(~valid, float("-inf"))  # (G, nb, Bq, K)
    lr_sparse = (fq_blk @ fk_blk.mT) * valid  # (G, nb, Bq, K) L on the support (unscaled)
    lr_den_blk = blocked(lr_den.unsqueeze(-1)).squeeze(-1)  # (G, nb, Bq)
    ref = torch.maximum(logits.amax(-1), lr_log + lr_den_blk.log())  # (G, nb, Bq) reference c_i
    exact = torch.exp(logits - ref.unsqueeze(-1))  # (G, nb, Bq, K)
    lr_scale = torch.exp(lr_log - ref)  # (G, nb, Bq)
    num = exact @ v_blk + lr_scale.unsqueeze(-1) * (blocked(lr_num) - lr_sparse @ v_blk)
    den = exact.sum(-1) + lr_scale * (lr_den_blk - lr_sparse.sum(-1)).clamp_min(0)
    den = den.clamp_min(torch.finfo(den.dtype).tiny)
    out_blk = num / den.unsqueeze(-1)
    out = unblock_queries(out_blk, blocks)  # (G, Nq, Dv)
    if not return_trace:
        return p.finish(out)
    log_d = unblock_queries((ref + den.log()).unsqueeze(-1), blocks).squeeze(-1)  # (G, Nq)

    def matrix():
        support = block_support(blocks)  # (G, Nq, Nk)
        exact_part = torch.exp(dense_logits(p.q, p.k, p.scale, p.dtype) - log_d.unsqueeze(-1))
        low_rank = (phi_q @ phi_k.mT) * torch.exp(lr_factor - log_d).unsqueeze(-1)
        return p.per_query(torch.where(support, exact_part, low_rank))

    trace = MethodTrace(
        "scatterbrain", query, key, p.scale, p.mask,
        {"block_size": block_size, "num_features": num_features, "num_buckets": num_buckets,
         "orthogonal": bool(orthogonal)},
        log_normalizer=p.per_query(log_d), q_buckets=p.per_query(q_bk), k_buckets=p.per_key(k_bk),
        q_order=p.per_query(q_order), k_order=p.per_key(k_order), q_blocks=p.per_query(blocks.q_block),
        features=(p.per_query(phi_q), p.per_key(phi_k)),
        extras={"num_blocks": blocks.num_blocks, "sparse_fraction": p.per_query(
            unblock_queries((exact.sum(-1) / den).unsqueeze(-1), blocks).squeeze(-1))},
        matrix_fn=matrix)
    return p.finish(out), trace


def multiply_adds(n_queries: int, n_keys: int, dim: int, dim_v: int, *, block_size: int, num_features: int,
                  num_buckets: int | None = None, orthogonal: bool = True) -> int:
    """Per head, with nb = ceil(Nk / block_size) chunks of Bq = ceil(Nq / nb) query slots and K = ceil(Nk / nb)
    key slots (padded slots count): Performer features (Nq + Nk)(m D + D), the low-rank sums Nk m (Dv + 1) +
    Nq m (Dv + 1); on the support the exact logits nb Bq K D, L on the support nb Bq K m, and both times the
    values nb Bq K 2 (Dv + 1).  Hashing (angular LSH) is left out."""
    nb = max(1, -(-n_keys // block_size))
    bq, k = -(-n_queries // nb), -(-n_keys // nb)
    m = num_features
    features = (n_queries + n_keys) * (m * dim + dim) + (n_keys + n_queries) * m * (dim_v + 1)
    return features + nb * bq * k * (dim + m + 2 * (dim_v + 1))
