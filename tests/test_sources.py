"""kdeformer.sources: MiniLM / local encoder capture, GloVe, synthetic data, caching, bad input."""
from __future__ import annotations

import math
import shutil
import socket
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from kdeformer import sources as S  # noqa: E402

SHORT_TEXT = (
    "Attention compares every query with every key. KDEformer finds the large entries with hashing, "
    "computes them exactly inside small blocks, and estimates the rest by sampling a few key columns, "
    "so the cost grows almost linearly with the length of the text instead of with its square."
)


# --------------------------------------------------------------------------- helpers
def softmax_probs(src: S.AttentionSource) -> torch.Tensor:
    """softmax(scale * Q K^T) of every layer and head, float64.  # (L, H, N, N)"""
    logits = (src.q.double() @ src.k.double().transpose(-1, -2)) * src.scale
    return torch.softmax(logits.masked_fill(~src.allowed(), float("-inf")), dim=-1)


def model_attentions_and_contexts(model, projections, inputs):
    """The model's own attention probabilities (eager) and each attention module's context output."""
    contexts = {}
    handles = [
        p.module.register_forward_hook(lambda m, a, out, i=i: contexts.__setitem__(i, out[0].detach()))
        for i, p in enumerate(projections)
    ]
    try:
        with torch.no_grad():
            out = model(**inputs, output_attentions=True)
    finally:
        for h in handles:
            h.remove()
    probs = torch.stack([a[0] for a in out.attentions])  # (L, H, N, N)
    ctx = torch.stack([contexts[i][0] for i in range(len(projections))])  # (L, N, H * D)
    return probs, ctx


def tiny_model_dir(tmp_path: Path, kind: str) -> Path:
    """Save a small randomly initialised model of `kind` (with MiniLM's tokenizer files) to a folder."""
    import transformers as tf

    torch.manual_seed(0)
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    if kind == "bert":
        model = tf.BertModel(tf.BertConfig(**common, max_position_embeddings=128))
    elif kind == "roberta":
        model = tf.RobertaModel(tf.RobertaConfig(**common, max_position_embeddings=66, pad_token_id=1))
    elif kind == "distilbert":
        model = tf.DistilBertModel(tf.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64))
    elif kind == "electra":
        model = tf.ElectraModel(tf.ElectraConfig(embedding_size=16, **common))
    elif kind == "vit":
        model = tf.ViTModel(tf.ViTConfig(**common, image_size=32, patch_size=8), add_pooling_layer=False)
    elif kind == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64))
    elif kind == "bert-decoder":
        model = tf.BertModel(tf.BertConfig(**common, is_decoder=True))
    else:
        raise AssertionError(kind)
    folder = tmp_path / kind
    model.save_pretrained(folder)
    if kind not in ("vit",):
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            shutil.copy(S.minilm_path() / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {k: tiny_model_dir(root, k) for k in ("bert", "roberta", "distilbert", "electra", "vit", "gpt2", "bert-decoder")}


# --------------------------------------------------------------------------- shipped texts
def test_default_text_is_long_real_prose():
    model, tok = S.load_model(S.minilm_path())
    text = S.default_text()
    n = len(tok(text, truncation=False)["input_ids"])
    assert n >= 600
    assert "KDEformer" in text and "attention" in text


def test_corpus_has_many_paragraphs():
    paras = S.corpus()
    assert len(paras) >= 40
    assert all(len(p.split()) >= 25 for p in paras)
    assert len(set(paras)) == len(paras)


# --------------------------------------------------------------------------- MiniLM
def test_minilm_default_shapes_scale_tokens_and_cache():
    src = S.minilm()
    assert (src.num_layers, src.num_heads, src.num_tokens, src.head_dim) == (6, 12, 512, 32)
    assert src.q.dtype == src.k.dtype == src.v.dtype == torch.float32
    assert src.scale == pytest.approx(32 ** -0.5)
    assert src.tokens[0] == "[CLS]" and src.tokens[-1] == "[SEP]" and len(src.tokens) == 512
    assert src.meta["truncated"] and src.meta["full_num_tokens"] >= 600
    assert src.key_mask is None
    assert S.minilm() is src  # cached: a slider never re-runs the model
    q, k, v = src.head(5, 11)
    assert q.shape == k.shape == v.shape == (512, 32)
    assert torch.equal(v, src.v[5, 11])


def test_minilm_capture_matches_model_attention_every_layer_and_head():
    src = S.minilm(SHORT_TEXT)
    model, tok = S.load_model(S.minilm_path())
    projections = S.find_attention_projections(model)
    enc = tok(SHORT_TEXT, return_tensors="pt", truncation=False, padding=False)
    assert enc["input_ids"].shape[1] == src.num_tokens
    probs, ctx = model_attentions_and_contexts(model, projections, dict(enc))
    mine = softmax_probs(src)
    assert probs.shape == mine.shape == (6, 12, src.num_tokens, src.num_tokens)
    torch.testing.assert_close(mine, probs.double(), atol=1e-5, rtol=0)
    # V is right too: softmax(QK^T) V equals each attention module's context output.
    out = (mine @ src.v.double()).transpose(1, 2).reshape(6, src.num_tokens, -1)  # (L, N, H * D)
    torch.testing.assert_close(out, ctx.double(), atol=1e-4, rtol=1e-4)


def test_minilm_truncates_user_text_with_a_warning_and_max_tokens():
    long_text = " ".join([SHORT_TEXT] * 3)
    with pytest.warns(UserWarning, match="cut to the first 40"):
        src = S.minilm(long_text, max_tokens=40)
    assert src.num_tokens == 40 and src.tokens[-1] == "[SEP]" and src.meta["truncated"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        short = S.minilm(SHORT_TEXT)
    assert not short.meta["truncated"] and short.num_tokens == short.meta["full_num_tokens"] < 100


def test_minilm_reads_a_text_file(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text(SHORT_TEXT)
    src = S.minilm(f)
    assert src.text == SHORT_TEXT
    assert torch.equal(src.q, S.minilm(SHORT_TEXT).q)


@pytest.mark.parametrize("text", ["", "   \n\t"])
def test_minilm_refuses_empty_text(text):
    with pytest.raises(ValueError, match="text is empty"):
        S.minilm(text)


@pytest.mark.parametrize("bad", [1, 0, 513, 2.5, True])
def test_minilm_refuses_bad_max_tokens(bad):
    with pytest.raises(ValueError, match="max_tokens"):
        S.minilm(SHORT_TEXT, max_tokens=bad)


def test_minilm_refuses_non_text():
    with pytest.raises(ValueError, match="text must be"):
        S.minilm(123)


@pytest.mark.filterwarnings("ignore:text has")
def test_disk_cache_round_trip_without_running_the_model(tmp_path, monkeypatch):
    first = S.minilm(SHORT_TEXT, max_tokens=32, cache_dir=tmp_path)
    files = list(tmp_path.glob("source-*.pt"))
    assert len(files) == 1
    S.clear_cache()
    monkeypatch.setattr(S.pretrained, "_capture", lambda *a, **k: pytest.fail("the model ran despite the disk cache"))
    second = S.minilm(SHORT_TEXT, max_tokens=32, cache_dir=tmp_path)
    assert second is not first
    assert torch.equal(second.q, first.q) and torch.equal(second.v, first.v)
    assert second.tokens == first.tokens and second.scale == first.scale and second.meta == first.meta


@pytest.mark.filterwarnings("ignore:text has")
def test_loads_offline_without_network(monkeypatch):
    S.clear_cache()

    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    src = S.minilm(SHORT_TEXT, max_tokens=24)
    assert src.num_tokens == 24


# --------------------------------------------------------------------------- other encoders
@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert", "electra"])
def test_from_pretrained_capture_matches_model_attention(tiny_dirs, kind):
    src = S.from_pretrained(tiny_dirs[kind], SHORT_TEXT)
    assert (src.num_layers, src.num_heads, src.head_dim) == (2, 4, 8)
    assert src.scale == pytest.approx(8 ** -0.5)
    model, tok = S.load_model(tiny_dirs[kind])
    enc = tok(SHORT_TEXT, return_tensors="pt", truncation=False, padding=False)
    if kind == "distilbert":
        enc.pop("token_type_ids", None)
    probs, ctx = model_attentions_and_contexts(model, S.find_attention_projections(model), dict(enc))
    mine = softmax_probs(src)
    torch.testing.assert_close(mine, probs.double(), atol=1e-5, rtol=0)
    out = (mine @ src.v.double()).transpose(1, 2).reshape(2, src.num_tokens, -1)  # (L, N, H * D)
    if kind == "distilbert":  # its attention module also applies the output projection
        lins = [p.module.out_lin for p in S.find_attention_projections(model)]
        out = torch.stack([torch.nn.functional.linear(o, lin.weight.double(), lin.bias.double()) for o, lin in zip(out, lins)])
    torch.testing.assert_close(out, ctx.double(), atol=1e-5, rtol=1e-4)


def test_from_pretrained_roberta_limit_counts_the_position_offset(tiny_dirs):
    with pytest.warns(UserWarning, match="cut to the first 64"):
        src = S.from_pretrained(tiny_dirs["roberta"], " ".join([SHORT_TEXT] * 3))
    assert src.num_tokens == 64 and src.meta["position_limit"] == 64  # 66 positions - (pad id 1 + 1)


def test_from_pretrained_vit_with_pixel_inputs(tiny_dirs):
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    src = S.from_pretrained(tiny_dirs["vit"], inputs={"pixel_values": pixels})
    assert (src.num_layers, src.num_heads, src.num_tokens, src.head_dim) == (2, 4, 17, 8)
    assert src.tokens[0] == "[CLS]" and src.tokens[-1] == "patch 15"
    model, _ = S.load_model(tiny_dirs["vit"])
    probs, _ = model_attentions_and_contexts(model, S.find_attention_projections(model), {"pixel_values": pixels})
    torch.testing.assert_close(softmax_probs(src), probs.double(), atol=1e-5, rtol=0)


def test_from_pretrained_without_tokenizer_needs_inputs(tiny_dirs):
    with pytest.raises(ValueError, match="has no tokenizer"):
        S.from_pretrained(tiny_dirs["vit"], SHORT_TEXT)


@pytest.fixture(scope="module")
def tiny_decoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("decoders")
    return {arch: S.tiny_decoder(root / arch, arch) for arch in S.TINY_ARCHS}


@pytest.mark.parametrize("arch", S.TINY_ARCHS)
def test_from_pretrained_captures_decoders_with_their_causal_mask(tiny_decoders, arch):
    text = S.corpus()[2]
    src = S.from_pretrained(tiny_decoders[arch], text)
    assert src.is_causal and "causal" in repr(src)
    assert (src.num_layers, src.num_heads, src.head_dim) == (2, 4, 8)  # Llama's 2 key/value heads repeated
    assert src.scale == pytest.approx(8 ** -0.5) and src.meta["capture"] == "attention function"
    import transformers as tf

    folder = tiny_decoders[arch]
    model = tf.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, attn_implementation="eager").eval()
    tok = tf.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    enc = tok(text, return_tensors="pt")
    assert src.tokens == tok.convert_ids_to_tokens(enc["input_ids"][0].tolist())
    with torch.no_grad():
        probs = torch.stack(model(**enc, output_attentions=True).attentions)[:, 0]  # (L, H, N, N)
    mine = softmax_probs(src)  # the causal mask applied: the model's own attention, upper triangle empty
    torch.testing.assert_close(mine, probs.double(), atol=1e-5, rtol=0)
    assert float(mine.triu(1).abs().max()) == 0.0


@pytest.mark.parametrize("kind", ["gpt2", "bert-decoder"])
def test_from_pretrained_decoders_of_other_families_are_causal(tiny_dirs, kind):
    src = S.from_pretrained(tiny_dirs[kind], SHORT_TEXT)
    assert src.is_causal and src.num_layers == 2


def test_encoder_sources_are_not_causal(tiny_dirs):
    assert not S.from_pretrained(tiny_dirs["bert"], SHORT_TEXT).is_causal
    assert not S.synthetic(n=16).is_causal


def test_from_pretrained_refuses_a_folder_without_config(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        S.from_pretrained(tmp_path, SHORT_TEXT)


def test_find_projections_names_what_was_expected():
    with pytest.raises(ValueError, match="query/key/value.*q_lin/k_lin/v_lin"):
        S.find_attention_projections(torch.nn.Sequential(torch.nn.Linear(4, 12)))


# --------------------------------------------------------------------------- GloVe
def test_glove_rows_scaling_and_shapes():
    src = S.glove(2048, "medium", seed=3)
    assert src.q.shape == src.k.shape == src.v.shape == (1, 1, 2048, 50)
    assert src.q is src.k and src.q.dtype == torch.float32
    assert src.scale == pytest.approx(0.4)
    q_rows, v_rows = src.meta["q_rows"].numpy(), src.meta["v_rows"].numpy()
    assert len(set(q_rows) | set(v_rows)) == 4096  # V uses other rows than Q = K
    table = np.load(S.glove_path(), mmap_mode="r")
    assert table.shape == (400000, 50)
    np.testing.assert_array_equal(src.q[0, 0, :5].numpy(), table[q_rows[:5]])
    np.testing.assert_array_equal(src.v[0, 0, -5:].numpy(), table[v_rows[-5:]])
    again = S.glove(2048, "sharp", seed=3)
    assert torch.equal(again.q, src.q) and again.scale == 1.0
    assert not torch.equal(S.glove(2048, seed=4).q, src.q)
    assert S.glove(2048, 0.25, seed=3).scale == 0.25


def test_glove_presets_span_sharp_to_uniform():
    # Documented figures (n = 8192): entropy 0.21 / 0.73 / 0.98, max prob 0.71 / 0.22 / 0.009.
    m = {name: S.measure_attention(S.glove(8192, name), max_queries=256) for name in ("sharp", "medium", "uniform")}
    assert m["sharp"]["entropy"] < 0.3 and m["sharp"]["max_prob"] > 0.6
    assert 0.6 < m["medium"]["entropy"] < 0.85
    assert m["uniform"]["entropy"] > 0.95 and m["uniform"]["max_prob"] < 0.02


def test_glove_long_sequences():
    src = S.glove(30000, "sharp", seed=1)
    assert src.num_tokens == 30000 and len(src.tokens) == 30000


@pytest.mark.parametrize("kwargs, match", [
    ({"n": 1}, "n must"), ({"n": 200_001}, "n must"), ({"scaling": "hot"}, "scaling"),
    ({"scaling": -1.0}, "scaling"), ({"scaling": float("nan")}, "scaling"), ({"seed": -1}, "seed"),
])
def test_glove_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        S.glove(**{"n": 64, **kwargs})


# --------------------------------------------------------------------------- synthetic
def test_synthetic_is_seeded_and_shaped():
    a = S.synthetic(100, 16, "sinks", seed=2)
    b = S.synthetic(100, 16, "sinks", seed=2)
    assert a.q.shape == a.v.shape == (1, 1, 100, 16) and a.scale == pytest.approx(0.25)
    assert torch.equal(a.q, b.q) and torch.equal(a.k, b.k) and torch.equal(a.v, b.v)
    assert not torch.equal(S.synthetic(100, 16, "sinks", seed=3).k, a.k)


def test_synthetic_kinds_have_their_shape_of_attention():
    sinks = S.synthetic(256, 32, "sinks", seed=0)
    p = softmax_probs(sinks)[0, 0]
    sink_mass = p[:, sinks.meta["sinks"]].sum(-1).mean()
    assert sink_mass > 0.6  # 4 of 256 columns hold most of the mass

    clustered = S.synthetic(256, 32, "clustered", seed=0)
    p = softmax_probs(clustered)[0, 0]
    same = clustered.meta["query_clusters"][:, None] == clustered.meta["key_clusters"][None, :]
    assert (p * same).sum(-1).mean() > 0.95

    uniform = S.synthetic(256, 32, "uniform", seed=0)
    assert S.measure_attention(uniform)["entropy"] > 0.99
    assert S.measure_attention(clustered)["entropy"] < 0.7


@pytest.mark.parametrize("kwargs, match", [
    ({"kind": "spiky"}, "kind"), ({"n": 1}, "n must"), ({"d": 1}, "d must"), ({"num_clusters": 0}, "num_clusters"),
])
def test_synthetic_bad_input(kwargs, match):
    kw = {"n": 32, "d": 8, **kwargs}
    if "num_clusters" in kwargs:
        kw["kind"] = "clustered"
    with pytest.raises(ValueError, match=match):
        S.synthetic(**kw)


# --------------------------------------------------------------------------- the container
def test_attention_source_checks():
    src = S.synthetic(16, 4, "uniform")
    with pytest.raises(ValueError, match="layer"):
        src.head(1, 0)
    with pytest.raises(ValueError, match="head"):
        src.head(0, -1)
    with pytest.raises(ValueError, match=r"\(L, H, N, D\)"):
        S.AttentionSource("x", "", ["a"] * 16, src.q[0], src.k[0], src.v[0], 0.5)
    with pytest.raises(ValueError, match="tokens"):
        S.AttentionSource("x", "", ["a"] * 3, src.q, src.k, src.v, 0.5)
    assert "tokens=16" in repr(src) and math.isclose(src.scale, 0.5)
    with pytest.raises(ValueError, match="is_causal"):
        S.AttentionSource("x", "", ["a"] * 16, src.q, src.k, src.v, 0.5, is_causal="yes")


def test_causal_sources_allow_the_lower_triangle_and_measure_it():
    src = S.synthetic(16, 4, "uniform")
    causal = S.AttentionSource("x", "", src.tokens, src.q, src.k, src.v, src.scale, is_causal=True)
    assert torch.equal(causal.allowed(), torch.ones(16, 16, dtype=torch.bool).tril())
    assert torch.equal(src.allowed(), torch.ones(16, 16, dtype=torch.bool))
    # near-uniform attention: entropy ~1 both ways; row i of the causal source spreads over i + 1 keys
    assert S.measure_attention(causal)["entropy"] > 0.98 and S.measure_attention(src)["entropy"] > 0.98
    assert S.measure_attention(causal)["max_prob"] > 2 * S.measure_attention(src)["max_prob"]


def test_causal_source_disk_round_trip(tmp_path):
    src = S.synthetic(16, 4, "uniform")
    causal = S.AttentionSource("x", "", src.tokens, src.q, src.k, src.v, src.scale, is_causal=True)
    S.container.save_source(causal, tmp_path / "s.pt")
    back = S.container.load_source(tmp_path / "s.pt")
    assert back.is_causal and torch.equal(back.q, causal.q)


# --------------------------------------------------------------------------- the project's LRU cache
def test_lru_keeps_the_most_recently_used_entries():
    from kdeformer._cache import LRU

    cache = LRU(2)
    cache["a"] = 1
    cache.put("b", 2)
    assert cache["a"] == 1  # reading makes "a" the most recent, so "b" goes first
    cache["c"] = 3
    assert "b" not in cache and "a" in cache and len(cache) == 2
    made = []
    assert cache.get_or("c", lambda: made.append(1)) == 3 and made == []  # cached: not rebuilt
    assert cache.get_or("d", lambda: 4) == 4 and "a" not in cache
    assert cache.get("zz", "none") == "none"
    with pytest.raises(KeyError):
        cache["zz"]
    cache.clear()
    assert len(cache) == 0
    with pytest.raises(ValueError, match="maxsize"):
        LRU(0)


def test_lru_builds_a_key_once_when_threads_ask_together():
    import threading
    import time

    from kdeformer._cache import LRU

    cache, calls = LRU(4), []

    def slow():
        calls.append(threading.get_ident())
        time.sleep(0.05)
        return len(calls)

    got = []
    threads = [threading.Thread(target=lambda: got.append(cache.get_or("k", slow))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == [1, 1, 1, 1] and len(calls) == 1  # the others waited for the first build

    def fail():
        raise RuntimeError("no")

    with pytest.raises(RuntimeError):
        cache.get_or("bad", fail)
    assert cache.get_or("bad", lambda: 5) == 5  # a failed build leaves nothing behind
    assert cache.get_or("outer", lambda: cache.get_or("outer", lambda: 6) + 1) == 7  # re-entered: no deadlock


# --------------------------------------------------------------------------- the first layers only
def _calls_of(module, counter: list):
    return module.register_forward_hook(lambda *_: counter.append(1))


def test_minilm_first_layers_are_the_full_captures_layers_and_stop_the_forward():
    """num_layers=k: exactly the full capture's first k layers (same bits), and the model's forward ends
    after layer k - 1's value projection (later layers never run)."""
    text = SHORT_TEXT + " (first layers)"
    S.clear_cache()
    model, _ = S.load_model(S.minilm_path(), attn_implementation="capture")
    projections = S.find_attention_projections(model)
    ran = {i: [] for i in range(len(projections))}
    handles = [_calls_of(p.module, ran[i]) for i, p in enumerate(projections)]  # each layer's self-attention
    try:
        part = S.minilm(text, num_layers=2)
        assert [len(ran[i]) for i in range(6)] == [1, 0, 0, 0, 0, 0]  # layer 1 stopped inside its attention
        full = S.minilm(text)
        assert [len(ran[i]) for i in range(6)] == [2, 1, 1, 1, 1, 0]  # a full capture skips the last one's core
    finally:
        for h in handles:
            h.remove()
    assert (part.num_layers, full.num_layers) == (2, 6) and part.tokens == full.tokens
    for a, b in ((part.q, full.q), (part.k, full.k), (part.v, full.v)):
        assert torch.equal(a, b[:2])
    cut = S.minilm(text, num_layers=3)  # a cached full source is cut, not re-run
    assert cut.q.data_ptr() == full.q.data_ptr() and cut.num_layers == 3
    with pytest.raises(ValueError, match=r"num_layers must be an integer in \[1, 6\]"):
        S.minilm(text, num_layers=7)
    with pytest.raises(ValueError, match=r"num_layers must be an integer in \[1, 6\]"):
        S.minilm(text + " uncached", num_layers=0)


@pytest.mark.parametrize("arch", S.TINY_ARCHS)
def test_decoders_first_layers_are_the_full_captures_layers(tiny_decoders, arch):
    text = S.corpus()[4]
    S.clear_cache()
    part = S.from_pretrained(tiny_decoders[arch], text, num_layers=1)
    S.clear_cache()
    full = S.from_pretrained(tiny_decoders[arch], text)
    assert part.num_layers == 1 and part.is_causal
    assert torch.equal(part.q, full.q[:1]) and torch.equal(part.k, full.k[:1]) and torch.equal(part.v, full.v[:1])
    S.clear_cache()
    with pytest.raises(ValueError, match=r"num_layers must be an integer in \[1, 2\]"):
        S.from_pretrained(tiny_decoders[arch], text, num_layers=3)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_a_capture_stops_when_its_check_says_so_and_the_next_one_is_whole(tiny_dirs, kind):
    """stopping_when(check): polled before each of the model's leaf modules; True -> CaptureStopped at
    once, nothing cached, and the model (its hooks removed) captures normally afterwards."""
    from kdeformer.sources.capture import CaptureStopped, stopping_when

    S.clear_cache()
    polls = []

    def check():
        polls.append(1)
        return len(polls) > 1  # let the first module (the embeddings) through, stop before the second

    with stopping_when(check), pytest.raises(CaptureStopped):
        S.from_pretrained(tiny_dirs[kind], SHORT_TEXT)
    assert len(polls) == 2
    src = S.from_pretrained(tiny_dirs[kind], SHORT_TEXT)  # not cached by the stopped run: a whole capture
    assert src.num_layers == 2 and len(polls) == 2  # outside the block nothing polls
    S.clear_cache()
    again = S.from_pretrained(tiny_dirs[kind], SHORT_TEXT)
    assert torch.equal(src.q, again.q)


def test_stopping_when_takes_callables():
    from kdeformer.sources import stopping_when

    with pytest.raises(ValueError, match="check must be a callable and pause a callable or None"):
        with stopping_when(True):
            pass
    with pytest.raises(ValueError, match="pause a callable or None, got .* and 0.5"):
        with stopping_when(lambda: False, pause=0.5):
            pass


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_a_paused_capture_goes_on_where_it_was(tiny_dirs, kind):
    """stopping_when(check, pause): while pause() is True the capture waits inside the forward, then
    finishes with exactly the numbers of a capture that never paused (nothing is run twice)."""
    from kdeformer.sources.capture import stopping_when

    S.clear_cache()
    plain = S.from_pretrained(tiny_dirs[kind], SHORT_TEXT)
    S.clear_cache()
    model, _ = S.load_model(tiny_dirs[kind], attn_implementation="capture")
    runs = []
    handle = model.register_forward_pre_hook(lambda *_: runs.append(1))
    asked = []

    def pause():
        asked.append(1)
        return len(asked) in range(3, 8)  # hold before the third module, five looks, then go on

    try:
        with stopping_when(lambda: False, pause=pause):
            paused = S.from_pretrained(tiny_dirs[kind], SHORT_TEXT)
    finally:
        handle.remove()
    assert len(asked) > 8 and runs == [1]  # it waited, within one forward of the model
    assert torch.equal(paused.q, plain.q) and torch.equal(paused.k, plain.k) and torch.equal(paused.v, plain.v)
