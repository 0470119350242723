"""AttentionExplorer: move a slider, see what KDEformer hashed, computed exactly, sampled and got wrong.

Controls are standard ipywidgets, panels are plotly FigureWidgets; all numbers come from `state.Engine`
(the core's trace) and the pure functions of `panels`. Updates are synchronous and coalesced: setting a
control's `.value` from Python redraws before the assignment returns, and values that arrive while an
update runs replace each other, so only the newest one is drawn.
"""
from __future__ import annotations

import asyncio
import contextlib
import html
import threading
import time
from dataclasses import fields

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go
import torch

from kdeformer.core import BUCKET_ORDERS, MAX_PROJS

from . import panels
from .state import (
    Engine,
    MATERIALIZE_MAX,
    Settings,
    check_settings,
    exact_row_fn,
    kde_call_code,
    resolve_source,
    text_capable,
    sampling_choices,
    key_tokens,
    load_text_source,
    toy_source,
)

FIGURES = ("buckets", "heavy", "samples", "error", "inspector")
DISPLAY = ("log_color", "order", "zoom", "query")
CONTROL_NAMES = ("text", "layer", "head", "method", "bucket_size", "sample_size", "num_projs", "sampling",
                 "bucket_order", "seed", *DISPLAY)
SLIDER_LAYOUT = dict(width="310px")
SEED_MAX = 2**31 - 1
BROWSER_DEBOUNCE_S = 0.02  # moves from the browser that arrive within this window are drawn once


def _running_loop():
    """The kernel's asyncio loop when called from a comm message handler; None in plain Python."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


@contextlib.contextmanager
def torch_threads(n):
    """Run with n torch threads (None: leave as is). One head's work is small: intra-op threads mostly
    add overhead, and on a busy machine they make an update many times slower."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    if old != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if old != n:
            torch.set_num_threads(old)


def _css(widget, name: str):
    widget.add_class(name)
    return widget


class AttentionExplorer(widgets.VBox):
    """Live view of KDEformer on one attention head.

    Args:
        source: None (MiniLM on the bundled text), a text (MiniLM on it), an AttentionSource-like object
            (q, k, v (L, H, N, D), tokens, scale, key_mask), or a (q, k, v) tuple of tensors each
            (N, D), (H, N, D) or (L, H, N, D).
        **params: initial values of any control: layer, head, method, bucket_size, sample_size, num_projs,
            sampling, bucket_order, seed, log_color, order ("sorted"/"original"), zoom ((lo, hi) token
            range), query (row inspector); and seeds (readout averages, default 3), max_cells (matrix
            display side, default 256), error_cells (error-panel matrices, default 128), curve_seeds
            (seeds per point of the error-vs-budget curve, default 1), threads (torch threads used inside
            an update, default 1: one head's work is small; None leaves torch's setting alone).

    Methods other than KDEformer get ``budget = bucket_size + sample_size`` key columns per query
    (`kdeformer.methods.approximate`); the buckets, heavy and samples panels always show KDEformer's
    trace for the current setting, the error panel and the inspector show the chosen method.

    Attributes: controls, figures, readout, message, status, code (HTML), last_error, update_count,
    pins (pinned curves), timings (seconds of the last update's steps).
    """

    def __init__(self, source=None, **params):
        super().__init__()
        self.add_class("kde-explorer")
        known = {f.name for f in fields(Settings)} | set(DISPLAY) | {"seeds", "curve_seeds", "max_cells", "error_cells", "threads"}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"unknown explorer parameter(s) {unknown}; allowed: {sorted(known)}")
        self.last_error: str | None = None
        self.update_count = 0
        self.timings: dict = {}
        self.pins: list = []
        self.max_cells = int(params.pop("max_cells", 256))
        self.error_cells = int(params.pop("error_cells", 128))
        seeds = int(params.pop("seeds", 3))
        curve_seeds = int(params.pop("curve_seeds", 1))
        self.threads = params.pop("threads", 1)
        startup_note = ""
        self._text_model = source is None or isinstance(source, str)
        try:
            src = resolve_source(source)
        except ValueError:
            raise
        except Exception as exc:  # the model could not be loaded: keep a working explorer on toy data
            if not self._text_model:
                raise
            src = toy_source(n=256, d=32, layers=1, heads=2)
            self._text_model = False
            startup_note = f"MiniLM could not be loaded ({type(exc).__name__}: {exc}); showing synthetic data."
        self._text_model = self._text_model or text_capable(src)
        self.engine = Engine(src, seeds=seeds, curve_seeds=curve_seeds)
        self._lock = threading.Lock()
        self._pending = False
        self._suspend = False
        self._scheduled = False
        self._applied: dict = {}  # figure -> values last written (unchanged ones are not re-sent)
        self._last = None  # (settings, display) drawn last
        self._result = None
        self._row_labels: dict = {}
        self._build_controls(params)
        self._build_outputs()
        self._layout()
        for name, w in self.controls.items():
            w.observe(self._on_text if name == "text" else self._on_control, names="value")
        self.request_update()
        if startup_note:
            self._show_error(startup_note)

    # ------------------------------------------------------------------ construction
    @property
    def source(self):
        return self.engine.src

    def _sizes(self):
        src = self.engine.src
        return src.q.shape[0], src.q.shape[1], src.q.shape[2], src.k.shape[2]

    def _build_controls(self, p):
        # refuse initial values that the widgets would clamp silently or reject with a TraitError
        self._validate_values({k: v for k, v in p.items() if k in CONTROL_NAMES})
        layers, heads, nq, nk = self._sizes()
        defaults = Settings()
        methods = self.engine.methods
        cu = dict(continuous_update=False, style={"description_width": "92px"}, layout=SLIDER_LAYOUT)
        c = {}
        c["text"] = widgets.Textarea(
            value=getattr(self.engine.src, "text", "") or "", description="text", continuous_update=False,
            disabled=not self._text_model, layout=dict(width="98%", height="70px"),
            placeholder="text to run through the model (MiniLM sources only)")
        c["layer"] = widgets.IntSlider(value=p.get("layer", 0), min=0, max=layers - 1, description="layer", **cu)
        c["head"] = widgets.IntSlider(value=p.get("head", 0), min=0, max=heads - 1, description="head", **cu)
        c["method"] = widgets.Dropdown(options=[(lab, name) for name, lab in methods.items()],
                                       value=p.get("method", "kdeformer"), description="method",
                                       style=cu["style"], layout=SLIDER_LAYOUT)
        c["bucket_size"] = widgets.IntSlider(value=min(p.get("bucket_size", defaults.bucket_size), nk), min=1, max=nk,
                                             description="bucket_size", **cu)
        c["sample_size"] = widgets.IntSlider(value=p.get("sample_size", min(defaults.sample_size, 4 * nk)), min=1,
                                             max=self._sample_max(nk), description="sample_size", **cu)
        c["num_projs"] = widgets.IntSlider(value=p.get("num_projs", defaults.num_projs), min=1, max=MAX_PROJS,
                                           description="num_projs", **cu)
        c["sampling"] = widgets.Dropdown(options=list(sampling_choices()), value=p.get("sampling", defaults.sampling),
                                         description="sampling", style=cu["style"], layout=SLIDER_LAYOUT)
        c["bucket_order"] = widgets.Dropdown(options=list(BUCKET_ORDERS), value=p.get("bucket_order", defaults.bucket_order),
                                             description="bucket_order", style=cu["style"], layout=SLIDER_LAYOUT)
        c["seed"] = widgets.BoundedIntText(value=p.get("seed", 0), min=0, max=SEED_MAX, description="seed",
                                           style=cu["style"], layout=SLIDER_LAYOUT)
        c["log_color"] = widgets.Checkbox(value=p.get("log_color", True), description="log colour scale", indent=False)
        c["order"] = widgets.ToggleButtons(options=["sorted", "original"], value=p.get("order", "sorted"),
                                           tooltips=["hash-sorted order (blocks on the diagonal)", "token order"],
                                           style={"button_width": "80px"})
        zoom = p.get("zoom") or (0, nq - 1)
        c["zoom"] = widgets.IntRangeSlider(value=tuple(zoom), min=0, max=nq - 1, description="zoom", **cu)
        c["query"] = widgets.IntSlider(value=p.get("query", 0), min=0, max=nq - 1, description="inspect query", **cu)
        for name, w in c.items():
            _css(w, f"kde-control-{name}")
        self.controls = c

    @staticmethod
    def _sample_max(nk: int) -> int:
        return int(min(16384, max(256, 4 * nk)))

    def _build_outputs(self):
        self.status = _css(widgets.HTML(), "kde-status")
        self.message = _css(widgets.HTML(), "kde-message")
        self.readout = _css(widgets.HTML(), "kde-readout")
        self.code = _css(widgets.HTML(), "kde-code")
        self.code.layout.display = "none"
        self.pin_button = _css(widgets.Button(description="pin curve", icon="thumb-tack",
                                              tooltip="keep the current error-vs-budget curve"), "kde-button-pin")
        self.clear_pins_button = _css(widgets.Button(description="clear pins"), "kde-button-clear-pins")
        self.code_button = _css(widgets.ToggleButton(description="copy as code", icon="code",
                                                     tooltip="show the kde_attention(...) call"), "kde-button-code")
        self.pin_button.on_click(lambda _: self.pin())
        self.clear_pins_button.on_click(lambda _: self.clear_pins())
        self.code_button.observe(lambda ch: self.show_code(ch["new"]), names="value")
        makers = dict(buckets=panels.make_buckets, heavy=panels.make_heavy, samples=panels.make_samples,
                      error=panels.make_error, inspector=panels.make_inspector)
        self.figures = {}
        for name in FIGURES:
            fig = go.FigureWidget(makers[name]())
            fig.add_class(f"kde-figure-{name}")
            self.figures[name] = fig
        # clicking a query (a matrix row, a point, a per-query error) opens it in the row inspector
        hm = panels.trace_by_name(self.figures["heavy"], "attention")
        hm.on_click(self._on_matrix_click)
        for fig_name, trace_name in (("buckets", "queries"), ("error", "per-query error"), ("error", "normaliser")):
            panels.trace_by_name(self.figures[fig_name], trace_name).on_click(self._on_point_click)
        panels.trace_by_name(self.figures["error"], "exact").on_click(self._on_matrix_click)

    def _layout(self):
        c = self.controls
        col = lambda *ws: widgets.VBox(list(ws))  # noqa: E731
        grid = widgets.HBox([
            col(c["layer"], c["head"], c["method"]),
            col(c["bucket_size"], c["sample_size"], c["num_projs"]),
            col(c["sampling"], c["bucket_order"], c["seed"]),
            col(c["order"], c["log_color"], c["zoom"], c["query"]),
        ], layout=dict(flex_flow="row wrap"))
        buttons = widgets.HBox([self.pin_button, self.clear_pins_button, self.code_button])
        self.children = [c["text"], grid, buttons, self.status, self.message, self.readout, self.code,
                         *(self.figures[n] for n in FIGURES)]

    # ------------------------------------------------------------------ reading the controls
    def settings(self) -> Settings:
        c = self.controls
        return Settings(layer=c["layer"].value, head=c["head"].value, method=c["method"].value,
                        bucket_size=c["bucket_size"].value, sample_size=c["sample_size"].value,
                        num_projs=c["num_projs"].value, sampling=c["sampling"].value,
                        bucket_order=c["bucket_order"].value, seed=c["seed"].value)

    def display_options(self) -> dict:
        c = self.controls
        nq = self._sizes()[2]
        lo, hi = c["zoom"].value
        zoom = None if (lo, hi) == (0, nq - 1) else (lo, hi)
        return dict(log_color=bool(c["log_color"].value), order=c["order"].value, zoom=zoom, query=int(c["query"].value))

    # ------------------------------------------------------------------ updates
    def _on_control(self, change):
        """A control moved. From Python: redraw now. From the browser (inside a kernel): redraw on the
        next turn of the event loop, so a burst of queued moves (a held arrow key, a fast drag) is
        drawn once, with the newest values, instead of once per stale value."""
        if self._suspend:
            return
        owner = change.get("owner")
        loop = _running_loop() if owner is not None and getattr(owner, "_property_lock", None) else None
        if loop is None:
            self.request_update()
            return
        self._pending = True
        if not self._scheduled:
            self._scheduled = True
            loop.call_later(BROWSER_DEBOUNCE_S, self._run_scheduled)

    def _run_scheduled(self):
        self._scheduled = False
        if self._pending:
            self.request_update()

    def request_update(self):
        """Redraw for the controls' current values; coalesces requests that arrive while one runs."""
        self._pending = True
        while self._pending:
            if not self._lock.acquire(blocking=False):
                return  # the running update will see _pending and redraw with the newest values
            try:
                with torch_threads(self.threads):
                    while self._pending:
                        self._pending = False
                        self._update_once()
            finally:
                self._lock.release()

    def _show_error(self, text: str):
        self.last_error = text
        self.message.value = f'<div style="color:#b00020"><b>Not updated:</b> {html.escape(text)} (showing the last good result)</div>'

    def _clear_error(self):
        self.last_error = None
        self.message.value = ""

    def _update_once(self):
        t0 = time.perf_counter()
        try:
            s = check_settings(self.settings(), self.engine.src, self.engine.methods)
            disp = self.display_options()
            last_s, last_d = self._last if self._last else (None, None)
            # newer values arriving while computing make this one stale: drop it, the loop draws the newest
            res = self.engine.run(s)
            if self._pending:
                return
            summary = self.engine.summary(s)
            if self._pending:
                return
            curve = self.engine.curve(s)
            t1 = time.perf_counter()
            if self._pending:
                return
            self._draw(s, disp, res, summary, curve, self._stale_panels(s, disp, last_s, last_d))
        except Exception as exc:  # any failure: message in the UI, figures stay as they were
            self._show_error(f"{type(exc).__name__}: {exc}" if not isinstance(exc, ValueError) else str(exc))
            return
        t2 = time.perf_counter()
        self._last = (s, disp)
        self._result = res
        self.update_count += 1
        self.timings = dict(compute=t1 - t0, draw=t2 - t1, total=t2 - t0)
        self._clear_error()
        self._write_status(s, res, t2 - t0)

    def _row_fns(self, s: Settings, res):
        q, k, v = self.engine.head(s.layer, s.head)
        ex = self.engine.exact(s.layer, s.head)
        exact_fn = exact_row_fn(q, k, self.engine.scale, ex, self.engine.key_mask)
        if s.method == "kdeformer":
            approx_fn = lambda rows: panels.kde_rows(res.kde_trace, rows, res.matrix)  # noqa: E731
        elif res.matrix is not None:
            approx_fn = lambda rows: res.matrix[rows]  # noqa: E731
        elif s.method == "exact":
            approx_fn = exact_fn
        else:
            approx_fn = None
        return ex, exact_fn, approx_fn

    @staticmethod
    def _stale_panels(s: Settings, disp: dict, last_s, last_d) -> set:
        """Which panels depend on what changed since the last drawn update (a move redraws only those)."""
        if last_s is None:
            return set(FIGURES) | {"readout"}
        def key(x: Settings, fields_):
            return tuple(getattr(x, f) for f in fields_)

        hashing = ("layer", "head", "num_projs", "bucket_order", "seed", "bucket_size")
        view = ("log_color", "order", "zoom")
        stale = set()
        if key(s, hashing) != key(last_s, hashing):
            stale |= {"buckets"}
        if key(s, hashing) != key(last_s, hashing) or [disp[k] for k in view] != [last_d[k] for k in view]:
            stale |= {"heavy"}
        sampling = hashing + ("sample_size", "sampling")
        if key(s, sampling) != key(last_s, sampling):
            stale |= {"samples"}
        if s != last_s or [disp[k] for k in view] != [last_d[k] for k in view]:
            stale |= {"error"}
        if s != last_s:
            stale |= {"readout", "inspector"}
        if disp["query"] != last_d["query"]:
            stale |= {"inspector"}
        return stale

    def _draw(self, s, disp, res, summary, curve, stale: set):
        tr = res.kde_trace
        qt, kt = self.engine.src.tokens, key_tokens(self.engine.src)
        ex, exact_fn, approx_fn = self._row_fns(s, res)
        updates = {}
        if "buckets" in stale:
            pca = self.engine._pcas.get_or((s.layer, s.head), lambda: panels.pca_2d(tr.query.float(), tr.key.float()))
            updates["buckets"] = panels.buckets_update(tr, qt, kt, pca=pca)
        if "samples" in stale:
            updates["samples"] = panels.samples_update(tr, kt)
        if "heavy" in stale:
            view = (disp["order"], disp["zoom"], self.max_cells)
            key = (s.layer, s.head, s.num_projs, s.bucket_order, s.seed) + view  # what the sorted order depends on
            pooled = self.engine._pooled.get(key)
            updates["heavy"] = panels.heavy_update(tr, exact_fn, qt, kt, order=disp["order"], log_color=disp["log_color"],
                                                   zoom=disp["zoom"], max_cells=self.max_cells,
                                                   mass=self._heavy_mass(s, tr, exact_fn), exact_pooled=pooled)
            self.engine._pooled.get_or(key, lambda: updates["heavy"].info["pooled"])
        if "error" in stale:
            updates["error"] = panels.error_update(tr, exact_fn, approx_fn, ex, res.out, res.log_d, qt, kt, curve,
                                                   order=disp["order"], log_color=disp["log_color"], zoom=disp["zoom"],
                                                   max_cells=self.error_cells)
        label = self.engine.methods.get(s.method, s.method)
        query = min(disp["query"], tr.query.shape[-2] - 1)
        if "inspector" in stale:
            updates["inspector"] = panels.inspector_update(tr, query, exact_fn, approx_fn, qt, kt, label)
        # compute everything first, then write all figures (no half-drawn state on failure)
        for name, upd in updates.items():
            panels.apply(self.figures[name], upd, self._applied.setdefault(name, {}))
        self.panel_info = {**getattr(self, "panel_info", {}), **{n: u.info for n, u in updates.items()}}
        if "heavy" in updates:
            info = updates["heavy"].info
            gr, ri = info["grid_rows"], info["row_index"]
            labels = panels.trace_by_name(self.figures["heavy"], "attention").y
            self._row_labels = {lab: int(ri[gr.lo + b * gr.width]) for b, lab in enumerate(labels)}
        if "readout" in stale:
            mass = float(self._heavy_mass(s, tr, exact_fn).mean())
            self.readout.value = self._readout_html(s, summary, mass)
            self.code.value = f"<pre style='font-size:12px;user-select:all'>{html.escape(kde_call_code(s, self.engine.scale))}</pre>"

    def _heavy_mass(self, s: Settings, tr, exact_fn):
        """Exact softmax mass in each query's heavy block (cached: it depends on the hashing only)."""
        key = (s.layer, s.head, s.num_projs, s.bucket_order, s.seed, s.bucket_size)
        return self.engine._masses.get_or(key, lambda: panels.heavy_mass(tr, exact_fn))

    def _readout_html(self, s: Settings, summary, heavy_mass) -> str:
        m, sd = summary.mean_sd(summary.spectral)
        tm, tsd = summary.mean_sd(summary.theory)
        n = len(summary.spectral)
        rows = [
            ("relative spectral error ‖Õ−O‖₂/‖O‖₂", f"{m:.4f} ± {sd:.4f}", f"mean ± sd over {n} seeds ({s.seed}…{s.seed + n - 1})"),
            ("theory form ‖Õ−O‖₂/(‖D⁻¹A‖₂‖V‖₂)", f"{tm:.4f} ± {tsd:.4f}" if summary.theory else "n/a", "the paper's normalisation"),
            ("relative Frobenius error", f"{summary.frobenius:.4f}", f"seed {s.seed}"),
            ("normaliser error mean |D~/D − 1|", "n/a" if summary.normalizer is None else f"{summary.normalizer:.4f}", f"seed {s.seed}"),
        ]
        if heavy_mass is not None:
            rows.append(("softmax mass in the heavy blocks", f"{heavy_mass:.1%}", "KDEformer blocks, exact weights"))
        body = "".join(f"<tr><td>{html.escape(a)}</td><td style='text-align:right;padding:0 12px'><b>{b}</b></td>"
                       f"<td style='color:#666'>{html.escape(c)}</td></tr>" for a, b, c in rows)
        return f"<table style='font-size:13px'>{body}</table>"

    def _write_status(self, s: Settings, res, seconds: float):
        tr = res.kde_trace
        nq, nk = tr.query.shape[-2], tr.key.shape[-2]
        cost = self.engine.cost_fraction(s, tr)
        label = self.engine.methods.get(s.method, s.method)
        if s.method == "kdeformer":
            detail = "one block: exact" if tr.num_blocks <= 1 else (
                f"block of {int(tr.key_block_len.max())} + {s.sample_size} samples per query")
        elif s.method == "exact":
            detail = "all keys"
        else:
            detail = f"budget {s.budget} columns per query"
        n_txt = f"N = {nq}" if nq == nk else f"Nq = {nq}, Nk = {nk}"
        self.status.value = (f"<span style='font-size:13px'>{html.escape(self.engine.src.name)} · layer {s.layer} head {s.head} · "
                             f"{n_txt} · {html.escape(label)}: cost {cost:.2f} of exact ({detail}) · "
                             f"updated in {seconds * 1e3:.0f} ms (#{self.update_count})</span>")

    # ------------------------------------------------------------------ text
    def _on_text(self, change):
        if self._suspend:
            return
        self.set_text(change["new"])

    def set_text(self, text: str) -> bool:
        """Re-run the model on `text`; on failure show why and keep everything as it was."""
        if not self._text_model:
            self._show_error("this source has no model to re-run: text editing needs a MiniLM source")
            return False
        try:
            src = load_text_source(text, like=self.engine.src)
            if getattr(src, "num_tokens", src.q.shape[2]) < 2:
                raise ValueError("text must give at least 2 tokens")
        except Exception as exc:
            self._show_error(f"text not used: {exc}")
            return False
        old = self.engine
        self.engine = Engine(src, seeds=old.seeds, curve_factors=old.curve_factors, curve_seeds=old.curve_seeds)
        _, _, nq, nk = self._sizes()
        c = self.controls
        self._suspend = True
        try:
            with self.hold_trait_notifications():
                c["bucket_size"].max = nk
                c["sample_size"].max = self._sample_max(nk)
                c["zoom"].max = nq - 1
                c["zoom"].value = (0, nq - 1)
                c["query"].max = nq - 1
                if c["text"].value != text:
                    c["text"].value = text
        finally:
            self._suspend = False
        self._last = None
        self.request_update()
        return self.last_error is None

    # ------------------------------------------------------------------ python API
    def _choices(self) -> dict:
        return dict(method=list(self.engine.methods), sampling=list(sampling_choices()), bucket_order=list(BUCKET_ORDERS),
                    order=["sorted", "original"])

    def _validate_values(self, values: dict):
        """ValueError naming the control and its allowed range (before any widget is touched)."""
        layers, heads, nq, nk = self._sizes()
        limits = dict(layer=(0, layers - 1), head=(0, heads - 1), bucket_size=(1, None), sample_size=(1, self._sample_max(nk)),
                      num_projs=(1, MAX_PROJS), seed=(0, SEED_MAX), query=(0, nq - 1))
        choices = self._choices()
        names = set(CONTROL_NAMES)
        for name, value in values.items():
            if name not in names:
                raise ValueError(f"unknown control {name!r}; controls: {sorted(names)}")
            if name in limits:
                lo, hi = limits[name]
                if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
                    rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
                    raise ValueError(f"{name} must be an integer in {rng}, got {value!r}")
            if name in choices and value not in choices[name]:
                raise ValueError(f"{name} must be one of {choices[name]}, got {value!r}")
            if name == "zoom" and value is not None:
                if not (isinstance(value, (tuple, list)) and len(value) == 2 and 0 <= value[0] <= value[1] <= nq - 1):
                    raise ValueError(f"zoom must be a token range (lo, hi) with 0 <= lo <= hi <= {nq - 1}, got {value!r}")
            if name in ("log_color",) and not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")
            if name == "text" and not isinstance(value, str):
                raise ValueError(f"text must be a str, got {type(value).__name__}")

    def set(self, **values) -> bool:
        """Set several controls at once with one redraw. Invalid values change nothing and show a message.

        bucket_size above N is valid (exact attention) and is shown as N. Returns True when applied.
        """
        try:
            self._validate_values(values)
        except ValueError as exc:
            self._show_error(str(exc))
            return False
        if "text" in values:
            text = values.pop("text")
            if not self.set_text(text):
                return False
        nk = self._sizes()[3]
        if "bucket_size" in values:
            values["bucket_size"] = min(values["bucket_size"], nk)
        self._suspend = True
        try:
            for name, value in values.items():
                self.controls[name].value = tuple(value) if name == "zoom" else value
        finally:
            self._suspend = False
        self.request_update()
        return self.last_error is None

    def inspect(self, query: int):
        """Open query `query` (token index) in the row inspector."""
        self.set(query=int(query))

    def _on_matrix_click(self, trace, points, state):
        if points.ys:
            idx = self._row_labels.get(points.ys[0])
            if idx is None and isinstance(points.ys[0], str) and points.ys[0].startswith("q"):
                try:
                    idx = int(points.ys[0][1:].split()[0])
                except ValueError:
                    idx = None
            if idx is not None:
                self.inspect(idx)

    def _on_point_click(self, trace, points, state):
        if points.point_inds:
            cd = trace.customdata
            if cd is not None:
                row = cd[points.point_inds[0]]
                self.inspect(int(row[0]) if np.ndim(row) else int(row))  # query index comes first

    # ------------------------------------------------------------------ tuning aids
    def pin(self):
        """Keep the current error-vs-budget curve in the error figure."""
        if self._last is None:
            return
        curve = self.engine.curve(self._last[0])
        i = len(self.pins)
        self.pins.append(curve)
        self.figures["error"].add_trace(panels.pinned_trace(curve, i))

    def clear_pins(self):
        self.pins.clear()
        fig = self.figures["error"]
        fig.data = [t for t in fig.data if not (t.name or "").startswith("pin ")]

    def show_code(self, visible: bool = True) -> str:
        """Show (or hide) the kde_attention(...) call of the current setting; returns the code."""
        self.code.layout.display = None if visible else "none"
        if self.code_button.value != visible:
            self.code_button.value = visible
        return kde_call_code(self.settings(), self.engine.scale)

    @property
    def code_text(self) -> str:
        return kde_call_code(self.settings(), self.engine.scale)

    # ------------------------------------------------------------------ export
    def figure_dicts(self) -> dict:
        return {name: fig.to_dict() for name, fig in self.figures.items()}

    def _repr_mimebundle_(self, **kwargs):
        """Display: first refresh every panel's snapshot, then show the container.

        A plotly FigureWidget hands a page that connects later (Voila, a reloaded tab) the data it held
        when it was last displayed; inside a container it is never displayed itself, so the explorer
        does it here and a late page shows the current panels rather than empty ones.
        """
        for figure in self.figures.values():
            figure._repr_mimebundle_()
        return super()._repr_mimebundle_(**kwargs)

    def save_html(self, path, *, grid: dict | None = None) -> str:
        """Write a standalone HTML page of the current figures (plotly.js embedded: no server, no CDN).

        grid: optionally {control: [values]} for one control (e.g. {"bucket_size": [16, 32, 64, 128]});
        adds a figure whose plotly slider steps through those settings offline (frames).
        """
        from .export import standalone_html

        extra = [self.grid_figure(**grid)] if grid else []
        text = standalone_html(self, extra)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return str(path)

    def grid_figure(self, **grid) -> go.Figure:
        from .export import grid_figure

        return grid_figure(self, **grid)

    def save_png(self, path, figure: str = "heavy", *, width: int = 1200, height: int | None = None) -> str:
        """PNG of one figure, rendered by headless Chromium via playwright (clear error where unavailable)."""
        from .export import save_png

        try:
            return save_png(self.figures[figure], path, width=width, height=height)
        except Exception as exc:
            self._show_error(f"PNG export failed: {exc}")
            raise


def exact_rows_for(explorer: AttentionExplorer, layer: int, head: int):
    """Exact-attention row function of a head (for notebooks and tests)."""
    q, k, v = explorer.engine.head(layer, head)
    return exact_row_fn(q, k, explorer.engine.scale, explorer.engine.exact(layer, head), explorer.engine.key_mask)


__all__ = ["AttentionExplorer", "MATERIALIZE_MAX"]
