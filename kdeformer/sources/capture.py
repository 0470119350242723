"""Model capture: find a transformers model's attention layers and record the Q/K/V they multiply.

Two ways, chosen by the model:

* encoders (BERT, RoBERTa, DistilBERT, ELECTRA, ALBERT, ViT, ...): forward hooks on the separate
  query/key/value ``nn.Linear`` projections (:func:`find_attention_projections`, :func:`capture_projections`);
* decoders (GPT-2, Llama, Qwen, Mistral, ...): their projections may be fused (GPT-2's ``c_attn``) and their
  queries and keys are rotated after projection (RoPE), so the tensors are recorded where attention is
  computed, inside an attention function registered with transformers' ``AttentionInterface`` under
  :data:`CAPTURE_NAME` (:func:`capture_attention_inputs`); it then runs transformers' own SDPA attention.

``kdeformer.hf`` uses the same helpers (layer numbering, causal detection, grouped key/value heads).
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import threading
import time
from dataclasses import dataclass
from numbers import Integral, Real

import torch

from .._checks import check_int

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
    ("q_proj", "k_proj", "v_proj"),  # CLIP / Whisper / BART-style encoders, Llama-style decoders
)

CAPTURE_NAME = "kdeformer_capture"  # attention implementation that records q, k, v, then runs SDPA

_captured: contextvars.ContextVar[list | None] = contextvars.ContextVar("kdeformer_captured", default=None)
_call_limit: contextvars.ContextVar[int | None] = contextvars.ContextVar("kdeformer_call_limit", default=None)
_stop_check: contextvars.ContextVar = contextvars.ContextVar("kdeformer_stop_check", default=None)


class CaptureStopped(Exception):
    """A capture abandoned part-way because the check given to :func:`stopping_when` returned True."""


class _AllRecorded(Exception):
    """Raised from inside the forward once every requested layer is recorded: the rest is not needed."""


PAUSE_POLL_S = 0.003  # a paused capture looks again this often


@contextlib.contextmanager
def stopping_when(check, pause=None):
    """Inside the block (this thread's context only), every capture polls before each of the model's
    leaf modules: ``check()`` True raises :class:`CaptureStopped`; while ``pause()`` is True it waits
    (looking again every PAUSE_POLL_S) and then goes on where it was. A background capture thus gives the
    cores back within one module's work (a few ms) and keeps what it has done."""
    if not callable(check) or (pause is not None and not callable(pause)):
        raise ValueError(f"check must be a callable and pause a callable or None, got {check!r} and {pause!r}")
    token = _stop_check.set((check, pause))
    try:
        yield
    finally:
        _stop_check.reset(token)


def _poll_stop() -> None:
    checks = _stop_check.get()
    if checks is None:
        return
    check, pause = checks
    while True:
        if check():
            raise CaptureStopped("capture stopped: its stop check returned True")
        if pause is None or not pause():
            return
        time.sleep(PAUSE_POLL_S)


_ONE_CAPTURE = threading.Lock()  # one capture at a time: hooks on a shared model see every thread's forward


def _run_until_recorded(model, inputs: dict) -> None:
    """One forward without gradients, cut short (by _AllRecorded) once the hooks have what they need.
    Under :func:`stopping_when`, the stop check is polled before every leaf module (a few ms apart)."""
    polls = []
    if _stop_check.get() is not None:
        polls = [m.register_forward_pre_hook(lambda *_: _poll_stop()) for m in model.modules()
                 if next(m.children(), None) is None]
    try:
        with torch.no_grad():
            model(**inputs)
    except _AllRecorded:
        pass
    finally:
        for h in polls:
            h.remove()


# --------------------------------------------------------------------------- what kind of model
def is_decoder_config(config) -> bool:
    """True for causal (decoder) models: ``is_decoder``, a decoder model type or a CausalLM/LMHead class."""
    archs = list(getattr(config, "architectures", None) or [])
    causal_arch = [a for a in archs if "CausalLM" in a or "LMHead" in a]
    model_type = getattr(config, "model_type", "")
    return bool(getattr(config, "is_decoder", False) or model_type in DECODER_MODEL_TYPES or causal_arch)


def check_encoder_config(config) -> None:
    """ValueError for decoder (causal) configs, for callers that need an encoder (bidirectional attention)."""
    if is_decoder_config(config):
        archs = list(getattr(config, "architectures", None) or [])
        why = f"model_type={getattr(config, 'model_type', '')!r}" + (f", architectures={archs}" if archs else "")
        raise ValueError(f"this is a decoder (causal) model ({why}), not an encoder with bidirectional attention")


def module_is_causal(module, kwargs: dict) -> bool:
    """Whether one attention call is causal: the call's ``is_causal`` or the module's own flag."""
    flag = kwargs.get("is_causal")
    if flag is None:
        flag = getattr(module, "is_causal", False)
    return bool(flag)


def match_kv_heads(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
    """Repeat grouped key/value heads (GQA/MQA) so key and value have the query's H heads.

    query (B, H, Nq, D), key (B, Hkv, Nk, D), value (B, Hkv, Nk, Dv) -> key (B, H, Nk, D), value (B, H, Nk, Dv).
    """
    heads = query.shape[1]
    if key.shape[1] == heads:
        return key, value
    reps = heads // key.shape[1]
    return key.repeat_interleave(reps, dim=1), value.repeat_interleave(reps, dim=1)


# --------------------------------------------------------------------------- encoders: projection hooks
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


def _projections_of(name: str, module, config) -> _Projections | None:
    """The module's query/key/value Linear layers and head geometry, or None when it has none."""
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
        return _Projections(name, module, linears, heads, int(head_dim), scale)
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
        proj = _projections_of(name, module, config)
        if proj is not None:
            found.append(proj)
    if not found:
        expected = ", ".join("/".join(n) for n in PROJECTION_NAMES)
        raise ValueError(
            f"{type(model).__name__} has no attention module with separate query/key/value nn.Linear "
            f"projections (expected attributes {expected}); models with fused or custom projections are "
            "not supported"
        )
    return found


def _stack_heads(outputs: list[torch.Tensor], heads: list[int]) -> torch.Tensor:
    """Per-layer projection outputs (1, N, H * D) -> float32 (L, H, N, D)."""
    per_layer = []
    for out, h in zip(outputs, heads):
        if out.shape[0] != 1:
            raise ValueError(f"inputs must hold one example (batch 1), got batch {out.shape[0]}")
        n = out.shape[1]
        per_layer.append(out[0].reshape(n, h, -1).transpose(0, 1))  # (H, N, D)
    return torch.stack(per_layer).to(torch.float32).contiguous()  # (L, H, N, D)


def capture_projections(model, projections: list[_Projections], inputs: dict,
                        num_layers: int | None = None) -> tuple[torch.Tensor, ...]:
    """Run the model once, recording the projections' outputs; returns q, k, v float32 (L, H, N, D).

    num_layers: record only the first num_layers layers (None: all). The forward stops right after the
    last recorded projection (later layers, and the last layer's attention and feed-forward, never run);
    the first layers are exactly those of a full capture.
    """
    n = len(projections) if num_layers is None else check_int("num_layers", num_layers, minimum=1,
                                                               maximum=len(projections))
    store: dict[tuple[int, int], torch.Tensor] = {}
    handles = []

    def hook_for(layer: int, which: int):
        def hook(_module, _args, output):
            store[(layer, which)] = output.detach()
            if len(store) == 3 * n:
                raise _AllRecorded

        return hook

    with _ONE_CAPTURE:
        for layer, proj in enumerate(projections[:n]):
            for which, linear in enumerate(proj.linears):
                handles.append(linear.register_forward_hook(hook_for(layer, which)))
        try:
            _run_until_recorded(model, inputs)
        finally:
            for h in handles:
                h.remove()
    missing = [key for key in ((layer, which) for layer in range(n) for which in range(3)) if key not in store]
    if missing:
        raise ValueError(f"{type(model).__name__}'s forward skipped projections {missing} (layer, q/k/v)")
    heads = [p.num_heads for p in projections[:n]]
    return tuple(_stack_heads([store[(layer, which)] for layer in range(n)], heads) for which in range(3))


# --------------------------------------------------------------------------- decoders: an attention function
@dataclass
class CapturedCall:
    """One attention call as the model made it (after RoPE, grouped heads repeated)."""

    query: torch.Tensor  # (B, H, Nq, D)
    key: torch.Tensor  # (B, H, Nk, D)
    value: torch.Tensor  # (B, H, Nk, Dv)
    scale: float
    is_causal: bool


def _capture_attention_forward(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """transformers attention function: record (q, k, v, scale, causal) when capturing, then run SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    calls = _captured.get()
    if calls is not None:
        k, v = match_kv_heads(query, key, value)
        scale = float(scaling) if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
        calls.append(CapturedCall(query.detach(), k.detach(), v.detach(), scale, module_is_causal(module, kwargs)))
        if len(calls) == _call_limit.get():
            raise _AllRecorded
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


def register_capture() -> None:
    """Register :data:`CAPTURE_NAME` with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(CAPTURE_NAME, _capture_attention_forward)
    AttentionMaskInterface.register(CAPTURE_NAME, sdpa_mask)


@contextlib.contextmanager
def recording_attention_calls(limit: int | None = None):
    """Collect a :class:`CapturedCall` for every attention call of a model loaded with CAPTURE_NAME;
    with `limit`, the forward is cut short (see :func:`capture_attention_inputs`) after that many calls."""
    calls: list = []
    token, limit_token = _captured.set(calls), _call_limit.set(limit)
    try:
        yield calls
    finally:
        _captured.reset(token)
        _call_limit.reset(limit_token)


def capture_attention_inputs(model, inputs: dict, num_layers: int | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list, bool]:
    """Run a model loaded with ``attn_implementation=CAPTURE_NAME`` once on one example.

    Returns q, k, v float32 (L, H, N, D) (one entry per attention call, in call order = layer order),
    the scale of each layer and whether the layers are causal. num_layers: record only the first
    num_layers calls, and stop the forward there (None: all).
    """
    if num_layers is not None:
        check_int("num_layers", num_layers, minimum=1)
    with _ONE_CAPTURE, recording_attention_calls(num_layers) as calls:
        _run_until_recorded(model, inputs)
    if not calls:
        raise ValueError(f"{type(model).__name__} made no attention call through transformers' AttentionInterface")
    if num_layers is not None and len(calls) < num_layers:
        raise ValueError(f"num_layers must be an integer in [1, {len(calls)}] (the model's attention layers), "
                         f"got {num_layers}")
    if calls[0].query.shape[0] != 1:
        raise ValueError(f"inputs must hold one example (batch 1), got batch {calls[0].query.shape[0]}")
    q, k, v = (torch.stack([getattr(c, part)[0] for c in calls]).to(torch.float32).contiguous()
               for part in ("query", "key", "value"))  # (L, H, N, D) each
    return q, k, v, [c.scale for c in calls], all(c.is_causal for c in calls)
