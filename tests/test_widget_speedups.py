"""The explorer's shortcuts give exactly what the plain computation gives (same bits, same strings).

Each faster path of the widgets (whole-cell max-pooling, the engine's shared exact mask, the string
fast path of the wire format, ...) is checked here against the slower one it replaces.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kdeformer.widgets import figures, toy_source
from kdeformer.widgets.state import Engine, Settings


@pytest.fixture(scope="module")
def src():
    return toy_source(n=96, d=16, layers=2, heads=2, seed=0)


@pytest.mark.parametrize("shape, widths", [((512, 512), (2, 2)), ((512, 512), (4, 4)), ((96, 64), (3, 1)),
                                           ((96, 64), (1, 8)), ((95, 64), (2, 2))])
def test_max_pool_equals_max_pool2d(shape, widths):
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(0))
    x[3, 5], x[7, 1] = float("nan"), float("-inf")
    got = figures.max_pool(x, figures.Grid(0, shape[0], widths[0]), figures.Grid(0, shape[1], widths[1]))
    want = torch.nn.functional.max_pool2d(x[None, None], widths, widths, ceil_mode=True)[0, 0]
    assert torch.equal(got.nan_to_num(7.0), want.nan_to_num(7.0))
    assert bool(got.isnan().any()) and bool(want.isnan().any())


def test_wire_sends_string_arrays_as_lists():
    labels = np.array(["q0 a", "q1 'b'", "<br>ü"], dtype=str)
    assert figures.wire({"x": labels, "y": np.array([], dtype=str)}) == {"x": ["q0 a", "q1 'b'", "<br>ü"], "y": []}


@pytest.mark.parametrize("sampling", ["pps", "column_norm", "value_norm"])
def test_engine_exact_mask_rows_equal_the_traces(src, sampling):
    eng = Engine(src)
    s = Settings(layer=1, head=1, bucket_size=16, sample_size=24, sampling=sampling, seed=4)
    tr = eng.run(s).kde_trace
    rows = torch.tensor([0, 5, 95, 5])
    assert torch.equal(eng.exact_mask_rows(s, tr, rows), tr.exact_mask_rows(rows))
    assert torch.equal(eng.exact_mask_rows(s, tr, torch.arange(96)), tr.heavy_mask())
