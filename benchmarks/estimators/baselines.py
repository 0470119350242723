"""Today's estimators (the core's kde_attention) and the peers, with their multiply-adds per query.

KDEformer today at budget b in the budget convention: bucket_size = b/3, sample_size = 2b/3 (the split of
kdeformer.methods.split_budget); column_norm then also pays R = ceil(s Nq / (2 Nk)) estimation rows,
which this convention leaves out -- `honest=True` shrinks bucket and samples until everything fits
in b (D + Dv + 1) per query.
"""
from __future__ import annotations

import torch

import kdeformer as K
from kdeformer.methods import approximate, split_budget

from . import cost

PEERS = ("nystrom", "performer", "hyperattention", "uniform", "scatterbrain")


def core_split(budget: int, sampling: str, dims, honest: bool) -> dict:
    """bucket/sample for today's core at `budget`, scaled down when `honest` until it fits."""
    n_q, n_k, dim, dim_v = dims
    limit = n_q * budget * (dim + dim_v + 1)
    b = budget
    while True:
        params = split_budget("kdeformer", b)
        params["sampling"] = sampling
        if not honest or cost.kdeformer_core(n_q, n_k, dim, dim_v, **params) <= limit or b <= 3:
            return params
        b -= 1


def run_core(heads, budget: int, sampling: str, seed: int, honest: bool):
    """Today's kde_attention.  -> output, multiply-adds per query."""
    dims = (heads.q.shape[1], heads.k.shape[1], heads.q.shape[2], heads.v.shape[2])
    params = core_split(budget, sampling, dims, honest)
    out = K.kde_attention(heads.q, heads.k, heads.v, scale=heads.scale,
                          generator=torch.Generator().manual_seed(seed), **params)
    return out, cost.kdeformer_core(*dims, **params) / dims[0]


def run_peer(heads, method: str, budget: int, seed: int):
    """A peer through kdeformer.approximate.  -> output, multiply-adds per query."""
    dims = (heads.q.shape[1], heads.k.shape[1], heads.q.shape[2], heads.v.shape[2])
    params = split_budget(method, budget)
    out = approximate(method, heads.q, heads.k, heads.v, budget=budget, scale=heads.scale,
                      generator=torch.Generator().manual_seed(seed))
    return out, cost.peer(method, *dims, params) / dims[0]


def run_core_default(heads, budget: int, seed: int):
    """The core's default estimator as users meet it: approximate("kdeformer", budget=b), its cost from
    kdeformer.multiply_adds (the port of the winner is checked against `best` with this).  -> out, MACs/query."""
    from kdeformer import multiply_adds

    dims = (heads.q.shape[1], heads.k.shape[1], heads.q.shape[2], heads.v.shape[2])
    out = approximate("kdeformer", heads.q, heads.k, heads.v, budget=budget, scale=heads.scale,
                      generator=torch.Generator().manual_seed(seed))
    return out, multiply_adds("kdeformer", *dims, budget=budget) / dims[0]
