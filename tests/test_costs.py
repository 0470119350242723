"""kdeformer.multiply_adds: each method's count equals a count written out by hand on a small case.

Shapes in every case: Nq = 3 queries, Nk = 5 keys, D = 4, Dv = 2, so an attended (query, key) pair costs
D + Dv + 1 = 7 (logit, value row, normaliser term)."""
from __future__ import annotations

import pytest

import kdeformer
from kdeformer import core
from kdeformer.costs import multiply_adds
from kdeformer.methods import METHODS

NQ, NK, D, DV = 3, 5, 4, 2
PAIR = D + DV + 1  # 7


def count(method, **kwargs):
    return multiply_adds(method, NQ, NK, D, DV, **kwargs)


def test_exported_and_every_method_counted():
    assert kdeformer.multiply_adds is multiply_adds
    for name, info in METHODS.items():
        assert count(name, budget=4) > 0
        if info.supports_causal:
            assert count(name, budget=4, is_causal=True) > 0


def test_exact():
    assert count("exact") == count("exact", budget=64) == 3 * 5 * PAIR  # 105
    # causal, bottom-right: query 0 sees keys 0..2, query 1 keys 0..3, query 2 keys 0..4: 3 + 4 + 5 pairs
    assert count("exact", is_causal=True) == (3 + 4 + 5) * PAIR  # 84


def test_uniform():
    assert count("uniform", budget=4) == 3 * 4 * PAIR  # 84: s = 4 columns per query
    assert count("uniform", budget=4, is_causal=True) == 84


def test_performer():
    m = 6
    features = (3 + 5) * (m * D + D)  # 224: projections and squared norms of every query and key
    sums = 5 * m * (DV + 1) + 3 * m * (DV + 1)  # 144: phi(K)^T [V 1], then phi(Q) times it
    assert count("performer", budget=m) == features + sums  # 368
    # causal, one chunk of T = 5 positions: past state 2 T m (Dv + 1) = 180, pair weights T^2 m = 150 and
    # T^2 (Dv + 1) = 75, rescaling the state m Dv = 12
    assert count("performer", budget=m, is_causal=True) == features + 180 + 150 + 75 + 12  # 641


def test_reformer():
    # chunk 2: nb = 3 chunks, Bq = 1 query slot, K = 2 key slots, own + previous chunk = 4 slots
    per_round = 3 * 1 * 4 * PAIR + 3 * DV  # 84 + 6 for the merge
    assert count("reformer", budget=8) == 2 * per_round  # 180 (chunk_size = 8 / (2 x 2) = 2)
    # causal: a window of 2 chunk_size = 4 same-bucket keys plus the own key, per query and round
    assert count("reformer", budget=8, is_causal=True) == 2 * (3 * 5 * PAIR + 3 * DV)  # 222


def test_scatterbrain():
    m, block = 6, 2  # given as options (the default split of 8 would be 4 + 4)
    features = (3 + 5) * (m * D + D) + (5 + 3) * m * (DV + 1)  # 368, as Performer's
    support = 3 * 1 * 2 * (D + m + 2 * (DV + 1))  # nb = 3 chunks x Bq = 1 x K = 2: logits, L entries, two products
    assert count("scatterbrain", budget=8, block_size=block, num_features=m) == features + support  # 464


def test_nystrom():
    m = 2
    means = (3 + 5) * D  # 32
    kernels = (3 * m + m * m + m * 5) * (D + 1)  # 100: F, A, B with their softmax sums
    pinv = 6 * 4 * m**3 + 2 * m * m  # 200: 6 iterations of 4 m x m products, the two norms
    out = (m * 5 + m * m + 3 * m) * DV  # 40: B V, A^+ (.), F (.)
    assert count("nystrom", budget=m) == means + kernels + pinv + out  # 372
    assert count("nystrom", budget=64) == count("nystrom", budget=3)  # landmarks are capped at min(Nq, Nk) = 3


def test_hyperattention():
    # block 2, s = 3: nb = 3 blocks, Bq = 1, K = 2; every slot pays K + s columns; the merge 2 Nq Dv
    assert count("hyperattention", budget=5, block_size=2, sample_size=3) == 3 * 1 * (2 + 3) * PAIR + 2 * 3 * DV  # 117
    # causal: the leaf holds up to block + samples = 5 positions, here all of them: exact, 3 queries x 5 keys
    assert count("hyperattention", budget=5, block_size=2, sample_size=3, is_causal=True) == 3 * 5 * PAIR  # 105


def test_hyperattention_causal_recursion():
    """Nq = Nk = 8, block 2, s = 1 (leaves of <= 3 positions): the split is
    [0,8) -> [0,4) -> leaves [0,2), [2,4) and cross(keys [0,2), queries [2,4)); the same for [4,8); cross(keys
    [0,4), queries [4,8))."""
    leaves = 4 * (2 * 2 * PAIR)  # 4 leaves of 2 queries x 2 keys
    small_cross = 2 * (2 * (2 + 1) * PAIR + 2 * 2 * DV)  # 2 queries, block K = 2 of 2 keys, 1 sample, merge
    big_cross = 4 * (2 + 1) * PAIR + 2 * 4 * DV  # 4 queries, 4 keys in nb = 2 blocks of K = 2, 1 sample
    got = multiply_adds("hyperattention", 8, 8, D, DV, budget=3, block_size=2, sample_size=1, is_causal=True)
    assert got == leaves + small_cross + big_cross  # 312


def test_thinformer():
    # Nk = 20: standard thinning keeps n' = 16; subset 4 -> 2 halving rounds, first buckets 4 m^2 / n' = 4:
    # round 0: 16 points in buckets of 4 -> 16 x 4 kernel entries (7 each) + walk 16 x 4 / 4
    # round 1: 8 points in one bucket of 8 -> 8 x 8 entries + walk 8 x 8 / 4; then attention 3 x 4 pairs
    want = (16 * 4 * PAIR + 16) + (8 * 8 * PAIR + 16) + 3 * 4 * PAIR  # 1012
    assert multiply_adds("thinformer", 3, 20, D, DV, budget=4) == want
    assert multiply_adds("thinformer", 3, 20, D, DV, budget=20) == 3 * 20 * PAIR  # exact limit: every key


def test_kdeformer_is_the_cores_count():
    """value_norm: Nq = Nk = 8, bucket 4: 2 key blocks of Bk = 4 slots, 2 query blocks of 4; each query slot
    pays its block and s = 3 samples."""
    got = multiply_adds("kdeformer", 8, 8, D, DV, budget=7, bucket_size=4, sample_size=3, sampling="value_norm")
    assert got == 2 * 4 * (4 + 3) * PAIR == 392
    for kw in ({"sampling": "column_norm"}, {"is_causal": True}):
        assert multiply_adds("kdeformer", 8, 8, D, DV, budget=7, bucket_size=4, sample_size=3, **kw) == \
            core.kde_multiply_adds(8, 8, D, DV, bucket_size=4, sample_size=3, **kw)


def test_validation():
    with pytest.raises(ValueError, match="causal"):
        count("nystrom", budget=4, is_causal=True)
    with pytest.raises(ValueError, match="budget"):
        count("uniform", budget=None)
    with pytest.raises(ValueError, match="n_keys"):
        multiply_adds("exact", 3, 0, D, DV)
    with pytest.raises(ValueError, match="unknown option"):
        count("performer", budget=4, chunk_size=3)
    with pytest.raises(ValueError, match="method"):
        count("linformer", budget=4)
