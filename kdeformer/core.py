"""KDEformer attention: sort-LSH heavy blocks plus importance-sampled columns, in plain torch.

Shape legend (the caller's leading dims are flattened into one group dim G = B * H * ...):
    G   batch x heads        Nq  queries       Nk  keys         D  head dim      Dv  value dim
    r   hash bits (num_projs)  nb  key blocks    nqb query blocks  Bk key block slots  Bq query block length
    ng  sampling groups      s'  draws per group  h  heavy columns per group  C = Bk + h + s' columns per block

`kde_attention` runs these steps, one function each, in this order:
    check_kde_options -> prepare (kdeformer._inputs) -> masks compacted away (kdeformer.masking)
    -> hyperplanes -> hash_codes -> bucket_ranks -> sort_by_bucket -> plan_blocks -> block_queries
    -> block_keys -> plan_sampling (kdeformer.sampling: value_norm | uniform | column_norm) -> draw_columns
    -> assemble_columns -> attend_columns (attend_block_columns per chunk of query blocks)
    -> pack_trace (kdeformer.trace)
sampling="pps" (the default, `kdeformer.pps`) has no key blocks and its own pass (`kde_pps`):
    hyperplanes -> hash_codes (queries) -> sort_by_bucket -> pps.plan_pps (order, centroids, capped PPS,
    systematic draws) -> attend_pps (attend_blocks per chunk of query blocks -> merge_window per chunk
    of token rows: each query's exact +-w window, one shift, the division) -> pps.trace_parts
Causal attention (`is_causal=True`) takes the same first and last steps around `kdeformer.causal`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import pps
from . import sampling as schemes
from ._checks import check_choice, check_flag, check_int, check_positive_int
from ._inputs import prepare, working_dtype  # working_dtype re-exported: the methods import it from here
from .defaults import KDE_DEFAULTS
from .random import Draws, head_index

MAX_PROJS = 16
BUCKET_ORDERS = ("gray", "authors", "binary")
SAMPLINGS = schemes.SAMPLINGS


# --------------------------------------------------------------------------- options
@dataclass(frozen=True)
class KDEOptions:
    """kde_attention's settings after checking (heavy_columns resolved to a number)."""

    bucket_size: int
    sample_size: int
    num_projs: int
    sampling: str
    bucket_order: str
    heavy_columns: int
    estimate_rows: int | None
    is_causal: bool
    local_window: int | None

    @property
    def num_draws(self) -> int:
        """Draws per sampling group: the heavy columns are paid for out of sample_size."""
        return self.sample_size - self.heavy_columns


def check_kde_options(
    *,
    bucket_size=KDE_DEFAULTS.bucket_size,
    sample_size=KDE_DEFAULTS.sample_size,
    num_projs=KDE_DEFAULTS.num_projs,
    sampling=KDE_DEFAULTS.sampling,
    bucket_order=KDE_DEFAULTS.bucket_order,
    heavy_columns=KDE_DEFAULTS.heavy_columns,
    estimate_rows=KDE_DEFAULTS.estimate_rows,
    is_causal=False,
    local_window=KDE_DEFAULTS.local_window,
) -> KDEOptions:
    """Check every KDEformer setting (one ValueError naming the argument and its allowed range).

    The Hugging Face plug-in and the explorer call this too, so a bad setting fails where it is made.
    """
    bucket_size = check_positive_int("bucket_size", bucket_size)
    sample_size = check_positive_int("sample_size", sample_size)
    num_projs = check_positive_int("num_projs", num_projs, maximum=MAX_PROJS)
    check_choice("sampling", sampling, SAMPLINGS)
    check_choice("bucket_order", bucket_order, BUCKET_ORDERS)
    check_flag("is_causal", is_causal)
    sampling = schemes.resolve_sampling(sampling, is_causal)
    heavy_columns, estimate_rows = schemes.check_scheme_options(sampling, sample_size, heavy_columns, estimate_rows)
    if local_window is not None:
        if not is_causal:
            raise ValueError("local_window needs is_causal=True (it sizes the causal local window)")
        local_window = check_int("local_window", local_window, minimum=0)
    return KDEOptions(bucket_size, sample_size, num_projs, sampling, bucket_order, heavy_columns, estimate_rows,
                      is_causal, local_window)


# --------------------------------------------------------------------------- step 1: hashing
def draw_projections(groups: int, dim: int, num_projs: int, *, dtype, device, generator) -> torch.Tensor:
    """r Gaussian hyperplane normals per head from a torch.Generator (the peers' hashing).  # (G, D, r)"""
    return torch.randn(groups, dim, num_projs, device=device, generator=generator).to(dtype)


def hyperplanes(draws: Draws, dim: int, num_projs: int) -> torch.Tensor:
    """r Gaussian hyperplane normals per head from its own stream (shared by batch items).  # (G, D, r) float32"""
    return draws.normal("projections", (dim, num_projs))


def hash_codes(x: torch.Tensor, projections: torch.Tensor) -> torch.Tensor:
    """Angular LSH: bit i of a vector's code is 1 when it lies on the positive side of hyperplane i.

    x (G, N, D), projections (G, D, r) -> codes (G, N) int64 in [0, 2^r).
    """
    num_projs = projections.shape[-1]
    bits = (x @ projections.to(x.dtype)) > 0  # (G, N, r)
    powers = 2 ** torch.arange(num_projs, device=x.device, dtype=torch.int64)  # (r,)
    return (bits.to(torch.int64) * powers).sum(-1)


def gray_code(n: torch.Tensor) -> torch.Tensor:
    """The n-th word of the reflected binary Gray sequence."""
    return n ^ (n >> 1)


def inverse_gray_code(g: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Position of code g in the Gray sequence (so that gray_code(inverse_gray_code(g)) == g)."""
    n = g.clone()
    shift = 1
    while shift < num_bits:
        n = n ^ (n >> shift)
        shift *= 2
    return n


def bucket_ranks(num_projs: int, order: str, device) -> torch.Tensor:
    """Sort key of every bucket code: table[code] = rank.  # (2^r,)

    "gray":    codes in Gray-sequence order, so buckets next to each other differ in exactly one bit.
    "authors": the authors' code sorts by gray_code(code); neighbours may differ in several bits.
    "binary":  plain numeric order of the codes (neighbours may differ in all bits).
    """
    codes = torch.arange(2**num_projs, device=device, dtype=torch.int64)
    if order == "gray":
        return inverse_gray_code(codes, num_projs)
    if order == "authors":
        return gray_code(codes)
    return codes


def sort_by_bucket(codes: torch.Tensor, ranks: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Stable sort of tokens by bucket rank; masked tokens go last.  codes (G, N) -> order (G, N)."""
    key = ranks[codes]  # (G, N)
    if valid is not None:
        key = torch.where(valid, key, ranks.numel())
    return torch.sort(key, dim=-1, stable=True).indices


def hash_and_sort(q: torch.Tensor, k: torch.Tensor, scale: float, opts: KDEOptions, draws: Draws) -> dict:
    """Hash queries and keys with shared hyperplanes and sort both by bucket rank.

    Hashing runs in float32 whatever the dtype, so exactly representable inputs get the same codes in
    every dtype. A negative scale flips which keys are "close": the queries are hashed as -q then.
    Returns projections (G, D, r), q_codes (G, Nq), k_codes (G, Nk), q_order (G, Nq), k_order (G, Nk).
    """
    projections = hyperplanes(draws, q.shape[-1], opts.num_projs)  # (G, D, r)
    q32, k32 = q.detach().float(), k.detach().float()
    q_codes = hash_codes(q32 if scale >= 0 else -q32, projections)  # (G, Nq)
    k_codes = hash_codes(k32, projections)  # (G, Nk)
    ranks = bucket_ranks(opts.num_projs, opts.bucket_order, q.device)  # (2^r,)
    return {"projections": projections, "q_codes": q_codes, "k_codes": k_codes,
            "q_order": sort_by_bucket(q_codes, ranks), "k_order": sort_by_bucket(k_codes, ranks)}


# --------------------------------------------------------------------------- step 2: blocks
@dataclass
class BlockPlan:
    """How sorted queries and keys are cut into blocks (see `plan_blocks`)."""

    num_blocks: int  # nb = ceil(Nk / bucket_size): key blocks
    key_slots: int  # Bk = balanced key block length, ceil(Nk / nb) <= bucket_size
    q_block_len: int  # Bq = ceil(Nq / nb)
    num_q_blocks: int  # nqb = ceil(Nq / Bq) <= nb
    pair: torch.Tensor  # (nqb,) key block computed exactly for each query block

    @property
    def key_block_len(self) -> int:
        """Keys per block (balanced: every block but possibly the last holds this many)."""
        return self.key_slots


def plan_blocks(n_queries: int, n_keys: int, bucket_size: int, device=None) -> BlockPlan:
    """Cut the sorted keys into nb = ceil(Nk / bucket_size) balanced blocks of ceil(Nk / nb) keys and the
    sorted queries into blocks of ceil(Nq / nb); query block b computes key block pair[b] exactly.

    (Masked tokens never reach this step: `kdeformer.masking` removes them first, so padding takes no
    block room.) `kdeformer.methods._lsh.make_blocks` cuts differently on purpose: the peers reproduce
    their papers' fixed chunks, this plan balances blocks so no key block is a sliver.
    """
    num_blocks = max(1, math.ceil(n_keys / bucket_size))
    key_slots = math.ceil(n_keys / num_blocks)
    used_key_blocks = math.ceil(n_keys / key_slots)
    q_block_len = math.ceil(n_queries / num_blocks)
    num_q_blocks = math.ceil(n_queries / q_block_len)
    pair = torch.arange(num_q_blocks, device=device) * used_key_blocks // num_q_blocks  # (nqb,)
    return BlockPlan(num_blocks, key_slots, q_block_len, num_q_blocks, pair)


def block_queries(q_order: torch.Tensor, plan: BlockPlan) -> torch.Tensor:
    """Token index of every query slot of every block; the last block is padded with its own last query
    (a padded slot recomputes a real row of the same block, so writing it back changes nothing).

    q_order (G, Nq) -> (G, nqb, Bq).
    """
    n_q = q_order.shape[-1]
    pos = torch.arange(plan.num_q_blocks * plan.q_block_len, device=q_order.device).clamp_max(n_q - 1)
    return q_order[:, pos].view(q_order.shape[0], plan.num_q_blocks, plan.q_block_len)


def block_keys(k_order: torch.Tensor, plan: BlockPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys of each query block's paired key block: index (G, nqb, Bk) and slot validity (nqb, Bk)."""
    n_k = k_order.shape[-1]
    sorted_pos = plan.pair.unsqueeze(-1) * plan.key_slots + torch.arange(plan.key_slots, device=k_order.device)
    valid = sorted_pos < n_k  # (nqb, Bk): the last block may be shorter
    index = k_order[:, sorted_pos.clamp_max(n_k - 1)]  # (G, nqb, Bk)
    return index, valid


def key_blocks(k_order: torch.Tensor, plan: BlockPlan) -> torch.Tensor:
    """Block index of every key, in token order.  # (G, Nk)"""
    n_k = k_order.shape[-1]
    block = (torch.arange(n_k, device=k_order.device) // plan.key_slots).expand_as(k_order)  # sorted order
    return torch.empty_like(k_order).scatter_(1, k_order, block)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (G, N, C), index (G, ...) into dim N -> (G, ..., C), one flat index_select."""
    groups, n = x.shape[0], x.shape[1]
    flat = index + (torch.arange(groups, device=index.device) * n).view(-1, *([1] * (index.dim() - 1)))
    return x.reshape(groups * n, x.shape[-1]).index_select(0, flat.flatten()).view(*index.shape, x.shape[-1])


# --------------------------------------------------------------------------- step 3: columns
@dataclass
class Columns:
    """The columns every query block attends to: exact ones first, then the draws."""

    index: torch.Tensor  # (G, nqb, C) key index
    weight: torch.Tensor  # (G, nqb, C) 1 exact, 1/(s p) kept draw, 0 unused
    exact_valid: torch.Tensor | None  # (G or 1, nqb, E) False on padding slots (logit -inf); None: all real
    n_exact: int  # E = Bk + h


def assemble_columns(plan: BlockPlan, keys: tuple, k_blocks: torch.Tensor, sp, dtype) -> Columns:
    """Each query block's columns: its key block, its group's heavy columns, its group's draws.

    A draw that the block already computes exactly (its own key block or a heavy column) gets weight 0,
    and so does a block key that is also a heavy column (it counts once, as a heavy column).
    """
    block_index, block_valid = keys  # (G, nqb, Bk), (nqb, Bk)
    groups, nqb = block_index.shape[:2]
    ones = block_valid.to(dtype).expand(groups, nqb, -1)  # (G, nqb, Bk)
    draws = sp.samples[:, sp.block_group]  # (G, nqb, s')
    kept = plan.pair.view(1, -1, 1) != torch.gather(k_blocks, 1, draws.flatten(1)).view_as(draws)
    parts_index, parts_weight, exact_valid = [block_index], [ones], [block_valid.expand(groups, nqb, -1)]
    if sp.heavy is not None:
        heavy = sp.heavy[:, sp.block_group]  # (G, nqb, h)
        heavy_valid = sp.heavy_valid[:, sp.block_group]  # (G, nqb, h)
        table = sp.heavy_table()  # (G, ng * Nk) bool: is key j a heavy column of group g
        row = (sp.block_group * k_blocks.shape[-1]).view(1, nqb, 1)
        block_is_heavy = torch.gather(table, 1, (block_index + row).flatten(1)).view_as(block_index)
        kept = kept & ~torch.gather(table, 1, (draws + row).flatten(1)).view_as(draws)
        parts_weight[0] = ones * ~block_is_heavy
        parts_index.append(heavy)
        parts_weight.append(heavy_valid.to(dtype))
        exact_valid.append(heavy_valid)
    parts_index.append(draws)
    parts_weight.append(sp.weights[:, sp.block_group].to(dtype) * kept)
    exact_valid = torch.cat(exact_valid, -1)  # (G, nqb, E)
    return Columns(torch.cat(parts_index, -1), torch.cat(parts_weight, -1),
                   None if bool(exact_valid.all()) else exact_valid, exact_valid.shape[-1])


# --------------------------------------------------------------------------- step 4: the two sums
# Work is done in chunks of about this many query rows: the temporaries stay in cache and below the
# allocator's mmap threshold (a fresh 30 MB buffer costs more in page faults than its exp).
CHUNK_ROWS = 4096
PPS_CHUNK_ROWS = 4096  # pps block pass: query rows a chunk (temporaries ~ 4096 x C; peak ~40 MiB at N = 16384)
PPS_CHUNK_COLUMNS = 8192  # and at most this many gathered (block, column) key and value rows: with small query
# blocks (Bq = 32 up to N = 4096) 4096 rows gather ~20000 key rows (5 MB buffers that come back as fresh
# pages every chunk); measured at N = 4096: 0.58x the time of 4096-row chunks, the same bits
MERGE_ROWS = 4096  # token rows (all heads) per chunk of the pps window merge: its (R, D, W) product stays small


def attend_block_columns(q_blocks, k_cols, v_cols, col_weight, exact_valid, *, inplace: bool = True):
    """Each query block against its columns (its key block, heavy columns, then its draws) in one pass.

    q_blocks   (m, Bq, D)      sorted, padded, already scaled queries of m query blocks
    k_cols     (m, C, D)       C = E + s' columns: E exact ones, then the draws
    v_cols     (m, C, Dv)
    col_weight (m, C)          1 exact, 1/(s p) kept draws, 0 unused
    exact_valid (m, E) bool    False for padding slots (masked logits); None when all E hold real keys
    inplace                    reuse the logits buffer (only when autograd is not recording)
    Returns shift (m, Bq), the shifted weighted terms P = exp(l - shift) * weight (m, Bq, C),
    numerator P @ V (m, Bq, Dv) and normaliser P @ 1 (m, Bq).

    The shift is the max over every column logit: a draw given weight 0 is also an exact column of
    weight 1, so the max is attained by a weight-1 term and the normaliser is >= 1.
    """
    logits = torch.bmm(q_blocks, k_cols.mT)  # (m, Bq, C)
    if exact_valid is not None:
        pad = torch.zeros_like(col_weight, dtype=torch.bool)
        pad[:, : exact_valid.shape[-1]] = ~exact_valid
        logits = logits.masked_fill_(pad.unsqueeze(-2), float("-inf")) if inplace else \
            logits.masked_fill(pad.unsqueeze(-2), float("-inf"))
    shift = logits.detach().amax(-1)  # (m, Bq); finite: each block holds a real key
    if inplace:
        terms = logits.sub_(shift.unsqueeze(-1)).exp_().mul_(col_weight.unsqueeze(-2))
    else:
        terms = torch.exp(logits - shift.unsqueeze(-1)) * col_weight.unsqueeze(-2)  # (m, Bq, C)
    numerator = torch.bmm(terms, v_cols)  # (m, Bq, Dv)
    normaliser = terms.sum(-1)  # (m, Bq)
    return shift, terms, numerator, normaliser


def chunk_ranges(groups: int, num_q_blocks: int, q_block_len: int, rows: int = CHUNK_ROWS):
    """Yield (g0, g1, b0, b1): either one head and a run of its query blocks, or whole heads (about `rows`
    query rows a chunk)."""
    blocks_per_chunk = max(1, rows // q_block_len)
    if blocks_per_chunk >= num_q_blocks:
        heads = max(1, blocks_per_chunk // num_q_blocks)
        for g0 in range(0, groups, heads):
            yield g0, min(groups, g0 + heads), 0, num_q_blocks
    else:
        for g0 in range(groups):
            for b0 in range(0, num_q_blocks, blocks_per_chunk):
                yield g0, g0 + 1, b0, min(num_q_blocks, b0 + blocks_per_chunk)


def flat_index(index: torch.Tensor, g0: int, n: int) -> torch.Tensor:
    """Row indices (g, ...) of heads g0.. into a (G * n, C) flattened tensor."""
    offsets = (torch.arange(index.shape[0], device=index.device) + g0) * n
    return (index + offsets.view(-1, *([1] * (index.dim() - 1)))).flatten()


def sparse_block_sums(q_chunk, k_cols, v_cols, weight, valid, n_exact: int, want_parts: bool, inplace: bool):
    """A chunk's blocks against their gathered columns -> shift, numerator, normaliser and, for the trace,
    the exact part of the normaliser and the sampled part of the numerator (see attend_block_columns)."""
    shift, terms, numerator, normaliser = attend_block_columns(q_chunk, k_cols, v_cols, weight, valid, inplace=inplace)
    if not want_parts:
        return shift, numerator, normaliser, None, None
    return shift, numerator, normaliser, terms[..., :n_exact].sum(-1), torch.bmm(terms[..., n_exact:], v_cols[:, n_exact:])


def dense_block_sums(q_chunk, k_heads, v_heads, index, weight, n_exact: int, want_parts: bool, inplace: bool):
    """Blocks with more columns than keys (C > Nk, draws with repeats): each block's column weights summed
    per key, and the block against every key of its head in one GEMM (no gather).

    q_chunk (m, Bq, D) scaled, k_heads (h, Nk, D), v_heads (h, Nk, Dv) for the h heads of the chunk (m = h x
    blocks per head), index / weight (m, C) -> the same sums as `sparse_block_sums`.
    """
    heads, n_k = k_heads.shape[:2]
    m, q_len, dim = q_chunk.shape
    dense = weight.new_zeros(m, n_k).scatter_add_(1, index, weight)  # (m, Nk) summed weights, 0 unused
    logits = torch.bmm(q_chunk.reshape(heads, -1, dim), k_heads.mT).view(m, q_len, n_k)  # (m, Bq, Nk)
    unused = (dense == 0).unsqueeze(1)  # (m, 1, Nk): never the shift (a used term attains it)
    logits = logits.masked_fill_(unused, float("-inf")) if inplace else logits.masked_fill(unused, float("-inf"))
    shift = logits.detach().amax(-1)  # (m, Bq)
    if inplace:
        terms = logits.sub_(shift.unsqueeze(-1)).exp_().mul_(dense.unsqueeze(1))
    else:
        terms = torch.exp(logits - shift.unsqueeze(-1)) * dense.unsqueeze(1)
    numerator = torch.bmm(terms.view(heads, -1, n_k), v_heads).view(m, q_len, -1)  # (m, Bq, Dv)
    if not want_parts:
        return shift, numerator, terms.sum(-1), None, None
    exact = weight.new_zeros(m, n_k).scatter_(1, index[:, :n_exact], (weight[:, :n_exact] > 0).to(weight.dtype))
    exact_terms = terms * exact.unsqueeze(1)  # (m, Bq, Nk)
    sampled = torch.bmm((terms - exact_terms).view(heads, -1, n_k), v_heads).view(m, q_len, -1)
    return shift, numerator, terms.sum(-1), exact_terms.sum(-1), sampled


def attend_columns(q, k, v, scale: float, q_rows: torch.Tensor, cols: Columns, want_parts: bool):
    """Every query block against its columns, chunk by chunk, divided by D~ and written back to token
    order.  q (G, Nq, D), k (G, Nk, D), v (G, Nk, Dv), q_rows (G, nqb, Bq) -> out (G, Nq, Dv) and, when
    asked, the trace's per-query parts (log D~, exact share of D~, sampled part of the output).
    Blocks with more columns than keys (C > Nk) run dense (`dense_block_sums`).
    """
    groups, n_q, dim = q.shape
    n_k, dim_v, n_cols = k.shape[1], v.shape[-1], cols.index.shape[-1]
    inplace = not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
    q_flat, k_flat, v_flat = q.reshape(-1, dim), k.reshape(-1, dim), v.reshape(-1, dim_v)  # copies if strided
    n_blocks, q_len = q_rows.shape[1], q_rows.shape[2]
    slot_real = torch.arange(n_blocks * q_len, device=q.device).view(n_blocks, q_len) < n_q  # (nqb, Bq)
    pieces, rows_all = [], []
    fast = q.new_empty(groups * n_q, dim_v) if inplace and not want_parts else None  # (G*Nq, Dv) token order
    for g0, g1, b0, b1 in chunk_ranges(groups, n_blocks, q_len):
        m = (g1 - g0) * (b1 - b0)  # query blocks in this chunk
        rows = flat_index(q_rows[g0:g1, b0:b1], g0, n_q)  # (m*Bq,)
        real = None if b1 < n_blocks else slot_real[b0:b1].expand(g1 - g0, -1, -1).flatten()  # padded slots
        q_chunk = q_flat.index_select(0, rows).view(m, -1, dim)
        q_chunk = q_chunk.mul_(scale) if inplace else q_chunk * scale  # scale before the matmul
        weight = cols.weight[g0:g1, b0:b1].reshape(m, n_cols)
        if n_cols > n_k:
            sums = dense_block_sums(q_chunk, k[g0:g1], v[g0:g1], cols.index[g0:g1, b0:b1].reshape(m, n_cols), weight,
                                    cols.n_exact, want_parts, inplace)
        else:
            index = flat_index(cols.index[g0:g1, b0:b1], g0, n_k)  # (m*C,)
            valid = None if cols.exact_valid is None else cols.exact_valid[g0:g1, b0:b1].reshape(m, cols.n_exact)
            sums = sparse_block_sums(q_chunk, k_flat.index_select(0, index).view(m, n_cols, dim),
                                     v_flat.index_select(0, index).view(m, n_cols, dim_v), weight, valid, cols.n_exact,
                                     want_parts, inplace)
        shift, numerator, normaliser, exact_sum, sampled = sums
        if fast is not None:  # inference: divide in place and write straight to token rows
            result = numerator.div_(normaliser.unsqueeze(-1)).view(-1, dim_v)  # (m*Bq, Dv)
            if real is not None and not bool(real.all()):  # a padded slot repeats a row: the real one wins
                result, rows = result[real], rows[real]
            fast.index_copy_(0, rows, result)
            continue
        piece = [numerator / normaliser.unsqueeze(-1)]
        if want_parts:
            piece += [(shift + normaliser.log()).unsqueeze(-1), (exact_sum / normaliser).unsqueeze(-1),
                      sampled / normaliser.unsqueeze(-1)]
        piece = torch.cat([p.reshape(-1, p.shape[-1]) for p in piece], -1)  # (m*Bq, Dv [+ 2 + Dv])
        if real is not None and not bool(real.all()):  # a padded slot repeats a real row: write it once
            piece, rows = piece[real], rows[real]
        pieces.append(piece)
        rows_all.append(rows)
    if fast is not None:
        return fast.view(groups, n_q, dim_v), None
    packed = torch.cat(pieces) if len(pieces) > 1 else pieces[0]  # (rows, Dv [+ 2 + Dv])
    full = packed.new_zeros(groups * n_q, packed.shape[-1]).index_copy(0, torch.cat(rows_all), packed)
    full = full.view(groups, n_q, -1)
    out = full[..., :dim_v]
    if not want_parts:
        return out, None
    return out, {"log_normalizer": full[..., dim_v], "heavy_fraction": full[..., dim_v + 1],
                 "sampled_output": full[..., dim_v + 2:], "heavy_output": out - full[..., dim_v + 2:]}


# --------------------------------------------------------------------------- the pps pass (sampling="pps")
def exclude_window(logits, cols, centre, window: int, n_keys: int, inplace: bool):
    """-inf at the block columns that lie in a query's window (the window computes them).
    logits (m, Bq, C), cols (m, C) non-decreasing, centre (m, Bq) -> logits."""
    pos, hit = pps.window_positions(cols, centre, window, n_keys)  # (m, Bq, W)
    minus = torch.where(hit, float("-inf"), 0.0).to(logits.dtype)
    return logits.scatter_add_(-1, pos, minus) if inplace else logits.scatter_add(-1, pos, minus)


def weighted_values(v_cols, weight, inplace: bool = False) -> torch.Tensor:
    """Each column's value row and 1 times its weight, [w v_c, w] (m, C, Dv + 1): one GEMM gives the
    numerator and the normaliser (written into one buffer when autograd is not recording)."""
    w = weight.unsqueeze(-1)  # (m, C, 1)
    if not inplace:
        return torch.cat([v_cols * w, w], -1)
    values = v_cols.new_empty(*v_cols.shape[:-1], v_cols.shape[-1] + 1)  # (m, C, Dv + 1)
    torch.mul(v_cols, w, out=values[..., :-1])
    values[..., -1:] = w
    return values


def weigh_drawn_block(logits, values, *, inplace: bool):
    """A chunk of m query blocks over their drawn columns.  logits (m, Bq, C) (window columns already
    -inf), values (m, C, Dv + 1) from `weighted_values`.
    -> shift (m, Bq), terms exp(logits - shift) (m, Bq, C) and terms @ values (m, Bq, Dv + 1)."""
    row_max = logits.detach().amax(-1).clamp_min(-3e38)  # (m, Bq); finite even if every column is excluded
    terms = logits.sub_(row_max.unsqueeze(-1)).exp_() if inplace else torch.exp(logits - row_max.unsqueeze(-1))
    return row_max, terms, torch.bmm(terms, values)


def trace_sums(terms, values, exact) -> tuple[torch.Tensor, torch.Tensor]:
    """For the trace (a separate product, so the output is the same bits with or without it): the exact
    part of the normaliser (m, Bq, 1) and the sampled part of the numerator (m, Bq, Dv).
    terms (m, Bq, C), values (m, C, Dv + 1) = [w v, w], exact (m, C) bool."""
    sampled = values * (~exact).unsqueeze(-1)  # (m, C, Dv + 1): [w v, w] of the sampled columns only
    parts = torch.bmm(terms, sampled)
    return (torch.bmm(terms, values[..., -1:]) - parts[..., -1:]), parts[..., :-1]


def to_token_rows(pieces: list, widths: list, total: int, like: torch.Tensor, buffers: list | None) -> list:
    """Per-chunk block results carried to token rows: `buffers` were written in place (no autograd),
    else the pieces [(rows (n,), [values (n, width), ...]), ...] are joined once (autograd-safe)."""
    if buffers is not None:
        return buffers
    rows = torch.cat([r for r, _ in pieces])
    return [like.new_zeros(total, w).index_copy(0, rows, torch.cat([p[i] for _, p in pieces])) for i, w in enumerate(widths)]


def attend_blocks(q, k, v, scale: float, plan, want_parts: bool, inplace: bool) -> list:
    """Every query block against its drawn columns, chunk by chunk, written to token rows.
    -> [numerator (G*Nq, Dv), (shift, normaliser[, exact normaliser]) (G*Nq, 2 or 3)[, sampled numerator (G*Nq, Dv)]]."""
    groups, n_q, dim = q.shape
    n_k, dim_v, layout = k.shape[1], v.shape[-1], plan.layout
    n_blocks, q_len, n_cols, window = layout.num_q_blocks, layout.q_block_len, layout.columns, layout.window
    q_flat, k_flat, v_flat = q.reshape(-1, dim), k.reshape(-1, dim), v.reshape(-1, dim_v)
    widths = [dim_v, 3, dim_v] if want_parts else [dim_v, 2]
    buffers = [q.new_empty(groups * n_q, w) for w in widths] if inplace else None
    slot_real = torch.arange(n_blocks * q_len, device=q.device).view(n_blocks, q_len) < n_q  # (nqb, Bq)
    pieces = []
    blocks = max(1, min(PPS_CHUNK_ROWS // q_len, PPS_CHUNK_COLUMNS // n_cols))  # query blocks a chunk
    for g0, g1, b0, b1 in chunk_ranges(groups, n_blocks, q_len, blocks * q_len):
        m = (g1 - g0) * (b1 - b0)
        rows = flat_index(plan.rows[g0:g1, b0:b1], g0, n_q)  # (m*Bq,)
        index = flat_index(plan.cols[g0:g1, b0:b1], g0, n_k)  # (m*C,)
        q_chunk = q_flat.index_select(0, rows).view(m, q_len, dim)
        q_chunk = q_chunk.mul_(scale) if inplace else q_chunk * scale  # (m, Bq, D) scaled
        logits = torch.bmm(q_chunk, k_flat.index_select(0, index).view(m, n_cols, dim).mT)  # (m, Bq, C)
        if layout.window_len:
            centre = plan.rows[g0:g1, b0:b1].reshape(m, q_len) + (n_k - n_q)
            logits = exclude_window(logits, plan.cols[g0:g1, b0:b1].reshape(m, n_cols), centre, window, n_k, inplace)
        values = weighted_values(v_flat.index_select(0, index).view(m, n_cols, dim_v),
                                 plan.weights[g0:g1, b0:b1].reshape(m, n_cols).to(q.dtype), inplace)  # (m, C, Dv + 1)
        shift, terms, sums = weigh_drawn_block(logits, values, inplace=inplace)  # (m, Bq), ., (m, Bq, Dv + 1)
        stats = [shift.view(-1, 1), sums[..., dim_v:].reshape(-1, 1)]
        extra = trace_sums(terms, values, plan.exact[g0:g1, b0:b1].reshape(m, n_cols)) if want_parts else ()
        values = [sums[..., :dim_v].reshape(-1, dim_v), torch.cat(stats + [x.reshape(-1, 1) for x in extra[:1]], -1)]
        values += [x.reshape(-1, dim_v) for x in extra[1:]]
        if buffers is not None:  # a padded slot repeats a real row of its block: writing it twice is harmless
            for buffer, x in zip(buffers, values):
                buffer.index_copy_(0, rows, x)
            continue
        real = None if b1 < n_blocks else slot_real[b0:b1].expand(g1 - g0, -1, -1).flatten()
        if real is not None and not bool(real.all()):
            rows, values = rows[real], [x[real] for x in values]
        pieces.append((rows, values))
    return to_token_rows(pieces, widths, groups * n_q, q, buffers)


def attend_pps(q, k, v, scale: float, plan, want_parts: bool):
    """Block sums written to token rows, then per chunk of token rows each query's exact window merged
    under one shift, and the division.  q (G, Nq, D), k (G, Nk, D), v (G, Nk, Dv) unscaled
    -> out (G, Nq, Dv) and the trace's parts (or None)."""
    groups, n_q, _ = q.shape
    dim_v = v.shape[-1]
    inplace = not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
    sums = [x.view(groups, n_q, -1) for x in attend_blocks(q, k, v, scale, plan, want_parts, inplace)]
    window = plan.layout.window if plan.layout.window_len else None
    step = max(1, MERGE_ROWS // groups)
    pieces = [merge_window(q, k, v, scale, window, [x[:, r0:r0 + step] for x in sums], r0, want_parts, inplace)
              for r0 in range(0, n_q, step)]
    if inplace and not want_parts:
        return sums[0], None  # divided in place
    out = torch.cat([p[0] for p in pieces], 1)
    if not want_parts:
        return out, None
    parts = {name: torch.cat([p[1][name] for p in pieces], 1) for name in ("log_normalizer", "heavy_fraction",
                                                                          "sampled_output")}
    parts["heavy_output"] = out - parts["sampled_output"]
    return out, parts


def merge_window(q, k, v, scale: float, window: int | None, sums: list, r0: int, want_parts: bool, inplace: bool):
    """Queries r0..r0+R-1: their block sums [numerator (G, R, Dv), (shift, normaliser[, exact normaliser])
    (G, R, 2 or 3)[, sampled numerator (G, R, Dv)]] plus their exact +-w window (None: no window), merged
    under one shift and divided (in place into the numerator when autograd is not recording).
    -> out (G, R, Dv), the trace's parts or None."""
    numerator, shift, normaliser = sums[0], sums[1][..., 0], sums[1][..., 1]
    exact_sum, sampled = (sums[1][..., 2], sums[2]) if want_parts else (None, None)
    if window is not None:
        logits = pps.window_logits(q, k, scale, window, r0, r0 + numerator.shape[1])  # (G, R, W)
        new_shift = torch.maximum(shift, logits.detach().amax(-1))  # (G, R)
        rescale = torch.exp(shift - new_shift)
        terms = torch.exp(logits - new_shift.unsqueeze(-1))  # (G, R, W), 0 outside the keys
        window_sum = terms.sum(-1)
        extra = pps.window_values(terms, v, q.shape[1], window, r0, inplace)  # (G, R, Dv)
        numerator = numerator.mul_(rescale.unsqueeze(-1)).add_(extra) if inplace else \
            numerator * rescale.unsqueeze(-1) + extra
        normaliser = normaliser * rescale + window_sum
        if want_parts:
            exact_sum, sampled = exact_sum * rescale + window_sum, sampled * rescale.unsqueeze(-1)
        shift = new_shift
    out = numerator.div_(normaliser.unsqueeze(-1)) if inplace else numerator / normaliser.unsqueeze(-1)
    if not want_parts:
        return out, None
    return out, {"log_normalizer": shift + normaliser.log(), "heavy_fraction": exact_sum / normaliser,
                 "sampled_output": sampled / normaliser.unsqueeze(-1)}


def kde_pps(q, k, v, *, scale: float, opts: KDEOptions, draws: Draws, return_trace: bool):
    """sampling="pps" on heads without masks (see kdeformer.pps): hash the queries, plan, attend."""
    projections = hyperplanes(draws, q.shape[-1], opts.num_projs)  # (G, D, r)
    q32 = q.detach().float()
    q_codes = hash_codes(q32 if scale >= 0 else -q32, projections)  # (G, Nq)
    ranks = bucket_ranks(opts.num_projs, opts.bucket_order, q.device)  # (2^r,)
    plan = pps.plan_pps(q, k, v, scale=scale, budget=opts.bucket_size + opts.sample_size, q_codes=q_codes,
                        lsh_order=sort_by_bucket(q_codes, ranks), draws=draws, keep_pi=return_trace)
    out, parts = attend_pps(q, k, v, scale, plan, return_trace)
    if not return_trace:
        return out, None
    k_codes = hash_codes(k.detach().float(), projections)  # for the trace's pictures only
    parts.update(pps.trace_parts(plan, q.dtype, k.shape[1]), projections=projections.to(q.dtype),
                 k_buckets=k_codes, k_order=sort_by_bucket(k_codes, ranks))
    return out, parts


# --------------------------------------------------------------------------- the algorithm
def kde_unmasked(q, k, v, *, scale: float, opts: KDEOptions, draws: Draws, return_trace: bool):
    """KDEformer on heads without masks.  q (G, Nq, D), k (G, Nk, D), v (G, Nk, Dv) in the working
    dtype, unscaled -> out (G, Nq, Dv) and the trace's parts (G-leading tensors) or None."""
    if opts.sampling in schemes.OWN_PASS:  # "pps": no key blocks, its own pass
        return kde_pps(q, k, v, scale=scale, opts=opts, draws=draws, return_trace=return_trace)
    groups, n_q, n_k = q.shape[0], q.shape[1], k.shape[1]
    hashed = hash_and_sort(q, k, scale, opts, draws)
    plan = plan_blocks(n_q, n_k, opts.bucket_size, q.device)
    q_rows = block_queries(hashed["q_order"], plan)  # (G, nqb, Bq)
    keys = block_keys(hashed["k_order"], plan)  # (G, nqb, Bk), (nqb, Bk)
    k_blocks = key_blocks(hashed["k_order"], plan)  # (G, Nk)
    sp = schemes.plan_sampling(q, k, v, scale=scale, plan=plan, q_order=hashed["q_order"], k_blocks=k_blocks,
                                opts=opts, draws=draws)
    cols = assemble_columns(plan, keys, k_blocks, sp, q.dtype)
    out, parts = attend_columns(q, k, v, scale, q_rows, cols, return_trace)
    if not return_trace:
        return out, None
    q_key_block = plan.pair.repeat_interleave(plan.q_block_len)[:n_q].expand(groups, n_q)  # sorted order
    q_group = sp.block_group.repeat_interleave(plan.q_block_len)[:n_q].expand(groups, n_q)
    row_block = torch.arange(plan.num_q_blocks, device=q.device).repeat_interleave(plan.q_block_len)[:n_q]
    to_tokens = lambda x: torch.empty_like(x).scatter_(1, hashed["q_order"], x)  # noqa: E731 sorted -> token order
    exact = torch.arange(cols.index.shape[-1], device=q.device) < cols.n_exact  # (C,)
    parts.update(
        projections=hashed["projections"].to(q.dtype), q_buckets=hashed["q_codes"], k_buckets=hashed["k_codes"],
        q_order=hashed["q_order"], k_order=hashed["k_order"], q_blocks=to_tokens(q_key_block), k_blocks=k_blocks,
        key_block_len=torch.full((groups,), plan.key_slots, device=q.device),
        q_groups=to_tokens(q_group), row_block=to_tokens(row_block.expand(groups, n_q)),
        block_cols=cols.index, block_weights=cols.weight if cols.exact_valid is None else
        cols.weight * torch.cat([cols.exact_valid, exact.new_ones(*cols.exact_valid.shape[:2], cols.index.shape[-1] - cols.n_exact)], -1),
        block_exact=exact.expand_as(cols.index), num_blocks=plan.num_blocks, **sp.trace_parts(q.dtype))
    return out, parts


def kde_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    bucket_size: int = KDE_DEFAULTS.bucket_size,
    sample_size: int = KDE_DEFAULTS.sample_size,
    num_projs: int = KDE_DEFAULTS.num_projs,
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
    query_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    local_window: int | None = KDE_DEFAULTS.local_window,
    sampling: str = KDE_DEFAULTS.sampling,
    bucket_order: str = KDE_DEFAULTS.bucket_order,
    generator: torch.Generator | None = None,
    return_trace: bool = False,
    heavy_columns: int | None = KDE_DEFAULTS.heavy_columns,
    estimate_rows: int | None = KDE_DEFAULTS.estimate_rows,
):
    r"""KDEformer approximation of softmax(scale * query @ key^T) @ value.

    Shapes, like ``torch.nn.functional.scaled_dot_product_attention``::

        query (..., Nq, D)   key (..., Nk, D)   value (..., Nk, Dv)   ->   output (..., Nq, Dv)

    where ``...`` are any leading dims (batch, heads) shared by all three. Nq may differ from Nk
    (cross-attention), and neither needs to be a multiple of ``bucket_size``.

    Algorithm per head (Zandieh et al., ICML 2023, practical version):

    1. hash queries and keys with ``num_projs`` shared random hyperplanes (angular LSH);
    2. sort both by bucket, buckets in Gray order (``bucket_order``);
    3. cut sorted keys into ceil(Nk / bucket_size) blocks and sorted queries into as many; compute
       each query block against its key block exactly (the "heavy" block diagonal);
    4. draw key columns from ``sampling`` probabilities p, weight each by 1 / (s p), and add them for
       every query whose block does not already hold that key;
    5. the same pass gives the row sums D~ (the ones column of V~ = [V, 1]); output = numerator / D~.

    The default ``sampling="pps"`` replaces steps 3-4 (see :mod:`kdeformer.pps`): queries are cut into
    blocks in token or LSH order, whichever is tighter; each group of blocks estimates its column
    importance from its centroid; every block draws distinct columns without replacement with inclusion
    probabilities pi (capped PPS, columns with pi = 1 computed exactly, the rest weighted 1/pi), and
    every query also computes its +-3 token neighbours exactly. There ``bucket_size + sample_size`` is
    one budget of key columns per query, spent honestly (every multiply-add of the scheme counted).

    A reference in plain torch (exact when ``bucket_size >= Nk``)::

        A = exp(scale * Q @ K.T - m)                  # m: per-row shift, any value
        H = exactly computed entries, C_j = count_j / (s p_j) for sampled columns
        out = ((A * H + A * ~H * C) @ V) / (A * H + A * ~H * C).sum(-1)

    Args:
        bucket_size: keys per block computed exactly (>= 1). ``bucket_size >= Nk`` gives exact attention.
        sample_size: key columns each query pays for beyond its block (>= 1), heavy columns included.
        num_projs: hash bits r, in [1, 16]; 2^r buckets.
        scale: logit scale, default 1/sqrt(D).
        key_mask: bool (..., Nk), broadcastable against the leading dims, **True = attend** (like SDPA's
            boolean ``attn_mask`` and Hugging Face's ``attention_mask``). Masked keys take no part in
            the blocks, the sampling or the normaliser. Every row needs one unmasked key.
        query_mask: bool (..., Nq), **True = a real query** (False: padding). Padded queries take no
            block room and their output rows are 0. With both masks, a sequence's output does not depend
            on how much padding follows it.
        is_causal: query i sees keys j <= Nk - Nq + i (bottom-right aligned, as flash-attention and
            KV-cache decoding need; torch SDPA's ``is_causal`` is top-left when Nq != Nk). Strictly
            causal: output i never depends on a later token. See :mod:`kdeformer.causal`.
        local_window: with ``is_causal`` only: keys before each query chunk computed exactly.
        sampling: "pps" (default, the most accurate: block-centroid PPS sampling without replacement
            plus an exact token window, see :mod:`kdeformer.pps`; with ``is_causal`` it runs
            "column_norm", as it has no causal form yet), "column_norm" (the theory's choice: estimated
            column norms of D^-1 A times value-row norms, drawn per group of query blocks, see
            :mod:`kdeformer.sampling`), "value_norm" (the authors' choice: value-row norms mixed with
            uniform) or "uniform".
        bucket_order: "gray" (true Gray order), "authors" (sort by gray(code), as the authors' code) or
            "binary".
        generator: a ``torch.Generator`` on the inputs' device; the same generator state gives the
            same output. It gives one seed per call; every draw is addressed by (seed, head, index), so
            the last leading dim (heads) draws alike in every batch item, whatever the batch size.
        return_trace: also return a :class:`KDETrace` of every intermediate step.
        heavy_columns: with "column_norm" only: how many of the ``sample_size`` columns are spent on each
            group's largest estimated columns (attention sinks), computed exactly. Default
            ``sample_size // 4`` for "column_norm", 0 otherwise.
        estimate_rows: with "column_norm" only: queries per head whose attention rows are computed
            exactly to estimate the column norms. Default ceil(sample_size * Nq / (2 Nk)).

    Half-precision inputs are computed in float32 and returned in their own dtype; logits are shifted
    by their per-row maximum before ``exp``, so any finite input gives a finite output. Hashing and
    sampling probabilities are computed in float32 from the inputs, so exactly representable inputs
    draw the same columns in every dtype. Gradients flow through the estimate for the drawn hashes and
    columns; the sampling probabilities (and so the weights 1/(s p)) are detached.
    """
    opts = check_kde_options(bucket_size=bucket_size, sample_size=sample_size, num_projs=num_projs,
                             sampling=sampling, bucket_order=bucket_order, heavy_columns=heavy_columns,
                             estimate_rows=estimate_rows, is_causal=is_causal, local_window=local_window)
    p = prepare(query, key, value, scale=scale, key_mask=key_mask, query_mask=query_mask, generator=generator,
                return_trace=return_trace)
    draws = Draws.from_generator(p.generator, head_index(p.lead, query.device))
    from .masking import attend_real_tokens

    out, parts = attend_real_tokens(p, opts, draws, return_trace)
    out = p.finish(out)
    if not return_trace:
        return out
    from .trace import pack_trace

    return out, pack_trace(p, query, key, opts, parts)


# --------------------------------------------------------------------------- cost
def kde_multiply_adds(n_queries: int, n_keys: int, dim: int, dim_v: int, *, include_hashing: bool = False,
                      **options) -> int:
    """Multiply-adds one head of `kde_attention` performs for these shapes and options.

    Counted from the shapes the code uses: every query slot of every block (padded slots included)
    against its C = Bk + h + s' columns (all Nk keys once when C > Nk: that pass runs dense), D for the logit and Dv + 1 for the value and the normaliser;
    column_norm's estimation rows (R x Nk logits); with include_hashing, (Nq + Nk) * D * r for hashing.
    """
    opts = check_kde_options(**options)
    if opts.is_causal:
        from .causal import causal_multiply_adds

        total = causal_multiply_adds(n_queries, n_keys, dim, dim_v, bucket_size=opts.bucket_size,
                                     sample_size=opts.sample_size, local_window=opts.local_window,
                                     num_projs=opts.num_projs, sampling=opts.sampling,
                                     heavy_columns=opts.heavy_columns, estimate_rows=opts.estimate_rows)
    elif opts.sampling in schemes.OWN_PASS:  # pps: estimates, block GEMMs, window, spreads; only queries hashed
        total = pps.pps_multiply_adds(n_queries, n_keys, dim, dim_v, opts.bucket_size + opts.sample_size)
        if include_hashing:
            total += n_queries * dim * opts.num_projs
        return int(total)
    else:
        plan = plan_blocks(n_queries, n_keys, opts.bucket_size)
        columns = min(n_keys, plan.key_slots + opts.sample_size)  # more columns than keys: dense (every key once)
        total = plan.num_q_blocks * plan.q_block_len * columns * (dim + dim_v + 1)
        total += schemes.estimation_multiply_adds(opts, plan, n_queries, n_keys, dim)
    if include_hashing:
        total += (n_queries + n_keys) * dim * opts.num_projs
    return int(total)


__all__ = ["kde_attention", "check_kde_options", "kde_multiply_adds", "KDEOptions", "SAMPLINGS", "BUCKET_ORDERS",
           "MAX_PROJS"]
