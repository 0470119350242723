"""kde_attention: exact limits, unbiasedness, stability, independence, masks, trace, bad input."""
import math

import pytest
import torch

import kdeformer as K
from kdeformer.core import SAMPLINGS, bucket_ranks, gray_code, inverse_gray_code
from conftest import make_gen as gen, make_qkv as qkv  # the shared helpers (tests/conftest.py)


# ----------------------------------------------------------------------------- exact cases
@pytest.mark.parametrize("nq,nk", [(1, 1), (7, 7), (33, 50), (64, 17), (100, 100)])
@pytest.mark.parametrize("sample_size", [1, 64])
@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_bucket_at_least_nk_is_exact(nq, nk, sample_size, sampling):
    q, k, v = qkv(2, 3, nq=nq, nk=nk)
    out = K.kde_attention(q, k, v, bucket_size=nk, sample_size=sample_size, sampling=sampling, generator=gen())
    ref = torch.softmax(q @ k.mT / math.sqrt(q.shape[-1]), -1) @ v
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    out_big = K.kde_attention(q, k, v, bucket_size=10 * nk, sampling=sampling, generator=gen())
    torch.testing.assert_close(out_big, ref, rtol=1e-12, atol=1e-12)


def test_exact_attention_matches_sdpa_and_chunks():
    q, k, v = qkv(2, 2, nq=70, nk=45, dtype=torch.float32)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(K.exact_attention(q, k, v), ref, rtol=1e-5, atol=1e-5)
    import kdeformer.exact as E

    old, E.CHUNK_ENTRIES = E.CHUNK_ENTRIES, 100  # force many query chunks
    try:
        torch.testing.assert_close(K.exact_attention(q, k, v), ref, rtol=1e-5, atol=1e-5)
    finally:
        E.CHUNK_ENTRIES = old


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_scale_argument_is_used(sampling):
    q, k, v = qkv(1, nq=20, nk=20)
    for scale in (0.05, 1.0, -0.3):
        out = K.kde_attention(q, k, v, bucket_size=32, scale=scale, sampling=sampling)
        ref = torch.softmax(scale * q @ k.mT, -1) @ v
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- Gray order
def test_gray_order_neighbours_differ_in_one_bit():
    for r in (1, 3, 7, 10):
        ranks = bucket_ranks(r, "gray", "cpu")
        codes_in_order = torch.argsort(ranks)  # code at each rank
        flips = codes_in_order[1:] ^ codes_in_order[:-1]
        assert bool(((flips & (flips - 1)) == 0).all()) and bool((flips > 0).all())
        n = torch.arange(2**r)
        assert torch.equal(gray_code(inverse_gray_code(n, r)), n)
    # the authors' order (sort by gray(code)) does not have the property for r = 7
    authors = torch.argsort(bucket_ranks(7, "authors", "cpu"))
    flips = authors[1:] ^ authors[:-1]
    bits = torch.tensor([bin(int(f)).count("1") for f in flips])
    assert int(bits.max()) == 4


def test_trace_sorts_by_bucket_rank():
    q, k, v = qkv(2, nq=90, nk=70)
    _, t = K.kde_attention(q, k, v, bucket_size=16, num_projs=5, sampling="column_norm", generator=gen(3),
                           return_trace=True)  # key blocks (pps blocks only queries, maybe in token order)
    ranks = bucket_ranks(5, "gray", "cpu")
    for x, order in ((t.q_buckets, t.q_order), (t.k_buckets, t.k_order)):
        sorted_ranks = ranks[torch.gather(x, -1, order)]
        assert bool((sorted_ranks[..., 1:] >= sorted_ranks[..., :-1]).all())
    # codes are the sign patterns of the projections
    bits = (q @ t.projections > 0).long()
    assert torch.equal((bits * 2 ** torch.arange(5)).sum(-1), t.q_buckets)


# ----------------------------------------------------------------------------- trace
@pytest.mark.parametrize("nq,nk,bucket", [(40, 40, 8), (37, 100, 16), (100, 30, 7), (64, 64, 64)])
def test_trace_reproduces_output(nq, nk, bucket):
    q, k, v = qkv(2, 2, nq=nq, nk=nk)
    out, t = K.kde_attention(q, k, v, bucket_size=bucket, sample_size=24, sampling="value_norm", generator=gen(1),
                             return_trace=True)
    torch.testing.assert_close(t.attention_matrix() @ v, out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(t.heavy_output + t.sampled_output, out, rtol=1e-10, atol=1e-12)
    assert t.q_buckets.shape == (2, 2, nq) and t.k_buckets.shape == (2, 2, nk)
    assert t.sampled.shape == (2, 2, 24) and t.weights.shape == (2, 2, 24)
    torch.testing.assert_close(t.probs.sum(-1), torch.ones(2, 2, dtype=torch.float64))
    torch.testing.assert_close(t.weights, 1.0 / (24 * torch.gather(t.probs, -1, t.sampled)))
    # heavy entries: each key block holds at most bucket_size keys, every query sees exactly one block
    heavy = t.heavy_mask()
    assert int(heavy.sum(-1).max()) <= bucket
    assert t.num_blocks == math.ceil(nk / bucket)
    block_sizes = torch.stack([(t.k_blocks == b).sum(-1) for b in range(t.num_blocks)], -1)
    assert bool((block_sizes <= bucket).all()) and bool((block_sizes.sum(-1) == nk).all())
    # the normaliser estimate: rows of the approximate matrix sum to one
    torch.testing.assert_close(t.attention_matrix().sum(-1), torch.ones(2, 2, nq, dtype=torch.float64))


@pytest.mark.parametrize("sampling", ["column_norm", "value_norm", "uniform"])
def test_more_columns_than_keys_runs_dense_and_is_the_same_estimator(sampling):
    """Bk + s > Nk (the explorer's corner bucket 1 / many samples): the dense pass (each block's repeated
    columns summed per key, no gather) gives the estimator the trace describes, with and without grad."""
    q, k, v = qkv(2, nq=30, nk=20, seed=2)
    kw = dict(bucket_size=1, sample_size=48, sampling=sampling, generator=gen(3))
    out, t = K.kde_attention(q, k, v, return_trace=True, **kw)
    assert t.block_cols.shape[-1] > 20
    torch.testing.assert_close(t.attention_matrix() @ v, out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(t.heavy_output + t.sampled_output, out, rtol=1e-10, atol=1e-12)
    slow = K.kde_attention(q.clone().requires_grad_(), k, v, **{**kw, "generator": gen(3)})
    torch.testing.assert_close(slow.detach(), out, rtol=1e-12, atol=1e-12)


def test_trace_blocks_are_contiguous_runs_of_the_sorted_order():
    q, k, v = qkv(1, nq=64, nk=64)
    _, t = K.kde_attention(q, k, v, bucket_size=16, sampling="column_norm", generator=gen(2), return_trace=True)
    k_sorted_blocks = torch.gather(t.k_blocks, -1, t.k_order)[0]
    assert torch.equal(k_sorted_blocks, torch.arange(4).repeat_interleave(16))
    q_sorted_blocks = torch.gather(t.q_blocks, -1, t.q_order)[0]
    assert torch.equal(q_sorted_blocks, torch.arange(4).repeat_interleave(16))


def test_excluded_samples_are_the_sampled_keys_inside_a_block():
    q, k, v = qkv(1, nq=32, nk=32)
    _, t = K.kde_attention(q, k, v, bucket_size=8, sample_size=64, sampling="value_norm", generator=gen(5),
                           return_trace=True)
    excluded = t.excluded_mask()[0]
    counts = t.sample_counts()[0]
    for i in range(32):
        in_block = (t.k_blocks[0] == t.q_blocks[0, i]).nonzero().flatten()
        expect = set(in_block.tolist()) & set(t.sampled[0].tolist())
        assert set(excluded[i].nonzero().flatten().tolist()) == expect
    assert int(counts.sum()) == 64


# ----------------------------------------------------------------------------- statistics
def test_sampled_sums_are_unbiased():
    """Mean over 4000 independent hashings/samplings of (sampled sum - true off-block sum) is ~0.

    Each of the 4000 'heads' holds the same q, k, v but draws its own hyperplanes and samples. For the
    numerator and the normaliser separately, the mean difference must lie within 4 standard errors of
    zero (a false alarm rate below 1e-4 per coordinate).
    """
    heads = 4000
    q, k, v = qkv(nq=24, nk=40, d=8, dv=3, seed=11)
    q, k, v = (x.expand(heads, *x.shape).contiguous() for x in (q, k, v))
    for sampling in ("value_norm", "uniform"):
        _, t = K.kde_attention(
            q, k, v, bucket_size=8, sample_size=6, sampling=sampling, generator=gen(7), return_trace=True
        )
        a = torch.exp(q @ k.mT / math.sqrt(8))  # (heads, Nq, Nk), small logits: no overflow in float64
        off = ~t.heavy_mask()
        true_num = (a * off) @ v  # (heads, Nq, Dv)
        true_den = (a * off).sum(-1)  # (heads, Nq)
        d_est = t.log_normalizer.exp()
        est_num = t.sampled_output * d_est.unsqueeze(-1)
        est_den = (1 - t.heavy_fraction) * d_est
        for est, true in ((est_num, true_num), (est_den, true_den)):
            diff = est - true
            z = diff.mean(0) / (diff.std(0) / math.sqrt(heads))
            assert float(z.abs().max()) < 4.5, sampling
        # the normaliser is positive: its mean estimate is also close in relative terms
        rel = (est_den - true_den).mean().abs() / true_den.mean()
        assert float(rel) < 0.01, float(rel)


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_error_falls_as_sample_size_grows(sampling):
    q, k, v = qkv(64, nq=128, nk=128, d=16, dv=16, seed=3, spread=1.5)
    exact = K.exact_attention(q, k, v)
    sizes = (8, 32, 64, 96) if sampling == "pps" else (8, 32, 128, 512)  # pps: a budget >= Nk is exact
    errors = [
        K.relative_spectral_error(K.kde_attention(q, k, v, bucket_size=16, sample_size=s, sampling=sampling,
                                                  generator=gen(1)), exact)
        for s in sizes
    ]
    assert errors[0] > errors[1] > errors[2] > errors[3], errors
    assert errors[3] < 0.5 * errors[0]


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_deterministic_for_a_generator(sampling):
    q, k, v = qkv(2, 3, nq=50, nk=50)
    a = K.kde_attention(q, k, v, bucket_size=8, sample_size=16, sampling=sampling, generator=gen(9))
    b = K.kde_attention(q, k, v, bucket_size=8, sample_size=16, sampling=sampling, generator=gen(9))
    c = K.kde_attention(q, k, v, bucket_size=8, sample_size=16, sampling=sampling, generator=gen(10))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# ----------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_huge_logits_stay_finite_and_match_float64(dtype, sampling):
    g = gen(4)
    q = torch.randn(2, 3, 50, 8, generator=g)
    k = torch.randn(2, 3, 50, 8, generator=g)
    v = torch.randn(2, 3, 50, 8, generator=g)
    q = q / q.norm(dim=-1, keepdim=True) * 100.0  # logits up to |100 * 100| = 1e4
    k = k / k.norm(dim=-1, keepdim=True) * 100.0
    ql, kl, vl = (x.to(dtype) for x in (q, k, v))
    qd, kd, vd = (x.to(torch.float64) for x in (ql, kl, vl))  # the same numbers in float64
    assert float((qd @ kd.mT).abs().max()) > 9000
    for bucket in (16, 50):
        out = K.kde_attention(ql, kl, vl, bucket_size=bucket, sample_size=16, scale=1.0, sampling=sampling, generator=gen(2))
        ref = K.kde_attention(qd, kd, vd, bucket_size=bucket, sample_size=16, scale=1.0, sampling=sampling, generator=gen(2))
        assert out.dtype == dtype and bool(torch.isfinite(out).all())
        # half types are computed in float32; a logit of 1e4 carries a float32 rounding of ~1e-3,
        # which exp() turns into a relative error of the same size: that is what the dtype allows
        tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 2e-3}[dtype]
        torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    exact = K.exact_attention(ql, kl, vl, scale=1.0)
    assert bool(torch.isfinite(exact).all())


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_large_logits_float32_like_a_real_bert_head(sampling):
    """Logits around 81 (a real MiniLM head) overflow exp() in the authors' code; not here."""
    q, k, v = qkv(1, 2, nq=64, nk=64, dtype=torch.float32)
    out = K.kde_attention(q * 30, k * 30, v, bucket_size=16, sample_size=16, scale=1.0, sampling=sampling, generator=gen())
    assert bool(torch.isfinite(out).all())


# ----------------------------------------------------------------------------- independence
@pytest.mark.parametrize("nq,nk,bucket", [(50, 50, 16), (37, 61, 8), (65, 64, 64)])
@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_batch_items_and_heads_are_independent(nq, nk, bucket, sampling):
    q, k, v = qkv(3, 4, nq=nq, nk=nk, dtype=torch.float32)
    kw = dict(bucket_size=bucket, sample_size=16, sampling=sampling)
    base = K.kde_attention(q, k, v, generator=gen(1), **kw)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    q2[1] += 3.0
    k2[1, 2] *= -1
    v2[1] = v2[1] * 5 + 1
    out = K.kde_attention(q2, k2, v2, generator=gen(1), **kw)
    assert not torch.equal(out[1], base[1])
    assert torch.equal(out[0], base[0]) and torch.equal(out[2], base[2])


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_cross_attention_and_no_leading_dims(sampling):
    q, k, v = qkv(nq=13, nk=77, dv=5)
    out, t = K.kde_attention(q, k, v, bucket_size=10, sample_size=16, sampling=sampling, generator=gen(), return_trace=True)
    assert out.shape == (13, 5)
    torch.testing.assert_close(t.attention_matrix() @ v, out)


# ----------------------------------------------------------------------------- masks
@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_padding_mask_exact_limit_equals_unpadded_attention(sampling):
    q, k, v = qkv(2, 3, nq=30, nk=50)
    lengths = torch.tensor([50, 31])
    mask = torch.arange(50) < lengths.view(2, 1)  # (B, Nk): broadcast over heads
    mask = mask.view(2, 1, 50)
    out = K.kde_attention(q, k, v, bucket_size=64, key_mask=mask, sampling=sampling, generator=gen())
    for b, n in enumerate(lengths.tolist()):
        ref = K.exact_attention(q[b, :, :, :], k[b, :, :n], v[b, :, :n])
        torch.testing.assert_close(out[b], ref, rtol=1e-12, atol=1e-12)
    exact = K.exact_attention(q, k, v, key_mask=mask)
    torch.testing.assert_close(exact, out, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_masked_keys_take_no_part(sampling):
    q, k, v = qkv(2, 2, nq=40, nk=60)
    mask = torch.rand(2, 2, 60, generator=gen(3)) > 0.4
    out, t = K.kde_attention(
        q, k, v, bucket_size=8, key_mask=mask, sampling=sampling, generator=gen(1), return_trace=True
    )
    assert bool((t.probs[~mask] == 0).all())
    real = t.sample_group >= 0  # heads of different lengths: slots past a head's own draws are padding (-1)
    assert bool(mask.gather(-1, t.sampled)[real].all())
    assert bool((t.k_blocks[~mask] == -1).all())
    assert bool((t.attention_matrix()[~mask.unsqueeze(-2).expand(-1, -1, 40, -1)] == 0).all())
    torch.testing.assert_close(t.attention_matrix() @ v, out)
    # whatever the masked keys and values hold, the output is bit-identical
    k2, v2 = k.clone(), v.clone()
    k2[~mask] = 1e3
    v2[~mask] = -7.0
    out2 = K.kde_attention(q, k2, v2, bucket_size=8, key_mask=mask, sampling=sampling, generator=gen(1))
    assert torch.equal(out, out2)


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_mask_leaving_fewer_keys_than_blocks(sampling):
    q, k, v = qkv(1, nq=64, nk=64)
    mask = torch.zeros(1, 64, dtype=torch.bool)
    mask[0, [3, 40, 41]] = True  # 3 unmasked keys, 8 blocks of 8
    out, t = K.kde_attention(q, k, v, bucket_size=8, key_mask=mask, sampling=sampling, generator=gen(), return_trace=True)
    assert bool(torch.isfinite(out).all())
    assert bool(t.heavy_mask().any(-1).all())  # every query still sees an unmasked key exactly
    torch.testing.assert_close(t.attention_matrix() @ v, out)


# ----------------------------------------------------------------------------- bad input
def bad(match, *args, **kwargs):
    with pytest.raises(ValueError, match=match):
        K.kde_attention(*args, **kwargs)


def test_bad_input_raises_clear_errors():
    q, k, v = qkv(2, nq=10, nk=12)
    bad("query must have shape", q[0, 0], k, v)
    bad("same number of dims", q, k[0], v)
    bad("key's last dim", q, k[..., :5], v)
    bad("value must have Nk=12", q, k, v[:, :11])
    bad("share one dtype", q.float(), k, v)
    bad("leading", q, k.expand(1, 2, 12, 16).reshape(2, 12, 16)[:1].expand(3, 12, 16), v)
    bad("bucket_size must be an integer >= 1", q, k, v, bucket_size=0)
    bad("bucket_size must be an integer", q, k, v, bucket_size=8.0)
    bad("sample_size must be an integer >= 1", q, k, v, sample_size=-3)
    bad("sample_size must be an integer", q, k, v, sample_size=True)
    bad(r"num_projs must be an integer in \[1, 16\]", q, k, v, num_projs=17)
    bad(r"num_projs must be an integer in \[1, 16\]", q, k, v, num_projs=0)
    bad("sampling must be one of", q, k, v, sampling="magic")
    bad("bucket_order must be one of", q, k, v, bucket_order="random")
    bad("scale must be a finite", q, k, v, scale=float("nan"))
    bad("float16, bfloat16, float32 or float64", q.int(), k.int(), v.int())
    q_nan = q.clone()
    q_nan[0, 0, 0] = float("nan")
    bad("query contains NaN or Inf", q_nan, k, v)
    v_inf = v.clone()
    v_inf[1, 2, 3] = float("inf")
    bad("value contains NaN or Inf", q, k, v_inf)
    bad("key_mask must be a bool tensor", q, k, v, key_mask=torch.ones(2, 12))
    bad("key_mask must have shape", q, k, v, key_mask=torch.ones(2, 11, dtype=torch.bool))
    bad("key_mask must have shape", q, k, v, key_mask=torch.ones(3, 12, dtype=torch.bool))
    rows = torch.ones(2, 12, dtype=torch.bool)
    rows[1] = False
    bad("masks every key", q, k, v, key_mask=rows)
    bad("generator must be a torch.Generator", q, k, v, generator=3)
    bad("must be non-empty", q[:, :0], k, v)
    with pytest.raises(ValueError, match="key_mask must be a bool"):
        K.exact_attention(q, k, v, key_mask=torch.ones(2, 12))


def test_non_contiguous_inputs_like_hugging_face_transposes():
    """HF hands attention (B, N, H, D) tensors transposed to (B, H, N, D): strided, not contiguous."""
    g = gen(8)
    q, k, v = (torch.randn(1, 37, 4, 16, generator=g, dtype=torch.float64).transpose(1, 2) for _ in range(3))
    assert not q.is_contiguous()
    for sampling in SAMPLINGS:
        out = K.kde_attention(q, k, v, bucket_size=8, sample_size=16, sampling=sampling, generator=gen(1))
        ref = K.kde_attention(q.contiguous(), k.contiguous(), v.contiguous(), bucket_size=8, sample_size=16,
                              sampling=sampling, generator=gen(1))
        assert torch.equal(out, ref)
    torch.testing.assert_close(K.kde_attention(q, k, v, bucket_size=64), K.exact_attention(q, k, v))
