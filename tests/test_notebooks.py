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
import sys
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

    lines = numbers(r"budget \d+ \+ \d+: column_norm ([\d.]+), value_norm ([\d.]+), uniform ([\d.]+)",
                    stream_text(nb, "c0a1e6d5"))
    assert len(lines) == 2  # the FAST settings
    for column_norm, value_norm, uniform in lines:
        assert column_norm < value_norm and column_norm < uniform, lines
    corr = numbers(r"correlation of exact and estimated shares over all keys: ([\d.-]+)", stream_text(nb, "c0a1e6d3"))
    assert corr and corr[0][0] > 0.8, corr  # the estimated column norms follow the exact ones
    assert "default sampling: 'column_norm'" in stream_text(nb, "c0a1e6d7")


def check_tuning(nb):
    best = re.search(r"lowest error per layer: (.*)", stream_text(nb, "33c74de0")).group(1)
    counts = dict((name, (int(a), int(b))) for name, a, b in re.findall(r"(\w+) on (\d+) of (\d+)", best))
    assert counts["column_norm"][0] == counts["column_norm"][1] == 2, counts  # best on both FAST layers
    summary = stream_text(nb, "7d2e4f10")
    assert re.search(r"budget 48: blocks 16 \+ samples 32 -> [\d.]+;  blocks 32 \+ samples 16 -> [\d.]+", summary)
    assert len(re.findall(r"^layer \d+: fastest setting", summary, flags=re.M)) == 2


CLICK = """
clicked = 2 * H + 5  # layer 2, head 5: the trace index plotly's front end reports for that cell
overview._js2py_pointsCallback = {"event_type": "plotly_click", "device_state": {},
    "points": {"trace_indexes": [clicked], "point_indexes": [[1, 2]], "xs": [2], "ys": [1]}}
print("opened", explorer.controls["layer"].value, explorer.controls["head"].value, "|", opened.value)
"""


def check_live_attention(nb):
    assert stream_text(nb, "click-check").startswith("opened 2 5 | opened layer 2, head 5")
    lines = re.findall(r"(\w+) at 16 / 32 \(cost ([\d.]+) of exact\): mean cosine to exact ([\d.]+)",
                       stream_text(nb, "5e8b0c22"))
    got = {name: (float(cost), float(cos)) for name, cost, cos in lines}
    assert set(got) == {"column_norm", "value_norm"}, got
    assert got["column_norm"][0] < 1  # the widget's starting setting is cheaper than exact attention
    assert got["column_norm"][1] > got["value_norm"][1], got


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
EXTRA_CELLS = {"03_live_attention": [("click-check", CLICK)]}


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
