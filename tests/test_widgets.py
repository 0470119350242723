"""AttentionExplorer in plain Python (no browser): figures agree with the core's trace, controls,
invalid input, coalesced updates, export. Small synthetic sources keep it fast."""
from __future__ import annotations

import os
import re

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go
import pytest
import torch

import kdeformer
from kdeformer.core import SAMPLINGS, kde_multiply_adds
from kdeformer.defaults import KDE_DEFAULTS
from kdeformer.widgets import AttentionExplorer, PlotBoard, source_from_tensors, toy_source
from kdeformer.widgets import panels
from kdeformer.widgets.state import Engine, Settings, call_code, kde_call_code, load_text_source

os.environ.setdefault("HF_HUB_OFFLINE", "1")

N = 96


@pytest.fixture(scope="module")
def src():
    return toy_source(n=N, d=16, layers=2, heads=2, seed=0)


@pytest.fixture
def ex(src):
    return AttentionExplorer(src, bucket_size=16, sample_size=24, num_projs=5, seed=3)


def trace_of(fig, name):
    return panels.trace_by_name(fig, name)


def reference(src, s: Settings):
    """The core run the explorer should be showing, computed independently."""
    q, k, v = (x[s.layer, s.head] for x in (src.q, src.k, src.v))
    return kdeformer.kde_attention(
        q, k, v, bucket_size=s.bucket_size, sample_size=s.sample_size, num_projs=s.num_projs, scale=src.scale,
        sampling=s.sampling, bucket_order=s.bucket_order, generator=torch.Generator().manual_seed(s.seed),
        return_trace=True,
    )


def snapshot(ex):
    return {name: fig.to_json() for name, fig in ex.figures.items()}


def click(ex, panel, trace_name, **point):
    """A click as the page reports it (PlotBoard message)."""
    ex.board._on_message(ex.board, {"event": "click", "panel": panel, "points": [{"trace": trace_name, **point}]}, [])


# --------------------------------------------------------------------------- structure
def test_controls_figures_and_css_classes(ex):
    c = ex.controls
    expected = {"text", "layer", "head", "method", "bucket_size", "sample_size", "num_projs", "sampling",
                "bucket_order", "seed", "log_color", "order", "zoom", "query"}
    assert set(c) == expected
    assert list(ex.figures) == ["buckets", "heavy", "samples", "error", "inspector"] == ex.board.panels
    for name, w in c.items():
        assert f"kde-control-{name}" in w._dom_classes
    assert "kde-explorer" in ex._dom_classes and "kde-board" in ex.board._dom_classes
    assert "kde-readout" in ex.readout._dom_classes and "kde-message" in ex.message._dom_classes
    assert "kde-status" in ex.status._dom_classes
    assert isinstance(c["bucket_size"], widgets.IntSlider) and (c["bucket_size"].min, c["bucket_size"].max) == (1, N)
    assert (c["layer"].max, c["head"].max) == (1, 1)
    assert (c["num_projs"].min, c["num_projs"].max) == (1, 16)
    assert c["bucket_size"].continuous_update is False and c["sample_size"].continuous_update is False
    assert ex.last_error is None and ex.update_count == 1
    assert re.search(r"N = 96 .*cost 0\.\d\d of exact.*updated in \d+ ms", ex.status.value)
    assert any("'tok5'" in t for t in trace_of(ex.figures["buckets"], "queries").hovertext)
    assert any("tok" in lab for lab in trace_of(ex.figures["heavy"], "attention").y)


def test_defaults_come_from_kdeformer_defaults(src):
    ex = AttentionExplorer(src)
    s = ex.settings()
    assert (s.bucket_size, s.sample_size, s.num_projs, s.sampling, s.bucket_order) == (
        KDE_DEFAULTS.bucket_size, KDE_DEFAULTS.sample_size, KDE_DEFAULTS.num_projs, KDE_DEFAULTS.sampling,
        KDE_DEFAULTS.bucket_order)
    labels = dict((v, k) for k, v in ex.controls["sampling"].options)
    assert "authors" in labels["value_norm"] and "best" in labels[KDE_DEFAULTS.sampling]


def test_panel_registry_declares_dependencies():
    reg = panels.PANELS
    assert list(reg) == ["buckets", "heavy", "samples", "error", "inspector"]
    s = Settings()
    for name, panel in reg.items():
        fig = panel.make()
        assert fig.layout.autosize is True and fig.layout.width is None, name  # fills the output width
        disp = dict(log_color=True, order="sorted", zoom=None, query=0)
        assert not panels.needs_redraw(panel, s, disp, s, disp)
        # a panel redraws exactly when a field it declares changes
        for field in s.__dataclass_fields__:
            moved = Settings(**{**s.__dict__, field: 1 if field != "sampling" else "uniform"})
            depends = panel.settings is None or field in panel.settings
            if moved != s:
                assert panels.needs_redraw(panel, moved, disp, s, disp) == depends, (name, field)
    assert reg["buckets"].settings == ("layer", "head", "num_projs", "bucket_order", "seed", "bucket_size")


def test_one_message_per_move(ex, monkeypatch):
    """Every changed panel travels in one PlotBoard state message (hold_sync), not one per panel."""
    sent = []
    monkeypatch.setattr(ex.board, "comm", _FakeComm(sent))
    ex.set(sample_size=40)
    states = [m for m in sent if m.get("method") == "update"]
    assert len(states) == 1, [sorted(m["state"]) for m in states]
    keys = set(states[0]["state"])
    assert {"fig_samples", "fig_error", "fig_inspector", "stamps", "revision"} <= keys and "fig_buckets" not in keys
    assert "z_error_0" in keys and "z_error_1" not in keys  # the approximate matrix changed, the exact one did not
    stamp = ex.stamp(ex.settings(), ex.display_options())
    assert set(states[0]["state"]["stamps"].values()) == {stamp}
    assert f"data-stamp='{stamp}'" in ex.status.value and f"data-stamp='{stamp}'" in ex.readout.value


class _FakeComm:
    kernel = object()
    comm_id = "fake-comm"

    def __init__(self, sink):
        self.sink = sink

    def send(self, data=None, buffers=None, **_):
        self.sink.append(data)

    def on_msg(self, *_):
        pass

    on_close = close = on_msg


# --------------------------------------------------------------------------- figures follow the trace
@pytest.mark.parametrize("sampling", ["column_norm", "value_norm"])  # the schemes that cut key blocks
def test_heavy_outlines_match_trace_blocks(src, sampling):
    ex = AttentionExplorer(src, bucket_size=16, sample_size=24, num_projs=5, seed=3, sampling=sampling, seeds=1)
    out, tr = reference(src, ex.settings())
    fig = ex.figures["heavy"]
    shapes = [s for s in fig.layout.shapes if s.type == "rect"]
    q_sorted_block = tr.q_blocks[tr.q_order]  # key block of each sorted query
    k_sorted_block = tr.k_blocks[tr.k_order]
    expected = []
    start = 0
    for p in range(1, N + 1):
        if p == N or q_sorted_block[p] != q_sorted_block[start]:
            cols = torch.nonzero(k_sorted_block == q_sorted_block[start]).flatten()
            expected.append((start - 0.5, p - 0.5, int(cols.min()) - 0.5, int(cols.max()) + 0.5))
            start = p
    got = sorted((s.y0, s.y1, s.x0, s.x1) for s in shapes)
    assert got == sorted(expected)
    # every exactly computed entry (blocks and, for column_norm, heavy columns) is shaded
    overlay = panels.unpack(trace_of(fig, "heavy overlay").z)
    np.testing.assert_array_equal(np.nan_to_num(overlay) > 0, tr.heavy_mask()[tr.q_order][:, tr.k_order].numpy())
    # the matrix drawn is the exact softmax in sorted order (log10), unpooled at this N
    z = panels.unpack(trace_of(fig, "attention").z)
    att = kdeformer.exact_attention(*(x[0, 0] for x in (src.q, src.k, src.v)), scale=src.scale, return_trace=True)[1]
    want = att.attention_matrix()[tr.q_order][:, tr.k_order].numpy()
    np.testing.assert_allclose(z, np.maximum(np.log10(want), panels.LOG_FLOOR), atol=1e-4)
    # exact mass per query = exact softmax mass in the entries computed exactly
    mass = (att.attention_matrix() * tr.heavy_mask()).sum(-1)
    np.testing.assert_allclose(trace_of(fig, "exact heavy mass").y, mass[tr.q_order].numpy(), atol=1e-4)


def test_sample_marks_match_trace(ex, src):
    out, tr = reference(src, ex.settings())
    fig = ex.figures["samples"]
    g = max(0, int(tr.q_groups[ex.display_options()["query"]]))
    mine = tr.sample_group == g
    uniq = torch.unique(tr.sampled[mine]).numpy()
    marks = trace_of(fig, "sampled")
    np.testing.assert_array_equal(np.asarray(marks.x), uniq)
    np.testing.assert_allclose(marks.y, tr.group_probs[g][uniq].numpy(), rtol=1e-6)
    q = torch.tensor([ex.display_options()["query"]])
    own = torch.where(tr.exact_mask_rows(q)[0], 0.0, tr.weight_rows(q)[0])  # the query's own sampled weights
    np.testing.assert_allclose(trace_of(fig, "column weight").y, own[uniq].numpy(), rtol=1e-6)
    in_group = tr.q_groups == g
    np.testing.assert_array_equal(trace_of(fig, "excluded queries").y, tr.heavy_mask()[in_group][:, uniq].sum(0).numpy())
    np.testing.assert_allclose(trace_of(fig, "probability").y, tr.group_probs[g].numpy(), rtol=1e-6)
    draws = int(mine.sum())
    sub = panels.caption(fig)
    assert f"{draws} draws" in sub and f"s = {ex.settings().sample_size} columns per query" in sub
    if tr.num_groups > 1:
        assert f"each of {tr.num_groups} query groups draws its own ({int((tr.sample_group >= 0).sum())} in all)" in sub
    # buckets: sizes per code match the hash codes
    b = ex.figures["buckets"]
    counts = dict(zip(trace_of(b, "keys per bucket").x, trace_of(b, "keys per bucket").y))
    r = tr.projections.shape[-1]
    for code in torch.unique(tr.k_buckets).tolist():
        assert counts[panels.code_string(code, r)] == int((tr.k_buckets == code).sum())
    assert sum(trace_of(b, "queries per bucket").y) == N
    seq = np.asarray(trace_of(b, "key sequence").y)  # Gray rank of the sorted keys' buckets: non-decreasing
    assert (np.diff(seq) >= 0).all()


def test_error_panel_and_readout_match_metrics(ex, src):
    s = ex.settings()
    out, tr = reference(src, s)
    exact = kdeformer.exact_attention(*(x[0, 0] for x in (src.q, src.k, src.v)), scale=src.scale)
    errs = [kdeformer.relative_spectral_error(reference(src, Settings(**{**s.__dict__, "seed": s.seed + i}))[0], exact)
            for i in range(3)]
    mean, sd = float(np.mean(errs)), float(np.std(errs, ddof=1))
    assert f"{mean:.4f} ± {sd:.4f}" in ex.readout.value
    curve = trace_of(ex.figures["error"], "current")
    assert curve.x[0] == s.bucket_size + s.sample_size and curve.y[0] == pytest.approx(mean, rel=1e-9)
    approx_z = panels.unpack(trace_of(ex.figures["error"], "approx").z)
    want = tr.attention_matrix()[tr.q_order][:, tr.k_order].numpy()
    with np.errstate(divide="ignore"):
        want_log = np.where(want > 0, np.maximum(np.log10(want), panels.LOG_FLOOR), np.nan)
    np.testing.assert_allclose(approx_z, want_log, atol=1e-4)
    per_q = (out - exact).norm(dim=-1) / exact.norm(dim=-1)
    np.testing.assert_allclose(trace_of(ex.figures["error"], "per-query error").y, per_q.numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name,value", [("bucket_size", 32), ("sample_size", 40), ("num_projs", 3), ("seed", 11),
                                        ("bucket_order", "binary"), ("sampling", "uniform"), ("layer", 1), ("head", 1)])
def test_every_setting_control_redraws_consistently(ex, src, name, value):
    before = snapshot(ex)
    count = ex.update_count
    ex.set(**{name: value})  # synchronous: figures are updated when this returns
    assert ex.update_count == count + 1 and ex.last_error is None
    after = snapshot(ex)
    assert after["samples"] != before["samples"] or after["heavy"] != before["heavy"]
    s = ex.settings()
    assert getattr(s, name) == value
    out, tr = reference(src, s)
    g = int(tr.q_groups[0])
    np.testing.assert_array_equal(np.asarray(trace_of(ex.figures["samples"], "sampled").x),
                                  torch.unique(tr.sampled[tr.sample_group == g]).numpy())
    n_rects = len([sh for sh in ex.figures["heavy"].layout.shapes if sh.type == "rect"])
    assert n_rects == len(panels.block_rectangles(tr))
    assert f"L{s.layer}H{s.head}" in panels.caption(ex.figures["error"])


def test_display_controls(ex, src):
    heavy = ex.figures["heavy"]
    z_log = panels.unpack(trace_of(heavy, "attention").z).copy()
    ex.set(log_color=False)
    z_lin = panels.unpack(trace_of(heavy, "attention").z)
    finite = np.isfinite(z_log) & (z_log > panels.LOG_FLOOR)
    np.testing.assert_allclose(np.log10(z_lin[finite]), z_log[finite], atol=1e-4)
    # original order: rows are tokens 0..N-1, exact entries shaded (no outlines)
    ex.set(order="original")
    assert trace_of(heavy, "attention").y[0].startswith("q0 ")
    assert not [s for s in heavy.layout.shapes if s.type == "rect"]
    out, tr = reference(src, ex.settings())
    overlay = panels.unpack(trace_of(heavy, "heavy overlay").z)
    np.testing.assert_array_equal(np.nan_to_num(overlay) > 0, tr.heavy_mask().numpy())
    ex.set(zoom=(10, 29))  # a token range, shown at token resolution
    assert len(trace_of(heavy, "attention").y) == 20 and trace_of(heavy, "attention").y[0].startswith("q10 ")
    ex.set(query=7)  # inspector: exact row, the trace's row, its exact and sampled keys
    insp = ex.figures["inspector"]
    att = kdeformer.exact_attention(*(x[0, 0] for x in (src.q, src.k, src.v)), scale=src.scale, return_trace=True)[1]
    np.testing.assert_allclose(trace_of(insp, "exact row").y, att.attention_matrix()[7].numpy(), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(trace_of(insp, "approximate row").y, tr.attention_rows(torch.tensor([7]))[0].numpy(),
                               rtol=1e-5, atol=1e-9)
    exact7 = tr.exact_mask_rows(torch.tensor([7]))[0]
    np.testing.assert_array_equal(trace_of(insp, "computed exactly").x, torch.nonzero(exact7).flatten().numpy())
    sampled7 = (tr.weight_rows(torch.tensor([7]))[0] > 0) & ~exact7
    np.testing.assert_array_equal(trace_of(insp, "sampled keys").x, torch.nonzero(sampled7).flatten().numpy())
    assert "query 7 'tok7'" in panels.caption(insp)


def test_click_on_a_query_point_opens_inspector(ex):
    pts = trace_of(ex.figures["buckets"], "queries")
    click(ex, "buckets", "queries", index=11, x=float(pts.x[11]), y=float(pts.y[11]), customdata=list(pts.customdata[11]))
    assert ex.controls["query"].value == int(pts.customdata[11][0])
    click(ex, "error", "per-query error", index=40, x=40, y=0.1, customdata=40)
    assert ex.controls["query"].value == 40


@pytest.mark.parametrize("panel,trace_name", [("heavy", "attention"), ("error", "exact"), ("error", "approx")])
def test_click_on_matrix_row_opens_inspector(ex, panel, trace_name):
    hm = trace_of(ex.figures[panel], trace_name)
    label = hm.y[5]  # a row of the sorted matrix
    token = int(label.split()[0][1:])
    click(ex, panel, trace_name, index=[5, 0], x=hm.x[0], y=label, customdata=None)
    assert ex.controls["query"].value == token
    assert f"query {token} " in panels.caption(ex.figures["inspector"])


def test_open_a_head_for_overview_clicks(ex):
    assert ex.open_head(1, 0)
    s = ex.settings()
    assert (s.layer, s.head) == (1, 0) and "L1H0" in panels.caption(ex.figures["heavy"])
    assert not ex.open_head(5, 0) and "layer" in ex.last_error


# --------------------------------------------------------------------------- truth: panels draw the trace's rows
def _source_3000(masked: bool, n: int):
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(1, 1, n, 16, generator=g) for _ in range(3))  # (L, H, N, D)
    k[..., :3, :] *= 3.0  # a few sink-like keys
    mask = None
    if masked:
        mask = torch.rand(n, generator=g) > 0.2  # (N,) True = attend
    return source_from_tensors(q, k, v, key_mask=mask)


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "keymask"])
@pytest.mark.parametrize("n", [300, 3000])
@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_every_panel_draws_the_traces_rows(sampling, n, masked, monkeypatch):
    """The data each panel draws (before pooling) equals the trace's rows to 1e-6, and those rows @ V
    equal the output rows (issue 11.1: no re-derivation in the widgets)."""
    src = _source_3000(masked, n)
    engine = Engine(src, seeds=1, curve_factors=(1.0,))
    s = Settings(bucket_size=64, sample_size=128, sampling=sampling, seed=1)
    res = engine.run(s)
    tr = res.kde_trace
    seen = {}
    original = panels.pooled_rows

    def recording(row_fns, *args):
        def recorder(name, fn):
            def rows_of(rows):
                got = fn(rows)
                seen.setdefault(name, []).append((rows, got))
                return got
            return rows_of

        return original({name: recorder(name, fn) for name, fn in row_fns.items()}, *args)

    monkeypatch.setattr(panels, "pooled_rows", recording)
    disp = dict(log_color=True, order="sorted", zoom=None, query=n // 3)
    view = panels.View(s, disp, engine, res, engine.curve(s), panels.TokenLabels(src.tokens), panels.TokenLabels(src.tokens))
    ups = {name: p.update(view) for name, p in panels.PANELS.items()}
    rows = torch.cat([r for r, _ in seen["approx"]])  # every row the error panel drew, before pooling
    approx = torch.cat([a for _, a in seen["approx"]])
    want = tr.attention_rows(rows)
    torch.testing.assert_close(approx, want, rtol=0, atol=1e-6)
    order = torch.argsort(rows)
    torch.testing.assert_close((approx[order].double() @ src.v[0, 0].double()), res.out.double(), rtol=1e-5, atol=1e-6)
    rows_h = torch.cat([r for r, _ in seen["heavy"]])
    marks = torch.cat([m for _, m in seen["heavy"]])
    torch.testing.assert_close(marks, tr.exact_mask_rows(rows_h).float(), rtol=0, atol=0)
    assert sorted(rows_h.tolist()) == list(range(n)) == sorted(rows.tolist())
    # heavy panel's mass: exact P over the trace's exact entries; inspector: the trace's own row
    q = disp["query"]
    insp = ups["inspector"].info
    np.testing.assert_allclose(insp["approx"], tr.attention_rows(torch.tensor([q]))[0].double().numpy(), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(insp["exact_keys"], torch.nonzero(tr.exact_mask_rows(torch.tensor([q]))[0]).flatten().numpy())
    weight = tr.weight_rows(torch.tensor([q]))[0]
    g = int(tr.q_groups[q])
    samp = ups["samples"].info  # the sampled columns' weights are the query's own group's weights
    outside = ~tr.exact_mask_rows(torch.tensor([q]))[0][samp["unique"]]
    np.testing.assert_allclose(samp["weights"][outside.numpy()], weight[samp["unique"]][outside].double().numpy(), rtol=1e-6)
    assert (samp["weights"][~outside.numpy()] == 0).all()  # keys it computes exactly carry no sampled weight
    assert samp["group"] == g
    ex_rows = engine.exact_rows(0, 0, torch.arange(n))
    mass = (ex_rows.double() * tr.exact_mask_rows(torch.arange(n))).sum(-1).numpy()
    np.testing.assert_allclose(ups["heavy"].info["mass"], mass, rtol=0, atol=1e-6)
    if n > 2048:  # pooled: nothing of N x N reached the figure
        assert panels.unpack(ups["heavy"].traces["attention"]["z"]).shape[0] <= 256


# --------------------------------------------------------------------------- limits and bad input
def test_bucket_size_at_or_above_n_is_exact(ex):
    assert ex.set(bucket_size=10 * N)  # valid: one block, exact attention, and the clamp is announced
    assert ex.controls["bucket_size"].value == N and ex.last_error is None
    assert f"bucket_size {10 * N} is more than the {N} keys" in ex.notes.value
    assert "cost 1.00 of exact" in ex.status.value and "every key computed exactly: exact attention" in ex.status.value
    m = float(re.search(r"<b>([0-9.]+) ±", ex.readout.value).group(1))
    assert m < 1e-5
    ex.set(bucket_size=16)
    assert ex.notes.value == ""


def test_cost_above_one_is_shown_as_more_than_exact(src):
    ex = AttentionExplorer(src, bucket_size=49, sample_size=128, sampling="column_norm", seeds=1)  # 49 + 128 of 96
    want = kde_multiply_adds(N, N, 16, 16, bucket_size=49, sample_size=128, sampling="column_norm") / (N * N * 33)
    assert want > 1 and f"cost {want:.2f} of exact — <b>more than exact</b>" in ex.status.value, ex.status.value


def test_effective_block_size_is_shown(src):
    ex = AttentionExplorer(src, bucket_size=40, sample_size=16, seeds=1)  # 96 keys: 3 balanced blocks of 32
    ex.set(sampling="column_norm")
    assert "block of 32 keys (bucket_size 40: 3 blocks of ≤32)" in ex.status.value


def test_bucket_size_one_draws_no_wall_of_lines(src):
    ex = AttentionExplorer(src, bucket_size=1, sample_size=16, sampling="column_norm", seeds=1)  # 96 blocks
    edges = trace_of(ex.figures["buckets"], "block edges")
    assert len(edges.x or ()) == 0 and "edges of 96 blocks not drawn" in panels.caption(ex.figures["buckets"])


@pytest.mark.parametrize("typed", ["-1", "abc", "1.5", str(2**40)])
def test_typed_seed_is_refused_with_a_message(ex, typed):
    before, count = snapshot(ex), ex.update_count
    ex.controls["seed"].value = typed  # as the page sends a typed value
    assert ex.last_error and "seed must be an integer" in ex.message.value and repr(typed) in ex.last_error
    assert snapshot(ex) == before and ex.update_count == count
    assert ex.controls["seed"].value == "3"  # the last good value is back in the box
    ex.controls["seed"].value = "4"
    assert ex.last_error is None and ex.settings().seed == 4


@pytest.mark.parametrize("values,needle", [(dict(bucket_size=0), "bucket_size"), (dict(num_projs=17), "num_projs"),
                                           (dict(layer=2), "layer"), (dict(sampling="bogus"), "sampling"),
                                           (dict(zoom=(5, 500)), "zoom")])
def test_invalid_settings_show_message_and_keep_figures(ex, values, needle):
    before, count, s = snapshot(ex), ex.update_count, ex.settings()
    assert ex.set(**values) is False
    assert needle in ex.last_error and needle in ex.message.value
    assert snapshot(ex) == before and ex.update_count == count and ex.settings() == s
    ex.set(bucket_size=24)  # the next good setting clears the message
    assert ex.last_error is None and ex.message.value == ""


def test_failure_inside_an_update_keeps_last_good_figures(ex, monkeypatch):
    before, count = snapshot(ex), ex.update_count

    def boom(s):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(ex.engine, "run", boom)
    ex.set(seed=99)
    assert "simulated failure" in ex.last_error and "Traceback" not in ex.message.value
    assert snapshot(ex) == before and ex.update_count == count


def test_bad_constructor_arguments_raise(src):
    for kwargs, needle in ((dict(layer=7), "layer"), (dict(method="bogus"), "method"), (dict(num_projs=0), "num_projs"),
                           (dict(colour=1), "unknown")):
        with pytest.raises(ValueError, match=needle):
            AttentionExplorer(src, **kwargs)


def test_text_edit_without_a_model_is_refused(ex):
    assert ex.controls["text"].disabled
    assert ex.set(text="hello world") is False
    assert "no model" in ex.last_error


# --------------------------------------------------------------------------- coalescing
def test_values_arriving_during_an_update_are_coalesced(ex, monkeypatch):
    ex.prefetch = False  # (the background guess of the next step would call run too: not what is counted here)
    run = ex.engine.run
    computed = []

    def slow_run(s):
        computed.append(s.bucket_size)
        if len(computed) == 1:  # while this one computes, three newer values arrive
            for b in (20, 24, 28):
                ex.controls["bucket_size"].value = b  # returns at once: an update is running
        return run(s)

    monkeypatch.setattr(ex.engine, "run", slow_run)
    count = ex.update_count
    ex.controls["bucket_size"].value = 12
    runs = [b for i, b in enumerate(computed) if i == 0 or computed[i - 1] != b]  # (internal calls repeat)
    assert runs == [12, 28]  # 20 and 24 were replaced before anyone computed them
    assert ex.update_count == count + 1  # the stale result for 12 was never drawn
    assert ex.settings().bucket_size == 28
    assert "B28/" in panels.caption(ex.figures["error"])


def test_browser_bursts_are_drawn_once_with_the_newest_value(ex):
    """Moves arriving from the front end (set_state, as the comm handler calls it) inside a running
    event loop are coalesced: one redraw, newest values, no stale intermediate draws."""
    import asyncio

    count = ex.update_count
    slider = ex.controls["bucket_size"]

    async def burst():
        for b in (20, 24, 28, 32):
            slider.set_state({"value": b})  # queued browser messages, handled back to back
        assert ex.update_count == count  # nothing drawn yet
        await asyncio.sleep(0.3)

    asyncio.run(burst())
    assert ex.update_count == count + 1
    assert "B32/" in panels.caption(ex.figures["error"])
    ex.controls["bucket_size"].value = 16  # from Python (no loop running): synchronous as before
    assert ex.update_count == count + 2


class _ClockLoop:
    """An event loop's timer interface on a clock the test moves (asyncio's call_at/time)."""

    def __init__(self):
        self.now, self.timers = 0.0, []

    def time(self):
        return self.now

    def call_at(self, when, callback):
        handle = type("Handle", (), {"cancelled": False, "cancel": lambda h: setattr(h, "cancelled", True)})()
        self.timers.append((when, callback, handle))
        return handle

    def advance(self, seconds):
        self.now += seconds
        due = [t for t in self.timers if t[0] <= self.now + 1e-12]
        self.timers = [t for t in self.timers if t[0] > self.now + 1e-12]
        for _, callback, handle in sorted(due, key=lambda t: t[0]):
            if not handle.cancelled:
                callback()


def test_page_moves_are_drawn_when_they_stop_coming_or_have_waited_long_enough(ex, monkeypatch):
    """The page's redraw waits until no newer move came for BROWSER_QUIET_S (the kernel handles queued
    messages a few ms apart, so a fixed window from the first one splits a burst), but never more than
    BROWSER_MAX_WAIT_S after the oldest undrawn move (a drag that keeps sending still shows frames)."""
    from kdeformer.widgets import explorer as explorer_module

    quiet, most = explorer_module.BROWSER_QUIET_S, explorer_module.BROWSER_MAX_WAIT_S
    assert (quiet, most) == (0.005, 0.05)
    loop = _ClockLoop()
    monkeypatch.setattr(explorer_module, "_running_loop", lambda: loop)
    slider, drawn = ex.controls["bucket_size"], []
    monkeypatch.setattr(ex, "_update_once", lambda: drawn.append((round(loop.now * 1e3), slider.value)))

    for b in (20, 24, 28, 32, 36):  # five queued moves, handled 4 ms apart: one redraw, 5 ms after the last
        slider.set_state({"value": b})
        loop.advance(0.004)
    assert drawn == []
    loop.advance(0.001)
    assert drawn == [(21, 36)]

    drawn.clear()
    values = [8 + 2 * (i % 12) for i in range(30)]
    for b in values:  # a drag sending every 4 ms for 120 ms: a frame every 50 ms, then the last value
        slider.set_state({"value": b})
        loop.advance(0.004)
    loop.advance(0.005)
    start = 21  # the drag began when the burst was drawn; the test's clock moves in 4 ms steps, so each
    # redraw runs at the first step at or after its due time (71, 123 and 142 ms from the clock's zero)
    assert [t - start for t, _ in drawn] == [52, 104, 125]
    assert [b for _, b in drawn] == [values[12], values[25], values[29]]  # the newest value each time
    assert ex._timer is None and all(h.cancelled for _, _, h in loop.timers)  # nothing left scheduled


def test_real_kernel_draws_queued_browser_moves_once():
    """Five slider messages queued in a real ipykernel, as a browser sends them: one redraw, newest value."""
    import time

    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3", env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        def run(code):
            reply = kc.execute_interactive(code, timeout=120, output_hook=lambda m: out.append(m))
            assert reply["content"]["status"] == "ok", reply["content"]
            return "".join(m["content"].get("text", "") for m in out if m["msg_type"] == "stream")

        out = []
        comm_id = run("from kdeformer.widgets import AttentionExplorer, toy_source\n"
                      "ex = AttentionExplorer(toy_source(n=64), bucket_size=16, seeds=1)\n"
                      "print(ex.controls['bucket_size'].model_id)").strip()
        for b in (20, 24, 28, 32, 36):
            kc.shell_channel.send(kc.session.msg("comm_msg", {
                "comm_id": comm_id, "data": {"method": "update", "state": {"value": b}, "buffer_paths": []}}))
        deadline = time.monotonic() + 60
        probe = "print(ex.update_count, ex._last[0].bucket_size, ex.last_error)"
        while True:
            out = []
            draws, drawn, err = run(probe).split()
            if drawn == "36" or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        # drawn with the newest value; the burst cost one draw (two if the machine stalled mid-burst),
        # never one per message
        assert (drawn, err) == ("36", "None")
        assert 2 <= int(draws) <= 3, draws
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_memory_is_flat_over_many_updates():
    """Bounded caches and in-place figure updates: no Python objects pile up per update."""
    import gc

    ex = AttentionExplorer(toy_source(n=32, d=8, layers=1, heads=1), bucket_size=8, sample_size=8, seeds=1)
    values = [4, 6, 8, 10, 12, 14, 16, 18]

    def churn(n):
        for i in range(n):
            ex.controls["bucket_size"].value = values[i % 8]
            ex.set(seed=i % 5)

    churn(40)  # fill the bounded caches (8 x 5 settings fit)
    gc.collect()
    objects = len(gc.get_objects())
    churn(50)
    gc.collect()
    growth = len(gc.get_objects()) - objects
    assert ex.update_count > 170
    assert growth < 300, f"{growth} more live objects after 100 updates"
    assert all(len(c) <= c.maxsize for c in (ex.engine._runs, ex.engine._errors, ex.engine._curves))


# --------------------------------------------------------------------------- methods, sources, large N
def test_method_switch_to_exact(ex):
    methods = [o[1] for o in ex.controls["method"].options]
    assert {"kdeformer", "exact"} <= set(methods)
    ex.controls["method"].value = "exact"
    assert ex.last_error is None
    assert "cost 1.00 of exact" in ex.status.value
    approx = panels.unpack(trace_of(ex.figures["error"], "approx").z)
    exact = panels.unpack(trace_of(ex.figures["error"], "exact").z)
    np.testing.assert_array_equal(approx, exact)
    assert max(trace_of(ex.figures["error"], "per-query error").y) == 0.0


def test_peer_methods_when_available(src):
    pytest.importorskip("kdeformer.methods")
    ex = AttentionExplorer(src, bucket_size=16, sample_size=24)
    for name in [o[1] for o in ex.controls["method"].options if o[1] not in ("kdeformer", "exact")]:
        ex.controls["method"].value = name
        assert ex.last_error is None, (name, ex.last_error)
        assert ex.settings().method == name and "budget 40" in ex.status.value
        scope = {"q": src.q[0, 0], "k": src.k[0, 0], "v": src.v[0, 0]}
        exec(ex.code_text, scope)  # "copy as code" reproduces the peer's output too
        torch.testing.assert_close(scope["out"], ex._result.out)


@pytest.mark.parametrize("shape", [(N, 8), (3, N, 8), (2, 3, N, 8)])
def test_tuple_sources(shape):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(*shape, generator=g) for _ in range(3))
    ex = AttentionExplorer((q, k, v), bucket_size=16, sample_size=16)
    assert ex.last_error is None
    lead = (1,) * (4 - len(shape)) + shape[:-2]
    assert (ex.controls["layer"].max, ex.controls["head"].max) == (lead[0] - 1, lead[1] - 1)
    if len(shape) >= 3:
        ex.set(head=2)
        assert ex.last_error is None
    s = ex.settings()
    out, tr = kdeformer.kde_attention(q.reshape(-1, N, 8)[s.layer * lead[1] + s.head], k.reshape(-1, N, 8)[s.layer * lead[1] + s.head],
                                      v.reshape(-1, N, 8)[s.layer * lead[1] + s.head], bucket_size=16, sample_size=16,
                                      generator=torch.Generator().manual_seed(0), return_trace=True)
    g = int(tr.q_groups[0])
    np.testing.assert_array_equal(np.asarray(trace_of(ex.figures["samples"], "sampled").x),
                                  torch.unique(tr.sampled[tr.sample_group == g]).numpy())
    with pytest.raises(ValueError, match="source"):
        AttentionExplorer((q, k))


def test_cross_attention_tuple():
    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(40, 8, generator=g), torch.randn(70, 8, generator=g), torch.randn(70, 4, generator=g)
    ex = AttentionExplorer((q, k, v), bucket_size=16, sample_size=16)
    assert ex.last_error is None and "Nq = 40, Nk = 70" in ex.status.value
    out, tr = kdeformer.kde_attention(q, k, v, bucket_size=16, sample_size=16, generator=torch.Generator().manual_seed(0),
                                      return_trace=True)
    z = panels.unpack(trace_of(ex.figures["heavy"], "attention").z)
    assert z.shape == (40, 70)
    overlay = panels.unpack(trace_of(ex.figures["heavy"], "heavy overlay").z)
    np.testing.assert_array_equal(np.nan_to_num(overlay) > 0, tr.heavy_mask()[tr.q_order][:, tr.k_order].numpy())
    torch.testing.assert_close(ex._result.out, out)


def test_large_n_is_pooled_not_sent_cell_by_cell():
    src = toy_source(n=2500, d=8, layers=1, heads=1)
    ex = AttentionExplorer(src, bucket_size=128, sample_size=64, seeds=1)
    assert ex.last_error is None
    z = panels.unpack(trace_of(ex.figures["heavy"], "attention").z)
    assert z.shape == (250, 250)  # 2500 tokens max-pooled by 10
    for name in ("approx", "exact", "error"):
        assert panels.unpack(trace_of(ex.figures["error"], name).z).shape[0] <= 128
    # max-pooling: each cell is the largest entry of its 10 x 10 tokens (checked on one cell)
    out, tr = reference(src, ex.settings())
    q, k = src.q[0, 0], src.k[0, 0]
    logits = src.scale * (q[tr.q_order[:10]].double() @ k[tr.k_order[:10]].double().T)
    log_d = torch.logsumexp(src.scale * (q[tr.q_order[:10]].double() @ k.double().T), -1, keepdim=True)
    assert z[0, 0] == pytest.approx(max(float(torch.log10(torch.exp(logits - log_d)).max()), panels.LOG_FLOOR), abs=1e-3)
    assert "max-pooled 10x10" in panels.caption(ex.figures["heavy"])


def test_max_pool_and_packing():
    x = torch.arange(35, dtype=torch.float32).view(5, 7)
    got = panels.max_pool(x, panels.Grid(0, 5, 2), panels.Grid(0, 7, 3))
    want = torch.tensor([[9.0, 12.0, 13.0], [23.0, 26.0, 27.0], [30.0, 33.0, 34.0]])
    torch.testing.assert_close(got, want)
    z = np.random.default_rng(0).random((3, 4)).astype(np.float32)
    z[1, 2] = np.nan
    np.testing.assert_array_equal(panels.unpack(panels.packed(z)), z)


# --------------------------------------------------------------------------- tuning aids and export
def test_pin_and_copy_as_code(ex, src):
    n0 = len(ex.figures["error"].data)
    ex.pin()
    ex.set(sample_size=48)
    ex.pin()
    pins = [t for t in ex.figures["error"].data if t.name.startswith("pin ")]
    assert len(pins) == 2 and pins[0].x != pins[1].x
    ex.clear_pins()
    assert len(ex.figures["error"].data) == n0
    code = ex.show_code()
    assert ex.code.layout.display is None and "kde_attention(" in ex.code.value.replace("&#x27;", "'")
    scope = {"q": src.q[0, 0], "k": src.k[0, 0], "v": src.v[0, 0]}
    exec(code, scope)  # the shown call reproduces the explorer's output
    torch.testing.assert_close(scope["out"], ex._result.out)
    assert code == call_code(ex.settings(), src.scale)


def test_save_html_is_standalone(ex, tmp_path):
    path = tmp_path / "explorer.html"
    ex.save_html(path, grid={"bucket_size": [8, 16, 32]})
    text = path.read_text()
    assert len(text) > 3_000_000  # plotly.js is inside
    assert "Plotly.newPlot" in text and "plotly.js" in text.lower()
    assert not re.search(r"<script[^>]+src=[\"']https?:", text)
    assert text.count('class="kde-figure-') == len(ex.figures) + 1
    assert '"frames"' in text or "addFrames" in text


def test_save_png_or_clear_message(ex, tmp_path):
    try:
        import playwright  # noqa: F401
        have = os.path.exists("/usr/bin/chromium")
    except ImportError:
        have = False
    if not have:
        with pytest.raises(RuntimeError, match="chromium|playwright"):
            ex.save_png(tmp_path / "x.png")
        return
    path = ex.save_png(tmp_path / "heavy.png", "heavy", width=600)
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


# --------------------------------------------------------------------------- the default: MiniLM on real text
def test_default_explorer_opens_minilm():
    try:
        load_text_source(None)
    except Exception as exc:  # sources not there yet, or the model is not cached on this machine
        pytest.skip(f"MiniLM source unavailable: {exc}")
    ex = AttentionExplorer()
    assert ex.last_error is None and ex.settings().layer == 0 and ex.settings().head == 0
    src = ex.source
    assert (ex.controls["layer"].max, ex.controls["head"].max) == (src.num_layers - 1, src.num_heads - 1)
    assert not ex.controls["text"].disabled
    n_before = src.num_tokens
    before = snapshot(ex)
    ex.controls["text"].value = "   "
    assert ex.last_error and "text" in ex.last_error and snapshot(ex) == before
    stamp_before = ex.stamp(ex.settings(), ex.display_options())
    ex.controls["text"].value = "The cat sat on the mat because it was warm."
    assert ex.last_error is None and ex.source.num_tokens < n_before
    stamp = ex.stamp(ex.settings(), ex.display_options())  # same settings, a new text: a new stamp
    assert stamp != stamp_before and stamp.startswith("text1 ") and set(ex.board.stamps.values()) == {stamp}
    assert ex.controls["query"].max == ex.source.num_tokens - 1
    assert any("'cat'" in t for t in trace_of(ex.figures["buckets"], "queries").hovertext)


def test_board_holds_the_current_figures_for_late_pages(ex):
    """Voila and reloaded tabs read the model's state: it must be the current figures, not a snapshot."""
    ex.set(sample_size=31)
    fig = ex.board.fig_samples
    assert "s = 31 columns per query" in fig["layout"]["meta"]["caption"]
    assert fig["rev"] <= ex.board.revision and len(fig["data"]) == len(ex.figures["samples"].data)
    assert ex.board.fig_heavy["data"][0]["z"] == {"ref": "z_heavy_0"}
    z = ex.board.z_heavy_0
    assert set(z) == {"dtype", "bdata", "shape"}  # a typed array, not nested lists
    np.testing.assert_array_equal(panels.unpack(z), panels.unpack(trace_of(ex.figures["heavy"], "attention").z))
    assert ex.board.stamps["error"] == ex.stamp(ex.settings(), ex.display_options())
    assert ex.board.renderer == "canvas" and ex.board._plotly_js == b""  # the explorer does not ship plotly.js


def test_plotly_boards_carry_plotly_js_and_canvas_boards_refuse_what_they_cannot_draw():
    fig = go.Figure(go.Scatter(x=[0, 1], y=[1, 0]))
    board = PlotBoard({"a": fig})
    assert board.renderer == "plotly" and b"plotly.js" in board._plotly_js[:400]
    assert PlotBoard({"a": fig}, renderer="canvas")._plotly_js == b""
    with pytest.raises(ValueError, match="renderer must be one of"):
        PlotBoard({"a": fig}, renderer="svg")
    with pytest.raises(ValueError, match="'b' has contour traces: renderer='canvas' draws bar, heatmap, scatter"):
        PlotBoard({"a": fig, "b": go.Figure(go.Contour(z=[[0, 1], [1, 0]]))}, renderer="canvas")
    canvas = PlotBoard({"a": fig}, renderer="canvas")
    canvas.figures["a"].add_trace(go.Contour(z=[[0, 1], [1, 0]]))
    with pytest.raises(ValueError, match="contour"):
        canvas.refresh("a")


def test_sampling_labels_name_the_authors_choice(ex):
    labels = [lab for lab, _ in ex.controls["sampling"].options]
    assert any("authors" in lab and "value_norm" in lab for lab in labels)


def test_set_zoom_none_means_everything(ex):
    assert ex.set(zoom=(5, 20)) and ex.display_options()["zoom"] == (5, 20)
    assert ex.set(zoom=None) and ex.display_options()["zoom"] is None and ex.last_error is None
    assert not ex.set(zoom="all") and "zoom" in ex.last_error


def test_call_code_keeps_its_old_name():
    assert kde_call_code is call_code


def test_causal_source_shows_the_lower_triangle_only():
    """A source with is_causal=True: the core runs causal, the upper triangle stays empty, and the cost
    counts the columns used over the lower triangle."""
    from kdeformer.sources import AttentionSource

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 120, 16, generator=g) for _ in range(3))  # (L, H, N, D)
    src = AttentionSource("causal", "", [f"t{i}" for i in range(120)], q, k, v, 0.25, None, {}, is_causal=True)
    ex = AttentionExplorer(src, bucket_size=16, sample_size=16, seeds=1, order="original")
    assert ex.last_error is None
    upper = np.triu_indices(120, 1)
    for name in ("approx", "exact"):
        z = panels.unpack(trace_of(ex.figures["error"], name).z)
        assert np.isnan(z[upper]).all(), name  # nothing above the diagonal
    out, tr = kdeformer.kde_attention(q[0, 0], k[0, 0], v[0, 0], bucket_size=16, sample_size=16, scale=0.25,
                                      is_causal=True, sampling=ex.settings().sampling,
                                      generator=torch.Generator().manual_seed(0), return_trace=True)
    torch.testing.assert_close(ex._result.out, out)
    want = kde_multiply_adds(120, 120, 16, 16, bucket_size=16, sample_size=16, sampling=ex.settings().sampling,
                             is_causal=True) / kdeformer.multiply_adds("exact", 120, 120, 16, 16, is_causal=True)
    assert f"cost {want:.2f} of exact" in ex.status.value and "lower triangle" in ex.status.value
    assert "causal: the local window" in panels.caption(ex.figures["heavy"])


def test_buckets_caption_says_what_the_hashing_did(src):
    """pps has no key blocks: the hash codes only order the queries (when the LSH order wins)."""
    for sampling in ("pps", "column_norm"):
        ex = AttentionExplorer(src, bucket_size=16, sample_size=24, num_projs=5, seed=3, sampling=sampling, seeds=1)
        _, tr = reference(src, ex.settings())
        text = panels.caption(ex.figures["buckets"])
        if sampling == "column_norm":
            assert f"{tr.num_blocks} key blocks" in text and "pps" not in text
            continue
        blocks = int(tr.row_block.max()) + 1
        order = "token order" if bool(tr.extras["token_order"].reshape(-1)[0]) else "the LSH order"
        assert f"cut into {blocks} blocks in {order}" in text and "key blocks" not in text
        assert "keys are not blocked" in text


def test_python_exits_cleanly_while_neighbours_are_warmed():
    """A script that ends right after a move (the warming thread busy in torch) exits with status 0:
    a daemon thread inside a torch operator at interpreter shutdown aborts the process (status 134)."""
    import subprocess
    import sys

    script = ("from kdeformer.widgets import AttentionExplorer, toy_source\n"
              "ex = AttentionExplorer(toy_source(n=1536, d=32, layers=3, heads=3))\n"
              "ex.set(head=1)\n"
              "assert ex._warm_thread is not None and ex._warm_thread.is_alive()\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "terminate called" not in done.stderr, done.stderr[-2000:]


def test_prefetch_must_be_a_bool():
    with pytest.raises(ValueError, match="prefetch must be True or False, got 'no'"):
        AttentionExplorer(toy_source(n=32), prefetch="no")


def test_python_exits_cleanly_while_a_texts_other_layers_are_captured():
    """The same at the end of a script that just edited the text: the model's forward for the other
    layers is under way in the background, and stops within a module at exit (status 0)."""
    import subprocess
    import sys

    try:
        load_text_source(None)
    except Exception as exc:
        pytest.skip(f"MiniLM source unavailable: {exc}")
    script = ("from kdeformer.widgets import AttentionExplorer\n"
              "ex = AttentionExplorer(seeds=1)\n"
              "assert ex.set_text('At the exit: ' + ex.controls['text'].value)\n"
              "assert ex.engine.layers_ready == 1 and ex._warm_thread.is_alive()\n")
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", script], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0 and "terminate called" not in done.stderr, done.stderr[-2000:]
