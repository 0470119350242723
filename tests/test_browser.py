"""The explorer in a real browser: JupyterLab and the Voila app, driven by Playwright on Debian's Chromium.

Each test starts its own server on 127.0.0.1 (free port, isolated Jupyter dirs), opens
`notebooks/explorer_app.ipynb` (the explorer on real MiniLM attention, N = 512) with anywidget's DEFAULT
model-loading deadline (nothing in the page is stretched), and checks what a student sees:
  * every panel drawn, and after every move of every control every panel, the readout and the status
    describe the same settings (each panel's container carries the stamp of the update it drew);
  * no title or axis label leaves its figure and no two overlap, at 1600 and at 1000 px, and the figures
    fill the output width;
  * a click on a row of a matrix opens that query in the row inspector;
  * Voila: every panel drawn within 10 s of the page request (preheated kernel), and no request leaves
    127.0.0.1, no console error, anywhere.

Screenshots go to $LABSHOTS (default: <tmp>/labshots). With KDE_UPDATE_SCREENSHOT=1 the Voila test
also writes the README's picture, docs/explorer.png.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
APP_NOTEBOOK = REPO / "notebooks" / "explorer_app.ipynb"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
TOKEN = "kde-test-token-7f3a9c"
SHOTS = Path(os.environ.get("LABSHOTS", Path(tempfile.gettempdir()) / "labshots"))
BIN = Path(sys.executable).parent  # jupyter-lab / voila of the running venv
PANELS = ("buckets", "heavy", "samples", "error", "inspector")
FAILURE_TEXT = re.compile(
    r"Error displaying widget|Loading widget|model not found|Traceback|There was an error when executing"
)
VOILA_LOAD_S = 10.0  # issue 13: all panels drawn within this long of the page request


# ------------------------------------------------------------------------------------------- servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 120) -> float:
    """Seconds until `url` gives any HTTP answer; raises if the server dies or never answers."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early with code {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return time.monotonic() - t0
        except urllib.error.HTTPError:
            return time.monotonic() - t0
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(url)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM lets the server shut its kernels down; SIGKILL its own process group as a fallback."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def start(cmd: list[str], cwd: Path, env: dict, ready_url: str, log_path: Path) -> subprocess.Popen:
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(ready_url, proc)
    except Exception as err:
        stop(proc)
        raise RuntimeError(f"{cmd[0]} did not start ({err}); log:\n{log_path.read_text()[-3000:]}") from err
    return proc


def jupyter_env(home: Path, fast: bool = True) -> dict:
    """An environment whose Jupyter/IPython dirs all live under `home` (nothing leaks in from ~)."""
    env = dict(os.environ)
    for var, sub in [("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_DATA_DIR", "data"),
                     ("JUPYTER_RUNTIME_DIR", "runtime"), ("IPYTHONDIR", "ipython")]:
        env[var] = str(home / sub)
    env.update(JUPYTER_PLATFORM_DIRS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["KDE_FAST"] = "1" if fast else "0"
    env["JUPYTER_PATH"] = os.pathsep.join(p for p in (str(VOILA_TEMPLATES), env.get("JUPYTER_PATH", "")) if p)
    # no "get notified about Jupyter news?" toast over the notebook
    settings = home / "config" / "lab" / "user-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True, exist_ok=True)
    (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')
    return env


def lab_command(port: int, root: Path) -> list[str]:
    return [str(BIN / "jupyter-lab"), "--no-browser", "--allow-root", "--ip=127.0.0.1", f"--port={port}",
            "--port-retries=0", f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={root}",
            "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            "--LabApp.extension_manager=readonly"]


VOILA_TEMPLATES = REPO / "widgets" / "share" / "jupyter"  # the kde-offline template (no CDN links)


def voila_command(port: int, notebook: str) -> list[str]:
    # the same flags as `make app` (whose JUPYTER_PATH points at VOILA_TEMPLATES too): the template without
    # CDN links, a kernel that has run the notebook before the first page asks for it, and no
    # jupyterlab-plotly front end (4.8 MB of plotly.js the app never uses: its PlotBoard draws on a canvas)
    return [str(BIN / "voila"), notebook, "--no-browser", "--Voila.ip=127.0.0.1", f"--port={port}",
            "--template=kde-offline", "--preheat_kernel=True", "--VoilaKernelManager.fill_delay=30",
            "--VoilaConfiguration.extension_denylist=jupyterlab-plotly"]


def wait_quiet(proc: subprocess.Popen, timeout: float = 240, quiet_cpu_s: float = 0.15) -> float:
    """Seconds until the server and its kernels use less than `quiet_cpu_s` CPU seconds in one second
    (a preheated kernel has run the notebook)."""
    import psutil

    t0 = time.monotonic()
    root = psutil.Process(proc.pid)

    def cpu() -> float:
        total = 0.0
        for p in [root, *root.children(recursive=True)]:
            try:
                total += sum(p.cpu_times()[:2])
            except psutil.Error:
                pass
        return total

    last = cpu()
    while time.monotonic() - t0 < timeout:
        time.sleep(1.0)
        now = cpu()
        if now - last < quiet_cpu_s and time.monotonic() - t0 > 3:
            return time.monotonic() - t0
        last = now
    raise TimeoutError("the Voila server never went quiet")


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def nb_root(tmp_path_factory):
    """A scratch copy of the app notebook, so Lab's autosave and checkpoints never touch the repo."""
    root = tmp_path_factory.mktemp("nbroot")
    shutil.copy(APP_NOTEBOOK, root / APP_NOTEBOOK.name)
    return root


@pytest.fixture(scope="module")
def server_env(tmp_path_factory):
    return jupyter_env(tmp_path_factory.mktemp("jupyter-home"))


@pytest.fixture(scope="module")
def lab_url(nb_root, server_env, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.getbasetemp() / "jupyterlab.log"
    proc = start(lab_command(port, nb_root), nb_root, server_env,
                 f"http://127.0.0.1:{port}/api/status?token={TOKEN}", log)
    yield f"http://127.0.0.1:{port}"
    stop(proc)


@pytest.fixture(scope="module")
def voila_url(nb_root, server_env, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.getbasetemp() / "voila.log"
    proc = start(voila_command(port, APP_NOTEBOOK.name), nb_root, server_env,
                 f"http://127.0.0.1:{port}/voila/static/", log)
    wait_quiet(proc)  # the preheated kernel has run the app notebook
    yield f"http://127.0.0.1:{port}"
    stop(proc)


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        msg = f"{CHROMIUM} is missing: install it with `apt-get install -y chromium` (Debian package)"
        pytest.fail(msg) if os.environ.get("CI") else pytest.skip(msg)  # never skip silently in CI
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=60_000)  # the default 5 s is tight on a loaded 2-core box
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Page:
    """A Playwright page plus what it tried to fetch outside loopback, and its console errors."""

    def __init__(self, page):
        self.page = page
        self.blocked: list[str] = []
        self.errors: list[str] = []


# Console errors that are not ours and not the page's fault: none so far. (Voila's "Unsatisfied version"
# messages are warnings, not errors.)
IGNORED_CONSOLE = re.compile(r"^$")


@pytest.fixture
def page(browser, request):
    ctx = browser.new_context(viewport={"width": 1600, "height": 1000})  # no init script: default deadlines
    pg = Page(ctx.new_page())

    def block(route):
        pg.blocked.append(route.request.url)
        route.abort()

    ctx.route(re.compile(r"^(?!https?://(127\.0\.0\.1|localhost)[:/])[a-z][a-z0-9+.-]*://"), block)
    pg.page.on("pageerror", lambda exc: pg.errors.append(f"pageerror: {exc}"))
    pg.page.on("console", lambda m: pg.errors.append(f"console: {m.text}") if m.type == "error" else None)
    pg.page.set_default_timeout(120_000)
    yield pg
    SHOTS.mkdir(parents=True, exist_ok=True)
    pg.page.screenshot(path=str(SHOTS / f"{request.node.name}-final.png"), full_page=True)
    ctx.close()


# ------------------------------------------------------------------------------------------- helpers
def plot_selector(name: str) -> str:
    return f".kde-explorer .kde-figure-{name}"  # PlotBoard's container of that panel (its canvas drawer)


STATE_JS = """() => {
  const st = document.querySelector('.kde-explorer .kde-status [data-stamp]');
  const ro = document.querySelector('.kde-explorer .kde-readout [data-stamp]');
  const panels = {};
  for (const el of document.querySelectorAll('.kde-explorer .kde-figure')) {
    const name = [...el.classList].find(c => c.startsWith('kde-figure-')).slice(11);
    const title = el.querySelector('.kde-title');
    const caption = el.querySelector('.kde-caption');
    panels[name] = {stamp: el.dataset.stamp || null, title: title ? title.textContent : null,
                    caption: caption ? caption.textContent : null};
  }
  return {status: st ? st.dataset.stamp : null, readout: ro ? ro.dataset.stamp : null,
          text: st ? st.textContent : '', panels};
}"""


def state(page) -> dict:
    return page.evaluate(STATE_JS)


def stale_parts(st: dict) -> list[str]:
    """Parts of the page that do not show the settings of the status line."""
    bad = [] if st["readout"] == st["status"] else ["readout"]
    bad += [n for n in PANELS if st["panels"].get(n, {}).get("stamp") != st["status"]]
    return bad


def wait_consistent(page, old_status: str | None = None, timeout_s: float = 30) -> dict:
    """Wait for a new status (when old_status is given) and for every panel and the readout to show it."""
    t0 = time.monotonic()
    while True:
        st = state(page)
        fresh = st["status"] is not None and st["status"] != old_status
        if fresh and not stale_parts(st):
            return st
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"stale after {timeout_s:.0f} s: {stale_parts(st) if fresh else 'status'}; {st}")
        page.wait_for_timeout(50)


ANYWIDGET_TIMEOUT = "[anywidget] Failed to initialize model"


def wait_rendered(pg: Page, scope: str) -> dict:
    """Every panel drawn with data, the readout filled in, no widget error anywhere."""
    page = pg.page
    page.locator(f"{scope} .kde-explorer").wait_for(timeout=240_000)
    for name in PANELS:
        page.locator(f"{plot_selector(name)} .kde-plot canvas").first.wait_for()
    st = wait_consistent(page)
    assert not [e for e in pg.errors if ANYWIDGET_TIMEOUT in e], pg.errors
    for name in PANELS:  # drawn data, not just axes: points, line vertices, bars or heatmap cells
        marks = int(page.locator(f"{plot_selector(name)} .kde-plot").get_attribute("data-marks") or 0)
        assert marks > 0, f"panel {name!r} shows empty axes: its figure reached the page without data"
    assert page.get_by_text(FAILURE_TEXT).count() == 0, page.locator("body").inner_text()[:2000]
    message = page.locator(".kde-explorer .kde-message").inner_text().strip()
    assert message == "", f"the explorer reported an error: {message}"
    return st


def nudge(page, control: str, step: int) -> None:
    """Move a control as a user would: a slider by keyboard (ArrowRight/ArrowLeft), a drop-down to the
    next or previous option, a toggle by clicking its other button, a checkbox by clicking, the text by
    editing it, a text box by typing a new value."""
    root = page.locator(f".kde-explorer .kde-control-{control}").first
    handle = root.locator(".noUi-handle")
    if handle.count():
        handle.last.focus()
        handle.last.press("ArrowRight" if step > 0 else "ArrowLeft")
        return
    select = root.locator("select")
    if select.count():
        index = select.first.evaluate("s => s.selectedIndex") + step
        select.first.select_option(index=index)
        return
    buttons = root.locator("button")
    if buttons.count():
        root.locator("button:not(.mod-active)").first.click()
        return
    box = root.locator("input[type=checkbox]")
    if box.count():
        box.first.click()
        return
    area = root.locator("textarea")
    if area.count():  # the text: a new sentence in front (the model keeps the first 512 tokens), or taken off
        text = area.first.input_value()
        area.first.fill(f"Once more, {text}" if step > 0 else text.removeprefix("Once more, "))
        area.first.blur()  # continuous_update=False: the value is sent when the box loses focus
        return
    text = root.locator("input[type=text], input:not([type])")
    value = int(text.first.input_value())
    text.first.fill(str(max(0, value + step)))
    text.first.press("Enter")


# (control, step): every control, each moved away and back
MOVES = [("text", +1), ("sample_size", +1), ("bucket_size", -1), ("num_projs", -1), ("head", +1), ("layer", +1),
         ("sampling", +1), ("bucket_order", +1), ("method", +1), ("seed", +1), ("order", +1), ("log_color", +1),
         ("query", +1), ("zoom", -1)]


def check_every_control(pg: Page, shot: str) -> None:
    """Each control moved and moved back: after each move every panel shows the new settings."""
    page = pg.page
    st = wait_consistent(page)
    for control, step in MOVES:
        for direction in (step, -step):
            before = st
            nudge(page, control, direction)
            st = wait_consistent(page, before["status"])
            label = re.search(r"L\d+H\d+", st["status"]).group(0)
            for name in ("buckets", "heavy", "error", "inspector"):
                assert label in (st["panels"][name]["title"] or ""), (control, name, st["panels"][name])
        assert page.get_by_text(FAILURE_TEXT).count() == 0
        assert page.locator(".kde-explorer .kde-message").inner_text().strip() == "", control
    page.locator(".kde-explorer").screenshot(path=str(SHOTS / f"{shot}-after-moves.png"))


BOXES_JS = """(sel) => {
  const out = [];
  for (const fig of document.querySelectorAll(sel)) {
    const name = [...fig.classList].find(c => c.startsWith('kde-figure-')).slice(11);
    const f = fig.querySelector('.kde-plot').getBoundingClientRect();
    const parts = fig.querySelectorAll('.kde-title, .kde-annotation, .kde-axis-title, .kde-tick, .kde-colorbar-title, .kde-legend-text');
    const boxes = [...parts].filter(e => e.textContent.trim()).map(e => {
      const r = e.getBoundingClientRect();
      return {text: e.textContent.trim().slice(0, 40), kind: e.getAttribute('class'),
              x0: r.left, y0: r.top, x1: r.right, y1: r.bottom};
    });
    out.push({name, fig: {x0: f.left, y0: f.top, x1: f.right, y1: f.bottom}, boxes,
              parent: fig.parentElement.getBoundingClientRect().width});
  }
  return out;
}"""


DRAWN_AT_WIDTH_JS = """() => [...document.querySelectorAll('.kde-explorer .kde-plot')].every(
  (d) => d.querySelector('canvas').style.width === Math.max(200, d.clientWidth) + 'px')"""


def resize(page, width: int) -> None:
    """A new window width, then wait until every panel was redrawn at its new width (ResizeObserver)."""
    page.set_viewport_size({"width": width, "height": 1000})
    page.wait_for_function(DRAWN_AT_WIDTH_JS)
    page.wait_for_timeout(200)  # a scroll bar that comes or goes changes the width once more: check again
    page.wait_for_function(DRAWN_AT_WIDTH_JS)


def check_layout(page, width: int, shot: str) -> None:
    """At this window width: figures fill the board's width; titles and labels stay inside their figure
    and do not overlap each other."""
    resize(page, width)
    page.locator(".kde-explorer").screenshot(path=str(SHOTS / f"{shot}-{width}px.png"))
    for fig in page.evaluate(BOXES_JS, ".kde-explorer .kde-figure"):
        f, name = fig["fig"], fig["name"]
        assert f["x1"] - f["x0"] >= 0.97 * fig["parent"], (width, name, f, fig["parent"])
        for b in fig["boxes"]:
            inside = b["x0"] >= f["x0"] - 1 and b["x1"] <= f["x1"] + 1 and b["y0"] >= f["y0"] - 1 and b["y1"] <= f["y1"] + 1
            assert inside, f"{width}px, {name}: {b['text']!r} leaves its figure {b} {f}"
        for i, a in enumerate(fig["boxes"]):
            for b in fig["boxes"][i + 1:]:
                w = min(a["x1"], b["x1"]) - max(a["x0"], b["x0"])
                h = min(a["y1"], b["y1"]) - max(a["y0"], b["y0"])
                assert w <= 1 or h <= 1, f"{width}px, {name}: {a['text']!r} overlaps {b['text']!r}"


def click_matrix_row(pg: Page) -> None:
    """Click a row of the heavy panel's matrix: that query opens in the row inspector."""
    page = pg.page
    st = wait_consistent(page)
    image = page.locator(f"{plot_selector('heavy')} .kde-heatmap").first
    image.scroll_into_view_if_needed()
    box = image.bounding_box()
    row_y = box["y"] + 0.37 * box["height"]
    page.mouse.click(box["x"] + 0.5 * box["width"], row_y)
    st = wait_consistent(page, st["status"])
    query = page.locator(".kde-explorer .kde-control-query .widget-readout").first.inner_text().strip()
    assert query != "0", "the click did not reach the kernel"
    assert f"query {query} " in st["panels"]["inspector"]["caption"], st["panels"]["inspector"]
    page.locator(plot_selector("inspector")).screenshot(path=str(SHOTS / "inspector-after-click.png"))


def assert_offline(pg: Page) -> None:
    assert not pg.blocked, f"the page asked for non-loopback resources: {pg.blocked}"
    errors = [e for e in pg.errors if not IGNORED_CONSOLE.search(e)]
    assert not errors, f"errors in the page's console: {errors}"


# --------------------------------------------------------------------------------------------- tests
def test_make_app_serves_what_the_tests_check():
    """`make app` runs Voila with the flags tested here (offline template, preheated kernel)."""
    recipe = (REPO / "Makefile").read_text().split("\napp:", 1)[1].split("\n\n", 1)[0]
    assert "JUPYTER_PATH=widgets/share/jupyter" in recipe
    for flag in voila_command(0, "x.ipynb")[3:]:
        if not flag.startswith("--port"):
            assert flag in recipe, flag
    assert (VOILA_TEMPLATES / "voila" / "templates" / "kde-offline" / "index.html.j2").exists()


TICKS_JS = "(sel) => [...document.querySelectorAll(sel + ' .kde-tick')].map(e => e.textContent).join('|')"


def check_pointer(pg: Page) -> None:
    """The canvas drawer answers the pointer as plotly did: a hover shows the point's own text, a
    legend click hides its trace (and a second one shows it), a drag zooms and a double-click resets."""
    page = pg.page
    sel = plot_selector("inspector")
    plot = page.locator(f"{sel} .kde-plot")
    plot.scroll_into_view_if_needed()
    canvas = page.locator(f"{sel} canvas").first
    box = canvas.bounding_box()
    tip = page.locator(f"{sel} .kde-tip")
    for k in range(80):  # down the middle of the row plot until a point is under the pointer
        page.mouse.move(box["x"] + 0.5 * box["width"], box["y"] + 4 * k)
        page.wait_for_timeout(30)
        if tip.is_visible():
            break
    assert tip.is_visible(), "no hover text anywhere down the inspector"
    assert re.fullmatch(r"key \d+ '.*': [^:]+ \d\.\d+(e-\d+)?", tip.inner_text().strip()), tip.inner_text()  # the point's own text
    page.mouse.move(box["x"] + 2, box["y"] + 2)
    marks = int(plot.get_attribute("data-marks"))
    item = page.locator(f"{sel} .kde-legend-item", has_text="approximate row")
    item.click()
    assert int(plot.get_attribute("data-marks")) == marks - 512 and "kde-off" in item.get_attribute("class")
    item.click()
    assert int(plot.get_attribute("data-marks")) == marks
    ticks = page.evaluate(TICKS_JS, sel)
    y = box["y"] + 0.5 * box["height"]
    page.mouse.move(box["x"] + 0.3 * box["width"], y)
    page.mouse.down()
    page.mouse.move(box["x"] + 0.45 * box["width"], y, steps=5)
    page.mouse.up()
    zoomed = page.evaluate(TICKS_JS, sel)
    assert zoomed != ticks and page.locator(f"{sel} .kde-reset-zoom").is_visible()
    canvas.dblclick(position={"x": 0.5 * box["width"], "y": 0.5 * box["height"]})
    assert page.evaluate(TICKS_JS, sel) == ticks and not page.locator(f"{sel} .kde-reset-zoom").is_visible()


def check_the_drawn_explorer(page, where: str):
    """What both front ends must do once the explorer is drawn: lay out at 1600 and 1000 px, open a row
    on a click, answer hover, legend and zoom, keep every panel current after every move of every control,
    ask nothing off the machine."""
    p = page.page
    check_layout(p, 1600, where)
    check_layout(p, 1000, where)
    resize(p, 1600)
    click_matrix_row(page)
    check_pointer(page)
    check_every_control(page, where)
    assert_offline(page)


def test_jupyterlab_explorer_renders_and_responds(lab_url, page):
    p = page.page
    p.goto(f"{lab_url}/lab/tree/{APP_NOTEBOOK.name}?token={TOKEN}&reset")
    p.locator(".jp-Notebook .jp-Cell").first.wait_for()
    # a *connected* idle kernel: Run All clicked before the kernel exists runs nothing
    p.get_by_text(re.compile(r"Python 3 \(ipykernel\) \| Idle")).wait_for()
    p.get_by_role("menuitem", name="Run", exact=True).click()
    p.get_by_role("menuitem", name=re.compile(r"^Run All Cells")).click()
    wait_rendered(page, ".jp-Notebook")
    p.screenshot(path=str(SHOTS / "lab-page.png"))
    check_the_drawn_explorer(page, "lab")


def test_voila_app_renders_and_responds(voila_url, page):
    p = page.page
    t0 = time.monotonic()
    p.goto(f"{voila_url}/", timeout=300_000)
    wait_rendered(page, "body")
    load_s = time.monotonic() - t0
    print(f"Voila: every panel drawn {load_s:.1f} s after the page request")
    assert load_s <= VOILA_LOAD_S, f"Voila took {load_s:.1f} s to draw every panel (target {VOILA_LOAD_S:.0f} s)"
    assert p.locator(".jp-CodeMirrorEditor, .jp-InputArea-editor").count() == 0, "the app must not show code"
    assert "AttentionExplorer(" not in p.locator("body").inner_text()
    p.screenshot(path=str(SHOTS / "voila-page.png"))
    if os.environ.get("KDE_UPDATE_SCREENSHOT") == "1":  # controls, readout, buckets and exact-entries panels
        p.set_viewport_size({"width": 1600, "height": 1750})
        p.wait_for_timeout(1500)
        box = p.locator(".kde-explorer").bounding_box()
        clip = dict(x=box["x"], y=box["y"], width=box["width"], height=min(box["height"], 1750 - box["y"]))
        p.screenshot(path=str(REPO / "docs" / "explorer.png"), clip=clip)
    check_the_drawn_explorer(page, "voila")
