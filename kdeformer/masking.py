"""Masks by removal: padded queries and masked keys are taken out before KDEformer runs, then put back.

A sequence's output must not depend on how much padding follows it or on what else shares its batch.
So each head's real queries and unmasked keys are gathered to the front (in token order), heads with
the same real lengths run together on those compacted tensors, and every result is scattered back to
the caller's token positions (masked queries get output 0). Blocks are then planned on real tokens
only, and the addressed draws of kdeformer.random make the random choices depend on the head and its
own tokens alone. Causal limits are recomputed after compaction: real query i sees the unmasked keys
at positions <= Nk - Nq + i.

Shape legend: G groups, Gc groups of one length class, nq / nk real queries / keys of the class.
"""
from __future__ import annotations

import torch

from .core import gather_rows, kde_unmasked

# How each trace field is carried from compacted positions back to token positions (fill for masked).
QUERY_VALUES = {"row_block": -1, "q_buckets": -1, "q_blocks": -1, "q_groups": -1, "log_normalizer": 0,
                "heavy_fraction": 0, "heavy_output": 0, "sampled_output": 0, "query_cols": 0, "query_weights": 0}
KEY_VALUES = {"k_buckets": -1, "k_blocks": -1}
KEY_AXIS = ("probs", "group_probs", "group_column_norms", "inclusion_probs")  # last dim indexes keys
KEY_INDICES = ("block_cols", "sampled", "heavy_columns", "query_cols")  # values are key indices
QUERY_INDICES = ("estimate_rows",)  # values are query indices
ORDERS = ("q_order", "k_order")  # permutations: real tokens sorted, then the masked ones
SCALARS = ("num_blocks", "num_groups", "chunk_len", "local_window", "window")
PAD_FILL = {"sample_group": -1}  # fill of padding slots when classes of different sizes are merged


def causal_limits(q_pos: torch.Tensor, k_pos: torch.Tensor, n_q: int, n_k: int) -> torch.Tensor:
    """Keys each query sees under the bottom-right causal mask, counted among the real keys.

    q_pos (G, nq), k_pos (G, nk) token positions of the real queries / keys (ascending) -> (G, nq) int64.
    """
    limits = torch.searchsorted(k_pos.contiguous(), q_pos + (n_k - n_q), right=True)
    if bool((limits == 0).any()):
        raise ValueError(
            "is_causal leaves a query without any visible key (Nq > Nk, or key_mask hides every key up to "
            "a real query); every real query needs one unmasked key at or before its causal position"
        )
    return limits


def run_kernel(q, k, v, limits, *, scale, opts, draws, return_trace):
    """The algorithm on compacted heads: kdeformer.causal for causal attention, else core.kde_unmasked."""
    if opts.is_causal:
        from .causal import causal_kde

        out, parts = causal_kde(q, k, v, limits=limits, scale=scale, bucket_size=opts.bucket_size,
                                sample_size=opts.sample_size, num_projs=opts.num_projs, sampling=opts.sampling,
                                bucket_order=opts.bucket_order, local_window=opts.local_window,
                                heavy_columns=opts.heavy_columns, estimate_rows=opts.estimate_rows, draws=draws,
                                return_trace=return_trace)
        return out, None if parts is None else flat_parts(parts)
    return kde_unmasked(q, k, v, scale=scale, opts=opts, draws=draws, return_trace=return_trace)


def flat_parts(parts: dict) -> dict:
    """A kernel's parts in the one layout the trace reads: nested extras lifted, `n_exact` (the first
    n_exact columns are exact) turned into the per-column `block_exact` flags."""
    parts = dict(parts)
    parts.update(parts.pop("extras", {}))
    if "n_exact" in parts:
        cols = parts["block_cols"]
        exact = torch.arange(cols.shape[-1], device=cols.device) < parts.pop("n_exact")  # (C,)
        parts["block_exact"] = exact.expand_as(cols)
    return parts


def real_first(valid: torch.Tensor | None, groups: int, n: int, device) -> torch.Tensor:
    """Per head, the token positions with the real tokens first (in order), then the masked.  # (G, N)"""
    if valid is None:
        return torch.arange(n, device=device).expand(groups, n)
    return torch.sort((~valid).to(torch.int8), dim=-1, stable=True).indices


def length_classes(p) -> list[tuple[torch.Tensor, int, int]]:
    """Heads grouped by (real queries, real keys): [(group indices (Gc,), nq, nk), ...]."""
    n_q = torch.full((p.groups,), p.n_q, device=p.device) if p.query_valid is None else p.query_valid.sum(-1)
    code = n_q * (p.n_k + 1) + p.n_valid  # (G,)
    classes = []
    for value in torch.unique(code).tolist():
        groups = (code == value).nonzero().flatten()
        classes.append((groups, value // (p.n_k + 1), value % (p.n_k + 1)))
    return classes


def attend_real_tokens(p, opts, draws, return_trace: bool):
    """Run KDEformer on every head's real tokens.  -> out (G, Nq, Dv), trace parts (G-leading) or None."""
    if p.valid is None and p.query_valid is None:
        positions = torch.arange(p.n_q, device=p.device).expand(p.groups, p.n_q)
        limits = causal_limits(positions, torch.arange(p.n_k, device=p.device).expand(p.groups, p.n_k),
                               p.n_q, p.n_k) if opts.is_causal else None
        return run_kernel(p.q, p.k, p.v, limits, scale=p.scale, opts=opts, draws=draws, return_trace=return_trace)
    q_perm = real_first(p.query_valid, p.groups, p.n_q, p.device)  # (G, Nq)
    k_perm = real_first(p.valid, p.groups, p.n_k, p.device)  # (G, Nk)
    rows, values, class_parts = [], [], []
    for groups, nq, nk in length_classes(p):
        if nq == 0:
            continue  # no real query: outputs stay 0, trace fields keep their fills
        q_pos, k_pos = q_perm[groups, :nq], k_perm[groups, :nk]  # (Gc, nq), (Gc, nk) ascending
        q, k, v = gather_rows(p.q[groups], q_pos), gather_rows(p.k[groups], k_pos), gather_rows(p.v[groups], k_pos)
        limits = causal_limits(q_pos, k_pos, p.n_q, p.n_k) if opts.is_causal else None
        out, parts = run_kernel(q, k, v, limits, scale=p.scale, opts=opts, draws=draws.subset(groups),
                                return_trace=return_trace)
        rows.append((groups.unsqueeze(-1) * p.n_q + q_pos).flatten())
        values.append(out.reshape(-1, out.shape[-1]))
        if return_trace:
            class_parts.append((groups, to_token_positions(parts, q_perm[groups], k_perm[groups], nq, nk)))
    out = values[0].new_zeros(p.groups * p.n_q, p.dim_v).index_copy(0, torch.cat(rows), torch.cat(values))
    out = out.view(p.groups, p.n_q, p.dim_v)
    return out, (merge_classes(class_parts, p.groups) if return_trace else None)


def to_token_positions(parts: dict, q_perm, k_perm, nq: int, nk: int) -> dict:
    """Trace parts of compacted heads, carried back to the caller's token positions (see the tables)."""
    q_pos, k_pos = q_perm[:, :nq], k_perm[:, :nk]
    n_q, n_k = q_perm.shape[1], k_perm.shape[1]
    out = {}
    for name, x in parts.items():
        if name in KEY_INDICES and name in QUERY_VALUES:  # query_cols: key indices on a query axis
            x = torch.gather(k_pos, 1, x.flatten(1)).view_as(x)
        if name in QUERY_VALUES or name in KEY_VALUES:
            pos, n, fill = (q_pos, n_q, QUERY_VALUES[name]) if name in QUERY_VALUES else (k_pos, n_k, KEY_VALUES[name])
            index = pos.view(*pos.shape, *([1] * (x.dim() - 2))).expand(*pos.shape, *x.shape[2:])
            out[name] = x.new_full((x.shape[0], n, *x.shape[2:]), fill).scatter(1, index, x)
        elif name in KEY_AXIS:
            index = k_pos.view(k_pos.shape[0], *([1] * (x.dim() - 2)), nk).expand_as(x)
            out[name] = x.new_zeros(*x.shape[:-1], n_k).scatter(-1, index, x)
        elif name in KEY_INDICES or name in QUERY_INDICES:
            pos = k_pos if name in KEY_INDICES else q_pos
            out[name] = torch.gather(pos, 1, x.flatten(1)).view_as(x)
        elif name in ORDERS:
            perm, pos = (q_perm, q_pos) if name == "q_order" else (k_perm, k_pos)
            out[name] = torch.cat([torch.gather(pos, 1, x), perm[:, x.shape[1]:]], 1)
        else:
            out[name] = x
    return out


def merge_classes(class_parts: list, groups: int) -> dict:
    """One G-leading tensor per field from the length classes' parts (padded to the largest shape)."""
    merged = {}
    for name in class_parts[0][1]:
        items = [(g, parts[name]) for g, parts in class_parts]
        if name in SCALARS or not isinstance(items[0][1], torch.Tensor):
            merged[name] = max(x for _, x in items)
            continue
        shape = [max(x.shape[d] for _, x in items) for d in range(1, items[0][1].dim())]
        first = items[0][1]
        fill = PAD_FILL.get(name, QUERY_VALUES.get(name, KEY_VALUES.get(name, 0)))
        full = first.new_full((groups, *shape), fill)
        if name in ORDERS:
            full = torch.arange(shape[0], device=first.device).expand(groups, shape[0]).clone()
        for g, x in items:
            full[(g, *[slice(0, n) for n in x.shape[1:]])] = x
        merged[name] = full
    return merged
