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
Budget (key columns per query) = 2 chunks x rounds: chunk_size = budget / (2 num_rounds), default 2 rounds.
Cost O(rounds (Nq 2 chunk D + (Nq + Nk) D b)).
"""
from __future__ import annotations

import torch

from ._common import MethodTrace, dense_logits, gather_rows, masked_softmax_parts, merge_parts, part, prepare
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


def reformer_attention(query, key, value, *, chunk_size: int = 32, num_rounds: int = 2, num_buckets=None,
                       shared_qk: bool = False, scale=None, key_mask=None, generator=None, return_trace=False):
    """Reformer LSH attention: chunked attention within sorted angular-LSH buckets, several rounds."""
    chunk_size = part("chunk_size", chunk_size)
    num_rounds = part("num_rounds", num_rounds)
    if shared_qk:
        if query is not key and not (query.shape == key.shape and torch.equal(query, key)):
            raise ValueError("shared_qk=True needs key to be the same tensor as query (shared-QK attention, "
                             "Nq == Nk); pass shared_qk=False for separate queries and keys")
    p = prepare(query, key, value, scale=scale, key_mask=key_mask, generator=generator)
    num_chunks = max(1, -(-p.n_k // chunk_size))
    if num_buckets is None:
        num_buckets = default_num_buckets(num_chunks)
    num_buckets = part("num_buckets", num_buckets, minimum=2)
    if num_buckets % 2:
        raise ValueError(f"num_buckets must be an even integer >= 2 (argmax over [xR, -xR]), got {num_buckets}")
    k = p.k / p.k.norm(dim=-1, keepdim=True).clamp_min(1e-12) if shared_qk else p.k  # (G, Nk, D)
    q_hash = p.q if p.scale >= 0 else -p.q
    parts, buckets, orders, q_chunk, key_sets = [], [], [], [], []
    for _ in range(num_rounds):
        rotation = gaussian_directions(p.groups, p.dim, num_buckets // 2, dtype=p.dtype, device=p.device,
                                       generator=p.generator)  # (G, D, b/2)
        q_bk = angular_buckets(q_hash, rotation)  # (G, Nq)
        k_bk = q_bk if shared_qk and p.scale >= 0 else angular_buckets(k, rotation)  # (G, Nk)
        q_order = sort_tokens(q_bk, None)
        k_order = sort_tokens(k_bk, p.valid)
        blocks = make_blocks(q_order, k_order, p.n_valid, num_chunks)
        index, valid = attended_keys(blocks)  # (G, nb, S)
        q_blk = gather_rows(p.q * p.scale, blocks.q_index)  # (G, nb, Bq, D)
        allowed = valid.unsqueeze(-2)  # (G, nb, 1, S), or (G, nb, Bq, S) in shared-QK mode
        if shared_qk:  # no attention to self unless nothing else is there
            others = allowed & (index.unsqueeze(-2) != blocks.q_index.unsqueeze(-1))
            allowed = torch.where(others.any(-1, keepdim=True), others, allowed)
        logits = q_blk @ gather_rows(k, index).mT  # (G, nb, Bq, S)
        out_blk, lse_blk = masked_softmax_parts(logits, allowed, gather_rows(p.v, index))
        parts.append((unblock_queries(out_blk, blocks), unblock_queries(lse_blk.unsqueeze(-1), blocks).squeeze(-1)))
        if return_trace:
            buckets.append((q_bk, k_bk))
            orders.append((q_order, k_order))
            q_chunk.append(blocks.q_block)
            full = (-1, -1, blocks.q_slots, -1)
            key_sets.append((unblock_queries(index.unsqueeze(-2).expand(full), blocks),
                             unblock_queries(allowed.expand(full), blocks)))  # (G, Nq, S) each
    out, log_d = merge_parts(parts)  # (G, Nq, Dv), (G, Nq)
    if not return_trace:
        return p.finish(out)

    def matrix():
        counts = torch.zeros(p.groups, p.n_q, p.n_k, dtype=p.dtype, device=p.device)
        for index, allowed in key_sets:
            counts.scatter_add_(2, index, allowed.to(p.dtype))
        logits = dense_logits(p.q, k, p.scale, p.dtype)
        return p.per_query(counts * torch.exp(logits - log_d.unsqueeze(-1)))

    def stack(xs):  # R tensors (G, N) -> (..., R, N)
        t = torch.stack(xs, 1)
        return t.reshape(*p.lead, *t.shape[1:])

    trace = MethodTrace(
        "reformer", query, key, p.scale, p.mask,
        {"chunk_size": chunk_size, "num_rounds": num_rounds, "num_buckets": num_buckets, "shared_qk": bool(shared_qk)},
        log_normalizer=p.per_query(log_d),
        q_buckets=stack([b[0] for b in buckets]), k_buckets=stack([b[1] for b in buckets]),
        q_order=stack([o[0] for o in orders]), k_order=stack([o[1] for o in orders]),
        q_blocks=stack(q_chunk),
        extras={"num_chunks": num_chunks}, matrix_fn=matrix)
    return p.finish(out), trace
