"""PlotBoard: several plotly figures in ONE widget model, drawn by the plotly.js that ships with plotly.py.

Why not one `plotly.graph_objects.FigureWidget` per panel: each FigureWidget is an anywidget model whose
front-end module is the whole plotly.js bundle (~5 MB), so five panels meant five 5 MB modules parsed at
once, and anywidget gives each model 2 s to load its module. On a busy page some models missed that
deadline ("[anywidget] Failed to initialize model."): they kept their first picture and ignored every
later update — the stale panels of issue 13. Here the front-end module is a few kB (it always meets the
deadline); plotly.js travels once per board as a binary buffer and is loaded once per page, outside the
deadline, when the board is first rendered.

Each panel is one synced trait (`fig_<name>`: the figure as JSON, its heatmaps' values in traits of their
own, `z_<name>_<trace>`, sent only when they change); the kernel changes several under `hold_sync()`, so
one move is ONE message, and the page redraws every changed panel in the same
animation frame. `stamps` (panel -> text) is written on each panel's container after it is drawn
(`data-stamp`), so a test can tell a stale panel from a current one. A panel's caption
(`layout.meta.caption`) is shown as HTML under its figure, so long explanations wrap at any width. Clicks on any point come back as
messages (`on_click(panel, callback)`). Figures use the output's full width and follow it.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import anywidget
import traitlets

from .figures import patch, trace_index, wire

ESM = r"""
const CONFIG = {responsive: true, displaylogo: false, modeBarButtonsToRemove: ["lasso2d", "select2d"]};

function loadPlotly(model) {
  if (globalThis.Plotly && globalThis.Plotly.react) return Promise.resolve(globalThis.Plotly);
  if (!globalThis.__kdePlotly) {
    const url = URL.createObjectURL(new Blob([model.get("_plotly_js")], {type: "text/javascript"}));
    globalThis.__kdePlotly = import(url).then(() => { URL.revokeObjectURL(url); return globalThis.Plotly; });
  }
  return globalThis.__kdePlotly;
}

// A heatmap's values travel in their own synced trait (`z_<panel>_<trace>`), so a move that leaves them
// as they were sends nothing for them, and plotly sees the same object (no recalculation).
function heatmapValues(z) {
  return z && z.plain !== undefined ? z.plain : z;
}

function clickMessage(name, gd, ev) {
  const points = ev.points.map((p) => ({
    trace: (gd.data[p.curveNumber] || {}).name || null, curve: p.curveNumber,
    index: p.pointIndex !== undefined ? p.pointIndex : p.pointNumber,
    x: p.x, y: p.y, customdata: p.customdata === undefined ? null : p.customdata,
  }));
  return {event: "click", panel: name, points: points};
}

function render({model, el}) {
  el.classList.add("kde-board");
  const divs = {};
  const drawn = {};
  let frame = null;
  let alive = true;
  const boxes = {};
  const captions = {};
  for (const name of model.get("panels")) {
    const box = document.createElement("div");
    box.className = "kde-figure kde-figure-" + name;
    const caption = document.createElement("div");
    caption.className = "kde-caption";
    const div = document.createElement("div");
    div.className = "kde-plot";
    box.append(div, caption);
    el.appendChild(box);
    boxes[name] = box;
    captions[name] = caption;
    divs[name] = div;
  }
  let changedAt = null;
  async function redraw() {
    frame = null;
    const Plotly = await loadPlotly(model);
    if (!alive) return;
    const stamps = model.get("stamps");
    const timing = {received: changedAt, start: performance.now(), panels: {}};
    const jobs = [];
    for (const [name, div] of Object.entries(divs)) {
      const fig = model.get("fig_" + name);
      if (!fig || !fig.data || drawn[name] === fig.rev) continue;
      const data = fig.data.map((t) => (t.z && t.z.ref ? {...t, z: heatmapValues(model.get(t.z.ref))} : t));
      const first = drawn[name] === undefined;
      drawn[name] = fig.rev;
      captions[name].textContent = (fig.layout.meta && fig.layout.meta.caption) || "";
      const t = performance.now();
      // the config goes with the first draw only: given again, react deep-copies and compares it every time
      const draw = first ? Plotly.newPlot(div, data, fig.layout, CONFIG) : Plotly.react(div, data, fig.layout);
      jobs.push(draw.then(() => {
        timing.panels[name] = performance.now() - t;
        if (first) div.on("plotly_click", (ev) => model.send(clickMessage(name, div, ev)));
      }));
    }
    await Promise.all(jobs);
    timing.end = performance.now();
    (globalThis.__kdeBoardTimings = globalThis.__kdeBoardTimings || []).push(timing);  // for benchmarks
    for (const [name, box] of Object.entries(boxes)) {
      if (drawn[name] !== undefined) box.dataset.stamp = stamps[name] || "";
    }
    el.dataset.revision = String(model.get("revision"));
  }
  const schedule = () => {
    if (frame === null) { changedAt = performance.now(); frame = requestAnimationFrame(() => redraw()); }
  };
  model.on("change", schedule);
  const resized = new ResizeObserver(() => {
    if (!globalThis.Plotly) return;
    for (const [name, div] of Object.entries(divs)) if (drawn[name] !== undefined) globalThis.Plotly.Plots.resize(div);
  });
  resized.observe(el);
  schedule();
  return () => {
    alive = false;
    model.off("change", schedule);
    resized.disconnect();
    if (globalThis.Plotly) for (const div of Object.values(divs)) globalThis.Plotly.purge(div);
  };
}

export default { render };
"""

CSS = """
.kde-board { width: 100%; min-width: 0; }
.kde-board .kde-figure { width: 100%; min-width: 0; margin-top: 10px; contain: layout style paint; }
.kde-board .kde-plot { width: 100%; min-width: 0; }
.kde-board .kde-caption { font-size: 13px; color: #333; padding: 2px 8px 6px; overflow-wrap: anywhere; }
"""


@functools.lru_cache(maxsize=1)
def plotly_js() -> bytes:
    """The plotly.js bundle that plotly.py ships (the same file its offline HTML export embeds)."""
    import plotly

    return (Path(plotly.__file__).parent / "package_data" / "plotly.min.js").read_bytes()


class PlotBoard(anywidget.AnyWidget):
    """Plotly figures kept in Python (`figures`: name -> plotly Figure) and drawn in the page.

    Change figures in Python, then call `push(names, stamps)` to send the changed ones in one message.
    """

    _esm = ESM
    _css = CSS
    _plotly_js = traitlets.Bytes().tag(sync=True)
    panels = traitlets.List(traitlets.Unicode()).tag(sync=True)
    stamps = traitlets.Dict().tag(sync=True)
    revision = traitlets.Int(0).tag(sync=True)

    def __init__(self, figures: dict, **kwargs):
        super().__init__(_plotly_js=plotly_js(), panels=list(figures), **kwargs)
        self.figures = dict(figures)
        self.trace_index = {name: trace_index(f) for name, f in self.figures.items()}
        self._bodies = {name: wire(fig.to_plotly_json()) for name, fig in self.figures.items()}
        self._heatmaps = {name: [i for i, t in enumerate(fig.data) if t.type == "heatmap"] for name, fig in self.figures.items()}
        self._click_handlers: dict = {}
        traits = {f"fig_{name}": traitlets.Dict().tag(sync=True) for name in figures}
        traits.update({f"z_{name}_{i}": traitlets.Dict().tag(sync=True) for name, idx in self._heatmaps.items() for i in idx})
        self.add_traits(**traits)
        self.on_msg(self._on_message)
        self.push(list(figures))

    def patch(self, name: str, changes: dict) -> None:
        """Record `figures.diff`'s changes of figure `name` in the dict the page is sent (cheap: no
        re-serialisation of the rest); the caller writes them into the plotly figure (`figures.write`)."""
        patch(self._bodies[name], changes)

    def refresh(self, name: str) -> None:
        """Re-read figure `name` whole (after traces were added or removed)."""
        self.trace_index[name] = trace_index(self.figures[name])
        self._bodies[name] = wire(self.figures[name].to_plotly_json())

    def push(self, names, stamps: dict | None = None) -> None:
        """Send the named figures (and new stamps) to the page as one message."""
        with self.hold_sync():
            for name in names:
                body = dict(self._bodies[name], rev=self.revision + 1)  # a new dict: traitlets sees the change
                body["data"] = list(body["data"])
                for i in self._heatmaps.get(name, ()):
                    if i < len(body["data"]):
                        z = body["data"][i].get("z")
                        setattr(self, f"z_{name}_{i}", z if isinstance(z, dict) else {"plain": z})  # sent if changed
                        body["data"][i] = {**body["data"][i], "z": {"ref": f"z_{name}_{i}"}}
                setattr(self, f"fig_{name}", body)
            if stamps is not None:
                self.stamps = {**self.stamps, **stamps}
            self.revision += 1

    def payload_bytes(self, name: str) -> int:
        """Size of one panel's figure as the page holds it (JSON of its figure and heatmap traits)."""
        parts = [getattr(self, f"fig_{name}")] + [getattr(self, f"z_{name}_{i}") for i in self._heatmaps[name]]
        return sum(len(json.dumps(p, separators=(",", ":"))) for p in parts)

    def on_click(self, panel: str, callback) -> None:
        """callback(trace_name, points) for clicks on `panel`; points: dicts with index, x, y, customdata."""
        self._click_handlers[panel] = callback

    def _on_message(self, _widget, content, _buffers):
        if not isinstance(content, dict) or content.get("event") != "click":
            return
        handler = self._click_handlers.get(content.get("panel"))
        points = content.get("points") or []
        if handler is not None and points:
            handler(points[0].get("trace"), points)
