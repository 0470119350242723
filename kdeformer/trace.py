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
    Sampling (the query blocks are cut into `num_groups` sampling groups; 1 for "value_norm"/"uniform")
        sampled        (..., S)      sampled key indices with multiplicity, S = num_groups * draws per group
        sample_group   (..., S)      group that drew each sample
        weights        (..., S)      importance weight 1 / (draws * p) of each sample
        probs          (..., Nk)     sampling probabilities averaged over groups (0 on masked keys)
        group_probs    (..., ng, Nk) each group's sampling probabilities
        q_groups       (..., Nq)     sampling group of each query
        extras         dict          "column_norm" only: heavy_columns (..., ng, h) and
                                     heavy_columns_valid, estimate_rows (..., R) (token index of the
                                     queries used to estimate column norms), estimate_log_normalizer
                                     (..., R) and group_column_norms (..., ng, Nk)
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
    q_groups: torch.Tensor | None = None
    group_probs: torch.Tensor | None = None
    sample_group: torch.Tensor | None = None
    num_groups: int = 1
    extras: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.q_groups is None:
            self.q_groups = torch.zeros_like(self.q_blocks)
        if self.group_probs is None:
            self.group_probs = self.probs.unsqueeze(-2)
        if self.sample_group is None:
            self.sample_group = torch.zeros_like(self.sampled)

    # ------------------------------------------------------------------ small-N views
    def block_mask(self) -> torch.Tensor:
        """(..., Nq, Nk) bool: the block-diagonal entries (query's key block), in token order."""
        return (self.q_blocks.unsqueeze(-1) == self.k_blocks.unsqueeze(-2)) & (self.k_blocks.unsqueeze(-2) >= 0)

    def heavy_column_mask(self) -> torch.Tensor:
        """(..., Nq, Nk) bool: the heavy columns computed exactly for each query's group (none by default)."""
        lead_q = self.q_blocks.shape
        n_k = self.k_blocks.shape[-1]
        cols = self.extras.get("heavy_columns")
        if cols is None or cols.shape[-1] == 0:
            return torch.zeros(*lead_q, n_k, dtype=torch.bool, device=self.q_blocks.device)
        per_group = torch.zeros(*cols.shape[:-1], n_k, dtype=torch.bool, device=cols.device)
        per_group.scatter_(-1, cols, self.extras["heavy_columns_valid"])  # (..., ng, Nk)
        index = self.q_groups.unsqueeze(-1).expand(*lead_q, n_k)
        return torch.gather(per_group, -2, index)

    def heavy_mask(self) -> torch.Tensor:
        """(..., Nq, Nk) bool: every entry computed exactly (block diagonal and heavy columns)."""
        return self.block_mask() | self.heavy_column_mask()

    def sample_counts(self) -> torch.Tensor:
        """(..., Nk) how many times each key was drawn (all groups together)."""
        counts = torch.zeros(self.probs.shape, dtype=torch.int64, device=self.probs.device)
        return counts.scatter_add_(-1, self.sampled, torch.ones_like(self.sampled))

    def group_column_weights(self) -> torch.Tensor:
        """(..., ng, Nk) summed importance weights of each group's draws per key column."""
        shape = self.group_probs.shape
        flat = self.sample_group * shape[-1] + self.sampled  # (..., S) index into ng * Nk
        total = torch.zeros(*shape[:-2], shape[-2] * shape[-1], dtype=self.weights.dtype, device=self.weights.device)
        return total.scatter_add_(-1, flat, self.weights).view(shape)

    def column_weights(self) -> torch.Tensor:
        """(..., Nk) importance weight per key column, averaged over groups (for display)."""
        return self.group_column_weights().mean(-2)

    def excluded_mask(self) -> torch.Tensor:
        """(..., Nq, Nk) bool: drawn columns a query skips because it computes them exactly."""
        drawn = self.group_column_weights() > 0  # (..., ng, Nk)
        n_k = drawn.shape[-1]
        drawn_q = torch.gather(drawn, -2, self.q_groups.unsqueeze(-1).expand(*self.q_groups.shape, n_k))
        return self.heavy_mask() & drawn_q

    def attention_matrix(self) -> torch.Tensor:
        """(..., Nq, Nk) the approximate softmax matrix: `attention_matrix() @ value` equals the output.

        Entry (i, j) is exp(scale <q_i, k_j> - log D~_i) times 1 where it is computed exactly and times
        the query's group weight for column j (sum of 1 / (draws * p_j) over its draws) elsewhere.
        Materialises Nq x Nk: for small N only.
        """
        dtype = self.log_normalizer.dtype
        logits = self.scale * (self.query.to(dtype) @ self.key.to(dtype).mT)
        weights = self.group_column_weights()  # (..., ng, Nk)
        n_k = weights.shape[-1]
        per_query = torch.gather(weights, -2, self.q_groups.unsqueeze(-1).expand(*self.q_groups.shape, n_k))
        factor = torch.where(self.heavy_mask(), torch.ones_like(logits), per_query)
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
