"""What the explorer shows, computed without any UI: the source adapter, the settings, and cached results.

Nothing here imports ipywidgets or plotly, so every number a figure draws can be checked in plain tests.

Shape legend: L layers, H heads, N tokens (Nq queries, Nk keys), D head dim, Dv value dim, s samples.
"""
from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

import torch

import kdeformer
from kdeformer import metrics
from kdeformer.defaults import AUTHORS_SAMPLING, KDE_DEFAULTS
from kdeformer._cache import LRU  # the project's one bounded cache
from kdeformer.sources import AttentionSource
from kdeformer._checks import check_choice, check_index, check_int, check_positive_int
from kdeformer.core import BUCKET_ORDERS, MAX_PROJS, SAMPLINGS

# Up to this many keys the exact softmax matrix of a head is kept in memory (2048^2 float32 = 16 MiB).
MATERIALIZE_MAX = 2048
# Rows of logits computed at once when a matrix is streamed (bounded memory for any N).
CHUNK_ENTRIES = 1 << 22


# --------------------------------------------------------------------------- optional peers
def available_methods() -> dict[str, str]:
    """name -> label of the methods the explorer can run: the peers when `kdeformer.methods` exists."""
    try:
        from kdeformer.methods import METHODS  # helper package; optional
    except Exception:  # missing or broken: degrade to what the core offers
        return {"kdeformer": "KDEformer", "exact": "Exact"}
    methods = {"kdeformer": "KDEformer", "exact": "Exact"}
    for name, info in METHODS.items():
        methods.setdefault(name, getattr(info, "label", name))
    return methods


def sampling_choices() -> tuple[str, ...]:
    """The core's sampling modes (read at run time: the core may gain modes)."""
    import kdeformer.core as core

    return tuple(getattr(core, "SAMPLINGS", SAMPLINGS))


# --------------------------------------------------------------------------- sources
@dataclass(repr=False)
class TensorSource(AttentionSource):
    """An AttentionSource whose keys may outnumber or undercount its queries (cross-attention).

    q (L, H, Nq, D), k (L, H, Nk, D), v (L, H, Nk, Dv); tokens label the Nq queries; key_mask (Nk,).
    """

    def __post_init__(self):
        q, k, v = self.q, self.k, self.v
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3] \
                or v.shape[:3] != k.shape[:3]:
            shapes = [tuple(t.shape) for t in (q, k, v)]
            raise ValueError(f"q, k, v must be (L, H, Nq, D), (L, H, Nk, D), (L, H, Nk, Dv); got {shapes}")
        if len(self.tokens) != q.shape[2]:
            raise ValueError(f"tokens must have Nq={q.shape[2]} labels, got {len(self.tokens)}")
        if self.key_mask is not None and tuple(self.key_mask.shape) != (k.shape[2],):
            raise ValueError(f"key_mask must be (Nk,) = ({k.shape[2]},), got {tuple(self.key_mask.shape)}")


ToySource = TensorSource  # the old name (it wraps any user tensors, not only toys)


def toy_source(n: int = 96, d: int = 16, layers: int = 2, heads: int = 2, clusters: int = 6, seed: int = 0) -> TensorSource:
    """Clustered synthetic queries/keys (a few directions plus noise) with one 'sink' key per head.

    Sharp enough that hashing matters, small enough for fast tests.
    """
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(layers, heads, clusters, d, generator=g)  # (L, H, c, D)
    assign = torch.randint(0, clusters, (layers, heads, n), generator=g)  # (L, H, N)
    base = torch.gather(centers, 2, assign.unsqueeze(-1).expand(-1, -1, -1, d))  # (L, H, N, D)
    q = 2.0 * base + 0.5 * torch.randn(layers, heads, n, d, generator=g)  # (L, H, N, D)
    k = 2.0 * base + 0.5 * torch.randn(layers, heads, n, d, generator=g)  # (L, H, N, D)
    k[:, :, 0] = 3.0 * q.mean(2)  # a sink key every query likes
    v = torch.randn(layers, heads, n, d, generator=g)  # (L, H, N, D)
    tokens = [f"tok{i}" for i in range(n)]
    return TensorSource("toy", " ".join(tokens), tokens, q, k, v, 1.0 / math.sqrt(d), None, {"seed": seed})


def _as_lhnd(x: torch.Tensor, name: str) -> torch.Tensor:
    """(N, D) / (H, N, D) / (L, H, N, D) -> (L, H, N, D) float32."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"source {name} must be a torch.Tensor, got {type(x).__name__}")
    if not 2 <= x.dim() <= 4:
        raise ValueError(f"source {name} must have shape (N, D), (H, N, D) or (L, H, N, D), got {tuple(x.shape)}")
    while x.dim() < 4:
        x = x.unsqueeze(0)
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"source {name} must be a floating tensor, got {x.dtype}")
    return x.detach().to("cpu", torch.float32)


def source_from_tensors(q, k, v, *, scale=None, tokens=None, key_mask=None, name="tensors") -> TensorSource:
    """Wrap the user's own (q, k, v) tensors: each (N, D), (H, N, D) or (L, H, N, D)."""
    q, k, v = _as_lhnd(q, "q"), _as_lhnd(k, "k"), _as_lhnd(v, "v")
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"source (q, k, v) shapes do not fit together: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)} "
            "(expected (L, H, Nq, D), (L, H, Nk, D), (L, H, Nk, Dv))"
        )
    n = q.shape[2]
    if tokens is None:
        tokens = [f"t{i}" for i in range(n)]
    if len(tokens) != n:
        raise ValueError(f"tokens must have one string per query ({n}), got {len(tokens)}")
    kdeformer.exact_attention(q[0, 0], k[0, 0], v[0, 0], scale=scale, key_mask=key_mask)  # validates early
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return TensorSource(name, "", list(tokens), q, k, v, scale, key_mask, {})


def load_text_source(text: str | None = None, like=None, num_layers: int | None = None):
    """Model attention for `text` (None: the bundled text), via kdeformer.sources (raises if unavailable).

    like: a source made by `sources.from_pretrained` (its meta holds the model path): re-run that model;
    otherwise MiniLM. num_layers: only the first layers (the model's forward stops after them).
    """
    from kdeformer import sources  # (transformers itself is imported only when a model is loaded)

    if text is not None and not text.strip():
        raise ValueError("text must contain at least one word, got an empty text")
    meta = getattr(like, "meta", None) or {}
    if like is not None and meta.get("path") and "minilm" not in str(getattr(like, "name", "")).lower():
        return sources.from_pretrained(meta["path"], text, meta.get("max_tokens"), num_layers=num_layers)
    max_tokens = meta.get("max_tokens") or 512  # keep the source's own token limit
    return sources.minilm(text, max_tokens=int(max_tokens), num_layers=num_layers)


def text_capable(src) -> bool:
    """Whether the source came from a model that can be re-run on a new text."""
    return bool((getattr(src, "meta", None) or {}).get("path"))


def resolve_source(source):
    """Turn the explorer's `source` argument into an AttentionSource-like object.

    None -> MiniLM on the bundled text; str -> MiniLM on that text; (q, k, v) tuple -> wrapped tensors;
    anything with q, k, v, tokens and scale -> used as is.
    """
    if source is None or isinstance(source, str):
        return load_text_source(source)
    if isinstance(source, (tuple, list)):
        if len(source) != 3:
            raise ValueError(f"source tuple must be (q, k, v), got {len(source)} items")
        return source_from_tensors(*source)
    missing = [a for a in ("q", "k", "v", "tokens", "scale") if not hasattr(source, a)]
    if missing:
        raise ValueError(
            f"source must be None, a text, a (q, k, v) tuple or an AttentionSource; {type(source).__name__} "
            f"lacks {missing}"
        )
    return source


def key_tokens(src) -> list:
    """Token strings of the keys: the source's tokens, or generic names for cross-attention keys."""
    nk = src.k.shape[2]
    return list(src.tokens) if len(src.tokens) == nk else [f"k{j}" for j in range(nk)]


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Settings:
    """Everything that changes what is computed (display options are not here); defaults from
    `kdeformer.defaults.KDE_DEFAULTS`."""

    layer: int = 0
    head: int = 0
    method: str = "kdeformer"
    bucket_size: int = KDE_DEFAULTS.bucket_size
    sample_size: int = KDE_DEFAULTS.sample_size
    num_projs: int = KDE_DEFAULTS.num_projs
    sampling: str = KDE_DEFAULTS.sampling
    bucket_order: str = KDE_DEFAULTS.bucket_order
    seed: int = 0

    @property
    def budget(self) -> int:
        """Key columns each query pays for: the block plus the samples."""
        return self.bucket_size + self.sample_size

    def key(self, fields) -> tuple:
        """The values of `fields` (a cache key for whatever depends on exactly those settings)."""
        return tuple(getattr(self, f) for f in fields)


# What each result depends on, said once. The hash codes, the sort orders and the blocks depend on
# BLOCK_KEYS; the KDEformer trace (blocks, samples, heavy columns) on KDE_KEYS; the shown method's output
# on every field.
BLOCK_KEYS = ("layer", "head", "num_projs", "bucket_order", "seed", "bucket_size")
KDE_KEYS = BLOCK_KEYS + ("sample_size", "sampling")
SAMPLING_LABELS = {KDE_DEFAULTS.sampling: f"{KDE_DEFAULTS.sampling} (best, default)",
                   AUTHORS_SAMPLING: f"{AUTHORS_SAMPLING} (the authors')"}


STEP_FIELDS = ("layer", "head", "bucket_size", "sample_size", "num_projs", "seed")  # the integer sliders


def step_ahead(prev: Settings | None, s: Settings) -> Settings | None:
    """The setting one more step along the last move (a held arrow key, a drag): when exactly one integer
    slider (STEP_FIELDS) and nothing else changed from `prev` to `s`, that field moved once more by the
    same amount; None otherwise (what it gives may be out of range: check_settings says)."""
    if prev is None:
        return None
    moved = [f for f in s.__dataclass_fields__ if getattr(prev, f) != getattr(s, f)]
    if len(moved) != 1 or moved[0] not in STEP_FIELDS:
        return None
    name = moved[0]
    return replace(s, **{name: 2 * getattr(s, name) - getattr(prev, name)})


def check_settings(s: Settings, engine: Engine) -> Settings:
    """ValueError naming the first bad field and its allowed range (the engine's source's sizes)."""
    check_index("layer", s.layer, engine.num_layers)
    check_index("head", s.head, engine.src.q.shape[1])
    check_choice("method", s.method, tuple(engine.methods))
    check_positive_int("bucket_size", s.bucket_size)
    check_positive_int("sample_size", s.sample_size)
    check_positive_int("num_projs", s.num_projs, maximum=MAX_PROJS)
    check_choice("sampling", s.sampling, sampling_choices())
    check_choice("bucket_order", s.bucket_order, BUCKET_ORDERS)
    check_int("seed", s.seed, minimum=0, maximum=2**63 - 1)
    return s


def call_code(s: Settings, scale: float | None = None) -> str:
    """The call that reproduces the current setting (for "copy as code"): `kde_attention(...)` for
    KDEformer, `exact_attention(...)` or `approximate(method, ..., budget=...)` for the others."""
    scale_txt = "" if scale is None else f"    scale={scale!r},\n"
    if s.method == "exact":
        return ("from kdeformer import exact_attention\n\n"
                f"# q, k, v: layer {s.layer}, head {s.head}, each (N, D)\n"
                f"out = exact_attention(\n    q, k, v,\n{scale_txt})\n")
    if s.method != "kdeformer":
        return ("import torch\n"
                "from kdeformer.methods import approximate\n\n"
                f"# q, k, v: layer {s.layer}, head {s.head}, each (N, D); budget = bucket_size + sample_size\n"
                "out = approximate(\n"
                f"    {s.method!r}, q, k, v,\n"
                f"    budget={s.budget},\n"
                f"{scale_txt}"
                f"    generator=torch.Generator().manual_seed({s.seed}),\n"
                ")\n")
    return (
        "import torch\n"
        "from kdeformer import kde_attention\n\n"
        f"# q, k, v: layer {s.layer}, head {s.head}, each (N, D)\n"
        "out, trace = kde_attention(\n"
        "    q, k, v,\n"
        f"    bucket_size={s.bucket_size},\n"
        f"    sample_size={s.sample_size},\n"
        f"    num_projs={s.num_projs},\n"
        f"{scale_txt}"
        f"    sampling={s.sampling!r},\n"
        f"    bucket_order={s.bucket_order!r},\n"
        f"    generator=torch.Generator().manual_seed({s.seed}),\n"
        "    return_trace=True,\n"
        ")\n"
    )


# --------------------------------------------------------------------------- results
@dataclass
class ExactResult:
    """Exact attention of one head."""

    out: torch.Tensor  # (Nq, Dv)
    log_d: torch.Tensor  # (Nq,)
    matrix: torch.Tensor | None  # (Nq, Nk) D^-1 A, when Nk <= MATERIALIZE_MAX
    matrix_norm: Future | float | None  # ||D^-1 A||_2 (None for large N), or its computation under way
    value_norm: float  # ||V||_2
    out_norm: float = float("nan")  # ||O||_2

    @property
    def attention_norm(self) -> float | None:
        """||D^-1 A||_2 (None for large N); waits for it when it is still being computed."""
        return self.matrix_norm.result() if isinstance(self.matrix_norm, Future) else self.matrix_norm


# ||D^-1 A||_2 of a head is one 512 x 512 symmetric eigenvalue problem (~20 ms, which a second torch
# thread hardly speeds up): it runs on a thread of its own while the caller computes the runs it is
# compared with.
_NORM_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kde-exact-norm")


_BACKGROUND = threading.local()


@contextlib.contextmanager
def background_work():
    """Inside the block, this thread computes a head's ||D^-1 A||_2 itself: work done ahead of time (the
    explorer's warming thread) must never queue on _NORM_THREAD ahead of an update's own."""
    before = getattr(_BACKGROUND, "on", False)
    _BACKGROUND.on = True
    try:
        yield
    finally:
        _BACKGROUND.on = before


def spectral_norm_meanwhile(matrix: torch.Tensor) -> Future | float:
    """float(metrics.spectral_norm(matrix)) computed on _NORM_THREAD with the caller's torch thread count
    (the same bits as computing it here); inside background_work(), the float, computed here."""
    if getattr(_BACKGROUND, "on", False):
        return float(metrics.spectral_norm(matrix))
    threads = torch.get_num_threads()

    def job() -> float:
        torch.set_num_threads(threads)  # (a per-thread setting)
        return float(metrics.spectral_norm(matrix))

    return _NORM_THREAD.submit(job)


@dataclass
class ApproxResult:
    """One method's output for one setting, with what the figures need of it."""

    settings: Settings
    out: torch.Tensor  # (Nq, Dv)
    kde_trace: object  # KDETrace of the KDEformer run with the same settings (drives buckets/heavy/samples)
    log_d: torch.Tensor | None  # (Nq,) the method's normaliser estimate, when it has one
    matrix: torch.Tensor | None  # (Nq, Nk) the method's approximate softmax matrix, when defined and small


@dataclass
class ErrorSummary:
    """Errors of the current setting over a few seeds (seed, seed + 1, ...)."""

    spectral: list  # relative spectral error per seed
    theory: list  # ||O~ - O||_2 / (||D^-1 A||_2 ||V||_2) per seed (empty when not available)
    frobenius: float  # of the shown seed
    normalizer: float | None  # mean |D~/D - 1| of the shown seed

    @staticmethod
    def mean_sd(xs) -> tuple[float, float]:
        if not xs:
            return float("nan"), float("nan")
        t = torch.tensor(xs, dtype=torch.float64)
        return float(t.mean()), float(t.std(unbiased=True)) if len(xs) > 1 else 0.0


@dataclass
class Curve:
    """Error versus budget around the current setting (bucket and samples scaled together)."""

    budgets: list  # bucket + samples per point
    mean: list
    sd: list
    current: int  # index of the current setting
    label: str


def chunk_rows(rows: torch.Tensor, nk: int, multiple: int = 1):
    """Split `rows` into chunks of about CHUNK_ENTRIES entries of Nk columns (a multiple of `multiple` rows)."""
    step = max(multiple, (max(1, CHUNK_ENTRIES // max(1, nk)) // multiple) * multiple)
    for start in range(0, len(rows), step):
        yield rows[start : start + step]


def pca_2d(q: torch.Tensor, k: torch.Tensor):
    """2-D PCA of the row-normalised queries and keys together.

    Returns coords (Nq + Nk, 2), mean (D,), components (D, 2).
    """
    x = torch.cat([q, k], 0).double()  # (Nq + Nk, D)
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    mean = x.mean(0)  # (D,)
    _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)
    comps = vh[:2].mT  # (D, 2)
    if comps.shape[1] < 2:
        comps = torch.cat([comps, torch.zeros_like(comps)], 1)
    return (x - mean) @ comps, mean, comps


@dataclass(frozen=True)
class LayersToCome:
    """The layers an engine's source does not hold yet: make() returns the whole source (num_layers
    layers), whose first layers are those already held (a model's forward cut short, then run whole)."""

    num_layers: int
    make: Callable[[], AttentionSource]


class Engine:
    """Runs the core for one source, caching per head and per setting (bounded caches).

    seeds: how many seeds the error readout averages; curve_factors: scalings of (bucket, samples)
    at which the error-versus-budget curve is drawn; curve_seeds: seeds averaged per curve point;
    rest: the layers `src` does not hold yet (a new text's first layers are drawn while the others wait).
    Public: head, exact, exact_rows, run, output, errors, errors_of, measured_points, summary, curve, pca,
    exact_mask_rows, heavy_mass, memo, cost, neighbours, warm, prefetch, num_layers, layers_ready,
    complete, whole_source.
    """

    def __init__(self, src, *, seeds: int = 3, curve_factors=(0.25, 0.5, 1.0, 2.0, 4.0), curve_seeds: int = 1,
                 rest: LayersToCome | None = None):
        if rest is not None and rest.num_layers <= src.q.shape[0]:
            raise ValueError(f"rest.num_layers must be more than the {src.q.shape[0]} layers src holds, "
                             f"got {rest.num_layers}")
        self.src, self._rest = src, rest  # src: the first layers when rest is given, else the whole source
        self._completing = threading.Lock()
        self.rest_wanted = threading.Event()  # set once an update waits for the layers to come
        self.seeds = check_positive_int("seeds", seeds)
        self.curve_seeds = check_positive_int("curve_seeds", curve_seeds)
        self.curve_factors = tuple(curve_factors)
        self.methods = available_methods()
        self._heads, self._exact, self._runs = LRU(8), LRU(8), LRU(6)
        self._errors, self._summaries, self._curves = LRU(2048), LRU(64), LRU(64)
        self._memo, self._masks = LRU(64), LRU(8)

    # ---------------------------------------------------------------- data
    @property
    def num_layers(self) -> int:
        """The source's layers, including those still to come."""
        rest = self._rest
        return rest.num_layers if rest is not None else self.src.q.shape[0]

    @property
    def layers_ready(self) -> int:
        """Layers held now (the first ones); the others are captured by complete()."""
        return self.src.q.shape[0]

    def complete(self, wanted: bool = True) -> None:
        """Capture the layers still to come (an engine made with `rest`), once; threads asking meanwhile
        wait. The whole source must hold exactly the layers already used (else RuntimeError).
        wanted=False: a background guess, which returns at once when another capture is under way;
        otherwise `rest_wanted` is set first, which tells a background capture under way (pausable, see
        sources.stopping_when) to go on rather than give way."""
        if self._rest is None:
            return
        if wanted:
            self.rest_wanted.set()
        if not self._completing.acquire(blocking=wanted):
            return  # a guess while another capture of the rest is under way: that one will do
        try:
            rest = self._rest
            if rest is None:
                return
            whole, have = rest.make(), self.src
            same = (whole.q.shape[0] == rest.num_layers and whole.q.shape[1:] == have.q.shape[1:]
                    and all(torch.equal(a[: have.q.shape[0]], b) for a, b in ((whole.q, have.q), (whole.k, have.k),
                                                                             (whole.v, have.v))))
            if not same:
                raise RuntimeError("the whole source's first layers differ from the ones already shown")
            self.src, self._rest = whole, None
        finally:
            self._completing.release()

    def whole_source(self):
        """The source with every layer (completes it first when layers are still to come)."""
        self.complete()
        return self.src

    @property
    def key_mask(self):
        return getattr(self.src, "key_mask", None)

    @property
    def scale(self) -> float:
        return float(self.src.scale)

    @property
    def is_causal(self) -> bool:
        return bool(getattr(self.src, "is_causal", False))

    def memo(self, kind: str, key, make):
        """A bounded cache for derived data (pooled matrices, projections): make() runs once per key."""
        return self._memo.get_or((kind, key), make)

    def head(self, layer: int, head: int):
        """(q, k, v) of one head, each (N, D), float32, contiguous (a layer still to come is captured first)."""
        def make():
            if layer >= self.layers_ready:
                self.complete()
            return tuple(x[layer, head].to(torch.float32).contiguous() for x in (self.src.q, self.src.k, self.src.v))

        return self._heads.get_or((layer, head), make)

    def exact(self, layer: int, head: int) -> ExactResult:
        """Exact attention of one head, with ||D^-1 A||_2 (small N) and ||V||_2 (cached per head)."""
        def make():
            q, k, v = self.head(layer, head)
            out, tr = kdeformer.exact_attention(q, k, v, scale=self.scale, key_mask=self.key_mask,
                                                return_trace=True, **self._causal())
            matrix = tr.attention_matrix() if k.shape[0] <= MATERIALIZE_MAX else None  # (Nq, Nk)
            att_norm = spectral_norm_meanwhile(matrix) if matrix is not None else None  # (waited for by theory)
            return ExactResult(out, tr.log_normalizer, matrix, att_norm, float(metrics.spectral_norm(v)),
                               float(metrics.spectral_norm(out)))

        return self._exact.get_or((layer, head), make)

    def exact_rows(self, layer: int, head: int, rows: torch.Tensor) -> torch.Tensor:
        """Rows of the exact softmax matrix D^-1 A.  # (R, Nk); streamed from q, k when N is large."""
        ex = self.exact(layer, head)
        if ex.matrix is not None:
            return ex.matrix[rows]
        q, k, _ = self.head(layer, head)
        logits = self.scale * (q[rows] @ k.mT)  # (R, Nk)
        if self.key_mask is not None:
            logits = logits.masked_fill(~self.key_mask, float("-inf"))
        if self.is_causal:
            nq, nk = q.shape[0], k.shape[0]
            logits = logits.masked_fill(torch.arange(nk) > (nk - nq + rows).unsqueeze(-1), float("-inf"))
        return torch.exp(logits - ex.log_d[rows].unsqueeze(-1))

    def neighbours(self, layer: int, head: int) -> list[tuple[int, int]]:
        """The heads one slider step away, nearest move first: (layer, head + 1), (layer, head - 1),
        (layer + 1, head), (layer - 1, head), those that exist."""
        layers, heads = self.num_layers, self.src.q.shape[1]
        near = ((layer, head + 1), (layer, head - 1), (layer + 1, head), (layer - 1, head))
        return [(lay, h) for lay, h in near if 0 <= lay < layers and 0 <= h < heads]

    def warm(self, heads, idle) -> None:
        """exact() and pca() of each (layer, head) of `heads` in turn, while idle() is true: work for a
        background thread (only the caches change; a caller asking for a head being warmed waits for it).
        Heads of layers still to come are skipped (complete() captures them, and can be stopped)."""
        for layer, head in heads:
            if not idle():
                return
            if layer >= self.layers_ready:
                continue
            self.exact(layer, head)
            self.pca(layer, head)

    def prefetch(self, s: Settings, idle) -> None:
        """What an update of setting `s` computes (its run, every error its readout and curve show, the
        exact entries' mass), one piece at a time while idle() is true: work for a background thread that
        guesses the next move (only the caches change; an update asking for a piece under way waits for it)."""
        try:
            check_settings(s, self)
        except ValueError:  # one step past a slider's end: nothing to guess
            return
        if s.layer >= self.layers_ready:  # a layer still to come: complete() captures it first
            return
        steps = [lambda: self.run(s)]
        steps += [lambda p=p: self.errors(p) for p in self.measured_points(s)]
        steps += [lambda: self.heavy_mass(s, self.run(s).kde_trace)]
        for step in steps:
            if not idle():
                return
            step()

    def pca(self, layer: int, head: int):
        """2-D PCA of the head's normalised queries and keys (see pca_2d), cached per head."""
        q, k, _ = self.head(layer, head)
        return self.memo("pca", (layer, head), lambda: pca_2d(q, k))

    # ---------------------------------------------------------------- runs
    def _causal(self) -> dict:
        return {"is_causal": True} if self.is_causal else {}

    def _kde(self, s: Settings, trace: bool):
        q, k, v = self.head(s.layer, s.head)
        gen = torch.Generator().manual_seed(s.seed)
        return kdeformer.kde_attention(
            q, k, v, bucket_size=s.bucket_size, sample_size=s.sample_size, num_projs=s.num_projs,
            scale=self.scale, key_mask=self.key_mask, sampling=s.sampling, bucket_order=s.bucket_order,
            generator=gen, return_trace=trace, **self._causal(),
        )

    def _peer(self, s: Settings, trace: bool):
        from kdeformer.methods import approximate  # only reached when the registry listed the method

        q, k, v = self.head(s.layer, s.head)
        gen = torch.Generator().manual_seed(s.seed)
        return approximate(
            s.method, q, k, v, budget=s.budget, scale=self.scale, key_mask=self.key_mask, generator=gen,
            return_trace=trace, **self._causal(),
        )

    def output(self, s: Settings) -> torch.Tensor:
        """Output only (no trace) of the setting's method.  # (Nq, Dv)"""
        if s.method == "exact":
            return self.exact(s.layer, s.head).out
        if s.method == "kdeformer":
            return self._kde(s, False)
        return self._peer(s, False)

    def _peer_result(self, s: Settings, kde_trace) -> ApproxResult:
        out, peer_trace = self._peer(s, True)
        matrix = None
        if hasattr(peer_trace, "attention_matrix") and kde_trace.key.shape[-2] <= MATERIALIZE_MAX:
            try:
                matrix = peer_trace.attention_matrix()
            except Exception:  # a method without a matrix view: the error panel says so
                matrix = None
        return ApproxResult(s, out, kde_trace, getattr(peer_trace, "log_normalizer", None), matrix)

    def run(self, s: Settings) -> ApproxResult:
        """The setting's method with everything the figures need (cached per setting)."""
        def make():
            kde_out, kde_trace = self._kde(replace(s, method="kdeformer"), True)
            if s.method == "kdeformer":
                return ApproxResult(s, kde_out, kde_trace, kde_trace.log_normalizer, None)
            if s.method == "exact":
                ex = self.exact(s.layer, s.head)
                return ApproxResult(s, ex.out, kde_trace, ex.log_d, ex.matrix)
            return self._peer_result(s, kde_trace)

        return self._runs.get_or(s, make)

    # ---------------------------------------------------------------- errors
    def errors(self, s: Settings) -> tuple[float, float | None]:
        """(relative spectral error, theory-normalised spectral error) of one setting (cached; errors_of)."""
        return self.errors_of([s])[0]

    def errors_of(self, points) -> list[tuple[float, float | None]]:
        """errors() of settings of one head (cached): the outputs of those not cached yet are measured in
        one batched kdeformer.metrics call (the spectral norm is taken per matrix: the same numbers as one
        setting at a time, tested). theory = ||O~ - O||_2 / (||D^-1 A||_2 ||V||_2), with the two norms of
        the head computed once (ExactResult) instead of per call."""
        missing = [p for p in dict.fromkeys(points) if p not in self._errors]
        if len({(p.layer, p.head) for p in missing}) > 1:
            raise ValueError(f"errors_of measures settings of one head, got {sorted({(p.layer, p.head) for p in missing})}")
        if missing:
            ex = self.exact(missing[0].layer, missing[0].head)
            outs = torch.stack([self._output_of(p) for p in missing])  # (P, Nq, Dv)
            plain = metrics.relative_spectral_error(outs, ex.out.expand_as(outs), reduction="none").tolist()
            for p, err in zip(missing, plain):
                theory = None
                if ex.attention_norm is not None:
                    theory = err * ex.out_norm / max(ex.attention_norm * ex.value_norm, 1e-300)
                self._errors[p] = (err, theory)
        return [self._errors[p] for p in points]

    def _output_of(self, s: Settings) -> torch.Tensor:
        """The output of a cached run of `s` (read once: the warming thread may evict it meanwhile), else
        output(s).  # (Nq, Dv)"""
        run = self._runs.get(s)
        return run.out if run is not None else self.output(s)

    def measured_points(self, s: Settings) -> list[Settings]:
        """Every setting whose error the readout and the curve of `s` show: the readout's seeds of s, then
        each curve point's seeds (measured together by summary and curve: one batched metrics call)."""
        pts = [replace(s, seed=s.seed + i) for i in range(self.seeds)]
        for p in self.curve_points(s):
            pts += [replace(p, seed=p.seed + i) for i in range(self.seeds if p == s else self.curve_seeds)]
        return list(dict.fromkeys(pts))

    def summary(self, s: Settings) -> ErrorSummary:
        def make():
            self.errors_of(self.measured_points(s))
            runs = [self.errors(replace(s, seed=s.seed + i)) for i in range(self.seeds)]
            res, ex = self.run(s), self.exact(s.layer, s.head)
            frob = metrics.relative_frobenius_error(res.out, ex.out)
            norm = None if res.log_d is None else metrics.normalizer_relative_error(res.log_d, ex.log_d)
            return ErrorSummary([r[0] for r in runs], [r[1] for r in runs if r[1] is not None], frob, norm)

        return self._summaries.get_or(s, make)

    def curve_points(self, s: Settings) -> list[Settings]:
        """Settings of the error-versus-budget curve: (bucket, samples) scaled by each factor; points that
        would pay more than twice exact attention's Nk columns are left out (the current one stays)."""
        nk = self.src.k.shape[2]
        pts = []
        for f in self.curve_factors:
            p = replace(s, bucket_size=max(1, round(s.bucket_size * f)), sample_size=max(1, round(s.sample_size * f)))
            if p not in pts and (p == s or min(p.bucket_size, nk) + p.sample_size <= 2 * nk):
                pts.append(p)
        return pts

    def curve(self, s: Settings) -> Curve:
        def make():
            self.errors_of(self.measured_points(s))
            pts = self.curve_points(s)
            means, sds = [], []
            for p in pts:
                n = self.seeds if p == s else self.curve_seeds  # the current point shows the readout's seeds
                m, sd = ErrorSummary.mean_sd([self.errors(replace(p, seed=p.seed + i))[0] for i in range(n)])
                means.append(m)
                sds.append(sd)
            label = f"{self.methods.get(s.method, s.method)} L{s.layer}H{s.head} B{s.bucket_size}/s{s.sample_size} r{s.num_projs}"
            return Curve([p.budget for p in pts], means, sds, pts.index(s), label)

        return self._curves.get_or(s, make)

    def exact_mask_rows(self, s: Settings, trace, rows: torch.Tensor) -> torch.Tensor:
        """Rows of the entries `trace` (the KDEformer trace of `s`) computes exactly: its exact_mask_rows,
        read from the whole (Nq, Nk) mask, built once per KDEformer setting when Nk <= MATERIALIZE_MAX
        (heavy_mass, the heavy and the samples panels all read it).  # (R, Nk) bool"""
        if trace.key.shape[-2] > MATERIALIZE_MAX:
            return trace.exact_mask_rows(rows)
        return self._masks.get_or(s.key(KDE_KEYS), trace.heavy_mask)[rows]

    def heavy_mass(self, s: Settings, trace) -> tuple:
        """Per query: the exact softmax mass of the entries the trace computes exactly, and how many
        entries those are (cached per KDEformer setting).  # (Nq,), (Nq,)"""
        def make():
            nq, nk = trace.query.shape[-2], trace.key.shape[-2]
            mass, count = [], []
            for rows in chunk_rows(torch.arange(nq), nk):
                exact = self.exact_mask_rows(s, trace, rows)  # (R, Nk) bool
                # the mass of the exact entries (finite rows: the same sums as multiplying by the mask, 3x faster)
                mass.append(torch.where(exact, self.exact_rows(s.layer, s.head, rows), 0.0).double().sum(-1))
                count.append(exact.sum(-1))
            return torch.cat(mass).numpy(), torch.cat(count).numpy()

        return self.memo("heavy mass", s.key(KDE_KEYS), make)

    # ---------------------------------------------------------------- cost
    def cost(self, s: Settings, trace) -> float | None:
        """Multiply-adds of the shown method for this head, as a fraction of exact attention's (both from
        kdeformer.multiply_adds: KDEformer's estimation rows included, hashing not; causal: the lower
        triangle). Above 1 when the setting pays more than exact. None where a method has no count."""
        nq, nk = trace.query.shape[-2], trace.key.shape[-2]
        d, dv = self.src.q.shape[-1], self.src.v.shape[-1]
        causal = self.is_causal
        exact = kdeformer.multiply_adds("exact", nq, nk, d, dv, is_causal=causal)
        one_key_block = trace.num_blocks <= 1 and "inclusion_probs" not in trace.extras  # (pps has no key blocks)
        if s.method == "exact" or (s.method == "kdeformer" and one_key_block and not causal):
            return 1.0  # one key block holds every key: exact attention's work
        try:
            if s.method == "kdeformer":
                from kdeformer.core import kde_multiply_adds

                ours = kde_multiply_adds(nq, nk, d, dv, bucket_size=s.bucket_size, sample_size=s.sample_size,
                                         num_projs=s.num_projs, sampling=s.sampling, is_causal=causal)
            else:
                ours = kdeformer.multiply_adds(s.method, nq, nk, d, dv, budget=s.budget, is_causal=causal)
        except (ValueError, TypeError, KeyError):
            return None
        return ours / exact


kde_call_code = call_code  # the old name (it writes exact and peer calls too)
