"""PlotBoard: several plotly figures in ONE widget model, drawn in the page by one of two drawers.

- `renderer="plotly"` (default): the plotly.js that ships with plotly.py draws any figure. It travels once
  per board as a binary buffer and is loaded once per page, outside anywidget's 2 s module deadline.
- `renderer="canvas"` (the explorer): our own drawer in board.js paints scatter, bar and heatmap traces on
  2-d subplots (axes, shapes, annotations, colour bars, legend, hover, clicks) on a canvas, with every text
  as positioned HTML. plotly.js spent 50-95 ms per panel on every redraw (defaults, auto-margins, one SVG
  node per marker), ~300 ms for the explorer's five panels, most of a move's time on screen; the canvas
  drawer redraws all five in ~15 ms. Other trace types are refused in Python (ValueError), never
  silently left out.

Why not one `plotly.graph_objects.FigureWidget` per panel: each FigureWidget is an anywidget model whose
front-end module is the whole plotly.js bundle (~5 MB), so five panels meant five 5 MB modules parsed at
once, and some models missed anywidget's deadline ("[anywidget] Failed to initialize model."): they kept
their first picture and ignored every later update (the stale panels of issue 13). Here the module is
board.js (~50 kB), which always meets the deadline.

The figures stay plotly figures in Python (`figures`: tests, exports and notebooks read them). Each panel is
one synced trait (`fig_<name>`: the figure as JSON, its heatmaps' values in traits of their own,
`z_<name>_<trace>`, sent only when they change); the kernel changes several under `hold_sync()`, so one
move is ONE message, and the page redraws every changed panel in the same animation frame. `stamps`
(panel -> text) is written on each panel's container after it is drawn (`data-stamp`), so a test can tell
a stale panel from a current one. A panel's caption (`layout.meta.caption`) is shown as HTML under its
figure, so long explanations wrap at any width. Clicks on any point come back as messages
(`on_click(panel, callback)`). Figures use the output's full width and follow it.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import anywidget
import traitlets

from .figures import patch, trace_index, wire

ESM = Path(__file__).with_name("board.js").read_text()

CSS = """
.kde-board { width: 100%; min-width: 0; }
.kde-board .kde-figure { width: 100%; min-width: 0; margin-top: 10px; contain: layout style paint; }
.kde-board .kde-plot { width: 100%; min-width: 0; }
.kde-board .kde-caption { font-size: 13px; color: #333; padding: 2px 8px 6px; overflow-wrap: anywhere; }
.kde-board .kde-canvas-plot { position: relative; font-family: "Open Sans", verdana, arial, sans-serif; color: #2a3f5f; }
.kde-board .kde-canvas-plot canvas { display: block; }
.kde-board .kde-overlay { position: absolute; left: 0; top: 0; pointer-events: none; overflow: hidden; }
.kde-board .kde-overlay > div { position: absolute; white-space: nowrap; line-height: 1.15; transform-origin: 50% 50%; }
.kde-board .kde-overlay .kde-tick { color: #506784; }
.kde-board .kde-legend { display: flex; flex-wrap: wrap; gap: 4px 16px; padding: 2px 8px 0 55px; }
.kde-board .kde-legend-item { display: inline-flex; align-items: center; gap: 6px; cursor: pointer; user-select: none; }
.kde-board .kde-legend-item.kde-off { opacity: 0.4; }
.kde-board .kde-swatch-line { display: inline-block; width: 26px; height: 0; }
.kde-board .kde-swatch-dot { display: inline-block; width: 8px; height: 8px; border-radius: 50%; }
.kde-board .kde-swatch-bar { display: inline-block; width: 12px; height: 10px; }
.kde-board .kde-zoombox { position: absolute; display: none; pointer-events: none; background: rgba(76,120,168,0.15);
  border: 1px solid rgba(76,120,168,0.8); }
.kde-board .kde-reset-zoom { position: absolute; right: 4px; top: 4px; display: none; font-size: 11px; padding: 1px 6px;
  background: #fff; border: 1px solid #aab; border-radius: 3px; cursor: pointer; color: #2a3f5f; }
.kde-board .kde-tip { position: absolute; display: none; pointer-events: none; z-index: 2; background: rgba(255,255,255,0.96);
  border: 1px solid #8aa; border-radius: 3px; padding: 3px 6px; font-size: 12px; line-height: 1.3; white-space: nowrap; color: #222; }
"""

# what the canvas drawer (board.js, `canvasDrawer`) can draw: 2-d subplots of these trace types
CANVAS_TRACES = frozenset({"scatter", "bar", "heatmap"})
RENDERERS = ("plotly", "canvas")


@functools.lru_cache(maxsize=1)
def plotly_js() -> bytes:
    """The plotly.js bundle that plotly.py ships (the same file its offline HTML export embeds)."""
    import plotly

    return (Path(plotly.__file__).parent / "package_data" / "plotly.min.js").read_bytes()


def check_renderer(renderer: str, name: str, fig) -> None:
    """The canvas drawer draws scatter, bar and heatmap traces only: anything else is refused here,
    in Python, rather than silently missing from the page."""
    if renderer != "canvas":
        return
    other = sorted({t.type for t in fig.data} - CANVAS_TRACES)
    if other:
        raise ValueError(f"figure {name!r} has {', '.join(other)} traces: renderer='canvas' draws "
                         f"{', '.join(sorted(CANVAS_TRACES))}; use renderer='plotly' for this figure")


class PlotBoard(anywidget.AnyWidget):
    """Plotly figures kept in Python (`figures`: name -> plotly Figure) and drawn in the page.

    Change figures in Python, then call `push(names, stamps)` to send the changed ones in one message.
    """

    _esm = ESM
    _css = CSS
    _plotly_js = traitlets.Bytes().tag(sync=True)
    renderer = traitlets.Unicode("plotly").tag(sync=True)
    panels = traitlets.List(traitlets.Unicode()).tag(sync=True)
    stamps = traitlets.Dict().tag(sync=True)
    revision = traitlets.Int(0).tag(sync=True)

    def __init__(self, figures: dict, renderer: str = "plotly", **kwargs):
        if renderer not in RENDERERS:
            raise ValueError(f"renderer must be one of {RENDERERS}, got {renderer!r}")
        for name, fig in figures.items():
            check_renderer(renderer, name, fig)
        # plotly.js (~5 MB) travels only to boards that draw with it
        super().__init__(_plotly_js=plotly_js() if renderer == "plotly" else b"", renderer=renderer,
                         panels=list(figures), **kwargs)
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
        check_renderer(self.renderer, name, self.figures[name])
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
