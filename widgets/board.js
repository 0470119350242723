// PlotBoard's page side (see board.py): several plotly figures in one widget model, drawn either by
// plotly.js (renderer "plotly": any figure) or by the canvas drawer below (renderer "canvas": scatter, bar
// and heatmap traces on 2-d subplots, what the explorer's panels use, ~10x faster to redraw).

const CONFIG = {responsive: true, displaylogo: false, modeBarButtonsToRemove: ["lasso2d", "select2d"]};
const FONT = '"Open Sans", verdana, arial, sans-serif';

// ------------------------------------------------------------------------------------------ plotly.js
function loadPlotly(model) {
  if (globalThis.Plotly && globalThis.Plotly.react) return Promise.resolve(globalThis.Plotly);
  if (!globalThis.__kdePlotly) {
    const url = URL.createObjectURL(new Blob([model.get("_plotly_js")], {type: "text/javascript"}));
    globalThis.__kdePlotly = import(url).then(() => { URL.revokeObjectURL(url); return globalThis.Plotly; });
  }
  return globalThis.__kdePlotly;
}

function plotlyDrawer(model, name, div, send) {
  let first = true;
  return {
    async draw(fig, data) {
      const Plotly = await loadPlotly(model);
      // the config goes with the first draw only: given again, react deep-copies and compares it every time
      await (first ? Plotly.newPlot(div, data, fig.layout, CONFIG) : Plotly.react(div, data, fig.layout));
      if (first) div.on("plotly_click", (ev) => send(ev.points.map((p) => ({
        trace: (div.data[p.curveNumber] || {}).name || null, curve: p.curveNumber,
        index: p.pointIndex !== undefined ? p.pointIndex : p.pointNumber,
        x: p.x, y: p.y, customdata: p.customdata === undefined ? null : p.customdata,
      }))));
      first = false;
    },
    resize() { if (!first && globalThis.Plotly) globalThis.Plotly.Plots.resize(div); },
    destroy() { if (globalThis.Plotly) globalThis.Plotly.purge(div); },
  };
}

// ---------------------------------------------------------------------------------- packed arrays
// plotly's typed-array spec: {dtype: "f4" | "f8" | "i1" | ..., bdata: base64, shape: "rows,cols"}
const DTYPES = {f4: Float32Array, f8: Float64Array, i1: Int8Array, i2: Int16Array, i4: Int32Array,
                u1: Uint8Array, u2: Uint16Array, u4: Uint32Array};
const unpacked = new WeakMap();

// base64 -> bytes: the browser's own decoder where it has one (Chrome 140+, Firefox 133+, Safari 18.2+)
function decodeBase64(text) {
  if (typeof Uint8Array.fromBase64 === "function") return Uint8Array.fromBase64(text);
  const bin = atob(text);
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  return bytes;
}

function values(a) {
  if (a === undefined || a === null) return null;
  if (Array.isArray(a) || ArrayBuffer.isView(a)) return a;
  if (typeof a === "object" && a.bdata !== undefined) {
    if (unpacked.has(a)) return unpacked.get(a);
    const bytes = decodeBase64(a.bdata);
    const flat = new DTYPES[a.dtype](bytes.buffer);
    let out = flat;
    if (a.shape) {
      const [rows, cols] = String(a.shape).split(",").map(Number);
      out = {rows, cols, cells: flat};  // not `.flat`: every Array has a .flat method
    }
    unpacked.set(a, out);
    return out;
  }
  return a;
}

// a 2-d array as {rows, cols, cells (flat, row-major), at(i, j)}; `z` may be packed (with a shape) or
// nested lists, which are flattened once (missing cells NaN)
function matrix(z) {
  const v = values(z);
  if (!v) return {rows: 0, cols: 0, cells: new Float64Array(0), at: () => NaN};
  let m = v.cells ? v : unpacked.get(v);
  if (!m) {
    const rows = v.length;
    const cols = rows ? Math.max(...Array.from(v, (r) => (r ? r.length : 0))) : 0;
    const cells = new Float64Array(rows * cols).fill(NaN);
    for (let i = 0; i < rows; i++) {
      const r = v[i];
      for (let j = 0; r && j < r.length; j++) if (r[j] !== null && r[j] !== undefined) cells[i * cols + j] = +r[j];
    }
    m = {rows, cols, cells};
    unpacked.set(v, m);
  }
  return {rows: m.rows, cols: m.cols, cells: m.cells, at: (i, j) => m.cells[i * m.cols + j]};
}

// customdata row i: a number, or a list when customdata is 2-d
function datum(cd, i) {
  if (!cd) return null;
  if (cd.cells) return Array.from(cd.cells.subarray(i * cd.cols, (i + 1) * cd.cols));
  const x = cd[i];
  return x === undefined ? null : x;
}

// ------------------------------------------------------------------------------------------ colours
function parseColor(c) {
  if (!c || typeof c !== "string") return [0, 0, 0, 1];
  if (!parseColor.ctx) parseColor.ctx = document.createElement("canvas").getContext("2d", {willReadFrequently: true});
  parseColor.cache = parseColor.cache || new Map();
  if (parseColor.cache.has(c)) return parseColor.cache.get(c);
  const ctx = parseColor.ctx;
  ctx.clearRect(0, 0, 1, 1);
  ctx.fillStyle = "#000";
  ctx.fillStyle = c;
  ctx.fillRect(0, 0, 1, 1);
  const d = ctx.getImageData(0, 0, 1, 1).data;
  const out = [d[0], d[1], d[2], d[3] / 255];
  parseColor.cache.set(c, out);
  return out;
}

// 256 RGBA entries for a plotly colorscale ([[0, colour], ..., [1, colour]])
function colorTable(scale) {
  const key = JSON.stringify(scale);
  colorTable.cache = colorTable.cache || new Map();
  if (colorTable.cache.has(key)) return colorTable.cache.get(key);
  const stops = (Array.isArray(scale) && scale.length ? scale : [[0, "#440154"], [1, "#fde725"]])
    .map(([t, c]) => [+t, parseColor(c)]);
  const lut = new Uint8ClampedArray(256 * 4);
  for (let i = 0; i < 256; i++) {
    const t = i / 255;
    let k = 0;
    while (k < stops.length - 2 && t > stops[k + 1][0]) k++;
    const [t0, c0] = stops[k], [t1, c1] = stops[Math.min(k + 1, stops.length - 1)];
    const f = t1 > t0 ? Math.min(1, Math.max(0, (t - t0) / (t1 - t0))) : 0;
    for (let ch = 0; ch < 3; ch++) lut[4 * i + ch] = Math.round(c0[ch] + f * (c1[ch] - c0[ch]));
    lut[4 * i + 3] = Math.round(255 * (c0[3] + f * (c1[3] - c0[3])));
  }
  colorTable.cache.set(key, lut);
  return lut;
}

function lutColor(lut, t) {
  const i = 4 * Math.round(255 * Math.min(1, Math.max(0, t)));
  return `rgba(${lut[i]},${lut[i + 1]},${lut[i + 2]},${(lut[i + 3] / 255).toFixed(3)})`;
}

// ------------------------------------------------------------------------------------------- text
// plotly's pseudo-HTML: everything escaped except <br>, <b>, <i>, <sub>, <sup>
function rich(s) {
  const esc = String(s === null || s === undefined ? "" : s)
    .replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");
  return esc.replace(/&lt;(\/?)(br|b|i|sub|sup)\s*\/?&gt;/gi, "<$1$2>");
}

function plainWidth(ctx, s, size) {
  ctx.font = `${size}px ${FONT}`;
  return Math.max(0, ...String(s).split(/<br\s*\/?>/i).map((line) => ctx.measureText(line.replace(/<[^>]*>/g, "")).width));
}

// d3-format's common specs (".3g", ".3f", ".1%", ",", "d") and plotly's default number display
function formatNumber(v, spec) {
  if (typeof v !== "number") return v === null || v === undefined ? "" : String(v);
  if (!Number.isFinite(v)) return String(v);
  const m = /^(,)?(?:\.(\d+))?([efgd%])?$/.exec(spec || "");
  if (!spec || !m) return String(+v.toPrecision(5));
  const p = m[2] === undefined ? 6 : +m[2];
  let out;
  switch (m[3]) {
    case "f": out = v.toFixed(p); break;
    case "e": out = v.toExponential(p); break;
    case "g": out = v.toPrecision(Math.max(1, p)); break;
    case "d": out = String(Math.round(v)); break;
    case "%": out = (100 * v).toFixed(p) + "%"; break;
    default: out = m[2] === undefined ? String(v) : String(+v.toPrecision(Math.max(1, p)));
  }
  if (m[1]) { const [a, b] = out.split("."); out = a.replace(/\B(?=(\d{3})+(?!\d))/g, ",") + (b ? "." + b : ""); }
  return out;
}

function hoverText(trace, pt) {
  const tpl = trace.hovertemplate;
  const field = (name) => {
    if (name === "hovertext" || name === "text") return pt[name];
    const cd = /^customdata(?:\[(\d+)\])?$/.exec(name);
    if (cd) return cd[1] === undefined ? pt.customdata : (pt.customdata || [])[+cd[1]];
    if (name === "fullData.name" || name === "data.name") return trace.name;
    return pt[name];
  };
  if (tpl) {
    return tpl.replace(/<extra>.*?<\/extra>/g, "").replace(/%\{([^}:]+)(?::([^}]*))?\}/g,
      (_, name, spec) => formatNumber(field(name), spec));
  }
  if (pt.hovertext !== undefined && pt.hovertext !== null && pt.hovertext !== "") return pt.hovertext;
  const parts = [pt.x, pt.y].concat(pt.z !== undefined ? [pt.z] : []).map((v) => formatNumber(v));
  return `(${parts.join(", ")})${trace.name ? "<br>" + trace.name : ""}`;
}

// --------------------------------------------------------------------------------------------- axes
// the smallest of 1, 2, 5 x 10^k that gives at most ~1.4x `count` ticks over `span`
function niceStep(span, count) {
  const raw = span / Math.max(1, count);
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  for (const f of [1, 2, 5, 10]) if (f * mag >= 0.7 * raw) return f * mag;
  return 10 * mag;
}

function tickLabel(v, step) {
  if (Math.abs(v) < step * 1e-6) return "0";
  const decimals = Math.max(0, -Math.floor(Math.log10(step) + 1e-9));
  const a = Math.abs(v);
  if (a >= 1e5 || (a > 0 && a < 1e-4)) return v.toExponential(Math.max(0, Math.min(3, decimals))).replace("e+", "e");
  return v.toFixed(Math.min(decimals, 10)).replace("-", "\u2212");
}

function axisTicks(ax) {
  const [lo, hi] = [Math.min(ax.r0, ax.r1), Math.max(ax.r0, ax.r1)];
  const pxPerTick = ax.letter === "x" ? 90 : 45;
  const count = Math.max(2, Math.floor(ax.len / pxPerTick));
  if (ax.type === "category") {
    const n = ax.categories.length;
    const every = Math.max(1, Math.ceil(n / Math.max(1, Math.floor(ax.len / (ax.letter === "x" ? 60 : 18)))));
    const out = [];
    for (let i = 0; i < n; i += every) if (i >= lo && i <= hi) out.push({v: i, text: String(ax.categories[i])});
    return out;
  }
  if (ax.type === "log") {
    const out = [];
    const decades = hi - lo;
    const mult = decades > count ? [1] : decades > count / 2.5 ? [1, 3] : decades > count / 5 ? [1, 2, 5] : [1, 2, 3, 4, 5, 6, 7, 8, 9];
    const every = Math.max(1, Math.ceil(decades / count));
    for (let e = Math.floor(lo); e <= Math.ceil(hi); e++) {
      if (mult.length === 1 && e % every) continue;
      for (const m of mult) {
        const v = Math.log10(m) + e;
        if (v >= lo - 1e-9 && v <= hi + 1e-9) out.push({v, text: logTickLabel(m, e)});
      }
    }
    return out;
  }
  return linearTicks(lo, hi, count);
}

function linearTicks(lo, hi, count) {
  const step = niceStep(hi - lo, count);
  const out = [];
  for (let v = Math.ceil(lo / step - 1e-9) * step; v <= hi + step * 1e-9; v += step) out.push({v, text: tickLabel(v, step)});
  return out;
}

function logTickLabel(m, e) {
  const v = m * Math.pow(10, e);
  if (e >= 6 || e <= -5) return v.toExponential(0).replace("e+", "e");
  return String(+v.toPrecision(3));
}

// an axis's data-to-pixel map: linear in the axis's own units (log10 for log axes, index for categories)
function makeMap(ax) {
  const a = ax.reversed ? ax.r1 : ax.r0, b = ax.reversed ? ax.r0 : ax.r1;
  const span = b - a || 1;
  if (ax.letter === "x") return (u) => ax.start + ((u - a) / span) * ax.len;
  return (u) => ax.start + ax.len - ((u - a) / span) * ax.len;
}

// pixel -> the axis's own units (the inverse of makeMap)
function unmap(ax, px) {
  const a = ax.reversed ? ax.r1 : ax.r0, b = ax.reversed ? ax.r0 : ax.r1;
  const f = ax.letter === "x" ? (px - ax.start) / ax.len : (ax.start + ax.len - px) / ax.len;
  return a + f * (b - a);
}

// the outer edges of a row (or column) of n heatmap cells centred on `labels`, in the axis's units
function cellEdges(ax, labels, n) {
  const a = toUnits(ax, labels[0]), b = toUnits(ax, labels[n - 1]);
  const h = ax.type === "category" || n < 2 ? 0.5 : (b - a) / (n - 1) / 2;
  return [a - h, b + h];
}

// a value as the axis's own units
function toUnits(ax, v) {
  if (v === null || v === undefined) return NaN;
  if (ax.type === "category") {
    if (typeof v === "number" && !ax.index.has(v)) return v;  // a position (shapes, error bars)
    const i = ax.index.get(v);
    return i === undefined ? NaN : i;
  }
  if (typeof v === "string") v = Number(v);
  if (ax.type === "log") return v > 0 ? Math.log10(v) : NaN;
  return v;
}

function axisSpecs(layout, data) {
  const axes = {};
  const ensure = (id) => {
    if (axes[id]) return axes[id];
    const letter = id[0];
    const spec = layout[letter + "axis" + id.slice(1)] || {};
    axes[id] = {id, letter, spec, domain: spec.domain || [0, 1], type: spec.type || null, categories: [], index: new Map(),
                lo: Infinity, hi: -Infinity, anchor: spec.anchor || (letter === "x" ? "y" : "x"),
                reversed: spec.autorange === "reversed", used: false};
    return axes[id];
  };
  for (const key of Object.keys(layout)) {
    const m = /^([xy])axis(\d*)$/.exec(key);
    if (m) ensure(m[1] + m[2]);
  }
  for (const t of data) { ensure(t.xaxis || "x").used = true; ensure(t.yaxis || "y").used = true; }
  return axes;
}

function addCategory(ax, v) {
  if (!ax.index.has(v)) { ax.index.set(v, ax.categories.length); ax.categories.push(v); }
}

// plotly's type guess: strings that are not numbers make a category axis
function guessType(ax, traces) {
  if (ax.type) return;
  for (const t of traces) {
    const v = values(ax.letter === "x" ? t.x : t.y);
    if (v && Array.isArray(v) && v.some((x) => typeof x === "string" && x.trim() !== "" && isNaN(Number(x)))) { ax.type = "category"; return; }
  }
  ax.type = "linear";
}

// ------------------------------------------------------------------------------------------ traces
function prepare(t) {
  const p = {t, type: t.type || "scatter", name: t.name || "", x: values(t.x), y: values(t.y),
             hovertext: t.hovertext !== undefined ? values(t.hovertext) : values(t.text), customdata: values(t.customdata)};
  if (p.type === "heatmap") {
    p.z = matrix(t.z);
    p.x = p.x || Array.from({length: p.z.cols}, (_, j) => j);
    p.y = p.y || Array.from({length: p.z.rows}, (_, i) => i);
  } else {
    const n = Math.max(p.x ? p.x.length : 0, p.y ? p.y.length : 0);
    if (!p.x && p.y) p.x = Array.from({length: n}, (_, i) => i);
    if (!p.y && p.x) p.y = Array.from({length: n}, (_, i) => i);
    p.n = p.x ? Math.min(p.x.length, p.y.length) : 0;
  }
  const m = t.marker || {};
  p.markerSize = values(m.size);
  p.markerColor = values(m.color);
  p.errorY = t.error_y && t.error_y.visible !== false ? values(t.error_y.array) : null;
  return p;
}

function colorOf(t, i, layout) {
  const way = (layout.template && layout.template.layout && layout.template.layout.colorway) ||
    ["#636efa", "#EF553B", "#00cc96", "#ab63fa", "#FFA15A", "#19d3f3", "#FF6692", "#B6E880", "#FF97FF", "#FECB52"];
  return way[i % way.length];
}

function markerSymbol(ctx, symbol, x, y, r) {
  switch (String(symbol || "circle").replace(/-open$/, "")) {
    case "square": ctx.rect(x - r, y - r, 2 * r, 2 * r); break;
    case "diamond": ctx.moveTo(x, y - 1.3 * r); ctx.lineTo(x + 1.3 * r, y); ctx.lineTo(x, y + 1.3 * r); ctx.lineTo(x - 1.3 * r, y); ctx.closePath(); break;
    case "x": {
      const a = 0.8 * r, w = 0.35 * r;
      ctx.moveTo(x - a, y - a + w); ctx.lineTo(x - w, y); ctx.lineTo(x - a, y + a - w); ctx.lineTo(x - a + w, y + a);
      ctx.lineTo(x, y + w); ctx.lineTo(x + a - w, y + a); ctx.lineTo(x + a, y + a - w); ctx.lineTo(x + w, y);
      ctx.lineTo(x + a, y - a + w); ctx.lineTo(x + a - w, y - a); ctx.lineTo(x, y - w); ctx.lineTo(x - a + w, y - a); ctx.closePath();
      break;
    }
    case "star": {
      for (let k = 0; k < 10; k++) {
        const ang = -Math.PI / 2 + (k * Math.PI) / 5, rr = k % 2 ? 0.55 * r : 1.4 * r;
        k ? ctx.lineTo(x + rr * Math.cos(ang), y + rr * Math.sin(ang)) : ctx.moveTo(x + rr * Math.cos(ang), y + rr * Math.sin(ang));
      }
      ctx.closePath();
      break;
    }
    default: ctx.moveTo(x + r, y); ctx.arc(x, y, r, 0, 2 * Math.PI);
  }
}

function dashOf(dash, width) {
  const w = Math.max(width, 3);
  return dash === "dot" ? [w, w] : dash === "dash" ? [3 * w, 3 * w] : dash === "longdash" ? [5 * w, 5 * w]
    : dash === "dashdot" ? [3 * w, w, w, w] : [];
}

// --------------------------------------------------------------------------------------- the drawer
function canvasDrawer(model, name, div, send) {
  div.classList.add("kde-canvas-plot");
  const canvas = document.createElement("canvas");
  const overlay = document.createElement("div");
  overlay.className = "kde-overlay";
  const legend = document.createElement("div");
  legend.className = "kde-legend";
  const tip = document.createElement("div");
  tip.className = "kde-tip";
  div.append(canvas, overlay, tip, legend);
  // a software canvas: not a composited layer (Chromium paints it with the page, also beyond the viewport)
  const ctx = canvas.getContext("2d", {willReadFrequently: true});
  const hidden = new Set();  // trace names switched off in the legend (page-only, as plotly's legend)
  const zoomed = {};  // axis id -> [r0, r1] chosen by a drag (page-only; double-click or "reset zoom" clears)
  const zoombox = document.createElement("div");
  zoombox.className = "kde-zoombox";
  const reset = document.createElement("button");
  reset.className = "kde-reset-zoom";
  reset.textContent = "reset zoom";
  reset.title = "back to the whole range (or double-click the plot)";
  div.append(zoombox, reset);
  let last = null;  // {fig, data, scene}
  let shownTexts = null, shownLegend = null;  // the overlay's and the legend's HTML as last written
  let hoverFrame = null;

  function layoutScene(fig, data) {
    const layout = fig.layout || {};
    const W = Math.max(200, div.clientWidth || 700);
    const H = layout.height || 450;
    const margin = Object.assign({l: 80, r: 80, t: 100, b: 80}, layout.margin || {});
    const font = (layout.font && layout.font.size) || 12;
    const tpl = (layout.template && layout.template.layout) || {};
    const traces = data.map((t, i) => ({...prepare(t), i, xid: t.xaxis || "x", yid: t.yaxis || "y", color: colorOf(t, i, layout)}))
      .filter((p) => p.t.visible !== false);
    const axes = axisSpecs(layout, data);
    for (const ax of Object.values(axes)) {
      guessType(ax, traces.filter((p) => (ax.letter === "x" ? p.xid : p.yid) === ax.id).map((p) => p.t));
    }
    // categories and data extents, in each axis's units
    const shown = traces.filter((p) => p.t.visible !== "legendonly" && !hidden.has(p.name));
    for (const p of shown) {
      const xa = axes[p.xid], ya = axes[p.yid];
      if (p.type === "heatmap") {
        for (const [ax, labels, n] of [[xa, p.x, p.z.cols], [ya, p.y, p.z.rows]]) {
          if (ax.type === "category") for (let k = 0; k < n; k++) addCategory(ax, labels[k]);
        }
        continue;
      }
      for (const [ax, vals] of [[xa, p.x], [ya, p.y]]) if (ax.type === "category") for (let k = 0; k < p.n; k++) addCategory(ax, vals[k]);
    }
    const grow = (ax, u) => { if (Number.isFinite(u)) { ax.lo = Math.min(ax.lo, u); ax.hi = Math.max(ax.hi, u); } };
    const stacks = {};
    for (const p of shown) {
      const xa = axes[p.xid], ya = axes[p.yid];
      if (p.type === "heatmap") {
        p.zr = zRange(p);  // once: the colour bar and the image read it
        if (p.z.rows && p.z.cols) {
          for (const u of cellEdges(xa, p.x, p.z.cols)) grow(xa, u);
          for (const u of cellEdges(ya, p.y, p.z.rows)) grow(ya, u);
        }
        continue;
      }
      if (p.type === "bar") {
        xa.hasBars = true; ya.barValues = true;
        p.base = new Float64Array(p.n);
        p.top = new Float64Array(p.n);
        for (let k = 0; k < p.n; k++) {  // stacked bars start where the bar below ends
          const u = toUnits(xa, p.x[k]);
          grow(xa, u - 0.5); grow(xa, u + 0.5);
          const key = ya.id + ":" + u;
          p.base[k] = layout.barmode === "stack" ? (stacks[key] || 0) : 0;
          p.top[k] = p.base[k] + (+p.y[k] || 0);
          if (layout.barmode === "stack") stacks[key] = p.top[k];
          grow(ya, 0); grow(ya, toUnits(ya, p.top[k]));
        }
        continue;
      }
      const markers = String(p.t.mode || (p.n < 20 ? "lines+markers" : "lines")).includes("markers");
      if (markers) xa.padded = true;  // lines run edge to edge in x; y is always padded
      ya.padded = true;
      for (let k = 0; k < p.n; k++) {
        grow(xa, toUnits(xa, p.x[k]));
        const e = p.errorY ? +p.errorY[k] || 0 : 0;
        grow(ya, toUnits(ya, +p.y[k] - e)); grow(ya, toUnits(ya, +p.y[k] + e));
      }
    }
    for (const ax of Object.values(axes)) {
      const spec = ax.spec;
      if (Array.isArray(spec.range) && spec.range.length === 2 && spec.range[0] !== null && spec.range[1] !== null && spec.autorange !== true) {
        ax.r0 = +spec.range[0]; ax.r1 = +spec.range[1];
        if (ax.r0 > ax.r1) { [ax.r0, ax.r1] = [ax.r1, ax.r0]; ax.reversed = !ax.reversed; }
        continue;
      }
      let lo = ax.lo, hi = ax.hi;
      if (!Number.isFinite(lo)) { lo = ax.type === "log" ? 0 : -1; hi = 1; }
      if (spec.rangemode === "tozero" && ax.type !== "log") { lo = Math.min(lo, 0); hi = Math.max(hi, 0); }
      if (hi - lo < 1e-12) { const d = Math.abs(lo) > 0 ? Math.abs(lo) * 0.1 : 1; lo -= d; hi += d; }
      else if (ax.type !== "category" && !ax.hasBars && ax.padded) {
        const pad = 0.05 * (hi - lo);
        if (!(spec.rangemode === "tozero" && lo === 0)) lo -= pad;
        hi += pad;
      } else if (ax.barValues && ax.type !== "category") hi += 0.05 * (hi - lo);
      ax.r0 = lo; ax.r1 = hi;
    }
    for (const ax of Object.values(axes)) if (zoomed[ax.id]) [ax.r0, ax.r1] = zoomed[ax.id];  // the user's drag-zoom
    // margins grow to hold colour bars, right-side axes and tick labels, as plotly's automargin does
    const heatmaps = shown.filter((p) => p.type === "heatmap" && p.t.showscale !== false);
    const grown = {r: margin.r, l: margin.l};
    const plotW0 = W - margin.l - margin.r;
    const bars = heatmaps.map((p) => {
      const cb = p.t.colorbar || {};
      const zr = p.zr;
      const thick = cb.thickness || 30;
      const ticks = linearTicks(zr[0], zr[1], 5);
      const labelW = Math.max(0, ...ticks.map((tk) => plainWidth(ctx, tk.text, font - 1)));
      const titleW = cb.title && cb.title.text ? plainWidth(ctx, cb.title.text, font - 1) : 0;
      return {p, cb, zr, thick, ticks, labelW, titleW};
    });
    for (const b of bars) {
      const x = margin.l + (b.cb.x === undefined ? 1.02 : b.cb.x) * plotW0;
      const extent = (b.cb.xanchor === "right" ? 0 : b.cb.xanchor === "center" ? b.thick / 2 : b.thick) + 4 + Math.max(b.labelW, b.titleW / 2) + 4;
      if (x + extent > W - 2) grown.r = Math.max(grown.r, margin.r + (x + extent - (W - 2)));
    }
    for (const ax of Object.values(axes)) {
      if (ax.letter !== "y" || ax.spec.showticklabels === false || ax.spec.visible === false || !ax.used) continue;
      const labelW = Math.max(0, ...axisTicks({...ax, len: (H - margin.t - margin.b) * (ax.domain[1] - ax.domain[0])}).map((tk) => plainWidth(ctx, tk.text, font)));
      const titleH = ax.spec.title && ax.spec.title.text ? ((ax.spec.title.font && ax.spec.title.font.size) || font) + 8 : 0;
      const need = labelW + 6 + titleH + 4;
      const side = ax.spec.side === "right" ? "r" : "l";
      const edge = side === "r" ? 1 - anchorDomain(axes, ax)[1] : anchorDomain(axes, ax)[0];
      if (edge < 0.02) grown[side] = Math.max(grown[side], need);
    }
    const L = grown.l, R = grown.r, T = margin.t, B = margin.b;
    const plotW = Math.max(40, W - L - R), plotH = Math.max(40, H - T - B);
    for (const ax of Object.values(axes)) {
      if (ax.letter === "x") { ax.start = L + ax.domain[0] * plotW; ax.len = (ax.domain[1] - ax.domain[0]) * plotW; }
      else { ax.start = T + (1 - ax.domain[1]) * plotH; ax.len = (ax.domain[1] - ax.domain[0]) * plotH; }
      ax.map = makeMap(ax);
      ax.ticks = ax.spec.showticklabels === false && ax.spec.showgrid === false ? [] : axisTicks(ax);
    }
    const subplots = [];
    const seen = new Set();
    for (const p of traces) {
      const key = p.xid + p.yid;
      if (seen.has(key)) continue;
      seen.add(key);
      subplots.push({x: axes[p.xid], y: axes[p.yid]});
    }
    for (const ax of Object.values(axes)) {  // axes with no trace still get their frame
      if (ax.letter === "x" && !subplots.some((s) => s.x === ax) && axes[ax.anchor]) subplots.push({x: ax, y: axes[ax.anchor]});
    }
    for (const b of bars) {
      const len = (b.cb.len === undefined ? 1 : b.cb.len) * plotH;
      const cy = T + (1 - (b.cb.y === undefined ? 0.5 : b.cb.y)) * plotH;
      const x0 = L + (b.cb.x === undefined ? 1.02 : b.cb.x) * plotW - (b.cb.xanchor === "center" ? b.thick / 2 : b.cb.xanchor === "right" ? b.thick : 0);
      Object.assign(b, {x0, y0: cy - len / 2, len});
    }
    return {W, H, L, R, T, B, plotW, plotH, font, tpl, layout, traces, shown, axes, subplots, bars};
  }

  function anchorDomain(axes, ax) {
    const other = axes[ax.anchor];
    return other ? other.domain : [0, 1];
  }

  function zRange(p) {
    let lo = p.t.zmin, hi = p.t.zmax;
    if (lo === undefined || hi === undefined || lo === null || hi === null) {
      let a = Infinity, b = -Infinity;
      const c = p.z.cells;
      for (let o = 0; o < c.length; o++) { const v = c[o]; if (v < a) a = v; if (v > b) b = v; }
      if (lo === undefined || lo === null) lo = Number.isFinite(a) ? a : 0;
      if (hi === undefined || hi === null) hi = Number.isFinite(b) ? b : 1;
    }
    return [lo, hi === lo ? lo + 1 : hi];
  }


  // one heatmap as an image of its cells (one pixel per cell), kept while its values and scale stay
  const images = new WeakMap();
  function heatmapImage(p) {
    const scale = p.t.colorscale;
    const zr = p.zr;
    const key = JSON.stringify([scale, zr, p.t.reversescale || false]);
    const src = p.z.cells;  // the same object while the values stay (packed or flattened once)
    const cached = images.get(src);
    if (cached && cached.key === key) return cached.img;
    const lut = colorTable(scale);
    const img = document.createElement("canvas");
    img.width = Math.max(1, p.z.cols); img.height = Math.max(1, p.z.rows);
    const g = img.getContext("2d");
    const pixels = g.createImageData(img.width, img.height);
    // one 32-bit RGBA word per cell, copied from the colour table's own words (byte order kept);
    // cells that are not finite stay transparent (ImageData starts at 0)
    const out = new Uint32Array(pixels.data.buffer), words = new Uint32Array(lut.buffer);
    const lo = zr[0], span = zr[1] - zr[0], rev = !!p.t.reversescale;
    for (let o = 0; o < src.length; o++) {
      const v = src[o];
      if (!Number.isFinite(v)) continue;
      let t = (v - lo) / span;
      if (rev) t = 1 - t;
      out[o] = words[Math.round(255 * Math.min(1, Math.max(0, t)))];
    }
    g.putImageData(pixels, 0, 0);
    images.set(src, {key, img});
    return img;
  }

  // pixel box of a heatmap: [x0, x1] and [y0, y1] of its first and last cells' outer edges
  function heatmapBox(p, xa, ya) {
    return {xs: cellEdges(xa, p.x, p.z.cols).map(xa.map), ys: cellEdges(ya, p.y, p.z.rows).map(ya.map)};
  }

  function draw(scene) {
    const {W, H, tpl, layout, shown, axes, subplots} = scene;
    const dpr = window.devicePixelRatio || 1;
    if (canvas.width !== Math.round(W * dpr) || canvas.height !== Math.round(H * dpr)) {
      canvas.width = Math.round(W * dpr); canvas.height = Math.round(H * dpr);
    }
    canvas.style.width = W + "px"; canvas.style.height = H + "px";
    div.style.height = "auto";
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, W, H);
    ctx.fillStyle = layout.paper_bgcolor || tpl.paper_bgcolor || "white";
    ctx.fillRect(0, 0, W, H);
    const gridColor = (tpl.xaxis && tpl.xaxis.gridcolor) || "#eee";
    let marks = 0;
    // subplot backgrounds and grids
    for (const s of subplots) {
      if (s.x.spec.visible === false && s.y.spec.visible === false) continue;
      ctx.fillStyle = layout.plot_bgcolor || tpl.plot_bgcolor || "white";  // plotly's own defaults without a template
      ctx.fillRect(s.x.start, s.y.start, s.x.len, s.y.len);
      ctx.strokeStyle = gridColor; ctx.lineWidth = 1;
      ctx.beginPath();
      for (const ax of [s.x, s.y]) {
        if (ax.spec.showgrid === false || ax.type === "category" || ax.spec.visible === false) continue;
        for (const tk of ax.ticks) {
          const v = Math.round(ax.map(tk.v)) + 0.5;
          if (ax.letter === "x") { ctx.moveTo(v, s.y.start); ctx.lineTo(v, s.y.start + s.y.len); }
          else { ctx.moveTo(s.x.start, v); ctx.lineTo(s.x.start + s.x.len, v); }
        }
      }
      ctx.stroke();
    }
    const clipTo = (xa, ya) => { ctx.save(); ctx.beginPath(); ctx.rect(xa.start, ya.start, xa.len, ya.len); ctx.clip(); };
    // traces, in order
    const barTraces = {};
    for (const p of shown) if (p.type === "bar") (barTraces[p.xid + p.yid] ||= []).push(p);
    for (const p of shown) {
      const xa = axes[p.xid], ya = axes[p.yid];
      clipTo(xa, ya);
      if (p.type === "heatmap" && p.z.rows && p.z.cols) {
        const {xs, ys} = heatmapBox(p, xa, ya);
        ctx.imageSmoothingEnabled = !!p.t.zsmooth;
        ctx.translate(xs[0], ys[0]);
        ctx.scale((xs[1] - xs[0]) / p.z.cols, (ys[1] - ys[0]) / p.z.rows);
        ctx.drawImage(heatmapImage(p), 0, 0);
        marks += p.z.rows * p.z.cols;
      } else if (p.type === "bar") {
        const group = barTraces[p.xid + p.yid];
        const stack = layout.barmode === "stack" || layout.barmode === "relative" || layout.barmode === "overlay";
        const gap = layout.bargap === undefined ? 0.2 : layout.bargap;
        const slots = stack ? 1 : group.length, slot = stack ? 0 : group.indexOf(p);
        const unit = Math.abs(xa.map(1) - xa.map(0));
        const width = (unit * (1 - gap)) / slots;
        const mc = (p.t.marker && p.t.marker.color) || p.color;
        for (let k = 0; k < p.n; k++) {
          const x0 = xa.map(toUnits(xa, p.x[k])) - (unit * (1 - gap)) / 2 + slot * width;
          const y0 = ya.map(toUnits(ya, p.base[k])), y1 = ya.map(toUnits(ya, p.top[k]));
          ctx.fillStyle = Array.isArray(mc) ? mc[k] : mc;
          ctx.fillRect(x0, Math.min(y0, y1), Math.max(width, 0.5), Math.abs(y1 - y0));
          marks++;
        }
      } else if (p.type === "scatter") {
        marks += drawScatter(p, xa, ya);
      }
      ctx.restore();
    }
    // shapes (rectangles and lines in data or paper coordinates)
    for (const sh of layout.shapes || []) {
      if (sh.visible === false) continue;
      const xa = axes[sh.xref || "x"], ya = axes[sh.yref || "y"];
      const px = (v, ax, letter) => (ax ? ax.map(toUnits(ax, v)) : letter === "x" ? scene.L + v * scene.plotW : scene.T + (1 - v) * scene.plotH);
      const x0 = px(sh.x0, xa, "x"), x1 = px(sh.x1, xa, "x"), y0 = px(sh.y0, ya, "y"), y1 = px(sh.y1, ya, "y");
      ctx.save();
      if (xa && ya) { ctx.beginPath(); ctx.rect(xa.start, ya.start, xa.len, ya.len); ctx.clip(); }
      const line = sh.line || {};
      ctx.strokeStyle = line.color || "#444"; ctx.lineWidth = line.width === undefined ? 2 : line.width;
      ctx.setLineDash(dashOf(line.dash, ctx.lineWidth));
      ctx.beginPath();
      if (sh.type === "line") { ctx.moveTo(x0, y0); ctx.lineTo(x1, y1); }
      else ctx.rect(Math.min(x0, x1), Math.min(y0, y1), Math.abs(x1 - x0), Math.abs(y1 - y0));
      if (sh.type !== "line" && sh.fillcolor) { ctx.fillStyle = sh.fillcolor; ctx.fill(); }
      if (ctx.lineWidth > 0) ctx.stroke();
      ctx.restore();
    }
    // colour bars
    for (const b of scene.bars) {
      const lut = colorTable(b.p.t.colorscale);
      for (let i = 0; i < Math.ceil(b.len); i++) {
        ctx.fillStyle = lutColor(lut, b.p.t.reversescale ? i / b.len : 1 - i / b.len);
        ctx.fillRect(b.x0, b.y0 + i, b.thick, 1.5);
      }
    }
    div.dataset.marks = String(marks);
    const html = texts(scene);
    if (html !== shownTexts) { overlay.innerHTML = html; shownTexts = html; }  // the same texts keep their nodes
    overlay.style.width = W + "px"; overlay.style.height = H + "px";
    drawLegend(scene);
  }

  function drawScatter(p, xa, ya) {
    const mode = String(p.t.mode || (p.n < 20 ? "lines+markers" : "lines"));
    const xs = new Float64Array(p.n), ys = new Float64Array(p.n);
    for (let k = 0; k < p.n; k++) { xs[k] = xa.map(toUnits(xa, p.x[k])); ys[k] = ya.map(toUnits(ya, p.y[k])); }
    p.px = xs; p.py = ys;
    const line = p.t.line || {};
    const lineColor = line.color || p.color;
    if (p.errorY) {
      ctx.strokeStyle = (p.t.error_y && p.t.error_y.color) || lineColor; ctx.lineWidth = 1.5; ctx.setLineDash([]);
      ctx.beginPath();
      for (let k = 0; k < p.n; k++) {
        const e = +p.errorY[k] || 0;
        if (!e) continue;
        const a = ya.map(toUnits(ya, +p.y[k] - e)), b = ya.map(toUnits(ya, +p.y[k] + e));
        ctx.moveTo(xs[k], a); ctx.lineTo(xs[k], b); ctx.moveTo(xs[k] - 4, a); ctx.lineTo(xs[k] + 4, a); ctx.moveTo(xs[k] - 4, b); ctx.lineTo(xs[k] + 4, b);
      }
      ctx.stroke();
    }
    if (mode.includes("lines") && (line.width === undefined || line.width > 0)) {
      ctx.strokeStyle = lineColor; ctx.lineWidth = line.width === undefined ? 2 : line.width;
      ctx.setLineDash(dashOf(line.dash, ctx.lineWidth));
      ctx.lineJoin = "round";
      ctx.beginPath();
      let open = false;
      for (let k = 0; k < p.n; k++) {
        if (!Number.isFinite(xs[k]) || !Number.isFinite(ys[k])) { open = false; continue; }
        if (!open) { ctx.moveTo(xs[k], ys[k]); open = true; continue; }
        if (line.shape === "hv") ctx.lineTo(xs[k], ys[k - 1]);
        else if (line.shape === "vh") ctx.lineTo(xs[k - 1], ys[k]);
        ctx.lineTo(xs[k], ys[k]);
      }
      ctx.stroke();
      ctx.setLineDash([]);
    }
    if (mode.includes("markers")) {
      const m = p.t.marker || {};
      const size = p.markerSize, color = p.markerColor;
      const numeric = color && typeof color !== "string" && color.length !== undefined && typeof color[0] === "number";
      const lut = numeric ? colorTable(m.colorscale) : null;
      let cmin = m.cmin, cmax = m.cmax;
      if (numeric && (cmin === undefined || cmax === undefined)) {
        let a = Infinity, b = -Infinity;
        for (let k = 0; k < color.length; k++) { a = Math.min(a, color[k]); b = Math.max(b, color[k]); }
        if (cmin === undefined) cmin = a;
        if (cmax === undefined) cmax = b;
      }
      const mline = m.line || {};
      const outline = mline.width === undefined ? 0 : mline.width;
      ctx.globalAlpha = m.opacity === undefined ? 1 : m.opacity;
      const fixed = !color || typeof color === "string" ? color || lineColor : null;
      const fixedSize = size === null || typeof size === "number";
      const r0 = (fixedSize ? (size === null ? 6 : size) : 6) / 2;
      if (fixed && fixedSize) {
        ctx.fillStyle = fixed;
        ctx.beginPath();
        for (let k = 0; k < p.n; k++) if (Number.isFinite(xs[k]) && Number.isFinite(ys[k])) markerSymbol(ctx, m.symbol, xs[k], ys[k], r0);
        ctx.fill();
      } else {
        for (let k = 0; k < p.n; k++) {
          if (!Number.isFinite(xs[k]) || !Number.isFinite(ys[k])) continue;
          ctx.fillStyle = fixed || (numeric ? lutColor(lut, (color[k] - cmin) / ((cmax - cmin) || 1)) : color[k]);
          ctx.beginPath();
          markerSymbol(ctx, m.symbol, xs[k], ys[k], fixedSize ? r0 : (+size[k] || 0) / 2);
          ctx.fill();
        }
      }
      if (outline > 0) {
        ctx.strokeStyle = mline.color || "#444"; ctx.lineWidth = outline;
        ctx.beginPath();
        for (let k = 0; k < p.n; k++) if (Number.isFinite(xs[k])) markerSymbol(ctx, m.symbol, xs[k], ys[k], fixedSize ? r0 : (+size[k] || 0) / 2);
        ctx.stroke();
      }
      ctx.globalAlpha = 1;
    }
    return p.n;
  }

  // every text of the figure as positioned HTML (so it wraps, selects and measures like page text)
  function texts(scene) {
    const {W, layout, axes, font, subplots} = scene;
    const out = [];
    const put = (cls, text, x, y, ax, ay, size, extra = "") => {
      if (text === null || text === undefined || text === "") return;
      out.push(`<div class="${cls}" style="left:${x.toFixed(1)}px;top:${y.toFixed(1)}px;font-size:${size}px;` +
               `transform:translate(${-100 * ax}%,${-100 * ay}%)${extra}">${rich(text)}</div>`);
    };
    const title = layout.title && (typeof layout.title === "string" ? {text: layout.title} : layout.title);
    if (title && title.text) {
      const tx = title.x === undefined ? 0.5 : title.x, ty = title.y === undefined ? 0.98 : title.y;
      const xa = title.xanchor === "left" ? 0 : title.xanchor === "right" ? 1 : 0.5;
      put("kde-title", title.text, tx * W, (1 - ty) * scene.H, xa, title.yanchor === "bottom" ? 1 : title.yanchor === "middle" ? 0.5 : 0,
          (title.font && title.font.size) || font + 5);
    }
    for (const a of layout.annotations || []) {
      if (a.visible === false) continue;
      const x = a.xref && a.xref !== "paper" && axes[a.xref] ? axes[a.xref].map(toUnits(axes[a.xref], a.x)) : scene.L + a.x * scene.plotW;
      const y = a.yref && a.yref !== "paper" && axes[a.yref] ? axes[a.yref].map(toUnits(axes[a.yref], a.y)) : scene.T + (1 - a.y) * scene.plotH;
      const ax = a.xanchor === "left" ? 0 : a.xanchor === "right" ? 1 : 0.5;
      const ay = a.yanchor === "bottom" ? 1 : a.yanchor === "top" ? 0 : 0.5;
      const rot = a.textangle ? ` rotate(${a.textangle}deg)` : "";
      put("kde-annotation", a.text, x, y - (a.yanchor === "bottom" ? 3 : 0), ax, ay, (a.font && a.font.size) || font, rot);
    }
    const labelled = new Set();
    for (const s of subplots) {
      for (const ax of [s.x, s.y]) {
        if (labelled.has(ax) || ax.spec.visible === false) continue;
        labelled.add(ax);
        const other = ax === s.x ? s.y : s.x;
        const labels = ax.spec.showticklabels !== false;
        const tsize = (ax.spec.tickfont && ax.spec.tickfont.size) || font;
        const ttl = ax.spec.title && (typeof ax.spec.title === "string" ? {text: ax.spec.title} : ax.spec.title);
        const tfont = (ttl && ttl.font && ttl.font.size) || font;
        if (ax.letter === "x") {
          const y = other.start + other.len;
          // labels start below half a line, where a right or left axis's lowest label ends
          const drop = Math.ceil(0.6 * tsize);
          if (labels) for (const tk of ax.ticks) put("kde-tick", tk.text, ax.map(tk.v), y + drop, 0.5, 0, tsize);
          if (ttl && ttl.text) put("kde-axis-title", ttl.text, ax.start + ax.len / 2, y + (labels ? drop + 1.15 * tsize + 3 : 4), 0.5, 0, tfont);
        } else {
          const rightSide = ax.spec.side === "right";
          const x = rightSide ? other.start + other.len : other.start;
          let width = 0;
          if (labels) {
            for (const tk of ax.ticks) put("kde-tick", tk.text, x + (rightSide ? 4 : -4), ax.map(tk.v), rightSide ? 0 : 1, 0.5, tsize);
            width = Math.max(0, ...ax.ticks.map((tk) => plainWidth(ctx, tk.text, tsize)));
          }
          if (ttl && ttl.text) {
            const off = width + 8 + tfont / 2 + 2;
            put("kde-axis-title", ttl.text, x + (rightSide ? off : -off), ax.start + ax.len / 2, 0.5, 0.5, tfont,
                ` rotate(${rightSide ? 90 : -90}deg)`);
          }
        }
      }
    }
    for (const b of scene.bars) {
      const [lo, hi] = b.zr;
      for (const tk of b.ticks) {
        const y = b.y0 + (1 - (tk.v - lo) / (hi - lo)) * b.len;
        put("kde-tick", tk.text, b.x0 + b.thick + 4, y, 0, 0.5, font - 1);
      }
      const t = b.cb.title && (typeof b.cb.title === "string" ? {text: b.cb.title} : b.cb.title);
      if (t && t.text) put("kde-colorbar-title", t.text, b.x0, b.y0 - font / 2 - 4, 0, 1, font - 1);  // above the top tick's label
    }
    // the heatmaps' areas, as boxes the page (and tests) can find: no pointer events, no paint
    for (const p of scene.shown) {
      if (p.type !== "heatmap" || !p.z.rows) continue;
      const {xs, ys} = heatmapBox(p, axes[p.xid], axes[p.yid]);
      const xa = axes[p.xid], ya = axes[p.yid];
      const x0 = Math.max(xa.start, Math.min(...xs)), x1 = Math.min(xa.start + xa.len, Math.max(...xs));
      const y0 = Math.max(ya.start, Math.min(...ys)), y1 = Math.min(ya.start + ya.len, Math.max(...ys));
      out.push(`<div class="kde-heatmap" data-trace="${rich(p.name)}" style="left:${x0}px;top:${y0}px;width:${x1 - x0}px;height:${y1 - y0}px"></div>`);
    }
    return out.join("");
  }

  function drawLegend(scene) {
    const {layout, traces} = scene;
    const items = traces.filter((p) => p.type !== "heatmap" && p.t.showlegend !== false && p.name);
    const show = layout.showlegend === true || (layout.showlegend !== false && items.length > 1);
    if (!show) { if (shownLegend !== "") legend.innerHTML = shownLegend = ""; return; }
    const size = (layout.legend && layout.legend.font && layout.legend.font.size) || scene.font;
    legend.style.fontSize = size + "px";
    const html = items.map((p) => {
      const off = hidden.has(p.name) || p.t.visible === "legendonly";
      const mode = String(p.t.mode || "lines");
      const line = p.t.line || {};
      const m = p.t.marker || {};
      const mc = typeof m.color === "string" ? m.color : line.color || p.color;
      const dash = line.dash === "dot" ? "dotted" : line.dash === "dash" ? "dashed" : "solid";
      const swatch = p.type === "bar" ? `<span class="kde-swatch-bar" style="background:${mc}"></span>`
        : mode.includes("lines") && (line.width === undefined || line.width > 0)
          ? `<span class="kde-swatch-line" style="border-top:2px ${dash} ${line.color || p.color}"></span>`
          : `<span class="kde-swatch-dot" style="background:${mc}"></span>`;
      return `<span class="kde-legend-item${off ? " kde-off" : ""}" data-name="${rich(p.name)}">${swatch}<span class="kde-legend-text">${rich(p.name)}</span></span>`;
    }).join("");
    if (html !== shownLegend) { legend.innerHTML = html; shownLegend = html; }
  }

  legend.addEventListener("click", (ev) => {
    const item = ev.target.closest(".kde-legend-item");
    if (!item || !last) return;
    const n = item.dataset.name;
    hidden.has(n) ? hidden.delete(n) : hidden.add(n);
    paint(last.fig, last.data);
  });

  // what is under the pointer: the closest point (within 20 px), else a bar or a heatmap cell
  function pick(mx, my) {
    if (!last) return null;
    const {scene} = last;
    let best = null, bestD = 20 * 20;
    for (const p of scene.shown) {
      const xa = scene.axes[p.xid], ya = scene.axes[p.yid];
      if (mx < xa.start - 5 || mx > xa.start + xa.len + 5 || my < ya.start - 5 || my > ya.start + ya.len + 5) continue;
      if (p.t.hoverinfo === "skip" && p.t.hovertemplate === undefined) continue;
      if (p.px) {
        for (let k = 0; k < p.n; k++) {
          const d = (p.px[k] - mx) ** 2 + (p.py[k] - my) ** 2;
          if (d < bestD) { bestD = d; best = {p, k}; }
        }
      }
    }
    if (best) return pointOf(best.p, best.k);
    for (let i = scene.shown.length - 1; i >= 0; i--) {
      const p = scene.shown[i];
      if (p.t.hoverinfo === "skip") continue;
      const xa = scene.axes[p.xid], ya = scene.axes[p.yid];
      if (mx < xa.start || mx > xa.start + xa.len || my < ya.start || my > ya.start + ya.len) continue;
      if (p.type === "heatmap" && p.z.rows) {
        const {xs, ys} = heatmapBox(p, xa, ya);
        const j = Math.floor(((mx - xs[0]) / (xs[1] - xs[0])) * p.z.cols), r = Math.floor(((my - ys[0]) / (ys[1] - ys[0])) * p.z.rows);
        if (j >= 0 && j < p.z.cols && r >= 0 && r < p.z.rows) {
          return {p, index: [r, j], x: p.x[j], y: p.y[r], z: p.z.at(r, j), customdata: null, hovertext: null};
        }
      }
      if (p.type === "bar") {
        const unit = Math.abs(xa.map(1) - xa.map(0));
        for (let k = 0; k < p.n; k++) {
          const c = xa.map(toUnits(xa, p.x[k]));
          if (Math.abs(mx - c) <= unit / 2) return pointOf(p, k);
        }
      }
    }
    return null;
  }

  function pointOf(p, k) {
    const ht = p.hovertext;
    return {p, index: k, x: p.x[k], y: p.y[k], customdata: datum(p.customdata, k),
            hovertext: ht && typeof ht !== "string" ? ht[k] : ht};
  }

  canvas.addEventListener("mousemove", (ev) => {
    const r = canvas.getBoundingClientRect();
    const mx = ev.clientX - r.left, my = ev.clientY - r.top;
    if (hoverFrame !== null) cancelAnimationFrame(hoverFrame);
    hoverFrame = requestAnimationFrame(() => {
      hoverFrame = null;
      const pt = pick(mx, my);
      if (!pt || pt.p.t.hoverinfo === "skip" || pt.p.t.hoverinfo === "none") { tip.style.display = "none"; return; }
      tip.innerHTML = rich(hoverText(pt.p.t, pt));
      tip.style.display = "block";
      const left = mx + 14 + tip.offsetWidth > div.clientWidth ? mx - 14 - tip.offsetWidth : mx + 14;
      tip.style.left = Math.max(0, left) + "px";
      tip.style.top = Math.max(0, my - tip.offsetHeight - 8) + "px";
      canvas.style.cursor = "pointer";
    });
  });
  canvas.addEventListener("mouseleave", () => { tip.style.display = "none"; canvas.style.cursor = ""; });
  // drag a box on a subplot to zoom into it (a horizontal drag zooms x only, a vertical one y only)
  let drag = null;
  const subplotAt = (mx, my) => last && last.scene.subplots.find((sp) =>
    mx >= sp.x.start && mx <= sp.x.start + sp.x.len && my >= sp.y.start && my <= sp.y.start + sp.y.len);
  canvas.addEventListener("mousedown", (ev) => {
    const r = canvas.getBoundingClientRect();
    const mx = ev.clientX - r.left, my = ev.clientY - r.top;
    const sp = subplotAt(mx, my);
    delete canvas.dataset.dragged;
    drag = sp ? {sp, x0: mx, y0: my, x1: mx, y1: my, moved: false} : null;
  });
  window.addEventListener("mousemove", (ev) => {
    if (!drag) return;
    const r = canvas.getBoundingClientRect();
    const {sp} = drag;
    drag.x1 = Math.min(sp.x.start + sp.x.len, Math.max(sp.x.start, ev.clientX - r.left));
    drag.y1 = Math.min(sp.y.start + sp.y.len, Math.max(sp.y.start, ev.clientY - r.top));
    const dx = Math.abs(drag.x1 - drag.x0), dy = Math.abs(drag.y1 - drag.y0);
    drag.moved = drag.moved || dx > 5 || dy > 5;
    if (!drag.moved) return;
    const zx = dx > 5, zy = dy > 5;
    Object.assign(zoombox.style, {display: "block",
      left: (zx ? Math.min(drag.x0, drag.x1) : sp.x.start) + "px", width: (zx ? dx : sp.x.len) + "px",
      top: (zy ? Math.min(drag.y0, drag.y1) : sp.y.start) + "px", height: (zy ? dy : sp.y.len) + "px"});
  });
  window.addEventListener("mouseup", () => {
    if (!drag) return;
    const d = drag;
    drag = null;
    zoombox.style.display = "none";
    if (!d.moved) return;
    canvas.dataset.dragged = "1";  // the click that follows this mouseup is not a click on a point
    for (const [ax, a, b] of [[d.sp.x, d.x0, d.x1], [d.sp.y, d.y0, d.y1]]) {
      if (Math.abs(b - a) <= 5) continue;
      const u0 = unmap(ax, a), u1 = unmap(ax, b);
      zoomed[ax.id] = [Math.min(u0, u1), Math.max(u0, u1)];
    }
    paint(last.fig, last.data);
  });
  const unzoom = () => { for (const k of Object.keys(zoomed)) delete zoomed[k]; if (last) paint(last.fig, last.data); };
  canvas.addEventListener("dblclick", unzoom);
  reset.addEventListener("click", unzoom);
  canvas.addEventListener("click", (ev) => {
    if (canvas.dataset.dragged) { delete canvas.dataset.dragged; return; }
    const r = canvas.getBoundingClientRect();
    const pt = pick(ev.clientX - r.left, ev.clientY - r.top);
    if (!pt) return;
    send([{trace: pt.p.name || null, curve: pt.p.i, index: pt.index, x: pt.x, y: pt.y, customdata: pt.customdata}]);
  });

  canvas.setAttribute("role", "img");
  function paint(fig, data) {
    const scene = layoutScene(fig, data);
    draw(scene);
    const title = fig.layout && fig.layout.title;
    canvas.setAttribute("aria-label", String((title && (title.text || title)) || name).replace(/<[^>]*>/g, " "));
    last = {fig, data, scene};
    reset.style.display = Object.keys(zoomed).length ? "block" : "none";
  }

  return {
    async draw(fig, data) { paint(fig, data); },
    resize() { if (last && Math.max(200, div.clientWidth || 700) !== last.scene.W) paint(last.fig, last.data); },
    destroy() { last = null; },
  };
}

// ------------------------------------------------------------------------------------------- board
function render({model, el}) {
  el.classList.add("kde-board");
  const drawers = {};
  const drawn = {};
  const boxes = {};
  const captions = {};
  let frame = null;
  let alive = true;
  let changedAt = null;
  const canvasMode = model.get("renderer") === "canvas";
  for (const name of model.get("panels")) {
    const box = document.createElement("div");
    box.className = "kde-figure kde-figure-" + name;
    const caption = document.createElement("div");
    caption.className = "kde-caption";
    const div = document.createElement("div");
    div.className = "kde-plot";
    box.append(div, caption);
    el.appendChild(box);
    boxes[name] = box;
    captions[name] = caption;
    const send = (points) => model.send({event: "click", panel: name, points});
    drawers[name] = (canvasMode ? canvasDrawer : plotlyDrawer)(model, name, div, send);
  }
  async function redraw() {
    frame = null;
    if (!alive) return;
    const stamps = model.get("stamps");
    const timing = {received: changedAt, start: performance.now(), panels: {}};
    const jobs = [];
    for (const name of Object.keys(drawers)) {
      const fig = model.get("fig_" + name);
      if (!fig || !fig.data || drawn[name] === fig.rev) continue;
      // a heatmap's values travel in a synced trait of their own (`z_<panel>_<trace>`): a move that
      // leaves them as they were sends nothing for them, and the drawer sees the same object
      const data = fig.data.map((t) => {
        if (!(t.z && t.z.ref)) return t;
        const z = model.get(t.z.ref);
        return {...t, z: z && z.plain !== undefined ? z.plain : z};
      });
      drawn[name] = fig.rev;
      captions[name].textContent = (fig.layout.meta && fig.layout.meta.caption) || "";
      const t = performance.now();
      jobs.push(drawers[name].draw(fig, data).then(() => { timing.panels[name] = performance.now() - t; }));
    }
    await Promise.all(jobs);
    if (!alive) return;
    timing.end = performance.now();
    (globalThis.__kdeBoardTimings = globalThis.__kdeBoardTimings || []).push(timing);  // for benchmarks
    for (const [name, box] of Object.entries(boxes)) {
      if (drawn[name] !== undefined) box.dataset.stamp = stamps[name] || "";
    }
    el.dataset.revision = String(model.get("revision"));
  }
  const schedule = () => {
    if (frame === null) { changedAt = performance.now(); frame = requestAnimationFrame(() => redraw()); }
  };
  model.on("change", schedule);
  const resized = new ResizeObserver(() => { for (const d of Object.values(drawers)) d.resize(); });
  resized.observe(el);
  schedule();
  return () => {
    alive = false;
    model.off("change", schedule);
    resized.disconnect();
    for (const d of Object.values(drawers)) d.destroy();
  };
}

export default { render };
