"""Speed and peak memory of kde_attention (every sampling scheme) against torch SDPA.

    python -m benchmarks.speed            # N in 1024 ... 32768, writes benchmarks/RESULTS.md
    python -m benchmarks.speed --quick    # N in 1024, 4096 only
    python -m benchmarks.speed --corners  # only the explorer's corner settings at N = 512

Setting (issue 2): D = 64, 4 heads, float32, bucket_size = 64, sample_size = 128. For each N the
schemes and SDPA run interleaved (scheme 1, scheme 2, ..., SDPA, again) REPEATS times after a warm-up,
so machine noise hits them alike; times are medians, reported as ratios to SDPA's median. Peak memory is
the rise of the process's peak resident set (VmHWM, reset through /proc/self/clear_refs just before the
call). The FLOP limit is the default estimator's multiply-adds over exact attention's
(`kdeformer.core.kde_multiply_adds`, its estimates included): the time ratio could reach it only if
both ran at the same FLOP rate. The profile's top operators of the default estimator at the largest N
show where the rest goes. The medians carry the noise of a shared machine; the best-of-runs ratio of
the default estimator (its fastest run over SDPA's fastest) is reported beside them.

The explorer's corners: every scheme at N = 512 (one MiniLM-sized head, D = 32) at the corners of the
slider ranges (bucket_size 1 / 256 / 512, sample_size 1 / 1024 / 2048, num_projs 1 / 16), with the
trace the explorer draws from; the target is < 100 ms a setting.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from benchmarks._report import markdown_table, write_section

HEADS, DIM, BUCKET, SAMPLES, REPEATS = 4, 64, 64, 128, 7


def inputs(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (1, HEADS, n, DIM)  # (B, H, N, D)
    return tuple(torch.randn(shape, generator=g) for _ in range(3))


def call(method: str, q, k, v):
    """One call of a scheme ("pps", "column_norm", "value_norm", "uniform") or of SDPA."""
    import kdeformer as K

    if method == "sdpa":
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)
    with torch.no_grad():
        return K.kde_attention(q, k, v, bucket_size=BUCKET, sample_size=SAMPLES, sampling=method,
                               generator=torch.Generator().manual_seed(0))


def interleaved_times(methods, q, k, v, repeats: int) -> dict:
    """Seconds of each run of each method, the methods run in turn `repeats` times after one warm-up each."""
    times = {m: [] for m in methods}
    for m in methods:
        call(m, q, k, v)
    for _ in range(repeats):
        for m in methods:
            t0 = time.perf_counter()
            call(m, q, k, v)
            times[m].append(time.perf_counter() - t0)
    return times


CORNERS = [(1, 2048), (1, 1024), (1, 1), (256, 1), (256, 1024), (512, 1), (64, 128)]


def corner_table(repeats: int = 3) -> str:
    """Kernel time (best of `repeats`, trace included) of every scheme at the explorer's corners, N = 512."""
    import kdeformer as K

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(512, 32, generator=g) * 2 for _ in range(3))  # (N, D): one head
    rows, slowest = [], (0.0, None)
    for bucket, samples in CORNERS:
        for projs in (1, 16):
            row = [bucket, samples, projs]
            for sampling in K.SAMPLINGS:
                best = float("inf")
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    K.kde_attention(q, k, v, bucket_size=bucket, sample_size=samples, num_projs=projs, sampling=sampling,
                                    generator=torch.Generator().manual_seed(0), return_trace=True)
                    best = min(best, time.perf_counter() - t0)
                row.append(f"{best * 1e3:.0f}")
                slowest = max(slowest, (best, f"{sampling} at {bucket} / {samples} / {projs}"), key=lambda x: x[0])
            rows.append(row)
    table = markdown_table(["bucket_size", "sample_size", "num_projs"] + [f"{s} ms" for s in K.SAMPLINGS], rows)
    return table + f"\n\nSlowest setting: {slowest[0] * 1e3:.0f} ms ({slowest[1]}); the target is < 100 ms."


# What issue 12's speed work measured (kept: same draws and the same output bits, checked against a
# snapshot of outputs and traces over 156 settings; timed interleaved in one process against the previous
# commit, wall clock and process CPU time, 1 and 2 threads). Written under the table on every run.
VARIANTS = """Issue 12, the default estimator's speed: what was measured (each change keeps the draws and the output
bits; timed interleaved against the commit before it, wall clock and CPU time, 1 and 2 threads).

Kept:
- capped PPS finds its k among the 1, then 16, then all C largest weights instead of a full top-C per row
  (`inclusion_probabilities`: 9.2 -> 1.8 ms a call at N = 16384, 2 threads); the float64 cumulative pi is
  summed in place in its copy (one fresh 8 B x ng x Nk buffer less per head);
- the pps block pass cuts chunks at 8192 gathered (block, column) rows as well as 4096 query rows: with
  query blocks of 32 (N <= 4096) a chunk gathered ~20000 key and value rows into 5 MB buffers that came
  back as fresh pages every chunk (N = 4096: 0.80x, N = 1024: ~0.75x the time, 1 thread);
- the window test without bounds checks (0.90x of that step), [w v, w] written into one buffer, queries
  scaled in place (also in the key-block schemes' pass);
- column_norm / value_norm: inverse_cdf looks up the last positive index only for a uniform that rounds up
  to the total (was a full pass per row), the splitmix64 mixing in place (2-4x faster), the importance and
  floor mix in one buffer (see the regression section).

Tried and dropped (no gain measured, or slower):
- window logits one offset at a time instead of one (G, R, D, W) product: the torch profiler put 38-62 ms
  on that product, the wall clock shows none of it (1.03x, noise); on this machine the profiler inflates
  ops that write big fresh buffers, so phases were timed with clocks around each step;
- one search per query for the window exclusion instead of one per window key: 7x fewer searches, twice
  the tensor ops, 1.3x slower per chunk;
- one float64 buffer for the cumulative pi reused across heads: 0.98x (noise);
- smaller window-merge chunks (MERGE_ROWS 512 / 1024 / 2048: 1.00-1.05x) and smaller chunks for the key-block
  schemes (CHUNK_ROWS 1024 / 2048: no gain); pps chunks of 1024 / 2048 / 8192 rows at N = 16384: 0.98-1.03x;
- the gathered keys transposed for an NN GEMM: the NT GEMM is as fast once measured interleaved.
Not tried, because they change the draws or the output bits: hashing through a padded or reshaped GEMM (a
padded GEMM rounds differently at D = 128, so a code bit can flip), dense attention at small N, a fused
window GEMM, larger query blocks (Bq is part of the estimator).

Where the time goes now (clocks around each step, N = 16384, 2 threads, ~110 ms a call): the block pass
~62 ms (its two GEMMs ~21 ms, gathers, the window exclusion, exp, writing token rows), the plan ~30 ms
(centroid GEMM and exp ~9 ms, the float64 cumulative pi and its searches ~12 ms), the window merge
~15 ms, hashing the queries ~5.5 ms (a GEMM with 7 columns that runs at ~5 GFLOP/s). The 0.030x target
needs 57-68 ms (SDPA took 1.9-2.3 s in the runs of this session): out of reach without changing the estimator (larger query blocks, fewer columns) or the
hashing's arithmetic."""


def peak_memory_mib(method: str, q, k, v) -> float:
    from benchmarks.peers import peak_memory_mib as measure

    mib = measure(lambda: call(method, q, k, v), torch.device("cpu"))[1]
    return float("nan") if mib is None else mib


def flop_limit(n: int, sampling: str) -> float:
    """The scheme's multiply-adds over exact attention's (2 N^2 D + N^2 for the normaliser)."""
    from kdeformer.core import kde_multiply_adds

    ours = kde_multiply_adds(n, n, DIM, DIM, bucket_size=BUCKET, sample_size=SAMPLES, sampling=sampling)
    return ours / (n * n * (DIM + DIM + 1))


def profile_top(n: int, sampling: str, rows: int = 8) -> str:
    """The top operators by self CPU time of one call, as a markdown table."""
    from torch.profiler import ProfilerActivity, profile

    q, k, v = inputs(n)
    call(sampling, q, k, v)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        call(sampling, q, k, v)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    body = [[e.key, f"{e.self_cpu_time_total / 1e3:.1f}", f"{100 * e.self_cpu_time_total / total:.0f} %", e.count]
            for e in events]
    return markdown_table(["operator", "self ms", "share", "calls"], body)


def main(argv=None):
    import kdeformer as K

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="N in 1024, 4096 only")
    parser.add_argument("--sizes", type=int, nargs="*", default=None)
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    parser.add_argument("--corners", action="store_true", help="only the explorer's corner settings")
    args = parser.parse_args(argv)
    if args.corners:
        print(corner_table())
        return
    sizes = args.sizes or ([1024, 4096] if args.quick else [1024, 4096, 16384, 32768])
    schemes = list(K.SAMPLINGS)
    default = K.KDE_DEFAULTS.sampling
    rows = []
    for n in sizes:
        q, k, v = inputs(n)
        times = interleaved_times(schemes + ["sdpa"], q, k, v, args.repeats)
        med = {m: statistics.median(t) for m, t in times.items()}
        row = [n, f"{med['sdpa'] * 1e3:.0f}"] + [f"{med[s] / med['sdpa']:.3f}" for s in schemes]
        row += [f"{min(times[default]) / min(times['sdpa']):.3f}"]
        row += [f"{flop_limit(n, default):.4f}", f"{peak_memory_mib(default, q, k, v):.0f}",
                f"{peak_memory_mib('sdpa', q, k, v):.0f}"]
        print(json.dumps(row), flush=True)
        rows.append(row)
    header = (["N", "SDPA ms"] + [f"{s}{' (default)' if s == default else ''} / SDPA" for s in schemes]
              + [f"{default} best / SDPA best", f"FLOP limit ({default})", f"{default} peak MiB", "SDPA peak MiB"])
    body = (
        f"float32, D = {DIM}, {HEADS} heads, batch 1, bucket_size = {BUCKET}, sample_size = {SAMPLES}, "
        f"{torch.get_num_threads()} threads; every scheme and SDPA interleaved, medians of {args.repeats} runs "
        "after a warm-up, time ratios to SDPA from the same runs. FLOP limit = the default estimator's "
        "multiply-adds (its estimates included) over exact attention's. Peak MiB = rise of the peak "
        "resident set (VmHWM, reset just before) during one call.\n\n" + markdown_table(header, rows)
        + f"\n\nWhere the default estimator's time goes at N = {sizes[-1]} (torch profiler, one call):\n\n"
        + profile_top(sizes[-1], default)
        + "\n\nThe explorer's corner settings at N = 512 (one head, D = 32, trace included, best of 3 runs, ms):\n\n"
        + corner_table() + "\n\n" + VARIANTS
    )
    if not args.no_write:
        print("wrote", write_section("speed", "Speed and memory: kde_attention vs SDPA", body))


if __name__ == "__main__":
    main()
