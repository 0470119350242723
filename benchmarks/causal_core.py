"""Causal KDEformer core (kdeformer.causal): design choices on MiniLM under a causal mask, and speed.

    python -m benchmarks.causal_core              # accuracy table + speed at N = 4096, 16384
    python -m benchmarks.causal_core --quick      # one seed, speed at N = 4096 only
    python -m benchmarks.causal_core --no-write   # print only

Accuracy: all-MiniLM-L6-v2 Q/K/V of the default text (6 layers x 12 heads, 512 tokens, float64) under a
bottom-right causal mask; mean relative spectral error ||O~ - O||_2 / ||O||_2 over the 72 heads against
exact causal attention, averaged over seeds. Budget b means bucket_size = b / 2, sample_size = b.
Each variant changes one design choice of the default (column_norm sampling, chunks of L = B / 4
queries, local window w = B, bucket part on, recent-row mix on). "cols" = columns every query
computes (local slots L - 1 + w, bucket B, heavy + sampled s): exact causal attention averages 256.5.

Speed: float32, D = 64, 4 heads, bucket_size = 64, sample_size = 128, `causal_kde` called directly
(the wrapper's checks excluded) against SDPA with is_causal=True (Nq = Nk, so SDPA's top-left alignment
is bottom-right too); interleaved, medians of 5 after a warm-up, one process, one thread (on a shared
machine extra threads oversubscribe the cores and distort both sides).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import contextmanager

import torch

from benchmarks._report import markdown_table, write_section

BUDGETS = (32, 64, 128, 256)
HEADS, DIM, BUCKET, SAMPLES, REPEATS = 4, 64, 64, 128, 5


def minilm_causal():
    """q, k, v (72, 512, 32) float64, scale, limits (72, 512) and the exact causal output."""
    from kdeformer import sources
    from kdeformer.causal import bottom_right_limits

    src = sources.minilm()
    q, k, v = (torch.as_tensor(getattr(src, name)).double().flatten(0, 1) for name in ("q", "k", "v"))  # (72, N, 32)
    n = q.shape[1]
    limits = bottom_right_limits(n, n).expand(q.shape[0], n).contiguous()  # (72, N)
    visible = torch.arange(n) < limits[0].unsqueeze(-1)  # (N, N)
    exact = torch.softmax((src.scale * q @ k.mT).masked_fill(~visible, float("-inf")), -1) @ v
    return q, k, v, src.scale, limits, exact


@contextmanager
def variant(**plan_overrides):
    """Run causal_kde with some plan fields set apart (chunk_len, bucket) or module constants changed."""
    import kdeformer.causal as C

    constants = {name: plan_overrides.pop(name) for name in ("RECENT_ROWS", "RECENT_MIX") if name in plan_overrides}
    saved = {name: getattr(C, name) for name in constants}
    original = C.plan_causal

    def plan(*args, **kwargs):
        overrides = {key: f(kwargs["bucket_size"]) for key, f in plan_overrides.items()}
        return original(*args, **{**kwargs, **overrides})

    C.plan_causal = plan
    for name, value in constants.items():
        setattr(C, name, value)
    try:
        yield plan
    finally:
        C.plan_causal = original
        for name, value in saved.items():
            setattr(C, name, value)


# name -> (sampling, local window as a function of B or None for the default, plan overrides)
VARIANTS = {
    "default (column_norm, L = B/4, w = B)": ("column_norm", None, {}),
    "value_norm (authors')": ("value_norm", None, {}),
    "uniform": ("uniform", None, {}),
    "w = B/2": ("column_norm", lambda b: b // 2, {}),
    "w = B/4": ("column_norm", lambda b: b // 4, {}),
    "chunks L = B": ("column_norm", None, {"chunk_len": lambda b: b}),
    "no recent-row mix": ("column_norm", None, {"RECENT_MIX": 0.0}),
    "bucket off, B more samples": ("column_norm", None, {"bucket": lambda b: 0}),
    "value_norm, bucket off, B more samples": ("value_norm", None, {"bucket": lambda b: 0}),
    "bucket off, B more heavy columns": ("column_norm", None, {"bucket": lambda b: 0, "heavy": True}),
}


def variant_error(data, name: str, budget: int, seeds) -> tuple[float, int]:
    """Mean relative spectral error of one variant at one budget, and its columns per query."""
    from kdeformer.causal import causal_kde
    from kdeformer.metrics import relative_spectral_error
    from kdeformer.random import Draws

    q, k, v, scale, limits, exact = data
    sampling, window, overrides = VARIANTS[name]
    overrides = dict(overrides)
    bucket = budget // 2
    sample = budget + (bucket if "bucket" in overrides else 0)
    heavy = sample // 4 + bucket if overrides.pop("heavy", False) else None  # the bucket's B columns go exact
    window = None if window is None else window(bucket)
    with variant(**overrides) as plan:
        errors = []
        for seed in seeds:
            out, _ = causal_kde(q, k, v, limits=limits, scale=scale, bucket_size=bucket, sample_size=sample,
                                num_projs=7, sampling=sampling, bucket_order="gray", local_window=window,
                                heavy_columns=heavy, estimate_rows=None, draws=Draws(seed, torch.arange(72) % 12),
                                return_trace=False)
            errors.append(relative_spectral_error(out, exact))
        cols = plan(limits, k.shape[1], bucket_size=bucket, sample_size=sample, local_window=window,
                    sampling=sampling, heavy_columns=heavy, estimate_rows=None).n_cols
    return sum(errors) / len(errors), cols


def accuracy_table(seeds) -> str:
    data = minilm_causal()
    rows = []
    for name in VARIANTS:
        cells = [variant_error(data, name, b, seeds) for b in BUDGETS]
        rows.append([name] + [f"{e:.3f} ({c})" for e, c in cells])
        print(json.dumps(rows[-1]), flush=True)
    return markdown_table(["variant"] + [f"b = {b}: error (cols)" for b in BUDGETS], rows)


def speed_calls(n: int):
    from kdeformer.causal import bottom_right_limits, causal_kde
    from kdeformer.random import Draws

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(HEADS, n, DIM, generator=g) for _ in range(3))  # (H, N, D)
    limits = bottom_right_limits(n, n).expand(HEADS, n).contiguous()

    def kde(sampling):
        return lambda: causal_kde(q, k, v, limits=limits, scale=DIM**-0.5, bucket_size=BUCKET, sample_size=SAMPLES,
                                  num_projs=7, sampling=sampling, bucket_order="gray", local_window=None,
                                  heavy_columns=None, estimate_rows=None, draws=Draws(1, torch.arange(HEADS)),
                                  return_trace=False)

    return {
        "column_norm": kde("column_norm"), "value_norm": kde("value_norm"),
        "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True),
    }


def speed_table(sizes) -> str:
    from kdeformer.causal import causal_multiply_adds

    rows = []
    for n in sizes:
        calls = speed_calls(n)
        times = {name: [] for name in calls}
        with torch.no_grad():
            for f in calls.values():
                f()
            for _ in range(REPEATS):
                for name, f in calls.items():
                    t0 = time.perf_counter()
                    f()
                    times[name].append(time.perf_counter() - t0)
        med = {name: statistics.median(t) for name, t in times.items()}
        limit = causal_multiply_adds(n, n, DIM, DIM, bucket_size=BUCKET, sample_size=SAMPLES) / (n * (n + 1) / 2 * 2 * DIM)
        rows.append([n, f"{med['sdpa'] * 1e3:.0f}", f"{med['column_norm'] * 1e3:.0f}",
                     f"{med['column_norm'] / med['sdpa']:.3f}", f"{med['value_norm'] / med['sdpa']:.3f}", f"{limit:.3f}"])
        print(json.dumps(rows[-1]), flush=True)
    header = ["N", "causal SDPA ms", "column_norm ms", "column_norm / SDPA", "value_norm / SDPA", "FLOP limit"]
    return markdown_table(header, rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    seeds = (1,) if args.quick else (1, 2, 3)
    body = __doc__.split("\n\n", 2)[2].strip() + "\n\n" + accuracy_table(seeds)
    body += "\n\nFLOP limit = `causal_multiply_adds` over exact causal attention's N (N + 1) / 2 * 2 D.\n\n"
    body += speed_table([4096] if args.quick else [4096, 16384])
    if not args.no_write:
        print("wrote", write_section("causal_core", "Causal KDEformer core: design choices and speed (issue 14)", body))


if __name__ == "__main__":
    main()
