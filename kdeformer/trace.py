"""What kde_attention computed, step by step, for drawing and for checking.

A trace is only built when `return_trace=True`; the fast path never allocates it.
Every tensor keeps the caller's leading dims (written `...` below, e.g. (B, H)).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .defaults import KDE_DEFAULTS

ROW_CHUNK = 256  # query rows whose columns are gathered at once by attention_rows


@dataclass
class KDETrace:
    """Internals of one `kde_attention` call.

    The columns each query used (the single source of every picture)
        row_block      (..., Nq)     column block of each query (-1 for a masked query: it used nothing)
        block_cols     (..., nb, C)  key index of each column of a block (token order, with multiplicity)
        block_weights  (..., nb, C)  weight of each column in the estimate: 1 computed exactly,
                                     1 / (draws * p) sampled, 0 unused (padding slot, a drawn key that
                                     the block already computes exactly, a key not visible to the query)
        block_exact    (..., nb, C)  bool, computed exactly (block keys, heavy columns, causal window)
        query_cols     (..., Nq, W)  key index of each query's own exact columns ("pps": its +-w token
                                     window; W = 0 otherwise). A block column that is also one of the
                                     query's own columns has weight 0 for that query (it counts once)
        query_weights  (..., Nq, W)  1 for a real own column, 0 for an unused slot (outside the keys)
      Query i's estimate is sum_c w_c exp(scale <q_i, k_c> - log D~_i) [v_c] over the columns c of its
      block and its own columns; `row_columns`, `attention_rows`, `exact_mask_rows` and `weight_rows` read these, and
      `attention_matrix()`, `heavy_mask()` are them for every row. (Causal traces give every query its
      own block.)
    Hashing and blocks
        projections    (..., D, r)   random hyperplane normals shared by the queries and keys of a head
        q_buckets      (..., Nq)     r-bit hash code of each query (int64, original token order)
        k_buckets      (..., Nk)     r-bit hash code of each key
        q_order        (..., Nq)     permutation sorting the queries by bucket rank (masked queries last)
        k_order        (..., Nk)     the same for keys; masked keys sort last
        q_blocks       (..., Nq)     index of the key block whose entries this query computes exactly
                                     (-1 for a masked query; the query chunk for causal traces)
        k_blocks       (..., Nk)     block index of each key, -1 for a masked key
        block_size     int           the requested `bucket_size`
        num_blocks     int           number of key blocks, ceil(n / bucket_size) for the n unmasked keys
                                     (the largest over the heads when their masks differ)
        key_block_len  (...,)        keys per block actually used (<= block_size: blocks are balanced)
    Sampling (the query blocks are cut into `num_groups` sampling groups; 1 for "value_norm"/"uniform")
        sampled        (..., S)      sampled key indices with multiplicity, S = num_groups * draws per group
        sample_group   (..., S)      group that drew each sample (-1: a padding slot of a masked head)
        weights        (..., S)      importance weight 1 / (draws * p) of each sample
        probs          (..., Nk)     sampling probabilities averaged over groups (0 on masked keys)
        group_probs    (..., ng, Nk) each group's sampling probabilities
        q_groups       (..., Nq)     sampling group of each query
        extras         dict          "column_norm" only: heavy_columns (..., ng, h) and
                                     heavy_columns_valid, estimate_rows (..., R) (token index of the
                                     queries used to estimate column norms), estimate_log_normalizer
                                     (..., R) and group_column_norms (..., ng, Nk)
    Result
        log_normalizer (..., Nq)     estimated log D_i = log sum_j exp(scale <q_i, k_j>) (0 if masked)
        heavy_fraction (..., Nq)     share of the estimated D_i that the exactly computed entries carry
        heavy_output   (..., Nq, Dv) exactly computed part of the output (already divided by D~)
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
    row_block: torch.Tensor
    block_cols: torch.Tensor
    block_weights: torch.Tensor
    block_exact: torch.Tensor
    sampling: str = KDE_DEFAULTS.sampling
    bucket_order: str = "gray"
    q_groups: torch.Tensor | None = None
    group_probs: torch.Tensor | None = None
    sample_group: torch.Tensor | None = None
    num_groups: int = 1
    extras: dict = field(default_factory=dict)
    query_mask: torch.Tensor | None = None  # (..., Nq) bool, True = real query
    is_causal: bool = False
    query_cols: torch.Tensor | None = None  # (..., Nq, W) each query's own exact columns (pps: its window)
    query_weights: torch.Tensor | None = None  # (..., Nq, W) 1 real, 0 unused

    def __post_init__(self):
        if self.q_groups is None:
            self.q_groups = torch.zeros_like(self.q_blocks)
        if self.group_probs is None:
            self.group_probs = self.probs.unsqueeze(-2)
        if self.sample_group is None:
            self.sample_group = torch.zeros_like(self.sampled)

    @property
    def num_queries(self) -> int:
        return self.row_block.shape[-1]

    @property
    def num_keys(self) -> int:
        return self.k_blocks.shape[-1]

    # ------------------------------------------------------------------ rows (any N)
    def _rows(self, rows) -> torch.Tensor:
        """Query indices as a 1-D int64 tensor on the trace's device.  # (R,)"""
        rows = torch.as_tensor(rows, dtype=torch.int64, device=self.row_block.device).reshape(-1)
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= self.num_queries):
            raise ValueError(f"rows must be query indices in [0, {self.num_queries - 1}], got {rows.tolist()[:8]}")
        return rows

    def row_columns(self, rows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The columns the given queries' estimates use.  rows (R,) ->

        cols (..., R, C) key indices, weights (..., R, C) (1 exact, summed 1/(s p) per draw, 0 unused),
        exact (..., R, C) bool (computed exactly and counted). A masked query has all weights 0.
        """
        rows = self._rows(rows)
        block = self.row_block[..., rows]  # (..., R)
        real = (block >= 0).unsqueeze(-1)  # (..., R, 1)
        index = block.clamp_min(0).unsqueeze(-1).expand(*block.shape, self.block_cols.shape[-1])  # (..., R, C)
        cols = torch.gather(self.block_cols, -2, index)
        weights = torch.gather(self.block_weights, -2, index) * real
        if self.query_cols is not None and self.query_cols.shape[-1]:
            return self._with_own_columns(rows, cols, weights, torch.gather(self.block_exact, -2, index), real)
        exact = torch.gather(self.block_exact, -2, index) & (weights > 0)
        return cols, weights, exact

    def _with_own_columns(self, rows, cols, weights, exact, real):
        """Block columns (..., R, C) joined with the queries' own columns (..., R, W); a block column
        that is one of the query's own gets weight 0 there (the query computes it once, exactly)."""
        own = self.query_cols[..., rows, :]  # (..., R, W)
        own_weights = self.query_weights[..., rows, :] * real
        in_own = ((cols.unsqueeze(-1) == own.unsqueeze(-2)) & (own_weights > 0).unsqueeze(-2)).any(-1)  # (..., R, C)
        weights = torch.cat([weights.masked_fill(in_own, 0), own_weights], -1)
        cols = torch.cat([cols, own], -1)
        exact = torch.cat([exact, torch.ones_like(own, dtype=torch.bool)], -1) & (weights > 0)
        return cols, weights, exact

    def _row_terms(self, rows, cols, weights) -> torch.Tensor:
        """w_c exp(scale <q_i, k_c> - log D~_i), computed in log space (finite for any logit).  # (..., R, C)"""
        dtype = self.log_normalizer.dtype
        q = self.query[..., rows, :].to(dtype)  # (..., R, D)
        k = torch.gather(self.key.to(dtype), -2, cols.flatten(-2).unsqueeze(-1).expand(*cols.shape[:-2], -1, self.key.shape[-1]))
        logits = self.scale * (q.unsqueeze(-2) @ k.view(*cols.shape, -1).mT).squeeze(-2)  # (..., R, C)
        log_w = torch.where(weights > 0, weights.clamp_min(1e-300).log(), float("-inf"))
        return torch.exp(logits - self.log_normalizer[..., rows].unsqueeze(-1) + log_w)

    def _scatter_rows(self, cols: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Sum values (..., R, C) into their key columns.  -> (..., R, Nk)"""
        total = torch.zeros(*cols.shape[:-1], self.num_keys, dtype=values.dtype, device=values.device)
        return total.scatter_add_(-1, cols, values)

    def attention_rows(self, rows) -> torch.Tensor:
        """Rows of the approximate softmax matrix: `attention_rows(rows) @ value` equals those output rows.

        (..., R, Nk), finite wherever the output is; built from the columns each query used only.
        """
        rows = self._rows(rows)
        if rows.numel() == 0:  # no rows asked: (..., 0, Nk)
            return self.weight_rows(rows)
        parts = []
        for chunk in rows.split(ROW_CHUNK):  # the gathered keys (..., r, C, D) stay bounded for any R
            cols, weights, _ = self.row_columns(chunk)
            parts.append(self._scatter_rows(cols, self._row_terms(chunk, cols, weights)))
        return torch.cat(parts, -2)

    def exact_mask_rows(self, rows) -> torch.Tensor:
        """(..., R, Nk) bool: the entries of these rows computed exactly (and counted)."""
        cols, _, exact = self.row_columns(rows)
        return self._scatter_rows(cols, exact.to(torch.int32)) > 0

    def weight_rows(self, rows) -> torch.Tensor:
        """(..., R, Nk) each entry's factor in the estimate: 1 exact, summed 1/(s p) sampled, 0 otherwise."""
        cols, weights, _ = self.row_columns(rows)
        return self._scatter_rows(cols, weights)

    # ------------------------------------------------------------------ small-N views
    def _all_rows(self) -> torch.Tensor:
        return torch.arange(self.num_queries, device=self.row_block.device)

    def block_mask(self) -> torch.Tensor:
        """(..., Nq, Nk) bool: the block-diagonal entries (query's key block), in token order."""
        return (self.q_blocks.unsqueeze(-1) == self.k_blocks.unsqueeze(-2)) & (self.k_blocks.unsqueeze(-2) >= 0) \
            & (self.q_blocks.unsqueeze(-1) >= 0)

    def heavy_column_mask(self) -> torch.Tensor:
        """(..., Nq, Nk) bool: the heavy columns computed exactly for each query's group (none by default)."""
        lead_q = self.q_blocks.shape
        n_k = self.k_blocks.shape[-1]
        cols = self.extras.get("heavy_columns")
        if cols is None or cols.shape[-1] == 0:
            return torch.zeros(*lead_q, n_k, dtype=torch.bool, device=self.q_blocks.device)
        per_group = torch.zeros(*cols.shape[:-1], n_k, dtype=torch.bool, device=cols.device)
        per_group.scatter_(-1, cols, self.extras["heavy_columns_valid"])  # (..., ng, Nk)
        index = self.q_groups.clamp_min(0).unsqueeze(-1).expand(*lead_q, n_k)
        return torch.gather(per_group, -2, index) & (self.q_groups >= 0).unsqueeze(-1)

    def heavy_mask(self) -> torch.Tensor:
        """(..., Nq, Nk) bool: every entry computed exactly (blocks, heavy columns, causal window)."""
        return self.exact_mask_rows(self._all_rows())

    def sample_counts(self) -> torch.Tensor:
        """(..., Nk) how many times each key was drawn (all groups together)."""
        counts = torch.zeros(self.probs.shape, dtype=torch.int64, device=self.probs.device)
        real = (self.sample_group >= 0).to(torch.int64)
        return counts.scatter_add_(-1, self.sampled, real)

    def group_column_weights(self) -> torch.Tensor:
        """(..., ng, Nk) summed importance weights of each group's draws per key column."""
        shape = self.group_probs.shape
        flat = self.sample_group.clamp_min(0) * shape[-1] + self.sampled  # (..., S) index into ng * Nk
        weights = self.weights * (self.sample_group >= 0)
        total = torch.zeros(*shape[:-2], shape[-2] * shape[-1], dtype=self.weights.dtype, device=self.weights.device)
        return total.scatter_add_(-1, flat, weights).view(shape)

    def column_weights(self) -> torch.Tensor:
        """(..., Nk) importance weight per key column, averaged over groups (for display)."""
        return self.group_column_weights().mean(-2)

    def excluded_mask(self) -> torch.Tensor:
        """(..., Nq, Nk) bool: drawn columns a query skips because it computes them exactly."""
        drawn = self.group_column_weights() > 0  # (..., ng, Nk)
        n_k = drawn.shape[-1]
        drawn_q = torch.gather(drawn, -2, self.q_groups.clamp_min(0).unsqueeze(-1).expand(*self.q_groups.shape, n_k))
        return self.heavy_mask() & drawn_q

    def attention_matrix(self) -> torch.Tensor:
        """(..., Nq, Nk) the approximate softmax matrix: `attention_matrix() @ value` equals the output.

        Entry (i, j) is exp(scale <q_i, k_j> - log D~_i) times 1 where it is computed exactly and times
        the summed weights of the query's draws of column j elsewhere; 0 for columns the query never
        used. Always finite. Materialises Nq x Nk: for small N (use `attention_rows` for a few rows).
        """
        return self.attention_rows(self._all_rows())


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


EXTRA_FIELDS = ("heavy_columns", "heavy_columns_valid", "estimate_rows", "estimate_log_normalizer", "group_column_norms",
                "inclusion_probs", "token_order")


def pack_trace(p, query: torch.Tensor, key: torch.Tensor, opts, parts: dict) -> KDETrace:
    """A KDETrace from the G-leading parts of one call: every tensor gets the caller's leading dims back.

    Fields a kernel does not produce (the causal kernel has no key blocks) get their neutral values.
    """
    lead, device = p.lead, query.device
    groups = p.groups
    parts = dict(parts)
    parts.setdefault("q_order", torch.arange(p.n_q, device=device).expand(groups, p.n_q))
    parts.setdefault("q_blocks", parts.get("q_groups", torch.zeros(groups, p.n_q, dtype=torch.int64, device=device)))
    parts.setdefault("k_blocks", torch.full((groups, p.n_k), -1, dtype=torch.int64, device=device))
    parts.setdefault("key_block_len", torch.full((groups,), opts.bucket_size, device=device))
    parts.setdefault("num_blocks", 1)
    if "probs" not in parts:
        parts["probs"] = parts["group_probs"].mean(1)  # (G, Nk)
    scalars = {name: parts.pop(name) for name in ("num_blocks", "num_groups")}
    extras = {name: parts.pop(name) for name in list(parts) if not isinstance(parts[name], torch.Tensor)}
    shaped = {name: t.reshape(tuple(lead) + tuple(t.shape[1:])) for name, t in parts.items()}
    extras.update({name: shaped.pop(name) for name in list(shaped)
                   if name in EXTRA_FIELDS or name not in KDETrace.__dataclass_fields__})
    return KDETrace(
        query=query, key=key, scale=p.scale, key_mask=p.mask, block_size=opts.bucket_size,
        sampling=opts.sampling, bucket_order=opts.bucket_order, extras=extras, is_causal=opts.is_causal,
        query_mask=None if p.query_valid is None else p.query_valid.view(*lead, p.n_q),
        num_blocks=int(scalars["num_blocks"]), num_groups=int(scalars.get("num_groups", 1)),
        **shaped,
    )
