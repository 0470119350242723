"""Multiply-adds one head of each method performs, counted from the real shapes (hashing and sorting
apart: they are reported separately as `hashing`).

Convention: a matmul (a, b) @ (b, c) costs a*b*c; an attended column costs D (logit) + Dv (value) + 1
(the ones column that gives the normaliser), whether the method appends a ones column or sums the row;
exp, max, division and additions alone are not counted.  Every function returns an int (per head).
"""
from __future__ import annotations

import math


def columns(n_q: int, cols_per_query: float, dim: int, dim_v: int) -> int:
    """n_q queries each attending `cols_per_query` columns: logits, values and the normaliser."""
    return int(round(n_q * cols_per_query * (dim + dim_v + 1)))


def hashing(n_q: int, n_k: int, dim: int, num_projs: int) -> int:
    """SimHash of queries and keys with r shared directions (the '15 % on top' allowance)."""
    return (n_q + n_k) * dim * num_projs


def kdeformer_core(n_q, n_k, dim, dim_v, *, bucket_size, sample_size, sampling, estimate_rows=None):
    """Today's core (kde_attention): block + s sampled (heavy columns included) columns per query,
    and for column_norm R estimation rows against every key (logits only: R * Nk * D)."""
    work = columns(n_q, min(bucket_size, n_k) + sample_size, dim, dim_v)
    if sampling == "column_norm":
        rows = estimate_rows or max(1, math.ceil(sample_size * n_q / (2 * n_k)))
        work += rows * n_k * dim
    return work


def nystrom(n_q, n_k, dim, dim_v, *, num_landmarks, pinv_iterations=6):
    """Three kernels, 4 m x m matmuls per pseudo-inverse iteration, then F (A+ (B V))."""
    m = min(num_landmarks, n_q, n_k)
    kernels = n_q * m * dim + m * m * dim + m * n_k * dim
    pinv = pinv_iterations * 4 * m**3
    products = m * n_k * dim_v + m * m * dim_v + n_q * m * dim_v
    return kernels + pinv + products


def performer(n_q, n_k, dim, dim_v, *, num_features):
    """Features of Q and K, phi(K)^T [V, 1], phi(Q) (that); orthogonal blocks' QR (2/3 D^3 each)."""
    m = num_features
    qr = math.ceil(m / dim) * (2 * dim**3) // 3
    return (n_q + n_k) * m * dim + n_k * m * (dim_v + 1) + n_q * m * (dim_v + 1) + qr


def hyperattention(n_q, n_k, dim, dim_v, *, block_size, sample_size):
    """sortLSH block + s uniform samples for every query (the merge by log-sum-exp is not counted)."""
    return columns(n_q, min(block_size, n_k) + sample_size, dim, dim_v)


def uniform(n_q, n_k, dim, dim_v, *, sample_size):
    return columns(n_q, sample_size, dim, dim_v)


def scatterbrain(n_q, n_k, dim, dim_v, *, block_size, num_features):
    """Performer part for everyone, exact block, and the low-rank estimate on the block subtracted."""
    k = min(block_size, n_k)
    low_rank = performer(n_q, n_k, dim, dim_v, num_features=num_features)
    sparse = columns(n_q, k, dim, dim_v)
    correction = n_q * k * num_features + n_q * k * (dim_v + 1)  # phi(q).phi(k) on the block, times [V, 1]
    return low_rank + sparse + correction


def exact(n_q, n_k, dim, dim_v):
    return columns(n_q, n_k, dim, dim_v)


def peer(method: str, n_q, n_k, dim, dim_v, params: dict) -> int:
    """Multiply-adds of `method` run with `params` (as kdeformer.methods.split_budget returns them)."""
    if method == "nystrom":
        return nystrom(n_q, n_k, dim, dim_v, num_landmarks=params["num_landmarks"],
                       pinv_iterations=params.get("pinv_iterations", 6))
    if method == "performer":
        return performer(n_q, n_k, dim, dim_v, num_features=params["num_features"])
    if method == "hyperattention":
        return hyperattention(n_q, n_k, dim, dim_v, block_size=params["block_size"], sample_size=params["sample_size"])
    if method == "uniform":
        return uniform(n_q, n_k, dim, dim_v, sample_size=params["sample_size"])
    if method == "scatterbrain":
        return scatterbrain(n_q, n_k, dim, dim_v, block_size=params["block_size"], num_features=params["num_features"])
    if method == "kdeformer":
        return kdeformer_core(n_q, n_k, dim, dim_v, **params)
    raise ValueError(f"no multiply-add count for {method!r}")
