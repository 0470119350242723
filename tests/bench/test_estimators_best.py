"""Checks of the estimator search's winning scheme (benchmarks/estimators/best.py), run with the suite.

Exact values where they exist; the statistical checks use fixed seeds and state their tolerances.
"""
from __future__ import annotations

import math

import torch

from benchmarks.estimators import best, dense, winner


def test_inclusion_probabilities_hand_case():
    w = torch.tensor([[10.0, 1.0, 1.0, 1.0, 1.0]])  # one sink: it is exact, the rest share one slot
    pi = best.inclusion_probabilities(w, 2)
    assert torch.allclose(pi, torch.tensor([[1.0, 0.25, 0.25, 0.25, 0.25]]))
    w = torch.tensor([[3.0, 2.0, 1.0, 0.0]])  # no cap needed: pi = 2 w / 6
    assert torch.allclose(best.inclusion_probabilities(w, 2), torch.tensor([[1.0, 2 / 3, 1 / 3, 0.0]]))
    few = best.inclusion_probabilities(torch.tensor([[0.5, 0.0, 2.0]]), 4)  # fewer positives than slots
    assert few.tolist() == [[1.0, 0.0, 1.0]]


def test_inclusion_probabilities_sum_and_cap():
    w = torch.rand(3, 5, 200, generator=torch.Generator().manual_seed(0)) ** 8 + 1e-4  # heavy-tailed weights
    pi = best.inclusion_probabilities(w, 40)
    assert torch.allclose(pi.sum(-1), torch.full((3, 5), 40.0), atol=1e-3)
    assert float(pi.max()) <= 1.0 and float(pi.min()) >= 0.0
    below = pi < 1  # below the cap pi is proportional to w with one factor per row
    ratio = torch.where(below & (w > 0), pi / w.clamp_min(1e-30), float("nan"))
    spread = ratio.nan_to_num(0).amax(-1) - torch.where(ratio.isnan(), float("inf"), ratio).amin(-1)
    assert float(spread.abs().max()) < 1e-3 * float(ratio.nan_to_num(0).amax())


def test_systematic_sample_inclusion_frequencies():
    gen = torch.Generator().manual_seed(1)
    w = torch.rand(1, 1, 60, generator=gen) ** 4
    pi = best.inclusion_probabilities(w, 12)  # (1, 1, 60)
    trials = 4000
    u = torch.rand(1, trials, generator=gen)
    cols, weights, exact = best.systematic_sample(pi, 12, u, torch.zeros(trials, dtype=torch.long))
    assert (weights > 0).sum(-1).eq(12).all()  # exactly C distinct columns every time
    assert (cols[..., 1:] > cols[..., :-1]).all()
    freq = torch.zeros(60).index_add_(0, cols.flatten(), torch.ones(cols.numel())) / trials
    tol = 4 * (pi[0, 0] * (1 - pi[0, 0]) / trials).sqrt() + 1e-6  # 4 standard deviations
    assert ((freq - pi[0, 0]).abs() <= tol).all()
    assert exact[0].any(-1).all() == bool((pi >= 1).any())


def test_grouped_draws_equal_per_block_draws():
    gen = torch.Generator().manual_seed(2)
    pi = best.inclusion_probabilities(torch.rand(2, 3, 50, generator=gen), 10)  # (G, ng, Nk)
    group = best.group_of_blocks(7, 3)  # 7 blocks in 3 consecutive groups
    u = torch.rand(2, 7, generator=gen)
    grouped = best.systematic_sample(pi, 10, u, group)
    single = best.systematic_sample(pi[:, group], 10, u)
    for a, b in zip(grouped, single):
        assert torch.equal(a, b)


def small_case(n_q=70, n_k=90, dim=8, dim_v=6, heads=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(heads, n_q, dim, generator=gen)  # (G, Nq, D)
    k = torch.randn(heads, n_k, dim, generator=gen)  # (G, Nk, D)
    v = torch.randn(heads, n_k, dim_v, generator=gen)  # (G, Nk, Dv)
    return q, k, v, 1 / math.sqrt(dim)


def exact_output(q, k, v, scale, key_valid=None):
    logits = (q * scale) @ k.mT
    if key_valid is not None:
        logits = logits.masked_fill(~key_valid.unsqueeze(1), float("-inf"))
    return torch.softmax(logits, -1) @ v


def test_sparse_equals_dense_cross_attention_with_mask():
    q, k, v, scale = small_case()
    key_valid = torch.rand(3, 90, generator=torch.Generator().manual_seed(3)) > 0.3  # (G, Nk)
    p = winner.plan(q * scale, k, v, 24, torch.Generator().manual_seed(4), key_valid=key_valid, q_block=16)
    out = winner.attend(q * scale, k, v, p, key_valid)
    factor = winner.plan_factor(p, 70, 90) * key_valid.unsqueeze(1)  # masked window keys count for nothing
    assert torch.allclose(out, dense.dense_output(q, k, v, scale, factor), atol=1e-5)
    drawn = torch.gather(key_valid, 1, p.cols.flatten(1)).view_as(p.cols)
    assert (drawn | (p.weights == 0)).all()  # a masked key is never drawn


def test_budget_covering_every_key_is_exact():
    q, k, v, scale = small_case(n_q=40, n_k=40)
    out, _ = winner.best_attention(q, k, v, scale, 400, seed=0, q_block=8)
    assert torch.allclose(out, exact_output(q, k, v, scale), atol=1e-5)


def test_normaliser_and_numerator_are_unbiased():
    q, k, v, scale = small_case(n_q=48, n_k=64, heads=2)
    p = winner.plan(q * scale, k, v, 12, torch.Generator().manual_seed(5), q_block=8)  # fixes order and pi
    a = torch.exp((q * scale) @ k.mT)  # (G, Nq, Nk) unshifted: logits are small here
    runs, nqb, count = 3000, p.rows.shape[1], p.cols.shape[-1]
    u = torch.rand(2, runs * nqb, generator=torch.Generator().manual_seed(6))  # every run's blocks at once
    cols, weights, _ = best.systematic_sample(p.pi, count, u, p.block_group.repeat(runs))
    factor = dense.block_factor(64, cols, weights).view(2 * runs, nqb, 64)  # (G*runs, nqb, Nk)
    rows = p.rows.repeat_interleave(runs, 0)  # (G*runs, nqb, Bq)
    factor = dense.with_window(dense.query_factor(factor, rows, 48), p.window).view(2, runs, 48, 64)
    weighted = a.unsqueeze(1) * factor  # (G, runs, Nq, Nk)
    sums = torch.cat([weighted @ v.unsqueeze(1), weighted.sum(-1, keepdim=True)], -1)  # (G, runs, Nq, Dv+1)
    truth = torch.cat([a @ v, a.sum(-1, keepdim=True)], -1).unsqueeze(1)
    z = (sums.mean(1, keepdim=True) - truth) / (sums.std(1, keepdim=True) / math.sqrt(runs)).clamp_min(1e-6)
    assert float(z.abs().max()) < 5.0  # 5 standard errors over 2 x 48 x 7 sums (two-sided, ~6e-7 each)


def test_multiply_adds_hand_count():
    # Nq = Nk = 64, D = Dv = 8, b = 16: nqb = 2 blocks of 32; per column 17.
    # estimates: share 1/8 of 64*16*17 = 2176 -> 2176 // (64*8) = 4 -> min(nqb, 4) = 2 centroids: 2*64*8 = 1024
    # value-row norms 64*8 = 512; window 7 columns: 64*7*17 = 7616; spreads 2*64*8 = 1024;
    # C = (17408 - 1024 - 512 - 7616 - 1024) // (64*17) = 7232 // 1088 = 6
    assert best.columns_for_budget(64, 64, 8, 8, 16) == 6
    assert best.multiply_adds(64, 64, 8, 8, 16) == 1024 + 512 + 64 * 6 * 17 + 7616 + 1024
    assert best.multiply_adds(64, 64, 8, 8, 16) <= 64 * 16 * 17


def test_half_inputs_float32_probabilities():
    q, k, v, scale = small_case()
    p = winner.plan((q * scale).half().float(), k.half().float(), v.half().float(), 24, torch.Generator().manual_seed(0))
    assert p.pi.dtype == torch.float32 and torch.isfinite(p.pi).all()


def test_gradients_flow_and_match_exact_when_every_key_is_exact():
    q, k, v, scale = small_case(n_q=40, n_k=40)
    inputs = [x.clone().requires_grad_() for x in (q, k, v)]
    p = winner.plan(inputs[0] * scale, inputs[1], inputs[2], 400, torch.Generator().manual_seed(0), q_block=8)
    winner.attend(inputs[0] * scale, inputs[1], inputs[2], p).square().sum().backward()
    reference = [x.clone().requires_grad_() for x in (q, k, v)]
    exact_output(reference[0], reference[1], reference[2], scale).square().sum().backward()
    for got, want in zip(inputs, reference):
        assert torch.allclose(got.grad, want.grad, atol=1e-4)
    sampled = [x.clone().requires_grad_() for x in (q, k, v)]
    p = winner.plan(sampled[0] * scale, sampled[1], sampled[2], 12, torch.Generator().manual_seed(0), q_block=8)
    winner.attend(sampled[0] * scale, sampled[1], sampled[2], p).sum().backward()
    assert all(torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0 for x in sampled)


def test_counted_multiply_adds_match_the_matmuls_run():
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.estimators import cost
    from kdeformer.methods import approximate, split_budget

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 128, 16, generator=gen) for _ in range(3))  # (G, N, D)

    def matmul_macs(fn):
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops() // 2

    nystrom = matmul_macs(lambda: approximate("nystrom", q, k, v, budget=16))
    assert nystrom == cost.peer("nystrom", 128, 128, 16, 16, split_budget("nystrom", 16))  # every matmul counted
    # the others: the count adds the ones column (D + Dv + 1 per column) and leaves hashing out
    # (HyperAttention's SimHash is added back here), so it agrees with the matmuls run to within 10 %
    for method in ("performer", "uniform", "hyperattention", "scatterbrain"):
        ran = matmul_macs(lambda: approximate(method, q, k, v, budget=32, generator=torch.Generator().manual_seed(0)))
        counted = cost.peer(method, 128, 128, 16, 16, split_budget(method, 32))
        if method == "hyperattention":
            counted += cost.hashing(128, 128, 16, 7)
        assert 0.9 <= counted / ran <= 1.1, (method, counted, ran)
    ran = matmul_macs(lambda: winner.best_attention(q, k, v, 0.25, 32, 0))
    assert ran <= best.multiply_adds(128, 128, 16, 16, 32) <= 128 * 32 * 33  # window and ones: element-wise


def test_large_logits_stay_finite():
    q, k, v, scale = small_case()
    out, _ = winner.best_attention(q * 3000.0, k, v, scale, 24, seed=0, q_block=16)  # logits ~ +-1e4
    assert torch.isfinite(out).all()
    # each output row is a convex combination of value rows: it stays inside their range
    assert float(out.abs().max()) <= float(v.abs().max()) + 1e-4
