"""Sampling schemes compared (issue 5): value_norm (authors'), uniform, column_norm, and the oracle.

    python -m benchmarks.sampling           # MiniLM 72 heads x 3 seeds, GloVe N=8192, speed at 16384
    python -m benchmarks.sampling --quick   # 1 seed, fewer settings

Writes the "sampling" section of benchmarks/RESULTS.md.
- MiniLM: all 72 heads of all-MiniLM-L6-v2 at 512 tokens of the bundled text, mean relative spectral
  error over heads and seeds (float64), at bucket/sample 32/64, 64/128, 128/256. "oracle per block"
  samples each query block from the exact column norms of its residual D^-1 A (a lower reference that
  needs the full matrix, not a method).
- GloVe N = 8192 (three scalings): value_norm versus column_norm at several budgets.
- Speed at N = 16384 (D = 64, 4 heads, float32, 64/128): column_norm over value_norm, and the estimation's
  multiply-adds next to the sampling's.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import kdeformer as K
from kdeformer.sampling import value_row_norms
from benchmarks._report import markdown_table, write_section

SETTINGS = [(32, 64), (64, 128), (128, 256)]


def oracle_per_block(q, k, v, scale, bucket, samples, seed):
    """Per query block, sample from the exact column norms of the residual (needs the full matrix)."""
    g = torch.Generator().manual_seed(seed)
    # the oracle is defined on the LSH key blocks: run a key-block scheme (pps, the default, has none)
    _, t = K.kde_attention(q, k, v, bucket_size=bucket, sample_size=samples, scale=scale, sampling="value_norm",
                           generator=g, return_trace=True)
    logits = scale * q @ k.mT
    a = torch.exp(logits - logits.amax(-1, keepdim=True))  # (H, N, N)
    p_exact = a / a.sum(-1, keepdim=True)
    heavy = t.block_mask()
    nb = t.num_blocks
    residual = p_exact * ~heavy
    member = t.q_blocks.unsqueeze(-2) == torch.arange(nb).view(nb, 1)  # (H, nb, N)
    col = (member.double() @ residual.square()).sqrt() * value_row_norms(v).unsqueeze(-2)
    probs = col / col.sum(-1, keepdim=True)  # (H, nb, N)
    draws = torch.multinomial(probs.flatten(0, 1).float(), samples, replacement=True, generator=g)
    draws = draws.view(*probs.shape[:-1], samples)
    counts = torch.zeros_like(probs).scatter_add_(-1, draws, torch.ones_like(draws, dtype=probs.dtype))
    weights = torch.where(counts > 0, counts / (samples * probs.clamp_min(1e-300)), 0.0)  # (H, nb, N)
    per_query = torch.gather(weights, 1, t.q_blocks.unsqueeze(-1).expand(*t.q_blocks.shape, weights.shape[-1]))
    factor = torch.where(heavy, 1.0, per_query)
    num = (a * factor) @ v
    return num / (a * factor).sum(-1, keepdim=True)


def minilm_table(seeds: int, settings):
    from kdeformer.sources import minilm

    src = minilm()
    q, k, v = (x.double().reshape(-1, src.num_tokens, x.shape[-1]) for x in (src.q, src.k, src.v))  # (72, N, D)
    exact = K.exact_attention(q, k, v, scale=src.scale)
    schemes = [
        ("value_norm (authors')", dict(sampling="value_norm")),
        ("uniform", dict(sampling="uniform")),
        ("column_norm, no heavy columns", dict(sampling="column_norm", heavy_columns=0)),
        ("column_norm (default: s/4 heavy columns)", dict(sampling="column_norm")),
    ]
    rows = []
    for name, opts in schemes:
        row = [name]
        for bucket, samples in settings:
            errs = [
                K.relative_spectral_error(
                    K.kde_attention(q, k, v, bucket_size=bucket, sample_size=samples, scale=src.scale,
                                    generator=torch.Generator().manual_seed(s), **opts),
                    exact,
                )
                for s in range(seeds)
            ]
            row.append(f"{statistics.mean(errs):.3f} ± {statistics.pstdev(errs):.3f}")
        rows.append(row)
        print(row, flush=True)
    row = ["oracle per block (reference, needs D^-1 A)"]
    for bucket, samples in settings:
        errs = [K.relative_spectral_error(oracle_per_block(q, k, v, src.scale, bucket, samples, s), exact) for s in range(seeds)]
        row.append(f"{statistics.mean(errs):.3f} ± {statistics.pstdev(errs):.3f}")
    rows.append(row)
    print(row, flush=True)
    header = ["sampling"] + [f"{b}/{s}" for b, s in settings]
    return markdown_table(header, rows), src.num_tokens


def glove_table(seeds: int, budgets):
    from kdeformer.sources import glove

    rows = []
    for scaling in ("uniform", "medium", "sharp"):
        src = glove(n=8192, scaling=scaling)
        q, k, v = (x[0, 0] for x in (src.q, src.k, src.v))  # (N, D) float32
        exact = K.exact_attention(q, k, v, scale=src.scale)
        for sampling in ("value_norm", "column_norm"):
            row = [scaling, sampling]
            for bucket, samples in budgets:
                errs = [
                    K.relative_spectral_error(
                        K.kde_attention(q, k, v, bucket_size=bucket, sample_size=samples, scale=src.scale,
                                        sampling=sampling, generator=torch.Generator().manual_seed(s)),
                        exact,
                    )
                    for s in range(seeds)
                ]
                row.append(f"{statistics.mean(errs):.3f}")
            rows.append(row)
            print(row, flush=True)
    header = ["GloVe scaling", "sampling"] + [f"{b}/{s}" for b, s in budgets]
    return markdown_table(header, rows)


def speed_table(n=16384, heads=4, dim=64, bucket=64, samples=128, repeats=5):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, dim, generator=g) for _ in range(3))  # (B, H, N, D)
    times = {}
    for sampling in ("value_norm", "column_norm"):
        fn = lambda: K.kde_attention(q, k, v, bucket_size=bucket, sample_size=samples, sampling=sampling,
                                     generator=torch.Generator().manual_seed(1))
        fn()
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - t0)
        times[sampling] = statistics.median(runs)
    from kdeformer.sampling import default_estimate_rows

    rows_r = default_estimate_rows(samples, n, n)
    heavy = samples // 4
    est_macs = rows_r * n * dim
    sample_macs = n * (samples - heavy) * dim
    body = markdown_table(
        ["N", "value_norm ms", "column_norm ms", "ratio", "estimation MACs / head", "sampled-column MACs / head"],
        [[n, f"{times['value_norm'] * 1e3:.1f}", f"{times['column_norm'] * 1e3:.1f}",
          f"{times['column_norm'] / times['value_norm']:.2f}", f"{est_macs / 1e6:.0f} M ({rows_r} rows x {n} keys)",
          f"{sample_macs / 1e6:.0f} M ({n} queries x {samples - heavy} draws)"]],
    )
    return body


def replace_speed_table(table: str) -> None:
    """Swap the speed table inside the existing "sampling" section, keeping the accuracy tables."""
    import re

    from benchmarks._report import RESULTS, machine_line

    text = RESULTS.read_text()
    section = re.search(r"<!-- BEGIN sampling -->.*?<!-- END sampling -->", text, re.S)
    if section is None:
        raise SystemExit("run the full benchmark first: RESULTS.md has no sampling section")
    old = section.group(0)
    head, _, _ = old.partition("**Speed**")
    new = (head + f"**Speed** (float32, D = 64, 4 heads, 64/128, median of 5; re-measured {machine_line()}):\n\n"
           + table + "\n<!-- END sampling -->")
    RESULTS.write_text(text.replace(old, new))
    print(table)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--speed-only", action="store_true", help="re-measure only the speed table (on a quiet machine)")
    args = parser.parse_args(argv)
    if args.speed_only:
        replace_speed_table(speed_table(n=16384))
        return
    seeds = 1 if args.quick else 3
    settings = SETTINGS[1:2] if args.quick else SETTINGS
    minilm_md, n_tokens = minilm_table(seeds, settings)
    glove_md = glove_table(1, [(64, 128)] if args.quick else [(32, 64), (64, 128), (128, 256)])
    speed_md = speed_table(n=4096 if args.quick else 16384)
    body = (
        f"**MiniLM**, all 72 heads, {n_tokens} tokens of the bundled text, float64, mean ± sd over {seeds} "
        "seed(s) of the per-seed mean relative spectral error ||O~ - O||_2 / ||O||_2. Columns are "
        "bucket_size/sample_size; every scheme pays bucket + sample_size key columns per query "
        "(column_norm's heavy columns come out of sample_size), and column_norm additionally computes "
        "R = ceil(s Nq / 2Nk) full attention rows per head to estimate the column norms.\n\n"
        + minilm_md
        + "\n\n**GloVe**, N = 8192, relative spectral error (1 seed), value_norm vs column_norm.\n\n"
        + glove_md
        + "\n\n**Speed** (float32, D = 64, 4 heads, 64/128, median of 5):\n\n"
        + speed_md
    )
    if not args.no_write:
        print("wrote", write_section("sampling", "Sampling schemes: value_norm, uniform, column_norm (issue 5)", body))


if __name__ == "__main__":
    main()
