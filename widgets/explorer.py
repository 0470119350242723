"""AttentionExplorer: move a slider, see what KDEformer hashed, computed exactly, sampled and got wrong.

Controls are standard ipywidgets; the five panels live in one `PlotBoard` (one widget model, plotly.js
loaded once, every changed panel sent in ONE message and redrawn in the same frame). All numbers come
from `state.Engine` (the core's trace) through the panel registry `panels.PANELS`. Updates are
synchronous and coalesced: setting a control's `.value` from Python redraws before the assignment
returns, and values that arrive while an update runs replace each other, so only the newest is drawn.

Front-end moves are told apart from Python assignments by wrapping each control's public
`Widget.set_state` (ipywidgets calls it for every update message from the page); no private
ipywidgets attribute is read.
"""
from __future__ import annotations

import asyncio
import atexit
import contextlib
import html
import threading
import time
from dataclasses import fields

import ipywidgets as widgets
import plotly.graph_objects as go
import torch

from kdeformer.core import BUCKET_ORDERS, MAX_PROJS
from kdeformer.defaults import KDE_DEFAULTS
from kdeformer.sources import stopping_when

from . import panels
from .board import PlotBoard
from .figures import TokenLabels, diff, write
from .panels import EVERY_KEY, PANELS, View, exact_structure
from .state import (
    MATERIALIZE_MAX,
    SAMPLING_LABELS,
    Engine,
    LayersToCome,
    background_work,
    Settings,
    call_code,
    check_settings,
    key_tokens,
    load_text_source,
    resolve_source,
    sampling_choices,
    step_ahead,
    text_capable,
    toy_source,
)

FIGURES = tuple(PANELS)
DISPLAY = ("log_color", "order", "zoom", "query")
CONTROL_NAMES = ("text", "layer", "head", "method", "bucket_size", "sample_size", "num_projs", "sampling",
                 "bucket_order", "seed", *DISPLAY)
SLIDER_LAYOUT = dict(width="310px")
SEED_MAX = 2**31 - 1
BROWSER_QUIET_S = 0.005  # a move from the page is drawn once no newer move came for this long ...
BROWSER_MAX_WAIT_S = 0.05  # ... or once the oldest undrawn move has waited this long (a drag never starves)


def _running_loop():
    """The kernel's asyncio loop when called from a comm message handler; None in plain Python."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


# Warming threads (AttentionExplorer._warm_neighbours) stop and are joined when Python exits: a daemon
# thread still inside a torch operator when the interpreter finalises aborts the process ("terminate
# called without an active exception", exit status 134), which fails every script and test run after it.
_EXITING = threading.Event()
_WARMING: set = set()


@atexit.register
def _stop_warming() -> None:
    _EXITING.set()
    for thread in list(_WARMING):
        thread.join(timeout=30)


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


def parse_seed(value) -> int:
    """The seed box's text (or an int) as a seed; ValueError naming the allowed range otherwise."""
    text = str(value).strip()
    if isinstance(value, bool) or not (text.isdigit() and int(text) <= SEED_MAX):
        raise ValueError(f"seed must be an integer in [0, {SEED_MAX}], got {value!r}")
    return int(text)


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
            an update, default 1: one head's work is small; None leaves torch's setting alone), prefetch
            (default True: after each update a background thread computes the setting one more step
            along the last slider move and the exact attention of the neighbouring heads, see
            `_warm_neighbours`).

    Methods other than KDEformer get ``budget = bucket_size + sample_size`` key columns per query
    (`kdeformer.methods.approximate`); the buckets, heavy and samples panels always show KDEformer's
    trace for the current setting, the error panel and the inspector show the chosen method.

    Attributes: controls, figures (name -> plotly Figure, as drawn), board (the widget drawing them),
    readout, message, notes, status, code (HTML), last_error, update_count, pins, timings, panel_info.
    """

    def __init__(self, source=None, **params):
        super().__init__()
        self.add_class("kde-explorer")
        known = {f.name for f in fields(Settings)} | set(DISPLAY) | {"seeds", "curve_seeds", "max_cells", "error_cells", "threads",
                                                                   "prefetch"}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"unknown explorer parameter(s) {unknown}; allowed: {sorted(known)}")
        self.last_error: str | None = None
        self.update_count = 0
        self.timings: dict = {}
        self.pins: list = []
        self.panel_info: dict = {}
        self.max_cells = int(params.pop("max_cells", 256))
        self.error_cells = int(params.pop("error_cells", 128))
        seeds, curve_seeds = int(params.pop("seeds", 3)), int(params.pop("curve_seeds", 1))
        self.threads = params.pop("threads", 1)
        self.prefetch = params.pop("prefetch", True)
        if not isinstance(self.prefetch, bool):
            raise ValueError(f"prefetch must be True or False, got {self.prefetch!r}")
        self._warm_ticket, self._warm_thread, self._ahead = 0, None, None
        self._text_ticket = 0  # +1 per set_text
        src, startup_note = self._open_source(source)
        self.engine = Engine(src, seeds=seeds, curve_seeds=curve_seeds)
        self._source_number = 0  # +1 for every new source (a new text): part of the stamp
        self._tokens()
        self._lock = threading.Lock()
        self._pending = self._suspend = False
        self._timer, self._waiting_since = None, None  # the page's scheduled redraw, and since when moves wait
        self._from_page = 0  # > 0 while a front-end message is being applied
        self._applied: dict = {}  # figure -> values last written (unchanged ones are not re-sent)
        self._last = None  # (settings, display) drawn last
        self._result = None
        self._row_labels: dict = {}
        self._wanted_bucket = params.get("bucket_size", KDE_DEFAULTS.bucket_size)
        self._notes: dict[str, str] = {}
        self._build_controls(params)
        self._build_outputs()
        self._layout()
        for name, w in self.controls.items():
            w.observe(self._on_text if name == "text" else self._on_control, names="value")
            self._mark_page_updates(w)
        self._announce_source()
        self.request_update()
        if startup_note:
            self._show_error(startup_note)

    # ------------------------------------------------------------------ construction
    def _open_source(self, source):
        self._text_model = source is None or isinstance(source, str)
        try:
            src = resolve_source(source)
        except ValueError:
            raise
        except Exception as exc:  # the model could not be loaded: keep a working explorer on toy data
            if not self._text_model:
                raise
            self._text_model = False
            note = f"MiniLM could not be loaded ({type(exc).__name__}: {exc}); showing synthetic data."
            return toy_source(n=256, d=32, layers=1, heads=2), note
        self._text_model = self._text_model or text_capable(src)
        return src, ""

    def _tokens(self):
        self._q_tokens = TokenLabels(self.engine.src.tokens)
        self._k_tokens = TokenLabels(key_tokens(self.engine.src))

    @property
    def source(self):
        """The source shown, with every layer (after a new text, waits for the layers still to come)."""
        return self.engine.whole_source()

    def _sizes(self):
        src = self.engine.src
        return self.engine.num_layers, src.q.shape[1], src.q.shape[2], src.k.shape[2]

    def _build_controls(self, p):
        # refuse initial values that the widgets would clamp silently or reject with a TraitError
        self._validate_values({k: v for k, v in p.items() if k in CONTROL_NAMES})
        layers, heads, nq, nk = self._sizes()
        d = Settings()
        cu = dict(continuous_update=False, style={"description_width": "92px"}, layout=SLIDER_LAYOUT)
        drop = dict(style=cu["style"], layout=SLIDER_LAYOUT)
        c = {}
        c["text"] = widgets.Textarea(
            value=getattr(self.engine.src, "text", "") or "", description="text", continuous_update=False,
            disabled=not self._text_model, layout=dict(width="98%", height="70px"),
            placeholder="text to run through the model (MiniLM sources only)")
        c["layer"] = widgets.IntSlider(value=p.get("layer", 0), min=0, max=layers - 1, description="layer", **cu)
        c["head"] = widgets.IntSlider(value=p.get("head", 0), min=0, max=heads - 1, description="head", **cu)
        c["method"] = widgets.Dropdown(options=[(lab, name) for name, lab in self.engine.methods.items()],
                                       value=p.get("method", "kdeformer"), description="method", **drop)
        c["bucket_size"] = widgets.IntSlider(value=min(p.get("bucket_size", d.bucket_size), nk), min=1, max=nk,
                                             description="bucket_size", **cu)
        c["sample_size"] = widgets.IntSlider(value=p.get("sample_size", min(d.sample_size, 4 * nk)), min=1,
                                             max=self._sample_max(nk), description="sample_size", **cu)
        c["num_projs"] = widgets.IntSlider(value=p.get("num_projs", d.num_projs), min=1, max=MAX_PROJS,
                                           description="num_projs", **cu)
        c["sampling"] = widgets.Dropdown(options=[(SAMPLING_LABELS.get(m, m), m) for m in sampling_choices()],
                                         value=p.get("sampling", d.sampling), description="sampling", **drop)
        c["bucket_order"] = widgets.Dropdown(options=list(BUCKET_ORDERS), value=p.get("bucket_order", d.bucket_order),
                                             description="bucket_order", **drop)
        c["seed"] = widgets.Text(value=str(p.get("seed", 0)), description="seed", continuous_update=False, **drop)
        c["log_color"] = widgets.Checkbox(value=p.get("log_color", True), description="log colour scale", indent=False)
        c["order"] = widgets.ToggleButtons(options=["sorted", "original"], value=p.get("order", "sorted"),
                                           tooltips=["hash-sorted order (blocks on the diagonal)", "token order"],
                                           style={"button_width": "80px"})
        c["zoom"] = widgets.IntRangeSlider(value=tuple(p.get("zoom") or (0, nq - 1)), min=0, max=nq - 1,
                                           description="zoom", **cu)
        c["query"] = widgets.IntSlider(value=p.get("query", 0), min=0, max=nq - 1, description="inspect query", **cu)
        for name, w in c.items():
            _css(w, f"kde-control-{name}")
        self.controls = c

    @staticmethod
    def _sample_max(nk: int) -> int:
        """Up to twice Nk (far past the point where block + samples cost more than exact attention)."""
        return int(min(16384, max(256, 2 * nk)))

    def _build_outputs(self):
        self.status = _css(widgets.HTML(), "kde-status")
        self.message = _css(widgets.HTML(), "kde-message")
        self.notes = _css(widgets.HTML(), "kde-notes")
        self.readout = _css(widgets.HTML(), "kde-readout")
        self.code = _css(widgets.HTML(), "kde-code")
        self.code.layout.display = "none"
        self.pin_button = _css(widgets.Button(description="pin curve", tooltip="keep the current error-vs-budget curve"),
                               "kde-button-pin")
        self.clear_pins_button = _css(widgets.Button(description="clear pins"), "kde-button-clear-pins")
        self.code_button = _css(widgets.ToggleButton(description="copy as code", tooltip="show the call for this setting"),
                                "kde-button-code")
        self.pin_button.on_click(lambda _: self.pin())
        self.clear_pins_button.on_click(lambda _: self.clear_pins())
        self.code_button.observe(lambda ch: self.show_code(ch["new"]), names="value")
        self.board = _css(PlotBoard({name: panel.make() for name, panel in PANELS.items()}, renderer="canvas"), "kde-board")
        self.figures = self.board.figures
        # clicking a query (a matrix row, a point, a per-query error) opens it in the row inspector
        for name in ("heavy", "error", "buckets"):
            self.board.on_click(name, self._on_panel_click)

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
        self.children = [c["text"], grid, buttons, self.status, self.message, self.notes, self.readout, self.code,
                         self.board]

    def _mark_page_updates(self, widget):
        """Count front-end updates while they are applied (ipywidgets calls the public set_state)."""
        original = widget.set_state

        def set_state(sync_data):
            self._from_page += 1
            try:
                original(sync_data)
            finally:
                self._from_page -= 1

        widget.set_state = set_state

    # ------------------------------------------------------------------ reading the controls
    def settings(self) -> Settings:
        c = self.controls
        return Settings(layer=c["layer"].value, head=c["head"].value, method=c["method"].value,
                        bucket_size=c["bucket_size"].value, sample_size=c["sample_size"].value,
                        num_projs=c["num_projs"].value, sampling=c["sampling"].value,
                        bucket_order=c["bucket_order"].value, seed=parse_seed(c["seed"].value))

    def display_options(self) -> dict:
        c = self.controls
        nq = self._sizes()[2]
        lo, hi = c["zoom"].value
        zoom = None if (lo, hi) == (0, nq - 1) else (lo, hi)
        return dict(log_color=bool(c["log_color"].value), order=c["order"].value, zoom=zoom, query=int(c["query"].value))

    # ------------------------------------------------------------------ updates
    def _on_control(self, change):
        """A control moved. From Python: redraw now. From the page (inside a kernel): redraw once the
        moves stop coming (none newer for BROWSER_QUIET_S, or the oldest has waited BROWSER_MAX_WAIT_S),
        so a burst of queued moves (a held arrow key, a fast drag, moves queued behind an update) is
        drawn once, with the newest values, instead of once per stale value. The kernel handles one
        queued message every few milliseconds, so the window restarts with each one."""
        if self._suspend:
            return
        if change.get("owner") is self.controls["bucket_size"]:
            self._wanted_bucket = change["new"]
            self.drop_note("bucket_size")
        loop = _running_loop() if self._from_page else None
        if loop is None:
            self.request_update()
            return
        self._pending = True
        now = loop.time()
        if self._timer is not None:
            self._timer.cancel()
        else:
            self._waiting_since = now
        due = min(now + BROWSER_QUIET_S, self._waiting_since + BROWSER_MAX_WAIT_S)
        self._timer = loop.call_at(due, self._run_scheduled)

    def _run_scheduled(self):
        self._timer = self._waiting_since = None
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
        self._warm_neighbours()

    def _warm_neighbours(self):
        """On a daemon thread, once an update is drawn: after a new text, the model's other layers (its
        first draw ran the model only as far as the layer shown); the whole computation of the setting one
        more step along the last slider move (`step_ahead`: a held arrow key or a drag goes on); then the
        exact attention (its spectral norm alone is ~30 ms of a head move at N = 512) and the projection
        of the heads one slider step away. It draws nothing and changes only the engine's caches, stops
        before its next piece (one core call, one head, one model module) as soon as an update runs or
        waits (a newer update starts a new one; an update waiting for the text's layers lets their capture
        finish), and uses the update's torch thread count (the numbers an update computes)."""
        if not self.prefetch or self._last is None:
            return
        self._warm_ticket += 1
        ticket, engine, s, ahead = self._warm_ticket, self.engine, self._last[0], self._ahead
        threads = torch.get_num_threads() if self.threads is None else self.threads

        def idle() -> bool:
            return ticket == self._warm_ticket and not self._pending and not self._lock.locked() and not _EXITING.is_set()

        def work():
            try:
                # this thread's own torch setting (the kernel's threads are untouched); its norms computed here
                with torch_threads(threads), background_work():
                    if engine.layers_ready < engine.num_layers and idle():  # a new text: its other layers
                        # first. The capture pauses (within a module) while an update runs or waits, unless
                        # that update waits for these layers, and stops for a newer text or the exit.
                        text = self._text_ticket
                        with stopping_when(lambda: text != self._text_ticket or _EXITING.is_set(),
                                           pause=lambda: (self._pending or self._lock.locked())
                                           and not engine.rest_wanted.is_set()):
                            engine.complete(wanted=False)
                    if ahead is not None:
                        engine.prefetch(ahead, idle)
                    engine.warm(engine.neighbours(s.layer, s.head), idle)
            except Exception:  # CaptureStopped (a move came), or a failure the foreground meets again and shows
                pass
            finally:
                _WARMING.discard(threading.current_thread())

        if _EXITING.is_set():
            return
        self._warm_thread = threading.Thread(target=work, name="kde-explorer-warm", daemon=True)
        _WARMING.add(self._warm_thread)
        self._warm_thread.start()

    def _show_error(self, text: str):
        self.last_error = text
        self.message.value = (f'<div style="color:#b00020"><b>Not updated:</b> {html.escape(text)} '
                              "(showing the last good result)</div>")

    def _clear_error(self):
        self.last_error = None
        self.message.value = ""

    def note(self, topic: str, text: str):
        """Announce an adjustment the explorer made (a clamp, a truncation); one note per topic."""
        self._notes[topic] = text
        self._write_notes()

    def drop_note(self, topic: str):
        if self._notes.pop(topic, None) is not None:
            self._write_notes()

    def _write_notes(self):
        self.notes.value = "".join(f"<div style='color:#8a5a00'>Note: {html.escape(t)}</div>" for t in self._notes.values())

    def _compute(self, s: Settings):
        """The run, the error summary and the curve; None when newer values arrived meanwhile."""
        res = self.engine.run(s)
        if self._pending:
            return None
        summary = self.engine.summary(s)
        if self._pending:
            return None
        curve = self.engine.curve(s)
        return None if self._pending else (res, summary, curve)

    def _update_once(self):
        t0 = time.perf_counter()
        try:
            s = check_settings(self.settings(), self.engine)
            disp = self.display_options()
            got = self._compute(s)
            if got is None:  # newer values arrived while computing: the loop draws the newest
                return
            t1 = time.perf_counter()
            self._draw(s, disp, *got, t0)
        except Exception as exc:  # any failure: message in the UI, figures stay as they were
            self._show_error(f"{type(exc).__name__}: {exc}" if not isinstance(exc, ValueError) else str(exc))
            self._restore_seed()
            return
        t2 = time.perf_counter()
        self._ahead = step_ahead(self._last[0] if self._last else None, s)
        self._last = (s, disp)
        self._result = got[0]
        self.timings = dict(compute=t1 - t0, draw=t2 - t1, total=t2 - t0)
        self._clear_error()

    def _restore_seed(self):
        """A refused seed text goes back to the last good value (the picture shows that one)."""
        if self._last is not None and self.controls["seed"].value != str(self._last[0].seed):
            try:
                parse_seed(self.controls["seed"].value)
            except ValueError:
                self._suspend = True
                try:
                    self.controls["seed"].value = str(self._last[0].seed)
                finally:
                    self._suspend = False

    def stamp(self, s: Settings, disp: dict) -> str:
        """What every panel, the readout and the status show, in one string (the page test compares it):
        the source (text number) and every setting."""
        return (f"text{self._source_number} L{s.layer}H{s.head} {s.method} B{s.bucket_size} s{s.sample_size} r{s.num_projs} {s.sampling} "
                f"{s.bucket_order} seed{s.seed} q{disp['query']} {disp['order']} zoom{disp['zoom']} log{int(disp['log_color'])}")

    def _panel_updates(self, view: View, stale) -> dict:
        return {name: PANELS[name].update(view) for name in stale}

    def _draw(self, s, disp, res, summary, curve, t0: float):
        last_s, last_d = self._last if self._last else (None, None)
        stale = [n for n, p in PANELS.items() if panels.needs_redraw(p, s, disp, last_s, last_d)]
        view = View(s, disp, self.engine, res, curve, self._q_tokens, self._k_tokens, self.max_cells, self.error_cells)
        updates = self._panel_updates(view, stale)  # compute everything first: no half-drawn state on failure
        mass = float(self.engine.heavy_mass(s, res.kde_trace)[0].mean())
        changed = {}
        for name, upd in updates.items():
            changes = diff(upd, self._applied.setdefault(name, {}), self.board.trace_index[name])
            if changes:
                self.board.patch(name, changes)
                changed[name] = changes
        self.panel_info = {**self.panel_info, **{n: u.info for n, u in updates.items()}}
        if "heavy" in updates:
            info = updates["heavy"].info
            gr, ri = info["grid_rows"], info["row_index"]
            labels = updates["heavy"].traces["attention"]["y"]
            self._row_labels = {lab: int(ri[gr.lo + b * gr.width]) for b, lab in enumerate(labels)}
        self.update_count += 1
        stamp = self.stamp(s, disp)
        self.readout.value = self._readout_html(s, summary, mass, stamp)
        self.code.value = f"<pre style='font-size:12px;user-select:all'>{html.escape(call_code(s, self.engine.scale))}</pre>"
        self.board.push(list(changed), {name: stamp for name in PANELS})  # one message: every changed panel
        self._write_status(s, res, time.perf_counter() - t0, stamp)
        # the page draws from the message just sent; plotly's validation of the same values into the
        # Python figures (`self.figures`, read by export, tests, notebooks) runs meanwhile, before set() returns
        for name, changes in changed.items():
            write(self.figures[name], changes)

    def _readout_html(self, s: Settings, summary, heavy_mass, stamp: str) -> str:
        m, sd = summary.mean_sd(summary.spectral)
        tm, tsd = summary.mean_sd(summary.theory)
        n = len(summary.spectral)
        above = " — above 1: worse than outputting zeros" if m > 1 else ""
        rows = [
            ("relative spectral error ‖Õ−O‖₂/‖O‖₂", f"{m:.4f} ± {sd:.4f}",
             f"mean ± sd over {n} seeds ({s.seed}…{s.seed + n - 1}){above}"),
            ("theory form ‖Õ−O‖₂/(‖D⁻¹A‖₂‖V‖₂)", f"{tm:.4f} ± {tsd:.4f}" if summary.theory else "n/a",
             "the paper's normalisation" if summary.theory else f"not computed above {MATERIALIZE_MAX} keys"),
            ("relative Frobenius error", f"{summary.frobenius:.4f}", f"seed {s.seed}"),
            ("normaliser error mean |D~/D − 1|", "n/a" if summary.normalizer is None else f"{summary.normalizer:.4f}", f"seed {s.seed}"),
            ("softmax mass computed exactly", f"{heavy_mass:.1%}", "KDEformer's exact entries, exact weights"),
        ]
        body = "".join(f"<tr><td>{html.escape(a)}</td><td style='text-align:right;padding:0 12px'><b>{b}</b></td>"
                       f"<td style='color:#666'>{html.escape(c)}</td></tr>" for a, b, c in rows)
        return f"<table style='font-size:13px' data-stamp='{html.escape(stamp)}'>{body}</table>"

    def _cost_text(self, s: Settings, tr) -> str:
        """Cost of the shown method as a fraction of exact attention (multiply-adds), with what it is made of."""
        cost = self.engine.cost(s, tr)
        nk = tr.key.shape[-2]
        if s.method == "exact":
            detail = "all keys"
        elif s.method != "kdeformer":
            detail = f"budget {s.budget} columns per query"
        elif self.engine.is_causal:
            detail = f"causal: local window + {s.sample_size} samples per query, counted on the lower triangle"
        elif exact_structure(tr) == EVERY_KEY or ("inclusion_probs" not in tr.extras and tr.num_blocks <= 1):
            detail = EVERY_KEY
        elif "inclusion_probs" in tr.extras:  # pps: the budget is bucket_size + sample_size columns
            detail = f"{exact_structure(tr)}, budget {s.bucket_size + s.sample_size} columns per query, of {nk} keys"
        else:
            eff = int(tr.key_block_len.max())
            block = f"block of {eff} keys" + ("" if eff == s.bucket_size else
                                              f" (bucket_size {s.bucket_size}: {tr.num_blocks} blocks of ≤{eff})")
            detail = f"{block} + {s.sample_size} samples per query, of {nk} keys"
        if cost is None:
            return f"cost n/a ({html.escape(detail)})"
        more = " — <b>more than exact</b>" if cost > 1.0 + 1e-9 else ""
        return f"cost {cost:.2f} of exact{more} (multiply-adds; {html.escape(detail)})"

    def _write_status(self, s: Settings, res, seconds: float, stamp: str):
        tr = res.kde_trace
        nq, nk = tr.query.shape[-2], tr.key.shape[-2]
        label = self.engine.methods.get(s.method, s.method)
        n_txt = f"N = {nq}" if nq == nk else f"Nq = {nq}, Nk = {nk}"
        self.status.value = (f"<span style='font-size:13px' data-stamp='{html.escape(stamp)}'>"
                             f"{html.escape(self.engine.src.name)} · layer {s.layer} head {s.head} · {n_txt} · "
                             f"{html.escape(label)}: {self._cost_text(s, tr)} · "
                             f"updated in {seconds * 1e3:.0f} ms (#{self.update_count})</span>")

    # ------------------------------------------------------------------ text
    def _on_text(self, change):
        if self._suspend:
            return
        self.set_text(change["new"])

    def _announce_source(self):
        meta = getattr(self.engine.src, "meta", None) or {}
        if meta.get("truncated"):
            self.note("text", f"the text has {meta.get('full_num_tokens', '?')} tokens: cut to the first "
                      f"{self.engine.src.q.shape[2]} (the model's limit)")
        else:
            self.drop_note("text")

    def _fit_controls(self):
        """Slider ranges for the current source; bucket_size follows what the user asked for."""
        _, _, nq, nk = self._sizes()
        c = self.controls
        wanted = self._wanted_bucket
        with self.hold_trait_notifications():
            c["bucket_size"].max = nk
            c["bucket_size"].value = min(wanted, nk)
            c["sample_size"].max = self._sample_max(nk)
            c["zoom"].max = nq - 1
            c["zoom"].value = (0, nq - 1)
            c["query"].max = nq - 1
        if wanted > nk:
            self.note("bucket_size", f"bucket_size {wanted} is more than the {nk} keys of this text: using {nk} "
                      f"(one block = exact attention); a longer text gets {wanted} back")
        else:
            self.drop_note("bucket_size")

    def set_text(self, text: str) -> bool:
        """Re-run the model on `text`; on failure show why and keep everything as it was."""
        if not self._text_model:
            self._show_error("this source has no model to re-run: text editing needs a MiniLM source")
            return False
        self._warm_ticket += 1  # the warming of the old text's heads stops at its next head: the model needs the cores
        self._text_ticket += 1  # and a capture of the old text's other layers stops within a module
        old = self.engine
        layers, shown = old.num_layers, self.controls["layer"].value
        try:  # the model runs only as far as the layer shown; the others are captured after the redraw
            src = load_text_source(text, like=old.src, num_layers=shown + 1 if shown + 1 < layers else None)
            if getattr(src, "num_tokens", src.q.shape[2]) < 2:
                raise ValueError("text must give at least 2 tokens")
        except Exception as exc:
            self._show_error(f"text not used: {exc}")
            return False
        rest = None
        if src.q.shape[0] < layers:
            like = src
            rest = LayersToCome(layers, lambda: load_text_source(text, like=like))
        self.engine = Engine(src, seeds=old.seeds, curve_factors=old.curve_factors, curve_seeds=old.curve_seeds,
                             rest=rest)
        self._source_number += 1
        self._tokens()
        self._suspend = True
        try:
            self._fit_controls()
            if self.controls["text"].value != text:
                self.controls["text"].value = text
        finally:
            self._suspend = False
        self._announce_source()
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
        for name, value in values.items():
            if name not in CONTROL_NAMES:
                raise ValueError(f"unknown control {name!r}; controls: {sorted(CONTROL_NAMES)}")
            if name in limits:
                lo, hi = limits[name]
                if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
                    rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
                    raise ValueError(f"{name} must be an integer in {rng}, got {value!r}")
            if name in choices and value not in choices[name]:
                raise ValueError(f"{name} must be one of {choices[name]}, got {value!r}")
            if name == "zoom" and value is not None:
                if not (isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value)
                        and 0 <= value[0] <= value[1] <= nq - 1):
                    raise ValueError(f"zoom must be None or a token range (lo, hi) with 0 <= lo <= hi <= {nq - 1}, got {value!r}")
            if name == "log_color" and not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")
            if name == "text" and not isinstance(value, str):
                raise ValueError(f"text must be a str, got {type(value).__name__}")

    def _control_value(self, name: str, value):
        """The widget value for a validated setting (zoom None = everything, seed as text)."""
        if name == "zoom":
            return (0, self._sizes()[2] - 1) if value is None else tuple(value)
        if name == "seed":
            return str(value)
        return value

    def set(self, **values) -> bool:
        """Set several controls at once with one redraw. Invalid values change nothing and show a message.

        bucket_size above N is valid (exact attention): it is shown as N, with a note. Returns True when applied.
        """
        try:
            self._validate_values(values)
        except ValueError as exc:
            self._show_error(str(exc))
            return False
        if "text" in values and not self.set_text(values.pop("text")):
            return False
        nk = self._sizes()[3]
        if "bucket_size" in values:
            self._wanted_bucket = values["bucket_size"]
            self.drop_note("bucket_size")
            if values["bucket_size"] > nk:
                self.note("bucket_size", f"bucket_size {values['bucket_size']} is more than the {nk} keys: using {nk} "
                          "(one block = exact attention)")
                values["bucket_size"] = nk
        self._suspend = True
        try:
            for name, value in values.items():
                self.controls[name].value = self._control_value(name, value)
        finally:
            self._suspend = False
        self.request_update()
        return self.last_error is None

    def inspect(self, query: int):
        """Open query `query` (token index) in the row inspector."""
        self.set(query=int(query))

    def open_head(self, layer: int, head: int, query: int | None = None) -> bool:
        """Show one head (e.g. from a click on a head overview); optionally inspect one query too.
        (Not `open`: ipywidgets uses that name to open the widget's comm.)"""
        values = dict(layer=int(layer), head=int(head))
        if query is not None:
            values["query"] = int(query)
        return self.set(**values)

    def _query_of_point(self, trace_name, point) -> int | None:
        """Token index of the query a clicked point stands for (a matrix row, a query point)."""
        if trace_name in ("attention", "heavy overlay", "approx", "exact", "error"):
            label = point.get("y")
            if label in self._row_labels:
                return self._row_labels[label]
            if isinstance(label, str) and label.startswith("q"):
                head = label[1:].split()[0]
                return int(head) if head.isdigit() else None
            return None
        if trace_name in ("queries", "per-query error", "normaliser", "exact heavy mass", "estimated heavy share"):
            cd = point.get("customdata")
            if cd is None:
                return None
            return int(cd[0]) if isinstance(cd, (list, tuple)) else int(cd)
        return None

    def _on_panel_click(self, trace_name, points):
        idx = self._query_of_point(trace_name, points[0])
        if idx is not None:
            self.inspect(idx)

    # ------------------------------------------------------------------ tuning aids
    def pin(self):
        """Keep the current error-vs-budget curve in the error figure."""
        if self._last is None:
            return
        curve = self.engine.curve(self._last[0])
        i = len(self.pins)
        self.pins.append(curve)
        self.figures["error"].add_trace(panels.pinned_trace(curve, i))
        self.board.refresh("error")
        self.board.push(["error"])

    def clear_pins(self):
        self.pins.clear()
        fig = self.figures["error"]
        fig.data = [t for t in fig.data if not (t.name or "").startswith("pin ")]
        self.board.refresh("error")
        self.board.push(["error"])

    def show_code(self, visible: bool = True) -> str:
        """Show (or hide) the call of the current setting; returns the code."""
        self.code.layout.display = None if visible else "none"
        if self.code_button.value != visible:
            self.code_button.value = visible
        return self.code_text

    @property
    def code_text(self) -> str:
        return call_code(self.settings(), self.engine.scale)

    # ------------------------------------------------------------------ export
    def figure_dicts(self) -> dict:
        return {name: fig.to_dict() for name, fig in self.figures.items()}

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

    def view(self, s: Settings | None = None) -> View:
        """What the panels read for setting `s` (default: the current one), e.g. for export or tests."""
        s = check_settings(s or self.settings(), self.engine)
        return View(s, self.display_options(), self.engine, self.engine.run(s), self.engine.curve(s),
                    self._q_tokens, self._k_tokens, self.max_cells, self.error_cells)


__all__ = ["AttentionExplorer", "MATERIALIZE_MAX"]
