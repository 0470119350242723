"""Reformer LSH attention (Kitaev et al., ICLR 2020), with separate or shared queries and keys.

Per head and per hash round:
  1. angular LSH: a Gaussian R (D, b/2) per round; bucket(x) = argmax over [xR, -xR]; queries and keys
     are hashed with the same R;
  2. sort queries and keys by bucket (ties keep token order) and cut both into nb = ceil(Nk / chunk_size)
     balanced chunks (masked keys sorted out first);
  3. query chunk t attends exactly to key chunks t and t - 1 (cyclically; one chunk when nb = 1).
Rounds are merged by log-sum-exp: each round r gives (out_r, lse_r) over its key set S_r(i) and
    out_i = sum_r e^{lse_r - L} out_r,  L = log sum_r e^{lse_r},
i.e. a softmax over the multiset union of the rounds' key sets (a key found in several rounds counts once
per round; with every key in every round the result is exact).  L is reported as the normaliser estimate
(it only sees the keys found, so it estimates D from below, up to repeats).

shared_qk=True is the paper's shared-QK model: query must be key (same tensor), keys are unit-normalised,
k_j = q_j / |q_j|, and a query does not attend to itself unless no other key is in its chunks.
Causal (is_causal=True, bottom-right aligned, shared_qk=False): sorting all tokens together would let a
later token move the chunk boundaries and so change an earlier output.  Instead each query looks its bucket
up among the keys sorted by (bucket, position) and attends, per round, to the most recent 2 chunk_size
visible keys of its own bucket (the sorted run that ends at its own position), plus its own key, so every
row depends on the past only and its normaliser is never empty.
Budget (key columns per query) = 2 chunks x rounds: chunk_size = budget / (2 num_rounds), default 2 rounds.
Cost: see multiply_adds (hashing left out).
"""
from __future__ import annotations

import torch

from ._common import (
    MethodTrace, attend_per_query, causal_limit, dense_logits, gather_rows, masked_softmax_parts, merge_parts, part,
    prepare,
)
from ._lsh import angular_buckets, gaussian_directions, make_blocks, sort_tokens, unblock_queries

OPTIONS = ("chunk_size", "num_rounds", "num_buckets", "shared_qk")


def split_budget(budget: int, chunk_size: int | None = None, num_rounds: int = 2, num_buckets: int | None = None,
                 shared_qk: bool = False) -> dict:
    num_rounds = part("num_rounds", num_rounds)
    if chunk_size is None:
        chunk_size = max(1, budget // (2 * num_rounds))
    out = {"chunk_size": part("chunk_size", chunk_size), "num_rounds": num_rounds, "shared_qk": bool(shared_qk)}
    if num_buckets is not None:
        out["num_buckets"] = num_buckets
    return out


def default_num_buckets(num_chunks: int) -> int:
    """About one bucket per chunk, as in the paper; even (argmax over [xR, -xR]) and at least 2."""
    return max(2, num_chunks + num_chunks % 2)


def attended_keys(blocks):
    """Key slots of chunk t and t - 1 for each query chunk.  -> index (G, nb, 2K) and validity (G, nb, 2K)."""
    index, valid = blocks.k_index, blocks.k_valid  # (G, nb, K)
    if blocks.num_blocks == 1:
        return index, valid
    prev_index = torch.roll(index, 1, dims=1)
    prev_valid = torch.roll(valid, 1, dims=1)
    # with fewer keys than chunks neighbouring chunks share their single key: count it once
    prev_pos = torch.gather(blocks.k_pos, 1, prev_index.flatten(1)).view_as(prev_index)
    overlap = (prev_pos >= blocks.k_start.unsqueeze(-1)) & (prev_pos < blocks.k_end.unsqueeze(-1))
    return torch.cat([index, prev_index], -1), torch.cat([valid, prev_valid & ~overlap], -1)


def chunked_round(p, k, q_bk, k_bk, num_chunks: int, shared_qk: bool):
    """One hash round, non-causal: sorted chunks, each query chunk meets its own and the previous key chunk.
    -> ((out (G, Nq, Dv), lse (G, Nq)), q_order, k_order, q_block (G, Nq), key set (index, allowed) (G, Nq, S))."""
    q_order, k_order = sort_tokens(q_bk, None), sort_tokens(k_bk, p.valid)
    blocks = make_blocks(q_order, k_order, p.n_valid, num_chunks)
    index, valid = attended_keys(blocks)  # (G, nb, S)
    q_blk = gather_rows(p.q * p.scale, blocks.q_index)  # (G, nb, Bq, D)
    allowed = valid.unsqueeze(-2)  # (G, nb, 1, S), or (G, nb, Bq, S) in shared-QK mode
    if shared_qk:  # no attention to self unless nothing else is there
        others = allowed & (index.unsqueeze(-2) != blocks.q_index.unsqueeze(-1))
        allowed = torch.where(others.any(-1, keepdim=True), others, allowed)
    logits = q_blk @ gather_rows(k, index).mT  # (G, nb, Bq, S)
    out_blk, lse_blk = masked_softmax_parts(logits, allowed, gather_rows(p.v, index))
    part_ = (unblock_queries(out_blk, blocks), unblock_queries(lse_blk.unsqueeze(-1), blocks).squeeze(-1))
    full = (-1, -1, blocks.q_slots, -1)
    key_set = (unblock_queries(index.unsqueeze(-2).expand(full), blocks),
               unblock_queries(allowed.expand(full), blocks))  # (G, Nq, S) each
    return part_, q_order, k_order, blocks.q_block, key_set


def causal_round(p, k, q_bk, k_bk, window: int, num_buckets: int):
    """One hash round, causal: each query's most recent `window` visible keys of its own bucket, plus its own
    key.  -> the same tuple as chunked_round (q_block: the query's bucket)."""
    position = torch.arange(p.n_k, device=p.device)  # (Nk,)
    sort_value = k_bk * p.n_k + position  # (G, Nk): by bucket, then position
    if p.valid is not None:  # masked keys sort after every real one and match no bucket
        sort_value = torch.where(p.valid, sort_value, num_buckets * p.n_k + position)
    sorted_value, k_order = torch.sort(sort_value, dim=-1)
    limit = causal_limit(p.n_q, p.n_k, p.device)  # (Nq,) last visible key
    end = torch.searchsorted(sorted_value, q_bk * p.n_k + limit.clamp_min(-1), right=True)  # (G, Nq) first later entry
    slot = end.unsqueeze(-1) - window + torch.arange(window, device=p.device)  # (G, Nq, W) sorted positions
    in_range = slot >= 0
    slot = slot.clamp_min(0)
    same = torch.gather(sorted_value, 1, slot.flatten(1)).view_as(slot) // p.n_k == q_bk.unsqueeze(-1)
    window_index = torch.gather(k_order, 1, slot.flatten(1)).view_as(slot)  # (G, Nq, W)
    window_ok = in_range & same & (limit >= 0).view(1, -1, 1)
    own = limit.clamp(0, p.n_k - 1).expand(p.groups, -1)  # (G, Nq) the query's own key position
    own_ok = (limit >= 0).unsqueeze(0) & (torch.gather(k_bk, 1, own) != q_bk)  # not already in the window
    if p.valid is not None:
        own_ok = own_ok & torch.gather(p.valid, 1, own)
    index = torch.cat([window_index, own.unsqueeze(-1)], -1)  # (G, Nq, W + 1)
    allowed = torch.cat([window_ok, own_ok.unsqueeze(-1)], -1)
    part_ = attend_per_query(p.q * p.scale, k, p.v, index, allowed)
    return part_, None, k_order, q_bk, (index, allowed)


def check_shared_qk(query, key, shared_qk, is_causal) -> None:
    if not shared_qk:
        return
    if query is not key and not (query.shape == key.shape and torch.equal(query, key)):
        raise ValueError("shared_qk=True needs key to be the same tensor as query (shared-QK attention, "
                         "Nq == Nk); pass shared_qk=False for separate queries and keys")
    if is_causal:
        raise ValueError("is_causal=True is not supported with shared_qk=True (causal Reformer uses separate "
                         "queries and keys); pass shared_qk=False")


def reformer_attention(query, key, value, *, chunk_size: int = 32, num_rounds: int = 2, num_buckets=None,
                       shared_qk: bool = False, scale=None, key_mask=None, generator=None, return_trace=False,
                       is_causal=False):
    """Reformer LSH attention: chunked attention within sorted angular-LSH buckets, several rounds."""
    chunk_size = part("chunk_size", chunk_size)
    num_rounds = part("num_rounds", num_rounds)
    check_shared_qk(query, key, shared_qk, is_causal)
    p = prepare(query, key, value, scale=scale, key_mask=key_mask, generator=generator, return_trace=return_trace)
    num_chunks = max(1, -(-p.n_k // chunk_size))
    num_buckets = part("num_buckets", default_num_buckets(num_chunks) if num_buckets is None else num_buckets,
                       minimum=2)
    if num_buckets % 2:
        raise ValueError(f"num_buckets must be an even integer >= 2 (argmax over [xR, -xR]), got {num_buckets}")
    k = p.k / p.k.norm(dim=-1, keepdim=True).clamp_min(1e-12) if shared_qk else p.k  # (G, Nk, D)
    q_hash = p.q if p.scale >= 0 else -p.q
    rounds = []  # (part, q_order, k_order, q_block, key_set, q_bk, k_bk) per round
    for _ in range(num_rounds):
        rotation = gaussian_directions(p.groups, p.dim, num_buckets // 2, dtype=p.dtype, device=p.device,
                                       generator=p.generator)  # (G, D, b/2)
        q_bk = angular_buckets(q_hash, rotation)  # (G, Nq)
        k_bk = q_bk if shared_qk and p.scale >= 0 else angular_buckets(k, rotation)  # (G, Nk)
        if is_causal:
            result = causal_round(p, k, q_bk, k_bk, 2 * chunk_size, num_buckets)
        else:
            result = chunked_round(p, k, q_bk, k_bk, num_chunks, shared_qk)
        rounds.append((*result, q_bk, k_bk))
    out, log_d = merge_parts([r[0] for r in rounds])  # (G, Nq, Dv), (G, Nq)
    if not return_trace:
        return p.finish(out)
    params = {"chunk_size": chunk_size, "num_rounds": num_rounds, "num_buckets": num_buckets,
              "shared_qk": bool(shared_qk), **({"is_causal": True} if is_causal else {})}
    return p.finish(out), reformer_trace(p, query, key, k, rounds, log_d, params, num_chunks)


def reformer_trace(p, query, key, k, rounds, log_d, params, num_chunks) -> MethodTrace:
    def matrix():
        counts = torch.zeros(p.groups, p.n_q, p.n_k, dtype=p.dtype, device=p.device)
        for r in rounds:
            index, allowed = r[4]
            counts.scatter_add_(2, index, allowed.to(p.dtype))
        logits = dense_logits(p.q, k, p.scale, p.dtype)
        return p.per_query(counts * torch.exp(logits - log_d.unsqueeze(-1)))

    def stack(xs):  # R tensors (G, N) -> (..., R, N)
        t = torch.stack(xs, 1)
        return t.reshape(*p.lead, *t.shape[1:])

    q_orders = None if rounds[0][1] is None else stack([r[1] for r in rounds])
    return MethodTrace(
        "reformer", query, key, p.scale, p.mask, params, log_normalizer=p.per_query(log_d),
        q_buckets=stack([r[5] for r in rounds]), k_buckets=stack([r[6] for r in rounds]),
        q_order=q_orders, k_order=stack([r[2] for r in rounds]), q_blocks=stack([r[3] for r in rounds]),
        extras={"num_chunks": num_chunks}, matrix_fn=matrix)


def multiply_adds(n_queries: int, n_keys: int, dim: int, dim_v: int, *, chunk_size: int, num_rounds: int = 2,
                  num_buckets: int | None = None, shared_qk: bool = False, is_causal: bool = False) -> int:
    """Per round, non-causal: nb = ceil(Nk / chunk_size) chunks of Bq = ceil(Nq / nb) query slots meet S = 2K key
    slots (K = ceil(Nk / nb); S = K when nb = 1): nb Bq S (D + Dv + 1).  Causal: Nq (2 chunk_size + 1)
    (D + Dv + 1).  Then the log-sum-exp merge of the rounds, rounds Nq Dv, and Nk D to normalise shared keys."""
    if is_causal:
        per_round = n_queries * (2 * chunk_size + 1) * (dim + dim_v + 1)
    else:
        nb = max(1, -(-n_keys // chunk_size))
        slots = -(-n_keys // nb) * (1 if nb == 1 else 2)
        per_round = nb * -(-n_queries // nb) * slots * (dim + dim_v + 1)
    return num_rounds * (per_round + n_queries * dim_v) + (n_keys * dim if shared_qk else 0)
