"""Thinformer (low-rank thinning, Carrell et al., ICML 2025): one shared subset of key/value pairs chosen by
kernel halving, then exact softmax attention over that subset.

Per head, with k'_j = sqrt(|scale|) k_j:
  1. standard thinning: of the n unmasked keys keep n' = the largest power of two <= n, evenly strided;
  2. KH-Compress: halve bottom-up until m = subset_size pairs are left (m a power of two).  Round r cuts the
     current points into consecutive buckets of b_r = min(points, b_0 2^r) (b_0 = 4 m^2 / n', which is the
     paper's 4^(g+1) for a Compress(g) output of 2^g sqrt(n') points) and halves every bucket;
  3. kernel halving of a bucket: the points form pairs (2t, 2t+1) under the kernel on (key, value) pairs
         kappa((k, v), (k~, v~)) = exp(<k', k~'> - max_j |k'_j|^2) (<v, v~> + max_j |v_j|_inf^2),
     and a self-balancing signed walk keeps one point of each pair: with psi the kernel-space sum of
     (kept - dropped) so far and d_t the difference of pair t, pair t keeps its second point when
     u_t a_t <= <psi, d_t>, u_t uniform in [-L, L], a_t = |d_t| max_{t' <= t} |d_t'|, and
     L = 1/2 + log(2 b_0 R n' / (delta b)) (R rounds, delta the failure probability); each bucket's choice
     is then swapped for its complement with probability 1/2;
  4. out_i = softmax over the m kept keys of scale <q_i, k_j>, applied to their values (each kept pair stands
     for n / m keys, so log D~_i = lse_i + log(n / m)).
With subset_size >= n every unmasked key is kept and the result is exact.  The selection is discrete (no
gradient flows through it); gradients flow through step 4.  Masked keys never enter the subset.  No causal
form: the subset is shared by every query and drawn from all keys.
Budget = subset_size = budget rounded down to a power of two.  Cost: see multiply_adds.
"""
from __future__ import annotations

import math

import torch

from ._common import MethodTrace, dense_logits, gather_rows, masked_softmax_parts, part, prepare, refuse_causal

OPTIONS = ("subset_size", "delta")


def split_budget(budget: int, subset_size: int | None = None, delta: float = 0.5) -> dict:
    return {"subset_size": part("subset_size", budget if subset_size is None else subset_size), "delta": delta}


def power_of_two_below(n: int) -> int:
    return 1 << (int(n).bit_length() - 1)


def halving_schedule(n_thin: int, m: int) -> list[int]:
    """Bucket size of every halving round that takes n_thin points (a power of two) down to m."""
    rounds = int(math.log2(n_thin // m))
    first = min(n_thin, max(2, 4 * m * m // n_thin))
    return [min(n_thin >> r, first << r) for r in range(rounds)]


def pair_kernel(k_s: torch.Tensor, v: torch.Tensor, shift: torch.Tensor, b_sqd: torch.Tensor) -> torch.Tensor:
    """kappa on the points of each bucket.  k_s (H, nbk, b, D), v (H, nbk, b, Dv), shift and b_sqd (H, 1, 1, 1)
    -> (H, nbk, b, b)."""
    return torch.exp(k_s @ k_s.mT - shift) * (v @ v.mT + b_sqd)


def halve_buckets(kernel: torch.Tensor, uniforms: torch.Tensor, coins: torch.Tensor, log_mult: float) -> torch.Tensor:
    """Kernel halving of every bucket.  kernel (H, nbk, b, b), uniforms (H, nbk, b/2) in [0, 1), coins (H, nbk)
    bool -> kept local index (H, nbk, b/2) (2t or 2t + 1)."""
    diff = kernel[..., ::2] - kernel[..., 1::2]
    diff = diff[..., ::2, :] - diff[..., 1::2, :]  # (H, nbk, b/2, b/2): <d_t, d_t'>
    size = diff.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()  # (H, nbk, b/2): |d_t|
    thresholds = (2 * uniforms - 1) * log_mult * size * torch.cummax(size, -1).values
    swap = torch.zeros_like(uniforms, dtype=torch.bool)
    walk = diff[..., 0, :].clone()  # <psi, d_t'> after keeping the first point of pair 0
    for t in range(1, diff.shape[-1]):
        take_second = thresholds[..., t] <= walk[..., t]  # (H, nbk)
        swap[..., t] = take_second
        walk = walk + (1.0 - 2.0 * take_second.to(walk.dtype)).unsqueeze(-1) * diff[..., t, :]
    swap = swap ^ coins.unsqueeze(-1)  # the coreset or its complement
    return 2 * torch.arange(diff.shape[-1], device=kernel.device) + swap.long()


def thin_keys(k_s: torch.Tensor, v: torch.Tensor, m: int, delta: float, generator) -> torch.Tensor:
    """KH-Compress of heads with the same key count.  k_s (H, n, D) scaled keys (unmasked, in token order),
    v (H, n, Dv) -> kept indices (H, m') into n, m' = min(m, n') (all n when m >= n)."""
    heads, n, _ = k_s.shape
    if m >= n:
        return torch.arange(n, device=k_s.device).expand(heads, n)
    n_thin = power_of_two_below(n)
    points = (torch.arange(n_thin, device=k_s.device) * (n // n_thin)).expand(heads, n_thin)  # (H, n')
    m = min(power_of_two_below(m), n_thin)
    schedule = halving_schedule(n_thin, m)
    shift = k_s.pow(2).sum(-1).amax(-1).view(-1, 1, 1, 1)  # (H, 1, 1, 1) max |k'|^2
    b_sqd = v.abs().amax(dim=(-2, -1)).pow(2).view(-1, 1, 1, 1)  # max |v|_inf^2
    for bucket in schedule:
        nbk = points.shape[1] // bucket
        k_b = gather_rows(k_s, points).view(heads, nbk, bucket, -1)  # (H, nbk, b, D)
        v_b = gather_rows(v, points).view(heads, nbk, bucket, -1)  # (H, nbk, b, Dv)
        uniforms = torch.rand(heads, nbk, bucket // 2, dtype=torch.float64, device=k_s.device, generator=generator)
        coins = torch.rand(heads, nbk, dtype=torch.float64, device=k_s.device, generator=generator) < 0.5
        log_mult = 0.5 + math.log(2 * schedule[0] * len(schedule) * n_thin / (delta * bucket))
        kept = halve_buckets(pair_kernel(k_b, v_b, shift, b_sqd), uniforms.to(k_s.dtype), coins, log_mult)
        points = torch.gather(points.view(heads, nbk, bucket), 2, kept).flatten(1)  # (H, n_r / 2)
    return points


def select_subsets(p, subset_size: int, delta: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per distinct unmasked-key count: (groups (H,), kept key token indices (H, m')), no gradient."""
    k_s = (p.k * math.sqrt(abs(p.scale))).detach()
    v = p.v.detach()
    if p.valid is None:
        order = torch.arange(p.n_k, device=p.device).expand(p.groups, p.n_k)
    else:  # unmasked keys first, in token order
        order = torch.sort((~p.valid).to(torch.int8), dim=-1, stable=True).indices
    subsets = []
    with torch.no_grad():
        for n in torch.unique(p.n_valid).tolist():
            groups = torch.nonzero(p.n_valid == n).flatten()  # (H,)
            keys = order[groups, :n]  # (H, n) token index of each unmasked key
            local = thin_keys(gather_rows(k_s[groups], keys), gather_rows(v[groups], keys), subset_size, delta,
                              p.generator)
            subsets.append((groups, torch.gather(keys, 1, local)))
    return subsets


def thinformer_attention(query, key, value, *, subset_size: int = 64, delta: float = 0.5, scale=None, key_mask=None,
                         generator=None, return_trace=False, is_causal=False):
    """Thinformer: exact softmax over one kernel-halving subset of `subset_size` key/value pairs per head."""
    refuse_causal(is_causal, "Thinformer", "one subset of all keys is shared by every query")
    subset_size = part("subset_size", subset_size)
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0.0 < float(delta) <= 1.0:
        raise ValueError(f"delta must be a number in (0, 1], got {delta!r}")
    p = prepare(query, key, value, scale=scale, key_mask=key_mask, generator=generator, return_trace=return_trace)
    q_s = p.q * p.scale  # (G, Nq, D)
    subsets = select_subsets(p, subset_size, float(delta))
    outs, lses = [], []
    for groups, kept in subsets:
        k_sel, v_sel = gather_rows(p.k[groups], kept), gather_rows(p.v[groups], kept)  # (H, m', D), (H, m', Dv)
        out, lse = masked_softmax_parts(q_s[groups] @ k_sel.mT, None, v_sel)  # (H, Nq, Dv), (H, Nq)
        outs.append(out)
        lses.append(lse + (p.n_valid[groups].to(p.dtype).log() - math.log(kept.shape[1])).unsqueeze(-1))
    back = torch.argsort(torch.cat([groups for groups, _ in subsets]))  # back to group order
    out, log_d = torch.cat(outs)[back], torch.cat(lses)[back]  # (G, Nq, Dv), (G, Nq)
    if not return_trace:
        return p.finish(out)
    width = max(kept.shape[1] for _, kept in subsets)
    sampled = torch.cat([torch.nn.functional.pad(kept, (0, width - kept.shape[1]), value=-1)
                         for _, kept in subsets])[back]  # (G, m) kept keys, -1 padding

    def matrix():
        weight = torch.zeros(p.groups, p.n_k + 1, dtype=p.dtype, device=p.device)
        weight = weight.scatter_add(1, torch.where(sampled < 0, p.n_k, sampled), torch.ones_like(sampled, dtype=p.dtype))
        per_key = weight[:, :p.n_k] * (p.n_valid.to(p.dtype) / (sampled >= 0).sum(-1)).unsqueeze(-1)  # n / m per kept
        return p.per_query(torch.exp(dense_logits(p.q, p.k, p.scale, p.dtype) - log_d.unsqueeze(-1)) * per_key.unsqueeze(1))

    trace = MethodTrace("thinformer", query, key, p.scale, p.mask, {"subset_size": subset_size, "delta": float(delta)},
                        log_normalizer=p.per_query(log_d), sampled=p.per_group(sampled), matrix_fn=matrix)
    return p.finish(out), trace


def multiply_adds(n_queries: int, n_keys: int, dim: int, dim_v: int, *, subset_size: int, delta: float = 0.5) -> int:
    """Without a mask: m' = Nk when subset_size >= Nk (exact), else m' = min(power of two <= subset_size, n').
    Each halving round of n_r points in buckets of b_r forms n_r b_r kernel entries at D + Dv + 1 each (two
    dot products and their product) and runs the walk, n_r b_r / 4 updates; then attention Nq m' (D + Dv + 1)."""
    pair = dim + dim_v + 1
    if subset_size >= n_keys:
        return n_queries * n_keys * pair
    n_thin = power_of_two_below(n_keys)
    m = min(power_of_two_below(subset_size), n_thin)
    total = 0
    for r, bucket in enumerate(halving_schedule(n_thin, m)):
        points = n_thin >> r
        total += points * bucket * pair + points * bucket // 4
    return total + n_queries * m * pair
