"""The peer methods behind kdeformer.methods.approximate: exact limits, statistics, masks, dtypes, errors."""
from __future__ import annotations

import math

import pytest
import torch

import kdeformer
from kdeformer.methods import METHODS, approximate, split_budget

NAMES = ["exact", "kdeformer", "performer", "reformer", "scatterbrain", "nystrom", "hyperattention", "uniform"]
APPROX = [n for n in NAMES if n != "exact"]
RANDOM = [n for n in APPROX if METHODS[n].random]
# budgets at which a method computes every (unmasked) key exactly, for Nk <= 64
EXACT_LIMIT = {
    "kdeformer": dict(budget=2, bucket_size=64, sample_size=1),
    "hyperattention": dict(budget=2, block_size=64, sample_size=1),
    "reformer": dict(budget=2, chunk_size=64),
    "scatterbrain": dict(budget=2, block_size=64, num_features=4),
}


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def qkv(lead=(2, 3), n_q=37, n_k=45, d=16, dv=8, dtype=torch.float64, seed=0, spread=1.0):
    g = gen(seed)
    q = torch.randn(*lead, n_q, d, generator=g, dtype=torch.float64) * spread
    k = torch.randn(*lead, n_k, d, generator=g, dtype=torch.float64) * spread
    v = torch.randn(*lead, n_k, dv, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def rel_err(a, b):
    return float(kdeformer.relative_spectral_error(a.double(), b.double()))


# --------------------------------------------------------------------------- registry
def test_registry_names_and_fields():
    assert list(METHODS) == NAMES
    for name, info in METHODS.items():
        assert info.name == name and info.label and callable(info.fn) and info.doc
        assert info.supports_cross and info.supports_mask


def test_split_budget_conventions():
    assert split_budget("kdeformer", 192) == {"bucket_size": 64, "sample_size": 128}
    assert split_budget("hyperattention", 192) == {"block_size": 64, "sample_size": 128, "num_projs": 7}
    assert split_budget("performer", 128)["num_features"] == 128
    assert split_budget("scatterbrain", 128)["block_size"] == 64
    assert split_budget("scatterbrain", 128)["num_features"] == 64
    assert split_budget("reformer", 128) == {"chunk_size": 32, "num_rounds": 2, "shared_qk": False}
    assert split_budget("reformer", 128, num_rounds=4)["chunk_size"] == 16
    assert split_budget("nystrom", 64)["num_landmarks"] == 64
    assert split_budget("uniform", 50) == {"sample_size": 50}
    assert split_budget("exact", None) == {}
    # overrides and pass-through of kde_attention's own options
    assert split_budget("kdeformer", 96, bucket_size=32, sampling="uniform") == {
        "bucket_size": 32, "sample_size": 64, "sampling": "uniform"}
    for name in APPROX:  # every split spends at most the budget plus rounding of tiny parts
        parts = split_budget(name, 90)
        spent = {"kdeformer": lambda p: p["bucket_size"] + p["sample_size"],
                 "hyperattention": lambda p: p["block_size"] + p["sample_size"],
                 "performer": lambda p: p["num_features"], "nystrom": lambda p: p["num_landmarks"],
                 "scatterbrain": lambda p: p["block_size"] + p["num_features"],
                 "reformer": lambda p: 2 * p["chunk_size"] * p["num_rounds"],
                 "uniform": lambda p: p["sample_size"]}[name](parts)
        assert 88 <= spent <= 90, (name, parts)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, None, "64"])
def test_bad_budget(bad):
    q, k, v = qkv(lead=(1,), n_q=8, n_k=8)
    with pytest.raises(ValueError, match="budget"):
        approximate("performer", q, k, v, budget=bad)


def test_bad_method_and_options():
    q, k, v = qkv(lead=(1,), n_q=8, n_k=8)
    with pytest.raises(ValueError, match="method must be one of"):
        approximate("linformer", q, k, v, budget=8)
    with pytest.raises(ValueError, match="unknown option"):
        approximate("nystrom", q, k, v, budget=8, num_features=3)
    with pytest.raises(ValueError, match="num_buckets"):
        approximate("reformer", q, k, v, budget=8, num_buckets=5)
    with pytest.raises(ValueError, match="pinv"):
        approximate("nystrom", q, k, v, budget=8, pinv="svd")
    with pytest.raises(ValueError, match="block_fraction"):
        approximate("hyperattention", q, k, v, budget=8, block_fraction=1.5)
    with pytest.raises(ValueError, match="num_projs"):
        approximate("hyperattention", q, k, v, budget=8, num_projs=17)
    with pytest.raises(ValueError, match="shared_qk"):
        approximate("reformer", q, k, v, budget=8, shared_qk=True)
    with pytest.raises(ValueError, match="NaN"):
        approximate("uniform", q.clone().fill_(float("nan")), k, v, budget=8)
    with pytest.raises(ValueError, match="leading"):
        approximate("performer", q, k.expand(2, 8, 16), v.expand(2, 8, 8), budget=8)
    with pytest.raises(ValueError, match="at least one True"):
        approximate("nystrom", q, k, v, budget=8, key_mask=torch.zeros(1, 8, dtype=torch.bool))


# --------------------------------------------------------------------------- exact limits
@pytest.mark.parametrize("name", list(EXACT_LIMIT))
def test_exact_limit_cross_attention_odd_lengths(name):
    q, k, v = qkv()  # Nq = 37, Nk = 45, neither a multiple of anything
    want = kdeformer.exact_attention(q, k, v)
    out = approximate(name, q, k, v, generator=gen(1), **EXACT_LIMIT[name])
    assert out.shape == (2, 3, 37, 8)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", list(EXACT_LIMIT))
def test_huge_budget_through_the_default_split_is_exact(name):
    q, k, v = qkv(lead=(2,), n_q=21, n_k=30)
    out = approximate(name, q, k, v, budget=4 * 30, generator=gen(0))
    torch.testing.assert_close(out, kdeformer.exact_attention(q, k, v), rtol=1e-10, atol=1e-10)


def test_nystrom_with_all_tokens_as_landmarks_is_exact():
    q, k, v = qkv(lead=(2,), n_q=24, n_k=24)
    want = kdeformer.exact_attention(q, k, v)
    torch.testing.assert_close(approximate("nystrom", q, k, v, budget=24, pinv="exact"), want, rtol=1e-9, atol=1e-9)
    # the iterative pseudo-inverse converges to the same: 6 steps are close, 25 are exact
    assert rel_err(approximate("nystrom", q, k, v, budget=24), want) < 0.1
    torch.testing.assert_close(approximate("nystrom", q, k, v, budget=24, pinv_iterations=25), want,
                               rtol=1e-8, atol=1e-8)


def test_nystrom_segment_means_and_pinv():
    from kdeformer.methods.nystrom import iterative_pinv, segment_means

    x = torch.arange(10.0, dtype=torch.float64).view(1, 10, 1)
    # 10 rows in 4 segments: [0,2) [2,5) [5,7) [7,10)
    assert segment_means(x, torch.tensor([10]), 4).flatten().tolist() == [0.5, 3.0, 5.5, 8.0]
    # only the first 3 rows count, 4 segments: never empty, [0,1) [0,1) [1,2) [2,3)
    assert segment_means(x, torch.tensor([3]), 4).flatten().tolist() == [0.0, 0.0, 1.0, 2.0]
    a = torch.softmax(torch.randn(3, 6, 6, generator=gen(0), dtype=torch.float64), -1)
    torch.testing.assert_close(iterative_pinv(a, 40), torch.linalg.inv(a), rtol=1e-7, atol=1e-7)


def test_reformer_shared_qk_matches_its_definition():
    """One chunk: softmax over unit-normalised keys with self excluded (the paper's shared-QK model)."""
    q, _, v = qkv(lead=(2,), n_q=20, n_k=20)
    out = approximate("reformer", q, q, v, budget=2, chunk_size=64, shared_qk=True, generator=gen(0))
    k_hat = q / q.norm(dim=-1, keepdim=True)
    logits = (q @ k_hat.mT) / 4.0
    logits = logits.masked_fill(torch.eye(20, dtype=torch.bool), float("-inf"))
    torch.testing.assert_close(out, torch.softmax(logits, -1) @ v, rtol=1e-10, atol=1e-10)
    # a query whose chunks hold only itself attends to itself
    out1 = approximate("reformer", q[:, :1], q[:, :1], v[:, :1], budget=2, shared_qk=True)
    torch.testing.assert_close(out1, v[:, :1])


# --------------------------------------------------------------------------- statistics
def replicate(x, copies):
    return x.expand(copies, *x.shape[1:])


@pytest.mark.parametrize("name,options", [("uniform", dict(budget=5)),
                                          ("hyperattention", dict(budget=9, block_size=4)),
                                          ("performer", dict(budget=16))])
def test_normaliser_is_unbiased(name, options):
    """Mean of D~ over 4000 independent heads is within 4 standard errors of the exact D."""
    q, k, v = qkv(lead=(1,), n_q=6, n_k=30, d=8, spread=0.6, seed=3)
    copies = 4000
    _, trace = approximate(name, replicate(q, copies), replicate(k, copies), replicate(v, copies),
                           generator=gen(7), return_trace=True, **options)
    _, exact = kdeformer.exact_attention(q, k, v, return_trace=True)
    ratio = torch.exp(trace.log_normalizer - exact.log_normalizer)  # (copies, Nq): D~ / D
    mean, sem = ratio.mean(0), ratio.std(0) / math.sqrt(copies)
    assert bool(((mean - 1).abs() < 4 * sem + 1e-12).all()), (mean, sem)
    assert float(ratio.std(0).min()) > 1e-3  # really random


def test_uniform_numerator_is_unbiased():
    q, k, v = qkv(lead=(1,), n_q=5, n_k=25, d=8, seed=4)
    copies = 4000
    out, trace = approximate("uniform", replicate(q, copies), replicate(k, copies), replicate(v, copies),
                             budget=4, generator=gen(2), return_trace=True)
    numerator = out * trace.log_normalizer.exp().unsqueeze(-1)  # N~ = D~ out
    want = torch.exp(q @ k.mT / math.sqrt(8)) @ v  # (1, Nq, Dv)
    mean, sem = numerator.mean(0), numerator.std(0) / math.sqrt(copies)
    assert bool(((mean - want[0]).abs() < 4 * sem).all())


def test_performer_error_falls_with_features():
    q, k, v = qkv(lead=(8,), n_q=40, n_k=40, d=8, spread=0.7, seed=5)
    want = kdeformer.exact_attention(q, k, v)
    err = {m: sum(rel_err(approximate("performer", q, k, v, budget=m, generator=gen(s)), want) for s in range(3)) / 3
           for m in (64, 8192)}  # Monte-Carlo error ~ m^-1/2: 11x smaller in theory, ask for 2.5x
    assert err[8192] < err[64] / 2.5, err
    assert err[8192] < 0.15, err


def test_more_budget_helps_every_random_method():
    q, k, v = qkv(lead=(6,), n_q=64, n_k=64, d=8, seed=6)
    want = kdeformer.exact_attention(q, k, v)
    for name in ("kdeformer", "hyperattention", "uniform", "reformer", "scatterbrain", "nystrom"):
        small = rel_err(approximate(name, q, k, v, budget=8, generator=gen(1)), want)
        large = rel_err(approximate(name, q, k, v, budget=48, generator=gen(1)), want)
        assert large < small, (name, small, large)


# --------------------------------------------------------------------------- traces
@pytest.mark.parametrize("name", APPROX)
def test_trace_matrix_reproduces_output(name):
    q, k, v = qkv(lead=(2,), n_q=19, n_k=27)
    mask = torch.ones(2, 27, dtype=torch.bool)
    mask[0, 20:] = False
    out, trace = approximate(name, q, k, v, budget=12, key_mask=mask, generator=gen(3), return_trace=True)
    matrix = trace.attention_matrix()
    assert matrix.shape == (2, 19, 27)
    torch.testing.assert_close(matrix @ v, out, rtol=1e-9, atol=1e-9)
    assert float(matrix[0, :, 20:].abs().max()) == 0.0  # masked columns carry nothing
    if name != "nystrom":  # every other method divides by its own normaliser: rows sum to one
        torch.testing.assert_close(matrix.sum(-1), torch.ones(2, 19, dtype=torch.float64))
        assert trace.log_normalizer.shape == (2, 19)
    else:
        assert trace.log_normalizer is None and trace.landmarks[1].shape == (2, 12, 16)


def test_trace_contents():
    q, k, v = qkv(lead=(2,), n_q=30, n_k=30)
    _, t = approximate("hyperattention", q, k, v, budget=30, generator=gen(0), return_trace=True)
    assert t.sampled.shape == (2, 20) and t.q_buckets.shape == (2, 30) and t.q_blocks.max() == 2
    _, t = approximate("reformer", q, k, v, budget=24, num_rounds=3, generator=gen(0), return_trace=True)
    assert t.q_buckets.shape == (2, 3, 30) and t.params["chunk_size"] == 4
    _, t = approximate("performer", q, k, v, budget=10, generator=gen(0), return_trace=True)
    assert t.features[0].shape == (2, 30, 10) and float(t.features[0].amax(-1).min()) == 1.0
    _, t = approximate("uniform", q, k, v, budget=7, generator=gen(0), return_trace=True)
    assert t.sampled.shape == (2, 7)


# --------------------------------------------------------------------------- masks
@pytest.mark.parametrize("name", NAMES)
def test_masked_keys_have_no_influence(name):
    """Changing masked keys and values (to huge values) leaves the output unchanged, same seed."""
    q, k, v = qkv(lead=(2, 2), n_q=21, n_k=33)
    mask = torch.rand(2, 2, 33, generator=gen(9)) > 0.4
    k2, v2 = k.clone(), v.clone()
    k2[~mask] = 50.0
    v2[~mask] = 1e6
    a = approximate(name, q, k, v, budget=10, key_mask=mask, generator=gen(4))
    b = approximate(name, q, k2, v2, budget=10, key_mask=mask, generator=gen(4))
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["exact", *EXACT_LIMIT])
def test_padded_batch_matches_unpadded_exact(name):
    q, k, v = qkv(lead=(3,), n_q=17, n_k=40)
    lengths = [40, 23, 9]
    mask = torch.arange(40) < torch.tensor(lengths).unsqueeze(-1)  # (3, 40)
    out = approximate(name, q, k, v, key_mask=mask, generator=gen(0), **EXACT_LIMIT.get(name, dict(budget=8)))
    for b, n in enumerate(lengths):
        torch.testing.assert_close(out[b], kdeformer.exact_attention(q[b], k[b, :n], v[b, :n]), rtol=1e-10, atol=1e-10)


def test_nystrom_landmarks_use_unmasked_keys_only():
    q, k, v = qkv(lead=(1,), n_q=20, n_k=30)
    mask = torch.arange(30) < 18
    a = approximate("nystrom", q, k, v, budget=6, key_mask=mask)
    b = approximate("nystrom", q, k[:, :18], v[:, :18], budget=6)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_broadcast_mask_and_one_batch_item_perturbed():
    q, k, v = qkv(lead=(2, 3), n_q=16, n_k=16)
    mask = (torch.arange(16) < 12).view(1, 1, 16).expand(2, 1, 16)
    for name in APPROX:
        a = approximate(name, q, k, v, budget=8, key_mask=mask, generator=gen(0))
        k2 = k.clone()
        k2[1] += 1.0  # batch items are independent: item 0 must not move
        b = approximate(name, q, k2, v, budget=8, key_mask=mask, generator=gen(0))
        if METHODS[name].random:  # same draws for item 0 when item 0's inputs are equal
            torch.testing.assert_close(a[0], b[0], rtol=1e-12, atol=1e-12)
        else:
            torch.testing.assert_close(a[0], b[0])


# --------------------------------------------------------------------------- determinism, shapes, dtypes
@pytest.mark.parametrize("name", RANDOM)
def test_deterministic_for_a_generator(name):
    q, k, v = qkv(lead=(2,), n_q=33, n_k=33)
    a = approximate(name, q, k, v, budget=12, generator=gen(11))
    b = approximate(name, q, k, v, budget=12, generator=gen(11))
    c = approximate(name, q, k, v, budget=12, generator=gen(12))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("name", APPROX)
def test_shapes_and_tiny_inputs(name):
    for n_q, n_k, lead in ((1, 1, ()), (3, 1, (1,)), (5, 2, (2, 1, 2)), (50, 7, (1,))):
        q, k, v = qkv(lead=lead, n_q=n_q, n_k=n_k, dv=5)
        out = approximate(name, q, k, v, budget=6, generator=gen(0))
        assert out.shape == (*lead, n_q, 5) and bool(torch.isfinite(out).all())
        if n_k == 1:  # one key: every method returns its value row
            torch.testing.assert_close(out, v.expand_as(out))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_half_and_single_precision_at_huge_logits(dtype):
    """Logits up to ~1e3: no overflow; exact-limit methods match float64 exact attention closely."""
    q, k, v = qkv(lead=(2,), n_q=20, n_k=24, d=16, spread=8.0, seed=8)
    want = kdeformer.exact_attention(q, k, v)
    qh, kh, vh = q.to(dtype), k.to(dtype), v.to(dtype)
    tol = {torch.float16: 0.02, torch.bfloat16: 0.1, torch.float32: 1e-4}[dtype]
    for name in APPROX:
        out = approximate(name, qh, kh, vh, budget=12, generator=gen(0))
        assert out.dtype == dtype and bool(torch.isfinite(out).all()), name
    ref = kdeformer.exact_attention(qh, kh, vh).double()  # the same rounding of the inputs
    for name, opts in EXACT_LIMIT.items():
        out = approximate(name, qh, kh, vh, generator=gen(0), **opts)
        assert rel_err(out, ref) < tol, name
    assert rel_err(ref, want) < 3 * tol


def test_negative_and_zero_scale():
    q, k, v = qkv(lead=(1,), n_q=12, n_k=12)
    for s in (-0.5, 0.0):
        want = kdeformer.exact_attention(q, k, v, scale=s)
        for name, opts in EXACT_LIMIT.items():
            torch.testing.assert_close(approximate(name, q, k, v, scale=s, generator=gen(0), **opts), want)


# --------------------------------------------------------------------------- the benchmark harness
def test_peers_harness_tiny_mode(tmp_path):
    import json

    from benchmarks import peers

    results = tmp_path / "RESULTS.md"
    assert peers.main(["--tiny", "--results", str(results), "--plots", str(tmp_path / "plots"),
                       "--json", str(tmp_path / "r.json")]) == 0
    text = results.read_text()
    assert "<!-- BEGIN peers -->" in text and "<!-- END peers -->" in text
    labels = [e.label for e in peers.entries()]
    from kdeformer import core

    assert [e.options["sampling"] for e in peers.entries() if e.method == "kdeformer"] == list(core.SAMPLINGS)
    assert "KDEformer (value_norm)" in labels and len(labels) == len(set(labels))
    for label in labels + ["torch SDPA (exact)"]:
        assert f"| {label} |" in text
    data = json.loads((tmp_path / "r.json").read_text())
    assert {r["entry"] for r in data["accuracy"]} == {e.key for e in peers.entries()} | {"sdpa"}
    assert all(math.isfinite(r["rel"]) and r["rel"] >= 0 for r in data["accuracy"])
    assert {r["n"] for r in data["speed"]} == set(peers.TINY.speed_ns)
    for name in ("peers_accuracy.html", "peers_pareto.html", "peers_speed.html"):
        html = (tmp_path / "plots" / name).read_text()
        assert 'src="plotly.min.js"' in html and "cdn.plot.ly" not in html
    assert (tmp_path / "plots" / "plotly.min.js").stat().st_size > 1_000_000


def test_peak_memory_sees_a_large_allocation():
    from benchmarks.peers import peak_memory_mib

    seconds, mib = peak_memory_mib(lambda: torch.ones(64 * 2**20 // 4).sum(), torch.device("cpu"))  # 64 MiB
    assert seconds > 0
    if mib is None:
        pytest.skip("/proc/self/clear_refs not writable here")
    assert 56 <= mib <= 200


@pytest.mark.parametrize("name", RANDOM)
def test_same_random_draws_in_every_dtype(name):
    """One generator state gives the same hashes, features and samples in float64 and float32."""
    q, k, v = qkv(lead=(2,), n_q=30, n_k=30, d=8, spread=0.5)
    a = approximate(name, q, k, v, budget=12, generator=gen(5))
    b = approximate(name, q.float(), k.float(), v.float(), budget=12, generator=gen(5))
    assert rel_err(b, a) < 1e-4


def test_angular_buckets_are_the_argmax_over_plus_and_minus_projections():
    from kdeformer.methods._lsh import angular_buckets

    x = torch.randn(3, 200, 16, generator=gen(1))
    rotation = torch.randn(3, 16, 5, generator=gen(2))
    rotated = x @ rotation
    assert torch.equal(angular_buckets(x, rotation), torch.cat([rotated, -rotated], -1).argmax(-1))
    assert int(angular_buckets(-x, rotation)[0, 0]) == (int(angular_buckets(x, rotation)[0, 0]) + 5) % 10


def test_blocks_cut_queries_and_keys_alike():
    """Self-attention: query block t holds exactly the tokens of key block t, for any N and block count."""
    from kdeformer.methods._lsh import make_blocks

    for n, nb in ((8192, 745), (37, 5), (10, 10), (7, 12), (100, 3)):
        order = torch.randperm(n, generator=gen(n)).unsqueeze(0)  # (1, N): same order for both sides
        b = make_blocks(order, order, torch.tensor([n]), nb)
        assert sorted(b.q_flat[0].tolist()) == sorted(set(b.q_flat[0].tolist()))  # one slot per query
        # a query's block is the key block of the same token
        key_block = torch.full((n,), -1)
        for t in range(nb):
            for s in range(int(b.k_start[0, t]), int(b.k_end[0, t])):
                key_block[order[0, s]] = t if key_block[order[0, s]] < 0 else key_block[order[0, s]]
        if n >= nb:
            assert torch.equal(b.q_block[0], key_block)
        # the slot recorded for each query token holds that token
        assert torch.equal(b.q_index[0].flatten()[b.q_flat[0]], torch.arange(n))
