"""What kde_attention computed, step by step, for drawing and for checking.

A trace is only built when `return_trace=True`; the fast path never allocates it.
Every tensor keeps the caller's leading dims (written `...` below, e.g. (B, H)).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class KDETrace:
    """Internals of one `kde_attention` call.

    Hashing and blocks
        projections    (..., D, r)   random hyperplane normals shared by the queries and keys of a head
        q_buckets      (..., Nq)     r-bit hash code of each query (int64, original token order)
        k_buckets      (..., Nk)     r-bit hash code of each key
        q_order        (..., Nq)     permutation sorting the queries by bucket rank (q[..., q_order, :] is sorted)
        k_order        (..., Nk)     the same for keys; masked keys sort last
        q_blocks       (..., Nq)     index of the key block whose entries this query computes exactly
        k_blocks       (..., Nk)     block index of each key, -1 for a masked key
        block_size     int           the requested `bucket_size`
        num_blocks     int           number of key blocks, ceil(Nk / bucket_size)
        key_block_len  (...,)        keys per block actually used (<= block_size; smaller with masks or
                                     when Nk is not a multiple of block_size: blocks are balanced)
    Sampling
        sampled        (..., s)      sampled key indices, with multiplicity
        probs          (..., Nk)     sampling probabilities (sum to 1 over unmasked keys, 0 on masked ones)
        weights        (..., s)      importance weight 1 / (s * p) of each sample
    Result
        log_normalizer (..., Nq)     estimated log D_i = log sum_j exp(scale <q_i, k_j>)
        heavy_fraction (..., Nq)     share of the estimated D_i that the exact block entries carry
        heavy_output   (..., Nq, Dv) block-diagonal part of the output (already divided by D~)
        sampled_output (..., Nq, Dv) sampled part of the output; heavy_output + sampled_output = output
    """

    query: torch.Tensor
    key: torch.Tensor
    scale: float
    key_mask: torch.Tensor | None
    projections: torch.Tensor
    q_buckets: torch.Tensor
    k_buckets: torch.Tensor
    q_order: torch.Tensor
    k_order: torch.Tensor
    q_blocks: torch.Tensor
    k_blocks: torch.Tensor
    block_size: int
    num_blocks: int
    key_block_len: torch.Tensor
    sampled: torch.Tensor
    probs: torch.Tensor
    weights: torch.Tensor
    log_normalizer: torch.Tensor
    heavy_fraction: torch.Tensor
    heavy_output: torch.Tensor
    sampled_output: torch.Tensor
    sampling: str = "value_norm"
    bucket_order: str = "gray"
    extras: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ small-N views
    def heavy_mask(self) -> torch.Tensor:
        """(..., Nq, Nk) bool: the entries computed exactly (the block diagonal, in token order)."""
        return (self.q_blocks.unsqueeze(-1) == self.k_blocks.unsqueeze(-2)) & (self.k_blocks.unsqueeze(-2) >= 0)

    def sample_counts(self) -> torch.Tensor:
        """(..., Nk) how many times each key was drawn."""
        counts = torch.zeros(self.probs.shape, dtype=torch.int64, device=self.probs.device)
        return counts.scatter_add_(-1, self.sampled, torch.ones_like(self.sampled))

    def column_weights(self) -> torch.Tensor:
        """(..., Nk) total importance weight per key column: count_j / (s p_j), 0 where never drawn."""
        s = self.sampled.shape[-1]
        counts = self.sample_counts().to(self.probs.dtype)
        return torch.where(counts > 0, counts / (s * self.probs.clamp_min(torch.finfo(self.probs.dtype).tiny)), 0.0)

    def excluded_mask(self) -> torch.Tensor:
        """(..., Nq, Nk) bool: sampled columns left out for a query because its block already holds them."""
        return self.heavy_mask() & (self.sample_counts() > 0).unsqueeze(-2)

    def attention_matrix(self) -> torch.Tensor:
        """(..., Nq, Nk) the approximate softmax matrix: `attention_matrix() @ value` equals the output.

        Entry (i, j) is exp(scale <q_i, k_j> - log D~_i) times 1 inside the query's block and times the
        sampled column weight count_j / (s p_j) outside it. Materialises Nq x Nk: for small N only.
        """
        logits = self.scale * (self.query.to(self.log_normalizer.dtype) @ self.key.to(self.log_normalizer.dtype).mT)
        heavy = self.heavy_mask()
        factor = torch.where(heavy, torch.ones_like(logits), self.column_weights().unsqueeze(-2))
        if self.key_mask is not None:
            factor = factor * self.key_mask.unsqueeze(-2)
        return torch.exp(logits - self.log_normalizer.unsqueeze(-1)) * factor


@dataclass
class ExactTrace:
    """Exact attention's internals: the softmax matrix and log D (small N only for the matrix)."""

    query: torch.Tensor
    key: torch.Tensor
    scale: float
    key_mask: torch.Tensor | None
    log_normalizer: torch.Tensor  # (..., Nq)

    def attention_matrix(self) -> torch.Tensor:
        """(..., Nq, Nk) the exact softmax matrix D^-1 A."""
        logits = self.scale * (self.query.to(self.log_normalizer.dtype) @ self.key.to(self.log_normalizer.dtype).mT)
        if self.key_mask is not None:
            logits = logits.masked_fill(~self.key_mask.unsqueeze(-2), float("-inf"))
        return torch.exp(logits - self.log_normalizer.unsqueeze(-1))
