"""Error metrics between an approximate and the exact attention output (computed in float64)."""
from __future__ import annotations

import torch


def _flat(x: torch.Tensor) -> torch.Tensor:
    """(..., N, C) -> (G, N, C) float64."""
    return x.reshape(-1, x.shape[-2], x.shape[-1]).to(torch.float64)


def _check_pair(approx, exact):
    if approx.shape != exact.shape:
        raise ValueError(f"approx and exact must have the same shape, got {tuple(approx.shape)} and {tuple(exact.shape)}")
    if approx.dim() < 2:
        raise ValueError(f"approx and exact must be (..., N, C) matrices, got shape {tuple(approx.shape)}")


def spectral_norm(x: torch.Tensor) -> torch.Tensor:
    """Largest singular value of each matrix in (..., N, C), float64.  -> (...)"""
    return torch.linalg.matrix_norm(x.to(torch.float64), ord=2)


def relative_spectral_error(approx: torch.Tensor, exact: torch.Tensor, reduction: str = "mean"):
    """||approx - exact||_2 / ||exact||_2 per leading index (one matrix per head), then the mean.

    reduction: "mean" (a float) or "none" (a tensor of the leading shape).
    """
    _check_pair(approx, exact)
    a, e = _flat(approx), _flat(exact)
    err = spectral_norm(a - e) / spectral_norm(e).clamp_min(1e-300)
    return _reduce(err.view(approx.shape[:-2]), reduction)


def relative_frobenius_error(approx: torch.Tensor, exact: torch.Tensor, reduction: str = "mean"):
    """||approx - exact||_F / ||exact||_F per leading index, then the mean."""
    _check_pair(approx, exact)
    a, e = _flat(approx), _flat(exact)
    err = torch.linalg.matrix_norm(a - e) / torch.linalg.matrix_norm(e).clamp_min(1e-300)
    return _reduce(err.view(approx.shape[:-2]), reduction)


def theory_spectral_error(
    approx: torch.Tensor,
    exact: torch.Tensor,
    attention: torch.Tensor,
    value: torch.Tensor,
    reduction: str = "mean",
):
    """The paper's error form: ||approx - exact||_2 / (||D^-1 A||_2 ||V||_2) per leading index.

    attention: the exact softmax matrix D^-1 A (..., Nq, Nk); value (..., Nk, Dv).
    About a third of the plain relative error on BERT attention: report both.
    """
    _check_pair(approx, exact)
    a, e = _flat(approx), _flat(exact)
    err = spectral_norm(a - e) / (spectral_norm(_flat(attention)) * spectral_norm(_flat(value))).clamp_min(1e-300)
    return _reduce(err.view(approx.shape[:-2]), reduction)


def normalizer_relative_error(log_d_approx: torch.Tensor, log_d_exact: torch.Tensor, reduction: str = "mean"):
    """Mean over queries of |D~_i / D_i - 1|, from log normalisers (..., Nq); then the mean over heads."""
    if log_d_approx.shape != log_d_exact.shape:
        raise ValueError(
            f"log_d_approx and log_d_exact must have the same shape, got {tuple(log_d_approx.shape)} "
            f"and {tuple(log_d_exact.shape)}"
        )
    err = torch.expm1(log_d_approx.to(torch.float64) - log_d_exact.to(torch.float64)).abs().mean(-1)
    return _reduce(err, reduction)


def _reduce(err: torch.Tensor, reduction: str):
    if reduction == "mean":
        return float(err.mean())
    if reduction == "none":
        return err
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
