"""One input step for every attention function: check, flatten the leading dims, pick the working dtype.

`kde_attention`, `exact_attention` and every peer in `kdeformer.methods` call `prepare`, so they raise the
same ValueErrors for the same mistakes and flatten the same way. Shape legend:
    G  groups (the caller's leading dims, batch x heads, flattened)   Nq queries   Nk keys
    D  head dim   Dv value dim
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._checks import check_flag, check_generator, check_key_mask, check_qkv, check_query_mask, check_scale


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half types are computed in float32 (exp and sums need the range); float32/64 stay as they are."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@dataclass
class Prepared:
    """Validated inputs of one call, flattened to (G, N, .) in the working dtype."""

    lead: tuple
    n_q: int
    n_k: int
    dim: int
    dim_v: int
    scale: float
    mask: torch.Tensor | None  # (*lead, Nk) bool, True = attend (as the caller gave it, expanded)
    generator: torch.Generator | None
    q: torch.Tensor  # (G, Nq, D) unscaled
    k: torch.Tensor  # (G, Nk, D)
    v: torch.Tensor  # (G, Nk, Dv)
    valid: torch.Tensor | None  # (G, Nk) bool
    n_valid: torch.Tensor  # (G,) int64 unmasked keys per head
    out_dtype: torch.dtype
    query_valid: torch.Tensor | None = None  # (G, Nq) bool, True = real query (None: all real)

    @property
    def groups(self) -> int:
        return self.q.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def device(self) -> torch.device:
        return self.q.device

    def finish(self, out: torch.Tensor) -> torch.Tensor:
        """(G, Nq, Dv) working dtype -> (*lead, Nq, Dv) in the caller's dtype."""
        return out.reshape(*self.lead, self.n_q, self.dim_v).to(self.out_dtype)

    def per_query(self, x: torch.Tensor) -> torch.Tensor:
        """(G, Nq, ...) -> (*lead, Nq, ...)."""
        return x.reshape(*self.lead, self.n_q, *x.shape[2:])

    def per_key(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(*self.lead, self.n_k, *x.shape[2:])

    def per_group(self, x: torch.Tensor) -> torch.Tensor:
        """(G, ...) -> (*lead, ...)."""
        return x.reshape(*self.lead, *x.shape[1:])


def prepare(query, key, value, *, scale, key_mask, generator, query_mask=None, return_trace=False) -> Prepared:
    """Check and flatten the inputs (one set of errors and dtype rules for every attention function)."""
    lead, n_q, n_k, dim, dim_v = check_qkv(query, key, value)
    scale = check_scale(scale, dim)
    mask = check_key_mask(key_mask, lead, n_k, query.device)
    q_mask = check_query_mask(query_mask, lead, n_q, query.device)
    generator = check_generator(generator, query.device)
    check_flag("return_trace", return_trace)
    dtype = working_dtype(query.dtype)
    groups = math.prod(lead)
    q = query.reshape(groups, n_q, dim).to(dtype)  # (G, Nq, D)
    k = key.reshape(groups, n_k, dim).to(dtype)  # (G, Nk, D)
    v = value.reshape(groups, n_k, dim_v).to(dtype)  # (G, Nk, Dv)
    valid = None if mask is None else mask.reshape(groups, n_k)  # (G, Nk)
    if valid is None:
        n_valid = torch.full((groups,), n_k, dtype=torch.int64, device=query.device)
    else:
        n_valid = valid.sum(-1)
    query_valid = None if q_mask is None else q_mask.reshape(groups, n_q)  # (G, Nq)
    return Prepared(lead, n_q, n_k, dim, dim_v, scale, mask, generator, q, k, v, valid, n_valid, query.dtype,
                    query_valid)
