"""The one home of KDEformer's default settings: the core, the Hugging Face plug-in and the explorer read
them from here.

The default sampling is the most accurate estimator the project has: "pps" (block-centroid PPS sampling
without replacement with an exact token window, kdeformer.pps; on MiniLM's 72 heads at 512 tokens its
mean relative spectral error is 0.22 / 0.11 / 0.07 at budgets 64 / 128 / 192 against column_norm's
0.49 / 0.32 / 0.24, at lower cost; GloVe: lower at every scaling measured). Causal attention, which has no
pps form yet, runs "column_norm" (the paper's theory made practical). The authors' own choice is one
argument away: ``sampling="value_norm"``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class KDEDefaults:
    bucket_size: int = 64  # keys per block computed exactly
    sample_size: int = 128  # key columns each query pays for beyond its block (heavy columns included)
    num_projs: int = 7  # hash bits r: 2^r buckets
    sampling: str = "pps"  # the best estimator; "value_norm" is the authors'
    bucket_order: str = "gray"  # true Gray order; "authors" reproduces the authors' ordering
    heavy_columns: int | None = None  # None: the scheme's own default (column_norm: sample_size // 4, else 0)
    estimate_rows: int | None = None  # None: the scheme's own default (at most half the sampling's cost)
    local_window: int | None = None  # causal only; None: the core's default window

    def as_dict(self) -> dict:
        return asdict(self)


KDE_DEFAULTS = KDEDefaults()
AUTHORS_SAMPLING = "value_norm"  # the authors' estimator, named as theirs wherever it is offered
