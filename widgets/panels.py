"""Figure data for the explorer's panels, as pure functions of a trace (plotly figures, no widgets).

`make_<panel>()` builds an empty figure with named traces; `<panel>_update(...)` returns a `PanelUpdate`
(trace name -> properties, plus layout properties) computed from the core's trace and the exact result;
`apply(fig, update)` writes it into a figure (a FigureWidget in the explorer, a plain Figure for export).
Large matrices are max-pooled to at most `max_cells` per side, so no update ships N^2 cells.
"""
from __future__ import annotations

import base64
import functools
import math
from dataclasses import dataclass, field

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from kdeformer.core import bucket_ranks

from .state import CHUNK_ENTRIES

MAX_POINTS = 2000  # scatter points per set in the projection (larger N is strided)
MAX_HYPERPLANES = 8  # hyperplane traces drawn only up to this many bits
MAX_OUTLINES = 64  # more heavy blocks in view than this: shade them instead of outlining
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


def apply(fig, update: PanelUpdate, applied: dict | None = None) -> None:
    """Write an update into a figure in one batch (one message per figure for a FigureWidget).

    applied: the values this function wrote before into this figure (kept by the caller); properties
    whose new value equals it are skipped, which saves plotly's validation and the message bytes.
    """
    index = {t.name: i for i, t in enumerate(fig.data)}
    applied = {} if applied is None else applied
    ctx = fig.batch_update() if hasattr(fig, "batch_update") else _nullcontext()
    with ctx:
        for name, props in update.traces.items():
            old = applied.setdefault(name, {})
            changed = {k: v for k, v in props.items() if k not in old or not same(old[k], v)}
            if changed:
                fig.data[index[name]].update(changed)  # merges nested dicts (marker, colorbar), replaces arrays
                old.update(changed)
        old = applied.setdefault("layout", {})
        changed = {k: v for k, v in update.layout.items() if k not in old or not same(old[k], v)}
        if changed:
            fig.layout.update(changed, overwrite=True)
            old.update(changed)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _strs(items) -> np.ndarray:
    """Strings as a numpy array: plotly validates and serialises it in one pass (lists go item by item)."""
    return np.array(items, dtype=str) if len(items) else np.array([], dtype=str)


_TOKEN_ARRAYS: dict = {}


def tok(tokens, index) -> np.ndarray:
    """Shortened token strings at `index` (vectorised; the array per token list is cached)."""
    key = id(tokens)
    hit = _TOKEN_ARRAYS.get(key)
    if hit is None or hit[0] is not tokens:
        if len(_TOKEN_ARRAYS) > 16:
            _TOKEN_ARRAYS.clear()
        hit = (tokens, _strs([_short(str(t)) for t in tokens]))
        _TOKEN_ARRAYS[key] = hit
    return hit[1][np.asarray(index, dtype=np.int64)]


def trace_by_name(fig, name: str):
    for t in fig.data:
        if t.name == name:
            return t
    raise KeyError(name)


# --------------------------------------------------------------------------- small helpers
def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


@functools.lru_cache(maxsize=65536)
def _short(tok: str, n: int = 14) -> str:
    tok = str(tok).replace("<", "‹").replace(">", "›")
    return tok if len(tok) <= n else tok[: n - 1] + "…"


@functools.lru_cache(maxsize=65536)
def code_string(code: int, bits: int) -> str:
    """Bucket code as bits, hyperplane 0 first."""
    return "".join("1" if (int(code) >> i) & 1 else "0" for i in range(bits))


def display_order(trace, order: str, axis: str) -> np.ndarray:
    """Token index at each display position: the sorted (hash) order or the original order."""
    n = (trace.query if axis == "q" else trace.key).shape[-2]
    if order == "sorted":
        return _np(trace.q_order if axis == "q" else trace.k_order).astype(np.int64)
    return np.arange(n, dtype=np.int64)


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


def axis_labels(index: np.ndarray, tokens, grid: Grid, prefix: str) -> list[str]:
    """One unique hover label per display bin, naming its token(s)."""
    labels = []
    for b in range(grid.bins):
        p0 = grid.lo + b * grid.width
        p1 = min(grid.hi, p0 + grid.width)
        t0 = int(index[p0])
        if p1 - p0 == 1:
            labels.append(f"{prefix}{t0} {_short(tokens[t0])}")
        else:
            labels.append(f"{prefix}{t0} {_short(tokens[t0])} +{p1 - p0 - 1} [pos {p0}-{p1 - 1}]")
    return labels


def max_pool(x: torch.Tensor, grid_r: Grid, grid_c: Grid) -> torch.Tensor:
    """(R, C) -> (bins_r, bins_c) max over each cell (rows/cols already cut to the windows)."""
    r, c = x.shape
    pr, pc = grid_r.bins * grid_r.width - r, grid_c.bins * grid_c.width - c
    if pr or pc:
        x = torch.nn.functional.pad(x, (0, pc, 0, pr), value=float("nan"))
    x = x.view(grid_r.bins, grid_r.width, grid_c.bins, grid_c.width)
    x = torch.nan_to_num(x, nan=-math.inf).amax(dim=(1, 3))
    return x


# --------------------------------------------------------------------------- matrix rows
def kde_rows(trace, rows: torch.Tensor, matrix=None) -> torch.Tensor:
    """Rows of KDEformer's approximate matrix, from the trace (no N x N allocation).  # (c, Nk)"""
    if matrix is not None:
        return matrix[rows]
    # float32 is plenty for display: the shift by log D~ happens before exp
    logits = trace.scale * (trace.query[rows].float() @ trace.key.float().mT)  # (c, Nk)
    heavy = (trace.q_blocks[rows].unsqueeze(-1) == trace.k_blocks.unsqueeze(0)) & (trace.k_blocks >= 0)
    factor = torch.where(heavy, torch.ones_like(logits), trace.column_weights().float().unsqueeze(0))
    if trace.key_mask is not None:
        factor = factor * trace.key_mask
    return logits.sub_(trace.log_normalizer[rows].float().unsqueeze(-1)).exp_().mul_(factor)


def heavy_rows(trace, rows: torch.Tensor) -> torch.Tensor:
    """(c, Nk) bool: which entries of these rows are computed exactly."""
    return (trace.q_blocks[rows].unsqueeze(-1) == trace.k_blocks.unsqueeze(0)) & (trace.k_blocks >= 0)


def pooled_matrices(row_fns: dict, row_index, col_index, grid_r: Grid, grid_c: Grid) -> dict:
    """Stream the windowed rows of each matrix in chunks and max-pool them (bounded memory).

    row_fns: name -> f(rows tensor) -> (c, Nk) rows in token order. "error" = |approx - exact| is added
    when both are present. Returns name -> (bins_r, bins_c) float32 numpy.
    """
    rows_all = torch.as_tensor(row_index[grid_r.lo : grid_r.hi])
    cols = torch.as_tensor(col_index[grid_c.lo : grid_c.hi])
    nk = len(col_index)
    step = max(grid_r.width, (max(1, CHUNK_ENTRIES // max(1, nk)) // grid_r.width) * grid_r.width)
    parts = {name: [] for name in list(row_fns) + (["error"] if {"exact", "approx"} <= set(row_fns) else [])}
    for start in range(0, len(rows_all), step):
        rows = rows_all[start : start + step]
        sub_r = Grid(0, len(rows), grid_r.width)
        got = {name: fn(rows)[:, cols].float() for name, fn in row_fns.items()}
        if "error" in parts:
            got["error"] = (got["approx"] - got["exact"]).abs()
        for name, m in got.items():
            parts[name].append(max_pool(m, sub_r, grid_c))
    return {name: torch.cat(p, 0).numpy() for name, p in parts.items()}


def color_values(z: np.ndarray, log: bool) -> np.ndarray:
    """log10 with zeros (and -inf pooling of empty cells) shown blank (NaN).  # (R, C) float32"""
    z = z.astype(np.float32)
    if log:
        with np.errstate(divide="ignore", invalid="ignore"):
            out = np.where(z > 0, np.log10(np.maximum(z, 1e-30)), np.nan)
        return np.maximum(out, LOG_FLOOR).astype(np.float32)
    return np.where(np.isfinite(z), z, np.nan).astype(np.float32)


def packed(z: np.ndarray) -> dict:
    """A 2-D float32 array as plotly's typed-array spec (base64): one compact binary-ish payload,
    instead of nested lists of Python floats. Read back with `unpack`."""
    z = np.ascontiguousarray(z, dtype=np.float32)
    return {"dtype": "f4", "bdata": base64.b64encode(z.tobytes()).decode("ascii"), "shape": f"{z.shape[0]},{z.shape[1]}"}


def unpack(z) -> np.ndarray:
    """Inverse of `packed` (also accepts plain arrays and nested lists)."""
    if isinstance(z, dict) and "bdata" in z:
        shape = tuple(int(v) for v in str(z["shape"]).split(","))
        return np.frombuffer(base64.b64decode(z["bdata"]), dtype=np.dtype(z["dtype"])).reshape(shape)
    return np.asarray(z, dtype=np.float64)


def block_rectangles(trace) -> list[tuple[int, int, int, int, int]]:
    """Heavy blocks in sorted positions: (row_start, row_end, col_start, col_end, block), ends exclusive.

    Rows: maximal runs of sorted queries sharing a key block; columns: the sorted keys of that block.
    """
    qb = _np(trace.q_blocks)[_np(trace.q_order)]  # key block of each sorted query
    kb = _np(trace.k_blocks)[_np(trace.k_order)]  # block of each sorted key (-1 masked, at the end)
    pos = np.arange(len(kb))
    valid = kb >= 0
    nb = int(kb.max()) + 1 if valid.any() else 0
    k_lo = np.full(nb, len(kb))
    k_hi = np.zeros(nb, dtype=np.int64)
    np.minimum.at(k_lo, kb[valid], pos[valid])
    np.maximum.at(k_hi, kb[valid], pos[valid] + 1)
    starts = np.flatnonzero(np.r_[True, qb[1:] != qb[:-1]])  # runs of sorted queries sharing a block
    ends = np.r_[starts[1:], len(qb)]
    return [(int(a), int(e), int(k_lo[qb[a]]), int(k_hi[qb[a]]), int(qb[a]))
            for a, e in zip(starts, ends) if 0 <= qb[a] < nb and k_hi[qb[a]] > 0]


def rect_shapes(rects, grid_r: Grid, grid_c: Grid, xref: str, yref: str, color: str = "#e4002b") -> list[dict]:
    """Plotly rectangle shapes for block rectangles, clipped to the display windows."""
    shapes = []
    for r0, r1, c0, c1, b in rects:
        r0c, r1c = max(r0, grid_r.lo), min(r1, grid_r.hi)
        c0c, c1c = max(c0, grid_c.lo), min(c1, grid_c.hi)
        if r0c >= r1c or c0c >= c1c:
            continue
        shapes.append(dict(
            type="rect", xref=xref, yref=yref, name=f"block {b}",
            x0=grid_c.to_display(c0c), x1=grid_c.to_display(c1c), y0=grid_r.to_display(r0c), y1=grid_r.to_display(r1c),
            line=dict(color=color, width=1.5), fillcolor="rgba(0,0,0,0)",
        ))
    return shapes


# --------------------------------------------------------------------------- buckets panel
def make_buckets() -> go.Figure:
    fig = make_subplots(
        rows=1, cols=3, column_widths=[0.42, 0.29, 0.29], horizontal_spacing=0.07,
        subplot_titles=("queries (o) and keys (x) by bucket", "bucket sizes (Gray order)", "sorted keys: bucket sequence"),
    )
    fig.add_trace(go.Scatter(name="hyperplanes", mode="lines", line=dict(color="rgba(90,90,90,0.45)", width=1),
                             hoverinfo="skip", showlegend=False), 1, 1)
    fig.add_trace(go.Scatter(name="queries", mode="markers", marker=dict(symbol="circle", size=6, colorscale="Turbo",
                             line=dict(width=0)), hovertemplate="%{hovertext}<extra></extra>"), 1, 1)
    fig.add_trace(go.Scatter(name="keys", mode="markers", marker=dict(symbol="x", size=7, colorscale="Turbo"),
                             hovertemplate="%{hovertext}<extra></extra>"), 1, 1)
    fig.add_trace(go.Bar(name="queries per bucket", marker_color="#4c78a8", hovertemplate="%{hovertext}<extra></extra>"), 1, 2)
    fig.add_trace(go.Bar(name="keys per bucket", marker_color="#f58518", hovertemplate="%{hovertext}<extra></extra>"), 1, 2)
    fig.add_trace(go.Scatter(name="key sequence", mode="markers", marker=dict(size=4, colorscale="Turbo"),
                             hovertemplate="%{hovertext}<extra></extra>"), 1, 3)
    fig.add_trace(go.Scatter(name="block edges", mode="lines", line=dict(color="rgba(228,0,43,0.5)", width=1, dash="dot"),
                             hoverinfo="skip"), 1, 3)
    fig.update_layout(height=380, barmode="stack", margin=dict(l=40, r=20, t=60, b=40),
                      legend=dict(orientation="h", y=-0.15), title=dict(text="buckets", x=0.01))
    fig.update_xaxes(title_text="PC 1", row=1, col=1)
    fig.update_yaxes(title_text="PC 2", row=1, col=1)
    fig.update_xaxes(title_text="bucket (bits, hyperplane 0 first)", type="category", row=1, col=2)
    fig.update_xaxes(title_text="sorted key position", row=1, col=3)
    fig.update_yaxes(title_text="bucket rank", row=1, col=3)
    return fig


def pca_2d(q: torch.Tensor, k: torch.Tensor):
    """2-D PCA of the row-normalised queries and keys together.

    Returns coords (Nq + Nk, 2), mean (D,), components (D, 2).
    """
    x = torch.cat([q, k], 0).double()  # (Nq + Nk, D)
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    mean = x.mean(0)
    _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)
    comps = vh[:2].mT  # (D, 2)
    if comps.shape[1] < 2:
        comps = torch.cat([comps, torch.zeros_like(comps)], 1)
    return (x - mean) @ comps, mean, comps


def hyperplane_lines(projections: torch.Tensor, mean, comps, box) -> tuple[list, list]:
    """Each hash hyperplane {x: <w, x> = 0} cut by the PCA plane, as a segment inside `box`.

    Returns x and y lists with None separators (one plotly trace for all lines).
    """
    (x0, x1), (y0, y1) = box
    xs, ys = [], []
    w = projections.double()  # (D, r)
    for i in range(w.shape[1]):
        c0 = float(w[:, i] @ mean)
        a, b = (w[:, i] @ comps).tolist()  # line: c0 + a X + b Y = 0
        if abs(a) < 1e-12 and abs(b) < 1e-12:
            continue
        if abs(b) >= abs(a):
            xx = [x0, x1]
            yy = [-(c0 + a * x) / b for x in xx]
        else:
            yy = [y0, y1]
            xx = [-(c0 + b * y) / a for y in yy]
        xs += xx + [None]
        ys += yy + [None]
    return xs, ys


def buckets_update(trace, q_tokens, k_tokens, max_points: int = MAX_POINTS, pca=None) -> PanelUpdate:
    """pca: the head's `pca_2d(q, k)` if already computed (it depends on the head only)."""
    nq, nk = trace.query.shape[-2], trace.key.shape[-2]
    r = trace.projections.shape[-1]
    ranks = _np(bucket_ranks(r, trace.bucket_order, "cpu"))
    qc, kc = _np(trace.q_buckets), _np(trace.k_buckets)
    qr, kr = ranks[qc], ranks[kc]
    qblk, kblk = _np(trace.q_blocks), _np(trace.k_blocks)
    coords, mean, comps = pca if pca is not None else pca_2d(trace.query.float(), trace.key.float())
    coords = _np(coords).astype(np.float32)
    qi = np.arange(nq)[:: max(1, math.ceil(nq / max_points))]
    ki = np.arange(nk)[:: max(1, math.ceil(nk / max_points))]
    upd = PanelUpdate()
    upd.traces["queries"] = dict(
        x=coords[qi, 0], y=coords[qi, 1], customdata=np.stack([qi, qr[qi], qblk[qi]], 1), text=tok(q_tokens, qi),
        marker=dict(color=qr[qi], cmin=0, cmax=2**r - 1),
        hovertemplate="query %{customdata[0]} '%{text}'<br>bucket rank %{customdata[1]}<br>block %{customdata[2]}<extra></extra>",
    )
    upd.traces["keys"] = dict(
        x=coords[nq + ki, 0], y=coords[nq + ki, 1], customdata=np.stack([ki, kr[ki], kblk[ki]], 1), text=tok(k_tokens, ki),
        marker=dict(color=kr[ki], cmin=0, cmax=2**r - 1),
        hovertemplate="key %{customdata[0]} '%{text}'<br>bucket rank %{customdata[1]}<br>block %{customdata[2]}<extra></extra>",
    )
    if r <= MAX_HYPERPLANES:
        pad = 0.05
        box = ((float(coords[:, 0].min()) - pad, float(coords[:, 0].max()) + pad),
               (float(coords[:, 1].min()) - pad, float(coords[:, 1].max()) + pad))
        hx, hy = hyperplane_lines(trace.projections.reshape(-1, r), mean, comps, box)
        upd.traces["hyperplanes"] = dict(x=hx, y=hy, visible=True)
        upd.layout["xaxis.range"] = list(box[0])
        upd.layout["yaxis.range"] = list(box[1])
    else:
        upd.traces["hyperplanes"] = dict(x=[], y=[], visible=False)
        upd.layout["xaxis.autorange"] = True
        upd.layout["yaxis.autorange"] = True

    # bucket sizes, non-empty buckets in rank order
    valid_k = kblk >= 0
    codes = np.union1d(qc, kc[valid_k])
    codes = codes[np.argsort(ranks[codes])]
    q_count = np.array([(qc == c).sum() for c in codes]) if len(codes) <= 512 else np.bincount(qc, minlength=2**r)[codes]
    k_count = np.bincount(kc[valid_k], minlength=2**r)[codes]
    labels = _strs([code_string(int(c), r) for c in codes])
    upd.traces["queries per bucket"] = dict(
        x=labels, y=q_count, hovertext=_strs([f"bucket {lab} (rank {ranks[c]}): {n} queries" for lab, c, n in zip(labels, codes, q_count)]))
    upd.traces["keys per bucket"] = dict(
        x=labels, y=k_count, hovertext=_strs([f"bucket {lab} (rank {ranks[c]}): {n} keys" for lab, c, n in zip(labels, codes, k_count)]))

    # the Gray-order sequence of the sorted keys, coloured by bucket, block edges marked
    order = _np(trace.k_order)
    si = np.arange(nk)[:: max(1, math.ceil(nk / max_points))]
    upd.traces["key sequence"] = dict(
        x=si, y=kr[order[si]], marker=dict(color=kr[order[si]], cmin=0, cmax=2**r - 1),
        customdata=np.stack([order[si], kblk[order[si]]], 1), text=tok(k_tokens, order[si]),
        hovertemplate="sorted pos %{x}: key %{customdata[0]} '%{text}'<br>bucket rank %{y}, block %{customdata[1]}<extra></extra>",
    )
    kb_sorted = kblk[order]
    edges = [p for p in range(1, nk) if kb_sorted[p] != kb_sorted[p - 1] and kb_sorted[p] >= 0]
    top = float(2**r)
    ex, ey = [], []
    for p in edges[:: max(1, math.ceil(len(edges) / 256))]:
        ex += [p - 0.5, p - 0.5, None]
        ey += [0.0, top, None]
    upd.traces["block edges"] = dict(x=ex, y=ey)
    n_buckets = len(codes)
    upd.layout["title.text"] = (f"buckets: r={r} hyperplanes, {n_buckets} non-empty of {2**r} buckets, "
                                f"{trace.bucket_order} order, {trace.num_blocks} key blocks")
    upd.info = dict(codes=codes, q_count=q_count, k_count=k_count, edges=edges)
    return upd


# --------------------------------------------------------------------------- heavy panel
def make_heavy() -> go.Figure:
    fig = make_subplots(rows=1, cols=2, column_widths=[0.68, 0.32], horizontal_spacing=0.1,
                        subplot_titles=("exact attention D⁻¹A, heavy blocks outlined", "softmax mass in the heavy block"))
    fig.add_trace(go.Heatmap(name="attention", colorscale="Viridis", colorbar=dict(x=0.61, xanchor="left", len=0.9, thickness=12),
                             hovertemplate="q %{y}<br>k %{x}<br>%{z}<extra></extra>"), 1, 1)
    fig.add_trace(go.Heatmap(name="heavy overlay", colorscale=[[0, "rgba(228,0,43,0)"], [1, "rgba(228,0,43,0.45)"]],
                             showscale=False, zmin=0, zmax=1, hoverinfo="skip", visible=False), 1, 1)
    fig.add_trace(go.Scatter(name="exact heavy mass", mode="lines", line=dict(color="#4c78a8"),
                             hovertemplate="%{hovertext}<extra></extra>"), 1, 2)
    fig.add_trace(go.Scatter(name="estimated heavy share", mode="lines", line=dict(color="#f58518", dash="dot"),
                             hovertemplate="%{hovertext}<extra></extra>"), 1, 2)
    fig.add_trace(go.Scatter(name="random blocks", mode="lines", line=dict(color="gray", dash="dash"), hoverinfo="skip"), 1, 2)
    fig.update_yaxes(autorange="reversed", type="category", row=1, col=1)
    fig.update_xaxes(type="category", row=1, col=1)
    fig.update_xaxes(title_text="query (display order)", row=1, col=2)
    fig.update_yaxes(title_text="share of D_i", range=[0, 1.02], row=1, col=2)
    fig.update_layout(height=520, margin=dict(l=40, r=20, t=60, b=40), legend=dict(orientation="h", y=-0.08),
                      title=dict(text="heavy entries", x=0.01), clickmode="event")
    return fig


def heavy_mass(trace, exact_fn, rows=None) -> np.ndarray:
    """Exact softmax mass each query's heavy block holds: sum_j P_ij [j in its block].  # (Nq,)"""
    nq, nk = trace.query.shape[-2], trace.key.shape[-2]
    rows = torch.arange(nq) if rows is None else torch.as_tensor(rows)
    step = max(1, CHUNK_ENTRIES // max(1, nk))
    out = []
    for s in range(0, len(rows), step):
        r = rows[s : s + step]
        out.append((exact_fn(r).double() * heavy_rows(trace, r)).sum(-1))
    return torch.cat(out).numpy()


def heavy_update(trace, exact_fn, q_tokens, k_tokens, *, order="sorted", log_color=True, zoom=None,
                 max_cells: int = 256, mass=None, exact_pooled=None) -> PanelUpdate:
    """exact_pooled: the pooled exact matrix for this order and zoom if already known (it does not
    depend on bucket_size or the samples)."""
    nq, nk = trace.query.shape[-2], trace.key.shape[-2]
    ri, ci = display_order(trace, order, "q"), display_order(trace, order, "k")
    gr = make_grid(nq, zoom, max_cells)
    gc = make_grid(nk, None if zoom is None else (zoom[0] * nk // nq, zoom[1] * nk // nq), max_cells)
    fns = {} if exact_pooled is not None else {"exact": exact_fn}
    rects = block_rectangles(trace) if order == "sorted" else []
    if order != "sorted" or len(rects) > MAX_OUTLINES:
        fns["heavy"] = lambda rows: heavy_rows(trace, rows).float()
    mats = pooled_matrices(fns, ri, ci, gr, gc) if fns else {}
    if exact_pooled is not None:
        mats["exact"] = exact_pooled
    xl, yl = _strs(axis_labels(ci, k_tokens, gc, "k")), _strs(axis_labels(ri, q_tokens, gr, "q"))
    z = color_values(mats["exact"], log_color)
    upd = PanelUpdate()
    upd.traces["attention"] = dict(
        z=packed(z), x=xl, y=yl, zmin=LOG_FLOOR if log_color else 0.0, zmax=0.0 if log_color else float(np.nanmax(z)),
        colorbar=dict(title=dict(text="log10 p" if log_color else "p")),
    )
    shapes = rect_shapes(rects, gr, gc, "x", "y")
    if order == "sorted" and len(shapes) <= MAX_OUTLINES:
        upd.traces["heavy overlay"] = dict(visible=False, z=[[None]], x=[], y=[])
        upd.layout["shapes"] = shapes
    else:  # token order scatters the blocks, and hundreds of outlines would swamp the view: shade instead
        hv = np.where(mats["heavy"] > 0, 1.0, np.nan)
        upd.traces["heavy overlay"] = dict(visible=True, z=packed(hv), x=xl, y=yl)
        upd.layout["shapes"] = []
    if mass is None:
        mass = heavy_mass(trace, exact_fn)
    est = _np(trace.heavy_fraction)
    pos = np.arange(nq)
    step = max(1, math.ceil(nq / 1024))
    p = pos[::step]
    upd.traces["exact heavy mass"] = dict(
        x=p, y=np.round(mass[ri[p]], 4), customdata=ri[p], text=tok(q_tokens, ri[p]),
        hovertemplate="query %{customdata} '%{text}': %{y:.3f} of its softmax mass in its block<extra></extra>")
    upd.traces["estimated heavy share"] = dict(
        x=p, y=np.round(est[ri[p]], 4), customdata=ri[p],
        hovertemplate="query %{customdata}: heavy share of D~ = %{y:.3f}<extra></extra>")
    blk = float(_np(trace.key_block_len).max()) if trace.num_blocks > 1 else float(nk)
    upd.traces["random blocks"] = dict(x=[0, nq - 1], y=[min(1.0, blk / nk)] * 2)
    upd.layout["xaxis.showticklabels"] = gc.bins <= 64
    upd.layout["yaxis.showticklabels"] = gr.bins <= 64
    upd.layout["xaxis2.title.text"] = f"query ({order} order)"
    mean_mass = float(mass.mean())
    pooled = "" if gr.width == 1 and gc.width == 1 else f", shown max-pooled {gr.width}x{gc.width}"
    upd.layout["title.text"] = (f"heavy entries: {trace.num_blocks} blocks of "
                                f"{blk:.0f} keys; they hold {mean_mass:.1%} of the softmax mass "
                                f"(random blocks: {blk / nk:.1%}); {order} order{pooled}")
    upd.info = dict(rects=rects, shapes=upd.layout["shapes"], grid_rows=gr, grid_cols=gc, mean_mass=mean_mass, mass=mass,
                    pooled=mats["exact"], row_index=ri, col_index=ci)
    return upd


# --------------------------------------------------------------------------- samples panel
def make_samples() -> go.Figure:
    fig = make_subplots(rows=1, cols=3, column_widths=[0.46, 0.27, 0.27], horizontal_spacing=0.07,
                        subplot_titles=("sampling probability per key", "sampled columns: weight 1/(s·p) × count",
                                        "queries skipping each sample (block has it)"))
    fig.add_trace(go.Scatter(name="probability", mode="lines", line=dict(color="#4c78a8"),
                             hovertemplate="%{hovertext}<extra></extra>"), 1, 1)
    fig.add_trace(go.Scatter(name="sampled", mode="markers", marker=dict(color="#e4002b", symbol="diamond", sizemode="diameter"),
                             hovertemplate="%{hovertext}<extra></extra>"), 1, 1)
    fig.add_trace(go.Bar(name="column weight", marker_color="#f58518", hovertemplate="%{hovertext}<extra></extra>"), 1, 2)
    fig.add_trace(go.Bar(name="excluded queries", marker_color="#54a24b", hovertemplate="%{hovertext}<extra></extra>"), 1, 3)
    fig.update_xaxes(title_text="key (token order)", row=1, col=1)
    fig.update_xaxes(title_text="sampled key", type="category", row=1, col=2)
    fig.update_xaxes(title_text="sampled key", type="category", row=1, col=3)
    fig.update_layout(height=360, margin=dict(l=40, r=20, t=60, b=40), legend=dict(orientation="h", y=-0.2),
                      title=dict(text="samples", x=0.01), bargap=0.1)
    return fig


def samples_update(trace, k_tokens) -> PanelUpdate:
    nk = trace.key.shape[-2]
    s = trace.sampled.shape[-1]
    probs = _np(trace.probs).astype(np.float64)
    counts = _np(trace.sample_counts())
    weights = _np(trace.column_weights()).astype(np.float64)
    uniq = np.flatnonzero(counts > 0)  # sorted unique sampled keys
    kb = _np(trace.k_blocks)
    q_per_block = np.bincount(_np(trace.q_blocks), minlength=max(trace.num_blocks, 1))
    excluded = np.array([q_per_block[kb[j]] if kb[j] >= 0 and trace.num_blocks > 1 else
                         (trace.query.shape[-2] if trace.num_blocks <= 1 else 0) for j in uniq], dtype=np.int64)
    step = max(1, math.ceil(nk / 4096))
    x = np.arange(nk)[::step]
    upd = PanelUpdate()
    upd.traces["probability"] = dict(
        x=x, y=probs[x], text=tok(k_tokens, x), hovertemplate="key %{x} '%{text}': p = %{y:.2e}<extra></extra>")
    size = 5 + 10 * np.sqrt(counts[uniq] / max(1, counts.max()))
    upd.traces["sampled"] = dict(
        x=uniq, y=probs[uniq], marker=dict(size=size),
        hovertext=_strs([f"key {j} '{_short(k_tokens[j])}'<br>drawn {counts[j]}x, weight {weights[j]:.3g}<br>"
                   f"block {kb[j]}, skipped by {e} queries" for j, e in zip(uniq, excluded)]))
    labels = _strs([f"{j} {_short(k_tokens[j], 10)}" for j in uniq])
    upd.traces["column weight"] = dict(
        x=labels, y=weights[uniq],
        hovertext=_strs([f"key {j} '{_short(k_tokens[j])}': {counts[j]} draws × 1/(s·p) = {weights[j]:.3g}" for j in uniq]))
    upd.traces["excluded queries"] = dict(
        x=labels, y=excluded,
        hovertext=_strs([f"key {j}: {e} queries already compute it in block {kb[j]}" for j, e in zip(uniq, excluded)]))
    upd.layout["xaxis2.showticklabels"] = len(uniq) <= 40
    upd.layout["xaxis3.showticklabels"] = len(uniq) <= 40
    note = " (one block = exact: samples unused)" if trace.num_blocks <= 1 else ""
    upd.layout["title.text"] = (f"samples: s={s} draws of {nk} keys ({trace.sampling}), {len(uniq)} distinct; "
                                f"{int(excluded.sum())} (query, key) pairs skipped because the block had them{note}")
    upd.info = dict(unique=uniq, counts=counts[uniq], weights=weights[uniq], excluded=excluded)
    return upd


# --------------------------------------------------------------------------- error panel
def make_error() -> go.Figure:
    fig = make_subplots(
        rows=2, cols=3, vertical_spacing=0.14, horizontal_spacing=0.08,
        subplot_titles=("approximate matrix", "exact matrix", "|approx − exact|",
                        "per-query error ‖o~ᵢ−oᵢ‖/‖oᵢ‖", "normaliser: log D~ vs log D", "error vs budget"),
    )
    for col, name, cs in ((1, "approx", "Viridis"), (2, "exact", "Viridis"), (3, "error", "Magma")):
        fig.add_trace(go.Heatmap(name=name, colorscale=cs, showscale=(col != 1),
                                 colorbar=dict(len=0.42, y=0.79, x=0.645 if col == 2 else 1.0, thickness=10),
                                 hovertemplate="q %{y}<br>k %{x}<br>%{z}<extra></extra>"), 1, col)
        fig.update_yaxes(autorange="reversed", type="category", showticklabels=False, row=1, col=col)
        fig.update_xaxes(type="category", showticklabels=False, row=1, col=col)
    fig.add_trace(go.Scatter(name="per-query error", mode="lines", line=dict(color="#4c78a8"),
                             hovertemplate="%{hovertext}<extra></extra>"), 2, 1)
    fig.add_trace(go.Scatter(name="normaliser", mode="markers", marker=dict(size=4, color="#f58518"),
                             hovertemplate="%{hovertext}<extra></extra>"), 2, 2)
    fig.add_trace(go.Scatter(name="y = x", mode="lines", line=dict(color="gray", dash="dash"), hoverinfo="skip"), 2, 2)
    fig.add_trace(go.Scatter(name="error curve", mode="lines+markers", line=dict(color="#4c78a8"),
                             error_y=dict(type="data", visible=True), hovertemplate="%{hovertext}<extra></extra>"), 2, 3)
    fig.add_trace(go.Scatter(name="current", mode="markers", marker=dict(color="#e4002b", size=13, symbol="star"),
                             hovertemplate="%{hovertext}<extra></extra>"), 2, 3)
    fig.update_xaxes(title_text="query (token order)", row=2, col=1)
    fig.update_xaxes(title_text="log D (exact)", row=2, col=2)
    fig.update_yaxes(title_text="log D~", row=2, col=2)
    fig.update_xaxes(title_text="budget: block + samples per query", type="log", row=2, col=3)
    fig.update_yaxes(title_text="relative spectral error", rangemode="tozero", row=2, col=3)
    fig.update_layout(height=640, margin=dict(l=40, r=20, t=60, b=40), legend=dict(orientation="h", y=-0.1),
                      title=dict(text="error", x=0.01))
    return fig


PIN_COLORS = ("#72b7b2", "#b279a2", "#9d755d", "#bab0ac", "#eeca3b", "#54a24b")


def pinned_trace(curve, i: int) -> go.Scatter:
    """A pinned copy of an error-vs-budget curve (a new trace in the error figure's curve subplot)."""
    return go.Scatter(
        name=f"pin {i}: {curve.label}", x=list(curve.budgets), y=list(curve.mean), mode="lines+markers",
        line=dict(color=PIN_COLORS[i % len(PIN_COLORS)], dash="dot"),
        error_y=dict(type="data", array=list(curve.sd), visible=True), xaxis="x6", yaxis="y6",
        hovertemplate=f"pin {i}: {curve.label}<br>budget %{{x}}: %{{y:.3f}}<extra></extra>",
    )


def error_update(trace, exact_fn, approx_fn, exact, approx_out, approx_log_d, q_tokens, k_tokens, curve, *,
                 order="sorted", log_color=True, zoom=None, max_cells: int = 128) -> PanelUpdate:
    nq, nk = trace.query.shape[-2], trace.key.shape[-2]
    ri, ci = display_order(trace, order, "q"), display_order(trace, order, "k")
    gr = make_grid(nq, zoom, max_cells)
    gc = make_grid(nk, None if zoom is None else (zoom[0] * nk // nq, zoom[1] * nk // nq), max_cells)
    fns = {"exact": exact_fn}
    if approx_fn is not None:
        fns["approx"] = approx_fn
    mats = pooled_matrices(fns, ri, ci, gr, gc)
    xl, yl = _strs(axis_labels(ci, k_tokens, gc, "k")), _strs(axis_labels(ri, q_tokens, gr, "q"))
    zmin, zmax = (LOG_FLOOR, 0.0) if log_color else (0.0, float(np.nanmax(mats["exact"])))
    upd = PanelUpdate()
    upd.traces["exact"] = dict(z=packed(color_values(mats["exact"], log_color)), x=xl, y=yl, zmin=zmin, zmax=zmax)
    if approx_fn is not None:
        upd.traces["approx"] = dict(z=packed(color_values(mats["approx"], log_color)), x=xl, y=yl, zmin=zmin, zmax=zmax)
        err = mats["error"]
        upd.traces["error"] = dict(z=packed(color_values(err, log_color)), x=xl, y=yl,
                                   zmin=LOG_FLOOR if log_color else 0.0, zmax=0.0 if log_color else float(np.nanmax(err)))
    else:
        upd.traces["approx"] = dict(z=[[None]], x=["n/a"], y=["n/a"])
        upd.traces["error"] = dict(z=[[None]], x=["n/a"], y=["n/a"])
    o, oa = exact.out.double(), approx_out.double()
    per_q = _np((oa - o).norm(dim=-1) / o.norm(dim=-1).clamp_min(1e-12))
    step = max(1, math.ceil(nq / 2048))
    qi = np.arange(nq)[::step]
    upd.traces["per-query error"] = dict(
        x=qi, y=np.round(per_q[qi], 5), customdata=qi, text=tok(q_tokens, qi),
        hovertemplate="query %{x} '%{text}': %{y:.3f}<extra></extra>")
    if approx_log_d is not None:
        le, la = _np(exact.log_d).astype(np.float64), _np(approx_log_d).astype(np.float64)
        upd.traces["normaliser"] = dict(
            x=np.round(le[qi], 4), y=np.round(la[qi], 4), customdata=qi, visible=True, text=tok(q_tokens, qi),
            hovertemplate="query %{customdata} '%{text}'<br>log D = %{x:.3f}, log D~ = %{y:.3f}<extra></extra>")
        lo_, hi_ = float(min(le.min(), la.min())), float(max(le.max(), la.max()))
        upd.traces["y = x"] = dict(x=[lo_, hi_], y=[lo_, hi_])
    else:
        upd.traces["normaliser"] = dict(x=[], y=[], visible=False)
        upd.traces["y = x"] = dict(x=[], y=[])
    upd.traces["error curve"] = dict(
        x=list(curve.budgets), y=list(curve.mean), error_y=dict(type="data", array=list(curve.sd), visible=True),
        hovertext=_strs([f"budget {b}: {m:.3f} ± {s:.3f}" for b, m, s in zip(curve.budgets, curve.mean, curve.sd)]))
    c = curve.current
    upd.traces["current"] = dict(x=[curve.budgets[c]], y=[curve.mean[c]],
                                 hovertext=_strs([f"current: budget {curve.budgets[c]}, error {curve.mean[c]:.3f}"]))
    upd.layout["title.text"] = f"error: {curve.label}" + (
        "" if gr.width == 1 and gc.width == 1 else f" (matrices max-pooled {gr.width}x{gc.width})")
    upd.info = dict(per_query=per_q, pooled=mats, grid_rows=gr, grid_cols=gc)
    return upd


# --------------------------------------------------------------------------- row inspector
def make_inspector() -> go.Figure:
    fig = go.Figure()
    fig.add_trace(go.Scatter(name="exact row", mode="lines", line=dict(color="#4c78a8"),
                             hovertemplate="%{hovertext}<extra></extra>"))
    fig.add_trace(go.Scatter(name="approximate row", mode="lines", line=dict(color="#f58518", dash="dot"),
                             hovertemplate="%{hovertext}<extra></extra>"))
    fig.add_trace(go.Scatter(name="its block", mode="markers", marker=dict(color="rgba(228,0,43,0.6)", size=7, symbol="square"),
                             hovertemplate="%{hovertext}<extra></extra>"))
    fig.add_trace(go.Scatter(name="sampled keys", mode="markers", marker=dict(color="#54a24b", symbol="diamond", sizemode="diameter"),
                             hovertemplate="%{hovertext}<extra></extra>"))
    fig.update_layout(height=320, margin=dict(l=40, r=20, t=50, b=40), title=dict(text="row inspector", x=0.01),
                      xaxis_title="key (token order)", yaxis_title="attention weight", legend=dict(orientation="h", y=-0.25))
    return fig


def inspector_update(trace, query: int, exact_fn, approx_fn, q_tokens, k_tokens, method_label: str) -> PanelUpdate:
    nk = trace.key.shape[-2]
    rows = torch.tensor([query])
    ex = _np(exact_fn(rows)[0]).astype(np.float64)
    ap = _np(approx_fn(rows)[0]).astype(np.float64) if approx_fn is not None else None
    step = max(1, math.ceil(nk / 4096))
    x = np.arange(nk)[::step]
    qb = int(trace.q_blocks[query])
    kb = _np(trace.k_blocks)
    block = np.flatnonzero(kb == qb)
    counts = _np(trace.sample_counts())
    weights = _np(trace.column_weights()).astype(np.float64)
    sampled = np.flatnonzero((counts > 0) & (kb != qb)) if trace.num_blocks > 1 else np.array([], dtype=np.int64)
    upd = PanelUpdate()
    upd.traces["exact row"] = dict(x=x, y=ex[x], text=tok(k_tokens, x),
                                   hovertemplate="key %{x} '%{text}': exact %{y:.4f}<extra></extra>")
    if ap is not None:
        upd.traces["approximate row"] = dict(
            x=x, y=ap[x], visible=True, text=tok(k_tokens, x),
            hovertemplate="key %{x} '%{text}': " + method_label + " %{y:.4f}<extra></extra>")
    else:
        upd.traces["approximate row"] = dict(x=[], y=[], visible=False)
    upd.traces["its block"] = dict(
        x=block, y=ex[block], hovertext=_strs([f"key {j} '{_short(k_tokens[j])}' in block {qb}: exact {ex[j]:.4f}" for j in block]))
    upd.traces["sampled keys"] = dict(
        x=sampled, y=ex[sampled], marker=dict(size=6 + 10 * np.sqrt(weights[sampled] / max(1e-12, weights.max()))),
        hovertext=_strs([f"key {j} '{_short(k_tokens[j])}': drawn {counts[j]}x, weight {weights[j]:.3g}" for j in sampled]))
    mass = float(ex[block].sum())
    upd.layout["title.text"] = (f"row inspector: query {query} '{_short(q_tokens[query], 24)}', block {qb} "
                                f"({len(block)} keys, {mass:.1%} of its mass), {len(sampled)} sampled keys outside it")
    upd.info = dict(block=block, sampled=sampled, exact=ex, approx=ap)
    return upd
