"""Every notebook runs top to bottom (headless, nbclient) in FAST mode, is stored without outputs, and
prints what its prose says.

KDE_FAST=1 makes the notebooks use fewer tokens, sizes and seeds; the code path is the same. After a
notebook has run, the checks below read its printed lines (found by cell id) and assert the facts the
text relies on: the LSH formulas match the measurement, the estimators are unbiased, column_norm beats
the authors' value_norm at equal budget, a head click opens that head, timings are medians, no output
refers to a network address.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
import time
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
EXPECTED = {"01_walkthrough.ipynb", "02_tuning.ipynb", "03_live_attention.ipynb", "04_paper_replay.ipynb",
            "explorer_app.ipynb"}
sys.path.insert(0, str(REPO / "scripts"))
import strip_notebooks  # noqa: E402


def test_all_notebooks_present():
    assert {p.name for p in NOTEBOOKS} == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert not strip_notebooks.strip(nb), f"{path.name} holds outputs: run scripts/strip_notebooks.py"
    assert nb.metadata["kernelspec"]["name"] == "python3"


def test_strip_removes_outputs(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1 + 1")])
    nb.cells[0].outputs = [nbformat.v4.new_output("execute_result", {"text/plain": "2"}, execution_count=1)]
    nb.cells[0].execution_count = 1
    path = tmp_path / "x.ipynb"
    nbformat.write(nb, path)
    assert strip_notebooks.main(["--check", str(path)]) == 1
    assert strip_notebooks.main([str(path)]) == 0
    clean = nbformat.read(path, as_version=4)
    assert clean.cells[0].outputs == [] and clean.cells[0].execution_count is None
    assert clean.cells[0].source == "1 + 1"
    assert strip_notebooks.main(["--check", str(path)]) == 0


def stream_text(nb, cell_id: str) -> str:
    """Everything a code cell printed (stdout), found by its cell id."""
    cell = next(c for c in nb.cells if c.get("id") == cell_id)
    return "".join(o.text for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")


def numbers(pattern: str, text: str) -> list[tuple[float, ...]]:
    """Every match of `pattern` in `text`, its groups as floats."""
    return [tuple(float(g) for g in m) if isinstance(m, tuple) else (float(m),) for m in re.findall(pattern, text)]


def check_walkthrough(nb):
    gaps = numbers(r"largest gap, measured vs formula: one bit ([\d.]+), whole code ([\d.]+)", stream_text(nb, "4a00becc"))
    assert len(gaps) == 1
    # 2100 hyperplanes, 300 seven-bit codes, >= 50 pairs per angle bin, seed 0: the means sit within 0.02
    assert gaps[0][0] < 0.02 and gaps[0][1] < 0.02, gaps

    table = stream_text(nb, "34fdc1c6")
    repeats = 500  # FAST
    stats = dict((m[0].strip(), tuple(map(float, m[1:]))) for m in re.findall(
        r"^\s*(.+?)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)%$", table, flags=re.M))
    assert set(stats) == {"uniform", "authors' value_norm", "oracle (column norms of D⁻¹A)"}, stats
    for name, (mean, sd, median, below) in stats.items():
        # unbiased: the mean of 500 estimates (each over the truth) lies within 4 standard errors of 1
        assert abs(mean - 1) < 4 * sd / repeats**0.5 + 1e-9, (name, mean, sd)
    assert stats["oracle (column norms of D⁻¹A)"][1] < stats["uniform"][1]  # the oracle's spread is smaller

    default = re.search(r"default sampling: '(\w+)'", stream_text(nb, "c0a1e6d7")).group(1)
    assert default == "pps", default  # section 6 of the walkthrough describes pps as the default
    lines = re.findall(r"^budget \d+ \+ \d+: (.*?)   cost", stream_text(nb, "c0a1e6d5"), flags=re.M)
    assert len(lines) == 2  # the FAST settings
    for line in lines:
        err = {name: float(x) for name, x in re.findall(r"(\w+) ([\d.]+)", line)}
        assert set(err) == {"pps", "column_norm", "value_norm", "uniform"}, line
        assert err["column_norm"] < err["value_norm"] and err["column_norm"] < err["uniform"], line
        assert err[default] == min(err.values()), line  # best by default, at equal budget
    corr = numbers(r"correlation of exact and estimated shares over all keys: ([\d.-]+)", stream_text(nb, "c0a1e6d3"))
    assert corr and corr[0][0] > 0.8, corr  # the estimated column norms follow the exact ones


def check_tuning(nb):
    below = re.search(r"the default \w+ is below the authors' value_norm on (\d+) of (\d+) layers",
                      stream_text(nb, "33c74de0"))
    assert below and below.group(1) == below.group(2) == "2", stream_text(nb, "33c74de0")  # both FAST layers
    summary = stream_text(nb, "7d2e4f10")
    assert re.search(r"column_norm, budget 48: blocks 16 \+ samples 32 -> [\d.]+;  blocks 32 \+ samples 16 -> [\d.]+",
                     summary), summary
    half = re.search(r"best error at cost <= 0.50 \(mean over layers\): pps ([\d.]+), column_norm ([\d.]+)", summary)
    assert half and float(half.group(1)) < float(half.group(2)), summary  # the default wins at equal cost
    assert len(re.findall(r"^layer \d+: fastest setting", summary, flags=re.M)) == 2


CLICK = """
clicked = 2 * H + 5  # layer 2, head 5: the curve number the page reports for that cell
message = {"event": "click", "panel": "overview",
           "points": [{"trace": "layer 2 head 5", "curve": clicked, "index": [1, 2], "x": 2, "y": 1, "customdata": None}]}
overview._handle_custom_msg(message, [])  # what ipywidgets does with the page's message
print("opened", explorer.controls["layer"].value, explorer.controls["head"].value, "|", opened.value)
"""
CAUSAL_PANEL = """
import numpy as np
from kdeformer.widgets.figures import unpack
heavy = causal_explorer.figure_dicts()["heavy"]
z = unpack(next(t for t in heavy["data"] if t.get("name") == "attention")["z"])  # (N, N), token order
upper, lower = z[np.triu_indices(len(z), 1)], z[np.tril_indices(len(z))]
print(f"drawn: upper triangle empty {bool(np.isnan(upper).all())}, lower triangle drawn {bool(np.isfinite(lower).all())}")
"""


def check_live_attention(nb):
    assert stream_text(nb, "click-check").startswith("opened 2 5 | opened layer 2, head 5")
    lines = re.findall(r"(\w+) at 16 / 32 \(cost ([\d.]+) of exact\): mean cosine to exact ([\d.]+)",
                       stream_text(nb, "5e8b0c22"))
    got = {name: (float(cost), float(cos)) for name, cost, cos in lines}
    assert set(got) == {"pps", "column_norm", "value_norm"}, got
    assert got["pps"][0] < 1  # the widget's starting setting (the default scheme) is cheaper than exact
    assert got["pps"][1] > got["value_norm"][1] and got["column_norm"][1] > got["value_norm"][1], got

    decoder = stream_text(nb, "9d1c4e02")
    diff = numbers(r"max \|logit difference\| to eager ([\d.e+-]+)", decoder)
    assert diff and diff[0][0] < 1e-4, decoder  # exact-equivalent settings reproduce eager's logits
    assert "logits finite: True" in decoder and "same tokens as eager: True" in decoder, decoder
    causal = stream_text(nb, "9d1c4e04")
    assert re.search(r"entries above the diagonal: 0 of \d+", causal), causal
    assert float(re.search(r"max \|A @ v - output\| = ([\d.e+-]+)", causal).group(1)) < 1e-5
    assert stream_text(nb, "causal-panel").strip() == "drawn: upper triangle empty True, lower triangle drawn True"


def check_paper_replay(nb):
    text = stream_text(nb, "dcbdbf59")
    rows = numbers(r"n = +(\d+): KDEformer +([\d.]+) ms +exact +([\d.]+) ms", text)
    assert [int(r[0]) for r in rows] == [512, 1024, 2048]
    faster = [kde < exact for _, kde, exact in rows]
    verdict = re.search(r"crossover: (\w+)", text).group(1)
    expected = ("none" if not any(faster) else "below" if all(faster)
                else "between" if faster.index(True) + sum(faster) == len(faster) else "not")
    assert verdict == expected, (verdict, rows)  # the printed crossover follows the printed medians


CHECKS = {"01_walkthrough": check_walkthrough, "02_tuning": check_tuning,
          "03_live_attention": check_live_attention, "04_paper_replay": check_paper_replay}
EXTRA_CELLS = {"03_live_attention": [("click-check", CLICK), ("causal-panel", CAUSAL_PANEL)]}


def no_network_address(nb):
    """No output of a notebook may point at a network address (a CDN script, a remote font)."""
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            blob = str(out.get("text", "")) + str(out.get("data", ""))
            assert not re.search(r"https?://(?!127\.0\.0\.1|localhost)", blob), (cell.get("id"), blob[:300])


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path):
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    for cell_id, source in EXTRA_CELLS.get(path.stem, []):
        nb.cells.append(nbformat.v4.new_code_cell(source.strip(), id=cell_id))
    env = dict(os.environ, KDE_FAST="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               JUPYTER_PLATFORM_DIRS="1", IPYTHONDIR=str(tmp_path / "ipython"))
    client = NotebookClient(nb, timeout=300, kernel_name="python3", allow_errors=False,
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=env)  # raises CellExecutionError, with the traceback, on the first failing cell
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    ran = [c for c in nb.cells if c.cell_type == "code"]
    assert ran and all(c.execution_count for c in ran)
    no_network_address(nb)
    if path.stem in CHECKS:
        CHECKS[path.stem](nb)


OVERVIEW_CELL = ".draglayer .x30y30 .nsewdrag"  # subplot 30 of 6 x 12: row 3, column 6 = layer 2, head 5
NON_LOOPBACK = re.compile(r"^(?!https?://(127\.0\.0\.1|localhost)[:/])[a-z][a-z0-9+.-]*://")
OVERVIEW_DRAWN = """() => { const plot = document.querySelector('.draglayer .x72y72')?.closest('.js-plotly-plot');
  return !!plot && plot.querySelectorAll('g.hm image').length >= 72; }"""


def settled_box(page, locator, quiet_ms: int = 1000, timeout_s: float = 60) -> dict:
    """The element's box once it has not moved for `quiet_ms` (widgets drawn later shift the page)."""
    t0, last = time.monotonic(), None
    while time.monotonic() - t0 < timeout_s:
        box = locator.bounding_box()
        if box == last:
            return box
        last = box
        page.wait_for_timeout(quiet_ms)
    raise TimeoutError(f"{locator} kept moving")


def click_overview_head(page) -> dict:
    """Wait for 03's overview and explorer, click layer 2 / head 5, wait for the confirmation; return the
    explorer's layer and head readouts."""
    page.locator(".kde-explorer .kde-control-head .widget-readout").first.wait_for()
    page.wait_for_function(OVERVIEW_DRAWN)  # all 72 heads drawn, so the click lands on a head
    cell = page.locator(OVERVIEW_CELL).first
    cell.scroll_into_view_if_needed()
    box = settled_box(page, cell)
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.get_by_text("opened layer 2, head 5 in the explorer below").wait_for(timeout=60_000)
    return {name: page.locator(f".kde-explorer .kde-control-{name} .widget-readout").first.inner_text()
            for name in ("layer", "head")}


@pytest.mark.browser
@pytest.mark.slow
@pytest.mark.parametrize("front_end", ["voila", "lab"])
def test_overview_click_opens_head(front_end, tmp_path):
    """Notebook 03 in Voila and in JupyterLab (Chromium, anywidget's default deadlines): a click on the
    overview's layer 2 / head 5 cell reaches the kernel, and the explorer below shows that layer and head."""
    tb = pytest.importorskip("test_browser")  # the browser tests' server helpers (free port, start, stop)
    if not os.path.exists(tb.CHROMIUM):
        msg = f"{tb.CHROMIUM} is missing: install it with `apt-get install -y chromium` (Debian package)"
        pytest.fail(msg) if os.environ.get("CI") else pytest.skip(msg)
    from playwright.sync_api import sync_playwright

    notebook = REPO / "notebooks" / "03_live_attention.ipynb"
    shutil.copy(notebook, tmp_path / notebook.name)
    port = tb.free_port()
    if front_end == "voila":
        cmd, ready, url = (tb.voila_command(port, notebook.name), f"http://127.0.0.1:{port}/voila/static/",
                           f"http://127.0.0.1:{port}/")
    else:
        cmd, ready = tb.lab_command(port, tmp_path), f"http://127.0.0.1:{port}/api/status?token={tb.TOKEN}"
        url = f"http://127.0.0.1:{port}/lab/tree/{notebook.name}?token={tb.TOKEN}&reset"
    proc = tb.start(cmd, tmp_path, tb.jupyter_env(tmp_path / "home"), ready, tmp_path / f"{front_end}.log")
    blocked = []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=tb.CHROMIUM, args=tb.CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.route(NON_LOOPBACK, lambda route: (blocked.append(route.request.url), route.abort()))
            page.set_default_timeout(240_000)  # the whole notebook runs first (MiniLM, 72 heads, embeddings)
            page.goto(url)
            if front_end == "lab":  # run every cell once the kernel is connected and idle
                page.get_by_text(re.compile(r"Python 3 \(ipykernel\) \| Idle")).wait_for()
                page.get_by_role("menuitem", name="Run", exact=True).click()
                page.get_by_role("menuitem", name=re.compile(r"^Run All Cells")).click()
            readout = click_overview_head(page)
            browser.close()
    finally:
        tb.stop(proc)
    assert readout == {"layer": "2", "head": "5"}, readout
    assert not blocked, f"notebook 03 asked for non-loopback resources: {blocked}"


def test_app_prose_names_the_default_sampling():
    """The app's introduction says which scheme the explorer starts at: it must be the one it does start at."""
    from kdeformer import KDE_DEFAULTS

    nb = nbformat.read(REPO / "notebooks" / "explorer_app.ipynb", as_version=4)
    prose = "".join(c.source for c in nb.cells if c.cell_type == "markdown")
    named = re.search(r"sampling starts at `(\w+)`", prose)
    assert named is not None and named.group(1) == KDE_DEFAULTS.sampling
