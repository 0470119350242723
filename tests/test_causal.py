"""Causal KDEformer (kdeformer.causal.causal_kde): exact limit, strict causality, unbiasedness, dtypes,
gradients, extreme logits, any length, and the trace parts the lead's KDETrace is built from."""
import math

import pytest
import torch
import torch.nn.functional as F

from kdeformer.core import bucket_ranks
from kdeformer.causal import (
    bottom_right_limits, causal_kde, causal_multiply_adds, default_chunk_len, default_local_window,
    estimation_schedule,
)
from kdeformer.random import Draws

SAMPLINGS = ("value_norm", "uniform", "column_norm")


def qkv(groups, n_q, n_k, d=8, dv=4, seed=0, dtype=torch.float64, sink=True):
    """Gaussian q/k/v with key 0 a 'sink' most queries lean towards (so sampling matters)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(groups, n_q, d, generator=g, dtype=dtype)  # (G, Nq, D)
    k = torch.randn(groups, n_k, d, generator=g, dtype=dtype)  # (G, Nk, D)
    v = torch.randn(groups, n_k, dv, generator=g, dtype=dtype)  # (G, Nk, Dv)
    if sink:
        u = F.normalize(torch.randn(d, generator=g, dtype=dtype), dim=0)  # (D,)
        q = q + 1.5 * u
        k[:, 0] = 4 * u
    return q, k, v


def run(q, k, v, *, seed=1, limits=None, **kw):
    groups, n_q, _ = q.shape
    settings = dict(scale=1 / math.sqrt(q.shape[-1]), bucket_size=8, sample_size=8, num_projs=4, sampling="value_norm",
                    bucket_order="gray", local_window=None, heavy_columns=None, estimate_rows=None, return_trace=True)
    settings.update(kw)
    if limits is None:
        limits = bottom_right_limits(n_q, k.shape[1]).expand(groups, n_q).contiguous()
    return causal_kde(q, k, v, limits=limits, draws=Draws(seed, torch.arange(groups)), **settings)


def visible(n_q, n_k):
    """(Nq, Nk) bool, bottom-right causal: query i sees keys j <= Nk - Nq + i."""
    return torch.arange(n_k) < bottom_right_limits(n_q, n_k).squeeze(0).unsqueeze(-1)


def matrix_from_parts(q, k, parts, scale):
    """attention_rows for every row, written out from the parts: (G, Nq, Nk)."""
    cols, weights = parts["block_cols"], parts["block_weights"]  # (G, Nq, C)
    k_cols = torch.gather(k.unsqueeze(1).expand(-1, q.shape[1], -1, -1), 2,
                          cols.unsqueeze(-1).expand(*cols.shape, k.shape[-1]))  # (G, Nq, C, D)
    logits = scale * (q.unsqueeze(-2) * k_cols).sum(-1)  # (G, Nq, C)
    terms = torch.exp(logits - parts["log_normalizer"].unsqueeze(-1)) * weights
    return torch.zeros(*q.shape[:2], k.shape[1], dtype=q.dtype).scatter_add_(-1, cols, terms)


def exact_mask_from_parts(parts, n_k):
    cols = parts["block_cols"][..., : parts["n_exact"]]
    exact = (parts["block_weights"][..., : parts["n_exact"]] > 0).long()
    return torch.zeros(*cols.shape[:-1], n_k, dtype=torch.long).scatter_add_(-1, cols, exact) > 0  # (G, Nq, Nk)


@pytest.mark.parametrize("sampling", SAMPLINGS)
@pytest.mark.parametrize("n_q,n_k", [(40, 40), (25, 40)])
def test_bucket_size_at_least_nk_is_exact_causal_sdpa(sampling, n_q, n_k):
    q, k, v = qkv(3, n_q, n_k)
    out, _ = run(q, k, v, bucket_size=n_k, sampling=sampling)
    mask = visible(n_q, n_k)  # (Nq, Nk) True = attend, bottom-right
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_parts_give_the_output_and_are_lower_triangular(sampling):
    q, k, v = qkv(2, 50, 70)
    out, parts = run(q, k, v, sampling=sampling, bucket_size=8, sample_size=8)
    a = matrix_from_parts(q, k, parts, 1 / math.sqrt(8))  # (G, Nq, Nk)
    torch.testing.assert_close(a @ v, out, rtol=1e-10, atol=1e-12)
    assert bool((parts["block_cols"] < bottom_right_limits(50, 70).unsqueeze(-1)).all())  # never a future key
    assert bool((a[:, ~visible(50, 70)] == 0).all())
    assert bool((a[:, visible(50, 70)] >= 0).all())
    # every query computes its own token and the w keys before it exactly
    exact = exact_mask_from_parts(parts, 70)
    own = bottom_right_limits(50, 70).squeeze(0) - 1  # (Nq,)
    for back in range(default_local_window(8)):
        assert bool(exact[:, torch.arange(50), (own - back).clamp_min(0)].all())
    torch.testing.assert_close(parts["heavy_output"] + parts["sampled_output"], out)
    # the sampled part is a real estimate: some draws are kept, with weight 1 / (s' p)
    kept = parts["block_weights"][..., parts["n_exact"]:]
    assert float(kept.max()) >= 1.0 and parts["sampled"].shape[-1] == parts["num_groups"] * kept.shape[-1]


def test_bucket_is_a_run_of_pool_keys_around_the_query():
    q, k, v = qkv(2, 120, 120, sink=False)
    _, parts = run(q, k, v, bucket_size=8, sample_size=4, num_projs=3)
    ranks = bucket_ranks(3, "gray", "cpu")  # (8,) rank of each code
    start = parts["extras"]["pool_start"]  # (G, nc) first local key of each chunk
    assert parts["extras"]["local_window"] == default_local_window(8)
    n_local = parts["n_exact"] - 8  # value_norm: no heavy columns; the B = 8 bucket slots follow the local ones
    for g in range(2):
        k_rank = ranks[parts["k_buckets"][g]]
        for i in (30, 77, 119):
            pool = int(start[g, parts["q_groups"][g, i]])
            order = sorted(range(pool), key=lambda j: (int(k_rank[j]), j))  # pool keys in bucket order
            bucket = parts["block_cols"][g, i, n_local : n_local + 8][parts["block_weights"][g, i, n_local : n_local + 8] > 0]
            places = sorted(order.index(int(j)) for j in bucket)
            assert len(places) == min(8, pool) and places == list(range(places[0], places[0] + len(places)))
            q_rank = int(ranks[parts["q_buckets"][g, i]])
            same = [p for p, j in enumerate(order) if int(k_rank[j]) == q_rank]
            if 0 < len(same) <= 8:  # a small bucket of the query's own hash lies wholly in its window
                assert set(same) <= set(places)


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_draws_come_from_each_chunk_pool(sampling):
    """Each chunk draws only from its pool [0, p_c) (keys every query of the chunk sees and does not
    compute locally), its probabilities sum to 1 there and vanish elsewhere; heavy columns are pool keys
    that are never drawn."""
    q, k, v = qkv(2, 160, 160)
    _, parts = run(q, k, v, sampling=sampling, bucket_size=16, sample_size=16)
    start = parts["extras"]["pool_start"]  # (G, nc)
    probs = parts["group_probs"]  # (G, nc, Nk)
    in_pool = torch.arange(160) < start.unsqueeze(-1)  # (G, nc, Nk)
    assert bool((probs[~in_pool] == 0).all()) and bool((probs >= 0).all())
    n_heavy = parts["extras"]["heavy_columns_valid"].sum(-1)  # (G, nc)
    has_pool = start > n_heavy  # a pool wholly taken by heavy columns has nothing left to draw
    torch.testing.assert_close(probs.sum(-1)[has_pool], torch.ones_like(probs.sum(-1)[has_pool]))
    assert bool((probs.sum(-1)[~has_pool] == 0).all())
    chunk = parts["sample_group"]  # (G, S)
    drawn_start = torch.gather(start, 1, chunk)  # (G, S)
    weights = parts["weights"]
    assert bool((parts["sampled"][weights > 0] < drawn_start[weights > 0]).all())
    assert bool((weights[~torch.gather(has_pool, 1, chunk)] == 0).all()) and float(weights.max()) > 0
    heavy, heavy_valid = parts["extras"]["heavy_columns"], parts["extras"]["heavy_columns_valid"]  # (G, nc, h)
    assert heavy.shape[-1] == (16 // 4 if sampling == "column_norm" else 0)
    if heavy.shape[-1]:
        assert bool((heavy[heavy_valid] < start.unsqueeze(-1).expand_as(heavy)[heavy_valid]).all())
        draws = parts["sampled"].view(2, -1, 12)  # (G, nc, s') s' = 16 - 4
        hit = (draws.unsqueeze(-1) == heavy.unsqueeze(-2)) & heavy_valid.unsqueeze(-2)  # (G, nc, s', h)
        assert not bool((hit.any(-1) & (weights.view(2, -1, 12) > 0)).any())  # (weight 0: nothing to draw)
        assert bool((torch.gather(probs, -1, heavy)[heavy_valid] == 0).all())


@pytest.mark.parametrize("sampling", SAMPLINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_q,n_k", [(300, 300), (200, 300)])
def test_later_tokens_never_change_earlier_outputs(sampling, dtype, n_q, n_k):
    q, k, v = qkv(2, n_q, n_k, dtype=dtype)
    out, _ = run(q, k, v, sampling=sampling, bucket_size=16, sample_size=16, return_trace=False)
    g = torch.Generator().manual_seed(5)
    for t in (0, 17, 130, n_q - 2):
        first_later_key = n_k - n_q + t + 1
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        q2[:, t + 1 :] = 3 * torch.randn(q2[:, t + 1 :].shape, generator=g, dtype=dtype)
        k2[:, first_later_key:] = 3 * torch.randn(k2[:, first_later_key:].shape, generator=g, dtype=dtype)
        v2[:, first_later_key:] = 3 * torch.randn(v2[:, first_later_key:].shape, generator=g, dtype=dtype)
        out2, _ = run(q2, k2, v2, sampling=sampling, bucket_size=16, sample_size=16, return_trace=False)
        assert torch.equal(out2[:, : t + 1], out[:, : t + 1]), (t, sampling)
        assert not torch.equal(out2[:, t + 1 :], out[:, t + 1 :])


@pytest.mark.parametrize("sampling", ["value_norm", "uniform"])
def test_kv_cache_steps_reproduce_the_full_sequence(sampling):
    """Chunks sit at key positions and draws are addressed by absolute chunk, so a chunked prefill (the
    last queries against every key) and single-token decode steps (query t against keys [0, t]) give the
    full sequence's rows. (column_norm's estimation rows are the call's own queries: not so there.)"""
    q, k, v = qkv(2, 120, 120)
    kw = dict(sampling=sampling, bucket_size=16, sample_size=16, return_trace=False)
    full, _ = run(q, k, v, **kw)
    tail, _ = run(q[:, 83:], k, v, **kw)
    torch.testing.assert_close(tail, full[:, 83:], rtol=1e-12, atol=1e-12)
    for t in (0, 5, 16, 47, 119):
        step, _ = run(q[:, t : t + 1], k[:, : t + 1], v[:, : t + 1], **kw)
        torch.testing.assert_close(step, full[:, t : t + 1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_sampled_sums_are_unbiased_under_the_causal_mask(sampling):
    """z-tests over 3000 heads (each its own draws and hash), |z| < 4.5: every entry of the sampled
    numerator and normaliser, and the normaliser's total per head (its relative standard error here is
    about 0.6 %, so a bias of a few per cent fails)."""
    heads, n, scale = 3000, 40, 1 / math.sqrt(8)
    q, k, v = (x.expand(heads, -1, -1).contiguous() for x in qkv(1, n, n, dv=3, seed=11))
    _, parts = run(q, k, v, sampling=sampling, bucket_size=8, sample_size=8, heavy_columns=2 if sampling == "column_norm" else None)
    a = torch.exp(scale * q[0] @ k[0].mT) * visible(n, n)  # (N, N) exact causal weights
    off = ~exact_mask_from_parts(parts, n)  # (heads, N, N) entries left to the sampled part
    true_num, true_den = (a * off) @ v[0], (a * off).sum(-1)
    d_est = parts["log_normalizer"].exp()
    est_num, est_den = parts["sampled_output"] * d_est.unsqueeze(-1), (1 - parts["heavy_fraction"]) * d_est
    sampled_rows = true_den.mean(0) > 0  # queries whose pool is not wholly exact
    assert int(sampled_rows.sum()) >= 20
    for est, true in ((est_num, true_num), (est_den, true_den)):
        diff = (est - true)[:, sampled_rows]
        z = diff.mean(0) / (diff.std(0) / math.sqrt(heads)).clamp_min(1e-300)
        assert float(z.abs().max()) < 4.5
    total = (est_den - true_den).sum(-1)  # (heads,) one head's error summed over its rows
    assert float(total.mean().abs() / (total.std() / math.sqrt(heads))) < 4.5  # no bias in aggregate either
    torch.testing.assert_close(est_den[:, ~sampled_rows], torch.zeros_like(est_den[:, ~sampled_rows]), atol=1e-12, rtol=0)


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_float32_and_float64_draw_the_same_columns(sampling):
    q, k, v = (torch.round(8 * x) / 8 for x in qkv(2, 90, 90, seed=3))  # exactly representable in float32
    out64, p64 = run(q, k, v, sampling=sampling)
    out32, p32 = run(q.float(), k.float(), v.float(), sampling=sampling)
    for name in ("block_cols", "sampled", "q_buckets", "k_buckets", "k_order"):
        assert torch.equal(p32[name], p64[name]), name
    torch.testing.assert_close(p32["block_weights"], p64["block_weights"].float())
    torch.testing.assert_close(out32, out64.float(), rtol=1e-5, atol=1e-5)
    assert out32.dtype == torch.float32 and out64.dtype == torch.float64


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_gradients_flow(sampling):
    q, k, v = (x.float().requires_grad_() for x in qkv(2, 70, 70))
    out, _ = run(q, k, v, sampling=sampling, return_trace=False)
    out.sum().backward()
    for x in (q, k, v):
        assert x.grad is not None and bool(torch.isfinite(x.grad).all()) and float(x.grad.abs().sum()) > 0


def test_gradients_at_the_exact_limit_match_sdpa():
    q, k, v = (x.requires_grad_() for x in qkv(2, 30, 45))
    out, _ = run(q, k, v, bucket_size=45, sampling="column_norm", return_trace=False)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=out.dtype)
    ours = torch.autograd.grad((out * weights).sum(), (q, k, v))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=visible(30, 45))
    theirs = torch.autograd.grad((ref * weights).sum(), (q, k, v))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_finite_at_huge_logits(sign):
    q, k, v = qkv(2, 64, 64, dtype=torch.float32)
    q = sign * 100 * q / q.norm(dim=-1, keepdim=True)
    k = 100 * k / k.norm(dim=-1, keepdim=True)  # logits up to +-1e4 with scale 1
    for sampling in SAMPLINGS:
        out, parts = run(q, k, v, sampling=sampling, scale=1.0)
        assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(parts["log_normalizer"]).all())


@pytest.mark.parametrize("n", [1, 2, 7, 300])
def test_any_length(n):
    q, k, v = qkv(3, n, n)
    for sampling in SAMPLINGS:
        out, parts = run(q, k, v, sampling=sampling)
        assert out.shape == (3, n, 4) and bool(torch.isfinite(out).all())
        torch.testing.assert_close(out[:, 0], v[:, 0], rtol=0, atol=1e-15)  # the first query sees one key
        assert parts["block_cols"].shape[:2] == (3, n)


def test_limits_from_a_compacted_batch():
    """Per-group limits with jumps (masked queries removed): each row equals exact attention on its keys
    when the bucket covers every key."""
    q, k, v = qkv(2, 20, 30)
    limits = torch.stack([torch.arange(20) + 11, (torch.arange(20) * 3 // 2 + 1)]).contiguous()  # (G, Nq)
    out, _ = run(q, k, v, limits=limits, bucket_size=30)
    mask = torch.arange(30) < limits.unsqueeze(-1)  # (G, Nq, Nk)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_multiply_adds():
    n, d, dv, b, s = 4096, 64, 64, 64, 128
    w, length = default_local_window(b), default_chunk_len(b)
    count = causal_multiply_adds(n, n, d, dv, bucket_size=b, sample_size=s, sampling="value_norm", num_projs=7)
    local_slots = length - 1 + w  # limits of a chunk's last query minus its pool start
    assert count == 2 * n * d * 7 + n * (local_slots + b + s) * (d + dv)
    exact = n * (n + 1) // 2 * (d + dv)
    assert count < exact / 5
    with_rows = causal_multiply_adds(n, n, d, dv, bucket_size=b, sample_size=s, sampling="column_norm", estimate_rows=4)
    # L = 16: 4 rows in each doubling span [0, 32), [32, 64), ..., [2048, 4096): 8 spans, 32 rows
    assert length == 16 and len(estimation_schedule(n, 4, length)) == 32
    assert with_rows == count + 32 * n * d  # the s // 4 heavy columns are paid out of the s columns


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_batching_does_not_change_the_result(sampling, monkeypatch):
    """Small work batches (several head batches, several chunk batches per head) give the same output and
    trace as one batch."""
    import kdeformer.causal as C

    q, k, v = qkv(5, 90, 90)
    one, p_one = run(q, k, v, sampling=sampling)
    monkeypatch.setattr(C, "BATCH_ENTRIES", 1 << 12)
    plan = C.plan_causal(bottom_right_limits(90, 90), 90, bucket_size=8, sample_size=8, local_window=None,
                         sampling=sampling, heavy_columns=None, estimate_rows=None)
    heads, chunks = C.batch_sizes(5, plan, 90, 12, 16, True)
    assert heads == 1 and 1 < chunks < plan.num_chunks  # five head batches, each of several chunk batches
    many, p_many = run(q, k, v, sampling=sampling)
    torch.testing.assert_close(many, one, rtol=1e-12, atol=1e-12)
    for name in ("block_cols", "sampled", "k_order"):
        assert torch.equal(p_many[name], p_one[name]), name
    torch.testing.assert_close(p_many["group_probs"], p_one["group_probs"])


@pytest.mark.parametrize("bucket_size,sample_size,num_projs", [(1, 1, 16), (2, 3, 1), (500, 4, 7)])
def test_extreme_settings(bucket_size, sample_size, num_projs):
    q, k, v = qkv(2, 75, 75)
    for sampling in SAMPLINGS:
        out, parts = run(q, k, v, sampling=sampling, bucket_size=bucket_size, sample_size=sample_size, num_projs=num_projs)
        a = matrix_from_parts(q, k, parts, 1 / math.sqrt(8))
        torch.testing.assert_close(a @ v, out, rtol=1e-10, atol=1e-12)
        assert bool((a[:, ~visible(75, 75)] == 0).all()) and bool(torch.isfinite(out).all())
