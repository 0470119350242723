"""The container every source returns, the texts shipped with the project, and the source caches.

One :class:`AttentionSource` holds Q/K/V of every layer and head of one input; the in-memory caches
(:data:`SOURCES`, :data:`MODELS`) and the disk cache (``torch.save`` files) hand sources back without
re-running a model.
"""
from __future__ import annotations

import hashlib
import importlib.util
import math
import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from .._cache import LRU
from .._checks import check_flag, check_index, check_int

SOURCES = LRU(8)  # extracted sources and GloVe tables, keyed by what made them
MODELS = LRU(2)  # (model, tokenizer) per (folder, attention implementation)


# --------------------------------------------------------------------------- the shared container
@dataclass
class AttentionSource:
    """Queries, keys and values of every layer and head of one input, plus what is needed to label them.

    q, k, v: float32 (L, H, N, D); ``scale`` is the softmax scale the model uses (logits = scale * q k^T);
    ``key_mask``: bool (N,) True = attend, or None when every token is real; ``is_causal``: True when the
    model is a decoder whose query i attends only to keys j <= i (the explorer then shows the lower
    triangle and ``kde_attention(..., is_causal=True)`` is the matching call); ``tokens``: N labels;
    ``meta``: where the data came from (model path, truncation, the GloVe rows, ...).
    """

    name: str
    text: str
    tokens: list[str]
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float
    key_mask: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)
    is_causal: bool = False

    def __post_init__(self):
        if self.q.dim() != 4 or self.k.shape != self.q.shape or self.v.dim() != 4 or self.v.shape[:3] != self.q.shape[:3]:
            shapes = [tuple(t.shape) for t in (self.q, self.k, self.v)]
            raise ValueError(f"q, k, v must be (L, H, N, D) with equal q/k shapes and matching L, H, N; got {shapes}")
        if len(self.tokens) != self.q.shape[2]:
            raise ValueError(f"tokens must have N={self.q.shape[2]} labels, got {len(self.tokens)}")
        if self.key_mask is not None and tuple(self.key_mask.shape) != (self.q.shape[2],):
            raise ValueError(f"key_mask must be (N,) = ({self.q.shape[2]},), got {tuple(self.key_mask.shape)}")
        self.is_causal = check_flag("is_causal", self.is_causal)

    @property
    def num_layers(self) -> int:
        return self.q.shape[0]

    @property
    def num_heads(self) -> int:
        return self.q.shape[1]

    @property
    def num_tokens(self) -> int:
        return self.q.shape[2]

    @property
    def head_dim(self) -> int:
        return self.q.shape[3]

    def head(self, layer: int, head: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q, k, v) of one head, each (N, D)."""
        layer = check_index("layer", layer, self.num_layers)
        head = check_index("head", head, self.num_heads)
        return self.q[layer, head], self.k[layer, head], self.v[layer, head]

    def first_layers(self, n: int) -> AttentionSource:
        """The same source cut to its first n layers (views of the same tensors); n in [1, num_layers]."""
        n = check_int("num_layers", n, minimum=1, maximum=self.num_layers)
        meta = dict(self.meta)
        if "layer_scales" in meta:
            meta["layer_scales"] = list(meta["layer_scales"])[:n]
        return dataclasses.replace(self, q=self.q[:n], k=self.k[:n], v=self.v[:n], meta=meta)

    def allowed(self) -> torch.Tensor:
        """bool (N, N): which keys each query may attend to (key_mask, and j <= i when causal)."""
        n = self.num_tokens
        allowed = torch.ones(n, n, dtype=torch.bool)  # (Nq, Nk)
        if self.is_causal:
            allowed = allowed.tril()
        if self.key_mask is not None:
            allowed = allowed & self.key_mask
        return allowed

    def __repr__(self) -> str:
        causal = ", causal" if self.is_causal else ""
        return (
            f"AttentionSource(name={self.name!r}, layers={self.num_layers}, heads={self.num_heads}, "
            f"tokens={self.num_tokens}, head_dim={self.head_dim}, scale={self.scale:.4g}{causal})"
        )


# --------------------------------------------------------------------------- texts shipped with us
def _data_text(name: str) -> str:
    return resources.files("kdeformer").joinpath("data", name).read_text(encoding="utf-8")


def default_text() -> str:
    """A plain-English explanation of attention, LSH and KDEformer (our own writing, ~950 BERT tokens).

    It is longer than 512 tokens on purpose, so :func:`minilm` fills its whole window with real prose.
    """
    return _data_text("default_text.txt")


def corpus() -> list[str]:
    """45 short paragraphs of our own writing on 15 everyday topics (three paragraphs each, in order)."""
    return [p.strip() for p in _data_text("corpus.txt").split("\n\n") if p.strip()]


# --------------------------------------------------------------------------- caches
def clear_cache() -> None:
    """Forget every cached source and loaded model (the disk cache is left alone)."""
    SOURCES.clear()
    MODELS.clear()


def disk_key(path: Path, text: str, max_tokens) -> str:
    """File-name key of a source on disk: the weights' names, sizes and time stamps, the text, the cut."""
    weights = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin"))
    stamp = ";".join(f"{p.name}:{p.stat().st_size}:{int(p.stat().st_mtime)}" for p in weights)
    raw = f"{path}|{stamp}|{max_tokens}|{text}"
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()[:32]


def save_source(src: AttentionSource, file: Path) -> None:
    """Write `src` atomically (a temporary file renamed into place)."""
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(".tmp")
    state = {
        "name": src.name, "text": src.text, "tokens": src.tokens, "q": src.q, "k": src.k, "v": src.v,
        "scale": src.scale, "key_mask": src.key_mask, "meta": src.meta, "is_causal": src.is_causal,
    }
    torch.save(state, tmp)
    tmp.replace(file)


def load_source(file: Path) -> AttentionSource | None:
    """The source saved in `file`, or None when it is missing, stale or broken (then it is recomputed)."""
    try:
        state = torch.load(file, weights_only=True)
        return AttentionSource(**state)
    except Exception:  # a stale or broken cache file is recomputed, never trusted
        return None


# --------------------------------------------------------------------------- locating packaged data
def package_dir(package: str, pip_name: str) -> Path:
    """Folder of an installed data package, or a ModuleNotFoundError saying how to install it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the data package {pip_name!r} is not installed; install it with `pip install {pip_name}` "
            "(or `pip install 'kdeformer-explorer[models]'`)"
        )
    return Path(list(spec.submodule_search_locations)[0])


# --------------------------------------------------------------------------- describing a source
def measure_attention(src: AttentionSource, layer: int = 0, head: int = 0, max_queries: int = 1024,
                      seed: int = 0) -> dict:
    """Sharpness of one head's exact attention: mean normalised entropy H/log(N) (1 = uniform) and mean
    max probability, over up to ``max_queries`` random query rows (seeded).

    Rows see only the keys they may attend to (``src.allowed()``); a row with a single allowed key (the
    first query of a causal source) counts as entropy 0 of a normaliser log 1, so it is skipped.
    """
    q, k, _ = src.head(layer, head)
    n = q.shape[0]
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_queries]
    allowed = src.allowed()[rows]  # (m, N)
    logits = (q[rows].double() @ k.double().T) * src.scale  # (m, N)
    p = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    ent = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)  # (m,)
    n_valid = allowed.sum(-1).double()  # (m,)
    keep = n_valid > 1
    return {
        "entropy": float((ent[keep] / n_valid[keep].log()).mean()),
        "max_prob": float(p.max(-1).values.mean()),
    }
