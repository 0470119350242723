"""Plotly plumbing for the explorer's panels: updates, diffs, packed arrays, display grids and max-pooling.

Nothing here knows about KDEformer; `panels` builds on it. A `PanelUpdate` (trace name -> properties,
layout path -> value) becomes the changes `diff` finds against what was written before (unchanged
values skipped), which `patch` writes into the wire dict and `write` into a plain
`plotly.graph_objects.Figure` (`apply` does both steps for one figure at once); `wire` turns a figure into the JSON the browser receives (numeric arrays
as plotly's typed-array specs, so a 256 x 256 heatmap travels as one base64 string).
"""
from __future__ import annotations

import base64
import functools
import math
from dataclasses import dataclass, field

import numpy as np
import torch

LOG_FLOOR = -8.0  # log10 colour floor


@dataclass
class PanelUpdate:
    traces: dict = field(default_factory=dict)  # trace name -> {property: value}
    layout: dict = field(default_factory=dict)  # layout property path -> value (e.g. "title.text")
    info: dict = field(default_factory=dict)  # numbers behind the figure (for readouts and tests)


def same(a, b) -> bool:
    """Equality for update values (numpy arrays, nested dicts and lists, typed-array specs)."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        return a.shape == b.shape and a.dtype.kind == b.dtype.kind and bool(
            np.array_equal(a, b, equal_nan=a.dtype.kind == "f"))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if type(a) is not type(b) and not (isinstance(a, (int, float)) and isinstance(b, (int, float))):
        return False
    try:
        return bool(a == b) or (isinstance(a, float) and a != a and b != b)
    except Exception:
        return False


def diff(update: PanelUpdate, applied: dict, index: dict) -> dict:
    """What an update changes: {trace index: props, "layout": {path: value}} (empty when nothing does).

    applied: the values written before into this figure (kept by the caller, updated here); properties
    whose new value equals it are skipped, which saves plotly's validation and the message bytes.
    index: trace name -> its index in the figure.
    """
    changes = {}
    for name, props in update.traces.items():
        old = applied.setdefault(name, {})
        changed = {k: v for k, v in props.items() if k not in old or not same(old[k], v)}
        if changed:
            old.update(changed)
            changes[index[name]] = changed
    old = applied.setdefault("layout", {})
    changed = {k: v for k, v in update.layout.items() if k not in old or not same(old[k], v)}
    if changed:
        old.update(changed)
        changes["layout"] = changed
    return changes


def write(fig, changes: dict) -> None:
    """Write `diff`'s changes into a plotly figure (plotly validates every value: the slow part)."""
    for where, props in changes.items():
        if where == "layout":
            fig.layout.update(props, overwrite=True)
        else:
            fig.data[where].update(props)  # merges nested dicts (marker, colorbar), replaces arrays


def trace_index(fig) -> dict:
    """Trace name -> its index in the figure (what `diff` needs)."""
    return {t.name: i for i, t in enumerate(fig.data)}


def apply(fig, update: PanelUpdate, applied: dict | None = None) -> dict:
    """Write an update into a figure now; returns what changed (see `diff`)."""
    changes = diff(update, {} if applied is None else applied, trace_index(fig))
    write(fig, changes)
    return changes


def merge(target: dict, props: dict) -> None:
    """Deep-merge plain values into a figure dict the way plotly's `update` does (dicts merge, the rest
    replaces)."""
    for key, value in props.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict) and "bdata" not in value:
            merge(target[key], value)
        else:
            target[key] = value


def patch(body: dict, changes: dict) -> None:
    """Apply `diff`'s changes to a figure's wire dict ({"data": [...], "layout": {...}})."""
    for where, props in changes.items():
        if where == "layout":
            for path, value in props.items():
                *head, last = path.split(".")
                node = body["layout"]
                for part in head:
                    node = node.setdefault(part, {})
                if isinstance(value, dict) and isinstance(node.get(last), dict):
                    merge(node[last], wire(value))
                else:
                    node[last] = wire(value)
        else:
            merge(body["data"][where], wire(props))


def trace_by_name(fig, name: str):
    for t in fig.data:
        if t.name == name:
            return t
    raise KeyError(name)


# --------------------------------------------------------------------------- arrays on the wire
def packed(z: np.ndarray) -> dict:
    """A numeric array as plotly's typed-array spec (base64): one compact payload instead of nested
    lists of Python floats. Read back with `unpack`."""
    z = np.asarray(z)
    kind = {"f": "f4", "i": "i4", "u": "u1" if z.dtype.itemsize == 1 else "u4", "b": "u1"}[z.dtype.kind]
    z = np.ascontiguousarray(z, dtype=np.dtype(kind))
    spec = {"dtype": kind, "bdata": base64.b64encode(z.tobytes()).decode("ascii")}
    if z.ndim == 2:
        spec["shape"] = f"{z.shape[0]},{z.shape[1]}"
    return spec


def unpack(z) -> np.ndarray:
    """Inverse of `packed` (also accepts plain arrays and nested lists)."""
    if isinstance(z, dict) and "bdata" in z:
        flat = np.frombuffer(base64.b64decode(z["bdata"]), dtype=np.dtype(z["dtype"]))
        if "shape" in z:
            return flat.reshape(tuple(int(v) for v in str(z["shape"]).split(",")))
        return flat
    return np.asarray(z, dtype=np.float64)


def wire(obj):
    """A figure dict (from `to_plotly_json`) as plain JSON values: numeric numpy arrays packed,
    string arrays as lists, numpy scalars as Python numbers."""
    if isinstance(obj, dict):
        return {k: wire(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [wire(v) for v in obj]
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind in "fiub" and obj.ndim in (1, 2) and obj.size:
            return packed(obj)
        if obj.dtype.kind == "U":  # strings (hover texts, labels): already plain JSON values
            return obj.tolist()
        return [wire(v) for v in obj.tolist()]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def strs(items) -> np.ndarray:
    """Strings as a numpy array: plotly validates and serialises it in one pass (lists go item by item)."""
    return np.array(items, dtype=str) if len(items) else np.array([], dtype=str)


def to_np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


@functools.lru_cache(maxsize=65536)
def short(tok: str, n: int = 14) -> str:
    tok = str(tok).replace("<", "‹").replace(">", "›")
    return tok if len(tok) <= n else tok[: n - 1] + "…"


class TokenLabels:
    """Shortened token strings of one token list, as a numpy array (built once per source)."""

    def __init__(self, tokens):
        self.tokens = list(tokens)
        self.array = strs([short(str(t)) for t in self.tokens])

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i):
        return self.tokens[i]

    def at(self, index) -> np.ndarray:
        return self.array[np.asarray(index, dtype=np.int64)]


# --------------------------------------------------------------------------- display grids
@dataclass
class Grid:
    """Display window [lo, hi) of positions, pooled into bins of `width` positions."""

    lo: int
    hi: int
    width: int

    @property
    def bins(self) -> int:
        return math.ceil((self.hi - self.lo) / self.width)

    def to_display(self, pos: float) -> float:
        """Token position -> display coordinate (bin index; cell edges at k - 0.5)."""
        return (pos - self.lo) / self.width - 0.5


def make_grid(n: int, window, max_cells: int) -> Grid:
    lo, hi = (0, n) if window is None else (max(0, int(window[0])), min(n, int(window[1]) + 1))
    if hi <= lo:
        lo, hi = 0, n
    return Grid(lo, hi, max(1, math.ceil((hi - lo) / max_cells)))


def axis_labels(index: np.ndarray, tokens: TokenLabels, grid: Grid, prefix: str) -> list[str]:
    """One unique hover label per display bin, naming its token(s)."""
    labels = []
    for b in range(grid.bins):
        p0 = grid.lo + b * grid.width
        p1 = min(grid.hi, p0 + grid.width)
        t0 = int(index[p0])
        if p1 - p0 == 1:
            labels.append(f"{prefix}{t0} {short(tokens[t0])}")
        else:
            labels.append(f"{prefix}{t0} {short(tokens[t0])} +{p1 - p0 - 1} [pos {p0}-{p1 - 1}]")
    return labels


def max_pool(x: torch.Tensor, grid_r: Grid, grid_c: Grid) -> torch.Tensor:
    """(R, C) -> (bins_r, bins_c) max over each cell (rows/cols already cut to the windows); a last,
    partial cell takes the max of what it holds."""
    if grid_r.width == 1 and grid_c.width == 1:
        return x
    (rows, cols), (wr, wc) = x.shape, (grid_r.width, grid_c.width)
    if rows % wr == 0 and cols % wc == 0:  # whole cells: two reductions, the same maxima (NaN kept) 4x faster
        return x.unflatten(1, (cols // wc, wc)).amax(2).unflatten(0, (rows // wr, wr)).amax(1)
    return torch.nn.functional.max_pool2d(x[None, None], (wr, wc), (wr, wc), ceil_mode=True)[0, 0]


def color_values(z: np.ndarray, log: bool) -> np.ndarray:
    """log10 with zeros (and -inf pooling of empty cells) shown blank (NaN).  # (R, C) float32"""
    z = z.astype(np.float32)
    if log:
        with np.errstate(divide="ignore", invalid="ignore"):
            out = np.where(z > 0, np.log10(np.maximum(z, 1e-30)), np.nan)
        return np.maximum(out, LOG_FLOOR).astype(np.float32)
    return np.where(np.isfinite(z), z, np.nan).astype(np.float32)
