"""exact_attention: the reference every approximation is measured against (SDPA equality, masks, causal
alignment, gradients, validation)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kdeformer


def test_equals_sdpa_with_masks(qkv):
    q, k, v = qkv(2, 3, nq=17, nk=29)
    mask = torch.rand(2, 1, 29, generator=torch.Generator().manual_seed(1)) > 0.3
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(-2))
    torch.testing.assert_close(kdeformer.exact_attention(q, k, v, key_mask=mask), want, rtol=1e-12, atol=1e-12)


def test_causal_is_bottom_right_aligned(qkv):
    q, k, v = qkv(2, nq=5, nk=9)
    allowed = torch.arange(9) <= torch.arange(5).unsqueeze(-1) + 4  # query i sees keys j <= 9 - 5 + i
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    torch.testing.assert_close(kdeformer.exact_attention(q, k, v, is_causal=True), want, rtol=1e-12, atol=1e-12)
    # square inputs: the same as SDPA's own is_causal (both alignments agree when Nq = Nk)
    q, k, v = qkv(2, nq=9, nk=9)
    torch.testing.assert_close(kdeformer.exact_attention(q, k, v, is_causal=True),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True), rtol=1e-12, atol=1e-12)


def test_queries_that_see_no_key_give_zero_rows(qkv):
    q, k, v = qkv(1, nq=6, nk=4)  # bottom-right: queries 0 and 1 see no key
    out, trace = kdeformer.exact_attention(q, k, v, is_causal=True, return_trace=True)
    assert float(out[0, :2].abs().max()) == 0.0 and bool(torch.isfinite(trace.attention_matrix()).all())
    qmask = torch.tensor([True, False, True, True, True, False])
    out = kdeformer.exact_attention(q, k, v, query_mask=qmask)
    assert float(out[0, ~qmask].abs().max()) == 0.0


def test_gradcheck_float64(qkv):
    q, k, v = (x.requires_grad_() for x in qkv(1, nq=5, nk=6, d=3, dv=2))
    mask = torch.tensor([True, True, False, True, True, True])
    for kwargs in ({}, {"key_mask": mask}, {"is_causal": True}):
        assert torch.autograd.gradcheck(lambda a, b, c: kdeformer.exact_attention(a, b, c, **kwargs), (q, k, v))


def test_gradients_match_sdpa_in_float32(qkv):
    q, k, v = (x.float().requires_grad_() for x in qkv(2, nq=11, nk=13))
    kdeformer.exact_attention(q, k, v).square().sum().backward()
    grads = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    F.scaled_dot_product_attention(q, k, v).square().sum().backward()
    for mine, theirs in zip(grads, (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)


def test_no_grad_and_grad_paths_agree(qkv):
    q, k, v = qkv(2, nq=30, nk=20)
    with torch.no_grad():
        fast = kdeformer.exact_attention(q, k, v)
    assert torch.equal(kdeformer.exact_attention(q.requires_grad_(), k, v).detach(), fast)


def test_validation(qkv):
    q, k, v = qkv(1, nq=4)
    with pytest.raises(ValueError, match="return_trace"):
        kdeformer.exact_attention(q, k, v, return_trace="yes")
    with pytest.raises(ValueError, match="is_causal"):
        kdeformer.exact_attention(q, k, v, is_causal="yes")
    with pytest.raises(ValueError, match="generator"):
        kdeformer.exact_attention(q, k, v, generator=123)
    kdeformer.exact_attention(q, k, v, bucket_size=8, sample_size=3)  # kde_attention's options are ignored
