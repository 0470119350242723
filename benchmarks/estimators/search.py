"""The estimator search harness (issue 12): every variant x budget x text, errors and multiply-adds.

    python -m benchmarks.estimators.search                      # everything, writes RESULTS.md + results.json
    python -m benchmarks.estimators.search --quick              # default text, b 64/128, 1 seed, no writing
    python -m benchmarks.estimators.search --variants pps,today-column_norm --budgets 64 --texts default

Measured the way users meet it: float32 inputs, fixed seeds (0 .. seeds-1), the mean relative spectral
error ||O~ - O||_2 / ||O||_2 over the 72 MiniLM heads (6 layers x 12 heads, 512 tokens) of each text,
averaged over seeds; multiply-adds per query counted from the real shapes (benchmarks.estimators.cost),
estimation included.  "at Nystrom's cost": every method at the largest budget whose multiply-adds do not
exceed Nystromformer's with m landmarks.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from . import baselines, data
from .variants import Scheme, run_plan
from .winner import best_attention

HERE = Path(__file__).resolve().parent
BUDGETS = (32, 64, 128, 256)
GLOVE_BUDGETS = (64, 128, 256)
BASE = Scheme("pps-centroid", value="centered")

# name -> (what it is, how to run it).  Schemes run through variants.run_plan; "today-*" and peers
# through the project's own functions.
SCHEMES = {
    s.name: s for s in [
        BASE,
        BASE.but(name="pps-norm", value="norm"),
        BASE.but(name="pps-novalue", value="none"),
        BASE.but(name="pps-norm-w1", value="norm", window=1),
        BASE.but(name="pps-norm-w2", value="norm", window=2),
        BASE.but(name="pps-norm-w3", value="norm", window=3),
        BASE.but(name="pps-centered-w1", window=1),
        BASE.but(name="pps-norm-w2-bq64", value="norm", window=2, q_block=64),
        BASE.but(name="pps-norm-w2-bq16", value="norm", window=2, q_block=16),
        BASE.but(name="pps-norm-w2-keyblock16", value="norm", window=2, key_block=16),
        BASE.but(name="pps-norm-w2-t0.8", value="norm", window=2, temperature=0.8),
        BASE.but(name="multinomial-norm-w2", value="norm", window=2, sampler="multinomial"),
        BASE.but(name="stratified-norm-w2", value="norm", window=2, sampler="stratified"),
        BASE.but(name="poisson-norm-w2", value="norm", window=2, sampler="poisson"),
        BASE.but(name="pps-diag-norm-w2", value="norm", window=2, estimator="centroid_diag"),
        BASE.but(name="pps-rows1-norm-w2", value="norm", window=2, estimator="rows:1"),
        BASE.but(name="oracle-norm-w2", value="norm", window=2, estimator="oracle"),
        BASE.but(name="pps-norm-w4", value="norm", window=4),
        BASE.but(name="pps-meancentered-w3", value="meancentered", window=3),
        BASE.but(name="pps-norm-w3-share8", value="norm", window=3, estimate_share=1 / 8),
        BASE.but(name="pps-norm-w3-share16", value="norm", window=3, estimate_share=1 / 16),
        BASE.but(name="pps-norm-w3-share16-shared", value="norm", window=3, estimate_share=1 / 16, shared_draws=True),
        BASE.but(name="pps-norm-w0-share8", value="norm", estimate_share=1 / 8),
        BASE.but(name="pps-norm-w3-share8-seg4", value="norm", window=3, estimate_share=1 / 8, segments=4),
        BASE.but(name="pps-norm-w3-share8-seg8", value="norm", window=3, estimate_share=1 / 8, segments=8),
        BASE.but(name="pps-norm-w3-share8-token", value="norm", window=3, estimate_share=1 / 8, num_projs=0),
        BASE.but(name="pps-norm-w3-share8-auto", value="norm", window=3, estimate_share=1 / 8, auto_order=True),
    ]
}
TODAY = ("today-column_norm", "today-column_norm-honest", "today-value_norm", "today-uniform")
PEERS = tuple(f"peer-{m}" for m in baselines.PEERS)
BEST = {  # the port-ready scheme (benchmarks/estimators/best.py via winner.py), and its tuning neighbours
    "best": {},
    "best-bq16": {"q_block": 16}, "best-bq64": {"q_block": 64},
    "best-w2": {"window": 2}, "best-w4": {"window": 4}, "best-w6": {"window": 6}, "best-w0": {"window": 0},
    "best-share16": {"share": 1 / 16}, "best-share4": {"share": 1 / 4},
}
ALL = ("best", "core-default") + tuple(SCHEMES) + TODAY + PEERS + tuple(n for n in BEST if n != "best")


def run(name: str, heads, budget: int, seed: int):
    """-> (output (G, Nq, Dv), multiply-adds per query)."""
    if name in BEST:
        return best_attention(heads.q, heads.k, heads.v, heads.scale, budget, seed, **BEST[name])
    if name in SCHEMES:
        return run_plan(SCHEMES[name], heads.q, heads.k, heads.v, heads.scale, budget, seed)
    if name == "core-default":
        return baselines.run_core_default(heads, budget, seed)
    if name.startswith("today-"):
        sampling = name.split("-")[1]
        return baselines.run_core(heads, budget, sampling, seed, honest=name.endswith("-honest"))
    return baselines.run_peer(heads, name.split("-", 1)[1], budget, seed)


def measure(name: str, heads, budget: int, seeds: int) -> dict:
    errs, work = [], 0.0
    for seed in range(seeds if name != "peer-nystrom" else 1):  # Nystrom is deterministic
        out, work = run(name, heads, budget, seed)
        errs.append(float(data.relative_errors(heads, out).mean()))
    return {"variant": name, "data": heads.name, "budget": budget, "error": statistics.mean(errs),
            "error_sd": statistics.pstdev(errs), "macs_per_query": work, "seeds": len(errs)}


def largest_budget_within(name: str, heads, limit: float) -> int:
    """The largest budget whose multiply-adds per query stay <= limit.  Column methods stop at Nk (their
    budget >= Nk is exact attention); feature methods may go up to 8 Nk."""
    n_k = heads.k.shape[1]
    hi = 8 * n_k if name in ("peer-performer", "peer-scatterbrain") else n_k
    lo = 1
    if run_cost(name, heads, hi) <= limit:
        return hi
    while hi - lo > 1:  # the cost grows with the budget
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if run_cost(name, heads, mid) <= limit else (lo, mid)
    return lo


def run_cost(name: str, heads, budget: int) -> float:
    small = data.Heads(heads.name, heads.q[:1], heads.k[:1], heads.v[:1], heads.scale, heads.exact[:1], heads.exact_norm[:1])
    return run(name, small, budget, 0)[1]


def at_nystrom_cost(names, heads, landmarks, seeds: int) -> list[dict]:
    """Every method at the largest budget within Nystromformer's multiply-adds with m landmarks."""
    rows = []
    for m in landmarks:
        limit = run_cost("peer-nystrom", heads, m)
        for name in names:
            budget = largest_budget_within(name, heads, limit)
            rec = measure(name, heads, budget, seeds)
            rec.update(nystrom_landmarks=m, nystrom_macs=limit)
            rows.append(rec)
            print(f"  [nystrom {m}: {limit:.0f}] {name} b={budget}: {rec['error']:.3f} ({rec['macs_per_query']:.0f})", flush=True)
    return rows


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="default text, budgets 64/128, one seed, no writing")
    ap.add_argument("--variants", default=",".join(ALL))
    ap.add_argument("--texts", default=",".join(data.TEXTS))
    ap.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--glove", default="sharp,medium,uniform", help="GloVe scalings ('' for none)")
    ap.add_argument("--glove-variants", default="best,best-w0,today-column_norm,today-column_norm-honest,peer-performer,peer-nystrom")
    ap.add_argument("--nystrom-variants", default="best,today-column_norm-honest,peer-performer,peer-hyperattention,peer-uniform,peer-scatterbrain")
    ap.add_argument("--out", default=str(HERE / "results.json"))
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.texts, args.budgets, args.seeds, args.glove, args.no_write = "default", "64,128", 1, "", True
    return args


def main(argv=None) -> int:
    args = parse(argv)
    torch.set_num_threads(1)
    started = time.time()
    names = [n for n in args.variants.split(",") if n]
    unknown = sorted(set(names) - set(ALL))
    if unknown:
        print(f"unknown variants {unknown}; known: {list(ALL)}", file=sys.stderr)
        return 2
    budgets = [int(b) for b in args.budgets.split(",")]
    records, nystrom_rows = [], []
    for text in [t for t in args.texts.split(",") if t]:
        heads = data.minilm_heads(text)  # loaded once per text
        for name in names:
            for budget in budgets:
                rec = measure(name, heads, budget, args.seeds)
                records.append(rec)
                print(f"{text} {name} b={budget}: {rec['error']:.3f} ± {rec['error_sd']:.3f} "
                      f"({rec['macs_per_query']:.0f} MACs/query)", flush=True)
        if not args.quick:
            nystrom_rows += at_nystrom_cost([n for n in args.nystrom_variants.split(",") if n], heads, (64, 128), args.seeds)
    for scaling in [s for s in args.glove.split(",") if s]:
        heads = data.glove_heads(scaling)
        for name in [n for n in args.glove_variants.split(",") if n]:
            for budget in GLOVE_BUDGETS:
                rec = measure(name, heads, budget, args.seeds)
                records.append(rec)
                print(f"{heads.name} {name} b={budget}: {rec['error']:.3f} ({rec['macs_per_query']:.0f})", flush=True)
    if not args.no_write:
        Path(args.out).write_text(json.dumps({"records": records, "at_nystrom": nystrom_rows,
                                              "seconds": time.time() - started}, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
