"""The promises of issue 11 for the core: a finite trace that is the estimator, padding and batching that
are invisible, gradients, the same draws in every dtype, the best estimator by default, clear errors."""
import pytest
import torch

import kdeformer as K
from kdeformer.core import SAMPLINGS, check_kde_options, kde_multiply_adds
from kdeformer.defaults import KDE_DEFAULTS
from conftest import make_gen as gen, make_qkv as qkv  # the shared helpers (tests/conftest.py)

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def representable(*lead, n=48, d=16, dv=8, seed=0, big=1.0):
    """Inputs exactly representable in float16 and bfloat16 alike: small integers times a power of two."""
    g = gen(seed)
    q, k, v = (torch.randint(-4, 5, (*lead, n, c), generator=g).to(torch.float64) for c in (d, d, dv))
    return q * big / 4, k / 4, v / 4


# ----------------------------------------------------------------------------- defaults and names
def test_best_estimator_is_the_default_and_the_authors_is_one_argument_away():
    assert KDE_DEFAULTS.sampling == "pps" == K.SAMPLINGS[0]
    q, k, v = qkv(nq=64)
    _, t = K.kde_attention(q, k, v, bucket_size=8, sample_size=16, generator=gen(), return_trace=True)
    assert t.sampling == "pps"
    _, t = K.kde_attention(q, k, v, bucket_size=8, sample_size=16, is_causal=True, generator=gen(), return_trace=True)
    assert t.sampling == "column_norm"  # causal attention has no pps form: the causal kernel's best runs
    _, t = K.kde_attention(q, k, v, bucket_size=8, sample_size=16, sampling="value_norm", generator=gen(),
                           return_trace=True)
    assert t.sampling == "value_norm" and t.num_groups == 1
    assert set(K.SAMPLINGS) == {"column_norm", "value_norm", "uniform", "pps"} == set(SAMPLINGS)
    assert {"exact", "kdeformer", "performer", "nystrom"} <= set(K.METHODS)


def test_options_are_checked_in_one_place():
    assert check_kde_options().sampling == "pps" and check_kde_options().heavy_columns == 0
    assert check_kde_options(sample_size=16, sampling="column_norm").heavy_columns == 4
    col = dict(sampling="column_norm")
    for kwargs, match in [
        (dict(heavy_columns=-1, **col), r"heavy_columns must be an integer in \[0, 127\]"),
        (dict(heavy_columns="a", **col), "heavy_columns must be an integer"),
        (dict(estimate_rows=0, **col), "estimate_rows must be an integer >= 1"),
        (dict(heavy_columns=4), "heavy_columns needs sampling='column_norm'"),
        (dict(sampling="value_norm", heavy_columns=4), "heavy_columns needs sampling='column_norm'"),
        (dict(is_causal="yes"), "is_causal must be True or False"),
        (dict(local_window=4), "local_window needs is_causal=True"),
    ]:
        with pytest.raises(ValueError, match=match):
            check_kde_options(**kwargs)
    q, k, v = qkv(nq=10)
    with pytest.raises(ValueError, match="return_trace must be True or False"):
        K.kde_attention(q, k, v, return_trace="yes")
    with pytest.raises(ValueError, match="query_mask must be a bool tensor"):
        K.kde_attention(q, k, v, query_mask=torch.ones(10))


# ----------------------------------------------------------------------------- the trace is the estimator
@pytest.mark.parametrize("sampling", SAMPLINGS)
@pytest.mark.parametrize("masked", [False, True])
def test_row_methods_are_the_estimator(sampling, masked):
    q, k, v = qkv(2, nq=70, nk=90, seed=3)
    mask = (torch.rand(2, 90, generator=gen(5)) > 0.3) if masked else None
    out, t = K.kde_attention(q, k, v, bucket_size=8, sample_size=16, sampling=sampling, key_mask=mask,
                             generator=gen(1), return_trace=True)
    rows = torch.tensor([0, 5, 69, 33])
    a = t.attention_rows(rows)  # (2, 4, Nk)
    torch.testing.assert_close(a @ v, out[:, rows], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(t.attention_matrix()[:, rows], a)
    exact = t.exact_mask_rows(rows)
    weights = t.weight_rows(rows)
    assert bool((weights[exact] == 1).all())  # exact entries count once
    if mask is not None:
        assert not bool(a[~mask.unsqueeze(1).expand_as(a)].any())  # masked keys take no part
    # every drawn column a query did not compute exactly carries its summed 1/(s p)
    cols, w, is_exact = t.row_columns(rows)
    assert cols.shape == w.shape == is_exact.shape and cols.shape[:2] == (2, 4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_trace_is_finite_at_huge_logits(dtype):
    for big in (1e4, -1e4):
        q, k, v = representable(n=40, big=big * 4 / 16)  # logits up to ~1e4 after the 1/sqrt(D) scale
        q, k, v = (x.to(dtype) for x in (q, k, v))
        for sampling in SAMPLINGS:
            out, t = K.kde_attention(q, k, v, bucket_size=8, sample_size=16, sampling=sampling, generator=gen(),
                                     return_trace=True)
            assert bool(torch.isfinite(out).all())
            m = t.attention_matrix()
            assert bool(torch.isfinite(m).all()), (dtype, big, sampling)
            torch.testing.assert_close((m @ v.to(m.dtype)).to(dtype), out, rtol=2e-2, atol=2e-2)


# ----------------------------------------------------------------------------- padding and batching
@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_padding_is_invisible(sampling):
    q, k, v = qkv(1, 4, nq=37, seed=2)
    pad = 300 - 37
    qp, kp, vp = (torch.cat([x, torch.randn(1, 4, pad, x.shape[-1], generator=gen(9), dtype=x.dtype)], 2) for x in (q, k, v))
    mask = torch.zeros(1, 300, dtype=torch.bool)
    mask[:, :37] = True
    alone = K.kde_attention(q, k, v, bucket_size=8, sample_size=16, sampling=sampling, generator=gen(4))
    padded = K.kde_attention(qp, kp, vp, bucket_size=8, sample_size=16, sampling=sampling, generator=gen(4),
                             key_mask=mask.view(1, 1, 300), query_mask=mask.view(1, 1, 300))
    torch.testing.assert_close(padded[:, :, :37], alone, rtol=1e-6, atol=1e-6)
    assert not bool(padded[:, :, 37:].any())  # padded queries get 0


def test_three_real_keys_among_300_are_exact():
    """A bucket of 8 over 3 real keys is one block: exact, whatever the padding (was error 0.13)."""
    q, k, v = qkv(1, nq=300, seed=1)
    mask = torch.zeros(1, 300, dtype=torch.bool)
    mask[0, [3, 40, 41]] = True
    out = K.kde_attention(q, k, v, bucket_size=8, key_mask=mask, generator=gen())
    torch.testing.assert_close(out, K.exact_attention(q, k, v, key_mask=mask), rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_batch_size_and_position_are_invisible(sampling):
    a = qkv(1, 3, nq=50, seed=1)
    b = qkv(1, 3, nq=50, seed=2)
    both = [torch.cat([x, y]) for x, y in zip(a, b)]  # (2, 3, 50, .)
    flipped = [torch.cat([y, x]) for x, y in zip(a, b)]
    kw = dict(bucket_size=8, sample_size=16, sampling=sampling)
    alone = K.kde_attention(*a, generator=gen(3), **kw)
    torch.testing.assert_close(K.kde_attention(*both, generator=gen(3), **kw)[:1], alone, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(K.kde_attention(*flipped, generator=gen(3), **kw)[1:], alone, rtol=1e-6, atol=1e-6)


def test_padded_batch_of_different_lengths_equals_each_alone():
    lengths = (20, 57, 33)
    seqs = [qkv(1, 2, nq=n, seed=i) for i, n in enumerate(lengths)]
    n_max = max(lengths)
    batch = [torch.zeros(3, 2, n_max, c, dtype=torch.float64) for c in (16, 16, 8)]
    mask = torch.zeros(3, 1, n_max, dtype=torch.bool)
    for i, (s, n) in enumerate(zip(seqs, lengths)):
        for x, y in zip(batch, s):
            x[i, :, :n] = y[0]
        mask[i, :, :n] = True
    out = K.kde_attention(*batch, bucket_size=8, sample_size=16, key_mask=mask, query_mask=mask, generator=gen(6))
    for i, (s, n) in enumerate(zip(seqs, lengths)):
        alone = K.kde_attention(*s, bucket_size=8, sample_size=16, generator=gen(6))
        torch.testing.assert_close(out[i : i + 1, :, :n], alone, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_gradients_flow(sampling):
    q, k, v = (x.requires_grad_() for x in qkv(2, nq=60, seed=4))
    out = K.kde_attention(q, k, v, bucket_size=8, sample_size=16, sampling=sampling, generator=gen())
    out.square().sum().backward()
    for x in (q, k, v):
        assert x.grad is not None and bool(torch.isfinite(x.grad).all()) and bool(x.grad.abs().sum() > 0)


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_sampling_weights_are_detached_so_the_output_is_linear_in_value(sampling):
    """With weights 1/(s p) detached, d out / d V is the estimator's own matrix: grad_V = A~^T grad_out."""
    q, k, v = qkv(nq=50, seed=5)
    v = v.requires_grad_()
    out, t = K.kde_attention(q, k, v, bucket_size=8, sample_size=16, sampling=sampling, generator=gen(2),
                             return_trace=True)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    torch.testing.assert_close(v.grad, t.attention_matrix().detach().mT @ g, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_gradcheck_in_the_exact_limit(sampling):
    q, k, v = (x.requires_grad_() for x in qkv(nq=9, d=4, dv=3, seed=6))
    fn = lambda a, b, c: K.kde_attention(a, b, c, bucket_size=16, sampling=sampling, generator=gen())  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_no_grad_inference_matches_grad_mode(sampling):
    q, k, v = qkv(2, nq=80, seed=7)
    with torch.no_grad():
        fast = K.kde_attention(q, k, v, bucket_size=8, sample_size=16, sampling=sampling, generator=gen())
    slow = K.kde_attention(q.requires_grad_(), k, v, bucket_size=8, sample_size=16, sampling=sampling, generator=gen())
    torch.testing.assert_close(slow.detach(), fast, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- the same draws in every dtype
@pytest.mark.parametrize("big", [1.0, 1e4 / 16])
def test_same_draws_in_every_dtype(big):
    q, k, v = representable(2, n=96, big=big)
    traces = {}
    for dtype in DTYPES:
        _, traces[dtype] = K.kde_attention(q.to(dtype), k.to(dtype), v.to(dtype), bucket_size=8, sample_size=16,
                                           sampling="column_norm", generator=gen(11), return_trace=True)
    ref = traces[torch.float64]
    for dtype, t in traces.items():
        assert torch.equal(t.q_buckets, ref.q_buckets) and torch.equal(t.k_buckets, ref.k_buckets), dtype
        assert torch.equal(t.extras["estimate_rows"], ref.extras["estimate_rows"]), dtype
        assert torch.equal(t.extras["heavy_columns"], ref.extras["heavy_columns"]), dtype
        assert torch.equal(t.sampled, ref.sampled), dtype


@pytest.mark.parametrize("big", [1.0, 1e4 / 16])
@pytest.mark.parametrize("sampling", ["pps", "value_norm", "uniform"])
def test_same_draws_in_every_dtype_for_every_scheme(big, sampling):
    q, k, v = representable(2, n=96, big=big)
    traces = {}
    for dtype in DTYPES:
        _, traces[dtype] = K.kde_attention(q.to(dtype), k.to(dtype), v.to(dtype), bucket_size=8, sample_size=16,
                                           sampling=sampling, generator=gen(11), return_trace=True)
    ref = traces[torch.float64]
    for dtype, t in traces.items():
        assert torch.equal(t.q_buckets, ref.q_buckets) and torch.equal(t.q_order, ref.q_order), dtype
        assert torch.equal(t.sampled, ref.sampled) and torch.equal(t.block_cols, ref.block_cols), dtype
        assert torch.equal(t.block_exact, ref.block_exact), dtype


# ----------------------------------------------------------------------------- cost
def test_multiply_adds_count_the_real_shapes():
    # N = 100, bucket 16: 7 key blocks of 15 keys, 7 query blocks of 15 slots (105 slots); value_norm
    # draws 32 columns: every slot computes 15 + 32 columns, D = 8 for the logit, Dv + 1 = 5 for the sums
    assert kde_multiply_adds(100, 100, 8, 4, bucket_size=16, sample_size=32, sampling="value_norm") == 105 * 47 * 13
    # column_norm: R = ceil(32 * 100 / 200) = 16 estimation rows -> 7 groups of 2 rows: 14 x 100 x 8 more
    assert kde_multiply_adds(100, 100, 8, 4, bucket_size=16, sample_size=32, sampling="column_norm") == \
        105 * 47 * 13 + 14 * 100 * 8
    assert kde_multiply_adds(100, 100, 8, 4, bucket_size=16, sample_size=32, sampling="uniform",
                             include_hashing=True) == 105 * 47 * 13 + 200 * 8 * 7
    # more columns than keys (Bk + s = 4 + 32 > 20): every slot against the 20 keys once (the dense pass);
    # 5 blocks of 4 keys, 5 query blocks of 4 slots
    assert kde_multiply_adds(20, 20, 8, 4, bucket_size=4, sample_size=32, sampling="value_norm") == 20 * 20 * 13
    # pps, budget b = 16 + 32 = 48 columns per query, D + Dv + 1 = 13: 4 query blocks of 25 slots, window
    # w = 3 (7 columns, 7 <= b / 4), ng = 4 centroids (4 x 100 x 8 <= b 13 100 / 8), value-row norms 100 x 4,
    # spreads of two orders 2 x 100 x 8; C = 37 columns per block fill the rest: exactly 100 x 48 x 13
    fixed = 4 * 100 * 8 + 100 * 4 + 100 * 7 * 13 + 2 * 100 * 8
    assert kde_multiply_adds(100, 100, 8, 4, bucket_size=16, sample_size=32, sampling="pps") == fixed + 4 * 25 * 37 * 13
    assert fixed + 4 * 25 * 37 * 13 == 100 * 48 * 13
    # hashing: the queries only (pps has no key blocks)
    assert kde_multiply_adds(100, 100, 8, 4, bucket_size=16, sample_size=32, sampling="pps",
                             include_hashing=True) == 100 * 48 * 13 + 100 * 8 * 7
    # a budget covering the keys is exact attention: every slot against every key
    assert kde_multiply_adds(100, 60, 8, 4, bucket_size=60, sample_size=1, sampling="pps") == 100 * 60 * 13


# ----------------------------------------------------------------------------- causal, through kde_attention
def bottom_right_sdpa(q, k, v):
    n_q, n_k = q.shape[-2], k.shape[-2]
    allowed = torch.ones(n_q, n_k, dtype=torch.bool).tril(n_k - n_q)  # query i sees keys j <= Nk - Nq + i
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


@pytest.mark.parametrize("nq,nk", [(50, 50), (20, 50), (1, 30)])
def test_causal_exact_limit_and_lower_triangular_trace(nq, nk):
    q, k, v = qkv(2, 3, nq=nq, nk=nk, seed=8)
    torch.testing.assert_close(K.kde_attention(q, k, v, bucket_size=nk, is_causal=True), bottom_right_sdpa(q, k, v))
    out, t = K.kde_attention(q, k, v, bucket_size=8, sample_size=16, is_causal=True, generator=gen(1),
                             return_trace=True)
    m = t.attention_matrix()
    torch.testing.assert_close(m @ v, out, rtol=1e-10, atol=1e-12)
    assert t.is_causal and not bool(m.triu(nk - nq + 1).any()) and not bool(t.heavy_mask().triu(nk - nq + 1).any())


def test_causal_with_left_padding_equals_the_sequence_alone():
    q, k, v = qkv(1, 2, nq=40, seed=9)
    pad = lambda x: torch.cat([torch.randn(1, 2, 25, x.shape[-1], generator=gen(2), dtype=x.dtype), x], 2)  # noqa: E731
    mask = torch.zeros(1, 1, 65, dtype=torch.bool)
    mask[..., 25:] = True
    kw = dict(bucket_size=8, sample_size=16, is_causal=True)
    alone = K.kde_attention(q, k, v, generator=gen(3), **kw)
    padded = K.kde_attention(pad(q), pad(k), pad(v), key_mask=mask, query_mask=mask, generator=gen(3), **kw)
    torch.testing.assert_close(padded[..., 25:, :], alone, rtol=1e-6, atol=1e-6)


def test_causal_query_without_a_visible_key_is_refused():
    q, k, v = qkv(nq=10, nk=5)
    with pytest.raises(ValueError, match="is_causal leaves a query without any visible key"):
        K.kde_attention(q, k, v, is_causal=True)


def test_one_block_costs_exact_attention_for_every_block_scheme():
    """bucket_size >= Nk: the block holds every key, so no estimate is paid for and the count is exact's."""
    from kdeformer.costs import multiply_adds

    exact = multiply_adds("exact", 43, 43, 32, 32)
    for sampling in ("column_norm", "value_norm", "uniform"):
        assert kde_multiply_adds(43, 43, 32, 32, bucket_size=64, sample_size=128, sampling=sampling) == exact
    q, k, v = qkv(2, nq=43, seed=12)
    out = K.kde_attention(q, k, v, bucket_size=64, sampling="column_norm", generator=gen())
    torch.testing.assert_close(out, K.exact_attention(q, k, v))
