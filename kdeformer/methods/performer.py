"""Performer (FAVOR+, Choromanski et al., ICLR 2021): positive orthogonal random features.

For unit-scale logits exp(<x, y>) = E_w[ exp(<w, x> - |x|^2/2) exp(<w, y> - |y|^2/2) ], w ~ N(0, I), so
with phi(x) = exp(W x - |x|^2/2) / sqrt(m) (m rows of W) the matrix A = exp(scale Q K^T) is estimated by
phi(Q') phi(K')^T with Q' = sqrt(scale) Q, K' = sqrt(scale) K (the d^-1/4 data scaling of the paper when
scale = 1/sqrt(d)).  The rows of W are drawn in blocks of D mutually orthogonal directions, each row
rescaled to the norm of an independent Gaussian vector, so every row is still marginally N(0, I) (the
estimate stays unbiased) while the variance drops.

Stability (finite at logits of +-1e4 in every dtype): the features are formed in log space,
lq_im = <w_m, q'_i> - |q'_i|^2/2 and lk_jm likewise, and shifted before exp — each key feature m by its
own max over the keys, c_m = max_j lk_jm, and each query row by a_i = max_m (lq_im + c_m).  Then
phi_q = exp(lq + c - a) and phi_k = exp(lk - c) lie in [0, 1], the largest term of every normaliser is
exactly 1 (so it never underflows to 0, which made the output vanish at logits near -1000), and the
shifts cancel in the output; log D~_i = a_i - log m + log(phi_q(i) . sum_j phi_k(j)).
Masks: masked keys get phi = 0, so they leave both the numerator and the normaliser.

Causal (is_causal=True, bottom-right aligned): prefix sums of phi(k_j) v_j^T over the keys, in chunks of
CAUSAL_CHUNK key positions.  Every shift must then come from the past only (a shift over all keys would let
a later token change an earlier output in its last bits): key features are shifted by their running max
over the keys seen so far, the state (sum phi_k v^T, sum phi_k) is rescaled when that max grows, and within
a chunk the (query, key) weights sum_m phi_q(i)_m phi_k(j)_m are formed for j <= i only.
Cost: see multiply_adds.  Budget: m = budget features.
"""
from __future__ import annotations

import math

import torch

from ._common import MethodTrace, part, prepare

OPTIONS = ("num_features", "orthogonal")
CAUSAL_CHUNK = 32  # key positions per step of the causal prefix sums


def split_budget(budget: int, num_features: int | None = None, orthogonal: bool = True) -> dict:
    return {"num_features": part("num_features", budget if num_features is None else num_features),
            "orthogonal": bool(orthogonal)}


def draw_feature_directions(groups: int, num_features: int, dim: int, *, orthogonal: bool, dtype, device,
                            generator) -> torch.Tensor:
    """m random directions per head, each marginally N(0, I_D).  -> W (G, m, D).

    Draws are made in float32 (the same features in every dtype), the orthogonalisation in `dtype`."""
    gauss = torch.randn(groups, num_features, dim, dtype=torch.float32, device=device, generator=generator).to(dtype)
    if not orthogonal:
        return gauss
    num_blocks = -(-num_features // dim)
    raw = torch.randn(groups, num_blocks, dim, dim, dtype=torch.float32, device=device, generator=generator).to(dtype)
    qmat, rmat = torch.linalg.qr(raw)  # (G, nbk, D, D) orthonormal columns
    sign = torch.sign(torch.diagonal(rmat, dim1=-2, dim2=-1))  # make the factorisation unique (Haar)
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    rows = (qmat * sign.unsqueeze(-2)).mT.reshape(groups, num_blocks * dim, dim)[:, :num_features]  # unit rows
    norms = gauss.norm(dim=-1, keepdim=True)  # (G, m, 1): chi(D) lengths from independent Gaussians
    return rows * norms


def log_features(x: torch.Tensor, directions: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """log phi(x) up to the 1/sqrt(m) factor: W x - |x|^2 / 2, -inf on masked rows.

    x (G, N, D), W (G, m, D), valid (G, N) or None -> (G, N, m)."""
    logf = x @ directions.mT - 0.5 * x.pow(2).sum(-1, keepdim=True)
    return logf if valid is None else logf.masked_fill(~valid.unsqueeze(-1), float("-inf"))


def favor_features(q_scaled: torch.Tensor, k_scaled: torch.Tensor, directions: torch.Tensor,
                   valid: torch.Tensor | None):
    """Shifted positive features.  -> phi_q (G, Nq, m) (row max 1), phi_k (G, Nk, m) (column max 1, 0 on
    masked keys), log_factor (G, Nq) with A~_ij = exp(log_factor_i) phi_q(i) . phi_k(j)."""
    lq = log_features(q_scaled, directions)  # (G, Nq, m)
    lk = log_features(k_scaled, directions, valid)  # (G, Nk, m)
    c = lk.amax(1, keepdim=True).detach()  # (G, 1, m): finite, every head has an unmasked key
    shifted = lq + c  # (G, Nq, m)
    a = shifted.amax(-1, keepdim=True).detach()  # (G, Nq, 1)
    return torch.exp(shifted - a), torch.exp(lk - c), a.squeeze(-1) - math.log(directions.shape[1])


def scaled_pair(p):
    """Q', K' with <Q', K'> = scale <Q, K> (a negative scale flips the sign of the queries)."""
    root = math.sqrt(abs(p.scale))
    return p.q * (root if p.scale >= 0 else -root), p.k * root


def finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    """-inf (no unmasked key seen yet) -> 0, so a shift never turns into inf - inf."""
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def causal_chunk(lq, lk, v, state):
    """One chunk of causal FAVOR+.  lq (G, T, m) log features of the queries aligned to these key positions,
    lk (G, T, m) (-inf on masked keys), v (G, T, Dv); state = (S (G, m, Dv), z (G, m), C (G, m)): the
    past keys' sum of exp(lk - C) v^T, sum of exp(lk - C), and their running max C.
    -> (num (G, T, Dv), den (G, T), r (G, T)) with D~ = e^r den / m, and the state after the chunk."""
    big_s, z, c = state
    prefix = finite_or_zero(torch.maximum(c.unsqueeze(1), torch.cummax(lk, 1).values)).detach()  # (G, T, m)
    r = (lq + prefix).amax(-1, keepdim=True).detach()  # (G, T, 1)
    fq = torch.exp(lq + prefix - r)  # (G, T, m) <= 1
    w_past = fq * torch.exp(c.unsqueeze(1) - prefix)  # (G, T, m): 0 while no past key exists
    n = lk.shape[1]
    future = torch.ones(n, n, dtype=torch.bool, device=lk.device).triu(1)  # (T, T) j > i
    pair = (lk.unsqueeze(1) - prefix.unsqueeze(2)).masked_fill(future.view(1, n, n, 1), float("-inf"))
    weights = torch.einsum("gim,gijm->gij", fq, torch.exp(pair))  # (G, T, T), 0 for j > i
    num = w_past @ big_s + weights @ v  # (G, T, Dv)
    den = (w_past @ z.unsqueeze(-1)).squeeze(-1) + weights.sum(-1)  # (G, T)
    c_new = torch.maximum(c, lk.amax(1)).detach()  # (G, m)
    c_safe = finite_or_zero(c_new)
    decay = torch.exp(c - c_safe)  # (G, m): 0 while nothing was seen
    fk = torch.exp(lk - c_safe.unsqueeze(1))  # (G, T, m)
    new_state = (decay.unsqueeze(-1) * big_s + fk.mT @ v, decay * z + fk.sum(1), c_new)
    return num, den, r.squeeze(-1), new_state


def causal_favor(lq: torch.Tensor, lk: torch.Tensor, v: torch.Tensor):
    """Causal FAVOR+ by chunked prefix sums.  lq (G, Nq, m), lk (G, Nk, m) (-inf masked), v (G, Nk, Dv).
    -> out (G, Nq, Dv) (0 where a query sees no unmasked key), log of e^r den (G, Nq) (-inf there)."""
    groups, n_q, m = lq.shape
    n_k, dim_v = lk.shape[1], v.shape[-1]
    offset = n_k - n_q  # query i sits at key position i + offset
    aligned = lq.new_zeros(groups, n_k, m)  # (G, Nk, m) query features at their key position
    first = max(0, -offset)  # queries before the first key see nothing
    aligned[:, first + offset:] = lq[:, first:]
    state = (v.new_zeros(groups, m, dim_v), v.new_zeros(groups, m), lk.new_full((groups, m), float("-inf")))
    nums, logs = [], []
    for s in range(0, n_k, CAUSAL_CHUNK):
        e = min(n_k, s + CAUSAL_CHUNK)
        num, den, r, state = causal_chunk(aligned[:, s:e], lk[:, s:e], v[:, s:e], state)
        nums.append(num / den.clamp_min(torch.finfo(den.dtype).tiny).unsqueeze(-1))
        logs.append(r + den.log())
    out, log_d = torch.cat(nums, 1)[:, max(0, offset):], torch.cat(logs, 1)[:, max(0, offset):]
    if first:
        out = torch.cat([out.new_zeros(groups, first, dim_v), out], 1)
        log_d = torch.cat([log_d.new_full((groups, first), float("-inf")), log_d], 1)
    return out, log_d


def performer_attention(query, key, value, *, num_features: int = 128, orthogonal: bool = True, scale=None,
                        key_mask=None, generator=None, return_trace=False, is_causal=False):
    """FAVOR+ estimate of softmax attention with `num_features` positive random features per head."""
    num_features = part("num_features", num_features)
    p = prepare(query, key, value, scale=scale, key_mask=key_mask, generator=generator, return_trace=return_trace)
    directions = draw_feature_directions(p.groups, num_features, p.dim, orthogonal=bool(orthogonal),
                                         dtype=p.dtype, device=p.device, generator=p.generator)  # (G, m, D)
    q_s, k_s = scaled_pair(p)
    params = {"num_features": num_features, "orthogonal": bool(orthogonal)}
    if is_causal:
        lq, lk = log_features(q_s, directions), log_features(k_s, directions, p.valid)  # (G, N, m)
        out, log_d = causal_favor(lq, lk, p.v)
        if not return_trace:
            return p.finish(out)
        trace = MethodTrace("performer", query, key, p.scale, p.mask, {**params, "is_causal": True},
                            log_normalizer=p.per_query(log_d - math.log(num_features)),
                            extras={"directions": p.per_group(directions)})
        return p.finish(out), trace
    phi_q, phi_k, log_factor = favor_features(q_s, k_s, directions, p.valid)  # (G, Nq, m), (G, Nk, m), (G, Nq)
    kv = phi_k.mT @ p.v  # (G, m, Dv)
    k_sum = phi_k.sum(1)  # (G, m)
    num = phi_q @ kv  # (G, Nq, Dv)
    den = (phi_q @ k_sum.unsqueeze(-1)).squeeze(-1)  # (G, Nq) >= 1
    out = num / den.unsqueeze(-1)
    if not return_trace:
        return p.finish(out)

    def matrix():
        m = phi_q @ phi_k.mT  # (G, Nq, Nk): phi(Q) phi(K)^T up to per-row factors
        return p.per_query(m / m.sum(-1, keepdim=True))

    trace = MethodTrace("performer", query, key, p.scale, p.mask, params,
                        log_normalizer=p.per_query(log_factor + den.log()), features=(p.per_query(phi_q), p.per_key(phi_k)),
                        extras={"directions": p.per_group(directions)}, matrix_fn=matrix)
    return p.finish(out), trace


def multiply_adds(n_queries: int, n_keys: int, dim: int, dim_v: int, *, num_features: int, orthogonal: bool = True,
                  is_causal: bool = False) -> int:
    """Feature maps (Nq + Nk) m D projections + (Nq + Nk) D squared norms; then, non-causal, K^T V and the key
    sum Nk m (Dv + 1) and the query side Nq m (Dv + 1).  Causal, per chunk of T key positions (the code
    aligns the queries to the Nk key positions): past state T m (Dv + 1), within-chunk weights T^2 m and
    T^2 (Dv + 1), state update T m (Dv + 1) + m Dv.  Drawing W (and its QR) is data-independent and left out."""
    m = num_features
    total = (n_queries + n_keys) * (m * dim + dim)
    if not is_causal:
        return total + (n_keys + n_queries) * m * (dim_v + 1)
    for s in range(0, n_keys, CAUSAL_CHUNK):
        t = min(CAUSAL_CHUNK, n_keys - s)
        total += 2 * t * m * (dim_v + 1) + t * t * m + t * t * (dim_v + 1) + m * dim_v
    return total
