"""sampling="column_norm": estimated column norms per group, heavy columns, unbiasedness, masks."""
import math

import pytest
import torch

import kdeformer as K
from kdeformer import sampling as S
from conftest import assert_sampled_sums_unbiased


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def sinky(*lead, n=64, d=8, dv=4, seed=0, sinks=(0, 5)):
    """Keys with a few 'sink' columns every query attends to, like [CLS]/[SEP] in BERT."""
    g = gen(seed)
    q = torch.randn(*lead, n, d, generator=g, dtype=torch.float64)  # (..., N, D)
    k = torch.randn(*lead, n, d, generator=g, dtype=torch.float64)  # (..., N, D)
    v = torch.randn(*lead, n, dv, generator=g, dtype=torch.float64)  # (..., N, Dv)
    u = torch.randn(d, generator=g, dtype=torch.float64)
    u = u / u.norm()  # a direction every query leans towards
    q = q + 2 * u
    k[..., list(sinks), :] = 5 * u
    return q, k, v


def manual_output(q, k, v, t, scale):
    """The estimator written out entry by entry from the trace's raw fields (no trace methods)."""
    n_q, n_k = q.shape[-2], k.shape[-2]
    a = torch.exp(scale * q @ k.mT)  # (Nq, Nk) small logits in float64
    factor = torch.zeros(n_q, n_k, dtype=torch.float64)
    heavy = t.extras.get("heavy_columns")
    for i in range(n_q):
        grp = int(t.q_groups[i])
        exact = set((t.k_blocks == t.q_blocks[i]).nonzero().flatten().tolist())
        if heavy is not None:
            exact |= {int(c) for c, ok in zip(heavy[grp], t.extras["heavy_columns_valid"][grp]) if ok}
        for j in exact:
            factor[i, j] = 1.0  # once, even when a block key is also a heavy column
        for j, w, sg in zip(t.sampled.tolist(), t.weights.tolist(), t.sample_group.tolist()):
            if sg == grp and j not in exact:
                factor[i, j] += w
    num = (a * factor) @ v
    return num / (a * factor).sum(-1, keepdim=True)


@pytest.mark.parametrize("heavy", [0, 4, 12])
def test_estimator_matches_its_definition_and_never_double_counts(heavy):
    q, k, v = sinky(n=48)
    out, t = K.kde_attention(
        q, k, v, bucket_size=8, sample_size=16, sampling="column_norm", heavy_columns=heavy,
        generator=gen(2), return_trace=True,
    )
    torch.testing.assert_close(out, manual_output(q, k, v, t, 1 / math.sqrt(8)), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(t.attention_matrix() @ v, out, rtol=1e-10, atol=1e-12)
    assert t.sampled.shape[-1] == t.num_groups * (16 - heavy)


def test_heavy_columns_find_the_sinks():
    q, k, v = sinky(n=64, sinks=(0, 5, 9))
    _, t = K.kde_attention(
        q, k, v, bucket_size=8, sample_size=16, sampling="column_norm", heavy_columns=3,
        generator=gen(1), return_trace=True,
    )
    heavy_mask = t.heavy_column_mask()
    # every query computes the three sinks exactly, unless its own block already holds them
    sink_exact = t.heavy_mask()[:, [0, 5, 9]]
    assert bool(sink_exact.all())
    assert int(heavy_mask.sum(-1).max()) <= 3


def test_probabilities_sum_to_one_and_never_vanish_on_allowed_columns():
    q, k, v = sinky(2, n=80)
    mask = torch.rand(2, 80, generator=gen(4)) > 0.3
    _, t = K.kde_attention(
        q, k, v, bucket_size=8, sample_size=32, sampling="column_norm", key_mask=mask,
        generator=gen(3), return_trace=True,
    )
    gp = t.group_probs  # (2, ng, Nk)
    torch.testing.assert_close(gp.sum(-1), torch.ones(gp.shape[:-1], dtype=torch.float64))
    assert bool((gp[~mask.unsqueeze(1).expand_as(gp)] == 0).all())
    heavy = torch.zeros_like(gp, dtype=torch.bool).scatter_(-1, t.extras["heavy_columns"], t.extras["heavy_columns_valid"])
    allowed = mask.unsqueeze(1) & ~heavy
    if t.num_groups == t.q_blocks.max() + 1:  # single-block groups: own key block is never drawn
        own = t.k_blocks.unsqueeze(1) == torch.arange(t.num_groups).view(1, -1, 1)
        allowed &= ~own
    floor = S.UNIFORM_FLOOR / allowed.sum(-1, keepdim=True)
    assert bool((gp[allowed] >= (floor.expand_as(gp)[allowed] - 1e-15)).all())
    assert bool(mask.gather(-1, t.sampled).all())


def test_column_norm_sums_are_unbiased():
    """Same statistical check as for value_norm: sampled numerator and normaliser, 4000 draws."""
    heads = 4000
    q, k, v = sinky(n=40, d=8, dv=3, seed=11)
    q, k, v = (x.expand(heads, *x.shape).contiguous() for x in (q, k, v))
    _, t = K.kde_attention(
        q, k, v, bucket_size=8, sample_size=8, sampling="column_norm", heavy_columns=2,
        generator=gen(7), return_trace=True,
    )
    assert_sampled_sums_unbiased(q, k, v, t, 1 / math.sqrt(8))


def test_column_norm_beats_value_norm_on_sink_attention():
    q, k, v = sinky(32, n=128, d=16, dv=8, seed=5, sinks=(0, 1, 64))
    exact = K.exact_attention(q, k, v)
    err = {
        s: sum(
            K.relative_spectral_error(K.kde_attention(q, k, v, bucket_size=16, sample_size=32, sampling=s, generator=gen(i)), exact)
            for i in range(3)
        )
        for s in ("value_norm", "column_norm")
    }
    assert err["column_norm"] < 0.7 * err["value_norm"], err


def test_exact_limit_and_masks_with_column_norm():
    q, k, v = sinky(2, n=30)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1, 20:] = False
    out = K.kde_attention(q, k, v, bucket_size=30, sampling="column_norm", key_mask=mask, generator=gen())
    torch.testing.assert_close(out, K.exact_attention(q, k, v, key_mask=mask), rtol=1e-12, atol=1e-12)


def test_estimation_rows_and_groups():
    assert S.plan_sample_groups(8, 64) == (8, 8)
    assert S.plan_sample_groups(16, 32) == (16, 2)
    assert S.plan_sample_groups(16, 16) == (8, 2)  # fewer rows than 2 per block: blocks share a group
    assert S.plan_sample_groups(256, 64) == (32, 2)
    assert S.default_estimate_rows(128, 512, 512) == 64
    q, k, v = sinky(n=64)
    _, t = K.kde_attention(q, k, v, bucket_size=8, sample_size=16, sampling="column_norm",
                           estimate_rows=8, generator=gen(), return_trace=True)
    rows = t.extras["estimate_rows"]
    assert rows.shape == (8,) and t.num_groups == 4  # 8 blocks, 2 rows per group: 2 blocks a group
    # the rows of group g are queries of group g, and their log D is exact
    assert bool((t.q_groups[rows] == torch.arange(4).repeat_interleave(2)).all())
    assert bool((t.q_groups == t.q_blocks.clamp_min(0) // 2).all())
    exact_log_d = torch.logsumexp(q[rows] @ k.T / math.sqrt(8), -1)
    torch.testing.assert_close(t.extras["estimate_log_normalizer"], exact_log_d)


def test_column_norm_options_are_checked():
    q, k, v = sinky(n=20)
    with pytest.raises(ValueError, match=r"heavy_columns must be an integer in \[0, 15\]"):
        K.kde_attention(q, k, v, sample_size=16, sampling="column_norm", heavy_columns=16)
    with pytest.raises(ValueError, match="estimate_rows must be an integer >= 1"):
        K.kde_attention(q, k, v, sampling="column_norm", estimate_rows=0)
    with pytest.raises(ValueError, match="heavy_columns needs sampling='column_norm'"):
        K.kde_attention(q, k, v, sampling="value_norm", heavy_columns=4)


def test_theory_view_compares_estimates_with_exact_quantities():
    from kdeformer.theory import theory_view

    q, k, v = sinky(3, n=64)
    for sampling in ("value_norm", "column_norm"):
        out, t = K.kde_attention(q, k, v, bucket_size=8, sample_size=16, sampling=sampling, generator=gen(), return_trace=True)
        view = theory_view(q, k, v, out, t)
        exact = K.exact_attention(q, k, v)
        torch.testing.assert_close(view.relative_error, K.relative_spectral_error(out, exact, reduction="none"))
        assert bool((view.theory_error < view.relative_error).all())  # ||D^-1 A|| ||V|| >= ||O||
        torch.testing.assert_close(view.oracle_group_probs.sum(-1), torch.ones(3, t.num_groups, dtype=torch.float64))
        assert bool((view.total_variation >= 0).all()) and bool((view.total_variation <= 1).all())
        # the oracle puts no mass on columns a whole group computes exactly
        assert view.oracle_group_probs.shape == t.group_probs.shape
    # with exact settings the estimate of D is exact and the error vanishes
    out, t = K.kde_attention(q, k, v, bucket_size=64, generator=gen(), return_trace=True)
    view = theory_view(q, k, v, out, t)
    torch.testing.assert_close(view.log_normalizer, view.exact_log_normalizer)
    assert float(view.relative_error.max()) < 1e-12


def test_column_norm_distribution_is_closer_to_the_oracle():
    from kdeformer.theory import theory_view

    q, k, v = sinky(8, n=128, d=16, seed=3, sinks=(0, 7))
    tv = {}
    for sampling in ("value_norm", "column_norm"):
        out, t = K.kde_attention(q, k, v, bucket_size=16, sample_size=32, sampling=sampling, generator=gen(1), return_trace=True)
        tv[sampling] = float(theory_view(q, k, v, out, t).total_variation.mean())
    assert tv["column_norm"] < tv["value_norm"], tv


def reference_inverse_cdf(probs, uniforms):
    """inverse_cdf as first written: a full pass for the last index of positive probability, always."""
    cdf = torch.cumsum(probs.to(torch.float64), dim=-1)
    index = torch.searchsorted(cdf, uniforms * cdf[..., -1:], right=True)
    last = torch.where(probs > 0, torch.arange(probs.shape[-1]), 0).amax(-1, keepdim=True)
    return torch.minimum(index, last)


def test_inverse_cdf_draws_what_the_full_pass_drew():
    """The last positive index is looked up only for a uniform that rounds up to the total: same draws."""
    from kdeformer.random import inverse_cdf

    g = torch.Generator().manual_seed(3)
    probs = torch.rand(6, 4, 50, generator=g) * (torch.rand(6, 4, 50, generator=g) > 0.4)  # zeros inside
    probs[..., 40:] = 0  # and a zero tail
    probs[0, 0] = 0  # a row with no mass at all
    probs[1, 1, 7] = 1e-30  # mass a float64 sum absorbs
    top = 1.0 - 2.0**-54  # the largest uniform Draws gives: u * total rounds up to the total
    uniforms = torch.cat([torch.rand(6, 4, 30, generator=g, dtype=torch.float64), torch.full((6, 4, 2), top)], -1)
    got = inverse_cdf(probs, uniforms)
    assert torch.equal(got, reference_inverse_cdf(probs, uniforms))
    cdf = probs.double().cumsum(-1)
    raw = torch.searchsorted(cdf, uniforms * cdf[..., -1:], right=True)
    assert bool((raw[..., -2:] == 50).all())  # the rounding case is exercised
    assert int(got.max()) < 40 and bool((got[0, 0] == 0).all())


def test_addressed_bits_are_splitmix64_of_their_address():
    """Draws._bits(stream, shape)[g, i] = mix(mix(mix(seed + id(stream) * c) + (head_g + 1) * c) ^ mix(i * c + 1)),
    the documented address hash, whichever path (Python ints, cached index half) computes it."""
    from kdeformer.random import _GOLDEN, _MASK64, Draws, mix64, mix64_int, stream_id

    def ref(x: int) -> int:  # splitmix64's finaliser written out on Python ints
        x &= _MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        return x ^ (x >> 31)

    g = _GOLDEN & _MASK64
    for seed in (0, 7, 2**63 - 2):
        heads = torch.tensor([0, 3, 1])
        bits = Draws(seed, heads)._bits("samples", (2, 5)).view(3, -1)
        key = ref(seed + stream_id("samples") * g)
        for row, h in enumerate(heads.tolist()):
            per_head = ref(key + (h + 1) * g)
            want = [ref(per_head ^ ref(i * g + 1)) for i in range(10)]
            assert [b & _MASK64 for b in bits[row].tolist()] == want
        assert mix64_int(seed * 3 + 1) == ref(seed * 3 + 1)
        x = torch.tensor([seed, -5, 2**62])
        assert [v & _MASK64 for v in mix64(x).tolist()] == [ref(v) for v in x.tolist()]
