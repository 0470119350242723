"""The peers benchmark harness (benchmarks/peers.py) in its tiny mode: it runs, reads its peers from the
registry, counts multiply-adds, writes its two RESULTS.md sections and its offline plots."""
from __future__ import annotations

import json
import math

import pytest
import torch

from kdeformer import core
from kdeformer.methods import METHODS


def test_peers_harness_tiny_mode(tmp_path):
    from benchmarks import peers

    results = tmp_path / "RESULTS.md"
    assert peers.main(["--tiny", "--results", str(results), "--plots", str(tmp_path / "plots"),
                       "--json", str(tmp_path / "r.json")]) == 0
    text = results.read_text()
    for name in ("peers", "peers-causal"):
        assert f"<!-- BEGIN {name} -->" in text and f"<!-- END {name} -->" in text
    lines = peers.entries()
    labels = [e.label for e in lines]
    assert [e.options["sampling"] for e in lines if e.method == "kdeformer"] == list(core.SAMPLINGS)
    assert {e.method for e in lines} == set(METHODS) - {"exact"}  # every peer of the registry, Thinformer too
    assert "KDEformer (value_norm)" in labels and "Thinformer" in labels and len(labels) == len(set(labels))
    for label in labels + ["torch SDPA (exact)"]:
        assert f"| {label} |" in text
    data = json.loads((tmp_path / "r.json").read_text())
    assert {r["entry"] for r in data["accuracy"]} == {e.key for e in lines} | {"sdpa"}
    assert all(math.isfinite(r["rel"]) and r["rel"] >= 0 and r["macs"] > 0 for r in data["accuracy"])
    causal = {r["entry"] for r in data["causal"]}
    assert causal == {e.key for e in lines if METHODS[e.method].supports_causal} | {"sdpa"}
    assert all(r["dataset"].endswith("-causal") for r in data["causal"])
    assert {r["n"] for r in data["speed"]} == set(peers.TINY.speed_ns)
    assert {r["n"] for r in data["causal_speed"]} == set(peers.TINY.causal_speed_ns)
    for name in ("peers_accuracy.html", "peers_pareto.html", "peers_time.html", "peers_speed.html",
                 "peers_causal_speed.html"):
        html = (tmp_path / "plots" / name).read_text()
        assert 'src="plotly.min.js"' in html and "cdn.plot.ly" not in html
    assert (tmp_path / "plots" / "plotly.min.js").stat().st_size > 1_000_000


def test_pareto_front_and_cost_interpolation():
    from benchmarks.peers import error_at_cost, pareto_front

    pts = [(10, 0.5, "a"), (20, 0.6, "b"), (30, 0.2, "c"), (5, 0.9, "d"), (40, 0.2, "e")]
    assert pareto_front(pts) == [(5, 0.9, "d"), (10, 0.5, "a"), (30, 0.2, "c")]
    acc = [dict(dataset="x", entry="m", seed=0, budget=b, rel=e, macs=c, n_q=1, seconds=1.0)
           for b, e, c in ((1, 0.4, 100.0), (2, 0.1, 400.0))]
    assert error_at_cost(acc, "x", "m", 200.0) == pytest.approx(0.2)  # halfway in log-log: sqrt(0.4 * 0.1)
    assert error_at_cost(acc, "x", "m", 50.0) is None


def test_peak_memory_sees_a_large_allocation():
    from benchmarks.peers import peak_memory_mib

    seconds, mib = peak_memory_mib(lambda: torch.ones(64 * 2**20 // 4).sum(), torch.device("cpu"))  # 64 MiB
    assert seconds > 0
    if mib is None:
        pytest.skip("/proc/self/clear_refs not writable here")
    assert 56 <= mib <= 200
