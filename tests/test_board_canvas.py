"""The canvas drawer (widgets/board.js) draws what the figure says: pixels read back from its canvas.

No Jupyter server: a static page loads board.js with a stand-in widget model (get/on/send) and draws
small figures whose every pixel position follows from their margins and fixed ranges. Needs Chromium
(Debian's /usr/bin/chromium) and the playwright package, like the other browser tests.
"""
from __future__ import annotations

import json
import os

import numpy as np
import plotly.graph_objects as go
import pytest

from kdeformer.widgets.board import CSS, ESM
from kdeformer.widgets.figures import wire

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
WIDTH, HEIGHT, M = 600, 300, 40  # container width, figure height, every margin (px)
PLOT_W, PLOT_H = WIDTH - 2 * M, HEIGHT - 2 * M
FIXED = dict(height=HEIGHT, margin=dict(l=M, r=M, t=M, b=M), showlegend=False, template="none")

DRAW_JS = """async ([esm, css, figures]) => {
  document.head.insertAdjacentHTML('beforeend', `<style>${css}</style>`);
  const el = document.createElement('div');
  el.style.width = '%dpx';
  document.body.appendChild(el);
  const mod = (await import(URL.createObjectURL(new Blob([esm], {type: 'text/javascript'})))).default;
  const state = {renderer: 'canvas', panels: Object.keys(figures), stamps: {}, revision: 1};
  for (const [k, f] of Object.entries(figures)) state['fig_' + k] = {...f, rev: 1};
  window.sent = [];
  mod.render({el, model: {get: (k) => state[k], on: () => {}, off: () => {}, send: (m) => window.sent.push(m)}});
  await new Promise((r) => requestAnimationFrame(() => setTimeout(r, 20)));
}""" % WIDTH

PIXEL_JS = """([panel, x, y]) => {
  const c = document.querySelector('.kde-figure-' + panel + ' canvas');
  const d = c.getContext('2d').getImageData(Math.round(x * devicePixelRatio), Math.round(y * devicePixelRatio), 1, 1).data;
  return [d[0], d[1], d[2]];
}"""

Z = [[0.0, 0.25, 0.5], [0.75, 1.0, float("nan")]]  # (rows 2, cols 3)


def figures() -> dict:
    heat = go.Figure(go.Heatmap(z=Z, x=["c0", "c1", "c2"], y=["r0", "r1"], zmin=0, zmax=1, showscale=False,
                                colorscale=[[0, "#000000"], [1, "#ffffff"]], hovertemplate="%{y} %{x}: %{z:.3f}<extra></extra>"),
                     layout=FIXED)
    heat.update_xaxes(type="category", showticklabels=False, showgrid=False)
    heat.update_yaxes(type="category", autorange="reversed", showticklabels=False, showgrid=False)
    # the same cells packed (typed array, base64) as the explorer sends them, on a reversed scale
    packed = go.Figure(go.Heatmap(z=np.array(Z, dtype=np.float32), x=["c0", "c1", "c2"], y=["r0", "r1"], zmin=0,
                                  zmax=1, showscale=False, reversescale=True,
                                  colorscale=[[0, "#000000"], [1, "#ffffff"]]), layout=FIXED)
    packed.update_xaxes(type="category", showticklabels=False, showgrid=False)
    packed.update_yaxes(type="category", autorange="reversed", showticklabels=False, showgrid=False)
    bars = go.Figure([go.Bar(x=["a", "b"], y=[3, 1], marker_color="#ff0000"),
                      go.Bar(x=["a", "b"], y=[4, 2], marker_color="#0000ff")], layout=dict(FIXED, barmode="stack"))
    bars.update_yaxes(range=[0, 10], showgrid=False)
    dots = go.Figure(go.Scatter(x=[0.5, 1.5], y=[1.5, 0.5], mode="markers", customdata=[7, 8],
                                marker=dict(size=12, color=["#00ff00", "#ff00ff"])), layout=FIXED)
    dots.update_xaxes(range=[0, 2], showgrid=False)
    dots.update_yaxes(range=[0, 2], showgrid=False)
    return {name: wire(f.to_plotly_json()) for name, f in (("heat", heat), ("packed", packed), ("bars", bars),
                                                               ("dots", dots))}


def open_page(pw, before: str = ""):
    browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
    pg = browser.new_page(viewport={"width": WIDTH + 40, "height": 1600})
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    if before:
        pg.evaluate(before)
    pg.evaluate(DRAW_JS, [ESM, CSS, json.loads(json.dumps(figures()))])
    assert not errors, errors
    return browser, pg


@pytest.fixture(scope="module")
def playwright_or_skip():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing")
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    with sync_playwright() as pw:
        yield pw


@pytest.fixture(scope="module")
def page(playwright_or_skip):
    browser, pg = open_page(playwright_or_skip)
    yield pg
    browser.close()


def box_of(page, panel: str) -> dict:
    return page.locator(f".kde-figure-{panel} canvas").bounding_box()


def test_heatmap_cells_take_their_colour_from_the_scale(page):
    for i, row in enumerate(Z):
        for j, z in enumerate(row):
            x, y = M + (j + 0.5) * PLOT_W / 3, M + (i + 0.5) * PLOT_H / 2  # row 0 on top: reversed y
            got = page.evaluate(PIXEL_JS, ["heat", x, y])
            if z != z:  # a missing value is not painted: the plot background shows
                assert got == [255, 255, 255], (i, j, got)
            else:
                assert got == [round(255 * z)] * 3, (i, j, got)


def packed_cells_are_right(pg):
    for i, row in enumerate(Z):
        for j, z in enumerate(row):
            x, y = M + (j + 0.5) * PLOT_W / 3, M + (i + 0.5) * PLOT_H / 2
            got = pg.evaluate(PIXEL_JS, ["packed", x, y])
            assert got == ([255, 255, 255] if z != z else [round(255 * (1 - z))] * 3), (i, j, got)


def test_packed_heatmap_cells_on_a_reversed_scale(page):
    assert page.evaluate("() => typeof Uint8Array.fromBase64") == "function"  # the browser's decoder ran
    packed_cells_are_right(page)


def test_packed_heatmaps_decode_without_the_browsers_base64_decoder(playwright_or_skip):
    """Browsers before Uint8Array.fromBase64 (Chrome < 140, Safari < 18.2) take the atob path: same pixels."""
    browser, pg = open_page(playwright_or_skip, "() => { delete Uint8Array.fromBase64; }")
    try:
        assert pg.evaluate("() => typeof Uint8Array.fromBase64") == "undefined"
        packed_cells_are_right(pg)
    finally:
        browser.close()


def test_stacked_bars_end_at_their_sums(page):
    unit = PLOT_W / 2
    for k, (red, blue) in enumerate([(3, 4), (1, 2)]):
        x = M + (k + 0.5) * unit
        level = lambda v: M + (1 - v / 10) * PLOT_H  # noqa: E731  (y range fixed at 0..10)
        assert page.evaluate(PIXEL_JS, ["bars", x, level(red / 2)]) == [255, 0, 0]
        assert page.evaluate(PIXEL_JS, ["bars", x, level(red + blue / 2)]) == [0, 0, 255]
        assert page.evaluate(PIXEL_JS, ["bars", x, level(red + blue) - 3]) == [255, 255, 255]


def test_markers_sit_at_their_values_in_their_colours(page):
    for (x, y), colour in (((0.5, 1.5), [0, 255, 0]), ((1.5, 0.5), [255, 0, 255])):
        px, py = M + x / 2 * PLOT_W, M + (1 - y / 2) * PLOT_H
        assert page.evaluate(PIXEL_JS, ["dots", px, py]) == colour
        assert page.evaluate(PIXEL_JS, ["dots", px + 12, py]) == [255, 255, 255]


def test_hover_formats_the_template_and_click_reports_the_point(page):
    b = box_of(page, "heat")
    page.mouse.move(b["x"] + M + 1.5 * PLOT_W / 3, b["y"] + M + 0.5 * PLOT_H / 2)  # row r0, column c1
    tip = page.locator(".kde-figure-heat .kde-tip")
    tip.wait_for(state="visible")
    assert tip.inner_text().strip() == "r0 c1: 0.250"
    page.mouse.click(b["x"] + M + 2.5 * PLOT_W / 3, b["y"] + M + 1.5 * PLOT_H / 2)  # r1, c2
    d = box_of(page, "dots")
    page.mouse.click(d["x"] + M + 0.75 * PLOT_W + 2, d["y"] + M + 0.75 * PLOT_H)  # 2 px from the second dot
    sent = page.evaluate("() => window.sent")
    assert sent[0] == {"event": "click", "panel": "heat", "points": [
        {"trace": None, "curve": 0, "index": [1, 2], "x": "c2", "y": "r1", "customdata": None}]}
    assert sent[1]["panel"] == "dots" and sent[1]["points"][0] | {"x": None, "y": None} == {
        "trace": None, "curve": 0, "index": 1, "x": None, "y": None, "customdata": 8}
    assert sent[1]["points"][0]["x"] == 1.5 and sent[1]["points"][0]["y"] == 0.5
