"""Input checks shared by every attention function: one clear ValueError per mistake.

Each message names the argument, what it got and what is allowed, so a user who passes
(B, N, H, D) instead of (B, H, N, D), or a mask of the wrong shape, learns it at once.
"""
from __future__ import annotations

import math
from numbers import Integral, Real

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_int(name: str, value, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """An integer in [minimum, maximum] (either bound optional); bools, floats and strings are refused."""
    if minimum is not None and maximum is not None:
        allowed = f"an integer in [{minimum}, {maximum}]"
    elif minimum is not None:
        allowed = f"an integer >= {minimum}"
    elif maximum is not None:
        allowed = f"an integer <= {maximum}"
    else:
        allowed = "an integer"
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{name} must be {allowed}, got {value!r} ({type(value).__name__})")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be {allowed}, got {value}")
    return value


def check_positive_int(name: str, value, *, maximum: int | None = None) -> int:
    """An integer >= 1 (and <= maximum when given)."""
    return check_int(name, value, minimum=1, maximum=maximum)


def check_index(name: str, value, size: int) -> int:
    """An index in [0, size - 1] (a layer, a head, a row)."""
    return check_int(name, value, minimum=0, maximum=size - 1)


def check_flag(name: str, value) -> bool:
    """A real bool (True/False); strings such as "yes" and numbers are refused."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return value


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")
    return value


def check_scale(scale, head_dim: int) -> float:
    """`scale` defaults to 1/sqrt(D), like torch's scaled_dot_product_attention."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        scale = scale.item()
    if isinstance(scale, bool) or not isinstance(scale, Real) or not math.isfinite(float(scale)):
        raise ValueError(f"scale must be a finite real number or None (1/sqrt(D)), got {scale!r}")
    return float(scale)


def check_qkv(query, key, value) -> tuple[tuple[int, ...], int, int, int, int]:
    """Check layout (..., N, D) for query/key and (..., Nk, Dv) for value.

    Returns (leading_shape, n_queries, n_keys, head_dim, value_dim).
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise ValueError(f"{name} must have shape (..., N, D) with at least 2 dims, got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if not (query.dtype == key.dtype == value.dtype):
        raise ValueError(f"query, key and value must share one dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
    if not (query.device == key.device == value.device):
        raise ValueError(f"query, key and value must be on one device, got {query.device}, {key.device}, {value.device}")
    if not (query.dim() == key.dim() == value.dim()):
        raise ValueError(
            "query, key and value must have the same number of dims (..., N, D), got shapes "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    lead = tuple(query.shape[:-2])
    if tuple(key.shape[:-2]) != lead or tuple(value.shape[:-2]) != lead:
        raise ValueError(
            "query, key and value must share their leading (batch, head) dims; layout is (..., N, D) like "
            f"scaled_dot_product_attention's (B, H, N, D), got shapes {tuple(query.shape)}, "
            f"{tuple(key.shape)}, {tuple(value.shape)}"
        )
    n_q, d = query.shape[-2], query.shape[-1]
    n_k = key.shape[-2]
    if key.shape[-1] != d:
        raise ValueError(f"key's last dim must equal query's head dim D={d}, got key shape {tuple(key.shape)}")
    if value.shape[-2] != n_k:
        raise ValueError(f"value must have Nk={n_k} rows like key, got value shape {tuple(value.shape)}")
    if n_q == 0 or n_k == 0 or d == 0 or value.shape[-1] == 0:
        raise ValueError(
            f"query, key and value must be non-empty, got shapes {tuple(query.shape)}, {tuple(key.shape)}, "
            f"{tuple(value.shape)}"
        )
    for name, t in (("query", query), ("key", key), ("value", value)):
        low, high = torch.aminmax(t)  # one pass, no temporary; NaN propagates, Inf shows as a bound
        if not (bool(torch.isfinite(low)) and bool(torch.isfinite(high))):
            raise ValueError(f"{name} contains NaN or Inf; every entry must be finite")
    return lead, n_q, n_k, d, value.shape[-1]


def check_bool_mask(name: str, mask, lead: tuple[int, ...], n: int, axis: str, meaning: str, device) -> torch.Tensor:
    """A bool (..., N) mask broadcastable against the leading dims, expanded to (*lead, N)."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{name} must be a bool tensor (True = {meaning}), got {got}")
    if mask.device != device:
        raise ValueError(f"{name} must be on {device}, got {mask.device}")
    want = (*lead, n)
    wrong = f"{name} must have shape (..., {axis}) broadcastable to {want}, got {tuple(mask.shape)}"
    if mask.dim() < 1 or mask.shape[-1] != n or mask.dim() > len(want):
        raise ValueError(wrong)
    try:
        return mask.expand(want)
    except RuntimeError:
        raise ValueError(wrong) from None


def check_key_mask(key_mask, lead: tuple[int, ...], n_keys: int, device) -> torch.Tensor | None:
    """Bool (*lead, Nk), broadcastable against the leading dims; True = attend.

    Returns the mask expanded to (*lead, Nk), or None.
    """
    if key_mask is None:
        return None
    expanded = check_bool_mask("key_mask", key_mask, lead, n_keys, "Nk", "attend", device)
    if not bool(key_mask.any(-1).all()):
        raise ValueError("key_mask masks every key of some row; each row needs at least one True (attended) key")
    return expanded


def check_generator(generator, device) -> torch.Generator | None:
    if generator is None:
        return None
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if torch.device(generator.device).type != torch.device(device).type:
        raise ValueError(f"generator must live on the inputs' device ({device}), got {generator.device}")
    return generator


def check_query_mask(query_mask, lead: tuple[int, ...], n_queries: int, device) -> torch.Tensor | None:
    """Bool (..., Nq) broadcastable against the leading dims; True = a real query (False: padding).

    Returns the mask expanded to (*lead, Nq), or None. A row may mask every query (an empty sequence).
    """
    if query_mask is None:
        return None
    return check_bool_mask("query_mask", query_mask, lead, n_queries, "Nq", "real query", device)
