"""Seeded toy attention for teaching what LSH blocks can and cannot do (torch only)."""
from __future__ import annotations

import math

import torch

from .._checks import check_choice, check_int
from .container import AttentionSource

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
