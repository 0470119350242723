"""sampling="pps": capped PPS inclusion probabilities, systematic draws, Horvitz-Thompson unbiasedness,
the exact window counted once, the budget spent honestly, the trace as the estimator."""
import math

import pytest
import torch

import kdeformer as K
from kdeformer import pps
from kdeformer.core import kde_multiply_adds
from kdeformer.random import Draws
from conftest import assert_sampled_sums_unbiased


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def qkv(*lead, nq=40, nk=None, d=16, dv=8, seed=0, spread=1.0):
    nk = nq if nk is None else nk
    g = gen(seed)
    q = torch.randn(*lead, nq, d, generator=g, dtype=torch.float64) * spread  # (..., Nq, D)
    k = torch.randn(*lead, nk, d, generator=g, dtype=torch.float64) * spread  # (..., Nk, D)
    v = torch.randn(*lead, nk, dv, generator=g, dtype=torch.float64)  # (..., Nk, Dv)
    return q, k, v


def positional(*lead, n=64, d=16, dv=8, seed=0):
    """Queries and keys that rotate with the token position: each query leans towards its neighbours."""
    g = gen(seed)
    pos = torch.arange(n, dtype=torch.float64).unsqueeze(-1)  # (N, 1)
    freq = torch.rand(d // 2, generator=g, dtype=torch.float64) * 0.5  # (D/2,)
    angle = pos * freq  # (N, D/2)
    base = torch.cat([angle.cos(), angle.sin()], -1) * 2.5  # (N, D)
    q = base + 0.3 * torch.randn(*lead, n, d, generator=g, dtype=torch.float64)  # (..., N, D)
    k = base + 0.3 * torch.randn(*lead, n, d, generator=g, dtype=torch.float64)
    v = torch.randn(*lead, n, dv, generator=g, dtype=torch.float64)
    return q, k, v


# ----------------------------------------------------------------------------- inclusion probabilities
def test_inclusion_probabilities_sum_to_the_count_and_cap_at_one():
    g = gen(1)
    w = torch.rand(6, 200, generator=g) ** 6  # (6, Nk) skewed weights
    w[:, :3] = 50.0  # three columns no draw can leave out
    pi = pps.inclusion_probabilities(w.clone(), 20)
    torch.testing.assert_close(pi.sum(-1).double(), torch.full((6,), 20.0, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    assert bool((pi <= 1).all()) and bool((pi > 0).all())
    assert bool((pi[:, :3] == 1).all())
    for row in range(6):  # uncapped columns keep pi proportional to w (one factor per row)
        ratio = (pi[row] / w[row])[pi[row] < 1]
        assert float(ratio.max() / ratio.min()) < 1 + 1e-5
    assert bool((pps.inclusion_probabilities(w.clone(), 200) == 1).all())  # C >= Nk: every column exact


def test_systematic_draws_include_each_column_with_probability_pi_and_never_twice():
    """4000 blocks draw 12 of 60 columns from one pi: the inclusion frequency of every column is pi
    (z-test, 4.5 standard errors), no block holds a column twice, and the weights are 1/pi."""
    blocks = 4000
    g = gen(2)
    w = torch.rand(1, 1, 60, generator=g) ** 3
    pi = pps.inclusion_probabilities(w, 12)  # (1, 1, 60)
    uniform = Draws(7, torch.zeros(1, dtype=torch.long)).uniform("systematic", (blocks,))  # (1, blocks)
    cols, weights, exact = pps.systematic_sample(pi, 12, uniform, torch.zeros(blocks, dtype=torch.long))
    used = weights > 0
    assert bool(used.all())  # sum pi = 12 exactly: every slot holds a column
    assert bool((cols[..., 1:] > cols[..., :-1]).all())  # increasing: distinct
    counts = torch.zeros(60, dtype=torch.float64).scatter_add_(0, cols.flatten(), torch.ones(cols.numel(), dtype=torch.float64))
    freq, p = counts / blocks, pi[0, 0].double()
    z = (freq - p) / (p * (1 - p) / blocks).clamp_min(1e-12).sqrt()
    assert float(z.abs().max()) < 4.5
    drawn_pi = pi[0, 0][cols]  # (1, blocks, 12)
    torch.testing.assert_close(weights, 1.0 / drawn_pi.double())
    assert torch.equal(exact, drawn_pi >= 1)


def test_horvitz_thompson_sums_are_unbiased():
    """sum over drawn j of x_j / pi_j estimates sum_j x_j: z-test over 4000 systematic draws."""
    blocks = 4000
    g = gen(3)
    w = torch.rand(1, 1, 80, generator=g) + 0.1
    x = torch.randn(80, dtype=torch.float64, generator=g) * w[0, 0].double()  # roughly proportional to w
    pi = pps.inclusion_probabilities(w, 10)
    uniform = Draws(9, torch.zeros(1, dtype=torch.long)).uniform("systematic", (blocks,))
    cols, weights, _ = pps.systematic_sample(pi, 10, uniform, torch.zeros(blocks, dtype=torch.long))
    est = (x[cols[0]] * weights[0]).sum(-1)  # (blocks,)
    z = (est.mean() - x.sum()) / (est.std() / math.sqrt(blocks))
    assert abs(float(z)) < 4.5


# ----------------------------------------------------------------------------- the estimator
def manual_output(q, k, v, t, scale):
    """The estimator from the trace's raw fields: each query's block columns (weight 0 where the column
    is in its window) plus its window columns, weight 1."""
    n_q, n_k = q.shape[-2], k.shape[-2]
    a = torch.exp(scale * q @ k.mT)  # (Nq, Nk) small logits in float64
    factor = torch.zeros(n_q, n_k, dtype=torch.float64)
    for i in range(n_q):
        own = {int(c) for c, w in zip(t.query_cols[i], t.query_weights[i]) if w > 0}
        b = int(t.row_block[i])
        for c, w in zip(t.block_cols[b].tolist(), t.block_weights[b].tolist()):
            if c not in own:
                factor[i, c] += w
        for c in own:
            factor[i, c] = 1.0
    return ((a * factor) @ v) / (a * factor).sum(-1, keepdim=True)


@pytest.mark.parametrize("nq,nk", [(64, 64), (50, 90), (90, 40)])
def test_estimator_matches_its_definition_and_counts_the_window_once(nq, nk):
    q, k, v = positional(n=max(nq, nk))
    q, k, v = q[:nq], k[:nk], v[:nk]
    out, t = K.kde_attention(q, k, v, bucket_size=8, sample_size=16, sampling="pps", generator=gen(2), return_trace=True)
    torch.testing.assert_close(out, manual_output(q, k, v, t, 1 / math.sqrt(16)), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(t.attention_matrix() @ v, out, rtol=1e-10, atol=1e-12)
    rows = torch.arange(nq)
    weights, exact = t.weight_rows(rows), t.exact_mask_rows(rows)
    keys = pps.window_keys(nq, nk, int(t.extras["window"]))  # (Nq, W)
    for i in range(nq):
        window = keys[i][keys[i] >= 0]
        assert bool(exact[i, window].all()) and bool((weights[i, window] == 1).all())  # exact, counted once
    assert bool((weights[exact] == 1).all())
    cols, w, _ = t.row_columns(rows)
    assert cols.shape[-1] == t.block_cols.shape[-1] + keys.shape[-1]


def test_block_columns_never_repeat_and_weights_are_inverse_pi():
    q, k, v = qkv(3, nq=200, seed=4)
    _, t = K.kde_attention(q, k, v, bucket_size=16, sample_size=32, sampling="pps", generator=gen(1), return_trace=True)
    cols, weights = t.block_cols, t.block_weights  # (3, nqb, C)
    for head in range(3):
        for b in range(cols.shape[1]):
            used = cols[head, b][weights[head, b] > 0]
            assert used.unique().numel() == used.numel()
    pi = t.extras["inclusion_probs"]  # (3, ng, Nk)
    group = t.q_groups.gather(-1, torch.arange(0, 200, 1).expand(3, -1))  # group of each query
    assert pi.shape[1] == t.num_groups and int(group.max()) < t.num_groups
    torch.testing.assert_close(pi.sum(-1), torch.full(pi.shape[:2], float(cols.shape[-1]), dtype=torch.float64),
                               rtol=1e-5, atol=1e-4)


def test_pps_sums_are_unbiased():
    """Mean over 4000 heads of (sampled sum - true sum of the entries not computed exactly) is ~0 for
    the numerator and the normaliser (z-test, 4.5 standard errors), as for the other schemes."""
    heads = 4000
    q, k, v = qkv(nq=24, nk=40, d=8, dv=3, seed=11)
    q, k, v = (x.expand(heads, *x.shape).contiguous() for x in (q, k, v))
    _, t = K.kde_attention(q, k, v, bucket_size=8, sample_size=6, sampling="pps", generator=gen(7), return_trace=True)
    assert_sampled_sums_unbiased(q, k, v, t, 1 / math.sqrt(8))


# ----------------------------------------------------------------------------- knobs and cost
@pytest.mark.parametrize("n_q,n_k,budget", [(512, 512, 64), (512, 512, 192), (100, 700, 48), (3000, 300, 24),
                                              (16384, 16384, 192), (5, 2000, 32), (2048, 2048, 2)])
def test_budget_is_spent_honestly(n_q, n_k, budget):
    """All multiply-adds (estimates, block GEMMs, window, spreads) within budget * (D + Dv + 1) per query,
    hashing the queries on top (at most 15 %), whenever one column per block fits in the budget."""
    dim = dim_v = 64
    total = kde_multiply_adds(n_q, n_k, dim, dim_v, bucket_size=budget // 3 or 1, sample_size=budget - budget // 3,
                              sampling="pps")
    allowed = n_q * budget * (dim + dim_v + 1)
    layout = pps.pps_layout(n_q, n_k, dim, dim_v, budget)
    if budget >= 8:
        assert total <= allowed, (total, allowed, layout)
    else:  # tiny budgets: no window, one column per block; the estimate alone may exceed them
        assert layout.window_len == 0 and layout.columns >= 1
    hashing = kde_multiply_adds(n_q, n_k, dim, dim_v, bucket_size=budget // 3 or 1, sample_size=budget - budget // 3,
                                sampling="pps", include_hashing=True) - total
    assert hashing == n_q * dim * 7 and (budget < 24 or hashing <= 0.15 * allowed)


def test_blocks_grow_at_large_n():
    assert pps.pps_layout(512, 512, 64, 64, 192).q_block_len == 32
    assert pps.pps_layout(16384, 16384, 64, 64, 192).q_block_len == 128
    assert pps.pps_layout(32768, 32768, 64, 64, 192).q_block_len == 128
    small = pps.pps_layout(512, 512, 64, 64, 192)
    assert small.num_groups == small.num_q_blocks == 16 and small.window == 3


@pytest.mark.parametrize("nq,nk", [(1, 1), (7, 7), (33, 50), (64, 17)])
def test_budget_covering_the_keys_is_exact(nq, nk):
    q, k, v = qkv(2, nq=nq, nk=nk)
    ref = K.exact_attention(q, k, v)
    out = K.kde_attention(q, k, v, bucket_size=max(1, nk - 1), sample_size=1, sampling="pps", generator=gen())
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    out, t = K.kde_attention(q, k, v, bucket_size=nk, sampling="pps", generator=gen(), return_trace=True)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert t.num_blocks == 1 and bool(t.heavy_mask().all())


def test_pps_options_and_causal_fallback():
    q, k, v = qkv(nq=30)
    with pytest.raises(ValueError, match="heavy_columns needs sampling='column_norm'"):
        K.kde_attention(q, k, v, sampling="pps", heavy_columns=4)
    with pytest.raises(ValueError, match="estimate_rows needs sampling='column_norm'"):
        K.kde_attention(q, k, v, sampling="pps", estimate_rows=4)
    # causal attention has no pps form yet: the causal kernel's column_norm runs, and the trace says so
    out, t = K.kde_attention(q, k, v, bucket_size=8, sample_size=16, sampling="pps", is_causal=True, generator=gen(),
                             return_trace=True)
    assert t.sampling == "column_norm" and t.is_causal
    ref = K.kde_attention(q, k, v, bucket_size=8, sample_size=16, sampling="column_norm", is_causal=True, generator=gen())
    assert torch.equal(out, ref)


def test_pps_is_more_accurate_than_column_norm_at_equal_budget():
    q, k, v = positional(16, n=256, d=16, dv=8, seed=5)
    exact = K.exact_attention(q, k, v)
    err = {s: sum(float(K.relative_spectral_error(
        K.kde_attention(q, k, v, bucket_size=16, sample_size=32, sampling=s, generator=gen(i)), exact)) for i in range(2))
        for s in ("column_norm", "pps")}
    assert err["pps"] < 0.7 * err["column_norm"], err
    cost = {s: kde_multiply_adds(256, 256, 16, 8, bucket_size=16, sample_size=32, sampling=s) for s in err}
    assert cost["pps"] < cost["column_norm"]  # and cheaper: column_norm pays its estimation rows on top


def reference_inclusion_probabilities(weight, count):
    """Capped PPS as first written: the k search over the full top-count of every row."""
    n = min(count, weight.shape[-1])
    top = weight.topk(n, dim=-1).values.double()
    rest = weight.sum(-1, keepdim=True).double() - (top.cumsum(-1) - top)
    scale = (n - torch.arange(n, dtype=torch.float64)) / rest
    first = (scale * top <= 1 + 1e-6).to(torch.int8).argmax(-1, keepdim=True)
    return weight.mul_(torch.gather(scale, -1, first).float()).clamp_max_(1.0)


@pytest.mark.parametrize("count", [1, 5, 40, 199])
def test_staged_capped_pps_search_equals_the_full_search(count):
    """Rows that settle at k = 0, at a few sinks, and beyond the first TOP_DEPTHS: the same pi, bit for bit."""
    g = torch.Generator().manual_seed(11)
    weight = torch.rand(3, 6, 200, generator=g) + 0.01  # (G, ng, Nk)
    weight[0, 1, :3] = 50.0  # a few sinks
    weight[1, 2, :30] = 1e4  # more sinks than the first stages look at
    weight[2, 3] = torch.logspace(-3, 5, 200)  # a long tail of capped columns
    weight[2, 4, 7] = 1e9  # one huge sink
    got = pps.inclusion_probabilities(weight.clone(), count)
    assert torch.equal(got, reference_inclusion_probabilities(weight.clone(), count))


def reference_window_positions(cols, centre, window, n_keys):
    """window_positions as first written: a left search for every window key."""
    keys = centre.unsqueeze(-1) + torch.arange(-window, window + 1)
    pos = torch.searchsorted(cols, keys.flatten(1)).view_as(keys).clamp_max_(cols.shape[-1] - 1)
    hit = (torch.gather(cols, 1, pos.flatten(1)).view_as(keys) == keys) & (keys >= 0) & (keys < n_keys)
    return pos, hit


def test_window_positions_with_one_search_per_query_equal_a_search_per_key():
    """The columns a query's window excludes are the same with one search per query: drawn columns (with
    repeated unused slots, dense runs next to the queries, blocks at both ends of the keys)."""
    g = torch.Generator().manual_seed(5)
    n_keys, window = 300, 3
    pi = pps.inclusion_probabilities(torch.rand(2, 3, n_keys, generator=g) ** 4, 40)
    uniform = Draws(2, torch.arange(2)).uniform("systematic", (6,))
    cols, _, _ = pps.systematic_sample(pi, 40, uniform, pps.group_of_blocks(6, 3))  # (2, 6, 40)
    cols = cols.flatten(0, 1)  # (12, 40)
    dense = torch.arange(100, 140).expand(3, -1).clone()  # runs of consecutive keys
    dense[1, 30:] = 129  # unused slots repeat the last column
    dense[2, 1:] = 101  # the [3, 9, 9] shape: an unused slot holds the top value before its used copy
    edge = torch.stack([torch.arange(0, 40), torch.arange(n_keys - 40, n_keys)])
    unsorted = torch.tensor([list(range(0, 20)) + list(range(10, 30))])  # never drawn: the full search runs
    for rows in (cols, dense, edge, unsorted):
        starts = rows[:, :1] + torch.arange(-8, 16)  # queries around the rows' own columns, and beyond
        centre = torch.cat([starts, torch.randint(-5, n_keys + 5, (rows.shape[0], 10), generator=g)], -1)
        got, want = pps.window_positions(rows, centre, window, n_keys), reference_window_positions(rows, centre, window, n_keys)
        excluded = lambda pos, hit: {(r, q, int(c)) for r, q, o in hit.nonzero().tolist() for c in [pos[r, q, o]]}  # noqa: E731
        assert excluded(*got) == excluded(*want)
        assert bool(want[1].any()) or rows is unsorted
