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
