"""Speed of today's core against an older revision's, in one process (issue 15: no slowdown).

    python -m benchmarks.regression --base e8a5983       # writes the "regression" section of RESULTS.md
    python -m benchmarks.regression --sizes 256 --repeats 1 --no-write   # a quick look

The base revision's `kdeformer/` is extracted with `git archive <base> kdeformer | tar -x` into a
temporary folder and renamed `kdeformer_base` (its absolute `kdeformer` imports are rewritten to the new
name; its own imports are relative), so both packages import side by side. For every scheme both
revisions have (column_norm, value_norm, uniform) and every N, the two calls run interleaved (the order
alternating from repeat to repeat) after a warm-up, with torch.no_grad, no trace, the issue-2 setting
(D = 64, 4 heads, float32, bucket_size = 64, sample_size = 128, num_projs = 7). Reported: the median of
each side, the ratio of the medians (new / old), the median of the per-repeat ratios (the two runs of a
repeat are next to each other, so slow drifts of the machine's load cancel) and the ratio of the fastest runs. A second reading
runs the same in a child process whose glibc heap keeps freed buffers (`steady_heap_rows`), which removes
the allocator's history from the comparison. The machine is shared;
the load average before and after is written next to the table.

The two revisions do not run the same arithmetic: the new core also carries the truth fixes (hashing and
probabilities in float32 from the inputs, addressed draws by inverse CDF instead of torch.multinomial,
masks by removal), so the ratio measures the whole change, not the refactor alone.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks._report import RESULTS, markdown_table, write_section

ROOT = Path(__file__).resolve().parents[1]
HEADS, DIM, BUCKET, SAMPLES, PROJS = 4, 64, 64, 128, 7
SCHEMES = ("column_norm", "value_norm", "uniform")
SIZES = (1024, 4096, 16384)
REPEATS = 15
BASE_NAME = "kdeformer_base"
TRUTH_NOTE = ("The new core also carries the truth fixes: hashing and sampling probabilities computed in "
              "float32 from the inputs, addressed draws by inverse CDF instead of torch.multinomial, masks by "
              "removal; a ratio measures the whole change, not the refactor alone.")


def extract_base(base: str, folder: Path) -> Path:
    """`git archive <base> kdeformer | tar -x -C folder`, renamed to kdeformer_base (absolute imports of
    `kdeformer` rewritten). Returns the package folder."""
    archive = subprocess.run(["git", "archive", base, "kdeformer"], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    package = folder / BASE_NAME
    shutil.move(str(folder / "kdeformer"), str(package))
    pattern = re.compile(r"(?m)^(\s*)(from|import) kdeformer\b")  # absolute imports only (not `from . import kdeformer`)
    for path in package.rglob("*.py"):
        text = path.read_text()
        patched = pattern.sub(lambda m: f"{m.group(1)}{m.group(2)} {BASE_NAME}", text)
        if patched != text:
            path.write_text(patched)
    return package


def import_base(folder: Path):
    """Import kdeformer_base from `folder` (and check it is not today's package)."""
    sys.path.insert(0, str(folder))
    try:
        for name in [m for m in sys.modules if m == BASE_NAME or m.startswith(BASE_NAME + ".")]:
            del sys.modules[name]  # a fresh import from this folder
        module = importlib.import_module(BASE_NAME)
    finally:
        sys.path.remove(str(folder))
    assert Path(module.__file__).resolve().parent == (folder / BASE_NAME).resolve()
    return module


def inputs(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, HEADS, n, DIM, generator=g) for _ in range(3))  # (B, H, N, D)


def call(package, sampling: str, q, k, v):
    with torch.no_grad():
        return package.kde_attention(q, k, v, bucket_size=BUCKET, sample_size=SAMPLES, num_projs=PROJS,
                                     sampling=sampling, generator=torch.Generator().manual_seed(0))


def interleaved(packages: dict, sampling: str, q, k, v, repeats: int) -> dict:
    """Seconds of each run of each package, alternating which runs first, after one warm-up each."""
    times = {name: [] for name in packages}
    for package in packages.values():
        call(package, sampling, q, k, v)
    names = list(packages)
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            call(packages[name], sampling, q, k, v)
            times[name].append(time.perf_counter() - t0)
    return times


def measure(packages: dict, schemes, sizes, repeats: int) -> list[dict]:
    rows = []
    for n in sizes:
        q, k, v = inputs(n)
        for sampling in schemes:
            t = interleaved(packages, sampling, q, k, v, repeats)
            new, old = statistics.median(t["new"]), statistics.median(t["old"])
            paired = statistics.median(a / b for a, b in zip(t["new"], t["old"]))  # runs next to each other
            rows.append({"n": n, "sampling": sampling, "new_ms": new * 1e3, "old_ms": old * 1e3, "ratio": new / old,
                         "paired_ratio": paired, "best_ratio": min(t["new"]) / min(t["old"]), "repeats": repeats})
            print(rows[-1], flush=True)
    return rows


def verdict(rows: list[dict], margin: float = 0.05) -> str:
    """The settings slower (or faster) on all three readings by more than `margin`, in words."""
    def name(r):
        return f"{r['sampling']} at N = {r['n']}"
    slower = [name(r) for r in rows if min(r["ratio"], r["paired_ratio"], r["best_ratio"]) > 1 + margin]
    faster = [name(r) for r in rows if max(r["ratio"], r["paired_ratio"], r["best_ratio"]) < 1 - margin]
    return (f"Slower than the base on all three readings (by more than {margin:.0%}): "
            f"{', '.join(slower) or 'none'}. Faster on all three: {', '.join(faster) or 'none'}. "
            "Everything else is within the machine's noise on at least one reading.")


def table(rows: list[dict]) -> tuple[list, list]:
    header = ["N", "scheme", "new median ms", "base median ms", "median new / old", "median of paired ratios",
              "best new / best old"]
    body = [[r["n"], r["sampling"], f"{r['new_ms']:.1f}", f"{r['old_ms']:.1f}", f"{r['ratio']:.3f}",
             f"{r['paired_ratio']:.3f}", f"{r['best_ratio']:.3f}"] for r in rows]
    return header, body


def report(rows: list[dict], base: str, load: tuple) -> str:
    return (
        f"Today's `kdeformer` against revision `{base}` (the last one before the structure refactor), extracted "
        f"with `git archive` and imported as `{BASE_NAME}` in the same process. float32, D = {DIM}, {HEADS} heads, "
        f"batch 1, bucket_size = {BUCKET}, sample_size = {SAMPLES}, num_projs = {PROJS}, "
        f"{torch.get_num_threads()} threads, torch.no_grad, no trace; the two calls interleaved (order "
        f"alternating), {rows[0]['repeats'] if rows else 0} runs each after a warm-up. Load average "
        f"{load[0]:.2f} before, {load[1]:.2f} after (shared machine: read the paired and best ratios when the "
        f"medians disagree). {TRUTH_NOTE}\n\n"
        + markdown_table(*table(rows))
        + "\n\n" + verdict(rows)
        + "\n\nRun: `python -m benchmarks.regression --base " + base + "`."
    )


STEADY_HEAP = "glibc.malloc.mmap_threshold=268435456:glibc.malloc.trim_threshold=1073741824"


def steady_heap_rows(args) -> list[dict] | None:
    """The same measurement in a child process whose glibc keeps freed buffers in its heap (GLIBC_TUNABLES:
    no mmap/munmap, so no fresh zero pages per call). glibc moves its mmap threshold with every large
    free, so which buffers come back as fresh pages depends on the process's history: at N = 4096 the
    plain ratios swing between ~0.95 and ~1.4 from run to run; this reading removes that effect (and
    makes both revisions ~1.5x faster on this machine). None where the child fails (e.g. not glibc)."""
    with tempfile.TemporaryDirectory(prefix="kde_rows_") as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [sys.executable, "-m", "benchmarks.regression", "--base", args.base, "--repeats", str(args.repeats),
               "--no-write", "--no-steady-heap", "--rows-json", str(out), "--sizes", *map(str, args.sizes),
               "--schemes", *args.schemes]
        env = dict(os.environ, GLIBC_TUNABLES=STEADY_HEAP)
        done = subprocess.run(cmd, cwd=ROOT, env=env, check=False)
        return json.loads(out.read_text()) if done.returncode == 0 and out.exists() else None


def main(argv=None) -> int:
    import kdeformer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="e8a5983", help="revision to compare against")
    parser.add_argument("--sizes", type=int, nargs="*", default=list(SIZES))
    parser.add_argument("--schemes", nargs="*", default=list(SCHEMES))
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--results", type=Path, default=RESULTS, help="RESULTS.md to write the section into")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--no-steady-heap", action="store_true", help="skip the second, steady-heap reading")
    parser.add_argument("--rows-json", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kde_base_") as tmp:
        extract_base(args.base, Path(tmp))
        base = import_base(Path(tmp))
        before = os.getloadavg()[0]
        rows = measure({"new": kdeformer, "old": base}, args.schemes, args.sizes, args.repeats)
        after = os.getloadavg()[0]
    if args.rows_json is not None:
        args.rows_json.write_text(json.dumps(rows))
    steady = None if args.no_steady_heap else steady_heap_rows(args)
    if not args.no_write:
        text = report(rows, args.base, (before, after))
        if steady:
            text += ("\n\n**The same with a steady heap** (`GLIBC_TUNABLES=" + STEADY_HEAP + "`, a child process; "
                     "see `steady_heap_rows`):\n\n" + markdown_table(*table(steady)) + "\n\n" + verdict(steady))
        print("wrote", write_section("regression", f"Regression: today's core vs {args.base}", text, args.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
