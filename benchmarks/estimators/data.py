"""The data every variant is measured on, loaded once per process.

MiniLM: all 72 heads (6 layers x 12 heads) of all-MiniLM-L6-v2 at 512 tokens of a text, as (72, N, D)
float32 tensors, with the exact output in float64.  Texts: the project's default text and three texts
cut from the bundled corpus (kdeformer/data/corpus.txt, 45 paragraphs on 15 topics, in order):
"corpus-a" = paragraphs 1-15 (topics 1-5), "corpus-b" = 16-30, "corpus-c" = 31-45 (each > 512 tokens);
"mixed-1", "mixed-2": all paragraphs in a seeded random order (held out: measured after the tuning).
GloVe: kdeformer.sources.glove(8192, scaling) as in benchmarks/peers.py (Q = K, one head).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from kdeformer import exact_attention, sources

CACHE = Path("/tmp/est_cache")  # disk cache of the MiniLM captures (outside the repository)
TEXTS = ("default", "corpus-a", "corpus-b", "corpus-c")


@dataclass
class Heads:
    """One data set: q, k (G, N, D) and v (G, N, Dv) float32, scale, exact output (G, N, Dv) float64."""

    name: str
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float
    exact: torch.Tensor
    exact_norm: torch.Tensor  # (G,) spectral norm of each head's exact output


def text_of(name: str) -> str | None:
    """The text called `name` (None = the default text of kdeformer.sources.minilm).  "mixed-<seed>":
    the 45 corpus paragraphs in a seeded random order (topics interleaved), for texts no variant was tuned on."""
    if name == "default":
        return None
    if name.startswith("mixed-"):
        paragraphs = sources.corpus()
        order = torch.randperm(len(paragraphs), generator=torch.Generator().manual_seed(int(name.split("-")[1])))
        return "\n\n".join(paragraphs[i] for i in order.tolist())
    part = "abc".index(name.split("-")[1])
    return "\n\n".join(sources.corpus()[15 * part: 15 * part + 15])


def with_exact(name: str, q, k, v, scale: float) -> Heads:
    exact = exact_attention(q.double(), k.double(), v.double(), scale=scale)  # (G, N, Dv)
    return Heads(name, q, k, v, scale, exact, torch.linalg.matrix_norm(exact, ord=2))


def minilm_heads(name: str) -> Heads:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "text has 686 tokens; cut to the first 512"
        src = sources.minilm(text_of(name), cache_dir=CACHE)
    n = src.num_tokens
    q, k, v = (x.reshape(-1, n, x.shape[-1]).float().contiguous() for x in (src.q, src.k, src.v))  # (72, N, D)
    return with_exact(name, q, k, v, src.scale)


def glove_heads(scaling: str, n: int = 8192) -> Heads:
    src = sources.glove(n=n, scaling=scaling, seed=0)
    q, k, v = (x.reshape(1, n, x.shape[-1]).float() for x in (src.q, src.k, src.v))  # (1, N, 50)
    return with_exact(f"glove-{scaling}", q, k, v, src.scale)


def relative_errors(heads: Heads, approx: torch.Tensor) -> torch.Tensor:
    """||O~ - O||_2 / ||O||_2 per head (G,), float64 (kdeformer.metrics.relative_spectral_error's form)."""
    diff = torch.linalg.matrix_norm(approx.double() - heads.exact, ord=2)
    return diff / heads.exact_norm
