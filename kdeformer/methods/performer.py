"""Performer (FAVOR+, Choromanski et al., ICLR 2021): positive orthogonal random features.

For unit-scale logits exp(<x, y>) = E_w[ exp(<w, x> - |x|^2/2) exp(<w, y> - |y|^2/2) ], w ~ N(0, I), so
with phi(x) = exp(W x - |x|^2/2) / sqrt(m) (m rows of W) the matrix A = exp(scale Q K^T) is estimated by
phi(Q') phi(K')^T with Q' = sqrt(scale) Q, K' = sqrt(scale) K (the d^-1/4 data scaling of the paper when
scale = 1/sqrt(d)).  The rows of W are drawn in blocks of D mutually orthogonal directions, each row
rescaled to the norm of an independent Gaussian vector, so every row is still marginally N(0, I) (the
estimate stays unbiased) while the variance drops.

Stability: phi is computed in log space and shifted before exp — per query by its own max over features,
per head by one max over all (unmasked) keys and features.  Both shifts cancel in the output and are added
back to the normaliser estimate:  log D~_i = a_i + b + log(phi(q_i) . sum_j phi(k_j)).
Masks: masked keys get phi = 0, so they leave both the numerator and the normaliser.
Cost O((Nq + Nk) m D).  Budget: m = budget features.
"""
from __future__ import annotations

import math

import torch

from ._common import MethodTrace, part, prepare

OPTIONS = ("num_features", "orthogonal")


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


def log_features(x: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """log phi(x) up to the 1/sqrt(m) factor: W x - |x|^2 / 2.  x (G, N, D), W (G, m, D) -> (G, N, m)."""
    return x @ directions.mT - 0.5 * x.pow(2).sum(-1, keepdim=True)


def query_features(q_scaled: torch.Tensor, directions: torch.Tensor):
    """phi(q) shifted by each query's own max.  -> (phi (G, Nq, m) with max 1, log shift a (G, Nq))."""
    logf = log_features(q_scaled, directions)
    shift = logf.amax(-1, keepdim=True)  # (G, Nq, 1)
    return torch.exp(logf - shift), shift.squeeze(-1)


def key_features(k_scaled: torch.Tensor, directions: torch.Tensor, valid: torch.Tensor | None):
    """phi(k) shifted by one max per head over unmasked keys, 0 on masked keys; the 1/m factor of
    phi(q).phi(k) goes into the shift.  -> (phi (G, Nk, m), log shift b (G,))."""
    logf = log_features(k_scaled, directions)  # (G, Nk, m)
    if valid is not None:
        logf = logf.masked_fill(~valid.unsqueeze(-1), float("-inf"))
    shift = logf.amax(dim=(-2, -1))  # (G,)
    phi = torch.exp(logf - shift.view(-1, 1, 1))
    return phi, shift - math.log(directions.shape[1])


def scaled_pair(p):
    """Q', K' with <Q', K'> = scale <Q, K> (a negative scale flips the sign of the queries)."""
    root = math.sqrt(abs(p.scale))
    return p.q * (root if p.scale >= 0 else -root), p.k * root


def performer_attention(query, key, value, *, num_features: int = 128, orthogonal: bool = True, scale=None,
                        key_mask=None, generator=None, return_trace=False):
    """FAVOR+ estimate of softmax attention with `num_features` positive random features per head."""
    num_features = part("num_features", num_features)
    p = prepare(query, key, value, scale=scale, key_mask=key_mask, generator=generator)
    directions = draw_feature_directions(p.groups, num_features, p.dim, orthogonal=bool(orthogonal),
                                         dtype=p.dtype, device=p.device, generator=p.generator)  # (G, m, D)
    q_s, k_s = scaled_pair(p)
    phi_q, a = query_features(q_s, directions)  # (G, Nq, m), (G, Nq)
    phi_k, b = key_features(k_s, directions, p.valid)  # (G, Nk, m), (G,)
    kv = phi_k.mT @ p.v  # (G, m, Dv)
    k_sum = phi_k.sum(1)  # (G, m)
    num = phi_q @ kv  # (G, Nq, Dv)
    den = (phi_q @ k_sum.unsqueeze(-1)).squeeze(-1)  # (G, Nq)
    out = num / den.clamp_min(torch.finfo(den.dtype).tiny).unsqueeze(-1)
    if not return_trace:
        return p.finish(out)
    log_d = a + b.unsqueeze(-1) + den.log()  # (G, Nq)

    def matrix():
        m = phi_q @ phi_k.mT  # (G, Nq, Nk): phi(Q) phi(K)^T up to per-row factors
        return p.per_query(m / m.sum(-1, keepdim=True))

    trace = MethodTrace("performer", query, key, p.scale, p.mask,
                        {"num_features": num_features, "orthogonal": bool(orthogonal)},
                        log_normalizer=p.per_query(log_d), features=(p.per_query(phi_q), p.per_key(phi_k)),
                        extras={"directions": p.per_group(directions)}, matrix_fn=matrix)
    return p.finish(out), trace
