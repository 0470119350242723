"""Adapter: KDEformer (kdeformer.kde_attention) behind the registry interface.

Budget = bucket_size + sample_size key columns per query.  Default split: bucket_size = budget / 3,
sample_size = 2 budget / 3 — the authors' convention of block m/2 with m samples (1.5 m columns).
Override with bucket_size=..., sample_size=... or bucket_fraction=...; every other option (num_projs,
sampling, bucket_order, and any option kde_attention gains later) is passed through unchanged.
"""
from __future__ import annotations

import inspect

from .. import core
from ._common import split_block_and_samples

BUDGET_PARAMS = ("bucket_size", "sample_size")
RESERVED = ("query", "key", "value", "scale", "key_mask", "generator", "return_trace", "is_causal")


def core_options() -> tuple[str, ...]:
    """kde_attention's keyword options, read from its signature (so new sampling modes show up)."""
    names = [n for n, prm in inspect.signature(core.kde_attention).parameters.items()
             if prm.kind is inspect.Parameter.KEYWORD_ONLY and n not in RESERVED]
    return tuple(names) + ("bucket_fraction",)


def sampling_modes() -> tuple[str, ...]:
    """The sampling modes kde_attention offers now (e.g. "value_norm", "uniform", "column_norm")."""
    return tuple(getattr(core, "SAMPLINGS", ("value_norm",)))


def split_budget(budget: int, bucket_size: int | None = None, sample_size: int | None = None,
                 bucket_fraction: float = 1 / 3, **passthrough) -> dict:
    bucket_size, sample_size = split_block_and_samples(
        budget, bucket_size, sample_size, bucket_fraction, "bucket_size", "bucket_fraction")
    return {"bucket_size": bucket_size, "sample_size": sample_size, **passthrough}


def kdeformer_method(query, key, value, *, scale=None, key_mask=None, generator=None, return_trace=False,
                     is_causal=False, **options):
    return core.kde_attention(query, key, value, scale=scale, key_mask=key_mask, generator=generator,
                              return_trace=return_trace, is_causal=is_causal, **options)


OPTIONS = core_options()


def multiply_adds(n_queries: int, n_keys: int, dim: int, dim_v: int, *, is_causal: bool = False, **params) -> int:
    """The core's own count (kdeformer.core.kde_multiply_adds: blocks, samples, heavy columns, estimation rows)."""
    return int(core.kde_multiply_adds(n_queries, n_keys, dim, dim_v, is_causal=is_causal, **params))
