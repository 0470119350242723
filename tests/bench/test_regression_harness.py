"""The regression harness (benchmarks/regression.py) end to end on tiny sizes: it extracts the base
revision as kdeformer_base, runs both cores side by side and writes its RESULTS.md section (no timing
is asserted)."""
from __future__ import annotations

import re
import subprocess

import pytest

from benchmarks import regression

BASE = "e8a5983"


def has_revision(rev: str) -> bool:
    return subprocess.run(["git", "cat-file", "-e", f"{rev}^{{commit}}"], cwd=regression.ROOT,
                          capture_output=True).returncode == 0


@pytest.mark.skipif(not has_revision(BASE), reason=f"revision {BASE} is not in this clone (shallow?)")
def test_regression_harness_tiny(tmp_path):
    results = tmp_path / "RESULTS.md"
    assert regression.main(["--base", BASE, "--sizes", "96", "--repeats", "1", "--results", str(results)]) == 0
    text = results.read_text()
    assert "<!-- BEGIN regression -->" in text and "<!-- END regression -->" in text
    assert "truth fixes" in text
    for scheme in regression.SCHEMES:
        row = re.search(rf"\| 96 \| {scheme} " + r"\| ([\d.]+) " * 5 + r"\|", text)
        assert row, scheme
        assert all(float(x) > 0 for x in row.groups())
        assert text.count(f"| 96 | {scheme} |") == 2, "the plain and the steady-heap readings"
    assert "The same with a steady heap" in text


def test_base_package_is_separate(tmp_path):
    if not has_revision(BASE):
        pytest.skip(f"revision {BASE} is not in this clone")
    import kdeformer

    regression.extract_base(BASE, tmp_path)
    base = regression.import_base(tmp_path)
    assert base is not kdeformer and base.__name__ == regression.BASE_NAME
    assert base.kde_attention.__module__.startswith(regression.BASE_NAME)
    q, k, v = regression.inputs(64)
    out = regression.call(base, "value_norm", q, k, v)
    assert out.shape == q.shape
