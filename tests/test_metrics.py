"""kdeformer.metrics: the one home of the error measures (exact values against the definitions)."""
from __future__ import annotations

import math

import pytest
import torch

from kdeformer import metrics


@pytest.mark.parametrize("shape", [(512, 32), (32, 512), (6, 64, 64), (2, 3, 40, 7), (5, 1), (1, 5)])
def test_spectral_norm_is_the_largest_singular_value(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * torch.logspace(0, -5, shape[-1], dtype=torch.float64)
    want = torch.linalg.svdvals(x)[..., 0]
    torch.testing.assert_close(metrics.spectral_norm(x), want, rtol=1e-13, atol=0)


def test_spectral_norm_of_a_known_matrix_and_edge_values():
    x = torch.tensor([[3.0, 0.0], [4.0, 0.0]])  # rank one: ||[3, 4]|| = 5
    assert float(metrics.spectral_norm(x)) == pytest.approx(5.0, rel=1e-15)
    big = torch.tensor([[1e200, 0.0], [0.0, 2e200]], dtype=torch.float64)  # squares would overflow
    assert float(metrics.spectral_norm(big)) == pytest.approx(2e200, rel=1e-14)
    assert float(metrics.spectral_norm(torch.zeros(4, 3))) == 0.0
    bad = torch.ones(2, 4, 3)
    bad[1, 0, 0] = float("nan")
    got = metrics.spectral_norm(bad)
    assert got[0] == pytest.approx(math.sqrt(12.0), rel=1e-14) and torch.isnan(got[1])


def test_relative_spectral_error_per_head_and_mean():
    g = torch.Generator().manual_seed(1)
    exact = torch.randn(3, 50, 8, generator=g)
    approx = exact + 0.1 * torch.randn(3, 50, 8, generator=g)
    per_head = metrics.relative_spectral_error(approx, exact, reduction="none")
    e, a = exact.double(), approx.double()
    want = torch.linalg.svdvals(a - e)[:, 0] / torch.linalg.svdvals(e)[:, 0]
    torch.testing.assert_close(per_head, want, rtol=1e-12, atol=0)
    assert metrics.relative_spectral_error(approx, exact) == pytest.approx(float(want.mean()), rel=1e-12)
    with pytest.raises(ValueError, match="reduction"):
        metrics.relative_spectral_error(approx, exact, reduction="max")
