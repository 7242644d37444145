#!/usr/bin/env python
"""Triton kernels vs their PyTorch references, on CUDA.

    python benchmarks/kernels.py            # timing table
    python benchmarks/kernels.py --check    # CUDA kernels vs float64 references, PASS/FAIL table
    python benchmarks/kernels.py --sweep    # timing of a few tile configurations of each kernel
    TRITON_INTERPRET=1 python benchmarks/kernels.py --check --tiny   # a few small checks on the CPU
                                            # (the interpreter; what bench_gpu.py --tiny runs in the tests)

Timing: median of triton.testing.do_bench (CUDA events). GB/s counts the fewest bytes the operation
must move (each input read once, each output written once: for ASL fwd+bwd the logits and targets
read and dL/dz written; for Sinkhorn the scores read and Q written in fp32) over the median time.
"extra MB" is the peak CUDA memory allocated during one call above what was allocated before it
(it includes the outputs: the logits' gradient for ASL, Q for Sinkhorn).
Every row runs inside its own try/except: a failing row prints its error and the rest go on; the
table comes last. Exit code 1 if --check has a FAIL or an error.
"""
import argparse
import math
import sys
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bootstrap import import_package  # noqa: E402

import_package()

import triton  # noqa: E402
import triton.testing  # noqa: E402

from hvpmtl.kernels import sinkhorn as sk_kernel_mod  # noqa: E402
from hvpmtl.kernels import weighted_asl as asl_kernel_mod  # noqa: E402
from hvpmtl.losses.sinkhorn import sinkhorn_reference, swav_sinkhorn  # noqa: E402
from hvpmtl.losses.weighted_asl import SparseTargets, densify, weighted_asl_reference  # noqa: E402

DEV = "cuda"  # "cpu" with --tiny (Triton's interpreter)


def device_line() -> str:
    name = torch.cuda.get_device_name() if DEV == "cuda" else "CPU (TRITON_INTERPRET)"
    return f"{name} | torch {torch.__version__} | triton {triton.__version__}"
ASL_B, ASL_C = 256, 11166
SK_B, SK_K, SK_ITERS = 4096, 3000, 3


def median_us(fn, grad_to_none=None) -> float:
    ms = triton.testing.do_bench(fn, warmup=25, rep=200, grad_to_none=grad_to_none, quantiles=[0.5])
    return (ms[0] if isinstance(ms, (list, tuple)) else ms) * 1e3


def graph_us(fn, grad_to_none=None, n=20) -> float:
    """GPU time of one call without launch overhead: CUDA-graph replay of n (L2 flush, call) pairs
    minus the replay of n flushes alone, median of 10 replays."""
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device=DEV)

    def reset():
        for t in grad_to_none or []:
            t.grad = None

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as graph capture wants
        for _ in range(3):
            reset()
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graphs = []
    for with_fn in (True, False):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(n):
                flush.zero_()
                if with_fn:
                    reset()
                    fn()
        graphs.append(g)
    times = []
    for g in graphs:
        t = []
        for _ in range(10):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            g.replay()
            end.record()
            torch.cuda.synchronize()
            t.append(start.elapsed_time(end))
        times.append(sorted(t)[len(t) // 2])
    reset()
    return (times[0] - times[1]) / n * 1e3


def extra_mb(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return (peak - base) / 2**20


def asl_inputs(b, c, dtype, n_pos=32, seed=None):
    """Logits ~ N(-2, 3^2); n_pos listed classes per row with confidences 0.8/0.9/1.0."""
    g = torch.Generator(device=DEV)
    g.manual_seed(seed if seed is not None else torch.seed() % 2**31)
    z = (torch.randn(b, c, device=DEV, generator=g) * 3 - 2).to(dtype)
    n_pos = min(n_pos, c)
    idx = torch.rand(b, c, device=DEV, generator=g).argsort(dim=1)[:, :n_pos]
    conf = torch.tensor([0.8, 0.9, 1.0], device=DEV)[torch.randint(0, 3, (b, n_pos), device=DEV, generator=g)]
    drop = torch.rand(b, n_pos, device=DEV, generator=g) < 0.3  # ragged lists: some padding
    idx = torch.where(drop, torch.full_like(idx, -1), idx)
    sparse = SparseTargets(idx, conf)
    return z, densify(sparse, c, torch.float32), sparse


def scores_inputs(b, k, dtype, scale=1.0):
    x = torch.nn.functional.normalize(torch.randn(b, 128, device=DEV), dim=1)
    p = torch.nn.functional.normalize(torch.randn(k, 128, device=DEV), dim=1)
    return ((x @ p.t()) * scale).to(dtype)


# ----------------------------------------------------------------------------------------- benchmark
def bench_rows():
    rows = []

    def add(name, impl, fn, nbytes, grad_to_none=None, graph=True):
        try:
            us = median_us(fn, grad_to_none)
            gpu, gpu_s = None, "n/a"
            if graph:
                try:
                    gpu = graph_us(fn, grad_to_none)
                    gpu_s = f"{gpu:8.1f}"
                except Exception as e:  # e.g. a host sync inside fn cannot be captured
                    gpu_s = f"n/a ({type(e).__name__})"
            torch.cuda.synchronize()
            for t in grad_to_none or []:
                t.grad = None
            mb = extra_mb(fn)
            gbs = nbytes / (gpu if gpu else us) / 1e3
            rows.append((name, impl, f"{us:8.1f}", gpu_s, f"{gbs:7.1f}", f"{mb:8.1f}"))
        except Exception as e:  # keep going: one broken row must not hide the others
            traceback.print_exc()
            rows.append((name, impl, "ERROR", type(e).__name__, str(e).splitlines()[0][:60] if str(e) else "", ""))

    for dtype in (torch.bfloat16, torch.float32):
        try:
            z, dense, sparse = asl_inputs(ASL_B, ASL_C, dtype, seed=0)
            dense_t = dense.to(dtype)
        except Exception:
            traceback.print_exc()
            continue
        z.requires_grad_(True)
        es = z.element_size()
        nbytes = ASL_B * ASL_C * (es + dense_t.element_size() + es)
        name = f"ASL fwd+bwd {ASL_B}x{ASL_C} {str(dtype)[6:]}"

        def step(fn, tgt):
            def run():
                loss = fn(z, tgt)
                loss.backward()
                return loss
            return run

        # Triton rows first: a torch.compile earlier in the process can slow later Python-side launches.
        add(name, "Triton (dense targets)", step(asl_kernel_mod.weighted_asl, dense_t), nbytes, [z])
        sparse_bytes = ASL_B * ASL_C * 2 * es + sparse.indices.numel() * 12
        add(name, "Triton (sparse targets, L=32)", step(asl_kernel_mod.weighted_asl, sparse), sparse_bytes, [z])
        add(name, "eager reference", step(weighted_asl_reference, dense_t), nbytes, [z])
        add(name, "torch.compile(reference)", step(torch.compile(weighted_asl_reference), dense_t), nbytes, [z])

    for dtype in (torch.float32, torch.bfloat16):
        try:
            s = scores_inputs(SK_B, SK_K, dtype)
        except Exception:
            traceback.print_exc()
            continue
        nbytes = SK_B * SK_K * (s.element_size() + 4)
        name = f"Sinkhorn {SK_B}x{SK_K} {SK_ITERS} it {str(dtype)[6:]}"
        add(name, "Triton", lambda: sk_kernel_mod.sinkhorn(s, n_iters=SK_ITERS), nbytes)
        add(name, "SwAV original (eager)", lambda: swav_sinkhorn(s, n_iters=SK_ITERS), nbytes)
        add(name, "eager reference", lambda: sinkhorn_reference(s, n_iters=SK_ITERS), nbytes)
        compiled = torch.compile(sinkhorn_reference)
        add(name, "torch.compile(reference)", lambda: compiled(s, n_iters=SK_ITERS), nbytes)

    header = ("operation", "implementation", "wall µs", "GPU µs", "GB/s", "extra MB")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    print(f"\n{device_line()}")
    print("wall µs: do_bench median (includes Python/launch overhead when it exceeds the GPU time);")
    print("GPU µs: CUDA-graph replay, L2 flushed before each call; GB/s = fewest bytes the operation must")
    print("move / GPU µs (wall µs where n/a); extra MB: peak allocation of one call, outputs included")
    for r in [header] + rows:
        print(" | ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    return 0


# ----------------------------------------------------------------------------------------- check
# The gradient is rounded twice to the logits' dtype (saved in forward, scaled in backward): 2 eps.
GRAD_RTOL = {torch.float32: 2e-6, torch.float16: 2**-9, torch.bfloat16: 2**-6}


def check_asl(shape, dtype, targets, params, extreme=False, n_pos=None):
    b, c = shape
    z, dense, sparse = asl_inputs(b, c, dtype, n_pos=n_pos or max(1, min(40, c // 3)))
    if extreme:  # |z| = 1e4 everywhere
        z = (torch.sign(torch.randn(b, c, device=DEV)) * 1e4).to(dtype)
    tgt = sparse if targets == "sparse" else dense
    if targets == "sparse-dup":  # duplicate classes in a row: the larger confidence counts
        idx = torch.cat([sparse.indices, sparse.indices[:, :3]], dim=1)
        val = torch.cat([sparse.values, torch.rand_like(sparse.values[:, :3])], dim=1)
        tgt = SparseTargets(idx, val)
    scale = float(torch.rand(()) * 4 + 0.5)
    zk = z.clone().requires_grad_(True)
    loss = asl_kernel_mod.weighted_asl(zk, tgt, **params)
    (loss * scale).backward()
    z64 = z.detach().double().requires_grad_(True)
    tgt64 = tgt if isinstance(tgt, SparseTargets) else tgt.double()
    ref = weighted_asl_reference(z64, tgt64, **params)
    (ref * scale).backward()
    loss_err = abs(loss.item() - ref.item()) / max(abs(ref.item()), 1e-30)
    g, gr = zk.grad.double(), z64.grad
    tol = GRAD_RTOL[dtype] * gr.abs() + 1e-6 * gr.abs().max() + 1e-7
    grad_err = ((g - gr).abs().max() / gr.abs().max().clamp(min=1e-30)).item()
    ok = (
        loss.dtype == torch.float32 and loss.dim() == 0 and math.isfinite(loss.item())
        and loss_err < 1e-4 and bool(torch.isfinite(g).all()) and bool(((g - gr).abs() <= tol).all())
    )
    return ok, f"loss rel err {loss_err:.1e}, max|dz-ref|/max|ref| {grad_err:.1e}"


def check_sinkhorn(shape, dtype, t_max, scale=1.0, n_iters=3):
    b, k = shape
    s = scores_inputs(b, k, dtype, scale)
    q = sk_kernel_mod.sinkhorn(s, n_iters=n_iters, t_max=t_max)
    r = sinkhorn_reference(s.double(), n_iters=n_iters, t_max=t_max)
    finite = bool(torch.isfinite(q).all())
    err = ((q.double() - r).abs().max() / r.abs().max()).item()
    row_err = (q.double().sum(1) - 1).abs().max().item()
    # fp32 rounding of L = scores / eps costs |L| * 2^-24 absolute in log Q: scale the tolerance with max |L|.
    l_max = (s.double() / 0.05).abs().max().item() if t_max is None else 20.0
    tol = 1e-4 * max(1.0, l_max / 20.0)
    ok = finite and q.dtype == torch.float32 and q.shape == s.shape and err < tol and row_err < 1e-4
    return ok, f"max|Q-ref|/max|ref| {err:.1e} (tol {tol:.0e}), max|rowsum-1| {row_err:.1e}"


def tiny_cases():
    """A few small shapes for the CPU interpreter: proves the check path runs, not the GPU numerics."""
    paper = dict(eta=10.0, gamma_pos=4.0, gamma_neg=1.0, clip=0.0)
    return [("ASL (3, 300) fp32 dense paper", lambda: check_asl((3, 300), torch.float32, "dense", paper)),
            ("ASL (3, 300) fp32 sparse paper", lambda: check_asl((3, 300), torch.float32, "sparse", paper)),
            ("Sinkhorn (37, 129) fp32 t_max=10.0", lambda: check_sinkhorn((37, 129), torch.float32, 10.0)),
            ("Sinkhorn (37, 129) fp32 t_max=None", lambda: check_sinkhorn((37, 129), torch.float32, None))]


def check_rows(tiny: bool = False):
    paper = dict(eta=10.0, gamma_pos=4.0, gamma_neg=1.0, clip=0.0)
    asl = dict(eta=1.0, gamma_pos=0.0, gamma_neg=4.0, clip=0.05)
    cases = []
    shapes = [(1, 1), (3, 1000), (5, 4097), (33, 777), (7, ASL_C), (ASL_B, ASL_C)]
    for i, shape in enumerate(shapes):
        for j, dtype in enumerate((torch.float32, torch.float16, torch.bfloat16)):
            for targets in ("dense", "sparse"):
                params = paper if (i + j) % 2 == 0 else asl
                cases.append((f"ASL {shape} {str(dtype)[6:]} {targets} {'paper' if params is paper else 'asl'}",
                              lambda s=shape, d=dtype, t=targets, p=params: check_asl(s, d, t, p)))
    for dtype in (torch.float16, torch.bfloat16):
        for params in (paper, asl):
            cases.append((f"ASL |z|=1e4 (64, {ASL_C}) {str(dtype)[6:]} {'paper' if params is paper else 'asl'}",
                          lambda d=dtype, p=params: check_asl((64, ASL_C), d, "dense", p, extreme=True)))
    cases.append(("ASL (9, 300) fp32 sparse duplicates",
                  lambda: check_asl((9, 300), torch.float32, "sparse-dup", paper)))
    cases.append(("ASL (9, 300) fp32 sparse duplicates L>64",
                  lambda: check_asl((9, 300), torch.float32, "sparse-dup", dict(paper, clip=0.05), n_pos=70)))
    for shape in [(SK_B, SK_K), (1000, SK_K), (37, 129), (1, 5), (513, 65536)]:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for t_max in (10.0, None):
                cases.append((f"Sinkhorn {shape} {str(dtype)[6:]} t_max={t_max}",
                              lambda s=shape, d=dtype, t=t_max: check_sinkhorn(s, d, t)))
    cases.append(("Sinkhorn (4096, 3000) fp16 scores x1e3 t_max=10",
                  lambda: check_sinkhorn((SK_B, SK_K), torch.float16, 10.0, scale=1e3)))
    cases.append(("Sinkhorn (4096, 3000) fp32 scores x1e3 t_max=None",
                  lambda: check_sinkhorn((SK_B, SK_K), torch.float32, None, scale=1e3)))
    cases.append(("Sinkhorn (300, 1000) fp32 20 iterations",
                  lambda: check_sinkhorn((300, 1000), torch.float32, 10.0, n_iters=20)))

    if tiny:
        cases = tiny_cases()
    rows, failed = [], 0
    for name, fn in cases:
        try:
            ok, detail = fn()
        except Exception as e:
            traceback.print_exc()
            ok, detail = False, f"ERROR {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
        failed += not ok
        rows.append(("PASS" if ok else "FAIL", name, detail))

    # Not a pass/fail row: what SwAV's own code does with the large fp16 scores.
    if not tiny:
        try:
            s = scores_inputs(SK_B, SK_K, torch.float16, 1e3)
            swav_finite = bool(torch.isfinite(swav_sinkhorn(s)).all())
            ours_finite = bool(torch.isfinite(sk_kernel_mod.sinkhorn(s)).all())
            rows.append(("INFO", "fp16 scores x1e3: all finite?", f"SwAV original {swav_finite}, Triton {ours_finite}"))
        except Exception as e:
            rows.append(("INFO", "fp16 scores x1e3", f"ERROR {type(e).__name__}"))

    w = max(len(r[1]) for r in rows)
    print(f"\n{device_line()}")
    for r in rows:
        print(f"{r[0]:4} | {r[1].ljust(w)} | {r[2]}")
    print(f"{len(rows)} rows, {failed} FAIL")
    return 1 if failed else 0


# ----------------------------------------------------------------------------------------- sweep
def sweep_rows():
    """GPU µs (graph replay) of a few tile configurations; the defaults are in each kernel's CONFIG."""
    rows = []

    def timed(label, fn, grad_to_none=None):
        try:
            rows.append(f"{label}: wall {median_us(fn, grad_to_none):.1f} µs, GPU {graph_us(fn, grad_to_none):.1f} µs")
        except Exception as e:
            rows.append(f"{label}: ERROR {type(e).__name__}")

    z, dense, _ = asl_inputs(ASL_B, ASL_C, torch.bfloat16, seed=0)
    z.requires_grad_(True)
    dense = dense.to(torch.bfloat16)
    saved = dict(asl_kernel_mod.CONFIG)
    for block, warps in ((1024, 4), (2048, 4), (2048, 8), (4096, 4), (4096, 8), (8192, 8), (8192, 16)):
        asl_kernel_mod.CONFIG.update(BLOCK=block, num_warps=warps)
        timed(f"ASL bf16 BLOCK={block} warps={warps}", lambda: asl_kernel_mod.weighted_asl(z, dense).backward(), [z])
    asl_kernel_mod.CONFIG.update(saved)
    s = scores_inputs(SK_B, SK_K, torch.float32)
    saved = dict(sk_kernel_mod.CONFIG)
    for col in ((32, 64, 4), (64, 64, 8), (16, 128, 4), (32, 128, 8)):
        for row in ((4, 512, 4), (1, 1024, 4), (2, 1024, 8)):
            sk_kernel_mod.CONFIG.update(
                COL_BLOCK_B=col[0], COL_BLOCK_K=col[1], COL_WARPS=col[2],
                ROW_BLOCK_R=row[0], ROW_BLOCK_K=row[1], ROW_WARPS=row[2],
            )
            timed(f"Sinkhorn fp32 col={col} row={row}", lambda: sk_kernel_mod.sinkhorn(s, n_iters=SK_ITERS))
    sk_kernel_mod.CONFIG.update(saved)
    print("\n".join(rows))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="kernels vs float64 references, PASS/FAIL table")
    parser.add_argument("--sweep", action="store_true", help="time a few tile configurations")
    parser.add_argument("--tiny", action="store_true",
                        help="with --check: a few small cases on the CPU (needs TRITON_INTERPRET=1)")
    args = parser.parse_args(argv)
    if args.tiny:
        global DEV
        DEV = "cpu"
        return check_rows(tiny=True)
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU (the kernels' CPU tests run under TRITON_INTERPRET=1 in tests/)")
        return 2
    if args.sweep:
        return sweep_rows()
    if args.check:
        return check_rows()
    return bench_rows()


if __name__ == "__main__":
    from provenance import provenance_line  # what the numbers below were measured with
    print(provenance_line(), flush=True)
    sys.exit(main())
