"""KDEformer against its peers: accuracy versus budget, error versus time, and speed/memory versus N.

    python -m benchmarks.peers            # full run: writes the "peers" section of benchmarks/RESULTS.md
                                          # and benchmarks/plots/peers_*.html (10-20 min on 2 cores)
    python -m benchmarks.peers --quick    # about a minute: smaller sweeps, plots under plots/quick/,
                                          # tables printed, RESULTS.md untouched unless --results is given

Accuracy (float64): every method of kdeformer.methods at budgets 32 ... 1024 key columns per query, on
(a) all 72 heads of all-MiniLM-L6-v2 at 512 tokens of the default text and (b) GloVe, N = 8192, Q = K,
at three softmax scalings (near-uniform to sharp); several seeds; mean +- sd over seeds of the
head-averaged error.  Errors: ||O~ - O||_2 / ||O||_2, the theory's ||O~ - O||_2 / (||D^-1 A||_2 ||V||_2),
and the normaliser's mean_i |D~_i / D_i - 1|.  KDEformer is listed once per sampling mode that
kde_attention offers, so new modes show up without editing this file.
Speed and memory (float32, 1 x 4 heads, D = 64, budget 192 for every method): median wall time as a ratio
to torch's scaled_dot_product_attention timed in the same run, and peak memory: on CPU the rise of the
process's peak resident set (VmHWM, reset through /proc/self/clear_refs after malloc_trim) during the
call; on CUDA torch.cuda.max_memory_allocated above the memory held before the call.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import kdeformer
from kdeformer.methods import METHODS, approximate, split_budget
from kdeformer.methods import kdeformer as kde_adapter

try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover - tqdm is installed in the project environment
    def tqdm(it, **_):
        return it

from ._report import markdown_table, write_section

HERE = Path(__file__).resolve().parent
PEERS = ["performer", "reformer", "scatterbrain", "nystrom", "hyperattention", "uniform"]


# --------------------------------------------------------------------------- configuration
@dataclass
class Config:
    budgets: tuple  # budgets for GloVe / synthetic data
    seeds: int
    minilm: bool
    glove_n: int
    glove_scalings: tuple
    authors_m: tuple
    speed_ns: tuple
    speed_reps: int
    tiny: bool = False
    minilm_budgets: tuple = ()  # budgets for MiniLM (N = 512), default: those of `budgets` below N
    minilm_layers: tuple | None = None  # None: all 6 layers
    speed_budget: int = 192
    speed_heads: int = 4
    speed_dim: int = 64


FULL = Config(budgets=(32, 64, 128, 256, 512, 1024), seeds=3, minilm=True, glove_n=8192,
              glove_scalings=("uniform", "medium", "sharp"), authors_m=(64, 128, 256),
              speed_ns=(1024, 2048, 4096, 8192, 16384, 32768), speed_reps=3,
              minilm_budgets=(32, 64, 128, 256, 512))
QUICK = Config(budgets=(64, 256), seeds=1, minilm=True, glove_n=2048, glove_scalings=("uniform", "sharp"),
               authors_m=(128,), speed_ns=(1024, 2048), speed_reps=1, minilm_budgets=(64, 256), minilm_layers=(0, 5))
TINY = Config(budgets=(8, 16), seeds=2, minilm=False, glove_n=0, glove_scalings=(), authors_m=(8,),
              speed_ns=(64, 128), speed_reps=1, tiny=True, speed_budget=16, speed_heads=2, speed_dim=16)


@dataclass
class Entry:
    """One line of the comparison: a registry method with fixed options."""

    key: str
    method: str
    options: dict
    label: str


def entries() -> list[Entry]:
    """KDEformer once per sampling mode kde_attention offers, then every peer."""
    out = []
    for mode in kde_adapter.sampling_modes():
        out.append(Entry(f"kdeformer[{mode}]", "kdeformer", {"sampling": mode}, f"KDEformer ({mode})"))
    out += [Entry(name, name, {}, METHODS[name].label) for name in PEERS]
    return out


# --------------------------------------------------------------------------- data and references
@dataclass
class Dataset:
    name: str
    q: torch.Tensor  # (..., N, D) float64
    k: torch.Tensor
    v: torch.Tensor  # (..., N, Dv)
    scale: float
    key_mask: torch.Tensor | None
    out: torch.Tensor = None  # exact output (..., N, Dv)
    log_d: torch.Tensor = None  # exact log normaliser (..., N)
    theory_den: torch.Tensor = None  # ||D^-1 A||_2 ||V||_2 per head (...)
    out_norm: torch.Tensor = None  # ||O||_2 per head


def attention_spectral_norm(q, k, scale, log_d, key_mask, iterations: int = 60) -> torch.Tensor:
    """||D^-1 A||_2 per head by power iteration on M^T M, with M built in row chunks (float64 rows,
    float32 storage: 8192^2 entries take 256 MiB).  q (G, N, D) -> (G,)."""
    norms = []
    for g in range(q.shape[0]):
        rows = []
        for s in range(0, q.shape[1], 1024):
            logits = scale * (q[g, s:s + 1024] @ k[g].mT)
            if key_mask is not None:
                logits = logits.masked_fill(~key_mask[g], float("-inf"))
            rows.append(torch.exp(logits - log_d[g, s:s + 1024, None]).float())
        m = torch.cat(rows)  # (N, N) float32
        x = torch.ones(m.shape[1], dtype=torch.float32) / math.sqrt(m.shape[1])
        sigma = 0.0
        for _ in range(iterations):
            y = m.mT @ (m @ x)
            sigma = float(y.norm().sqrt())
            x = y / y.norm()
        norms.append(sigma)
        del m
    return torch.tensor(norms, dtype=torch.float64)


def with_references(ds: Dataset) -> Dataset:
    out, trace = kdeformer.exact_attention(ds.q, ds.k, ds.v, scale=ds.scale, key_mask=ds.key_mask, return_trace=True)
    ds.out, ds.log_d = out, trace.log_normalizer
    lead = ds.q.shape[:-2]
    q, k = ds.q.reshape(-1, *ds.q.shape[-2:]), ds.k.reshape(-1, *ds.k.shape[-2:])
    mask = None if ds.key_mask is None else ds.key_mask.expand(*lead, ds.k.shape[-2]).reshape(-1, 1, ds.k.shape[-2])
    if ds.q.shape[-2] <= 1024:
        att = trace.attention_matrix().reshape(-1, ds.q.shape[-2], ds.k.shape[-2])
        att_norm = kdeformer.spectral_norm(att)
    else:
        att_norm = attention_spectral_norm(q, k, ds.scale, ds.log_d.reshape(q.shape[0], -1), mask)
    v_norm = kdeformer.spectral_norm(ds.v.reshape(-1, *ds.v.shape[-2:]))
    ds.theory_den = (att_norm * v_norm).view(lead)
    ds.out_norm = kdeformer.spectral_norm(out)
    return ds


def load_datasets(cfg: Config) -> list[Dataset]:
    from kdeformer import sources

    out = []
    if cfg.tiny:
        for kind in ("sinks",):
            src = sources.synthetic(n=64, d=16, kind=kind, seed=0)
            out.append(Dataset(f"synthetic-{kind}", src.q.double(), src.k.double(), src.v.double(), src.scale, None))
    if cfg.minilm:
        try:
            src = sources.minilm()
        except Exception as exc:  # offline model missing: say so and go on with the other data
            print(f"[peers] MiniLM unavailable ({exc}); skipping it", file=sys.stderr)
        else:
            mask = None if src.key_mask is None else src.key_mask.bool()
            layers = list(cfg.minilm_layers) if cfg.minilm_layers is not None else slice(None)
            q, k, v = (x[layers].double() for x in (src.q, src.k, src.v))  # (L, H, N, D)
            out.append(Dataset("minilm", q, k, v, src.scale, mask))
    for scaling in cfg.glove_scalings:
        src = sources.glove(n=cfg.glove_n, scaling=scaling, seed=0)
        out.append(Dataset(f"glove-{scaling}", src.q.double(), src.k.double(), src.v.double(), src.scale, None))
    return [with_references(ds) for ds in tqdm(out, desc="references", leave=False)]


# --------------------------------------------------------------------------- accuracy
def per_head_errors(ds: Dataset, approx: torch.Tensor, log_d):
    diff = kdeformer.spectral_norm(approx.double() - ds.out)
    rel = float((diff / ds.out_norm).mean())
    theory = float((diff / ds.theory_den).mean())
    norm_err = None if log_d is None else kdeformer.normalizer_relative_error(log_d, ds.log_d)
    return rel, theory, norm_err


def timed(fn, reps: int = 1) -> float:
    """Median seconds of `reps` calls (after one untimed call when reps > 1)."""
    if reps > 1:
        fn()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def budgets_for(cfg: Config, ds: Dataset) -> tuple:
    return cfg.minilm_budgets if ds.name == "minilm" and cfg.minilm_budgets else cfg.budgets


def run_accuracy(cfg: Config, datasets: list[Dataset], lines: list[Entry]) -> list[dict]:
    """One record per (dataset, entry, budget, seed); the seed-0 call is also timed without a trace."""
    jobs = [(ds, e, b) for ds in datasets for e in lines for b in budgets_for(cfg, ds)]
    records = []
    for ds, e, budget in tqdm(jobs, desc="accuracy"):
        params = split_budget(e.method, budget, **e.options)
        seeds = range(cfg.seeds) if METHODS[e.method].random else range(1)
        for seed in seeds:
            gen = torch.Generator().manual_seed(1000 + seed)
            out, trace = approximate(e.method, ds.q, ds.k, ds.v, budget=budget, scale=ds.scale, key_mask=ds.key_mask,
                                     generator=gen, return_trace=True, **e.options)
            rel, theory, norm_err = per_head_errors(ds, out, trace.log_normalizer)
            rec = dict(dataset=ds.name, entry=e.key, label=e.label, budget=budget, seed=seed, rel=rel,
                       theory=theory, normalizer=norm_err, params={k: v for k, v in params.items()})
            if seed == 0:
                rec["seconds"] = timed(lambda: approximate(e.method, ds.q, ds.k, ds.v, budget=budget, scale=ds.scale,
                                                           key_mask=ds.key_mask, generator=gen, **e.options))
            records.append(rec)
    for ds in datasets:  # exact attention's time on the same data, for the Pareto view
        records.append(dict(dataset=ds.name, entry="sdpa", label="torch SDPA (exact)", budget=None, seed=0, rel=0.0,
                            theory=0.0, normalizer=0.0, params={}, seconds=timed(lambda: sdpa(ds), 3)))
    return records


def sdpa(ds: Dataset):
    mask = None if ds.key_mask is None else ds.key_mask[..., None, :]
    return torch.nn.functional.scaled_dot_product_attention(ds.q, ds.k, ds.v, attn_mask=mask, scale=ds.scale)


def authors_convention(cfg: Config, datasets: list[Dataset]) -> list[dict]:
    """The authors' budget convention at m, on the first data set (MiniLM in a full run): KDEformer and
    HyperAttention with block m/2 and m samples (1.5 m columns), Performer with m features,
    Nystromformer with m landmarks, uniform sampling with m columns."""
    if not datasets:
        return []
    ds = datasets[0]
    settings = []  # (m, label, method, options)
    for m in cfg.authors_m:
        half = max(1, m // 2)
        for mode in kde_adapter.sampling_modes():
            settings.append((m, f"KDEformer ({mode})", "kdeformer", dict(bucket_size=half, sample_size=m, sampling=mode)))
        settings += [(m, "Performer", "performer", dict(num_features=m)),
                     (m, "Nyströmformer", "nystrom", dict(num_landmarks=m)),
                     (m, "HyperAttention", "hyperattention", dict(block_size=half, sample_size=m)),
                     (m, "Uniform sampling", "uniform", dict(sample_size=m))]
    records = []
    for m, label, method, opts in tqdm(settings, desc="authors' convention", leave=False):
        seeds = range(cfg.seeds) if METHODS[method].random else range(1)
        for seed in seeds:
            gen = torch.Generator().manual_seed(2000 + seed)
            out, trace = approximate(method, ds.q, ds.k, ds.v, budget=m, scale=ds.scale, key_mask=ds.key_mask,
                                     generator=gen, return_trace=True, **opts)
            rel, theory, norm_err = per_head_errors(ds, out, trace.log_normalizer)
            records.append(dict(dataset=ds.name, heads=math.prod(ds.q.shape[:-2]), m=m, label=label, seed=seed, rel=rel,
                                theory=theory,
                                normalizer=norm_err, params=opts))
    return records


# --------------------------------------------------------------------------- speed and memory
_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False
    return _LIBC


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def measure(fn, device, reps: int) -> tuple[float, float | None]:
    """(median seconds, peak MiB added).  reps > 1: one warm-up call, `reps` timed calls, then one call
    for memory.  reps == 1 (large N): a single call gives both, the memory reset done before the timer."""
    if reps > 1:
        fn()
        seconds = timed(fn, reps)
        return seconds, peak_memory_mib(fn, device)[1]
    return peak_memory_mib(fn, device)


def peak_memory_mib(fn, device) -> tuple[float, float | None]:
    """Time one call and the peak memory it adds (MiB): CUDA allocator peak, or the CPU process's peak
    resident-set rise (None where /proc/self/clear_refs cannot be written)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t0, (torch.cuda.max_memory_allocated() - base) / 2**20
    libc = _libc()
    if libc:
        libc.malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        base = _status_kib("VmRSS")
    except OSError:
        base = None
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    return seconds, (None if base is None or peak is None else max(0, peak - base) / 1024)


def run_speed(cfg: Config, lines: list[Entry], device) -> list[dict]:
    """Time and peak memory of SDPA and of every entry at budget cfg.speed_budget, float32."""
    records = []
    for n in tqdm(cfg.speed_ns, desc="speed"):
        g = torch.Generator(device=device).manual_seed(n)
        shape = (1, cfg.speed_heads, n, cfg.speed_dim)
        q, k, v = (torch.randn(shape, generator=g, device=device) for _ in range(3))
        calls = [("sdpa", "torch SDPA (exact)", lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))]
        for e in lines:
            calls.append((e.key, e.label, lambda e=e: approximate(e.method, q, k, v, budget=cfg.speed_budget,
                                                                generator=g, **e.options)))
        for key, label, fn in calls:
            seconds, mem = measure(fn, q.device, cfg.speed_reps if n <= 4096 else 1)
            records.append(dict(n=n, entry=key, label=label, seconds=seconds, memory_mib=mem))
        del q, k, v
    sdpa_time = {r["n"]: r["seconds"] for r in records if r["entry"] == "sdpa"}
    for r in records:
        r["ratio"] = r["seconds"] / sdpa_time[r["n"]]
    return records


# --------------------------------------------------------------------------- summaries
def mean_sd(values) -> tuple[float, float]:
    values = [x for x in values if x is not None]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def cell(values, digits: int = 3) -> str:
    values = [x for x in values if x is not None]
    if not values:
        return "—"
    mean, sd = mean_sd(values)
    return f"{mean:.{digits}f}" if len(values) == 1 else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def accuracy_table(records, dataset: str, metric: str, budgets, lines) -> str:
    rows = []
    for e in lines:
        rows.append([e.label] + [cell([r[metric] for r in records if r["dataset"] == dataset and r["entry"] == e.key
                                       and r["budget"] == b]) for b in budgets])
    return markdown_table(["method \\ budget"] + [str(b) for b in budgets], rows)


def summary_table(records, datasets, cfg, lines) -> str:
    """Per data set and budget: the most accurate method, and KDEformer's best variant beside it."""
    rows = []
    for ds in datasets:
        for b in budgets_for(cfg, ds):
            means = {e.key: mean_sd([r["rel"] for r in records if r["dataset"] == ds.name and r["entry"] == e.key
                                     and r["budget"] == b])[0] for e in lines}
            label = {e.key: e.label for e in lines}
            best = min(means, key=means.get)
            kde = min((k for k in means if k.startswith("kdeformer")), key=means.get)
            rank = sorted(means.values()).index(means[kde]) + 1
            rows.append([ds.name, b, f"{label[best]} {means[best]:.3f}", f"{label[kde]} {means[kde]:.3f}",
                         f"{rank} of {len(means)}"])
    return markdown_table(["data", "budget", "most accurate (rel. spectral error)", "best KDEformer variant",
                           "its rank"], rows)


def time_table(records, dataset: str, budgets, lines) -> str:
    rows = []
    for e in lines:
        rows.append([e.label] + [f"{1e3 * r['seconds']:.1f}" for b in budgets for r in records
                                 if r["dataset"] == dataset and r["entry"] == e.key and r["budget"] == b
                                 and "seconds" in r])
    exact = [r for r in records if r["dataset"] == dataset and r["entry"] == "sdpa"]
    if exact:
        rows.append(["torch SDPA (exact)"] + [f"{1e3 * exact[0]['seconds']:.1f}"] * len(budgets))
    return markdown_table(["ms per call \\ budget"] + [str(b) for b in budgets], rows)


# Measured on this machine with the authors' code (see /work/shared/NOTES.md): MiniLM, 512 tokens, float64.
AUTHORS_ANCHORS = {"authors' KDEformer code (anchor)": {64: 0.65, 128: 0.49, 256: 0.34},
                   "authors' Performer code (anchor)": {64: 0.80, 128: 0.74, 256: 0.70}}


def authors_table(records, ms) -> str:
    labels = list(dict.fromkeys(r["label"] for r in records))
    rows = [[lab] + [cell([r["rel"] for r in records if r["label"] == lab and r["m"] == m]) for m in ms]
            for lab in labels]
    if records and records[0]["dataset"] == "minilm" and records[0].get("heads") == 72:
        rows += [[lab] + [f"{vals[m]:.2f}" if m in vals else "—" for m in ms] for lab, vals in AUTHORS_ANCHORS.items()]
    return markdown_table(["method \\ m"] + [str(m) for m in ms], rows)


def speed_table(records, ns, lines) -> str:
    rows = []
    for key, label in [("sdpa", "torch SDPA (exact)")] + [(e.key, e.label) for e in lines]:
        cells = []
        for n in ns:
            r = next((r for r in records if r["entry"] == key and r["n"] == n), None)
            if r is None:
                cells.append("—")
                continue
            mem = "n/a" if r["memory_mib"] is None else f"{r['memory_mib']:.0f} MiB"
            head = f"{r['seconds']:.3f} s" if key == "sdpa" else f"{r['ratio']:.3f}×"
            cells.append(f"{head} ({mem})")
        rows.append([label] + cells)
    return markdown_table(["method \\ N"] + [str(n) for n in ns], rows)


# --------------------------------------------------------------------------- plots (plotly, offline)
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf"]


def write_plots(plot_dir: Path, acc, speed, cfg, lines, datasets) -> list[Path]:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    plot_dir.mkdir(parents=True, exist_ok=True)
    color = {e.key: COLORS[i % len(COLORS)] for i, e in enumerate(lines)}
    written = []
    names = [ds.name for ds in datasets]
    if acc and names:
        fig = make_subplots(rows=2, cols=len(names), subplot_titles=names + [""] * len(names),
                            shared_xaxes=True, vertical_spacing=0.08)
        for row, metric in ((1, "rel"), (2, "theory")):
            for col, (name, ds) in enumerate(zip(names, datasets), 1):
                budgets = budgets_for(cfg, ds)
                for e in lines:
                    stats = [mean_sd([r[metric] for r in acc if r["dataset"] == name and r["entry"] == e.key
                                      and r["budget"] == b]) for b in budgets]
                    fig.add_trace(go.Scatter(x=list(budgets), y=[s[0] for s in stats], name=e.label, legendgroup=e.key,
                                             showlegend=(row == 1 and col == 1), line=dict(color=color[e.key]),
                                             error_y=dict(type="data", array=[s[1] for s in stats], visible=True),
                                             mode="lines+markers"), row=row, col=col)
                fig.update_xaxes(type="log", title_text="budget (key columns per query)" if row == 2 else None,
                                 row=row, col=col)
                fig.update_yaxes(type="log", row=row, col=col,
                                 title_text=("‖O~−O‖/‖O‖" if row == 1 else "‖O~−O‖/(‖D⁻¹A‖‖V‖)") if col == 1 else None)
        fig.update_layout(title="Error versus budget (mean ± sd over seeds)", height=750, width=max(700, 380 * len(names)))
        written.append(plot_dir / "peers_accuracy.html")
        fig.write_html(written[-1], include_plotlyjs="directory")

        fig = make_subplots(rows=1, cols=len(names), subplot_titles=names)
        for col, name in enumerate(names, 1):
            for e in lines:
                pts = [r for r in acc if r["dataset"] == name and r["entry"] == e.key and "seconds" in r]
                fig.add_trace(go.Scatter(x=[1e3 * r["seconds"] for r in pts],
                                         y=[mean_sd([x["rel"] for x in acc if x["dataset"] == name and x["entry"] == e.key
                                                     and x["budget"] == r["budget"]])[0] for r in pts],
                                         text=[f"budget {r['budget']}" for r in pts], name=e.label, legendgroup=e.key,
                                         showlegend=col == 1, line=dict(color=color[e.key]), mode="lines+markers"),
                              row=1, col=col)
            ex = [r for r in acc if r["dataset"] == name and r["entry"] == "sdpa"]
            if ex:
                fig.add_vline(x=1e3 * ex[0]["seconds"], line_dash="dash", annotation_text="SDPA (exact)", row=1, col=col)
            fig.update_xaxes(type="log", title_text="ms per call", row=1, col=col)
            fig.update_yaxes(type="log", title_text="‖O~−O‖/‖O‖" if col == 1 else None, row=1, col=col)
        fig.update_layout(title="Error versus time (Pareto view; lower left is better)", height=450,
                          width=max(700, 380 * len(names)))
        written.append(plot_dir / "peers_pareto.html")
        fig.write_html(written[-1], include_plotlyjs="directory")
    if speed:
        fig = make_subplots(rows=1, cols=2, subplot_titles=["time / SDPA time", "peak memory (MiB)"])
        keys = [("sdpa", "torch SDPA (exact)")] + [(e.key, e.label) for e in lines]
        for i, (key, label) in enumerate(keys):
            pts = [r for r in speed if r["entry"] == key]
            c = "black" if key == "sdpa" else color[key]
            fig.add_trace(go.Scatter(x=[r["n"] for r in pts], y=[r["ratio"] for r in pts], name=label, legendgroup=key,
                                     line=dict(color=c), mode="lines+markers"), row=1, col=1)
            fig.add_trace(go.Scatter(x=[r["n"] for r in pts], y=[r["memory_mib"] for r in pts], name=label,
                                     legendgroup=key, showlegend=False, line=dict(color=c), mode="lines+markers"),
                          row=1, col=2)
        for col in (1, 2):
            fig.update_xaxes(type="log", title_text="N (tokens)", row=1, col=col)
            fig.update_yaxes(type="log", row=1, col=col)
        fig.update_layout(title="Speed and memory versus N (float32, 4 heads, D = 64, budget 192)", height=450, width=1100)
        written.append(plot_dir / "peers_speed.html")
        fig.write_html(written[-1], include_plotlyjs="directory")
    return written


# --------------------------------------------------------------------------- report
READING_NOTES = """How to read the tables:

- HyperAttention and KDEformer with `sampling="uniform"` are one estimator (sortLSH blocks plus uniform columns,
  block keys left out of the samples; a shared-shift sum and a log-sum-exp merge are algebraically equal). Given
  the same generator both draw the same hashes and samples, so their rows agree closely (the two cut the
  sorted tokens into blocks at slightly different places): a cross-check of two independent implementations.
- Nyströmformer's landmarks are means of contiguous token segments. The GloVe rows come in random word order,
  so every segment mean is close to the global mean and its error hardly moves with the budget; on text
  (MiniLM), where neighbouring tokens are related, it is the strongest peer. Its m x m pseudo-inverse costs
  O(m^3) per head, which dominates its time at large budgets.
- Performer's positive features have a variance that grows like exp(|q' + k'|^2); with Q = K (GloVe) the
  diagonal term has k = q, so the Monte-Carlo error falls very slowly with the number of features and the
  output stays close to the mean of V, which near-uniform attention rewards and sharp attention punishes.
- The machine is shared (several agents on 2 cores): timings use one thread and are noisy; read the ratios to
  SDPA, measured in the same run, rather than the absolute times."""


def report(cfg: Config, acc, authors, speed, lines, datasets, plots, seconds_total: float) -> str:
    parts = [
        "Every method of `kdeformer.methods` through `approximate(method, q, k, v, budget=...)`; `budget` = key "
        "columns (features, landmarks) each query pays for. Splits: KDEformer and HyperAttention 1/3 exact block "
        "+ 2/3 samples (the authors' m/2 + m); ScatterBrain 1/2 LSH support + 1/2 Performer features; Reformer "
        "2 rounds × 2 chunks of budget/4; Performer `budget` features; Nyströmformer `budget` landmarks (capped at "
        "N); uniform `budget` columns. Accuracy in float64; errors are head-averaged, then mean ± sd over "
        f"{cfg.seeds} seed(s) (deterministic methods: one run). Normaliser error = mean_i |D~_i/D_i − 1| "
        "(Nyströmformer estimates no normaliser). Reformer's normaliser only sees the keys it finds, so it is "
        "low by construction.",
    ]
    if datasets and acc:
        parts += ["### Summary: who wins where (mean relative spectral error)", summary_table(acc, datasets, cfg, lines),
                  READING_NOTES]
    for ds in datasets:
        budgets = budgets_for(cfg, ds)
        heads = math.prod(ds.q.shape[:-2])
        nice = {"minilm": f"all-MiniLM-L6-v2, {heads} heads, {ds.q.shape[-2]} tokens of the default text"}.get(
            ds.name, f"{ds.name}, N = {ds.q.shape[-2]}, D = {ds.q.shape[-1]}, scale {ds.scale:.3g}")
        parts += [f"### {ds.name}: relative spectral error ‖O~−O‖₂/‖O‖₂\n\n_{nice}_",
                  accuracy_table(acc, ds.name, "rel", budgets, lines),
                  f"### {ds.name}: theory form ‖O~−O‖₂/(‖D⁻¹A‖₂‖V‖₂)", accuracy_table(acc, ds.name, "theory", budgets, lines),
                  f"### {ds.name}: normaliser error mean |D~/D − 1|", accuracy_table(acc, ds.name, "normalizer", budgets, lines)]
        if ds is datasets[0]:
            parts += [f"### {ds.name}: time per call (ms, seed 0, no trace; float64, all heads in one call)",
                      time_table(acc, ds.name, budgets, lines)]
    if authors:
        parts += [f"### Authors' convention on {authors[0]['dataset']}: relative spectral error at m\n\n"
                  "KDEformer and HyperAttention: block m/2 + m samples (1.5 m columns); Performer m features; "
                  "Nyströmformer m landmarks; uniform m columns. Anchor rows (full run only): the authors' code "
                  "measured earlier on this machine on the same 72 heads, float64 (NOTES.md).", authors_table(authors, cfg.authors_m)]
    if speed:
        parts += [f"### Speed and memory (float32, 1 × {cfg.speed_heads} heads, D = {cfg.speed_dim}, budget "
                  f"{cfg.speed_budget}, random inputs)\n\nCells: time as a multiple of torch SDPA's time in the same run "
                  "(SDPA row: seconds), and peak memory added by the call. CPU memory = rise of the process's peak "
                  "resident set (VmHWM reset via /proc/self/clear_refs after malloc_trim), so it counts every "
                  "allocation torch makes, rounded to pages; it cannot see memory reused from the allocator's cache "
                  "without touching new pages. "
                  + (f"Up to N = 4096: median of {cfg.speed_reps} calls after a warm-up call; beyond: one call."
                     if cfg.speed_reps > 1 else "One call per cell (no warm-up)."),
                  speed_table(speed, cfg.speed_ns, lines)]
    if plots:
        parts.append("Plots: " + ", ".join(f"[{p.name}](plots/{p.name})" for p in plots) + " (plotly, offline: "
                     "plotly.min.js sits next to them).")
    parts.append(f"Run time: {seconds_total / 60:.1f} min (`python -m benchmarks.peers{' --quick' if cfg is QUICK else ''}`).")
    return "\n\n".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="about one minute: small sweeps")
    parser.add_argument("--tiny", action="store_true", help="seconds: synthetic data only (used by the tests)")
    parser.add_argument("--results", type=Path, default=None, help="RESULTS.md to write (default: benchmarks/"
                        "RESULTS.md for a full run, none for --quick/--tiny)")
    parser.add_argument("--plots", type=Path, default=None, help="folder for the HTML plots")
    parser.add_argument("--json", type=Path, default=None, help="also dump the raw records here")
    parser.add_argument("--no-speed", action="store_true", help="skip the speed and memory sweep")
    parser.add_argument("--device", default="cpu", help="device for the speed sweep (cpu or cuda)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the machine is "
                        "shared, and more threads than free cores make small kernels wait on each other)")
    args = parser.parse_args(argv)
    threads = args.threads
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(old_threads)


def _run(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = TINY if args.tiny else QUICK if args.quick else FULL
    full = cfg is FULL
    results = args.results if args.results is not None else (HERE / "RESULTS.md" if full else None)
    plot_dir = args.plots if args.plots is not None else HERE / "plots" / ("" if full else "quick")
    t0 = time.perf_counter()
    lines = entries()
    datasets = load_datasets(cfg)
    acc = run_accuracy(cfg, datasets, lines)
    authors = authors_convention(cfg, datasets)
    speed = [] if args.no_speed else run_speed(cfg, lines, torch.device(args.device))
    plots = write_plots(plot_dir, acc, speed, cfg, lines, datasets)
    body = report(cfg, acc, authors, speed, lines, datasets, plots, time.perf_counter() - t0)
    if args.json is not None or full:
        path = args.json if args.json is not None else plot_dir / "peers_results.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dict(accuracy=acc, authors=authors, speed=speed), indent=1, default=str))
    if results is not None:
        write_section("peers", "Peers: accuracy, speed and memory", body, path=results)
        print(f"wrote section 'peers' of {results}")
    else:
        print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
