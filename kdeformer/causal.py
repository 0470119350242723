"""Causal KDEformer: every query sees only its past, in its exact part and in its sampled part.

Shape legend (inputs are flattened, checked and compacted by `kde_attention`; no masks reach here):
    G   groups (batch x heads)   Nq queries   Nk keys   D head dim   Dv value dim   r hash bits
    L   query slots per chunk (bucket_size / 4) nc chunks = ceil((Nq + offset) / L)
    W   local key slots per chunk (L - 1 + w)   B bucket keys per query (= bucket_size)
    h   heavy columns per chunk (column_norm)   s' draws per chunk (sample_size - h)
    nr  bucket ranks that occur (at most min(2^r, Nq + Nk): `dense_ranks` renumbers them)
    gb, nb  heads and chunks of one batch of work

Query i sees keys [0, limits[i]) (bottom-right causal: limits = Nk - Nq + i + 1). Queries are laid
in slots, query i in slot i + offset with offset = (limits[0] - 1) mod L, and cut into chunks of L
slots, so chunk boundaries sit at own-token positions that are multiples of L whatever Nq is (a KV-cache
step falls in the same chunk as in the full sequence). Chunk c splits the keys its first slot may see
into a *pool* [0, p_c), p_c = max(0, limit of that slot - w) with w = `local_window` (default
bucket_size), and the *local* keys [p_c, ...):

1. local part (exact): query i computes the keys [p_c, limits[i]) exactly: its own token and at least
   the w keys before it, so its normaliser is never empty;
2. bucket part (exact): query i also computes the B pool keys nearest to it in bucket order. Keys are
   hashed and sorted once by (bucket rank, position); the pool of chunk c is a prefix by position, so
   the pool keys of one bucket are a prefix of that bucket's run in the sorted order. A histogram of
   the pool per chunk (keys counted from the chunk they enter the pool) gives, by `searchsorted`, the
   m-th pool key in bucket order, and a query's bucket is the run of B pool keys centred on where its
   own bucket falls. No query is sorted with any other: a query's exact set depends on it alone;
3. sampled part: chunk c draws s' columns with replacement from its pool with probabilities p that
   depend only on pool keys ("value_norm", "uniform": closed forms over prefix sums, no table) or also
   on estimation rows taken among the queries up to the chunk's first ("column_norm": one importance
   table per count of rows seen, shared by the chunks that saw it; the h largest estimated columns of
   the first such pool are computed exactly instead). A draw adds weight 1 / (s' p) for every query of
   the chunk whose exact set does not already hold it, so the sampled part is unbiased for the rest;
4. logits are shifted by the per-row maximum before exp; output = numerator / normaliser.

Output i therefore depends on q_i, the keys and values before limits[i], earlier queries (through the
estimation rows) and the counter-based draws, never on a later token. Every random number comes from
`kdeformer.random.Draws`, addressed by (head, chunk, draw): the projections from stream "projections"
(D, r) as in the non-causal path, the draws from "samples" (absolute chunk, s'); the estimation rows
sit at fixed positions (`estimation_schedule`: evenly spaced in doubling spans, independent of the
length), so a later token never moves them. With "value_norm" and "uniform", a chunked prefill or a single-token decode
step therefore reproduces the full sequence's rows (to float rounding); "column_norm" estimates from
the call's own earlier queries, so its decode steps are a different (still unbiased) estimate.
Probabilities and hashes are computed in float32 from inputs cast to float32, so float32 and float64
inputs that are exactly representable draw the same columns. Sampling probabilities are treated as
constants by autograd (gradients flow through the attended terms).

bucket_size >= Nk gives exact causal attention: every pool has at most Nk <= B keys, all in the bucket.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import sampling as schemes
from .core import bucket_ranks, gather_rows, hash_codes
from .defaults import KDE_DEFAULTS
from .random import Draws

# column_norm: weight of the mean over the last RECENT_ROWS estimation rows in each chunk's column norms
# (measured on MiniLM, two texts: error 0.085 -> 0.079 and 0.081 -> 0.077 at bucket 64 / samples 128)
RECENT_ROWS = 4
RECENT_MIX = 0.5
# One batch of work (heads x chunks) holds about this many entries in its largest temporary.
BATCH_ENTRIES = 1 << 23


def default_local_window(bucket_size: int) -> int:
    """Keys before each chunk's first query that every query of the chunk computes exactly: bucket_size
    (measured on MiniLM: w = B beats B/2 and B/4, also when the columns saved go to samples)."""
    return max(1, bucket_size)


def default_chunk_len(bucket_size: int) -> int:
    """Queries per chunk: bucket_size / 4 (measured: the error barely depends on it, while the local
    slots every query computes, L - 1 + w, shrink with it)."""
    return max(1, bucket_size // 4)


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
    offset: torch.Tensor  # (G,) empty slots before query 0, so chunks start at key positions cL
    first_chunk: torch.Tensor  # (G,) absolute index (own-token position // L) of each head's first chunk
    rows_per_level: int = 0  # column_norm: estimation rows per doubling span (see `estimation_schedule`)

    @property
    def num_slots(self) -> int:
        return self.num_chunks * self.chunk_len

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


def plan_causal(limits: torch.Tensor, n_keys: int, *, bucket_size, sample_size, local_window, sampling,
                heavy_columns, estimate_rows, chunk_len=None, bucket=None) -> CausalPlan:
    """Chunk length, local slots and column counts from the limits (G, Nq) and the settings.

    chunk_len (default `default_chunk_len`) and bucket (keys in each query's bucket, default bucket_size) can be
    set apart for design measurements; bucket=0 turns the bucket part off.
    """
    n_queries = limits.shape[-1]
    window = default_local_window(bucket_size) if local_window is None else max(1, local_window)
    chunk_len = default_chunk_len(bucket_size) if chunk_len is None else chunk_len
    bucket = bucket_size if bucket is None else bucket
    own = limits[:, 0] - 1  # (G,) key position of query 0's own token
    offset, first_chunk = own % chunk_len, own // chunk_len
    num_chunks = math.ceil((n_queries + int(offset.max())) / chunk_len)
    limit = slot_limits(limits, offset, num_chunks * chunk_len)  # (G, nc*L)
    starts = pool_starts(limit, chunk_len, window)  # (G, nc)
    last = limit[:, chunk_len - 1 :: chunk_len]  # (G, nc)
    local_slots = max(1, min(n_keys, int((last - starts).max())))
    heavy_columns = schemes.check_scheme_options(sampling, sample_size, heavy_columns, estimate_rows)[0]
    heavy, draws = min(heavy_columns, n_keys), sample_size - heavy_columns  # heavy ones are paid out of s
    rows = per_level = 0
    if sampling == "column_norm":
        per_level = estimate_rows or default_rows_per_level(sample_size)
        rows = len(estimation_schedule(n_queries, per_level, chunk_len))
    return CausalPlan(chunk_len, num_chunks, window, local_slots, min(bucket, n_keys), heavy, draws, rows,
                      offset, first_chunk, per_level)


def slot_queries(offset: torch.Tensor, n_queries: int, n_slots: int) -> torch.Tensor:
    """Query held by each slot: slot t holds query t - offset (empty slots repeat the nearest query).

    Slots put the queries of a head where their own tokens fall, so chunk boundaries sit at key positions
    that are multiples of L whatever Nq is: a KV-cache step sees the same chunk as the full sequence.
    offset (G,) -> (G, n_slots) int64
    """
    t = torch.arange(n_slots, device=offset.device)
    return (t - offset.unsqueeze(-1)).clamp(0, n_queries - 1)


def slot_limits(limits: torch.Tensor, offset: torch.Tensor, n_slots: int) -> torch.Tensor:
    """limits of every slot; an empty slot before query 0 gets the limit its position would have, so a
    chunk's pool start depends on its position only.  (G, Nq) -> (G, n_slots)"""
    before = (torch.arange(n_slots, device=limits.device) - offset.unsqueeze(-1)).clamp_max(0)  # (G, n_slots) <= 0
    return torch.gather(limits, 1, slot_queries(offset, limits.shape[1], n_slots)) + before


def pool_starts(limits: torch.Tensor, chunk_len: int, window: int) -> torch.Tensor:
    """p_c = max(0, limits[cL] - w): the first local key of each chunk.  (G, nc*L) -> (G, nc)"""
    return (limits[:, ::chunk_len] - window).clamp_min(0)


# --------------------------------------------------------------------------- per batch of heads
@dataclass
class HeadState:
    """What a batch of heads computes once for all its chunks."""

    k_order: torch.Tensor  # (gb, Nk) keys sorted by (bucket rank, position)
    k_rank: torch.Tensor  # (gb, Nk) bucket rank of each key
    rank_start: torch.Tensor  # (gb, nr + 1) where each rank's run starts in the sorted order
    sorted_pos: torch.Tensor  # (gb, Nk) place of each key (token order) in the sorted order
    entry_chunk: torch.Tensor  # (gb, Nk) first chunk whose pool holds the key (nc: none)
    q_rank: torch.Tensor  # (gb, nc*L) bucket rank of each (padded) query
    value_norm: torch.Tensor  # (gb, Nk) float64 of float32 ||[v_j, 1]||
    norm_prefix: torch.Tensor  # (gb, 2, Nk+1) float64 prefix sums of ||v~_j|| and ||v~_j||^2 by position
    rows_before: torch.Tensor | None  # (gb, nc) estimation rows at or before each chunk's first query
    rows: torch.Tensor | None  # (gb, R) token index of the estimation rows
    column_norms: "RowTables | None"  # column_norm's tables, one per count of estimation rows seen


def hash_ranks(x: torch.Tensor, projections: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """Bucket rank of each vector, hashed in float32.  x (gb, N, D) -> (gb, N) int64"""
    return ranks[hash_codes(x.float(), projections)]


def dense_ranks(q_rank: torch.Tensor, k_rank: torch.Tensor):
    """Renumber the bucket ranks that occur as 0, 1, ... in the same order, so the per-chunk histograms
    have at most Nq + Nk columns, not 2^r (the order, and so every window, is unchanged).

    -> q_rank (gb, Nq), k_rank (gb, Nk), number of ranks
    """
    present = torch.unique(torch.cat([q_rank.flatten(), k_rank.flatten()]))  # sorted
    return torch.searchsorted(present, q_rank), torch.searchsorted(present, k_rank), present.numel()


def sort_keys(k_rank: torch.Tensor, n_ranks: int):
    """Sort keys by (rank, position).  -> order (gb, Nk), start of each rank's run (gb, nr + 1), sorted
    place of each key (gb, Nk)."""
    order = torch.sort(k_rank, dim=-1, stable=True).indices
    counts = torch.zeros(k_rank.shape[0], n_ranks, dtype=torch.int64, device=k_rank.device)
    counts.scatter_add_(1, k_rank, torch.ones_like(k_rank))
    start = torch.nn.functional.pad(counts.cumsum(-1), (1, 0))  # (gb, nr + 1)
    place = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return order, start, place


def estimation_schedule(n_queries: int, per_level: int, chunk_len: int) -> list[int]:
    """Query positions of the estimation rows: `per_level` evenly spaced rows in each doubling span
    [0, 2L), [2L, 4L), [4L, 8L), ... (each starting at its span's start), cut at Nq.

    The positions depend on the settings alone, never on Nq or Nk beyond the cut, so a later token (or
    a later masked key) never moves an earlier row: strictly causal. Dense where few queries precede a
    chunk, sparse later; R ~ per_level * log2(Nq / L) rows costing about 3 * per_level * Nq * D in all.
    """
    rows, start, end = [], 0, 2 * chunk_len
    while start < n_queries:
        span = end - start
        rows += [start + j * span // per_level for j in range(per_level)]  # the first row is query 0
        start, end = end, 2 * end
    return sorted({r for r in rows if r < n_queries})


def default_rows_per_level(sample_size: int) -> int:
    """Estimation rows per doubling span. s // 4 measured on MiniLM under a causal mask (b = 64 / 128,
    mean of two seeds): 0.153 / 0.084, against 0.167 / 0.090 with s // 6 and 0.190 / 0.095 with s // 12."""
    return max(2, sample_size // 4)


def estimation_rows(plan, n_queries: int, groups: int, device) -> torch.Tensor:
    """The scheduled estimation rows of every head.  # (gb, R)"""
    rows = estimation_schedule(n_queries, plan.rows_per_level, plan.chunk_len)
    return torch.tensor(rows, dtype=torch.int64, device=device).expand(groups, -1).contiguous()


def row_spans(row_limit: torch.Tensor, n_keys: int):
    """Runs of consecutive estimation rows whose causal rows fit in the same power-of-two key prefix:
    yields (first row, end row, keys). Rows are sorted by position, so their limits grow."""
    widest = row_limit.max(0).values.tolist()  # (R,) the largest limit of each row over the heads
    first = 0
    while first < len(widest):
        width = min(n_keys, 1 << max(0, math.ceil(math.log2(max(1, widest[first])))))
        last = first + 1  # widest[first] <= width, and the limits grow with the row
        while last < len(widest) and widest[last] <= width:
            last += 1
        yield first, last, width
        first = last


def estimation_prefix(q, k, rows, limits, scale):
    """Prefix sums over the estimation rows of their squared causal attention rows.

    q (gb, Nq, D), k (gb, Nk, D), rows (gb, R), limits (gb, Nq) -> (gb, R+1, Nk) float64. The inputs are
    cast to float32 (so every dtype gives the same probabilities) and multiplied in float64: a float32
    GEMM rounds differently for different batch shapes, the float64 one of float32 values does not in
    practice (each product is exact), so how heads are batched never changes the draws.
    """
    q_rows = gather_rows(q.float(), rows).double() * scale  # (gb, R, D)
    keys = k.float().double()  # (gb, Nk, D)
    row_limit = torch.gather(limits, 1, rows)  # (gb, R)
    n_keys = k.shape[1]
    sq = q_rows.new_zeros(rows.shape[0], rows.shape[1], n_keys)  # (gb, R, Nk) squared rows of D^-1 A
    for first, last, width in row_spans(row_limit, n_keys):  # rows that see at most `width` keys
        logits = q_rows[:, first:last] @ keys[:, :width].mT  # (gb, r, width): no work past what they see
        visible = torch.arange(width, device=k.device) < row_limit[:, first:last].unsqueeze(-1)
        sq[:, first:last, :width] = torch.softmax(torch.where(visible, logits, float("-inf")), dim=-1).square()
    prefix = sq.cumsum(1)  # (gb, R, Nk)
    return torch.cat([torch.zeros_like(prefix[:, :1]), prefix], 1)


def head_state(q, k, v, limits, starts, offset, projections, ranks, draws: Draws, plan: CausalPlan, scale) -> HeadState:
    """Hash and sort the keys, rank the queries, and (column_norm) prepare the estimation rows.

    starts (gb, nc) = p_c, the pool size of each chunk; offset (gb,) empty slots before query 0.
    """
    q_rank, k_rank, n_ranks = dense_ranks(hash_ranks(q if scale >= 0 else -q, projections, ranks),
                                          hash_ranks(k, projections, ranks))  # (gb, Nq), (gb, Nk)
    q_rank = torch.gather(q_rank, 1, slot_queries(offset, q.shape[1], plan.num_slots))  # (gb, nc*L)
    k_order, rank_start, sorted_pos = sort_keys(k_rank, n_ranks)
    positions = torch.arange(k.shape[1], device=k.device).expand_as(k_rank).contiguous()
    entry_chunk = torch.searchsorted(starts, positions, right=True)  # (gb, Nk): chunks with p_c <= j
    norms = schemes.value_row_norms(v.float()).to(torch.float64)  # (gb, Nk)
    norm_prefix = torch.nn.functional.pad(torch.stack([norms, norms.square()], 1).cumsum(-1), (1, 0))
    rows_before = rows = tables = None
    if plan.estimate_rows:
        rows = estimation_rows(plan, q.shape[1], q.shape[0], q.device)  # (gb, R)
        first = torch.arange(plan.num_chunks, device=q.device) * plan.chunk_len - offset.unsqueeze(-1)  # (gb, nc)
        rows_before = torch.searchsorted(rows, first.contiguous(), right=True)  # rows at or before each start
        importance = row_importance(estimation_prefix(q, k, rows, limits, scale), norms)  # (gb, R+1, Nk)
        tables = row_tables(importance, starts, rows_before, plan.heavy)
    return HeadState(k_order, k_rank, rank_start, sorted_pos, entry_chunk, q_rank, norms, norm_prefix,
                     rows_before, rows, tables)


# --------------------------------------------------------------------------- per batch of chunks
def pool_rank_counts(state: HeadState, chunks: slice) -> torch.Tensor:
    """Pool keys of each chunk with a bucket rank below rho, for every rho.  -> (gb, nb, nr + 1)

    Counted from each key's entry chunk (a histogram per chunk, summed over the chunks), so nothing of
    size chunks x Nk is built; the last column is the pool size p_c.
    """
    gb, nb = state.k_rank.shape[0], chunks.stop - chunks.start
    n_ranks = state.rank_start.shape[-1] - 1
    row = (state.entry_chunk - chunks.start).clamp_min(0)  # (gb, Nk) keys already in at c0 count from row 0
    row = torch.where(state.entry_chunk < chunks.stop, row, nb)  # later keys go to a junk row
    hist = torch.zeros(gb, (nb + 1) * n_ranks, dtype=torch.int64, device=row.device)
    hist.scatter_add_(1, row * n_ranks + state.k_rank, torch.ones_like(row))
    counts = hist.view(gb, nb + 1, n_ranks)[:, :nb].cumsum(1)  # (gb, nb, nr) pool keys of each rank
    return torch.nn.functional.pad(counts.cumsum(-1), (1, 0))


def pool_keys(state: HeadState, below: torch.Tensor, pool_rank: torch.Tensor) -> torch.Tensor:
    """Token index of the key at each rank within its chunk's pool (sorted by (bucket, position)).

    below (gb, nb, nr + 1) from `pool_rank_counts`, pool_rank (gb, nb, X) in [0, p_c) -> (gb, nb, X)
    """
    gb, nb, width = pool_rank.shape
    rho = torch.searchsorted(below, pool_rank, right=True) - 1  # (gb, nb, X) bucket rank of that key
    rho = rho.clamp(0, below.shape[-1] - 2)
    within = pool_rank - torch.gather(below, -1, rho)  # its place among the pool keys of its bucket
    place = torch.gather(state.rank_start, 1, rho.view(gb, -1)).view_as(rho) + within  # (gb, nb, X)
    place = place.clamp(0, state.k_order.shape[-1] - 1)
    return torch.gather(state.k_order, 1, place.view(gb, -1)).view(gb, nb, width)


def bucket_windows(state: HeadState, below: torch.Tensor, q_rank: torch.Tensor, starts: torch.Tensor, size: int):
    """Each query's B pool keys around its bucket.  q_rank (gb, nb, L), starts (gb, nb).

    Returns the first pool rank of the window (gb, nb, L), its keys (gb, nb, L, B) (0 where unused)
    and which slots hold a pool key (gb, nb, L, B) bool.
    """
    gb, nb, length = q_rank.shape
    centre = (torch.gather(below, -1, q_rank) + torch.gather(below, -1, q_rank + 1)) // 2  # (gb, nb, L)
    last_start = (starts - size).clamp_min(0).unsqueeze(-1)  # (gb, nb, 1)
    first = torch.minimum((centre - size // 2).clamp_min(0), last_start)  # (gb, nb, L)
    rank = first.unsqueeze(-1) + torch.arange(size, device=first.device)  # (gb, nb, L, B)
    valid = rank < starts.view(gb, nb, 1, 1)
    keys = pool_keys(state, below, rank.view(gb, nb, length * size)).view_as(rank)
    return first, torch.where(valid, keys, 0), valid


def pool_rank_of(state: HeadState, below: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Rank within its chunk's pool of each pool key.  keys (gb, nb, X) -> (gb, nb, X)"""
    gb = keys.shape[0]
    rho = torch.gather(state.k_rank, 1, keys.view(gb, -1)).view_as(keys)
    place = torch.gather(state.sorted_pos, 1, keys.view(gb, -1)).view_as(keys)
    run_start = torch.gather(state.rank_start, 1, rho.view(gb, -1)).view_as(keys)
    return torch.gather(below, -1, rho) + place - run_start


def in_window(rank: torch.Tensor, first: torch.Tensor, size: int) -> torch.Tensor:
    """Whether each shared column (rank (gb, nb, X)) lies in each query's bucket (first (gb, nb, L)).

    -> (gb, nb, L, X) bool
    """
    rank, first = rank.unsqueeze(-2), first.unsqueeze(-1)
    return (rank >= first) & (rank < first + size)


def pool_mask(starts: torch.Tensor, n_keys: int) -> torch.Tensor:
    """Keys of each chunk's pool, token order.  starts (gb, nb) -> (gb, nb, Nk) bool"""
    return torch.arange(n_keys, device=starts.device) < starts.unsqueeze(-1)


def value_norm_mass(state: HeadState, starts: torch.Tensor):
    """Sums over each pool of ||v~_j|| and ||v~_j||^2.  starts (gb, nb) -> two (gb, nb) float64"""
    gb = starts.shape[0]
    sums = torch.gather(state.norm_prefix, 2, starts.view(gb, 1, -1).expand(gb, 2, starts.shape[1]))  # (gb, 2, nb)
    return sums[:, 0], sums[:, 1].clamp_min(1e-300)


def closed_form_probability(state: HeadState, starts, keys, sampling: str) -> torch.Tensor:
    """p of each key under its chunk's "uniform" or "value_norm" distribution (the authors'
    ||v~_j|| / sum ||v~||^2 + 1 / n over the pool, normalised).  keys (gb, nb, X) -> (gb, nb, X) float64"""
    size = starts.clamp_min(1).to(torch.float64).unsqueeze(-1)  # (gb, nb, 1)
    if sampling == "uniform":
        return (1.0 / size).expand(keys.shape)
    norm_sum, square_sum = (x.unsqueeze(-1) for x in value_norm_mass(state, starts))
    norms = torch.gather(state.value_norm, 1, keys.flatten(1)).view_as(keys)
    return (norms / square_sum + 1.0 / size) / (norm_sum / square_sum + 1.0)


def draw_closed_form(state: HeadState, starts, uniforms, sampling: str) -> torch.Tensor:
    """Draw from each pool without a chunks x Nk table: "uniform" by scaling, "value_norm" as a mixture
    of its norm part (inverse CDF on the shared prefix sums) and its uniform part, one uniform each.

    starts (gb, nb), uniforms (gb, nb, s') -> keys (gb, nb, s') in [0, p_c) (0 for an empty pool)
    """
    gb, nb, draws = uniforms.shape
    size = starts.to(torch.float64).unsqueeze(-1)  # (gb, nb, 1)
    last = (starts - 1).clamp_min(0).unsqueeze(-1)
    if sampling == "uniform":
        return torch.minimum((uniforms * size).long(), last)
    norm_sum, square_sum = (x.unsqueeze(-1) for x in value_norm_mass(state, starts))
    norm_share = (norm_sum / square_sum) / (norm_sum / square_sum + 1.0)  # (gb, nb, 1) mass of the norm part
    from_norm = uniforms < norm_share
    target = uniforms / norm_share.clamp_min(1e-300) * norm_sum  # (gb, nb, s') a point on the prefix sums
    by_norm = torch.searchsorted(state.norm_prefix[:, 0, 1:].contiguous(), target.view(gb, -1), right=True).view_as(target)
    by_count = ((uniforms - norm_share) / (1 - norm_share) * size).long()
    return torch.minimum(torch.where(from_norm, by_norm, by_count), last)


def row_importance(row_prefix: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """Estimated ||column j of D^-1 A|| * ||v~_j|| after the first r estimation rows, for every r: the
    mean of P_ij^2 over those rows, mixed (RECENT_MIX) with the mean over the last RECENT_ROWS of them.

    row_prefix (gb, R+1, Nk) prefix sums of P^2, norms (gb, Nk) -> (gb, R+1, Nk) float64 (row 0: zeros)
    """
    count = torch.arange(row_prefix.shape[1], device=row_prefix.device)  # (R+1,) rows seen
    mean_sq = row_prefix / count.clamp_min(1).view(1, -1, 1)
    if RECENT_ROWS and RECENT_MIX:
        since = (count - RECENT_ROWS).clamp_min(0)  # (R+1,)
        recent = (row_prefix - row_prefix[:, since]) / (count - since).clamp_min(1).view(1, -1, 1)
        mean_sq = (1 - RECENT_MIX) * mean_sq + RECENT_MIX * recent
    return mean_sq.clamp_min(0).sqrt() * norms.unsqueeze(1)


@dataclass
class RowTables:
    """column_norm's sampling state per count r of estimation rows seen (chunks with the same count share
    it, so no chunks x Nk table is built): importance with the heavy columns zeroed and its CDF."""

    importance: torch.Tensor  # (gb, R+1, Nk) float64, 0 on the heavy columns
    cdf: torch.Tensor  # (gb, (R+1) * Nk) row r holds r + (its normalised CDF), one sorted sequence
    total: torch.Tensor  # (gb, R+1) sum of each row
    heavy: torch.Tensor  # (gb, R+1, h) the h largest columns of the pool of the first chunk with r rows
    heavy_valid: torch.Tensor  # (gb, R+1, h) bool: a pool key (also a pool key of every later chunk)
    heavy_steps: torch.Tensor  # (gb, R+1, h) sorted valid heavy columns minus their rank (invalid: Nk)


def row_tables(importance: torch.Tensor, starts: torch.Tensor, rows_before: torch.Tensor, heavy: int) -> RowTables:
    """Heavy columns and CDFs of each row count.  importance (gb, R+1, Nk), starts / rows_before (gb, nc)."""
    gb, n_tables, n_keys = importance.shape
    count = torch.arange(n_tables, device=starts.device).expand(gb, -1).contiguous()  # (gb, R+1)
    first_chunk = torch.searchsorted(rows_before, count).clamp_max(starts.shape[1] - 1)  # (gb, R+1)
    first_pool = torch.gather(starts, 1, first_chunk)  # (gb, R+1) the smallest pool that uses row r's table
    allowed = torch.arange(n_keys, device=starts.device) < first_pool.unsqueeze(-1)  # (gb, R+1, Nk)
    allowed = allowed & (importance > 0)  # a key no estimation row has seen yet is never a heavy column
    cols, cols_valid = schemes.pick_heavy_columns(importance, allowed, heavy)  # (gb, R+1, h)
    # only the valid picks leave the sampling; which index fills an invalid slot (a tie) must not matter
    importance = importance.scatter(-1, cols, torch.gather(importance, -1, cols) * ~cols_valid)
    total = importance.sum(-1)  # (gb, R+1)
    cdf = (importance.cumsum(-1) / total.clamp_min(1e-300).unsqueeze(-1)).clamp_max(1) + count.unsqueeze(-1)
    ordered = torch.sort(torch.where(cols_valid, cols, n_keys), -1).values  # (gb, R+1, h)
    steps = torch.where(ordered < n_keys, ordered - torch.arange(heavy, device=starts.device), n_keys)
    return RowTables(importance, cdf.flatten(1), total, cols, cols_valid, steps)


def column_norm_probability(tables: RowTables, table: torch.Tensor, starts, keys) -> torch.Tensor:
    """p of each key under its chunk's column_norm distribution: (1 - f) importance / pool sum + f uniform
    over the pool's non-heavy keys (all uniform when the pool has no importance yet), 0 on heavy columns.

    table (gb, nb) row count of each chunk, starts (gb, nb), keys (gb, nb, X) -> (gb, nb, X) float64
    """
    gb, nb = table.shape
    n_keys = tables.importance.shape[-1]
    pool_sum, n_allowed, share = pool_importance(tables, table, starts)  # (gb, nb, 1) each
    flat = tables.importance.flatten(1)  # (gb, (R+1) * Nk)
    imp = torch.gather(flat, 1, (table.unsqueeze(-1) * n_keys + keys).flatten(1)).view_as(keys)
    heavy = torch.gather(tables.heavy, 1, table.unsqueeze(-1).expand(gb, nb, tables.heavy.shape[-1]))
    valid = torch.gather(tables.heavy_valid, 1, table.unsqueeze(-1).expand_as(heavy))
    is_heavy = ((keys.unsqueeze(-1) == heavy.unsqueeze(-2)) & valid.unsqueeze(-2)).any(-1)  # (gb, nb, X)
    p = share * imp / pool_sum.clamp_min(1e-300) + (1 - share) / n_allowed.clamp_min(1)
    return torch.where(is_heavy | (keys >= starts.unsqueeze(-1)) | (n_allowed < 1), 0.0, p)


def pool_importance(tables: RowTables, table: torch.Tensor, starts: torch.Tensor):
    """Per chunk: its pool's importance sum, its non-heavy pool keys, and the importance share (1 - f,
    or 0 before any importance).  -> three (gb, nb, 1)"""
    gb, nb = table.shape
    n_keys = tables.importance.shape[-1]
    last = table * n_keys + (starts - 1).clamp_min(0)  # (gb, nb) flat index of each pool's last key
    total = torch.gather(tables.total, 1, table)  # (gb, nb)
    cdf_last = torch.gather(tables.cdf, 1, last) - table  # normalised CDF at the pool's last key
    pool_sum = torch.where(starts > 0, cdf_last * total, 0.0)
    n_heavy = torch.gather(tables.heavy_valid.sum(-1), 1, table)  # (gb, nb)
    share = torch.where(pool_sum > 0, 1 - schemes.UNIFORM_FLOOR, 0.0)
    return pool_sum.unsqueeze(-1), (starts - n_heavy).unsqueeze(-1), share.unsqueeze(-1)


def draw_column_norm(tables: RowTables, table: torch.Tensor, starts, uniforms) -> torch.Tensor:
    """Draw from each chunk's column_norm distribution with one uniform each: the importance part by
    `searchsorted` on the shared CDF of its row count, the uniform part as the m-th non-heavy pool key.

    table, starts (gb, nb), uniforms (gb, nb, s') -> keys (gb, nb, s') in [0, p_c)
    """
    gb, nb, draws = uniforms.shape
    pool_sum, n_allowed, share = pool_importance(tables, table, starts)
    total = torch.gather(tables.total, 1, table).unsqueeze(-1)  # (gb, nb, 1)
    from_importance = uniforms < share
    target = table.unsqueeze(-1) + uniforms / share.clamp_min(1e-300) * pool_sum / total.clamp_min(1e-300)
    index = torch.searchsorted(tables.cdf, target.view(gb, -1), right=True).view_as(target)
    by_importance = index - table.unsqueeze(-1) * tables.importance.shape[-1]
    m = ((uniforms - share) / (1 - share) * n_allowed).long().clamp_min(0)  # (gb, nb, s') m-th allowed key
    steps = torch.gather(tables.heavy_steps, 1, table.unsqueeze(-1).expand(gb, nb, tables.heavy_steps.shape[-1]))
    by_count = m + torch.searchsorted(steps, m, right=True)  # skip the heavy columns at or below it
    last = (starts - 1).clamp_min(0).unsqueeze(-1)
    return torch.minimum(torch.where(from_importance, by_importance, by_count), last).clamp_min(0)


def probability_table(state: HeadState, starts: torch.Tensor, sampling: str) -> torch.Tensor:
    """The full (gb, nb, Nk) table of a closed-form scheme, for the trace only (small N)."""
    n_keys = state.k_order.shape[-1]
    keys = torch.arange(n_keys, device=starts.device).expand(*starts.shape, n_keys)
    return torch.where(pool_mask(starts, n_keys), closed_form_probability(state, starts, keys, sampling), 0.0)


def draw_chunk(state: HeadState, chunks: slice, starts, uniforms, sampling: str, heavy: int, want_table: bool):
    """Each chunk's draws, their weights 1 / (s' p) (0 for a chunk with nothing to draw), its heavy
    columns and validity, and its probability table (column_norm, or when `want_table`; else None)."""
    n_draws = uniforms.shape[-1]
    if sampling == "column_norm":
        tables, row_count = state.column_norms, state.rows_before[:, chunks]  # (gb, nb) table of each chunk
        index = row_count.unsqueeze(-1).expand(*row_count.shape, tables.heavy.shape[-1])
        cols, cols_valid = torch.gather(tables.heavy, 1, index), torch.gather(tables.heavy_valid, 1, index)
        keys = draw_column_norm(tables, row_count, starts, uniforms)
        p = column_norm_probability(tables, row_count, starts, keys)
        table = None
        if want_table:
            every = torch.arange(state.k_order.shape[-1], device=starts.device).expand(*starts.shape, -1)
            table = column_norm_probability(tables, row_count, starts, every)
    else:
        table = probability_table(state, starts, sampling) if want_table else None
        cols = torch.zeros(*starts.shape, 0, dtype=torch.int64, device=starts.device)
        cols_valid = cols.bool()
        keys = draw_closed_form(state, starts, uniforms, sampling)
        p = torch.where(starts.unsqueeze(-1) > 0, closed_form_probability(state, starts, keys, sampling), 0.0)
    weight = torch.where(p > 0, 1.0 / (n_draws * p.clamp_min(1e-300)), 0.0)
    return keys, weight, cols, cols_valid, table


@dataclass
class ChunkColumns:
    """The columns of one batch of chunks and each query's weight on them."""

    shared: torch.Tensor  # (gb, nb, W + h + s') token index: local slots, heavy columns, draws
    shared_weight: torch.Tensor  # (gb, nb, L, W + h + s') 1 exact, 1/(s' p) sampled, 0 unused / not visible
    bucket: torch.Tensor  # (gb, nb, L, B) token index of each query's bucket keys
    bucket_weight: torch.Tensor  # (gb, nb, L, B) 1 for a pool key, 0 for an unused slot
    probs: torch.Tensor | None  # (gb, nb, Nk) each chunk's draw probabilities (None: closed form, no trace)
    draws: torch.Tensor  # (gb, nb, s') drawn key columns
    draw_weight: torch.Tensor  # (gb, nb, s') 1 / (s' p) of each draw (before the per-query exclusion)
    heavy_valid: torch.Tensor  # (gb, nb, h) bool: heavy slots that hold a pool key


def local_columns(starts: torch.Tensor, limit: torch.Tensor, slots: int, n_keys: int):
    """Local key slots [p_c, p_c + W) of each chunk and whether each query sees them.

    starts (gb, nb), limit (gb, nb, L) -> keys (gb, nb, W), visible (gb, nb, L, W) bool
    """
    pos = starts.unsqueeze(-1) + torch.arange(slots, device=starts.device)  # (gb, nb, W)
    return pos.clamp_max(n_keys - 1), pos.unsqueeze(-2) < limit.unsqueeze(-1)


def chunk_columns(state: HeadState, plan: CausalPlan, chunks: slice, starts, limit, uniforms, sampling, dtype,
                  want_table: bool = False):
    """Every column of a batch of chunks: local, bucket, heavy and sampled, with per-query weights.

    starts (gb, nb), limit (gb, nb, L), uniforms (gb, nb, s').
    """
    gb, nb = starts.shape
    below = pool_rank_counts(state, chunks)  # (gb, nb, nr + 1)
    q_rank = state.q_rank[:, chunks.start * plan.chunk_len : chunks.stop * plan.chunk_len].view(gb, nb, -1)
    first, bucket, bucket_valid = bucket_windows(state, below, q_rank, starts, plan.bucket)
    local, local_visible = local_columns(starts, limit, plan.local_slots, state.k_order.shape[-1])
    draws, draw_weight, heavy, heavy_valid, table = draw_chunk(state, chunks, starts, uniforms, sampling, plan.heavy, want_table)
    heavy_weight = heavy_valid.unsqueeze(-2) & ~in_window(pool_rank_of(state, below, heavy), first, plan.bucket)
    kept = ~in_window(pool_rank_of(state, below, draws), first, plan.bucket)  # (gb, nb, L, s')
    shared_weight = torch.cat(
        [local_visible.to(dtype), heavy_weight.to(dtype), (draw_weight.unsqueeze(-2) * kept).to(dtype)], -1
    )  # (gb, nb, L, W + h + s')
    return ChunkColumns(
        torch.cat([local, heavy, draws], -1), shared_weight, bucket, bucket_valid.to(dtype), table, draws, draw_weight,
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
def batch_sizes(groups: int, plan: CausalPlan, n_keys: int, width: int, n_ranks: int, tables: bool) -> tuple[int, int]:
    """Heads per batch and chunks per batch, so one batch's temporaries stay near BATCH_ENTRIES.

    width = D + Dv; n_ranks: columns of each chunk's pool histogram; `tables`: the batch builds chunks x Nk
    probability tables (for a trace).
    """
    per_chunk = (plan.chunk_len * plan.bucket + plan.shared_cols) * width + 3 * plan.chunk_len * plan.n_cols
    per_chunk += 3 * n_ranks + (6 * n_keys if tables else 0)
    chunks = max(1, min(plan.num_chunks, BATCH_ENTRIES // per_chunk))
    per_head = max(chunks * per_chunk, (5 * plan.estimate_rows + 8) * n_keys)
    heads = max(1, min(groups, BATCH_ENTRIES // per_head)) if chunks == plan.num_chunks else 1
    return heads, chunks


def trace_piece(cols: ChunkColumns, plan: CausalPlan, limit, shift, t_shared, t_bucket, normaliser, v_shared) -> dict:
    """The trace fields of one batch of chunks: per query (gb, nb*L, ...) and per chunk (gb, nb, ...).

    A column of weight 0 is given the query's own token (limit - 1) as its key, so block_cols never
    names a key the query cannot see and exp(logit - log D) stays finite on every column.
    """
    w, h = plan.local_slots, plan.heavy
    shared = cols.shared.unsqueeze(-2).expand(*cols.shared_weight.shape)  # (gb, nb, L, Cs)
    block_cols = torch.cat([shared[..., :w], cols.bucket, shared[..., w:]], -1)  # (gb, nb, L, C)
    block_weights = torch.cat([cols.shared_weight[..., :w], cols.bucket_weight, cols.shared_weight[..., w:]], -1)
    block_cols = torch.where(block_weights > 0, block_cols, (limit - 1).unsqueeze(-1))
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
    limit = slot_limits(limits, plan.offset, plan.num_slots)  # (G, nc*L)
    starts = pool_starts(limit, length, plan.window)  # (G, nc)
    q_pad = gather_rows(q, slot_queries(plan.offset, n_q, plan.num_slots))  # (G, nc*L, D)
    tables = return_trace  # chunks x Nk probability tables are built for the trace only
    heads_per_batch, chunks_per_batch = batch_sizes(groups, plan, n_k, dim + dim_v, min(ranks.numel(), n_q + n_k), tables)
    outs, pieces, states = [], [], []
    for g0 in range(0, groups, heads_per_batch):
        g1 = min(groups, g0 + heads_per_batch)
        sub = draws.subset(torch.arange(g0, g1, device=q.device))
        state = head_state(q[g0:g1].detach(), k[g0:g1].detach(), v[g0:g1].detach(), limits[g0:g1],
                           starts[g0:g1], plan.offset[g0:g1], projections[g0:g1], ranks, sub, plan, scale)
        uniforms = chunk_uniforms(sub, plan.first_chunk[g0:g1], n_chunks, plan.draws)  # (gb, nc, s')
        head_outs, head_pieces = [], []
        for c0 in range(0, n_chunks, chunks_per_batch):
            chunks = slice(c0, min(n_chunks, c0 + chunks_per_batch))
            rows = slice(chunks.start * length, chunks.stop * length)
            gb, nb = g1 - g0, chunks.stop - chunks.start
            cols = chunk_columns(state, plan, chunks, starts[g0:g1, chunks], limit[g0:g1, rows].view(gb, nb, length),
                                 uniforms[:, chunks], sampling, dtype, return_trace)
            q_chunk = q_pad[g0:g1, rows].reshape(gb, nb, length, dim) * scale  # (gb, nb, L, D)
            shift, t_shared, t_bucket, numerator, normaliser, v_shared = attend_chunk(q_chunk, k[g0:g1], v[g0:g1], cols)
            head_outs.append((numerator / normaliser.unsqueeze(-1)).flatten(1, 2))  # (gb, nb*L, Dv)
            if return_trace:
                head_pieces.append(trace_piece(cols, plan, limit[g0:g1, rows].view(gb, nb, length), shift, t_shared,
                                               t_bucket, normaliser, v_shared))
        outs.append(torch.cat(head_outs, 1))
        pieces.append(head_pieces)
        states.append(state)
    out = query_rows(torch.cat(outs, 0), plan.offset, n_q)  # (G, Nq, Dv)
    if not return_trace:
        return out, None
    return out, causal_trace_parts(join_pieces(pieces), states, q if scale >= 0 else -q, k, out, projections, starts, plan)


def chunk_uniforms(draws: Draws, first_chunk: torch.Tensor, n_chunks: int, n_draws: int) -> torch.Tensor:
    """The draws' uniforms of each head's chunks, addressed by absolute chunk (own-token position // L).

    first_chunk (gb,) -> (gb, nc, s') float64
    """
    every = draws.uniform("samples", (int(first_chunk.max()) + n_chunks, n_draws))  # (gb, all chunks, s')
    index = first_chunk.view(-1, 1) + torch.arange(n_chunks, device=first_chunk.device)  # (gb, nc)
    return torch.gather(every, 1, index.unsqueeze(-1).expand(*index.shape, n_draws))


def query_rows(x: torch.Tensor, offset: torch.Tensor, n_queries: int) -> torch.Tensor:
    """Per-slot rows back in query order (query i sits in slot i + offset).  x (G, nc*L, ...) -> (G, Nq, ...)"""
    index = torch.arange(n_queries, device=x.device) + offset.unsqueeze(-1)  # (G, Nq)
    index = index.view(*index.shape, *([1] * (x.dim() - 2))).expand(*index.shape, *x.shape[2:])
    return torch.gather(x, 1, index)


def causal_trace_parts(joined: dict, states: list[HeadState], q, k, out, projections, starts, plan: CausalPlan) -> dict:
    """The parts dict the trace is built from (every field (G, ...), see `causal_kde`); q as hashed."""
    groups, n_q = q.shape[:2]
    dtype, device = q.dtype, q.device
    parts = {name: query_rows(x, plan.offset, n_q) for name, x in joined.items() if name in
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
        q_groups=(torch.arange(n_q, device=device) + plan.offset.unsqueeze(-1)) // plan.chunk_len,
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
