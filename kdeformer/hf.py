"""KDEformer inside Hugging Face transformers models: every attention layer runs through `kde_attention`.

Importing this module registers an attention function and its mask function under the name
``"kdeformer"`` with transformers' ``AttentionInterface`` and ``AttentionMaskInterface`` (again, and
idempotently, on :func:`register`). Then either::

    model = AutoModel.from_pretrained(path, attn_implementation="kdeformer")
    kdeformer.hf.configure(model, bucket_size=32, sample_size=64)

or, for a loaded model, ``kdeformer.hf.use_kdeformer(model, bucket_size=32, sample_size=64)``, which
checks the model first. Parameters are resolved per call in this order: the :func:`settings` context
manager, the model's own (``configure``, stored as ``model.config.kdeformer``), then :data:`DEFAULTS`.
``model.set_attn_implementation("sdpa")`` switches back to exact attention.

Masks: the registered mask function is transformers' ``sdpa_mask``, so a padded batch arrives as a
boolean (B, 1, Nq, Nk) mask (True = attend), or None when nothing is padded. It is reduced to
kde_attention's ``key_mask`` (B, 1, Nk); a mask that varies across queries (causal, sliding window,
custom patterns) is refused with a ValueError, as are causal modules: causal masking is not supported
yet. Float masks (0 / large negative) are accepted too; an additive bias with other values is refused.

Determinism: each call draws its random hashing and samples from a fresh ``torch.Generator`` seeded
with (seed, layer index), so the same input and settings always give the same output, whatever ran
before. ``seed=None`` uses torch's global generator instead.

Attention-probability dropout is not applied (a warning says so once when the model is training), and
no attention weights are returned (``output_attentions=True`` yields an empty tuple).

Supported: models whose transformers implementation routes attention through ``AttentionInterface``
(``model._supports_attention_backend``): in transformers 5.x BERT, RoBERTa, DistilBERT, ELECTRA, ALBERT,
XLM-R and ViT among others; DeBERTa and MPNet, for example, do not and are refused by ``use_kdeformer``.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import warnings
import weakref

import torch

from ._checks import check_choice, check_index, check_int, check_positive_int
from .core import kde_attention
from .exact import exact_attention

__all__ = ["NAME", "DEFAULTS", "register", "configure", "use_kdeformer", "settings", "get_settings", "record_traces",
           "kdeformer_attention_forward", "key_mask_from_attention_mask", "check_supported"]

NAME = "kdeformer"

DEFAULTS = {"bucket_size": 64, "sample_size": 128, "num_projs": 7, "sampling": "value_norm",
            "bucket_order": "gray", "seed": 0, "layers": None}

# kde_attention arguments that the attention function fills itself.
_RESERVED = {"query", "key", "value", "scale", "key_mask", "generator", "return_trace"}

_recorder: contextvars.ContextVar[list | None] = contextvars.ContextVar("kdeformer_hf_traces", default=None)
_override: contextvars.ContextVar[dict | None] = contextvars.ContextVar("kdeformer_hf_settings", default=None)
_layer_numbers: "weakref.WeakKeyDictionary[torch.nn.Module, int]" = weakref.WeakKeyDictionary()
_layer_counter: "weakref.WeakKeyDictionary[object, int]" = weakref.WeakKeyDictionary()
_warned_dropout = False


# --------------------------------------------------------------------------- parameters
@functools.lru_cache(maxsize=1)
def _kernel_options() -> frozenset[str]:
    """Keyword options kde_attention accepts (read from its signature, so new core options pass through)."""
    from . import core

    params = inspect.signature(core.kde_attention).parameters
    return frozenset(n for n, p in params.items() if p.kind is p.KEYWORD_ONLY) - _RESERVED


def _validate(params: dict) -> dict:
    allowed = _kernel_options() | {"seed", "layers"}
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ValueError(f"unknown KDEformer setting(s) {unknown}; allowed: {sorted(allowed)}")
    out = dict(params)
    for name in ("bucket_size", "sample_size"):
        if name in out:
            out[name] = check_positive_int(name, out[name])
    if "num_projs" in out:
        out["num_projs"] = check_positive_int("num_projs", out["num_projs"], maximum=16)
    if out.get("layers") is not None:
        layers = out["layers"]
        if isinstance(layers, (int, str)) or not hasattr(layers, "__iter__"):
            raise ValueError(f"layers must be None (all layers) or a collection of layer indices >= 0, got {layers!r}")
        out["layers"] = tuple(sorted({check_int("layers", i, minimum=0) for i in layers}))
    if "seed" in out and out["seed"] is not None:
        out["seed"] = check_int("seed", out["seed"], minimum=0)
    from . import core

    if "sampling" in out:
        check_choice("sampling", out["sampling"], getattr(core, "SAMPLINGS", (out["sampling"],)))
    if "bucket_order" in out:
        check_choice("bucket_order", out["bucket_order"], getattr(core, "BUCKET_ORDERS", (out["bucket_order"],)))
    return out


def configure(model, **params) -> dict:
    """Store KDEformer settings on ``model.config`` (merged with earlier ones); returns the full settings.

    Settings: bucket_size, sample_size, num_projs, sampling, bucket_order, seed (and any other keyword
    option of :func:`kdeformer.kde_attention`), and ``layers``: None (every layer) or the indices of the
    layers that use KDEformer (0 = first; the others run exact attention). Every sub-config of the model that has its own
    attention implementation gets the same settings.
    """
    params = _validate(params)
    config = getattr(model, "config", model)
    current = dict(getattr(config, "kdeformer", None) or {})
    current.update(params)
    for cfg in _all_configs(config):
        cfg.kdeformer = dict(current)
    _number_layers(model)
    return {**DEFAULTS, **current}


def _all_configs(config) -> list:
    configs, todo = [], [config]
    while todo:
        cfg = todo.pop()
        configs.append(cfg)
        for key in getattr(cfg, "sub_configs", {}) or {}:
            sub = getattr(cfg, key, None)
            if sub is not None and hasattr(sub, "to_dict"):
                todo.append(sub)
    return configs


@contextlib.contextmanager
def settings(**params):
    """Override KDEformer settings for every model inside the block (takes precedence over configure)."""
    params = _validate(params)
    outer = _override.get() or {}
    token = _override.set({**outer, **params})
    try:
        yield {**DEFAULTS, **outer, **params}
    finally:
        _override.reset(token)


def get_settings(module=None) -> dict:
    """The settings a call from `module` would use now: defaults < module.config.kdeformer < settings()."""
    config = getattr(module, "config", None)
    own = getattr(config, "kdeformer", None) or {}
    return {**DEFAULTS, **own, **(_override.get() or {})}


@contextlib.contextmanager
def record_traces():
    """Collect ``(layer index, KDETrace)`` for every KDEformer call inside the block (yields the list).

    Each trace holds that layer's buckets, blocks, samples and ``attention_matrix()`` for the whole
    (B, H) batch, so the explorer can show what happened inside a real model's forward pass.
    """
    traces: list = []
    token = _recorder.set(traces)
    try:
        yield traces
    finally:
        _recorder.reset(token)


# --------------------------------------------------------------------------- layer numbers (seeding)
def _number_layers(model) -> None:
    """Number the self-attention modules 0, 1, ... in module order (= layer number in an encoder).

    The number seeds each layer's generator and is what the ``layers`` setting refers to.
    """
    if not isinstance(model, torch.nn.Module):
        return
    from .sources import find_attention_projections

    try:
        projections = find_attention_projections(model)
    except ValueError:
        return
    for index, proj in enumerate(projections):
        _layer_numbers[proj.module] = index


def _layer_index(module) -> int:
    if module in _layer_numbers:
        return _layer_numbers[module]
    if isinstance(getattr(module, "layer_idx", None), int):
        return module.layer_idx
    # Unnumbered (no configure call): number modules in the order they first run, per config.
    owner = getattr(module, "config", None)
    try:
        count = _layer_counter.get(owner, 0)
        _layer_counter[owner] = count + 1
    except TypeError:  # config not weak-referenceable
        count = 0
    _layer_numbers[module] = count
    return count


def _generator(seed: int | None, layer: int, device) -> torch.Generator | None:
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + layer) % (2**63 - 1))
    return gen


# --------------------------------------------------------------------------- masks
def key_mask_from_attention_mask(attention_mask, batch: int, n_q: int, n_k: int):
    """Turn the mask transformers hands to an attention function into kde_attention's key_mask.

    Accepts None, a bool (B|1, 1|H, Nq|1, Nk) mask (True = attend), a float mask of the same shape
    (0 = attend, very negative = masked) or a 2-D (B, Nk) padding mask (1/True = attend).
    Returns None or bool (B|1, 1|H, Nk). Raises ValueError for masks that differ between queries.
    """
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise ValueError(
            f"attention_mask of type {type(attention_mask).__name__} is not supported by KDEformer; "
            "expected a tensor key padding mask"
        )
    mask = attention_mask
    if mask.dim() == 2:
        if mask.shape[-1] != n_k:
            raise ValueError(f"2-D attention_mask must be (B, Nk={n_k}), got {tuple(mask.shape)}")
        return mask.bool()[:, None, :]  # (B, 1, Nk)
    if mask.dim() != 4 or mask.shape[-1] != n_k or mask.shape[-2] not in (1, n_q):
        raise ValueError(f"attention_mask must be (B, 1, Nq={n_q}, Nk={n_k}), got {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        if not mask.is_floating_point():
            mask = mask != 0
        else:
            attend = mask > torch.finfo(mask.dtype).min / 2
            if bool((mask[attend] != 0).any()):
                raise ValueError(
                    "attention_mask carries an additive bias (values other than 0 and -inf); KDEformer only "
                    "supports key padding masks"
                )
            mask = attend
    first = mask[..., :1, :]  # (B, 1|H, 1, Nk)
    if not bool((mask == first).all()):
        raise ValueError(
            "attention_mask differs between queries (a causal, sliding-window or custom pattern); KDEformer "
            "supports key padding masks only: causal masking is not supported yet"
        )
    return first[..., 0, :]  # (B|1, 1|H, Nk)


# --------------------------------------------------------------------------- the attention function
def kdeformer_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: q, k, v (B, H, N, D) -> ((B, N, H, Dv) contiguous, None)."""
    global _warned_dropout
    if kwargs.get("is_causal") or getattr(module, "is_causal", False):
        raise ValueError(
            f"{type(module).__name__} is causal (a decoder); KDEformer does not support causal masking yet. "
            "Use it in encoders (BERT, RoBERTa, DistilBERT, ELECTRA, ViT-style)."
        )
    if dropout and not _warned_dropout:
        warnings.warn("KDEformer attention does not apply attention-probability dropout", UserWarning, stacklevel=2)
        _warned_dropout = True
    batch, heads, n_q, _ = query.shape
    if key.shape[1] != heads:  # grouped key/value heads: repeat them for each query head
        reps = heads // key.shape[1]
        key = key.repeat_interleave(reps, dim=1)
        value = value.repeat_interleave(reps, dim=1)
    n_k = key.shape[2]
    key_mask = key_mask_from_attention_mask(attention_mask, batch, n_q, n_k)  # (B|1, 1|H, Nk) or None
    if key_mask is not None:
        key_mask = key_mask.to(query.device)
    params = get_settings(module)
    seed = params.pop("seed")
    options = {k: v for k, v in params.items() if k in _kernel_options()}
    layer = _layer_index(module)
    if params["layers"] is not None and layer not in params["layers"]:
        out = exact_attention(query, key, value, scale=scaling, key_mask=key_mask)  # (B, H, Nq, Dv)
        return out.transpose(1, 2).contiguous(), None
    recorder = _recorder.get()
    # HF hands transposed views of (B, N, H, D) projections; the kernel wants plain (B, H, N, D) memory.
    out = kde_attention(
        query.contiguous(), key.contiguous(), value.contiguous(), scale=scaling, key_mask=key_mask,
        generator=_generator(seed, layer, query.device), return_trace=recorder is not None, **options,
    )  # (B, H, Nq, Dv), or (out, trace)
    if recorder is not None:
        out, trace = out
        recorder.append((layer, trace))
    return out.transpose(1, 2).contiguous(), None  # (B, Nq, H, Dv)


# --------------------------------------------------------------------------- registration
def register() -> None:
    """Register ``"kdeformer"`` with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, kdeformer_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def check_supported(model) -> None:
    """ValueError unless `model` is an encoder that routes attention through transformers' interface."""
    from .sources import check_encoder_config

    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    check_encoder_config(config)
    if not getattr(model, "_supports_attention_backend", False):
        raise ValueError(
            f"{type(model).__name__} does not route its attention through transformers' AttentionInterface "
            "in this transformers version, so KDEformer cannot be plugged in (supported: BERT, RoBERTa, "
            "DistilBERT, ELECTRA, ALBERT, ViT, ...)"
        )


def use_kdeformer(model, **params):
    """Check `model`, switch all its layers to KDEformer attention and store `params`; returns the model."""
    check_supported(model)
    register()
    settings_ = _validate(params)
    model.set_attn_implementation(NAME)
    if model.config._attn_implementation != NAME:
        raise ValueError(f"{type(model).__name__} refused attn_implementation={NAME!r}")
    configure(model, **settings_)
    return model


register()
