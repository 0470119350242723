"""Export the explorer: standalone HTML (plotly.js inline), a plotly-frames grid of settings, PNG via Chromium."""
from __future__ import annotations

import html
import os
import tempfile
from dataclasses import replace
from pathlib import Path

import plotly.graph_objects as go
import plotly.io as pio

from . import panels
from .state import Settings

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


def _plain(fig) -> go.Figure:
    """A plain Figure copy of a FigureWidget (same data and layout)."""
    return go.Figure(fig.to_dict())


def standalone_html(explorer, extra=()) -> str:
    """One self-contained page: status, readout, code, and every figure; plotly.js embedded once."""
    parts, first = [], True
    for name, fig in [*explorer.figures.items(), *((f"grid {i}", f) for i, f in enumerate(extra))]:
        div = pio.to_html(_plain(fig), include_plotlyjs=bool(first), full_html=False,
                          div_id=f"kde-figure-{name.replace(' ', '-')}", config={"displaylogo": False})
        caption = (fig.layout.meta or {}).get("caption", "") if isinstance(fig.layout.meta, dict) else ""
        parts.append(f'<section class="kde-figure-{name.replace(" ", "-")}"><p class="kde-caption">'
                     f'{html.escape(caption)}</p>{div}</section>')
        first = False
    s = explorer.settings()
    title = f"KDEformer explorer: {html.escape(explorer.engine.src.name)}, layer {s.layer} head {s.head}"
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>{title}</title>"
        "<style>body{font-family:sans-serif;margin:16px} pre{background:#f6f6f6;padding:8px}</style></head><body>"
        f"<h2>{title}</h2><div class='kde-status'>{explorer.status.value}</div>"
        f"<div class='kde-readout'>{explorer.readout.value}</div>"
        f"<details><summary>code for this setting</summary><pre>{html.escape(explorer.code_text)}</pre></details>"
        + "".join(parts) + "</body></html>\n"
    )


def grid_figure(explorer, **grid) -> go.Figure:
    """Approximate matrix and error map for a few values of ONE control, stepped by plotly's own slider.

    Works offline in the saved HTML (frames; no kernel). Example: grid_figure(ex, bucket_size=[16, 32, 64]).
    """
    if len(grid) != 1:
        raise ValueError(f"grid must name exactly one control with a list of values, got {sorted(grid)}")
    (param, values), = grid.items()
    base = explorer.settings()
    if param not in Settings.__dataclass_fields__:
        raise ValueError(f"grid control must be one of {sorted(Settings.__dataclass_fields__)}, got {param!r}")
    values = list(values)
    if not values:
        raise ValueError("grid values must be a non-empty list")
    frames, first = [], None
    for val in values:
        view = explorer.view(replace(base, **{param: val}))
        upd = panels.error_update(view)
        curve = view.curve
        err = curve.mean[curve.current]
        title = f"{param} = {val}: relative spectral error {err:.3f}"
        data = [go.Heatmap(**upd.traces["approx"]), go.Heatmap(**upd.traces["error"])]
        frames.append(go.Frame(name=str(val), data=data, traces=[0, 1], layout=dict(title=dict(text=title))))
        if first is None:
            first = (data, title)
    fig = go.Figure(
        data=[first[0][0].update(colorscale="Viridis", xaxis="x", yaxis="y", showscale=False),
              first[0][1].update(colorscale="Magma", xaxis="x2", yaxis="y2")],
        frames=frames,
        layout=dict(
            title=dict(text=first[1]), height=520,
            xaxis=dict(domain=[0, 0.45], type="category", showticklabels=False),
            yaxis=dict(autorange="reversed", type="category", showticklabels=False),
            xaxis2=dict(domain=[0.55, 1], type="category", showticklabels=False),
            yaxis2=dict(autorange="reversed", type="category", showticklabels=False, anchor="x2"),
            annotations=[dict(text="approximate matrix", x=0.22, y=1.03, xref="paper", yref="paper", showarrow=False),
                         dict(text="|approx − exact|", x=0.78, y=1.03, xref="paper", yref="paper", showarrow=False)],
            sliders=[dict(active=0, currentvalue=dict(prefix=f"{param} = "), steps=[
                dict(label=str(v), method="animate",
                     args=[[str(v)], dict(mode="immediate", frame=dict(duration=0, redraw=True), transition=dict(duration=0))])
                for v in values])],
        ),
    )
    return fig


def save_png(fig, path, *, width: int = 1200, height: int | None = None) -> str:
    """Render one figure in headless Chromium (playwright) and write a PNG."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        raise RuntimeError("PNG export needs the 'playwright' package (pip install playwright)") from exc
    if not os.path.exists(CHROMIUM):
        raise RuntimeError(f"PNG export needs Chromium at {CHROMIUM} (apt-get install chromium, or set CHROMIUM=path)")
    plain = _plain(fig)
    height = int(height or plain.layout.height or 500)
    plain.update_layout(width=width, height=height)
    with tempfile.TemporaryDirectory() as tmp:
        page_path = Path(tmp) / "figure.html"
        page_path.write_text(pio.to_html(plain, include_plotlyjs=True, full_html=True, config={"staticPlot": True}))
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
            try:
                page = browser.new_page(viewport={"width": width + 40, "height": height + 40})
                page.goto(page_path.as_uri())
                plot = page.locator(".js-plotly-plot").first
                plot.wait_for(timeout=30_000)
                plot.screenshot(path=str(path))
            finally:
                browser.close()
    return str(path)
