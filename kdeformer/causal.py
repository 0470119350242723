"""Causal KDEformer: every query sees only its past, in its exact part and in its sampled part.

Shape legend (inputs are flattened, checked and compacted by `kde_attention`; no masks reach here):
    G   groups (batch x heads)   Nq queries   Nk keys   D head dim   Dv value dim   r hash bits
    L   queries per chunk (= bucket_size)     nc chunks = ceil(Nq / L)
    W   local key slots per chunk             B bucket keys per query (= bucket_size)
    h   heavy columns per chunk (column_norm)  s' draws per chunk (sample_size - h)
    gb, nb  heads and chunks of one batch of work

Query i sees keys [0, limits[i]) (bottom-right causal: limits = Nk - Nq + i + 1). Queries are cut by
position into chunks of L; chunk c starts at query cL and splits the keys it may see into a *pool*
[0, p_c), p_c = max(0, limits[cL] - w) with w = `local_window`, and the *local* keys [p_c, ...):

1. local part (exact): query i computes the keys [p_c, limits[i]) exactly: its own token and at least
   the w keys before it, so its normaliser is never empty;
2. bucket part (exact): query i also computes the B pool keys nearest to it in bucket order. Keys are
   hashed and sorted once by (bucket rank, position); the pool of chunk c is a prefix by position, so
   per-chunk prefix counts over that sorted order give each pool key its rank among the pool, and a
   query's bucket is the run of B pool keys centred on where its own bucket falls (found with
   `searchsorted`). No query is sorted with any other, so a query's exact set depends on it alone;
3. sampled part: chunk c draws s' columns with replacement from its pool with probabilities p that
   depend only on pool keys ("value_norm", "uniform") or also on estimation rows taken among queries
   <= cL ("column_norm"; its h largest estimated columns are computed exactly instead). A draw adds
   weight 1 / (s' p) for every query of the chunk whose exact set does not already hold it;
4. logits are shifted by the per-row maximum before exp; output = numerator / normaliser.

Output i therefore depends on q_i, the keys and values before limits[i], earlier queries (through the
estimation rows) and the counter-based draws, never on a later token. Every random number comes from
`kdeformer.random.Draws`, addressed by (head, chunk, draw): the projections from stream "projections"
(D, r) as in the non-causal path, the draws from "samples" (nc, s'), the estimation rows from
"estimate_rows" (R,). Probabilities and hashes are computed in float32 from inputs cast to float32, so
float32 and float64 inputs that are exactly representable draw the same columns.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import sampling as colnorm
from .core import bucket_ranks, gather_rows, hash_codes
from .defaults import KDE_DEFAULTS
from .random import Draws, inverse_cdf

# One batch of work (heads x chunks) holds about this many entries in its largest temporary.
BATCH_ENTRIES = 1 << 22


def default_local_window(bucket_size: int) -> int:
    """Keys before each chunk's first query that every query of the chunk computes exactly."""
    return max(1, bucket_size // 2)


# --------------------------------------------------------------------------- plan
@dataclass
class CausalPlan:
    """Sizes shared by every chunk of one call (see `plan_causal`)."""

    chunk_len: int  # L: queries per chunk
    num_chunks: int  # nc
    window: int  # w: keys before the chunk start that are local
    local_slots: int  # W: local key slots per chunk (covers [p_c, limits of the chunk's last query))
    bucket: int  # B: bucket keys per query
    heavy: int  # h: heavy columns per chunk
    draws: int  # s': sampled columns per chunk
    estimate_rows: int  # R: estimation rows per head (column_norm), 0 otherwise

    @property
    def shared_cols(self) -> int:
        """Columns every query of a chunk shares: local, heavy, sampled."""
        return self.local_slots + self.heavy + self.draws

    @property
    def n_exact(self) -> int:
        return self.local_slots + self.bucket + self.heavy

    @property
    def n_cols(self) -> int:
        return self.n_exact + self.draws


def resolve_heavy_columns(sampling: str, sample_size: int, heavy_columns: int | None) -> int:
    """column_norm: the given count (default sample_size // 4); other schemes: 0."""
    if sampling != "column_norm":
        return 0
    return sample_size // 4 if heavy_columns is None else heavy_columns


def plan_causal(limits: torch.Tensor, n_keys: int, *, bucket_size, sample_size, local_window, sampling,
                heavy_columns, estimate_rows, chunk_len=None, bucket=None) -> CausalPlan:
    """Chunk length, local slots and column counts from the limits (G, Nq) and the settings.

    chunk_len (default bucket_size) and bucket (keys in each query's bucket, default bucket_size) can be
    set apart for design measurements; bucket=0 turns the bucket part off.
    """
    n_queries = limits.shape[-1]
    window = default_local_window(bucket_size) if local_window is None else max(1, local_window)
    chunk_len = bucket_size if chunk_len is None else chunk_len
    bucket = bucket_size if bucket is None else bucket
    num_chunks = math.ceil(n_queries / chunk_len)
    starts = pool_starts(padded_limits(limits, num_chunks * chunk_len), chunk_len, window)  # (G, nc)
    last = padded_limits(limits, num_chunks * chunk_len)[:, chunk_len - 1 :: chunk_len]  # (G, nc)
    local_slots = max(1, min(n_keys, int((last - starts).max())))
    heavy = min(resolve_heavy_columns(sampling, sample_size, heavy_columns), n_keys)
    draws = sample_size - resolve_heavy_columns(sampling, sample_size, heavy_columns)
    rows = 0
    if sampling == "column_norm":
        rows = estimate_rows or colnorm.default_estimate_rows(sample_size, n_queries, n_keys)
    return CausalPlan(chunk_len, num_chunks, window, local_slots, min(bucket, n_keys), heavy, draws, rows)


def padded_limits(limits: torch.Tensor, length: int) -> torch.Tensor:
    """Limits of `length` query slots, the slots past Nq repeating the last query.  # (G, length)"""
    pos = torch.arange(length, device=limits.device).clamp_max(limits.shape[-1] - 1)
    return limits[:, pos]


def pool_starts(limits: torch.Tensor, chunk_len: int, window: int) -> torch.Tensor:
    """p_c = max(0, limits[cL] - w): the first local key of each chunk.  (G, nc*L) -> (G, nc)"""
    return (limits[:, ::chunk_len] - window).clamp_min(0)


# --------------------------------------------------------------------------- per batch of heads
@dataclass
class HeadState:
    """What a batch of heads computes once for all its chunks."""

    k_order: torch.Tensor  # (gb, Nk) keys sorted by (bucket rank, position)
    sorted_rank: torch.Tensor  # (gb, Nk) bucket rank of each sorted key
    sorted_pos: torch.Tensor  # (gb, Nk) place of each key (token order) in the sorted order
    q_rank: torch.Tensor  # (gb, nc*L) bucket rank of each (padded) query
    value_norm: torch.Tensor  # (gb, Nk) float64 of float32 ||[v_j, 1]||
    row_prefix: torch.Tensor | None  # (gb, R+1, Nk) float64 prefix sums of estimation rows' P^2
    rows_before: torch.Tensor | None  # (gb, nc) estimation rows at or before each chunk's first query
    rows: torch.Tensor | None  # (gb, R) token index of the estimation rows


def hash_ranks(x: torch.Tensor, projections: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """Bucket rank of each vector, hashed in float32.  x (gb, N, D) -> (gb, N) int64"""
    return ranks[hash_codes(x.float(), projections)]


def sort_keys(k_rank: torch.Tensor):
    """Sort keys by (rank, position).  -> order, sorted ranks, sorted place of each key; all (gb, Nk)."""
    sorted_rank, order = torch.sort(k_rank, dim=-1, stable=True)
    place = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return order, sorted_rank, place


def estimation_rows(draws: Draws, n_rows: int, n_queries: int) -> torch.Tensor:
    """R stratified query positions per head, one per stretch of ceil(Nq / R), sorted.  # (gb, R)"""
    stride = math.ceil(n_queries / n_rows)
    jitter = draws.uniform("estimate_rows", (n_rows,))  # (gb, R)
    base = torch.arange(n_rows, device=jitter.device) * stride
    return (base + (jitter * stride).long()).clamp_max(n_queries - 1)


def estimation_prefix(q, k, rows, limits, scale):
    """Prefix sums over the estimation rows of their squared causal attention rows.

    q (gb, Nq, D), k (gb, Nk, D), rows (gb, R), limits (gb, Nq) -> (gb, R+1, Nk) float64, all in float32
    before the sum (so every dtype gives the same probabilities).
    """
    q_rows = gather_rows(q.float(), rows) * scale  # (gb, R, D)
    logits = q_rows @ k.float().mT  # (gb, R, Nk)
    row_limit = torch.gather(limits, 1, rows)  # (gb, R)
    visible = torch.arange(k.shape[1], device=k.device) < row_limit.unsqueeze(-1)  # (gb, R, Nk)
    probs = torch.softmax(torch.where(visible, logits, float("-inf")), dim=-1)  # (gb, R, Nk)
    prefix = probs.square().to(torch.float64).cumsum(1)  # (gb, R, Nk)
    return torch.cat([torch.zeros_like(prefix[:, :1]), prefix], 1)


def head_state(q, k, v, limits, projections, ranks, draws: Draws, plan: CausalPlan, scale) -> HeadState:
    """Hash and sort the keys, rank the queries, and (column_norm) prepare the estimation rows."""
    q_rank = hash_ranks(q if scale >= 0 else -q, projections, ranks)  # (gb, Nq)
    q_rank = padded_limits(q_rank, plan.num_chunks * plan.chunk_len)  # (gb, nc*L): pads repeat the last
    k_order, sorted_rank, sorted_pos = sort_keys(hash_ranks(k, projections, ranks))
    norms = colnorm.value_row_norms(v.float()).to(torch.float64)  # (gb, Nk)
    row_prefix = rows_before = rows = None
    if plan.estimate_rows:
        rows = estimation_rows(draws, plan.estimate_rows, q.shape[1])  # (gb, R)
        row_prefix = estimation_prefix(q, k, rows, limits, scale)
        starts = torch.arange(plan.num_chunks, device=q.device) * plan.chunk_len  # (nc,)
        rows_before = torch.searchsorted(rows, starts.expand(rows.shape[0], -1).contiguous(), right=True)
    return HeadState(k_order, sorted_rank, sorted_pos, q_rank, norms, row_prefix, rows_before, rows)


# --------------------------------------------------------------------------- per batch of chunks
@dataclass
class PoolIndex:
    """Chunk pools seen through the sorted key order."""

    count: torch.Tensor  # (gb, nb, Nk+1) pool keys among the first j sorted keys (count[..., 0] = 0)
    keys: torch.Tensor  # (gb, nb, Nk+1) token index of the m-th pool key in sorted order (slots >= p_c: junk)


def pool_index(state: HeadState, starts: torch.Tensor) -> PoolIndex:
    """Prefix counts of each chunk's pool over the sorted keys.  starts (gb, nb) = p_c."""
    n_keys = state.k_order.shape[-1]
    in_pool = state.k_order.unsqueeze(1) < starts.unsqueeze(-1)  # (gb, nb, Nk) in sorted order
    count = in_pool.cumsum(-1)  # (gb, nb, Nk)
    slot = torch.where(in_pool, count - 1, n_keys)  # non-pool keys go to a junk slot
    keys = torch.zeros(*in_pool.shape[:-1], n_keys + 1, dtype=torch.int64, device=starts.device)
    keys.scatter_(-1, slot, state.k_order.unsqueeze(1).expand_as(slot))
    return PoolIndex(torch.nn.functional.pad(count, (1, 0)), keys)


def bucket_windows(state: HeadState, pool: PoolIndex, q_rank: torch.Tensor, starts: torch.Tensor, size: int):
    """Each query's B pool keys around its bucket.  q_rank (gb, nb, L), starts (gb, nb).

    Returns the first pool rank of the window (gb, nb, L), its keys (gb, nb, L, B) (0 where unused)
    and which slots hold a pool key (gb, nb, L, B) bool.
    """
    gb, nb, length = q_rank.shape
    flat = q_rank.reshape(gb, nb * length)  # (gb, nb*L)
    lo = torch.searchsorted(state.sorted_rank, flat, right=False).view(gb, nb, length)
    hi = torch.searchsorted(state.sorted_rank, flat, right=True).view(gb, nb, length)
    centre = (torch.gather(pool.count, -1, lo) + torch.gather(pool.count, -1, hi)) // 2  # (gb, nb, L)
    last_start = (starts - size).clamp_min(0).unsqueeze(-1)  # (gb, nb, 1)
    first = torch.minimum((centre - size // 2).clamp_min(0), last_start)  # (gb, nb, L)
    rank = first.unsqueeze(-1) + torch.arange(size, device=first.device)  # (gb, nb, L, B)
    valid = rank < starts.view(gb, nb, 1, 1)
    keys = torch.gather(pool.keys, -1, rank.clamp_max(pool.keys.shape[-1] - 1).view(gb, nb, -1)).view_as(rank)
    return first, torch.where(valid, keys, 0), valid


def pool_rank(state: HeadState, pool: PoolIndex, keys: torch.Tensor) -> torch.Tensor:
    """Rank among its chunk's pool (in sorted order) of each pool key.  keys (gb, nb, X) -> (gb, nb, X)"""
    place = torch.gather(state.sorted_pos, 1, keys.flatten(1)).view_as(keys)
    return torch.gather(pool.count, -1, place + 1) - 1


def in_window(rank: torch.Tensor, first: torch.Tensor, size: int) -> torch.Tensor:
    """Whether each shared column (rank (gb, nb, X)) lies in each query's bucket (first (gb, nb, L)).

    -> (gb, nb, L, X) bool
    """
    rank, first = rank.unsqueeze(-2), first.unsqueeze(-1)
    return (rank >= first) & (rank < first + size)


def pool_mask(starts: torch.Tensor, n_keys: int) -> torch.Tensor:
    """Keys of each chunk's pool, token order.  starts (gb, nb) -> (gb, nb, Nk) bool"""
    return torch.arange(n_keys, device=starts.device) < starts.unsqueeze(-1)


def value_norm_probabilities(norms: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """The authors' p_j ~ ||v~_j|| / sum ||v~||^2 + 1/n over each pool.  norms (gb, Nk), pool (gb, nb, Nk)."""
    norms = norms.unsqueeze(1)  # (gb, 1, Nk)
    size = pool.sum(-1, keepdim=True).clamp_min(1)  # (gb, nb, 1)
    square = torch.where(pool, norms.square(), 0.0).sum(-1, keepdim=True).clamp_min(1e-300)
    return torch.where(pool, norms / square + 1.0 / size, 0.0)


def column_norm_importance(state: HeadState, chunks: slice, pool: torch.Tensor) -> torch.Tensor:
    """Estimated ||column j of D^-1 A|| * ||v~_j|| from the estimation rows at or before each chunk start.

    -> (gb, nb, Nk) float64, 0 outside the pool (and everywhere for a chunk with no rows before it).
    """
    before = state.rows_before[:, chunks]  # (gb, nb)
    index = before.unsqueeze(-1).expand(*before.shape, state.row_prefix.shape[-1])
    mean_sq = torch.gather(state.row_prefix, 1, index) / before.clamp_min(1).unsqueeze(-1)  # (gb, nb, Nk)
    return torch.where(pool, mean_sq.clamp_min(0).sqrt() * state.value_norm.unsqueeze(1), 0.0)


def chunk_probabilities(state: HeadState, chunks: slice, starts: torch.Tensor, sampling: str, heavy: int):
    """Each chunk's draw probabilities over its pool, and (column_norm) its heavy columns.

    -> probs (gb, nb, Nk) float64 (rows sum to 1, or to 0 when nothing is left to draw),
       heavy columns (gb, nb, h) int64 and their validity (gb, nb, h) bool.
    """
    pool = pool_mask(starts, state.k_order.shape[-1])  # (gb, nb, Nk)
    empty = torch.zeros(*starts.shape, 0, dtype=torch.int64, device=starts.device)
    cols, cols_valid = empty, empty.bool()
    if sampling == "uniform":
        weight = pool.to(torch.float64)
    elif sampling == "value_norm":
        weight = value_norm_probabilities(state.value_norm, pool)
    else:
        importance = column_norm_importance(state, chunks, pool)
        if heavy:
            cols, cols_valid = colnorm.pick_heavy_columns(importance, pool, heavy)
            pool = pool.scatter(-1, cols, False)
        weight = colnorm.mix_with_floor(importance * pool, pool)
    total = weight.sum(-1, keepdim=True)
    return torch.where(total > 0, weight / total.clamp_min(1e-300), 0.0), cols, cols_valid


def draw_columns(probs: torch.Tensor, uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw each chunk's columns by inverse CDF; weight 1 / (s' p), 0 for a chunk with nothing to draw.

    probs (gb, nb, Nk), uniforms (gb, nb, s') -> columns (gb, nb, s') int64, weights (gb, nb, s') float64
    """
    cols = inverse_cdf(probs, uniforms)
    p = torch.gather(probs, -1, cols)
    return cols, torch.where(p > 0, 1.0 / (uniforms.shape[-1] * p.clamp_min(1e-300)), 0.0)


@dataclass
class ChunkColumns:
    """The columns of one batch of chunks and each query's weight on them."""

    shared: torch.Tensor  # (gb, nb, W + h + s') token index: local slots, heavy columns, draws
    shared_weight: torch.Tensor  # (gb, nb, L, W + h + s') 1 exact, 1/(s' p) sampled, 0 unused / not visible
    bucket: torch.Tensor  # (gb, nb, L, B) token index of each query's bucket keys
    bucket_weight: torch.Tensor  # (gb, nb, L, B) 1 for a pool key, 0 for an unused slot
    probs: torch.Tensor  # (gb, nb, Nk) each chunk's draw probabilities
    draws: torch.Tensor  # (gb, nb, s') drawn key columns
    draw_weight: torch.Tensor  # (gb, nb, s') 1 / (s' p) of each draw (before the per-query exclusion)
    heavy_valid: torch.Tensor  # (gb, nb, h) bool: heavy slots that hold a pool key


def local_columns(starts: torch.Tensor, limit: torch.Tensor, slots: int, n_keys: int):
    """Local key slots [p_c, p_c + W) of each chunk and whether each query sees them.

    starts (gb, nb), limit (gb, nb, L) -> keys (gb, nb, W), visible (gb, nb, L, W) bool
    """
    pos = starts.unsqueeze(-1) + torch.arange(slots, device=starts.device)  # (gb, nb, W)
    return pos.clamp_max(n_keys - 1), pos.unsqueeze(-2) < limit.unsqueeze(-1)


def chunk_columns(state: HeadState, plan: CausalPlan, chunks: slice, starts, limit, uniforms, sampling, dtype):
    """Every column of a batch of chunks: local, bucket, heavy and sampled, with per-query weights.

    starts (gb, nb), limit (gb, nb, L), uniforms (gb, nb, s').
    """
    gb, nb = starts.shape
    pool = pool_index(state, starts)
    q_rank = state.q_rank[:, chunks.start * plan.chunk_len : chunks.stop * plan.chunk_len].view(gb, nb, -1)
    first, bucket, bucket_valid = bucket_windows(state, pool, q_rank, starts, plan.bucket)
    local, local_visible = local_columns(starts, limit, plan.local_slots, state.k_order.shape[-1])
    probs, heavy, heavy_valid = chunk_probabilities(state, chunks, starts, sampling, plan.heavy)
    draws, draw_weight = draw_columns(probs, uniforms)
    heavy_weight = heavy_valid.unsqueeze(-2) & ~in_window(pool_rank(state, pool, heavy), first, plan.bucket)
    kept = ~in_window(pool_rank(state, pool, draws), first, plan.bucket)  # (gb, nb, L, s')
    shared_weight = torch.cat(
        [local_visible.to(dtype), heavy_weight.to(dtype), (draw_weight.unsqueeze(-2) * kept).to(dtype)], -1
    )  # (gb, nb, L, W + h + s')
    return ChunkColumns(
        torch.cat([local, heavy, draws], -1), shared_weight, bucket, bucket_valid.to(dtype), probs, draws, draw_weight,
        heavy_valid,
    )


def masked_logits(logits: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """-inf where a column has weight 0 (unused, not visible, or already exact), so it never sets the shift."""
    return torch.where(weight > 0, logits, float("-inf"))


def attend_chunk(q_chunk, k, v, cols: ChunkColumns):
    """Every query of a batch of chunks against its shared and bucket columns, in one shifted pass.

    q_chunk (gb, nb, L, D) scaled; k (gb, Nk, D), v (gb, Nk, Dv).
    Returns shift (gb, nb, L), shared terms exp(l - shift) * weight (gb, nb, L, W+h+s'), bucket terms
    (gb, nb, L, B), the numerator (gb, nb, L, Dv) and the normaliser (gb, nb, L).
    The own token is a local column of weight 1, so the shift is finite and the normaliser >= 1/s'.
    """
    k_shared, v_shared = gather_rows(k, cols.shared), gather_rows(v, cols.shared)  # (gb, nb, Cs, D / Dv)
    k_bucket, v_bucket = gather_rows(k, cols.bucket), gather_rows(v, cols.bucket)  # (gb, nb, L, B, D / Dv)
    l_shared = masked_logits(q_chunk @ k_shared.mT, cols.shared_weight)  # (gb, nb, L, Cs)
    l_bucket = masked_logits((q_chunk.unsqueeze(-2) @ k_bucket.mT).squeeze(-2), cols.bucket_weight)  # (gb, nb, L, B)
    shift = l_shared.amax(-1) if l_bucket.shape[-1] == 0 else torch.maximum(l_shared.amax(-1), l_bucket.amax(-1))
    shift = shift.detach()  # (gb, nb, L)
    t_shared = torch.exp(l_shared - shift.unsqueeze(-1)) * cols.shared_weight
    t_bucket = torch.exp(l_bucket - shift.unsqueeze(-1)) * cols.bucket_weight
    numerator = t_shared @ v_shared + (t_bucket.unsqueeze(-2) @ v_bucket).squeeze(-2)  # (gb, nb, L, Dv)
    normaliser = t_shared.sum(-1) + t_bucket.sum(-1)  # (gb, nb, L)
    return shift, t_shared, t_bucket, numerator, normaliser, v_shared


# --------------------------------------------------------------------------- the entry point
def batch_sizes(groups: int, plan: CausalPlan, n_keys: int, width: int) -> tuple[int, int]:
    """Heads per batch and chunks per batch, so one batch's temporaries stay near BATCH_ENTRIES."""
    per_chunk = plan.chunk_len * (plan.bucket + plan.shared_cols) * width + 4 * (n_keys + 1)
    chunks = max(1, min(plan.num_chunks, BATCH_ENTRIES // per_chunk))
    per_head = max(chunks * per_chunk, (2 * plan.estimate_rows + 4) * n_keys)
    heads = max(1, min(groups, BATCH_ENTRIES // per_head)) if chunks == plan.num_chunks else 1
    return heads, chunks


def trace_piece(cols: ChunkColumns, plan: CausalPlan, shift, t_shared, t_bucket, normaliser, v_shared) -> dict:
    """The trace fields of one batch of chunks: per query (gb, nb*L, ...) and per chunk (gb, nb, ...)."""
    w, h = plan.local_slots, plan.heavy
    shared = cols.shared.unsqueeze(-2).expand(*cols.shared_weight.shape)  # (gb, nb, L, Cs)
    block_cols = torch.cat([shared[..., :w], cols.bucket, shared[..., w:]], -1)  # (gb, nb, L, C)
    block_weights = torch.cat([cols.shared_weight[..., :w], cols.bucket_weight, cols.shared_weight[..., w:]], -1)
    exact_sum = t_shared[..., : w + h].sum(-1) + t_bucket.sum(-1)  # (gb, nb, L)
    sampled = (t_shared[..., w + h :] @ v_shared[..., w + h :, :]) / normaliser.unsqueeze(-1)  # (gb, nb, L, Dv)
    per_query = {
        "block_cols": block_cols, "block_weights": block_weights,
        "log_normalizer": shift + normaliser.log(), "heavy_fraction": exact_sum / normaliser,
        "sampled_output": sampled,
    }
    per_query = {name: x.flatten(1, 2) for name, x in per_query.items()}  # (gb, nb*L, ...)
    per_chunk = {
        "group_probs": cols.probs, "sampled": cols.draws, "weights": cols.draw_weight,
        "heavy_columns": cols.shared[..., w : w + h], "heavy_columns_valid": cols.heavy_valid,
    }
    return {**per_query, **per_chunk}


def join_pieces(pieces: list[list[dict]]) -> dict:
    """Concatenate trace pieces over chunk batches (dim 1), then over head batches (dim 0)."""
    heads = [{name: torch.cat([p[name] for p in row], 1) for name in row[0]} for row in pieces]
    return {name: torch.cat([h[name] for h in heads], 0) for name in heads[0]}


def causal_kde(q, k, v, *, limits, scale, bucket_size, sample_size, num_projs, sampling, bucket_order,
               local_window, heavy_columns, estimate_rows, draws: Draws, return_trace):
    """Strictly causal KDEformer attention of checked, flattened, compacted inputs (see the module doc).

    q (G, Nq, D), k (G, Nk, D), v (G, Nk, Dv) in the working dtype, unscaled; limits (G, Nq) int64,
    non-decreasing, >= 1: query i sees keys [0, limits[g, i]). Returns (out (G, Nq, Dv), parts or None),
    parts holding the trace fields in the unified row representation (`causal_trace_parts`).
    """
    groups, n_q, dim = q.shape
    n_k, dim_v, dtype = k.shape[1], v.shape[-1], q.dtype
    plan = plan_causal(limits, n_k, bucket_size=bucket_size, sample_size=sample_size, local_window=local_window,
                       sampling=sampling, heavy_columns=heavy_columns, estimate_rows=estimate_rows)
    length, n_chunks = plan.chunk_len, plan.num_chunks
    projections = draws.normal("projections", (dim, num_projs))  # (G, D, r) float32
    ranks = bucket_ranks(num_projs, bucket_order, q.device)  # (2^r,)
    limit = padded_limits(limits, n_chunks * length)  # (G, nc*L)
    starts = pool_starts(limit, length, plan.window)  # (G, nc)
    q_pad = q[:, torch.arange(n_chunks * length, device=q.device).clamp_max(n_q - 1)]  # (G, nc*L, D)
    heads_per_batch, chunks_per_batch = batch_sizes(groups, plan, n_k, max(dim, dim_v))
    outs, pieces, states = [], [], []
    for g0 in range(0, groups, heads_per_batch):
        g1 = min(groups, g0 + heads_per_batch)
        sub = draws.subset(torch.arange(g0, g1, device=q.device))
        state = head_state(q[g0:g1].detach(), k[g0:g1].detach(), v[g0:g1].detach(), limits[g0:g1],
                           projections[g0:g1], ranks, sub, plan, scale)
        uniforms = sub.uniform("samples", (n_chunks, plan.draws))  # (gb, nc, s')
        head_outs, head_pieces = [], []
        for c0 in range(0, n_chunks, chunks_per_batch):
            chunks = slice(c0, min(n_chunks, c0 + chunks_per_batch))
            rows = slice(chunks.start * length, chunks.stop * length)
            gb, nb = g1 - g0, chunks.stop - chunks.start
            cols = chunk_columns(state, plan, chunks, starts[g0:g1, chunks], limit[g0:g1, rows].view(gb, nb, length),
                                 uniforms[:, chunks], sampling, dtype)
            q_chunk = q_pad[g0:g1, rows].reshape(gb, nb, length, dim) * scale  # (gb, nb, L, D)
            shift, t_shared, t_bucket, numerator, normaliser, v_shared = attend_chunk(q_chunk, k[g0:g1], v[g0:g1], cols)
            head_outs.append((numerator / normaliser.unsqueeze(-1)).flatten(1, 2))  # (gb, nb*L, Dv)
            if return_trace:
                head_pieces.append(trace_piece(cols, plan, shift, t_shared, t_bucket, normaliser, v_shared))
        outs.append(torch.cat(head_outs, 1))
        pieces.append(head_pieces)
        states.append(state)
    out = torch.cat(outs, 0)[:, :n_q]  # (G, Nq, Dv)
    if not return_trace:
        return out, None
    return out, causal_trace_parts(join_pieces(pieces), states, q if scale >= 0 else -q, k, out, projections, starts, plan)


def causal_trace_parts(joined: dict, states: list[HeadState], q, k, out, projections, starts, plan: CausalPlan) -> dict:
    """The parts dict the trace is built from (every field (G, ...), see `causal_kde`); q as hashed."""
    groups, n_q = q.shape[:2]
    dtype, device = q.dtype, q.device
    parts = {name: x[:, :n_q] for name, x in joined.items() if name in
             ("block_cols", "block_weights", "log_normalizer", "heavy_fraction", "sampled_output")}
    parts["heavy_output"] = out - parts["sampled_output"]
    n_draws = joined["sampled"].shape[-1]
    chunk_of_draw = torch.arange(plan.num_chunks, device=device).repeat_interleave(n_draws)  # (nc*s',)
    parts.update(
        row_block=torch.arange(n_q, device=device).expand(groups, n_q),
        n_exact=plan.n_exact,
        projections=projections.to(dtype),
        q_buckets=hash_codes(q.detach().float(), projections),
        k_buckets=hash_codes(k.detach().float(), projections),
        k_order=torch.cat([s.k_order for s in states], 0),
        sampled=joined["sampled"].flatten(1),
        weights=joined["weights"].flatten(1).to(dtype),
        sample_group=chunk_of_draw.expand(groups, -1),
        group_probs=joined["group_probs"].to(dtype),
        q_groups=(torch.arange(n_q, device=device) // plan.chunk_len).expand(groups, n_q),
        num_groups=plan.num_chunks,
        extras={
            "heavy_columns": joined["heavy_columns"], "heavy_columns_valid": joined["heavy_columns_valid"],
            "pool_start": starts, "chunk_len": plan.chunk_len, "local_window": plan.window,
        },
    )
    if plan.estimate_rows:
        parts["extras"]["estimate_rows"] = torch.cat([s.rows for s in states], 0)
    return parts


def bottom_right_limits(n_queries: int, n_keys: int, device=None) -> torch.Tensor:
    """limits[i] = Nk - Nq + i + 1 (at least 1): bottom-right causal alignment.  # (1, Nq) int64"""
    return (torch.arange(n_queries, device=device) + (n_keys - n_queries + 1)).clamp_min(1).unsqueeze(0)


def causal_multiply_adds(n_queries: int, n_keys: int, dim: int, dim_v: int, *, bucket_size: int = KDE_DEFAULTS.bucket_size,
                         sample_size: int = KDE_DEFAULTS.sample_size, local_window: int | None = KDE_DEFAULTS.local_window,
                         num_projs: int = KDE_DEFAULTS.num_projs, sampling: str = KDE_DEFAULTS.sampling,
                         heavy_columns: int | None = KDE_DEFAULTS.heavy_columns,
                         estimate_rows: int | None = KDE_DEFAULTS.estimate_rows) -> int:
    """Multiply-adds `causal_kde` spends on one head with bottom-right causal limits.

    Counts what is computed, padding slots included: hashing (Nq + Nk) D r; per (padded) query its
    W + B + h + s' columns, each a logit (D) and a value row (Dv); the estimation rows R Nk D.
    """
    limits = bottom_right_limits(n_queries, n_keys)
    plan = plan_causal(limits, n_keys, bucket_size=bucket_size, sample_size=sample_size, local_window=local_window,
                       sampling=sampling, heavy_columns=heavy_columns, estimate_rows=estimate_rows)
    hashing = (n_queries + n_keys) * dim * num_projs
    columns = plan.num_chunks * plan.chunk_len * plan.n_cols * (dim + dim_v)
    return hashing + columns + plan.estimate_rows * n_keys * dim
