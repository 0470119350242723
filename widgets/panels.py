"""The explorer's panels: a registry of five objects, each one figure, what it depends on, and its update.

A panel reads only the core's trace (its row methods: `attention_rows`, `exact_mask_rows`,
`weight_rows`, `row_columns`, and the fields listed in `KDETrace`) and the engine's public methods
(`exact_rows`, `exact_mask_rows`, `pca`, `heavy_mass`, `memo`). Nothing is re-derived here: every matrix entry drawn is the
trace's own number. Large N: rows are requested in bounded chunks and max-pooled to at most `max_cells`
per side, so no update builds or ships N x N.

    PANELS["heavy"].make()          -> an empty plotly Figure with named traces
    PANELS["heavy"].update(view)    -> PanelUpdate (its changes found by figures.diff, then written)
    PANELS["heavy"].settings        -> the Settings fields it depends on (None: all of them)
    PANELS["heavy"].display         -> the display options it depends on
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from kdeformer.core import bucket_ranks

from .figures import (  # noqa: F401  (re-exported: tests and notebooks use these names from panels)
    LOG_FLOOR, Grid, PanelUpdate, TokenLabels, apply, axis_labels, color_values, make_grid, max_pool,
    packed, same, short, strs, to_np, trace_by_name, unpack,
)
from .state import BLOCK_KEYS, KDE_KEYS, chunk_rows, pca_2d  # noqa: F401

MAX_POINTS = 2000  # scatter points per set in the projection (larger N is strided)
MAX_HYPERPLANES = 8  # hyperplane traces drawn only up to this many bits
MAX_OUTLINES = 64  # more heavy blocks in view than this: shade them instead of outlining
MAX_EDGES = 40  # more key blocks than this: block edges are not drawn in the bucket sequence
FONT = dict(size=12)
TITLE_FONT = dict(size=14)
AXIS_TITLE = dict(size=11)


@dataclass
class View:
    """Everything one redraw reads: settings, display options, the engine, and the run's result."""

    settings: object  # state.Settings
    display: dict  # log_color, order, zoom, query
    engine: object  # state.Engine
    result: object  # state.ApproxResult
    curve: object  # state.Curve
    q_tokens: TokenLabels
    k_tokens: TokenLabels
    max_cells: int = 256
    error_cells: int = 128

    @property
    def trace(self):
        return self.result.kde_trace

    @property
    def query(self) -> int:
        return min(int(self.display["query"]), self.trace.query.shape[-2] - 1)

    def exact_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows of the exact softmax matrix D^-1 A.  # (R, Nk)"""
        return self.engine.exact_rows(self.settings.layer, self.settings.head, rows)

    def exact_mask_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows of the entries the KDEformer trace computes exactly (the trace's exact_mask_rows).  # (R, Nk)"""
        return self.engine.exact_mask_rows(self.settings, self.trace, rows)

    def approx_rows(self):
        """f(rows) -> rows of the shown method's matrix (attention_rows @ V == output rows), or None."""
        s, res = self.settings, self.result
        if s.method == "kdeformer":
            return res.kde_trace.attention_rows
        if s.method == "exact":
            return self.exact_rows
        if res.matrix is not None:
            return lambda rows: res.matrix[rows]
        return None

    def label(self) -> str:
        s = self.settings
        return f"L{s.layer}H{s.head}"


@dataclass(frozen=True)
class Panel:
    name: str
    make: Callable[[], go.Figure]
    update: Callable[[View], PanelUpdate]
    settings: tuple | None  # Settings fields it depends on; None: every field
    display: tuple = ()  # display options it depends on


def needs_redraw(panel: Panel, s, disp: dict, last_s, last_d) -> bool:
    """Whether what `panel` depends on changed between the last drawn update and this one."""
    if last_s is None:
        return True
    fields = panel.settings if panel.settings is not None else tuple(s.__dataclass_fields__)
    return s.key(fields) != last_s.key(fields) or any(disp[k] != last_d[k] for k in panel.display)


# --------------------------------------------------------------------------- rows, chunked
def pooled_rows(row_fns: dict, row_index, col_index, grid_r: Grid, grid_c: Grid) -> dict:
    """Stream the windowed rows of each matrix in chunks and max-pool them (bounded memory).

    row_fns: name -> f(rows tensor) -> (R, Nk) rows in token order. "error" = |approx - exact| is added
    when both are present. Returns name -> (bins_r, bins_c) float32 numpy.
    """
    rows_all = torch.as_tensor(row_index[grid_r.lo : grid_r.hi])
    cols = torch.as_tensor(col_index[grid_c.lo : grid_c.hi])
    parts = {name: [] for name in list(row_fns) + (["error"] if {"exact", "approx"} <= set(row_fns) else [])}
    for rows in chunk_rows(rows_all, len(col_index), grid_r.width):
        sub_r = Grid(0, len(rows), grid_r.width)
        got = {name: fn(rows)[:, cols].float() for name, fn in row_fns.items()}
        if "error" in parts:
            got["error"] = (got["approx"] - got["exact"]).abs()
        for name, m in got.items():
            parts[name].append(max_pool(m, sub_r, grid_c))
    return {name: torch.cat(p, 0).numpy() for name, p in parts.items()}


def display_order(trace, order: str, axis: str) -> np.ndarray:
    """Token index at each display position: the sorted (hash) order or the original order."""
    n = (trace.query if axis == "q" else trace.key).shape[-2]
    if order == "sorted":
        return to_np(trace.q_order if axis == "q" else trace.k_order).astype(np.int64)
    return np.arange(n, dtype=np.int64)


def matrix_grids(view: View, max_cells: int):
    """(row index, col index, row grid, col grid) of the matrix panels for the view's order and zoom."""
    tr, zoom = view.trace, view.display["zoom"]
    nq, nk = tr.query.shape[-2], tr.key.shape[-2]
    ri, ci = display_order(tr, view.display["order"], "q"), display_order(tr, view.display["order"], "k")
    gr = make_grid(nq, zoom, max_cells)
    gc = make_grid(nk, None if zoom is None else (zoom[0] * nk // nq, zoom[1] * nk // nq), max_cells)
    return ri, ci, gr, gc


def pooled_note(gr: Grid, gc: Grid) -> str:
    return "" if gr.width == 1 and gc.width == 1 else f", max-pooled {gr.width}x{gc.width}"


def code_string(code: int, bits: int) -> str:
    """Bucket code as bits, hyperplane 0 first."""
    return "".join("1" if (int(code) >> i) & 1 else "0" for i in range(bits))


def block_len(trace) -> int:
    """Keys per block the core actually used (balanced blocks: <= the requested bucket_size)."""
    nk = trace.key.shape[-2]
    return int(to_np(trace.key_block_len).max()) if trace.num_blocks > 1 else nk


EVERY_KEY = "every key computed exactly: exact attention"


def exact_structure(trace) -> str:
    """What the run computed exactly, in words, from the trace (one home for the readouts)."""
    heavy_cols = heavy_column_count(trace)
    cols = f" + {heavy_cols} heavy columns" if heavy_cols else ""
    if getattr(trace, "is_causal", False):
        return f"causal: the local window{cols}"
    if "inclusion_probs" in trace.extras:  # pps: query blocks with their own columns, no key blocks
        if bool((trace.block_exact | (trace.block_weights == 0)).all()) and trace.block_cols.shape[-1] >= trace.num_keys:
            return EVERY_KEY
        blocks = pps_query_blocks(trace)
        exact = float(to_np((trace.block_exact & (trace.block_weights > 0)).sum(-1)).mean())
        window = int(trace.extras.get("window", -1))
        near = f" + ±{window} token window" if window >= 0 else ""
        return (f"{blocks} query blocks × {trace.block_cols.shape[-1]} columns "
                f"(on average {exact:.0f} exact, π = 1){near}")
    return f"{trace.num_blocks} blocks of ≤{block_len(trace)} keys{cols}"


def pps_query_blocks(trace) -> int:
    """How many query blocks a pps run cut (its trace's row_block numbers them)."""
    return int(to_np(trace.row_block).max()) + 1


def heavy_column_count(trace) -> int:
    """Heavy columns computed exactly per sampling group (column_norm; 0 otherwise)."""
    cols = trace.extras.get("heavy_columns") if trace.extras else None
    return 0 if cols is None else int(cols.shape[-1])


def group_draws(trace) -> np.ndarray:
    """Draws of each sampling group.  # (num_groups,)"""
    groups = to_np(trace.sample_group).reshape(-1)
    return np.bincount(groups[groups >= 0], minlength=max(1, trace.num_groups))


def set_title(upd: PanelUpdate, title: str, caption: str) -> None:
    """A short plotly title (fits any width) and the panel's caption: the page shows it as wrapping HTML
    under the figure (PlotBoard reads layout.meta.caption), exports as text."""
    upd.layout["title.text"] = title
    upd.layout["meta"] = {"caption": caption}


def caption(fig) -> str:
    """Title and caption of a panel figure, as one string."""
    meta = fig.layout.meta if isinstance(fig.layout.meta, dict) else {}
    return f"{fig.layout.title.text} · {meta.get('caption', '')}"


def base_layout(fig: go.Figure, height: int, title: str, legend_y: float) -> None:
    """What every panel shares: full output width (autosize), its height, a short left title."""
    fig.update_layout(height=height, autosize=True, font=FONT, margin=dict(l=55, r=30, t=60, b=50), meta={"caption": ""},
                      title=dict(text=title, x=0.01, xanchor="left", y=0.98, yanchor="top", font=TITLE_FONT),
                      legend=dict(orientation="h", y=legend_y, x=0, font=dict(size=11)))
    fig.update_annotations(font=dict(size=12))  # subplot titles
    # plotly's default ("hide past div") measures every tick label's box on every redraw to hide the ones
    # past the figure's edge, ~15 ms a panel; the margins already hold them
    fig.update_xaxes(ticklabeloverflow="allow")
    fig.update_yaxes(ticklabeloverflow="allow")


# --------------------------------------------------------------------------- buckets panel
def make_buckets() -> go.Figure:
    fig = make_subplots(rows=1, cols=3, column_widths=[0.40, 0.30, 0.30], horizontal_spacing=0.08,
                        subplot_titles=("queries (o), keys (x)", "bucket sizes", "sorted keys' buckets"))
    fig.add_trace(go.Scatter(name="hyperplanes", mode="lines", line=dict(color="rgba(90,90,90,0.45)", width=1),
                             hoverinfo="skip", showlegend=False), 1, 1)
    fig.add_trace(go.Scatter(name="queries", mode="markers", marker=dict(symbol="circle", size=6, colorscale="Turbo",
                             line=dict(width=0)), hovertemplate="%{hovertext}<extra></extra>"), 1, 1)
    fig.add_trace(go.Scatter(name="keys", mode="markers", marker=dict(symbol="x", size=7, colorscale="Turbo"),
                             hovertemplate="%{hovertext}<extra></extra>"), 1, 1)
    fig.add_trace(go.Bar(name="queries per bucket", marker_color="#4c78a8", hovertemplate="%{hovertext}<extra></extra>"), 1, 2)
    fig.add_trace(go.Bar(name="keys per bucket", marker_color="#f58518", hovertemplate="%{hovertext}<extra></extra>"), 1, 2)
    fig.add_trace(go.Scatter(name="key sequence", mode="lines", line=dict(color="#4c78a8", width=2, shape="hv"),
                             hovertemplate="%{hovertext}<extra></extra>"), 1, 3)  # one path, not 512 markers
    fig.add_trace(go.Scatter(name="block edges", mode="lines", line=dict(color="rgba(228,0,43,0.5)", width=1, dash="dot"),
                             hoverinfo="skip"), 1, 3)
    base_layout(fig, 400, "buckets", -0.22)
    fig.update_layout(barmode="stack")
    fig.update_xaxes(title_text="PC 1", title_font=AXIS_TITLE, row=1, col=1)
    fig.update_yaxes(title_text="PC 2", title_font=AXIS_TITLE, row=1, col=1)
    fig.update_xaxes(title_text="bucket, Gray order", title_font=AXIS_TITLE, type="category", row=1, col=2)
    fig.update_xaxes(title_text="sorted key position", title_font=AXIS_TITLE, row=1, col=3)
    fig.update_yaxes(title_text="bucket rank", title_font=AXIS_TITLE, row=1, col=3)
    return fig


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


def projection_traces(view: View, upd: PanelUpdate, ranks: np.ndarray) -> None:
    """Queries and keys in the 2-D PCA plane, coloured by bucket rank, with the hash hyperplanes."""
    tr = view.trace
    nq, nk, r = tr.query.shape[-2], tr.key.shape[-2], tr.projections.shape[-1]
    coords, mean, comps = view.engine.pca(view.settings.layer, view.settings.head)
    coords = to_np(coords).astype(np.float32)
    for name, n, off, codes, blocks, tokens in (("queries", nq, 0, tr.q_buckets, tr.q_blocks, view.q_tokens),
                                                ("keys", nk, nq, tr.k_buckets, tr.k_blocks, view.k_tokens)):
        idx = np.arange(n)[:: max(1, math.ceil(n / MAX_POINTS))]
        rank, blk = ranks[to_np(codes)][idx], to_np(blocks)[idx]
        label = "query" if name == "queries" else "key"
        upd.traces[name] = dict(
            x=coords[off + idx, 0], y=coords[off + idx, 1], customdata=np.stack([idx, rank, blk], 1),
            marker=dict(color=rank, cmin=0, cmax=2**r - 1),
            hovertext=strs([f"{label} {i} '{t}'<br>bucket rank {k}, block {b}"
                            for i, t, k, b in zip(idx, tokens.at(idx), rank, blk)]))
    if r <= MAX_HYPERPLANES:
        pad = 0.05
        box = ((float(coords[:, 0].min()) - pad, float(coords[:, 0].max()) + pad),
               (float(coords[:, 1].min()) - pad, float(coords[:, 1].max()) + pad))
        hx, hy = hyperplane_lines(tr.projections.reshape(-1, r), mean, comps, box)
        upd.traces["hyperplanes"] = dict(x=hx, y=hy, visible=True)
        upd.layout["xaxis.range"], upd.layout["yaxis.range"] = list(box[0]), list(box[1])
    else:
        upd.traces["hyperplanes"] = dict(x=[], y=[], visible=False)
        upd.layout["xaxis.autorange"], upd.layout["yaxis.autorange"] = True, True


def bucket_size_traces(view: View, upd: PanelUpdate, ranks: np.ndarray) -> np.ndarray:
    """Queries and keys per non-empty bucket, buckets in rank order. Returns the codes shown."""
    tr = view.trace
    r = tr.projections.shape[-1]
    qc, kc = to_np(tr.q_buckets), to_np(tr.k_buckets)
    real = np.ones(len(kc), dtype=bool) if tr.key_mask is None else to_np(tr.key_mask).reshape(-1).astype(bool)
    kc_real = kc[real]  # masked keys are not counted
    codes = np.union1d(qc, kc_real)
    codes = codes[np.argsort(ranks[codes])]
    q_count = np.bincount(qc, minlength=2**r)[codes]
    k_count = np.bincount(kc_real, minlength=2**r)[codes]
    labels = strs([code_string(int(c), r) for c in codes])
    for name, what, count in (("queries per bucket", "queries", q_count), ("keys per bucket", "keys", k_count)):
        upd.traces[name] = dict(x=labels, y=count, hovertext=strs(
            [f"bucket {lab} (rank {ranks[c]}): {n} {what}" for lab, c, n in zip(labels, codes, count)]))
    upd.layout["xaxis2.showticklabels"] = len(codes) <= 24
    upd.info.update(codes=codes, q_count=q_count, k_count=k_count)
    return codes


def key_sequence_traces(view: View, upd: PanelUpdate, ranks: np.ndarray) -> None:
    """The sorted keys' bucket ranks (non-decreasing), with the block edges when there are few blocks."""
    tr = view.trace
    nk, r = tr.key.shape[-2], tr.projections.shape[-1]
    kr, kblk, order = ranks[to_np(tr.k_buckets)], to_np(tr.k_blocks), to_np(tr.k_order)
    si = np.arange(nk)[:: max(1, math.ceil(nk / MAX_POINTS))]
    upd.traces["key sequence"] = dict(
        x=si, y=kr[order[si]],
        hovertext=strs([f"sorted position {p}: key {j} '{t}'<br>bucket rank {k}, block {b}" for p, j, t, k, b in
                        zip(si, order[si], view.k_tokens.at(order[si]), kr[order[si]], kblk[order[si]])]))
    kb_sorted = kblk[order]
    edges = [p for p in range(1, nk) if kb_sorted[p] != kb_sorted[p - 1] and kb_sorted[p] >= 0]
    ex, ey = [], []
    if len(edges) <= MAX_EDGES:  # bucket_size 1 would draw one line per key: none then, the title says so
        for p in edges:
            ex += [p - 0.5, p - 0.5, None]
            ey += [0.0, float(2**r), None]
    upd.traces["block edges"] = dict(x=ex, y=ey, visible=bool(ex))
    upd.info["edges"] = edges


def buckets_update(view: View) -> PanelUpdate:
    tr = view.trace
    r = tr.projections.shape[-1]
    ranks = to_np(bucket_ranks(r, tr.bucket_order, "cpu"))
    upd = PanelUpdate()
    projection_traces(view, upd, ranks)
    codes = bucket_size_traces(view, upd, ranks)
    key_sequence_traces(view, upd, ranks)
    edges = "" if len(upd.info["edges"]) <= MAX_EDGES else f" (edges of {tr.num_blocks} blocks not drawn)"
    set_title(upd, f"buckets · {view.label()} r={r}",
              f"{len(codes)} of {2**r} buckets used, {tr.bucket_order} order, {what_hashing_did(tr)}{edges}")
    return upd


def what_hashing_did(trace) -> str:
    """What the run used the hash codes for, in words: key blocks, or (pps) only the order of the queries."""
    if "inclusion_probs" not in trace.extras:
        return f"{trace.num_blocks} key blocks"
    blocks = pps_query_blocks(trace)
    token = bool(to_np(trace.extras["token_order"]).reshape(-1)[0])
    order = ("token order (it left the queries of a block closer together than the LSH order did)" if token
             else "the LSH order above")
    return (f"pps: the queries are cut into {blocks} blocks in {order}; keys are not blocked (their "
            f"buckets are drawn for comparison only)")


# --------------------------------------------------------------------------- heavy panel
def make_heavy() -> go.Figure:
    fig = make_subplots(rows=1, cols=2, column_widths=[0.62, 0.38], horizontal_spacing=0.14,
                        subplot_titles=("exact D⁻¹A, exact entries marked", "softmax mass computed exactly"))
    fig.add_trace(go.Heatmap(name="attention", colorscale="Viridis",
                             colorbar=dict(x=0.575, xanchor="left", len=0.85, thickness=10, title=dict(text="log10 p", side="top")),
                             hovertemplate="%{y}<br>%{x}<br>%{z:.3g}<extra></extra>"), 1, 1)
    fig.add_trace(go.Heatmap(name="heavy overlay", colorscale=[[0, "rgba(228,0,43,0)"], [1, "rgba(228,0,43,0.45)"]],
                             showscale=False, zmin=0, zmax=1, hoverinfo="skip", visible=False), 1, 1)
    fig.add_trace(go.Scatter(name="exact heavy mass", mode="lines", line=dict(color="#4c78a8"),
                             hovertemplate="%{hovertext}<extra></extra>"), 1, 2)
    fig.add_trace(go.Scatter(name="estimated heavy share", mode="lines", line=dict(color="#f58518", dash="dot"),
                             hovertemplate="%{hovertext}<extra></extra>"), 1, 2)
    fig.add_trace(go.Scatter(name="random entries", mode="lines", line=dict(color="gray", dash="dash"), hoverinfo="skip"), 1, 2)
    fig.update_yaxes(autorange="reversed", type="category", showticklabels=False, row=1, col=1)
    fig.update_xaxes(type="category", showticklabels=False, row=1, col=1)
    fig.update_xaxes(title_text="query (display order)", title_font=AXIS_TITLE, row=1, col=2)
    fig.update_yaxes(title_text="share of D_i", title_font=AXIS_TITLE, range=[0, 1.02], side="right", row=1, col=2)
    base_layout(fig, 520, "heavy entries", -0.12)
    return fig


def block_rectangles(trace) -> list[tuple[int, int, int, int, int]]:
    """Heavy blocks in sorted positions: (row_start, row_end, col_start, col_end, block), ends exclusive.

    Rows: maximal runs of sorted queries sharing a key block; columns: the sorted keys of that block.
    """
    qb = to_np(trace.q_blocks)[to_np(trace.q_order)]  # key block of each sorted query
    kb = to_np(trace.k_blocks)[to_np(trace.k_order)]  # block of each sorted key (-1 masked, at the end)
    pos = np.arange(len(kb))
    valid = kb >= 0
    nb = int(kb.max()) + 1 if valid.any() else 0
    k_lo, k_hi = np.full(nb, len(kb)), np.zeros(nb, dtype=np.int64)
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


def heavy_matrix_traces(view: View, upd: PanelUpdate, exact_entries: int) -> dict:
    """The exact matrix (pooled, cached per sort order and view) and the exact entries marked."""
    tr, d = view.trace, view.display
    ri, ci, gr, gc = matrix_grids(view, view.max_cells)
    order_key = (to_np(tr.q_order).tobytes(), to_np(tr.k_order).tobytes(), d["order"], d["zoom"], view.max_cells)
    exact = view.engine.memo("pooled exact", (view.settings.layer, view.settings.head) + order_key,
                             lambda: pooled_rows({"exact": view.exact_rows}, ri, ci, gr, gc)["exact"])
    marks = pooled_rows({"heavy": lambda rows: view.exact_mask_rows(rows).float()}, ri, ci, gr, gc)["heavy"]
    xl, yl = strs(axis_labels(ci, view.k_tokens, gc, "k")), strs(axis_labels(ri, view.q_tokens, gr, "q"))
    log = d["log_color"]
    z = color_values(exact, log)
    upd.traces["attention"] = dict(z=packed(z), x=xl, y=yl, zmin=LOG_FLOOR if log else 0.0,
                                   zmax=0.0 if log else float(np.nanmax(z)),
                                   colorbar=dict(title=dict(text="log10 p" if log else "p")))
    rects = block_rectangles(tr) if d["order"] == "sorted" else []
    shapes = rect_shapes(rects, gr, gc, "x", "y")
    outlined = d["order"] == "sorted" and len(shapes) <= MAX_OUTLINES
    upd.layout["shapes"] = shapes if outlined else []
    # shade the exactly computed entries unless the outlines show every one of them (heavy columns, a
    # local window or other exact entries are shaded; so is everything in token order or when hundreds
    # of outlines would swamp the view)
    outlined_entries = sum((r1 - r0) * (c1 - c0) for r0, r1, c0, c1, _ in rects)
    block_only = outlined and outlined_entries == exact_entries
    shade = (marks > 0).astype(np.uint8)  # 0 is transparent in the overlay's colour scale
    upd.traces["heavy overlay"] = dict(visible=not block_only, z=packed(shade), x=xl, y=yl)
    upd.info.update(rects=rects, shapes=shapes, grid_rows=gr, grid_cols=gc, pooled=exact, marks=marks,
                    row_index=ri, col_index=ci)
    return dict(gr=gr, gc=gc)


def heavy_update(view: View) -> PanelUpdate:
    tr = view.trace
    nq, nk = tr.query.shape[-2], tr.key.shape[-2]
    upd = PanelUpdate()
    mass, count = view.engine.heavy_mass(view.settings, tr)
    grids = heavy_matrix_traces(view, upd, int(count.sum()))
    ri = upd.info["row_index"]
    est = to_np(tr.heavy_fraction)
    p = np.arange(nq)[:: max(1, math.ceil(nq / 1024))]
    upd.traces["exact heavy mass"] = dict(
        x=p, y=np.round(mass[ri[p]], 4), customdata=ri[p],
        hovertext=strs([f"query {i} '{t}': {m:.3f} of its softmax mass computed exactly"
                        for i, t, m in zip(ri[p], view.q_tokens.at(ri[p]), mass[ri[p]])]))
    upd.traces["estimated heavy share"] = dict(
        x=p, y=np.round(est[ri[p]], 4), customdata=ri[p],
        hovertext=strs([f"query {i}: exact entries' share of D~ = {e:.3f}" for i, e in zip(ri[p], est[ri[p]])]))
    random_share = float(count.mean()) / nk
    upd.traces["random entries"] = dict(x=[0, nq - 1], y=[random_share] * 2)
    upd.layout["xaxis2.title.text"] = f"query ({view.display['order']} order)"
    mean_mass = float(mass.mean())
    what = exact_structure(tr)
    set_title(upd, f"exact entries · {view.label()} B{view.settings.bucket_size}",
              f"{what} hold {mean_mass:.1%} of the softmax mass "
              f"(as many random entries: {random_share:.1%}){pooled_note(grids['gr'], grids['gc'])}")
    upd.info.update(mean_mass=mean_mass, mass=mass, exact_count=count)
    return upd


# --------------------------------------------------------------------------- samples panel
def make_samples() -> go.Figure:
    fig = make_subplots(rows=1, cols=3, column_widths=[0.44, 0.28, 0.28], horizontal_spacing=0.08,
                        subplot_titles=("p per key", "column weights", "skipping queries"))
    fig.add_trace(go.Scatter(name="probability", mode="lines", line=dict(color="#4c78a8"),
                             hovertemplate="%{hovertext}<extra></extra>"), 1, 1)
    fig.add_trace(go.Scatter(name="sampled", mode="markers", marker=dict(color="#e4002b", symbol="diamond", sizemode="diameter"),
                             hovertemplate="%{hovertext}<extra></extra>"), 1, 1)
    fig.add_trace(go.Bar(name="column weight", marker_color="#f58518", hovertemplate="%{hovertext}<extra></extra>"), 1, 2)
    fig.add_trace(go.Bar(name="excluded queries", marker_color="#54a24b", hovertemplate="%{hovertext}<extra></extra>"), 1, 3)
    fig.update_xaxes(title_text="key (token order)", title_font=AXIS_TITLE, row=1, col=1)
    fig.update_xaxes(title_text="sampled key", title_font=AXIS_TITLE, type="category", row=1, col=2)
    fig.update_xaxes(title_text="sampled key", title_font=AXIS_TITLE, type="category", row=1, col=3)
    base_layout(fig, 400, "samples", -0.25)
    fig.update_layout(bargap=0.1)
    return fig


def group_samples(trace, group: int):
    """The draws of one sampling group: distinct keys and their draw counts."""
    g_of = to_np(trace.sample_group).reshape(-1)
    drawn = to_np(trace.sampled).reshape(-1)[g_of == group]
    counts = np.bincount(drawn, minlength=trace.key.shape[-2])
    return np.flatnonzero(counts > 0), counts, len(drawn)


def query_weights(trace, query: int) -> tuple[np.ndarray, np.ndarray]:
    """The inspected query's own factor per key (trace.weight_rows: summed 1/(s p) where sampled) and
    which keys it computes exactly.  # (Nk,), (Nk,)"""
    rows = torch.tensor([query])
    return to_np(trace.weight_rows(rows)[0]).astype(np.float64), to_np(trace.exact_mask_rows(rows)[0])


def skipping_queries(view: View, group: int, keys: np.ndarray) -> np.ndarray:
    """How many queries of `group` compute each of `keys` exactly (so skip its sample).  # (len(keys),)"""
    trace = view.trace
    rows = torch.nonzero(trace.q_groups == group).flatten()
    out = torch.zeros(len(keys), dtype=torch.int64)
    cols = torch.as_tensor(keys, dtype=torch.int64)
    for chunk in chunk_rows(rows, trace.key.shape[-2]):
        out += view.exact_mask_rows(chunk)[:, cols].sum(0)
    return out.numpy()


def samples_explanation(trace, s, draws: int) -> str:
    """What the sample_size slider buys, in the trace's own numbers (heavy columns, draws, groups)."""
    heavy = heavy_column_count(trace)
    text = f"s = {s.sample_size} columns per query: " + (f"{heavy} heavy columns exact + {draws} draws" if heavy
                                                          else f"{draws} draws")
    if trace.num_groups > 1:
        text += f"; each of {trace.num_groups} query groups draws its own ({int(group_draws(trace).sum())} in all)"
    return text


def samples_traces(view: View, upd: PanelUpdate, g: int, uniq, counts, used, exact, skipped) -> None:
    tr, kt = view.trace, view.k_tokens
    nk = tr.key.shape[-2]
    probs = to_np(tr.group_probs[g]).astype(np.float64)  # (Nk,)
    x = np.arange(nk)[:: max(1, math.ceil(nk / 4096))]
    upd.traces["probability"] = dict(x=x, y=probs[x], hovertext=strs(
        [f"key {j} '{t}': p = {p:.2e}" for j, t, p in zip(x, kt.at(x), probs[x])]))
    how = [f"weight {used[j]:.3g} for query {view.query}" if used[j] else
           ("computed exactly by this query" if exact[j] else "not used by this query") for j in uniq]
    upd.traces["sampled"] = dict(
        x=uniq, y=probs[uniq], marker=dict(size=5 + 10 * np.sqrt(counts[uniq] / max(1, counts.max()))),
        hovertext=strs([f"key {j} '{t}'<br>drawn {counts[j]}x, {h}<br>skipped by {e} queries"
                        for j, t, h, e in zip(uniq, kt.at(uniq), how, skipped)]))
    labels = strs([f"{j} {short(kt[j], 10)}" for j in uniq])
    upd.traces["column weight"] = dict(x=labels, y=used[uniq], hovertext=strs(
        [f"key {j}: {counts[j]} draws; {h}" for j, h in zip(uniq, how)]))
    upd.traces["excluded queries"] = dict(x=labels, y=skipped, hovertext=strs(
        [f"key {j}: {e} queries of this group compute it exactly" for j, e in zip(uniq, skipped)]))
    upd.layout["xaxis2.showticklabels"] = upd.layout["xaxis3.showticklabels"] = len(uniq) <= 30


def samples_update(view: View) -> PanelUpdate:
    """The inspected query's sampling group: its probabilities and draws, and the weights that query
    itself gives each drawn key (the trace's weight_rows; 0 where it computes the key exactly)."""
    tr, s = view.trace, view.settings
    g = max(0, int(tr.q_groups[view.query]))  # (a masked query has none: show group 0)
    uniq, counts, draws = group_samples(tr, g)
    weight, exact = query_weights(tr, view.query)
    used = np.where(exact, 0.0, weight)  # (Nk,) the sampled part of the query's estimate
    skipped = skipping_queries(view, g, uniq)
    upd = PanelUpdate()
    samples_traces(view, upd, g, uniq, counts, used, exact, skipped)
    note = " · one block = exact: samples unused" if tr.num_blocks <= 1 else ""
    group = f"group {g} of {tr.num_groups}" if tr.num_groups > 1 else "one group"
    n_used = int((used[uniq] > 0).sum())
    set_title(upd, f"samples · {view.label()} {s.sampling}",
              f"{group}: {len(uniq)} distinct keys drawn, {n_used} of them sampled by query {view.query}. "
              f"{samples_explanation(tr, s, draws)}{note}")
    upd.info = dict(group=g, unique=uniq, counts=counts[uniq], weights=used[uniq], excluded=skipped, draws=draws)
    return upd


# --------------------------------------------------------------------------- error panel
def make_error() -> go.Figure:
    fig = make_subplots(
        rows=2, cols=3, vertical_spacing=0.2, horizontal_spacing=0.09,
        subplot_titles=("approximate matrix", "exact matrix", "|approx − exact|",
                        "per-query error", "log D~ vs log D", "error vs budget"),
    )
    for col, name, cs in ((1, "approx", "Viridis"), (2, "exact", "Viridis"), (3, "error", "Magma")):
        fig.add_trace(go.Heatmap(name=name, colorscale=cs, showscale=(col == 3),
                                 colorbar=dict(len=0.38, y=0.80, x=1.0, thickness=10),
                                 hovertemplate="%{y}<br>%{x}<br>%{z:.3g}<extra></extra>"), 1, col)
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
    fig.update_xaxes(title_text="query (token order)", title_font=AXIS_TITLE, row=2, col=1)
    fig.update_yaxes(title_text="‖õᵢ−oᵢ‖/‖oᵢ‖", title_font=AXIS_TITLE, row=2, col=1)
    fig.update_xaxes(title_text="log D (exact)", title_font=AXIS_TITLE, row=2, col=2)
    fig.update_yaxes(title_text="log D~", title_font=AXIS_TITLE, row=2, col=2)
    fig.update_xaxes(title_text="block + samples", title_font=AXIS_TITLE, type="log", row=2, col=3)
    fig.update_yaxes(title_text="rel. spectral error", title_font=AXIS_TITLE, rangemode="tozero", row=2, col=3)
    base_layout(fig, 660, "error", -0.14)
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


def error_matrix_traces(view: View, upd: PanelUpdate) -> tuple:
    """Approximate, exact and |difference| matrices, pooled the same way."""
    ri, ci, gr, gc = matrix_grids(view, view.error_cells)
    approx = view.approx_rows()
    fns = {"exact": view.exact_rows} if approx is None else {"exact": view.exact_rows, "approx": approx}
    mats = pooled_rows(fns, ri, ci, gr, gc)
    xl, yl = strs(axis_labels(ci, view.k_tokens, gc, "k")), strs(axis_labels(ri, view.q_tokens, gr, "q"))
    log = view.display["log_color"]
    lo, hi = (LOG_FLOOR, 0.0) if log else (0.0, float(np.nanmax(mats["exact"])))
    upd.traces["exact"] = dict(z=packed(color_values(mats["exact"], log)), x=xl, y=yl, zmin=lo, zmax=hi)
    if approx is None:
        upd.traces["approx"] = upd.traces["error"] = dict(z=[[None]], x=["n/a"], y=["n/a"])
    else:
        err = mats["error"]
        upd.traces["approx"] = dict(z=packed(color_values(mats["approx"], log)), x=xl, y=yl, zmin=lo, zmax=hi)
        upd.traces["error"] = dict(z=packed(color_values(err, log)), x=xl, y=yl, zmin=LOG_FLOOR if log else 0.0,
                                   zmax=0.0 if log else float(np.nanmax(err)))
    return mats, gr, gc


def error_curve_traces(curve, upd: PanelUpdate) -> None:
    upd.traces["error curve"] = dict(
        x=list(curve.budgets), y=list(curve.mean), error_y=dict(type="data", array=list(curve.sd), visible=True),
        hovertext=strs([f"budget {b}: {m:.3f} ± {s:.3f}" for b, m, s in zip(curve.budgets, curve.mean, curve.sd)]))
    c = curve.current
    upd.traces["current"] = dict(x=[curve.budgets[c]], y=[curve.mean[c]],
                                 hovertext=strs([f"current: budget {curve.budgets[c]}, error {curve.mean[c]:.3f}"]))


def error_update(view: View) -> PanelUpdate:
    tr, res = view.trace, view.result
    nq = tr.query.shape[-2]
    ex = view.engine.exact(view.settings.layer, view.settings.head)
    upd = PanelUpdate()
    mats, gr, gc = error_matrix_traces(view, upd)
    o, oa = ex.out.double(), res.out.double()
    per_q = to_np((oa - o).norm(dim=-1) / o.norm(dim=-1).clamp_min(1e-12))
    qi = np.arange(nq)[:: max(1, math.ceil(nq / 2048))]
    qt = view.q_tokens
    upd.traces["per-query error"] = dict(x=qi, y=per_q[qi].astype(np.float32), customdata=qi, hovertext=strs(
        [f"query {i} '{t}': {e:.3f}" for i, t, e in zip(qi, qt.at(qi), per_q[qi])]))
    if res.log_d is not None:
        le, la = to_np(ex.log_d).astype(np.float64), to_np(res.log_d).astype(np.float64)
        upd.traces["normaliser"] = dict(x=np.round(le[qi], 4), y=np.round(la[qi], 4), customdata=qi, visible=True,
                                        hovertext=strs([f"query {i} '{t}'<br>log D = {a:.3f}, log D~ = {b:.3f}"
                                                        for i, t, a, b in zip(qi, qt.at(qi), le[qi], la[qi])]))
        lo, hi = float(min(le.min(), la.min())), float(max(le.max(), la.max()))
        upd.traces["y = x"] = dict(x=[lo, hi], y=[lo, hi])
    else:
        upd.traces["normaliser"] = dict(x=[], y=[], visible=False)
        upd.traces["y = x"] = dict(x=[], y=[])
    error_curve_traces(view.curve, upd)
    c = view.curve
    over = " — above 1: worse than outputting zeros" if c.mean[c.current] > 1 else ""
    set_title(upd, f"error · {view.label()} B{view.settings.bucket_size}/s{view.settings.sample_size}",
              f"{c.label}: relative spectral error {c.mean[c.current]:.3f}{over}{pooled_note(gr, gc)}")
    upd.info = dict(per_query=per_q, pooled=mats, grid_rows=gr, grid_cols=gc)
    return upd


# --------------------------------------------------------------------------- row inspector
def make_inspector() -> go.Figure:
    fig = go.Figure()
    fig.add_trace(go.Scatter(name="exact row", mode="lines", line=dict(color="#4c78a8"),
                             hovertemplate="%{hovertext}<extra></extra>"))
    fig.add_trace(go.Scatter(name="approximate row", mode="lines", line=dict(color="#f58518", dash="dot"),
                             hovertemplate="%{hovertext}<extra></extra>"))
    fig.add_trace(go.Scatter(name="computed exactly", mode="markers", marker=dict(color="rgba(228,0,43,0.6)", size=7, symbol="square"),
                             hovertemplate="%{hovertext}<extra></extra>"))
    fig.add_trace(go.Scatter(name="sampled keys", mode="markers", marker=dict(color="#54a24b", symbol="diamond", sizemode="diameter"),
                             hovertemplate="%{hovertext}<extra></extra>"))
    base_layout(fig, 340, "row inspector", -0.3)
    fig.update_layout(xaxis_title="key (token order)", yaxis_title="attention weight")
    return fig


def inspector_update(view: View) -> PanelUpdate:
    tr, q = view.trace, view.query
    nk = tr.key.shape[-2]
    rows = torch.tensor([q])
    ex = to_np(view.exact_rows(rows)[0]).astype(np.float64)
    approx = view.approx_rows()
    ap = to_np(approx(rows)[0]).astype(np.float64) if approx is not None else None
    exact_mask = to_np(tr.exact_mask_rows(rows)[0])
    weight = to_np(tr.weight_rows(rows)[0]).astype(np.float64)
    exact_keys = np.flatnonzero(exact_mask)
    sampled = np.flatnonzero((weight > 0) & ~exact_mask)
    x = np.arange(nk)[:: max(1, math.ceil(nk / 4096))]
    kt, label = view.k_tokens, view.engine.methods.get(view.settings.method, view.settings.method)
    upd = PanelUpdate()
    upd.traces["exact row"] = dict(x=x, y=ex[x], hovertext=strs([f"key {j} '{t}': exact {p:.4f}" for j, t, p in zip(x, kt.at(x), ex[x])]))
    if ap is not None:
        upd.traces["approximate row"] = dict(x=x, y=ap[x], visible=True, hovertext=strs(
            [f"key {j} '{t}': {label} {p:.4f}" for j, t, p in zip(x, kt.at(x), ap[x])]))
    else:
        upd.traces["approximate row"] = dict(x=[], y=[], visible=False)
    upd.traces["computed exactly"] = dict(x=exact_keys, y=ex[exact_keys], hovertext=strs(
        [f"key {j} '{t}' computed exactly: {ex[j]:.4f}" for j, t in zip(exact_keys, kt.at(exact_keys))]))
    upd.traces["sampled keys"] = dict(
        x=sampled, y=ex[sampled], marker=dict(size=6 + 10 * np.sqrt(weight[sampled] / max(1e-12, weight[sampled].max(initial=0.0)))),
        hovertext=strs([f"key {j} '{t}': weight {weight[j]:.3g}" for j, t in zip(sampled, kt.at(sampled))]))
    mass = float(ex[exact_keys].sum())
    set_title(upd, f"row inspector · {view.label()} q{q}",
              f"query {q} '{short(view.q_tokens[q], 24)}': {len(exact_keys)} keys computed exactly "
              f"({mass:.1%} of its mass), {len(sampled)} sampled keys")
    upd.info = dict(exact_keys=exact_keys, block=exact_keys, sampled=sampled, exact=ex, approx=ap, weight=weight)
    return upd


# --------------------------------------------------------------------------- the registry
SAMPLE_DEPENDS = KDE_KEYS  # the trace's sampling depends on every KDEformer setting
PANELS: dict[str, Panel] = {
    "buckets": Panel("buckets", make_buckets, buckets_update, BLOCK_KEYS),
    "heavy": Panel("heavy", make_heavy, heavy_update, KDE_KEYS, ("log_color", "order", "zoom")),
    "samples": Panel("samples", make_samples, samples_update, SAMPLE_DEPENDS, ("query",)),
    "error": Panel("error", make_error, error_update, None, ("log_color", "order", "zoom")),
    "inspector": Panel("inspector", make_inspector, inspector_update, None, ("query",)),
}
