"""kdeformer.hf: KDEformer registered as a transformers attention implementation."""
from __future__ import annotations


import pytest
import torch

pytest.importorskip("transformers")

import transformers as tf  # noqa: E402
from transformers import AutoModel  # noqa: E402
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask  # noqa: E402
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: E402

from kdeformer import hf  # noqa: E402
from kdeformer import sources as S  # noqa: E402

TEXTS = [
    "Hashing puts similar vectors into the same bucket.",
    "A transformer layer mixes information between tokens with attention. KDEformer keeps the largest "
    "attention weights exactly, inside blocks found by locality sensitive hashing, and estimates the "
    "remaining ones from a small random sample of key columns, each weighted so that the estimate is "
    "unbiased. Its error is measured in the spectral norm, which is what matters for the next layer. "
    "Sharp attention suits the blocks; near-uniform attention suits the sampling.",
]


@pytest.fixture(scope="module")
def tokenizer():
    return S.load_model(S.minilm_path())[1]


@pytest.fixture(scope="module")
def exact_model():
    return AutoModel.from_pretrained(S.minilm_path(), attn_implementation="sdpa").eval()


@pytest.fixture()
def kde_model():
    return AutoModel.from_pretrained(S.minilm_path(), attn_implementation="kdeformer").eval()


def encode(tokenizer, texts):
    return tokenizer(texts, padding=True, truncation=True, max_length=512, return_tensors="pt")


def run(model, enc):
    with torch.no_grad():
        return model(**enc).last_hidden_state


def mean_pool(hidden, mask):
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1)


# --------------------------------------------------------------------------- registration
def test_registered_under_kdeformer_and_idempotent():
    assert ALL_ATTENTION_FUNCTIONS[hf.NAME] is hf.kdeformer_attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS[hf.NAME] is sdpa_mask
    hf.register()
    hf.register()
    assert ALL_ATTENTION_FUNCTIONS[hf.NAME] is hf.kdeformer_attention_forward


def test_bert_in_this_transformers_uses_the_attention_interface():
    assert tf.BertModel._supports_attention_backend and tf.DistilBertModel._supports_attention_backend


# --------------------------------------------------------------------------- exactness and masks
def test_exact_settings_reproduce_exact_embeddings_with_padding(tokenizer, exact_model, kde_model):
    enc = encode(tokenizer, TEXTS)  # the short text is padded: the mask must be honoured
    n = enc["input_ids"].shape[1]
    hf.configure(kde_model, bucket_size=n)  # one block holding every key: exact attention
    exact, kde = run(exact_model, enc), run(kde_model, enc)
    valid = enc["attention_mask"].bool()
    torch.testing.assert_close(kde[valid], exact[valid], atol=2e-5, rtol=1e-4)
    cos = torch.cosine_similarity(mean_pool(kde, enc["attention_mask"]), mean_pool(exact, enc["attention_mask"]))
    assert cos.min() > 1 - 1e-6
    # The padded short text gives what it gives alone (no padding at all).
    alone = encode(tokenizer, TEXTS[:1])
    k_alone = alone["input_ids"].shape[1]
    torch.testing.assert_close(kde[0, :k_alone], run(kde_model, alone)[0], atol=2e-5, rtol=1e-4)


def test_a_dropped_mask_would_be_detected(tokenizer, kde_model):
    # Guard for the test above: ignoring the padding changes the short text's output a lot.
    enc = encode(tokenizer, TEXTS)
    hf.configure(kde_model, bucket_size=enc["input_ids"].shape[1])
    with_mask = run(kde_model, enc)
    no_mask = run(kde_model, {**enc, "attention_mask": torch.ones_like(enc["attention_mask"])})
    assert (with_mask[0, :5] - no_mask[0, :5]).abs().max() > 0.1


def test_approximate_settings_change_output_and_are_deterministic(tokenizer, exact_model, kde_model):
    enc = encode(tokenizer, TEXTS[1:])
    hf.configure(kde_model, bucket_size=8, sample_size=8)
    a, b = run(kde_model, enc), run(kde_model, enc)
    assert torch.equal(a, b)  # fresh seeded generator per call
    assert (a - run(exact_model, enc)).abs().max() > 1e-2
    with hf.settings(seed=1):
        c = run(kde_model, enc)
    assert not torch.equal(a, c)
    assert torch.equal(run(kde_model, enc), a)  # the context manager leaves the model's settings alone


def test_parameters_reach_the_kernel(tokenizer, kde_model, monkeypatch):
    calls = []
    real = hf.kde_attention

    def spy(query, key, value, **kwargs):
        calls.append({**kwargs, "shape": tuple(query.shape)})
        return real(query, key, value, **kwargs)

    monkeypatch.setattr(hf, "kde_attention", spy)
    enc = encode(tokenizer, TEXTS)
    hf.configure(kde_model, bucket_size=16, sample_size=24, num_projs=3, sampling="uniform", bucket_order="binary")
    run(kde_model, enc)
    assert len(calls) == 6
    n = enc["input_ids"].shape[1]
    for call in calls:
        assert call["bucket_size"] == 16 and call["sample_size"] == 24 and call["num_projs"] == 3
        assert call["sampling"] == "uniform" and call["bucket_order"] == "binary"
        assert call["scale"] == pytest.approx(32 ** -0.5)
        assert call["shape"] == (2, 12, n, 32)
        assert call["key_mask"].shape == (2, 1, n)
        assert torch.equal(call["key_mask"][:, 0], enc["attention_mask"].bool())
    assert len({c["generator"].initial_seed() for c in calls}) == 6  # one stream per layer
    calls.clear()
    with hf.settings(bucket_size=8, seed=None):
        run(kde_model, enc)
    assert all(c["bucket_size"] == 8 and c["sample_size"] == 24 and c["generator"] is None for c in calls)


def test_layers_setting_limits_kdeformer_to_some_layers(tokenizer, exact_model, kde_model, monkeypatch):
    calls = []
    real = hf.kde_attention
    monkeypatch.setattr(hf, "kde_attention", lambda *a, **k: calls.append(k["generator"].initial_seed()) or real(*a, **k))
    enc = encode(tokenizer, TEXTS)
    valid = enc["attention_mask"].bool()
    hf.configure(kde_model, bucket_size=8, sample_size=8)
    with hf.settings(layers=[]):  # no KDEformer layer: exact attention everywhere, padding honoured
        torch.testing.assert_close(run(kde_model, enc)[valid], run(exact_model, enc)[valid], atol=2e-5, rtol=1e-4)
    assert calls == []
    with hf.settings(layers=[4]):
        only4 = run(kde_model, enc)
    all_layers = run(kde_model, enc)
    assert len(calls) == 7 and calls[0] == calls[1 + 4]  # layer 4 alone, then all six, same layer-4 stream
    assert (only4 - run(exact_model, enc)).abs().max() > 1e-3
    assert (only4 - all_layers).abs().max() > 1e-3


def test_record_traces_of_every_layer(tokenizer, kde_model):
    enc = encode(tokenizer, TEXTS)
    n = enc["input_ids"].shape[1]
    hf.configure(kde_model, bucket_size=16, sample_size=16)
    plain = run(kde_model, enc)
    with hf.record_traces() as traces:
        traced = run(kde_model, enc)
    assert torch.equal(plain, traced)  # recording changes nothing
    assert [layer for layer, _ in traces] == sorted(layer for layer, _ in traces) and len(traces) == 6
    _, trace = traces[0]
    att = trace.attention_matrix()  # (B, H, N, N)
    assert att.shape == (2, 12, n, n)
    short = int(enc["attention_mask"][0].sum())
    assert float(att[0, :, :, short:].abs().max()) == 0.0  # padded keys get no weight


def test_use_kdeformer_switches_a_loaded_model(tokenizer):
    model = AutoModel.from_pretrained(S.minilm_path(), attn_implementation="eager").eval()
    hf.use_kdeformer(model, bucket_size=32)
    assert model.config._attn_implementation == "kdeformer"
    assert hf.get_settings(model.encoder.layer[0].attention.self)["bucket_size"] == 32
    model.set_attn_implementation("sdpa")
    assert model.config._attn_implementation == "sdpa"


def test_distilbert_exact_settings_match(tmp_path):
    torch.manual_seed(0)
    config = tf.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64)
    exact = tf.DistilBertModel(config).eval()
    ids = torch.randint(5, 1000, (2, 21), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    ref = exact(input_ids=ids, attention_mask=mask).last_hidden_state
    hf.use_kdeformer(exact, bucket_size=21)
    with torch.no_grad():
        got = exact(input_ids=ids, attention_mask=mask).last_hidden_state
    valid = mask.bool()
    torch.testing.assert_close(got[valid], ref.detach()[valid], atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- masks, unit level
def test_key_mask_from_padding_masks():
    pad = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    bool4 = sdpa_mask(batch_size=2, q_length=4, kv_length=4, mask_function=lambda b, h, q, k: q >= 0,
                      attention_mask=pad.bool())
    km = hf.key_mask_from_attention_mask(bool4, 2, 4, 4)
    assert km.shape == (2, 1, 4) and torch.equal(km[:, 0], pad.bool())
    float4 = torch.where(bool4, 0.0, torch.finfo(torch.float32).min)
    assert torch.equal(hf.key_mask_from_attention_mask(float4, 2, 4, 4), km)
    assert torch.equal(hf.key_mask_from_attention_mask(pad, 2, 4, 4)[:, 0], pad.bool())
    assert hf.key_mask_from_attention_mask(None, 2, 4, 4) is None


def test_key_mask_refuses_causal_and_bias_masks():
    causal = torch.ones(4, 4).tril().bool()[None, None]  # (1, 1, 4, 4)
    with pytest.raises(ValueError, match="causal masking is not supported"):
        hf.key_mask_from_attention_mask(causal, 1, 4, 4)
    bias = torch.zeros(1, 1, 4, 4)
    bias[..., 0] = 0.5
    with pytest.raises(ValueError, match="additive bias"):
        hf.key_mask_from_attention_mask(bias, 1, 4, 4)
    with pytest.raises(ValueError, match="attention_mask must be"):
        hf.key_mask_from_attention_mask(torch.ones(1, 1, 4, 5, dtype=torch.bool), 1, 4, 4)


# --------------------------------------------------------------------------- refusals and bad input
def test_causal_models_are_refused():
    torch.manual_seed(0)
    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    decoder = tf.BertModel(tf.BertConfig(**small, is_decoder=True)).eval()
    with pytest.raises(ValueError, match="causal"):
        hf.use_kdeformer(decoder)
    decoder.config._attn_implementation_internal = "kdeformer"  # forced past the check
    with pytest.raises(ValueError, match="causal masking"):
        decoder(input_ids=torch.tensor([[5, 6, 7]]))
    gpt2 = tf.GPT2Model(tf.GPT2Config(n_embd=32, n_layer=1, n_head=4, n_positions=16))
    with pytest.raises(ValueError, match="causal"):
        hf.use_kdeformer(gpt2)


def test_models_without_the_attention_interface_are_refused():
    deberta = tf.DebertaV2Model(tf.DebertaV2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                                   intermediate_size=64, vocab_size=100))
    with pytest.raises(ValueError, match="AttentionInterface"):
        hf.use_kdeformer(deberta)


@pytest.mark.parametrize("params, match", [
    ({"bucket_size": 0}, "bucket_size"), ({"sample_size": 1.5}, "sample_size"), ({"num_projs": 17}, "num_projs"),
    ({"sampling": "magic"}, "sampling"), ({"seed": -3}, "seed"), ({"bukket_size": 3}, "unknown"),
    ({"layers": 3}, "layers"), ({"layers": [0, -1]}, "layers"),
])
def test_bad_settings(kde_model, params, match):
    with pytest.raises(ValueError, match=match):
        hf.configure(kde_model, **params)
    with pytest.raises(ValueError, match=match):
        with hf.settings(**params):
            pass


def test_training_mode_warns_that_dropout_is_not_applied(tokenizer, kde_model, monkeypatch):
    monkeypatch.setattr(hf, "_warned_dropout", False)
    kde_model.train()
    with pytest.warns(UserWarning, match="dropout"):
        kde_model(**encode(tokenizer, TEXTS[:1]))
    kde_model.eval()


# --------------------------------------------------------------------------- the fidelity benchmark's helpers
def test_fidelity_documents_and_metrics(tokenizer):
    from benchmarks import fidelity

    paragraphs = S.corpus()
    texts, members = fidelity.build_documents(tokenizer, paragraphs, 4, 256, seed=0)
    for text, member in zip(texts, members):
        n = len(tokenizer(text, truncation=False)["input_ids"])
        assert 256 <= n <= 512 and all(paragraphs[i] in text for i in member)
    gen = torch.Generator().manual_seed(0)
    docs = torch.nn.functional.normalize(torch.randn(6, 8, generator=gen, dtype=torch.float64), dim=-1)
    queries = docs[[0, 2]]
    same = fidelity.compare(docs, docs, queries, [{0}, {9}, {1}, {9}, {9}, {9}])
    assert same == {"cos_mean": pytest.approx(1.0), "cos_min": pytest.approx(1.0), "nn_top1": 1.0,
                    "nn_recall5": 1.0, "q_top1": 1.0, "q_hit1": 1.0}
    flipped = fidelity.compare(docs, -docs, queries, [{0}, {9}, {1}, {9}, {9}, {9}])
    assert flipped["cos_mean"] == pytest.approx(-1.0) and flipped["q_top1"] == 0.0 and flipped["q_hit1"] == 0.0
