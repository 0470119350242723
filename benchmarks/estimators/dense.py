"""Dense evaluation of a column plan, for measuring estimators at N <= a few thousand.

A plan gives every query block its columns and weights; `block_factor` scatters them into a
(G, nqb, Nk) factor (1 exact, summed 1/pi for sampled, 0 otherwise) and `query_factor` spreads it to the
queries, so that  out = ((A o W) V) / ((A o W) 1)  is exactly what the sparse computation returns.
"""
from __future__ import annotations

import torch


def block_factor(n_keys: int, cols: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """cols, weights (G, nqb, C) -> factor (G, nqb, Nk), repeated columns summed."""
    out = torch.zeros(*cols.shape[:-1], n_keys, dtype=weights.dtype, device=cols.device)
    return out.scatter_add_(-1, cols, weights)


def query_factor(factor: torch.Tensor, rows: torch.Tensor, n_queries: int) -> torch.Tensor:
    """Block factor (G, nqb, Nk) and each block's query rows (G, nqb, Bq) -> per query (G, Nq, Nk)."""
    groups, nqb, bq = rows.shape
    block_of = torch.empty(groups, n_queries, dtype=torch.long, device=rows.device)
    block_id = torch.arange(nqb, device=rows.device).repeat_interleave(bq).expand(groups, -1)  # (G, nqb*Bq)
    block_of.scatter_(1, rows.flatten(1), block_id)  # a padded (repeated) query keeps one block
    return torch.gather(factor, 1, block_of.unsqueeze(-1).expand(-1, -1, factor.shape[-1]))


def with_window(factor: torch.Tensor, window: int) -> torch.Tensor:
    """Entries |i - j| <= window computed exactly (factor 1), aligned bottom-right for Nq != Nk;
    window 0 is the diagonal alone, a negative window none."""
    if window < 0:
        return factor
    n_q, n_k = factor.shape[-2:]
    i = torch.arange(n_q, device=factor.device).unsqueeze(-1) + (n_k - n_q)
    band = (torch.arange(n_k, device=factor.device) - i).abs() <= window  # (Nq, Nk)
    return torch.where(band, torch.ones_like(factor), factor)


def dense_output(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, factor: torch.Tensor) -> torch.Tensor:
    """((A o W) V) / ((A o W) 1) in float32, A = exp(scale q k^T - max over the used entries), as the
    sparse computation shifts by the max over its own columns (no underflow of every used entry).
    -> (G, Nq, Dv)."""
    logits = (q.float() * scale) @ k.float().mT  # (G, Nq, Nk)
    shift = logits.masked_fill(factor <= 0, float("-inf")).amax(-1, keepdim=True)
    a = torch.exp((logits - shift).clamp_max(0).masked_fill(factor <= 0, float("-inf"))) * factor
    return (a @ v.float()) / a.sum(-1, keepdim=True)
