"""KDEformer against its peers: error versus budget, versus multiply-adds (the Pareto front) and versus time;
a causal track; speed and memory versus N.

    python -m benchmarks.peers            # full run: writes the "peers" section of benchmarks/RESULTS.md,
                                          # benchmarks/plots/peers_*.html and docs/pareto.png (~30 min, 2 cores)
    python -m benchmarks.peers --quick    # about a minute: smaller sweeps, plots under plots/quick/,
                                          # tables printed, RESULTS.md untouched unless --results is given

Accuracy (float64): every method of kdeformer.methods (read from the registry, so a new peer shows up here)
at budgets 32 ... 1024 key columns per query, on (a) all 72 heads of all-MiniLM-L6-v2 at 512 tokens of the
default text and (b) GloVe, N = 8192, Q = K, at three softmax scalings (near-uniform to sharp); several
seeds; mean +- sd over seeds of the head-averaged error.  Errors: ||O~ - O||_2 / ||O||_2, the theory's
||O~ - O||_2 / (||D^-1 A||_2 ||V||_2), and the normaliser's mean_i |D~_i / D_i - 1|.  Every point also
carries its honest cost, kdeformer.multiply_adds per head (what the budget convention hides: feature maps,
pseudo-inverses, estimation rows), and its wall time; the Pareto front is drawn against multiply-adds.
KDEformer is listed once per sampling mode that kde_attention offers.
Causal track: MiniLM's Q/K/V under a causal mask (the encoder's vectors, labelled causal: no decoder weights
ship with the project), every method that supports is_causal, budgets 32-256, against exact causal attention.
Speed and memory (float32, 1 x 4 heads, D = 64, budget 192 for every method): median wall time as a ratio
to torch's scaled_dot_product_attention timed in the same run (causal SDPA for the causal sweep), and peak
memory: on CPU the rise of the process's peak resident set (VmHWM, reset through /proc/self/clear_refs
after malloc_trim) during the call; on CUDA torch.cuda.max_memory_allocated above the memory held before.
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
REPO = HERE.parent
# every peer of the registry; KDEformer gets one line per sampling mode, exact attention is the reference
PEERS = [name for name in METHODS if name not in ("exact", "kdeformer")]
CHROMIUM = "/usr/bin/chromium"


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
    causal_budgets: tuple = ()  # the causal track on MiniLM (empty: none)
    causal_speed_ns: tuple = ()  # the causal speed sweep against causal SDPA (empty: none)


FULL = Config(budgets=(32, 64, 128, 256, 512, 1024), seeds=3, minilm=True, glove_n=8192,
              glove_scalings=("uniform", "medium", "sharp"), authors_m=(64, 128, 256),
              speed_ns=(1024, 2048, 4096, 8192, 16384, 32768), speed_reps=3,
              minilm_budgets=(32, 64, 128, 256, 512), causal_budgets=(32, 64, 128, 256),
              causal_speed_ns=(4096, 8192, 16384, 32768))
QUICK = Config(budgets=(64, 256), seeds=1, minilm=True, glove_n=2048, glove_scalings=("uniform", "sharp"),
               authors_m=(128,), speed_ns=(1024, 2048), speed_reps=1, minilm_budgets=(64, 256), minilm_layers=(0, 5),
               causal_budgets=(64,), causal_speed_ns=(2048,))
TINY = Config(budgets=(8, 16), seeds=2, minilm=False, glove_n=0, glove_scalings=(), authors_m=(8,),
              speed_ns=(64, 128), speed_reps=1, tiny=True, speed_budget=16, speed_heads=2, speed_dim=16,
              causal_budgets=(8,), causal_speed_ns=(128,))


@dataclass
class Entry:
    """One line of the comparison: a registry method with fixed options."""

    key: str
    method: str
    options: dict
    label: str


def entries() -> list[Entry]:
    """KDEformer once per sampling mode kde_attention offers, then every peer of the registry."""
    out = []
    for mode in kde_adapter.sampling_modes():
        out.append(Entry(f"kdeformer[{mode}]", "kdeformer", {"sampling": mode}, f"KDEformer ({mode})"))
    out += [Entry(name, name, {}, METHODS[name].label) for name in PEERS]
    return out


def causal_entries() -> list[Entry]:
    """The entries whose method supports is_causal (the registry's declared ability)."""
    return [e for e in entries() if METHODS[e.method].supports_causal]


def cost(e: Entry, budget: int, n_q: int, n_k: int, dim: int, dim_v: int, is_causal: bool = False) -> int:
    """Multiply-adds per head of one entry at one budget (kdeformer.multiply_adds)."""
    return kdeformer.multiply_adds(e.method, n_q, n_k, dim, dim_v, budget=budget, is_causal=is_causal, **e.options)


class Clock:
    """An optional wall-clock budget for the whole run, shared out between its phases.

    Each phase gets share / (shares still to run) of the time left, so time a phase does not use passes on.
    A phase past its deadline skips its remaining jobs (counted in `skipped`); the report says so."""

    SHARES = {"accuracy": 0.45, "authors": 0.04, "causal": 0.2, "speed": 0.14, "causal speed": 0.17}

    def __init__(self, minutes: float | None):
        self.end = None if minutes is None else time.perf_counter() + 60 * minutes
        self.left = dict(self.SHARES)
        self.deadline = None
        self.skipped: dict[str, int] = {}

    def start(self, phase: str) -> None:
        share = self.left.pop(phase)
        if self.end is not None:
            remaining = max(0.0, self.end - time.perf_counter())
            self.deadline = time.perf_counter() + remaining * share / (share + sum(self.left.values()))
        self.phase = phase

    def out_of_time(self) -> bool:
        """True (and one skip counted) when the current phase is past its deadline."""
        if self.deadline is None or time.perf_counter() < self.deadline:
            return False
        self.skipped[self.phase] = self.skipped.get(self.phase, 0) + 1
        return True


NO_CLOCK = Clock(None)


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
    is_causal: bool = False  # bottom-right causal mask (the causal track)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(Nq, Nk, D, Dv) of one head."""
        return self.q.shape[-2], self.k.shape[-2], self.q.shape[-1], self.v.shape[-1]


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
    out, trace = kdeformer.exact_attention(ds.q, ds.k, ds.v, scale=ds.scale, key_mask=ds.key_mask,
                                           is_causal=ds.is_causal, return_trace=True)
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


def causal_datasets(cfg: Config, datasets: list[Dataset]) -> list[Dataset]:
    """The causal track's data: MiniLM's (in tiny mode the synthetic) Q/K/V under a causal mask."""
    if not cfg.causal_budgets:
        return []
    picked = [ds for ds in datasets if ds.name == "minilm" or ds.name.startswith("synthetic")][:1]
    return [with_references(Dataset(f"{ds.name}-causal", ds.q, ds.k, ds.v, ds.scale, ds.key_mask, is_causal=True))
            for ds in picked]


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
    if ds.is_causal:
        return cfg.causal_budgets
    return cfg.minilm_budgets if ds.name == "minilm" and cfg.minilm_budgets else cfg.budgets


def run_accuracy(cfg: Config, datasets: list[Dataset], lines: list[Entry], clock: Clock = NO_CLOCK) -> list[dict]:
    """One record per (dataset, entry, budget, seed); the seed-0 call is also timed without a trace.  Jobs run
    cheapest budgets first, so a run stopped by its clock loses the largest budgets."""
    jobs = sorted(((ds, e, b) for ds in datasets for e in lines for b in budgets_for(cfg, ds)), key=lambda j: j[2])
    records = []
    for ds, e, budget in tqdm(jobs, desc="accuracy"):
        if clock.out_of_time():
            continue
        params = split_budget(e.method, budget, **e.options)
        seeds = range(cfg.seeds) if METHODS[e.method].random else range(1)
        for seed in seeds:
            gen = torch.Generator().manual_seed(1000 + seed)
            call = dict(budget=budget, scale=ds.scale, key_mask=ds.key_mask, generator=gen, is_causal=ds.is_causal,
                        **e.options)
            out, trace = approximate(e.method, ds.q, ds.k, ds.v, return_trace=True, **call)
            rel, theory, norm_err = per_head_errors(ds, out, trace.log_normalizer)
            rec = dict(dataset=ds.name, entry=e.key, label=e.label, budget=budget, seed=seed, rel=rel,
                       theory=theory, normalizer=norm_err, params={k: v for k, v in params.items()},
                       macs=cost(e, budget, *ds.shape, is_causal=ds.is_causal), n_q=ds.shape[0])
            if seed == 0:
                rec["seconds"] = timed(lambda: approximate(e.method, ds.q, ds.k, ds.v, **call))
            records.append(rec)
    for ds in datasets:  # exact attention's time and cost on the same data, for the Pareto view
        exact_macs = kdeformer.multiply_adds("exact", *ds.shape, is_causal=ds.is_causal)
        records.append(dict(dataset=ds.name, entry="sdpa", label="torch SDPA (exact)", budget=None, seed=0, rel=0.0,
                            theory=0.0, normalizer=0.0, params={}, macs=exact_macs, n_q=ds.shape[0],
                            seconds=timed(lambda: sdpa(ds), 3)))
    return records


def sdpa(ds: Dataset):
    mask = None if ds.key_mask is None else ds.key_mask[..., None, :]
    if ds.is_causal:  # square inputs: SDPA's top-left causal mask is the bottom-right one
        causal = torch.ones(ds.q.shape[-2], ds.k.shape[-2], dtype=torch.bool).tril()
        mask = causal if mask is None else mask & causal
    return torch.nn.functional.scaled_dot_product_attention(ds.q, ds.k, ds.v, attn_mask=mask, scale=ds.scale)


def authors_convention(cfg: Config, datasets: list[Dataset], clock: Clock = NO_CLOCK) -> list[dict]:
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
        if clock.out_of_time():
            continue
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


def run_speed(cfg: Config, lines: list[Entry], device, *, is_causal: bool = False, clock: Clock = NO_CLOCK) -> list[dict]:
    """Time and peak memory of SDPA and of every entry at budget cfg.speed_budget, float32 (causal: SDPA with
    is_causal=True as the reference, over cfg.causal_speed_ns)."""
    records = []
    for n in tqdm(cfg.causal_speed_ns if is_causal else cfg.speed_ns, desc="causal speed" if is_causal else "speed"):
        g = torch.Generator(device=device).manual_seed(n)
        shape = (1, cfg.speed_heads, n, cfg.speed_dim)
        q, k, v = (torch.randn(shape, generator=g, device=device) for _ in range(3))
        calls = [("sdpa", "torch SDPA (exact)",
                  lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=is_causal))]
        for e in lines:
            calls.append((e.key, e.label, lambda e=e: approximate(e.method, q, k, v, budget=cfg.speed_budget,
                                                                generator=g, is_causal=is_causal, **e.options)))
        for key, label, fn in calls:
            if key != "sdpa" and clock.out_of_time():
                continue
            seconds, mem = measure(fn, q.device, cfg.speed_reps if n <= 4096 else 1)
            records.append(dict(n=n, entry=key, label=label, seconds=seconds, memory_mib=mem, is_causal=is_causal))
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
            means = {e.key: mean_error(records, ds.name, e.key, b) for e in lines}
            means = {k: x for k, x in means.items() if not math.isnan(x)}  # a clock-stopped run may miss some
            if not any(k.startswith("kdeformer") for k in means):
                continue
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
        timed_at = {r["budget"]: r["seconds"] for r in records
                    if r["dataset"] == dataset and r["entry"] == e.key and "seconds" in r}
        rows.append([e.label] + [f"{1e3 * timed_at[b]:.1f}" if b in timed_at else "—" for b in budgets])
    exact = [r for r in records if r["dataset"] == dataset and r["entry"] == "sdpa"]
    if exact:
        rows.append(["torch SDPA (exact)"] + [f"{1e3 * exact[0]['seconds']:.1f}"] * len(budgets))
    return markdown_table(["ms per call \\ budget"] + [str(b) for b in budgets], rows)


def cost_table(records, dataset: str, budgets, lines) -> str:
    """Per entry and budget: mean error and the multiply-adds per query it took."""
    rows = []
    for e in lines:
        cells = []
        for b in budgets:
            rec = next((r for r in records if r["dataset"] == dataset and r["entry"] == e.key and r["budget"] == b), None)
            cells.append("—" if rec is None else f"{mean_error(records, dataset, e.key, b):.3f} @ "
                         f"{rec['macs'] / rec['n_q'] / 1e3:.1f}k")
        rows.append([e.label] + cells)
    exact = next((r for r in records if r["dataset"] == dataset and r["entry"] == "sdpa"), None)
    if exact:
        rows.append(["exact attention"] + [f"0 @ {exact['macs'] / exact['n_q'] / 1e3:.1f}k"] * len(budgets))
    return markdown_table(["method \\ budget"] + [str(b) for b in budgets], rows)


def error_at_cost(records, dataset: str, key: str, target: float) -> float | None:
    """An entry's error at `target` multiply-adds per query, interpolated log-log between its measured budgets
    (exact-limit points left out; None outside the measured range)."""
    pts = plotted(curve(records, dataset, key, "macs"))
    for (x0, y0, _), (x1, y1, _) in zip(pts, pts[1:]):
        if x0 <= target <= x1 and x1 > x0:
            t = (math.log(target) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return math.exp((1 - t) * math.log(y0) + t * math.log(y1))
    return next((y for x, y, _ in pts if x == target), None)


def error_at_cost_cell(records, dataset: str, key: str, target: float) -> str:
    """The interpolated error, or "≤ e" when the target lies beyond the entry's costliest (non-exact) point:
    e is its error at that lower cost, which more budget does not raise in these sweeps."""
    value = error_at_cost(records, dataset, key, target)
    if value is not None:
        return f"{value:.3f}"
    below = [(x, y) for x, y, _ in plotted(curve(records, dataset, key, "macs")) if x < target]
    return f"≤ {max(below)[1]:.3f}" if below else "—"


def equal_cost_table(records, dataset: str, lines, anchor: str = "nystrom", anchor_budgets=(64, 128)) -> str:
    """Every entry's error at the multiply-adds the anchor method (Nystromformer) spends at its budgets."""
    targets = []
    for b in anchor_budgets:
        rec = next((r for r in records if r["dataset"] == dataset and r["entry"] == anchor and r["budget"] == b), None)
        if rec is not None:
            targets.append((b, rec["macs"] / rec["n_q"]))
    rows = []
    for e in lines:
        rows.append([e.label] + [error_at_cost_cell(records, dataset, e.key, t) for _, t in targets])
    header = ["method \\ at the cost of"] + [f"{METHODS[anchor].label} {b} ({t / 1e3:.1f}k)" for b, t in targets]
    return markdown_table(header, rows)


def front_table(records, dataset: str, lines) -> str:
    """The Pareto front (error against multiply-adds per query) of one data set, cheapest first."""
    points = [(x, y, b, e.label) for e in lines for x, y, b in curve(records, dataset, e.key, "macs")]
    rows = [[label, b, f"{x / 1e3:.1f}k", f"{y:.3f}"] for x, y, b, label in pareto_front(points)]
    return markdown_table(["on the front", "budget", "multiply-adds per query", "rel. spectral error"], rows)


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
          "#17becf", "#000080", "#b8860b", "#00ced1", "#ff1493"]
# Points at the exact limit (a budget that covers every key) have errors at rounding level; on a log axis they
# would stretch the plot over fifteen decades, so the error-against-cost plots leave them out (the tables keep them).
EXACT_LIMIT_ERROR = 1e-9


def mean_error(acc, dataset: str, key: str, budget, metric: str = "rel") -> float:
    return mean_sd([r[metric] for r in acc if r["dataset"] == dataset and r["entry"] == key
                    and r["budget"] == budget])[0]


def curve(acc, dataset: str, key: str, x_field: str) -> list[tuple[float, float, int]]:
    """(x, mean error, budget) per budget of one entry, x = multiply-adds per query or ms (seed-0 call)."""
    pts = []
    for r in acc:
        if r["dataset"] == dataset and r["entry"] == key and r["seed"] == 0 and x_field in r:
            x = r["macs"] / r["n_q"] if x_field == "macs" else 1e3 * r["seconds"]
            pts.append((x, mean_error(acc, dataset, key, r["budget"]), r["budget"]))
    return sorted(pts)


def plotted(pts: list[tuple]) -> list[tuple]:
    """The points of a curve worth a log axis (exact-limit points left out)."""
    return [p for p in pts if p[1] > EXACT_LIMIT_ERROR]


def pareto_front(points: list[tuple]) -> list[tuple]:
    """The points no other point beats in both cost and error, by increasing cost: (x, error, ...) tuples."""
    front, best = [], math.inf
    for pt in sorted(points):
        if pt[1] < best:
            front.append(pt)
            best = pt[1]
    return front


def plot_budget(path: Path, acc, cfg, lines, datasets, color) -> Path:
    """Error versus budget, both error forms, one column per data set."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    names = [ds.name for ds in datasets]
    fig = make_subplots(rows=2, cols=len(names), subplot_titles=names + [""] * len(names), shared_xaxes=True,
                        vertical_spacing=0.08)
    for row, metric in ((1, "rel"), (2, "theory")):
        for col, ds in enumerate(datasets, 1):
            budgets = budgets_for(cfg, ds)
            for e in lines:
                stats = [mean_sd([r[metric] for r in acc if r["dataset"] == ds.name and r["entry"] == e.key
                                  and r["budget"] == b]) for b in budgets]
                fig.add_trace(go.Scatter(x=list(budgets), y=[st[0] for st in stats], name=e.label, legendgroup=e.key,
                                         showlegend=(row == 1 and col == 1), line=dict(color=color[e.key]),
                                         error_y=dict(type="data", array=[st[1] for st in stats], visible=True),
                                         mode="lines+markers"), row=row, col=col)
            fig.update_xaxes(type="log", title_text="budget (key columns per query)" if row == 2 else None,
                             row=row, col=col)
            fig.update_yaxes(type="log", row=row, col=col,
                             title_text=("‖O~−O‖/‖O‖" if row == 1 else "‖O~−O‖/(‖D⁻¹A‖‖V‖)") if col == 1 else None)
    fig.update_layout(title="Error versus budget (mean ± sd over seeds)", height=750, width=max(700, 380 * len(names)))
    fig.write_html(path, include_plotlyjs="directory")
    return path


def plot_against(path: Path, acc, lines_per_ds, color, x_field: str) -> Path:
    """Error versus multiply-adds per query (with the Pareto front) or versus ms per call, log axes, one
    column per data set.  lines_per_ds: [(dataset name, entries)]."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    x_title = "multiply-adds per query" if x_field == "macs" else "ms per call"
    fig = make_subplots(rows=1, cols=len(lines_per_ds), subplot_titles=[n for n, _ in lines_per_ds])
    shown = set()
    for col, (name, lines) in enumerate(lines_per_ds, 1):
        everyone = []
        for e in lines:
            pts = plotted(curve(acc, name, e.key, x_field))
            everyone += [(x, y, b, e.label) for x, y, b in pts]
            fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], text=[f"budget {p[2]}" for p in pts],
                                     name=e.label, legendgroup=e.key, showlegend=e.key not in shown,
                                     line=dict(color=color[e.key]), mode="lines+markers"), row=1, col=col)
            shown.add(e.key)
        if x_field == "macs" and everyone:
            front = pareto_front(everyone)
            fig.add_trace(go.Scatter(x=[p[0] for p in front], y=[p[1] for p in front], name="Pareto front",
                                     text=[f"{p[3]}, budget {p[2]}" for p in front], legendgroup="front",
                                     showlegend=col == 1, line=dict(color="black", dash="dot", shape="hv"),
                                     mode="lines"), row=1, col=col)
        ex = [r for r in acc if r["dataset"] == name and r["entry"] == "sdpa"]
        if ex:
            x = ex[0]["macs"] / ex[0]["n_q"] if x_field == "macs" else 1e3 * ex[0]["seconds"]
            fig.add_vline(x=x, line_dash="dash", annotation_text="exact", row=1, col=col)
        fig.update_xaxes(type="log", title_text=x_title, row=1, col=col)
        fig.update_yaxes(type="log", title_text="‖O~−O‖/‖O‖" if col == 1 else None, row=1, col=col)
    what = "multiply-adds: the Pareto front" if x_field == "macs" else "time"
    fig.update_layout(title=f"Error versus {what} (lower left is better; exact-limit points left out)", height=560,
                      width=max(700, 380 * len(lines_per_ds)),
                      legend=dict(orientation="h", yanchor="top", y=-0.2, xanchor="left", x=0))
    fig.write_html(path, include_plotlyjs="directory")
    return path


def plot_speed(path: Path, speed, lines, color, title: str) -> Path:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=["time / SDPA time", "peak memory (MiB)"])
    for key, label in [("sdpa", "torch SDPA (exact)")] + [(e.key, e.label) for e in lines]:
        pts = [r for r in speed if r["entry"] == key]
        c = "black" if key == "sdpa" else color[key]
        fig.add_trace(go.Scatter(x=[r["n"] for r in pts], y=[r["ratio"] for r in pts], name=label, legendgroup=key,
                                 line=dict(color=c), mode="lines+markers"), row=1, col=1)
        fig.add_trace(go.Scatter(x=[r["n"] for r in pts], y=[r["memory_mib"] for r in pts], name=label,
                                 legendgroup=key, showlegend=False, line=dict(color=c), mode="lines+markers"), row=1, col=2)
    for col in (1, 2):
        fig.update_xaxes(type="log", title_text="N (tokens)", row=1, col=col)
        fig.update_yaxes(type="log", row=1, col=col)
    fig.update_layout(title=title, height=450, width=1100)
    fig.write_html(path, include_plotlyjs="directory")
    return path


def write_plots(plot_dir: Path, res: dict, cfg, lines, datasets, causal_ds) -> list[Path]:
    """Every plot of the run (offline plotly pages; plotly.min.js is written next to them)."""
    plot_dir.mkdir(parents=True, exist_ok=True)
    color = {e.key: COLORS[i % len(COLORS)] for i, e in enumerate(lines)}
    acc = res["accuracy"] + res["causal"]
    per_ds = [(ds.name, lines) for ds in datasets] + [(ds.name, causal_entries()) for ds in causal_ds]
    written = []
    if res["accuracy"] and datasets:
        written.append(plot_budget(plot_dir / "peers_accuracy.html", acc, cfg, lines, datasets, color))
        written.append(plot_against(plot_dir / "peers_pareto.html", acc, per_ds, color, "macs"))
        written.append(plot_against(plot_dir / "peers_time.html", acc, per_ds, color, "seconds"))
    tail = f"(float32, {cfg.speed_heads} heads, D = {cfg.speed_dim}, budget {cfg.speed_budget})"
    if res["speed"]:
        written.append(plot_speed(plot_dir / "peers_speed.html", res["speed"], lines, color,
                                  f"Speed and memory versus N {tail}"))
    if res["causal_speed"]:
        written.append(plot_speed(plot_dir / "peers_causal_speed.html", res["causal_speed"], causal_entries(), color,
                                  f"Causal speed and memory versus N, against causal SDPA {tail}"))
    return written


def save_png(html: Path, png: Path, width: int = 1600, height: int = 520) -> Path | None:
    """A PNG of an offline plotly page, taken with Playwright and /usr/bin/chromium (None where either is missing)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("[peers] playwright missing: no PNG", file=sys.stderr)
        return None
    if not Path(CHROMIUM).exists():
        print(f"[peers] {CHROMIUM} missing: no PNG", file=sys.stderr)
        return None
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": width, "height": height})
        page.goto(html.resolve().as_uri())
        page.wait_for_selector(".plotly .main-svg", timeout=60_000)
        page.wait_for_timeout(500)  # let the traces finish drawing
        png.parent.mkdir(parents=True, exist_ok=True)
        page.locator(".plotly").first.screenshot(path=str(png))
        browser.close()
    return png


# --------------------------------------------------------------------------- report
READING_NOTES = """How to read the tables:

- HyperAttention and KDEformer with `sampling="uniform"` are one estimator (sortLSH blocks plus uniform columns,
  block keys left out of the samples; a shared-shift sum and a log-sum-exp merge are algebraically equal). The
  core now draws from its own addressed streams and cuts blocks by its own rule, so the two rows agree within
  seed noise rather than draw for draw: a cross-check of two independent implementations.
- Multiply-adds per query is the honest cost axis: Nyströmformer's m x m pseudo-inverse (6 iterations of four
  m x m products) costs more than its landmark products once m^2 approaches N, ScatterBrain pays its LSH support
  and its features, Thinformer pays its kernel-halving rounds (n' b_0 kernel entries per round) before its
  attention, KDEformer's column_norm pays its estimation rows. Read `err @ cost` and the front, not the budget.
- Thinformer keeps one subset for all queries. Its subset balances the kernel on (key, value) pairs, which helps
  where attention is spread out; a query that needs a particular key loses it with probability 1 - m/n.
- Nyströmformer's landmarks are means of contiguous token segments. The GloVe rows come in random word order,
  so every segment mean is close to the global mean and its error hardly moves with the budget; on text
  (MiniLM), where neighbouring tokens are related, it is the strongest peer. Its m x m pseudo-inverse costs
  O(m^3) per head, which dominates its time at large budgets.
- Performer's positive features have a variance that grows like exp(|q' + k'|^2); with Q = K (GloVe) the
  diagonal term has k = q, so the Monte-Carlo error falls very slowly with the number of features and the
  output stays close to the mean of V, which near-uniform attention rewards and sharp attention punishes.
- The machine is shared (several agents on 2 cores): timings use one thread and are noisy; read the ratios to
  SDPA, measured in the same run, rather than the absolute times."""


INTRO = (
    "Every method of `kdeformer.methods` (read from its registry) through `approximate(method, q, k, v, "
    "budget=...)`; `budget` = key columns (features, landmarks, kept pairs) each query pays for. Splits: KDEformer "
    "and HyperAttention 1/3 exact block + 2/3 samples (the authors' m/2 + m); ScatterBrain 1/2 LSH support + 1/2 "
    "Performer features; Reformer 2 rounds × 2 chunks of budget/4; Performer `budget` features; Nyströmformer "
    "`budget` landmarks (capped at N); uniform `budget` columns; Thinformer a kernel-halving subset of `budget` "
    "pairs rounded down to a power of two. Because a budget hides what a method pays outside it, every point also "
    "carries `kdeformer.multiply_adds(method, Nq, Nk, D, Dv, budget=...)` per head, shown per query (`err @ "
    "cost`), and the Pareto front is drawn against it. Accuracy in float64; errors are head-averaged, then mean ± "
    "sd over {seeds} seed(s) (deterministic methods: one run). Normaliser error = mean_i |D~_i/D_i − 1| "
    "(Nyströmformer estimates no normaliser). Reformer's normaliser only sees the keys it finds, so it is low by "
    "construction.")


def describe(ds: Dataset) -> str:
    heads = math.prod(ds.q.shape[:-2])
    if ds.name.startswith("minilm"):
        text = f"all-MiniLM-L6-v2, {heads} heads, {ds.q.shape[-2]} tokens of the default text"
        return text + (" under a causal mask (an encoder's vectors: labelled causal)" if ds.is_causal else "")
    return f"{ds.name}, N = {ds.q.shape[-2]}, D = {ds.q.shape[-1]}, scale {ds.scale:.3g}"


def dataset_sections(cfg: Config, acc, ds: Dataset, lines, first: bool) -> list[str]:
    """Error tables (three forms), error against multiply-adds, the front, and for the first data set times."""
    budgets = budgets_for(cfg, ds)
    parts = [f"### {ds.name}: relative spectral error ‖O~−O‖₂/‖O‖₂\n\n_{describe(ds)}_",
             accuracy_table(acc, ds.name, "rel", budgets, lines),
             f"### {ds.name}: error against multiply-adds per query (`err @ cost`)", cost_table(acc, ds.name, budgets, lines)]
    if any(r["dataset"] == ds.name and r["entry"] == "nystrom" and r["budget"] in (64, 128) for r in acc):
        parts += [f"### {ds.name}: error at Nyströmformer's cost (log-log interpolation between measured budgets; "
                  "≤ e: the target lies beyond the method's costliest measured point, whose error is e; — below its "
                  "cheapest)", equal_cost_table(acc, ds.name, lines)]
    parts += [f"### {ds.name}: the Pareto front (error against multiply-adds)", front_table(acc, ds.name, lines),
              f"### {ds.name}: theory form ‖O~−O‖₂/(‖D⁻¹A‖₂‖V‖₂)", accuracy_table(acc, ds.name, "theory", budgets, lines),
              f"### {ds.name}: normaliser error mean |D~/D − 1|", accuracy_table(acc, ds.name, "normalizer", budgets, lines)]
    if first:
        parts += [f"### {ds.name}: time per call (ms, seed 0, no trace; float64, all heads in one call)",
                  time_table(acc, ds.name, budgets, lines)]
    return parts


def speed_section(cfg: Config, speed, lines, ns, causal: bool) -> list[str]:
    what = "Causal speed and memory, against causal SDPA" if causal else "Speed and memory"
    reps = (f"Up to N = 4096: median of {cfg.speed_reps} calls after a warm-up call; beyond: one call."
            if cfg.speed_reps > 1 else "One call per cell (no warm-up).")
    return [f"### {what} (float32, 1 × {cfg.speed_heads} heads, D = {cfg.speed_dim}, budget {cfg.speed_budget}, random "
            "inputs)\n\nCells: time as a multiple of torch SDPA's time in the same run (SDPA row: seconds), and peak "
            "memory added by the call. CPU memory = rise of the process's peak resident set (VmHWM reset via "
            "/proc/self/clear_refs after malloc_trim), so it counts every allocation torch makes, rounded to pages; it "
            "cannot see memory reused from the allocator's cache without touching new pages. " + reps,
            speed_table(speed, ns, lines)]


def report(cfg: Config, res: dict, lines, datasets, plots, seconds_total: float) -> str:
    acc = res["accuracy"]
    parts = [INTRO.format(seeds=cfg.seeds)]
    if datasets and acc:
        parts += ["### Summary: who wins where (mean relative spectral error)", summary_table(acc, datasets, cfg, lines),
                  READING_NOTES]
    for i, ds in enumerate(datasets):
        parts += dataset_sections(cfg, acc, ds, lines, i == 0)
    if res["authors"]:
        parts += [f"### Authors' convention on {res['authors'][0]['dataset']}: relative spectral error at m\n\n"
                  "KDEformer and HyperAttention: block m/2 + m samples (1.5 m columns); Performer m features; "
                  "Nyströmformer m landmarks; uniform m columns. Anchor rows (full run only): the authors' code "
                  "measured earlier on this machine on the same 72 heads, float64 (NOTES.md).",
                  authors_table(res["authors"], cfg.authors_m)]
    if res["speed"]:
        parts += speed_section(cfg, res["speed"], lines, cfg.speed_ns, causal=False)
    if plots:
        parts.append("Plots: " + ", ".join(f"[{p.name}](plots/{p.name})" for p in plots) + " (plotly, offline: "
                     "plotly.min.js sits next to them); the README's picture of the front is docs/pareto.png.")
    parts.append(f"Run time: {seconds_total / 60:.1f} min (`python -m benchmarks.peers{' --quick' if cfg is QUICK else ''}`)."
                 + skipped_note(res))
    return "\n\n".join(parts)


def skipped_note(res: dict) -> str:
    if not res.get("skipped"):
        return ""
    return (" **Reduced run:** the wall-clock budget (`--minutes`) ran out, so these phases skipped their last jobs "
            "(the largest budgets; '—' in the tables): " + ", ".join(f"{k} {v}" for k, v in res["skipped"].items()) + ".")


CAUSAL_INTRO = (
    "Every method with `METHODS[m].supports_causal` (query i sees keys j <= Nk − Nq + i, bottom-right aligned) "
    "against exact causal attention, on MiniLM's Q/K/V with a causal mask laid over them: the vectors come from an "
    "encoder (the project ships no decoder weights), so this measures the estimators under the mask, not a decoder's "
    "attention. Nyströmformer, ScatterBrain and Thinformer have no causal form and refuse `is_causal=True`. "
    "Causal HyperAttention pays its block and samples once per level of its recursive split, so its cost exceeds "
    "the budget; the multiply-adds count it. Errors: mean ± sd over {seeds} seed(s).")


def causal_report(cfg: Config, res: dict, causal_ds) -> str:
    lines = causal_entries()
    parts = [CAUSAL_INTRO.format(seeds=cfg.seeds)]
    for ds in causal_ds:
        budgets = budgets_for(cfg, ds)
        parts += [f"### {ds.name}: relative spectral error\n\n_{describe(ds)}_",
                  accuracy_table(res["causal"], ds.name, "rel", budgets, lines),
                  f"### {ds.name}: error against multiply-adds per query (`err @ cost`; exact counts the lower "
                  "triangle only)", cost_table(res["causal"], ds.name, budgets, lines),
                  f"### {ds.name}: the Pareto front", front_table(res["causal"], ds.name, lines)]
    if res["causal_speed"]:
        parts += speed_section(cfg, res["causal_speed"], lines, cfg.causal_speed_ns, causal=True)
    note = skipped_note(res)
    return "\n\n".join(parts + ([note.strip()] if note else []))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="about one minute: small sweeps")
    parser.add_argument("--tiny", action="store_true", help="seconds: synthetic data only (used by the tests)")
    parser.add_argument("--results", type=Path, default=None, help="RESULTS.md to write (default: benchmarks/"
                        "RESULTS.md for a full run, none for --quick/--tiny)")
    parser.add_argument("--plots", type=Path, default=None, help="folder for the HTML plots")
    parser.add_argument("--json", type=Path, default=None, help="also dump the raw records here")
    parser.add_argument("--png", type=Path, default=None, help="PNG of the Pareto page (default: docs/pareto.png for "
                        "a full run, none otherwise); needs playwright and /usr/bin/chromium")
    parser.add_argument("--no-speed", action="store_true", help="skip the speed and memory sweep")
    parser.add_argument("--minutes", type=float, default=None, help="wall-clock budget: each phase gets its share "
                        "and skips the jobs left when its time is up (the report lists what was skipped)")
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
    causal_ds = causal_datasets(cfg, datasets)
    device = torch.device(args.device)
    clock = Clock(args.minutes)
    res = {}
    for phase, key, job in (
            ("accuracy", "accuracy", lambda: run_accuracy(cfg, datasets, lines, clock)),
            ("authors", "authors", lambda: authors_convention(cfg, datasets, clock)),
            ("causal", "causal", lambda: run_accuracy(cfg, causal_ds, causal_entries(), clock)),
            ("speed", "speed", lambda: [] if args.no_speed else run_speed(cfg, lines, device, clock=clock)),
            ("causal speed", "causal_speed",
             lambda: [] if args.no_speed else run_speed(cfg, causal_entries(), device, is_causal=True, clock=clock))):
        clock.start(phase)
        res[key] = job()
    res["skipped"] = clock.skipped
    plots = write_plots(plot_dir, res, cfg, lines, datasets, causal_ds)
    png = args.png if args.png is not None else (REPO / "docs" / "pareto.png" if full else None)
    if png is not None and (plot_dir / "peers_pareto.html").exists():
        save_png(plot_dir / "peers_pareto.html", png, width=max(900, 380 * (len(datasets) + len(causal_ds))), height=600)
    body = report(cfg, res, lines, datasets, plots, time.perf_counter() - t0)
    causal_body = causal_report(cfg, res, causal_ds)
    if args.json is not None or full:
        path = args.json if args.json is not None else plot_dir / "peers_results.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=1, default=str))
    if results is not None:
        write_section("peers", "Peers: accuracy, cost, speed and memory", body, path=results)
        write_section("peers-causal", "Peers under a causal mask: accuracy, cost and speed", causal_body, path=results)
        print(f"wrote sections 'peers' and 'peers-causal' of {results}")
    else:
        print(body + "\n\n" + causal_body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
