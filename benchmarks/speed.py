"""Speed and peak memory of kde_attention against torch SDPA and a plain softmax(QK^T)V.

    python -m benchmarks.speed            # N in 1024 ... 32768, writes benchmarks/RESULTS.md
    python -m benchmarks.speed --quick    # N in 1024, 4096 only

Setting (issue 2): D = 64, 4 heads, float32, bucket_size = 64, sample_size = 128. Times are medians of
several runs after a warm-up, reported as ratios to SDPA measured in the same run. Peak memory is the
rise of the process's peak resident set (VmHWM, reset through /proc/self/clear_refs just before
the call) while one call runs.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch

from benchmarks._report import markdown_table, write_section

HEADS, DIM, BUCKET, SAMPLES = 4, 64, 64, 128


def inputs(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (1, HEADS, n, DIM)  # (B, H, N, D)
    return tuple(torch.randn(shape, generator=g) for _ in range(3))


def run(method: str, q, k, v):
    import kdeformer as K

    if method == "kdeformer":
        return K.kde_attention(q, k, v, bucket_size=BUCKET, sample_size=SAMPLES, generator=torch.Generator().manual_seed(0))
    if method == "sdpa":
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)
    if method == "naive":
        return torch.softmax(q @ k.mT / math.sqrt(q.shape[-1]), -1) @ v
    raise ValueError(method)


def median_time(method: str, n: int, repeats: int) -> float:
    q, k, v = inputs(n)
    run(method, q, k, v)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(method, q, k, v)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def peak_memory_mib(method: str, n: int) -> float:
    """Peak resident-set rise of one call (VmHWM reset through /proc/self/clear_refs, as in peers)."""
    from benchmarks.peers import peak_memory_mib as measure

    q, k, v = inputs(n)
    mib = measure(lambda: run(method, q, k, v), torch.device("cpu"))[1]
    return float("nan") if mib is None else mib


def flop_ratio(n: int) -> float:
    """Multiply-adds of exact attention over those of the heavy blocks plus the samples."""
    return n / (BUCKET + SAMPLES)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="N in 1024, 4096 only")
    parser.add_argument("--sizes", type=int, nargs="*", default=None)
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    args = parser.parse_args(argv)
    sizes = args.sizes or ([1024, 4096] if args.quick else [1024, 4096, 16384, 32768])
    rows = []
    for n in sizes:
        repeats = 7 if n <= 4096 else 3
        t_kde = median_time("kdeformer", n, repeats)
        t_sdpa = median_time("sdpa", n, max(2, repeats // 2))
        t_naive = median_time("naive", n, 2) if n <= 16384 else float("nan")
        mem = {m: peak_memory_mib(m, n) for m in ("kdeformer", "sdpa")}
        mem["naive"] = peak_memory_mib("naive", n) if n <= 16384 else float("nan")
        row = [
            n,
            f"{t_sdpa * 1e3:.1f}",
            f"{t_kde * 1e3:.1f}",
            f"{t_kde / t_sdpa:.3f}",
            f"{t_naive / t_sdpa:.2f}" if t_naive == t_naive else "not run (64 GiB of logits)",
            f"{1 / flop_ratio(n):.3f}",
            f"{mem['kdeformer']:.0f}",
            f"{mem['sdpa']:.0f}",
            f"{mem['naive']:.0f}" if mem["naive"] == mem["naive"] else "-",
        ]
        print(json.dumps(dict(zip(["N", "sdpa_ms", "kde_ms", "kde/sdpa", "naive/sdpa", "flop_ratio"], row))), flush=True)
        rows.append(row)
    header = [
        "N", "SDPA ms", "KDEformer ms", "KDEformer / SDPA", "naive / SDPA", "FLOP ratio (limit)",
        "KDEformer peak MiB", "SDPA peak MiB", "naive peak MiB",
    ]
    body = (
        f"float32, D = {DIM}, {HEADS} heads, batch 1, bucket_size = {BUCKET}, sample_size = {SAMPLES}; "
        "median of several runs after a warm-up, ratios measured in the same run. "
        "FLOP ratio = (bucket_size + sample_size) / N, the share of exact attention's multiply-adds "
        "that KDEformer performs: the time ratio could reach it only if both ran at the same FLOP rate. "
        "Peak MiB = rise of the peak resident set (VmHWM, reset just before) during one call.\n\n"
        + markdown_table(header, rows)
    )
    if not args.no_write:
        print("wrote", write_section("speed", "Speed and memory: kde_attention vs SDPA (issue 2)", body))


if __name__ == "__main__":
    main()
