"""Where a step's time goes, with no device read of its own (issue 19, item 3).

`StepPerf` adds up host wall-clock time per optimizer step: blocked on the loader (data wait), in the trainer's
micro-batch step (forward + backward + optimizer), of it in `engine.step()` (optimizer), and in checkpoints,
evaluation and hooks. On a GPU the host clock sees device time only where the step waits for the device: the
step's one host read (after the forward) and DeepSpeed's own overflow check / gradient norm in `step()`; so in a
steady state the step's time is its device time, and `optimizer_s` includes finishing the backward. On the CPU
every figure is exact.

FLOPs per image are counted once, on the run's first real micro-batch (teacher forward, student forwards and
backwards, heads), with torch.utils.flop_counter.FlopCounterMode: matmuls, convolutions and attention, not
elementwise ops (what MFU is conventionally measured on). MFU = achieved FLOP/s per device / peak FLOP/s:
run.peak_tflops, else a table of known GPUs (dense, no sparsity), else on the CPU a fp32 matmul measured once
at start (so `make demo`'s MFU is against what this CPU can do, not a datasheet).
"""
from __future__ import annotations

import resource
import time

import torch

# dense peak TFLOP/s per device, by the name torch reports (first match wins) and precision; fp32 = TF32 tensor cores
PEAK_TFLOPS = (
    ("H200", {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7}),
    ("H100 PCIe", {"bf16": 756.5, "fp16": 756.5, "fp32": 378.0}),
    ("H100", {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0}),
    ("L40S", {"bf16": 362.1, "fp16": 362.1, "fp32": 183.0}),
    ("A10", {"bf16": 125.0, "fp16": 125.0, "fp32": 62.5}),
    ("V100", {"bf16": 0.0, "fp16": 125.0, "fp32": 15.7}),
)


def table_peak_tflops(device_name: str, precision: str) -> float:
    """The table's dense peak for a device name, 0.0 when it is not listed."""
    for key, peaks in PEAK_TFLOPS:
        if key in device_name:
            return peaks.get(precision, 0.0)
    return 0.0


def measure_matmul_tflops(n: int = 1024, repeats: int = 5, dtype=torch.float32) -> float:
    """Best achieved TFLOP/s of an n x n fp32 matmul on the CPU (2 n^3 FLOPs each), of `repeats` tries."""
    g = torch.Generator().manual_seed(0)  # its own stream: a resumed run's restored RNG must not move
    a, b = torch.randn(n, n, dtype=dtype, generator=g), torch.randn(n, n, dtype=dtype, generator=g)
    torch.mm(a, b)  # warm-up: thread pool, allocation
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def peak_tflops(device: torch.device, precision: str, override: float = 0.0) -> tuple[float, str]:
    """(peak TFLOP/s per device, where it comes from)."""
    if override > 0:
        return override, "run.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = table_peak_tflops(name, precision)
        return (peak, f"table ({name}, {precision})") if peak else (0.0, f"unknown GPU {name}: set run.peak_tflops")
    return measure_matmul_tflops(), "measured (CPU fp32 matmul)"


def cpu_attention_formulas() -> dict:
    """FlopCounterMode knows the GPU attention kernels but not the CPU's flash kernel that
    scaled_dot_product_attention dispatches to: without these its matmuls would be missed."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten

    def forward(q, k, v, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(q, k, v)

    def backward(grad_out, q, k, v, *args, out_shape=None, **kwargs):
        return sdpa_backward_flop_count(grad_out, q, k, v)
    return {aten._scaled_dot_product_flash_attention_for_cpu: forward,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: backward}


def flop_counter():
    """The one FLOP counter of the runtime and benchmarks/flops.py."""
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False, custom_mapping=cpu_attention_formulas())


def count_flops(fn, *args, **kwargs):
    """(fn's result, FLOPs it ran, forward and backward, as flop_counter() counts them)."""
    with flop_counter() as counter:
        result = fn(*args, **kwargs)
    return result, int(counter.get_total_flops())


def memory_gb(device: torch.device) -> dict[str, float]:
    """Peak and reserved memory of this process (GPU: the caching allocator's figures, host-side counters; CPU:
    peak resident set)."""
    if device.type == "cuda":
        return {"perf/mem_peak_gb": torch.cuda.max_memory_allocated(device) / 2**30,
                "perf/mem_reserved_gb": torch.cuda.memory_reserved(device) / 2**30}
    return {"perf/mem_peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


class StepPerf:
    """Host time of one optimizer step by part; `figures` turns it into the step's perf/* metrics and resets."""

    def __init__(self, peak_tflops_per_device: float = 0.0, world: int = 1):
        self.peak, self.world = peak_tflops_per_device, world
        self.flops_per_image = 0.0
        self._mark = time.perf_counter()
        self.reset()

    def reset(self) -> None:
        self.data_wait_s = self.step_s = self.optimizer_s = self.other_s = 0.0

    def lap(self) -> float:
        now = time.perf_counter()
        dt, self._mark = now - self._mark, now
        return dt

    def timed(self, fn):
        """fn, its host time added to optimizer_s (engine.step)."""
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.optimizer_s += time.perf_counter() - t0
        return wrapper

    def figures(self, images: int, device: torch.device) -> dict[str, float]:
        total = self.data_wait_s + self.step_s + self.other_s
        out = {"perf/data_wait_s": self.data_wait_s, "perf/fwd_bwd_s": max(0.0, self.step_s - self.optimizer_s),
               "perf/optimizer_s": self.optimizer_s, "perf/ckpt_eval_s": self.other_s, "perf/step_s": total,
               "perf/data_wait_frac": self.data_wait_s / total if total > 0 else 0.0,
               "perf/img_per_s": images / total if total > 0 else 0.0}
        if self.flops_per_image:
            tflops = self.flops_per_image * images / max(total, 1e-9) / self.world / 1e12
            out["perf/tflops"] = tflops
            if self.peak:
                out["perf/mfu"] = tflops / self.peak
        out.update(memory_gb(device))
        self.reset()
        return out


def start_step_perf(engine, device: torch.device, precision: str, peak_override: float, world: int, log) -> StepPerf:
    """The run's StepPerf, made at its first step: peak FLOP/s (run.peak_tflops, the GPU table, or a CPU matmul
    measured now), said in the log, and engine.step timed."""
    peak, source = peak_tflops(device, precision, peak_override)
    log(f"perf: peak {peak:.4g} TFLOP/s per device ({source}); FLOPs per image counted on the first step")
    p = StepPerf(peak, world)
    engine.step = p.timed(engine.step)  # optimizer time; an instance attribute over the method
    return p
