"""Bias of the winner's output (a ratio of two unbiased sums): ||E[O~] - O||_2 / ||O||_2 over many seeds.

    python -m benchmarks.estimators.bias [--runs 200]

12 MiniLM heads (every 6th of the 72: two per layer) of the default text; E[O~] is the mean over `runs`
seeds, so the figure also holds the mean's own noise, about (mean error) / sqrt(runs), printed next to it.
"""
from __future__ import annotations

import argparse

import torch

from . import data
from .winner import best_attention


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=200)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    heads = data.minilm_heads("default")
    pick = torch.arange(0, 72, 6)  # (12,) two heads per layer
    q, k, v, exact, norm = heads.q[pick], heads.k[pick], heads.v[pick], heads.exact[pick], heads.exact_norm[pick]
    for budget in (32, 64, 128):
        outs = torch.stack([best_attention(q, k, v, heads.scale, budget, seed)[0].double() for seed in range(args.runs)])
        bias = torch.linalg.matrix_norm(outs.mean(0) - exact, ord=2) / norm  # (12,)
        err = (torch.linalg.matrix_norm(outs - exact, ord=2) / norm).mean(0)  # (12,)
        print(f"b={budget}: mean error {err.mean():.3f}, ||E[O~] - O|| / ||O|| {bias.mean():.3f} "
              f"(noise of the mean ~{err.mean() / args.runs ** 0.5:.3f}), largest head {bias.max():.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
