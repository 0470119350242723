"""The peers benchmark harness (benchmarks/peers.py) in its tiny mode: it runs, writes its section and plots."""
from __future__ import annotations

import math

import pytest
import torch


def test_peers_harness_tiny_mode(tmp_path):
    import json

    from benchmarks import peers

    results = tmp_path / "RESULTS.md"
    assert peers.main(["--tiny", "--results", str(results), "--plots", str(tmp_path / "plots"),
                       "--json", str(tmp_path / "r.json")]) == 0
    text = results.read_text()
    assert "<!-- BEGIN peers -->" in text and "<!-- END peers -->" in text
    labels = [e.label for e in peers.entries()]
    from kdeformer import core

    assert [e.options["sampling"] for e in peers.entries() if e.method == "kdeformer"] == list(core.SAMPLINGS)
    assert "KDEformer (value_norm)" in labels and len(labels) == len(set(labels))
    for label in labels + ["torch SDPA (exact)"]:
        assert f"| {label} |" in text
    data = json.loads((tmp_path / "r.json").read_text())
    assert {r["entry"] for r in data["accuracy"]} == {e.key for e in peers.entries()} | {"sdpa"}
    assert all(math.isfinite(r["rel"]) and r["rel"] >= 0 for r in data["accuracy"])
    assert {r["n"] for r in data["speed"]} == set(peers.TINY.speed_ns)
    for name in ("peers_accuracy.html", "peers_pareto.html", "peers_speed.html"):
        html = (tmp_path / "plots" / name).read_text()
        assert 'src="plotly.min.js"' in html and "cdn.plot.ly" not in html
    assert (tmp_path / "plots" / "plotly.min.js").stat().st_size > 1_000_000


def test_peak_memory_sees_a_large_allocation():
    from benchmarks.peers import peak_memory_mib

    seconds, mib = peak_memory_mib(lambda: torch.ones(64 * 2**20 // 4).sum(), torch.device("cpu"))  # 64 MiB
    assert seconds > 0
    if mib is None:
        pytest.skip("/proc/self/clear_refs not writable here")
    assert 56 <= mib <= 200


