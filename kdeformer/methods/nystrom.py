"""Nystromformer (Xiong et al., AAAI 2021): softmax attention through m landmarks.

Landmarks are segment means: the Nq queries (and, separately, the n unmasked keys, in token order) are cut
into m contiguous segments of floor/ceil(N / m) tokens and each segment is averaged, giving Q~, K~ (m, D).
With three softmax kernels
    F = softmax(s Q K~^T) (Nq, m),   A = softmax(s Q~ K~^T) (m, m),   B = softmax(s Q~ K^T) (m, Nk)
(masked keys left out of B's softmax) the attention D^-1 A V is approximated by F A^+ (B V), with A^+
from the iterative Moore-Penrose scheme of Razavi et al. (2014) used by the paper:
    Z_0 = A^T / (||A||_1 ||A||_inf),   Z_{k+1} = Z_k (13 I - A Z_k (15 I - A Z_k (7 I - A Z_k))) / 4,
6 iterations by default; ||.||_1 and ||.||_inf are taken per head (the paper's improved start; the
released code takes the max over the whole batch).  The learned depthwise-convolution skip of the paper's
layer is a model part, not part of the approximation, and is left out.
Nystromformer estimates no normaliser (log_normalizer is None).  With m = Nq = Nk the three kernels are
the full softmax S and the output is S S^+ S V = S V (exact up to the pseudo-inverse's convergence).
No causal form: every landmark averages queries and keys from the whole sequence (is_causal=True is
refused).  Budget: m = budget landmarks (capped at Nq and Nk).  Cost O((Nq + Nk) m D + m^3): see multiply_adds.
"""
from __future__ import annotations

import torch

from ._common import MethodTrace, part, prepare, refuse_causal

OPTIONS = ("num_landmarks", "pinv_iterations", "pinv")
PINV_MODES = ("iterative", "exact")


def split_budget(budget: int, num_landmarks: int | None = None, pinv_iterations: int = 6,
                 pinv: str = "iterative") -> dict:
    return {"num_landmarks": part("num_landmarks", budget if num_landmarks is None else num_landmarks),
            "pinv_iterations": part("pinv_iterations", pinv_iterations), "pinv": pinv}


def segment_means(x: torch.Tensor, n_rows: torch.Tensor, num: int) -> torch.Tensor:
    """Means of `num` contiguous segments of the first n_rows rows of each head.

    x (G, N, D) (rows to use first), n_rows (G,) -> (G, num, D).  Segment t covers rows
    [floor(t n / num), max(floor((t+1) n / num), start + 1)): balanced, never empty.
    """
    groups, _, dim = x.shape
    cums = torch.cat([torch.zeros(groups, 1, dim, dtype=x.dtype, device=x.device), x.cumsum(1)], 1)  # (G, N+1, D)
    t = torch.arange(num, device=x.device)
    n = n_rows.view(-1, 1)
    start = (t * n) // num  # (G, num)
    end = torch.maximum(((t + 1) * n) // num, start + 1)
    total = torch.gather(cums, 1, end.unsqueeze(-1).expand(-1, -1, dim)) - torch.gather(
        cums, 1, start.unsqueeze(-1).expand(-1, -1, dim))
    return total / (end - start).unsqueeze(-1).to(x.dtype)


def iterative_pinv(a: torch.Tensor, iterations: int) -> torch.Tensor:
    """Moore-Penrose pseudo-inverse of each (m, m) matrix by Razavi et al.'s cubic iteration."""
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    norm_1 = a.abs().sum(-2).amax(-1)  # (G,) max column sum
    norm_inf = a.abs().sum(-1).amax(-1)  # (G,) max row sum
    z = a.mT / (norm_1 * norm_inf).view(-1, 1, 1)
    for _ in range(iterations):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def nystrom_attention(query, key, value, *, num_landmarks: int = 64, pinv_iterations: int = 6,
                      pinv: str = "iterative", scale=None, key_mask=None, generator=None, return_trace=False,
                      is_causal=False):
    """Nystromformer approximation with `num_landmarks` segment-mean landmarks (deterministic)."""
    refuse_causal(is_causal, "Nystromformer", "its landmarks average tokens from the whole sequence")
    num_landmarks = part("num_landmarks", num_landmarks)
    pinv_iterations = part("pinv_iterations", pinv_iterations)
    if pinv not in PINV_MODES:
        raise ValueError(f"pinv must be one of {list(PINV_MODES)}, got {pinv!r}")
    p = prepare(query, key, value, scale=scale, key_mask=key_mask, generator=generator, return_trace=return_trace)
    m = min(num_landmarks, p.n_q, p.n_k)
    q_s = p.q * p.scale  # (G, Nq, D)
    q_marks = segment_means(q_s, torch.full_like(p.n_valid, p.n_q), m)  # (G, m, D)
    if p.valid is None:
        k_first = p.k
    else:  # unmasked keys first, in token order
        order = torch.sort((~p.valid).to(torch.int8), dim=-1, stable=True).indices
        k_first = torch.gather(p.k, 1, order.unsqueeze(-1).expand(-1, -1, p.dim))
    k_marks = segment_means(k_first, p.n_valid, m)  # (G, m, D)
    kernel_f = torch.softmax(q_s @ k_marks.mT, dim=-1)  # (G, Nq, m)
    kernel_a = torch.softmax(q_marks @ k_marks.mT, dim=-1)  # (G, m, m)
    logits_b = q_marks @ p.k.mT  # (G, m, Nk)
    if p.valid is not None:
        logits_b = logits_b.masked_fill(~p.valid.unsqueeze(1), float("-inf"))
    kernel_b = torch.softmax(logits_b, dim=-1)  # (G, m, Nk)
    if pinv == "exact":
        a_pinv = torch.linalg.pinv(kernel_a)
    else:
        a_pinv = iterative_pinv(kernel_a, pinv_iterations)  # (G, m, m)
    out = kernel_f @ (a_pinv @ (kernel_b @ p.v))  # (G, Nq, Dv)
    if not return_trace:
        return p.finish(out)
    trace = MethodTrace(
        "nystrom", query, key, p.scale, p.mask,
        {"num_landmarks": m, "pinv_iterations": pinv_iterations, "pinv": pinv},
        landmarks=(p.per_group(q_marks / p.scale if p.scale != 0 else q_marks), p.per_group(k_marks)),
        extras={"kernel_f": p.per_query(kernel_f), "kernel_a": p.per_group(kernel_a),
                "kernel_b": p.per_group(kernel_b), "a_pinv": p.per_group(a_pinv)},
        matrix_fn=lambda: p.per_query(kernel_f @ a_pinv @ kernel_b))
    return p.finish(out), trace


# Multiply-adds of one exact SVD-based pseudo-inverse of an m x m matrix, counted as 12 m^3 (the usual
# operation count of a full SVD of a square matrix, Golub and Van Loan); the iterative scheme is counted exactly.
SVD_FACTOR = 12


def multiply_adds(n_queries: int, n_keys: int, dim: int, dim_v: int, *, num_landmarks: int, pinv_iterations: int = 6,
                  pinv: str = "iterative") -> int:
    """With m = min(num_landmarks, Nq, Nk): segment means (Nq + Nk) D; the kernels F Nq m (D + 1), A m^2 (D + 1)
    and B m Nk (D + 1) (logits plus the softmax sum); the pseudo-inverse 4 m^3 per iteration (A Z, then three
    products with A Z) plus 2 m^2 for the norms; the output B V m Nk Dv, A^+ (B V) m^2 Dv, F (.) Nq m Dv."""
    m = min(num_landmarks, n_queries, n_keys)
    kernels = (n_queries * m + m * m + m * n_keys) * (dim + 1)
    inverse = pinv_iterations * 4 * m**3 + 2 * m * m if pinv == "iterative" else SVD_FACTOR * m**3
    return (n_queries + n_keys) * dim + kernels + inverse + (m * n_keys + m * m + n_queries * m) * dim_v
