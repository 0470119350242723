"""KDEformer inside Hugging Face transformers models: every attention layer runs through `kde_attention`.

Importing this module registers an attention function and its mask function under the name
``"kdeformer"`` with transformers' ``AttentionInterface`` and ``AttentionMaskInterface`` (again, and
idempotently, on :func:`register`). Then either::

    model = AutoModel.from_pretrained(path, attn_implementation="kdeformer")        # encoder
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="kdeformer")  # decoder
    kdeformer.hf.configure(model, bucket_size=32, sample_size=64)

or, for a loaded model, ``kdeformer.hf.use_kdeformer(model, bucket_size=32, sample_size=64)``, which
checks the model first. Parameters are resolved per call in this order: the :func:`settings` context
manager, the model's own (``configure``, stored as ``model.config.kdeformer``), then :data:`DEFAULTS`
(the core's :data:`kdeformer.defaults.KDE_DEFAULTS` plus the plug-in's own ``seed``, ``layers`` and
``exact_decode``). Every setting is checked where it is made, by the core's own
:func:`kdeformer.core.check_kde_options`. ``model.set_attn_implementation("sdpa")`` switches back.

Masks: the registered mask function is transformers' ``sdpa_mask``, so a padded batch arrives as a
boolean (B, 1, Nq, Nk) mask (True = attend), or None when nothing is padded. :func:`kernel_masks` reads it
as kde_attention's ``key_mask`` (B, 1, Nk) and, for self-attention, ``query_mask`` (B, 1, Nq) (a query is
real when its own token is), so padded queries take no block room and a padded batch gives each text
what it gives alone. Encoders' masks must not vary across real queries; decoders' (``module.is_causal``)
must be causal (bottom-right aligned) and padding, and run with ``is_causal=True``. Other patterns
(sliding windows, static-cache prefill with padding, custom masks) are refused with a ValueError.

Decoding with a KV cache: a step with fewer queries than keys (Nq new tokens against the Nk cached
ones) runs exact attention whenever that costs no more multiply-adds than KDEformer would
(:func:`decode_runs_exact`; with the defaults, single-token steps against any cache), and records an
exact trace (``ExactTrace``) for it; ``exact_decode=False`` keeps KDEformer on every step. Greedy
``generate()`` gives eager's tokens at exact-equivalent settings (bucket_size >= the final length), and
there decode steps reproduce the full-sequence logits. At approximate settings an exact step does not
(the full sequence's forward pass estimates that row); with ``exact_decode=False`` value_norm and uniform
steps do (the strictly causal core draws a lone query what it drew in the full pass), column_norm and pps
steps do not (measured on tiny decoders; see tests/test_hf.py). So generated text can differ from re-scoring it
in one pass; the prompt's own logits never depend on what follows it.

Determinism: each call draws its random hashing and samples from a fresh ``torch.Generator`` seeded
with (seed, layer index); the core draws per head from that seed, so the same text gives the same
output alone, in any batch, at any padding, whatever ran before. ``seed=None`` uses torch's global
generator instead.

Attention-probability dropout is not applied (a warning says so once when the model is training), and
no attention weights are returned (``output_attentions=True`` yields an empty tuple).

Supported: models whose transformers implementation routes attention through ``AttentionInterface``
(``model._supports_attention_backend``): in transformers 5.x BERT, RoBERTa, DistilBERT, ELECTRA, ALBERT,
XLM-R and ViT among encoders, GPT-2, Llama, Qwen2/3, Mistral and Gemma (1) among decoders; DeBERTa and
MPNet, for example, do not and are refused by ``use_kdeformer``. Layers whose softmax is changed, by logit
soft-capping (Gemma 2) or attention sinks (gpt-oss), are refused at forward time with a ValueError.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import inspect
import types
import warnings
import weakref
from dataclasses import dataclass

import torch

from ._checks import check_flag, check_index, check_int
from .core import check_kde_options, kde_attention
from .defaults import KDE_DEFAULTS
from .exact import exact_attention
from .sources.capture import find_attention_projections, match_kv_heads, module_is_causal

__all__ = ["NAME", "DEFAULTS", "register", "configure", "use_kdeformer", "settings", "get_settings", "record_traces",
           "kdeformer_attention_forward", "kernel_masks", "KernelMasks", "key_mask_from_attention_mask",
           "decode_runs_exact", "check_supported"]

NAME = "kdeformer"

# The plug-in's own settings (everything else is a kde_attention option, defaulted by the core).
PLUGIN_DEFAULTS = {"seed": 0, "layers": None, "exact_decode": True}
DEFAULTS = types.MappingProxyType({**KDE_DEFAULTS.as_dict(), **PLUGIN_DEFAULTS})  # read-only view

# kde_attention arguments that the attention function fills itself.
_RESERVED = {"query", "key", "value", "scale", "key_mask", "query_mask", "is_causal", "generator", "return_trace"}

_recorder: contextvars.ContextVar[list | None] = contextvars.ContextVar("kdeformer_hf_traces", default=None)
_override: contextvars.ContextVar[dict | None] = contextvars.ContextVar("kdeformer_hf_settings", default=None)
_layer_numbers: "weakref.WeakKeyDictionary[torch.nn.Module, int]" = weakref.WeakKeyDictionary()
_layer_counter: "weakref.WeakKeyDictionary[object, int]" = weakref.WeakKeyDictionary()
_warned_dropout = False


# --------------------------------------------------------------------------- parameters
@functools.lru_cache(maxsize=1)
def _kernel_options() -> frozenset[str]:
    """Keyword options kde_attention accepts (read from its signature, so new core options pass through)."""
    from . import core  # the core's own function, not whatever this module's name points to

    params = inspect.signature(core.kde_attention).parameters
    return frozenset(n for n, p in params.items() if p.kind is p.KEYWORD_ONLY) - _RESERVED


def _check_plugin_options(params: dict) -> dict:
    """seed (int >= 0 or None), layers (None or indices >= 0), exact_decode (bool), normalised."""
    out = {}
    if params.get("layers") is not None:
        layers = params["layers"]
        if isinstance(layers, (int, str)) or not hasattr(layers, "__iter__"):
            raise ValueError(f"layers must be None (all layers) or a collection of layer indices >= 0, got {layers!r}")
        out["layers"] = tuple(sorted({check_int("layers", i, minimum=0) for i in layers}))
    if params.get("seed") is not None:
        out["seed"] = check_int("seed", params["seed"], minimum=0)
    if "exact_decode" in params:
        out["exact_decode"] = check_flag("exact_decode", params["exact_decode"])
    return out


def _check_kernel_options(options: dict) -> dict:
    """The core's own check of kde_attention options (local_window is checked as the causal option it is)."""
    options = {k: v for k, v in options.items() if k in _kernel_options()}
    checked = check_kde_options(**options, is_causal=options.get("local_window") is not None)
    return {k: v for k, v in dataclasses.asdict(checked).items() if k in options}


def _validate(params: dict, base: dict) -> dict:
    """Checked `params`; kernel options are checked together with `base`, the settings they join."""
    allowed = _kernel_options() | set(PLUGIN_DEFAULTS)
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ValueError(f"unknown KDEformer setting(s) {unknown}; allowed: {sorted(allowed)}")
    out = {**params, **_check_plugin_options(params)}
    if set(params) & _kernel_options():
        _check_kernel_options({**base, **params})
    return out


def _check_layers_exist(model, layers) -> None:
    """ValueError when `layers` names a layer the model does not have (when its depth is known)."""
    depth = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if layers is None or not isinstance(depth, int):
        return
    for index in layers:
        check_index("layers", index, depth)


def configure(model, **params) -> dict:
    """Store KDEformer settings on ``model.config`` (merged with earlier ones); returns the full settings.

    Settings: bucket_size, sample_size, num_projs, sampling, bucket_order, heavy_columns, estimate_rows,
    local_window (decoders only) and any other keyword option of :func:`kdeformer.kde_attention`; seed;
    ``layers``: None (every layer) or the indices of the layers that use KDEformer (0 = first; the others
    run exact attention); ``exact_decode``: decode steps may run exact attention when it is cheaper.
    Every sub-config of the model that has its own attention implementation gets the same settings.
    """
    if isinstance(model, torch.nn.Module):
        check_supported(model)
    config = getattr(model, "config", model)
    current = dict(getattr(config, "kdeformer", None) or {})
    params = _validate(params, {**DEFAULTS, **current})
    _check_layers_exist(model, params.get("layers"))
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
    outer = _override.get() or {}
    params = _validate(params, {**DEFAULTS, **outer})
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
    """Collect ``(layer index, trace)`` for every call of a KDEformer layer inside the block (yields the list).

    A KDEformer call records its ``KDETrace`` (buckets, blocks, samples and ``attention_matrix()`` for the
    whole (B, H) batch, so the explorer can show what happened inside a real model's forward pass); a
    decode step that ran exact attention (see :func:`decode_runs_exact`) records the exact attention's
    trace (``ExactTrace``). Layers excluded by the ``layers`` setting record nothing.
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

    The number seeds each layer's generator and is what the ``layers`` setting refers to. Modules with a
    ``layer_idx`` (decoders) keep that number.
    """
    if not isinstance(model, torch.nn.Module):
        return
    try:
        projections = find_attention_projections(model)
    except ValueError:
        return
    for index, proj in enumerate(projections):
        own = getattr(proj.module, "layer_idx", None)
        _layer_numbers[proj.module] = own if isinstance(own, int) else index


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
@dataclass
class KernelMasks:
    """What one attention call's mask means for kde_attention."""

    key_mask: torch.Tensor | None  # (B|1, 1|H, Nk) bool, True = attend; None: every key is real
    query_mask: torch.Tensor | None  # (B|1, 1|H, Nq) bool, True = real query; None: every query is real
    is_causal: bool  # query i sees keys j <= Nk - Nq + i
    n_keys: int  # keys any query can see: the first n_keys (< Nk only for a top-left causal call)


def _bool_mask(attention_mask, n_q: int, n_k: int) -> torch.Tensor | None:
    """None, or the mask as bool (B|1, 1|H, Nq|1, Nk), True = attend (2-D padding, bool, int or 0/-inf)."""
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
        return mask.bool()[:, None, None, :]  # (B, 1, 1, Nk)
    if mask.dim() != 4 or mask.shape[-1] != n_k or mask.shape[-2] not in (1, n_q):
        raise ValueError(f"attention_mask must be (B, 1, Nq={n_q}, Nk={n_k}), got {tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        return mask != 0
    attend = mask > torch.finfo(mask.dtype).min / 2
    if bool((mask[attend] != 0).any()):
        raise ValueError(
            "attention_mask carries an additive bias (values other than 0 and -inf); KDEformer only "
            "supports key padding masks (and causal + padding masks in decoders)"
        )
    return attend


def _check_decomposes(mask, key_mask, query_mask, causal: bool) -> None:
    """ValueError unless `mask` equals key padding (and bottom-right causal) on every real query row."""
    n_q, n_k = mask.shape[-2], mask.shape[-1]
    expected = key_mask.unsqueeze(-2)  # (B|1, 1|H, 1, Nk)
    if causal:
        visible = torch.ones(n_q, n_k, dtype=torch.bool, device=mask.device).tril(n_k - n_q)  # (Nq, Nk)
        expected = expected & visible
    agree = mask == expected  # (B|1, 1|H, Nq|1, Nk)
    if query_mask is not None and mask.shape[-2] == query_mask.shape[-1]:
        agree = agree | ~query_mask.unsqueeze(-1)  # padded query rows may hold anything
    if bool(agree.all()):
        return
    if causal:
        raise ValueError(
            "attention_mask is not a causal + padding mask (a sliding window, a static cache being filled "
            "with padding, or a custom pattern); KDEformer supports causal (bottom-right) + key padding masks"
        )
    raise ValueError(
        "attention_mask differs between queries (a causal, sliding-window or custom pattern) in a module "
        "that is not causal; KDEformer reads encoder masks as key padding only"
    )


def kernel_masks(attention_mask, n_q: int, n_k: int, *, causal: bool = False, self_attention: bool = True) -> KernelMasks:
    """Read the mask transformers hands to an attention function as kde_attention's masks.

    attention_mask: None, a bool (B|1, 1|H, Nq|1, Nk) mask (True = attend), a float mask of the same shape
    (0 = attend, very negative = masked) or a 2-D (B, Nk) padding mask (1/True = attend).
    causal: the module is causal (a decoder): the mask must be bottom-right causal & key padding; with
    no mask, transformers' SDPA convention holds (top-left causal when 1 < Nq < Nk, a static cache being
    filled: only the first Nq keys are visible, so ``n_keys = Nq``).
    self_attention: queries are the last Nq of the keys' tokens, so ``query_mask`` is read off ``key_mask``.
    Masks with nothing masked are returned as None.
    """
    mask = _bool_mask(attention_mask, n_q, n_k)  # (B|1, 1|H, Nq|1, Nk) or None
    if mask is None:
        n_keys = n_q if causal and 1 < n_q < n_k else n_k
        return KernelMasks(None, None, causal, n_keys)
    key_mask = mask.any(-2)  # (B|1, 1|H, Nk): keys some query sees
    query_mask = key_mask[..., n_k - n_q:] if self_attention and n_q <= n_k else None  # (B|1, 1|H, Nq)
    _check_decomposes(mask, key_mask, query_mask, causal)
    if bool(key_mask.all()):
        return KernelMasks(None, None, causal, n_k)
    return KernelMasks(key_mask, query_mask, causal, n_k)


def key_mask_from_attention_mask(attention_mask, batch: int, n_q: int, n_k: int):
    """An encoder's attention mask as kde_attention's key_mask: None or bool (B|1, 1|H, Nk).

    Kept for callers of earlier versions; :func:`kernel_masks` also gives the query and causal parts.
    """
    mask = _bool_mask(attention_mask, n_q, n_k)
    if mask is None:
        return None
    key_mask = mask.any(-2)  # (B|1, 1|H, Nk)
    _check_decomposes(mask, key_mask, key_mask if n_q == n_k else None, causal=False)
    return key_mask


# --------------------------------------------------------------------------- the attention function
def decode_runs_exact(n_q: int, n_k: int, dim: int, dim_v: int, options: dict) -> bool:
    """A decode step (fewer queries than keys: new tokens against a KV cache) whose exact attention costs
    no more multiply-adds, n_q * n_k * (dim + dim_v + 1), than KDEformer's (hashing included)."""
    if n_q >= n_k:
        return False
    from .core import kde_multiply_adds

    exact = n_q * n_k * (dim + dim_v + 1)
    return exact <= kde_multiply_adds(n_q, n_k, dim, dim_v, include_hashing=True, is_causal=True, **options)


def _warn_dropout_once(dropout) -> None:
    global _warned_dropout
    if dropout and not _warned_dropout:
        warnings.warn("KDEformer attention does not apply attention-probability dropout", UserWarning, stacklevel=3)
        _warned_dropout = True


# Attention-call options that change the softmax itself, which KDEformer does not model.
_UNSUPPORTED_CALL_OPTIONS = {"softcap": "logit soft-capping (Gemma 2 style)", "s_aux": "attention sinks (gpt-oss style)",
                             "position_bias": "an additive position bias (T5 style)"}


def _refuse_unsupported(module, kwargs: dict) -> None:
    for name, what in _UNSUPPORTED_CALL_OPTIONS.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"{type(module).__name__} uses {what} ({name}={kwargs[name]!r}); KDEformer estimates "
                             "plain softmax attention and does not support it")


def _excluded(params: dict, layer: int) -> bool:
    """The ``layers`` setting leaves this layer to exact attention."""
    return params["layers"] is not None and layer not in params["layers"]


def _runs_exact(params: dict, layer: int, masks: KernelMasks, query, key, value, options: dict) -> bool:
    """Excluded layers, and decode steps where exact attention is cheaper (exact_decode)."""
    if _excluded(params, layer):
        return True
    if not (masks.is_causal and params["exact_decode"]):
        return False
    return decode_runs_exact(query.shape[2], key.shape[2], query.shape[3], value.shape[3], options)


def kdeformer_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: q (B, H, Nq, D), k/v (B, Hkv, Nk, .) -> ((B, Nq, H, Dv) contiguous, None)."""
    _warn_dropout_once(dropout)
    _refuse_unsupported(module, kwargs)
    key, value = match_kv_heads(query, key, value)  # (B, H, Nk, D), (B, H, Nk, Dv)
    causal = module_is_causal(module, kwargs)
    self_attention = not getattr(module, "is_cross_attention", False) and (causal or query.shape[2] == key.shape[2])
    masks = kernel_masks(attention_mask, query.shape[2], key.shape[2], causal=causal, self_attention=self_attention)
    key, value = key[:, :, : masks.n_keys], value[:, :, : masks.n_keys]
    params = get_settings(module)
    layer = _layer_index(module)
    options = {k: v for k, v in params.items() if k in _kernel_options()}
    if not causal:
        options.pop("local_window", None)  # sizes the causal local window only
    device = query.device
    call = dict(scale=scaling, is_causal=causal, return_trace=_recorder.get() is not None,
                key_mask=None if masks.key_mask is None else masks.key_mask.to(device),
                query_mask=None if masks.query_mask is None else masks.query_mask.to(device))
    # HF hands transposed views of (B, N, H, D) projections; the kernels want plain (B, H, N, D) memory.
    qkv = (query.contiguous(), key.contiguous(), value.contiguous())
    if _runs_exact(params, layer, masks, *qkv, options):
        out = exact_attention(*qkv, **call)  # (B, H, Nq, Dv), or (out, trace)
    else:
        out = kde_attention(*qkv, generator=_generator(params["seed"], layer, device), **call, **options)
    if call["return_trace"]:
        out, trace = out
        if not _excluded(params, layer):
            _recorder.get().append((layer, trace))
    return out.transpose(1, 2).contiguous(), None  # (B, Nq, H, Dv)


# --------------------------------------------------------------------------- registration
def register() -> None:
    """Register ``"kdeformer"`` with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, kdeformer_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # padding masks for encoders, causal + padding for decoders


def check_supported(model) -> None:
    """ValueError unless `model` routes its attention through transformers' AttentionInterface."""
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    if not getattr(model, "_supports_attention_backend", False):
        raise ValueError(
            f"{type(model).__name__} does not route its attention through transformers' AttentionInterface "
            "in this transformers version, so KDEformer cannot be plugged in (supported: BERT, RoBERTa, "
            "DistilBERT, ELECTRA, ALBERT, ViT, GPT-2, Llama, Qwen, Mistral, ...)"
        )


def use_kdeformer(model, **params):
    """Check `model`, switch all its layers to KDEformer attention and store `params`; returns the model."""
    check_supported(model)
    _validate(params, {**DEFAULTS, **(getattr(model.config, "kdeformer", None) or {})})  # before any change
    register()
    model.set_attn_implementation(NAME)
    if model.config._attn_implementation != NAME:
        raise ValueError(f"{type(model).__name__} refused attn_implementation={NAME!r}")
    configure(model, **params)
    return model


register()
