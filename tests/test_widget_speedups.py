"""The explorer's shortcuts give exactly what the plain computation gives (same bits, same strings).

Each faster path of the widgets (whole-cell max-pooling, the engine's shared exact mask, the string
fast path of the wire format, ...) is checked here against the slower one it replaces.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kdeformer.widgets import figures, toy_source
from kdeformer.widgets.state import Engine, Settings


@pytest.fixture(scope="module")
def src():
    return toy_source(n=96, d=16, layers=2, heads=2, seed=0)


@pytest.mark.parametrize("shape, widths", [((512, 512), (2, 2)), ((512, 512), (4, 4)), ((96, 64), (3, 1)),
                                           ((96, 64), (1, 8)), ((95, 64), (2, 2))])
def test_max_pool_equals_max_pool2d(shape, widths):
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(0))
    x[3, 5], x[7, 1] = float("nan"), float("-inf")
    got = figures.max_pool(x, figures.Grid(0, shape[0], widths[0]), figures.Grid(0, shape[1], widths[1]))
    want = torch.nn.functional.max_pool2d(x[None, None], widths, widths, ceil_mode=True)[0, 0]
    assert torch.equal(got.nan_to_num(7.0), want.nan_to_num(7.0))
    assert bool(got.isnan().any()) and bool(want.isnan().any())


def test_wire_sends_string_arrays_as_lists():
    labels = np.array(["q0 a", "q1 'b'", "<br>ü"], dtype=str)
    assert figures.wire({"x": labels, "y": np.array([], dtype=str)}) == {"x": ["q0 a", "q1 'b'", "<br>ü"], "y": []}


@pytest.mark.parametrize("sampling", ["pps", "column_norm", "value_norm"])
def test_engine_exact_mask_rows_equal_the_traces(src, sampling):
    eng = Engine(src)
    s = Settings(layer=1, head=1, bucket_size=16, sample_size=24, sampling=sampling, seed=4)
    tr = eng.run(s).kde_trace
    rows = torch.tensor([0, 5, 95, 5])
    assert torch.equal(eng.exact_mask_rows(s, tr, rows), tr.exact_mask_rows(rows))
    assert torch.equal(eng.exact_mask_rows(s, tr, torch.arange(96)), tr.heavy_mask())


def test_neighbours_are_one_slider_step_away(src):
    eng = Engine(src)  # 2 layers x 2 heads
    assert eng.neighbours(0, 0) == [(0, 1), (1, 0)]
    assert eng.neighbours(1, 1) == [(1, 0), (0, 1)]
    eng.warm(eng.neighbours(0, 0), idle=lambda: False)  # never idle: nothing is computed
    assert (0, 1) not in eng._exact and (1, 0) not in eng._exact


def test_warmed_heads_hold_the_numbers_an_update_computes(src):
    from kdeformer.widgets import AttentionExplorer
    from kdeformer.widgets.explorer import torch_threads

    ex = AttentionExplorer(src, bucket_size=16, sample_size=24)
    ex._warm_thread.join(timeout=30)
    assert (0, 1) in ex.engine._exact and (1, 0) in ex.engine._exact  # warmed after the first draw
    fresh = Engine(src)
    for layer, head in ((0, 1), (1, 0)):
        with torch_threads(ex.threads):  # as in an update (the norms' last bits depend on the thread count)
            want = fresh.exact(layer, head)
        got = ex.engine.exact(layer, head)
        assert (got.attention_norm, got.value_norm, got.out_norm) == (want.attention_norm, want.value_norm, want.out_norm)
        assert torch.equal(got.matrix, want.matrix) and torch.equal(got.out, want.out)
    cold = AttentionExplorer(src, bucket_size=16, sample_size=24, prefetch=False)
    assert cold._warm_thread is None
    for values in (dict(head=1), dict(layer=1, head=0), dict(seed=9)):
        ex.set(**values)
        cold.set(**values)
        assert ex.readout.value == cold.readout.value
        for name in ex.figures:
            assert figures.same(ex.figures[name].to_plotly_json(), cold.figures[name].to_plotly_json()), name


@pytest.mark.parametrize("sampling", ["pps", "column_norm", "value_norm"])
def test_batched_errors_equal_one_setting_at_a_time(src, sampling):
    from dataclasses import replace

    from kdeformer import metrics

    eng = Engine(src)
    s = Settings(layer=0, head=1, bucket_size=16, sample_size=24, sampling=sampling, seed=2)
    points = eng.measured_points(s)
    assert points[: eng.seeds] == [replace(s, seed=2 + i) for i in range(eng.seeds)] and len(points) == len(set(points))
    assert len(points) == eng.seeds + len(eng.curve_points(s)) - 1  # curve: 1 seed a point, the current one the readout's
    got = eng.errors_of(points)
    ex = eng.exact(0, 1)
    for p, (plain, theory) in zip(points, got):
        want = metrics.relative_spectral_error(eng.output(p), ex.out)
        assert plain == want  # bit for bit
        assert theory == want * ex.out_norm / (ex.attention_norm * ex.value_norm)
    assert eng.summary(s).spectral == [e for e, _ in got[: eng.seeds]]
    with pytest.raises(ValueError, match="one head"):
        eng.errors_of([replace(s, head=0, seed=50), replace(s, seed=50)])


def test_step_ahead_continues_a_single_slider_move():
    from kdeformer.widgets.state import step_ahead

    s = Settings(head=3, seed=7)
    assert step_ahead(None, s) is None
    assert step_ahead(Settings(head=2, seed=7), s) == Settings(head=4, seed=7)
    assert step_ahead(Settings(head=3, seed=9), s) == Settings(head=3, seed=5)
    assert step_ahead(Settings(head=3, seed=7, sample_size=100), s) == Settings(head=3, seed=7, sample_size=156)
    assert step_ahead(s, s) is None  # a display move: no slider moved
    assert step_ahead(Settings(head=2, seed=6), s) is None  # two sliders at once
    assert step_ahead(Settings(head=3, seed=7, sampling="uniform"), s) is None  # a choice, not a slider


def test_prefetch_fills_what_an_update_reads_with_the_same_numbers(src):
    eng, fresh = Engine(src), Engine(src)
    s = Settings(layer=1, head=0, bucket_size=16, sample_size=24, seed=11)
    eng.prefetch(s, idle=lambda: True)
    assert s in eng._runs and all(p in eng._errors for p in eng.measured_points(s))
    assert eng.summary(s) == fresh.summary(s) and eng.curve(s) == fresh.curve(s)
    ready = eng.heavy_mass(s, eng.run(s).kde_trace)
    want = fresh.heavy_mass(s, fresh.run(s).kde_trace)
    assert all(np.array_equal(a, b) for a, b in zip(ready, want))
    eng.prefetch(Settings(layer=1, head=0, bucket_size=0), idle=lambda: True)  # past a slider's end: nothing
    calls = []
    eng.prefetch(Settings(layer=0, head=1, seed=3), idle=lambda: calls.append(1) and False)  # busy at once
    assert calls == [1] and Settings(layer=0, head=1, seed=3) not in eng._runs


# --------------------------------------------------------------------------- a new text's layers in two steps
def test_engine_with_layers_to_come_gives_the_whole_sources_numbers(src):
    """An engine holding the first layer (rest: the whole source) reports every layer, computes layer 0
    without the rest, captures the rest when a later layer is asked for, and gives the whole source's bits."""
    from kdeformer.widgets.state import LayersToCome

    made = []

    def make():
        made.append(1)
        return src

    eng = Engine(src.first_layers(1), rest=LayersToCome(2, make))
    whole = Engine(src)
    assert (eng.num_layers, eng.layers_ready) == (2, 1) and eng.neighbours(0, 0) == whole.neighbours(0, 0)
    s0, s1 = Settings(layer=0, head=1, bucket_size=16, sample_size=24, seed=2), Settings(layer=1, head=0, seed=5)
    assert eng.summary(s0) == whole.summary(s0) and made == []
    eng.warm([(1, 0), (0, 0)], lambda: True)  # skips the layer to come
    eng.prefetch(s1, lambda: True)
    assert made == [] and eng.layers_ready == 1
    assert eng.summary(s1) == whole.summary(s1) and made == [1] and eng.layers_ready == 2
    assert eng.whole_source() is src and made == [1]  # once
    with pytest.raises(ValueError, match="rest.num_layers must be more than the 2 layers"):
        Engine(src, rest=LayersToCome(2, make))


def test_engine_refuses_a_whole_source_that_disagrees_with_the_layers_shown(src):
    from dataclasses import replace

    from kdeformer.widgets.state import LayersToCome

    other = replace(src, q=src.q + 1e-6)
    eng = Engine(src.first_layers(1), rest=LayersToCome(2, lambda: other))
    with pytest.raises(RuntimeError, match="first layers differ"):
        eng.complete()
    assert eng.layers_ready == 1  # nothing swapped


def _minilm_or_skip():
    from kdeformer.widgets.state import load_text_source

    try:
        return load_text_source(None)
    except Exception as exc:  # the model package is missing on this machine
        pytest.skip(f"MiniLM source unavailable: {exc}")


@pytest.mark.parametrize("layer", [0, 5])
def test_a_new_text_draws_its_layer_first_and_shows_the_whole_captures_numbers(layer):
    """set_text runs the model only as far as the layer shown (all of it for the last one); what is drawn
    equals an explorer opened on the whole capture of that text, and a layer move captures the rest."""
    from kdeformer.sources import minilm
    from kdeformer.widgets import AttentionExplorer

    _minilm_or_skip()
    text = f"A short text about layer {layer}: the keys and the queries meet in the attention matrix."
    ex = AttentionExplorer(seeds=1, prefetch=False)
    ex.set(layer=layer, head=3)
    assert ex.set_text(text)
    assert ex.engine.layers_ready == layer + 1 and ex.engine.num_layers == 6 and ex.controls["layer"].max == 5
    whole = AttentionExplorer(minilm(text), seeds=1, prefetch=False)
    same = {f: getattr(ex.settings(), f) for f in ("layer", "head", "bucket_size", "sample_size", "num_projs", "seed")}
    whole.set(**same, query=ex.display_options()["query"])  # (the short text clamped the bucket and the query)
    assert whole.stamp(whole.settings(), whole.display_options()).replace("text0", "text1") == \
        ex.stamp(ex.settings(), ex.display_options())
    for name in ex.figures:
        assert ex.figures[name].to_json() == whole.figures[name].to_json(), name
    assert ex.readout.value.replace("text1", "text0") == whole.readout.value
    ex.set(layer=5 - layer)  # the other end: the rest is captured, then drawn
    whole.set(layer=5 - layer)
    assert ex.engine.layers_ready == 6 and ex.last_error is None
    assert ex.readout.value.replace("text1", "text0") == whole.readout.value
    assert torch.equal(ex.source.q, whole.source.q)


@pytest.mark.filterwarnings("ignore:text has .* tokens; cut to the first:UserWarning")  # (long texts on purpose)
def test_the_warming_thread_captures_the_rest_and_a_new_text_stops_it():
    import time

    from kdeformer.widgets import AttentionExplorer

    _minilm_or_skip()
    ex = AttentionExplorer(seeds=1)  # prefetch=True: the rest is captured after each redraw
    base = ex.controls["text"].value
    assert ex.set_text("First: " + base) and ex.engine.layers_ready == 1
    first = ex.engine
    deadline = time.monotonic() + 60
    while first.layers_ready < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first.layers_ready == 6
    assert ex.set_text("Second: " + base)
    assert ex.set_text("Third: " + base)  # the second's capture (if still running) stops for this one
    deadline = time.monotonic() + 60
    while ex.engine.layers_ready < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    from kdeformer.sources import minilm

    assert torch.equal(ex.source.k, minilm("Third: " + base).k) and ex.last_error is None


@pytest.mark.filterwarnings("ignore:text has .* tokens; cut to the first:UserWarning")  # (long texts on purpose)
def test_moves_pause_the_capture_of_a_texts_other_layers_and_never_restart_it():
    """Updates that run while the other layers are captured pause that capture (it waits inside the
    forward) instead of stopping it: the model runs twice per text (its first layer, then whole)."""
    import time

    from kdeformer.sources import load_model, minilm_path
    from kdeformer.widgets import AttentionExplorer

    _minilm_or_skip()
    ex = AttentionExplorer(seeds=1)
    model, _ = load_model(minilm_path(), attn_implementation="capture")
    forwards = []
    handle = model.register_forward_pre_hook(lambda *_: forwards.append(1))
    try:
        assert ex.set_text("Paused: " + ex.controls["text"].value)
        for seed in range(1, 9):  # moves while the rest is being captured (~0.25 s of model time)
            time.sleep(0.03)
            ex.set(seed=seed)
            assert ex.last_error is None
        deadline = time.monotonic() + 60
        while ex.engine.layers_ready < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        handle.remove()
    assert ex.engine.layers_ready == 6 and forwards == [1, 1]


def test_a_decoder_folders_new_text_is_drawn_from_its_first_layer_then_whole(tmp_path):
    """A local decoder (a tiny random Llama saved to a folder, as a user's would be): editing the text
    runs it up to the layer shown (the capture stops after that attention call), a layer move captures
    the rest, and every number is the whole capture's."""
    from kdeformer import sources
    from kdeformer.widgets import AttentionExplorer

    pytest.importorskip("transformers")
    folder = sources.tiny_decoder(tmp_path / "llama", "llama")
    text = sources.corpus()[7]
    ex = AttentionExplorer(sources.from_pretrained(folder, sources.corpus()[0]), seeds=1, prefetch=False)
    assert ex.set_text(text) and ex.engine.layers_ready == 1 and ex.engine.num_layers == 2
    assert ex.source.is_causal  # (asking for the source completes it)
    whole = sources.from_pretrained(folder, text)
    assert torch.equal(ex.source.q, whole.q) and torch.equal(ex.source.v, whole.v)
    ex.set(layer=1)
    ref = AttentionExplorer(whole, seeds=1, prefetch=False)
    ref.set(**{f: getattr(ex.settings(), f) for f in ("layer", "head", "bucket_size", "sample_size", "seed")},
            query=ex.display_options()["query"])
    assert ex.readout.value.replace("text1", "text0") == ref.readout.value


def test_the_heads_matrix_norm_computed_meanwhile_is_the_one_computed_here(src):
    """||D^-1 A||_2 runs on a helper thread while the runs are computed: the same float as computing it
    on the caller's thread, in every torch thread count the explorer uses."""
    from kdeformer import metrics
    from kdeformer.widgets.state import background_work, spectral_norm_meanwhile

    old = torch.get_num_threads()
    try:
        for threads in sorted({1, old}):
            torch.set_num_threads(threads)
            eng = Engine(src)
            ex = eng.exact(1, 0)
            assert ex.attention_norm == float(metrics.spectral_norm(ex.matrix))
            assert spectral_norm_meanwhile(ex.matrix).result() == ex.attention_norm
            with background_work():  # the warming thread's own: computed there, never queued
                assert spectral_norm_meanwhile(ex.matrix) == ex.attention_norm
                warmed = Engine(src)
                warmed.warm([(1, 0)], lambda: True)
            assert warmed.exact(1, 0).matrix_norm == ex.attention_norm  # a float, not a Future
    finally:
        torch.set_num_threads(old)
