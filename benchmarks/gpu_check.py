"""`make gpu-check`: the core's promises on a CUDA GPU, then its speed against SDPA (flash), in under 5 min.

    python -m benchmarks.gpu_check            # checks + timings N = 4096 ... 65536, writes RESULTS.md
    python -m benchmarks.gpu_check --no-write

Checks (each prints PASS/FAIL; the script exits 1 on any failure): the exact limit against SDPA, key and
query masks (padding invisible), float16/bfloat16/float32/float64, the same draws in every dtype,
gradients, causal exact limit. Timings: the default estimator (bucket 64, 128 samples) in bfloat16
against SDPA in bfloat16 (flash where torch picks it), medians of 7 interleaved runs after warm-up,
CUDA events around each call, B = 1, H = 8, D = 64.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch

from benchmarks._report import markdown_table, write_section

DEVICE = "cuda"


def gen(seed=0):
    return torch.Generator(DEVICE).manual_seed(seed)


def qkv(*shape, dtype=torch.float32, seed=0):
    g = gen(seed)
    return tuple(torch.randn(*shape, generator=g, device=DEVICE).to(dtype) for _ in range(3))


def close(a, b, tol) -> bool:
    return bool(torch.isfinite(a).all()) and float((a.float() - b.float()).abs().max()) <= tol


def checks() -> list[tuple[str, bool]]:
    import kdeformer as K

    sdpa = torch.nn.functional.scaled_dot_product_attention
    q, k, v = qkv(2, 4, 300, 64, dtype=torch.float64)
    results = [("exact limit = SDPA (float64)", close(K.kde_attention(q, k, v, bucket_size=300), sdpa(q, k, v), 1e-10))]
    mask = torch.zeros(2, 1, 300, dtype=torch.bool, device=DEVICE)
    mask[:, :, :120] = True
    padded = K.kde_attention(q, k, v, key_mask=mask, query_mask=mask, generator=gen(1))[:, :, :120]
    alone = K.kde_attention(q[:, :, :120], k[:, :, :120], v[:, :, :120], generator=gen(1))
    results.append(("padding invisible (key_mask + query_mask)", close(padded, alone, 1e-6)))
    small = [torch.randint(-4, 5, (1, 4, 256, 64), generator=gen(2), device=DEVICE).double() / 4 for _ in range(3)]
    traces = {dt: K.kde_attention(*(x.to(dt) for x in small), generator=gen(3), return_trace=True)
              for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}
    ref = traces[torch.float64][1]
    results.append(("same draws in every dtype", all(torch.equal(t.sampled, ref.sampled) for _, t in traces.values())))
    results.append(("finite in every dtype", all(bool(torch.isfinite(o).all()) for o, _ in traces.values())))
    qg, kg, vg = (x.clone().requires_grad_() for x in qkv(1, 4, 512, 64))
    K.kde_attention(qg, kg, vg, generator=gen(4)).square().sum().backward()
    results.append(("gradients finite", all(bool(torch.isfinite(x.grad).all()) for x in (qg, kg, vg))))
    causal = K.kde_attention(q, k, v, bucket_size=300, is_causal=True)
    results.append(("causal exact limit = SDPA(is_causal)", close(causal, sdpa(q, k, v, is_causal=True), 1e-10)))
    return results


def cuda_ms(fn) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def timings(sizes, repeats: int = 7) -> list[list]:
    import kdeformer as K

    rows = []
    for n in sizes:
        q, k, v = qkv(1, 8, n, 64, dtype=torch.bfloat16)
        kde = lambda: K.kde_attention(q, k, v, generator=gen(0))  # noqa: E731
        sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)  # noqa: E731
        kde(), sdpa()  # warm-up
        t_kde, t_sdpa = [], []
        for _ in range(repeats):
            t_kde.append(cuda_ms(kde))
            t_sdpa.append(cuda_ms(sdpa))
        mk, ms = statistics.median(t_kde), statistics.median(t_sdpa)
        rows.append([n, f"{ms:.2f}", f"{mk:.2f}", f"{mk / ms:.3f}"])
        print(rows[-1], flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--sizes", type=int, nargs="*", default=[4096, 8192, 16384, 32768, 65536])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; nothing was run")
        return 2
    results = checks()
    for name, ok in results:
        print(("PASS " if ok else "FAIL ") + name, flush=True)
    rows = timings(args.sizes)
    body = ("Checks: " + "; ".join(f"{name}: {'pass' if ok else 'FAIL'}" for name, ok in results) + ".\n\n"
            "Default estimator vs SDPA, bfloat16, B = 1, H = 8, D = 64, medians of 7 interleaved runs "
            "(CUDA events).\n\n" + markdown_table(["N", "SDPA ms", "KDEformer ms", "KDEformer / SDPA"], rows))
    if not args.no_write:
        print("wrote", write_section("gpu", f"On a GPU ({torch.cuda.get_device_name(0)})", body))
    return 0 if all(ok for _, ok in results) else 1


if __name__ == "__main__":
    sys.exit(main())
