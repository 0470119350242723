"""Shared test fixtures: `gen` (seeded generators) and `qkv` (random attention inputs).

Both are factories, so a test asks for the fixture and calls it with what it needs:

    def test_x(gen, qkv):
        q, k, v = qkv(2, 3, nq=37, nk=45)          # lead dims (2, 3): q (2, 3, 37, 16), v (2, 3, 45, 8)
        out = approximate("uniform", q, k, v, budget=8, generator=gen(1))

The module-level functions `make_gen` and `make_qkv` are the same, for helpers outside a test.
"""
from __future__ import annotations

import pytest
import torch


def make_gen(seed: int = 0) -> torch.Generator:
    """A CPU generator seeded with `seed`."""
    return torch.Generator().manual_seed(seed)


def make_qkv(*lead: int, nq: int | None = None, nk: int | None = None, n_q: int | None = None,
             n_k: int | None = None, d: int = 16, dv: int = 8, dtype=torch.float64, seed: int = 0,
             spread: float = 1.0):
    """Gaussian query (*lead, Nq, D) and key (*lead, Nk, D) times `spread`, value (*lead, Nk, Dv).

    Nq defaults to 40 and Nk to Nq (n_q / n_k are accepted as spellings of nq / nk).  The numbers are drawn
    in float64 and then rounded to `dtype`, so every dtype sees the same inputs up to its rounding.
    """
    nq = n_q if n_q is not None else (40 if nq is None else nq)
    nk = n_k if n_k is not None else (nq if nk is None else nk)
    g = make_gen(seed)
    q = torch.randn(*lead, nq, d, generator=g, dtype=torch.float64) * spread  # (..., Nq, D)
    k = torch.randn(*lead, nk, d, generator=g, dtype=torch.float64) * spread  # (..., Nk, D)
    v = torch.randn(*lead, nk, dv, generator=g, dtype=torch.float64)  # (..., Nk, Dv)
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.fixture
def gen():
    """Factory: gen(seed=0) -> torch.Generator."""
    return make_gen


@pytest.fixture
def qkv():
    """Factory: qkv(*lead, nq=40, nk=nq, d=16, dv=8, dtype=float64, seed=0, spread=1.0) -> (q, k, v)."""
    return make_qkv


def assert_sampled_sums_unbiased(q, k, v, trace, scale: float, z_max: float = 4.5, rel: float = 0.01):
    """The sampled part of the numerator and of the normaliser is unbiased for the entries not computed
    exactly: over the leading dim (many heads of the same q, k, v, each with its own draws), the mean of
    (estimate - truth) lies within z_max standard errors of 0 at every coordinate (a false alarm rate
    below 1e-4 per coordinate at 4.5), and the normaliser's mean is within `rel` of the truth."""
    import math

    heads = q.shape[0]
    a = torch.exp(scale * q @ k.mT)  # (heads, Nq, Nk), small logits in float64
    off = ~trace.heavy_mask()
    true_num, true_den = (a * off) @ v, (a * off).sum(-1)
    d_est = trace.log_normalizer.exp()
    est_num, est_den = trace.sampled_output * d_est.unsqueeze(-1), (1 - trace.heavy_fraction) * d_est
    for est, true in ((est_num, true_num), (est_den, true_den)):
        diff = est - true
        z = diff.mean(0) / (diff.std(0) / math.sqrt(heads)).clamp_min(1e-300)
        assert float(z.abs().max()) < z_max
    assert float((est_den - true_den).mean().abs() / true_den.mean()) < rel
