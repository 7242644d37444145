"""Memory: what the config's model states take per rank (weights, gradients, AdamW's state by ZeRO stage, the EMA
teacher; activations come on top) against the free memory of the rank's GPU (or, without one, its RAM)."""
from __future__ import annotations

from pathlib import Path

GIB = 2**30


def gradient_numel(cfg) -> tuple[int, int]:
    """(trainable parameters of the student = the gradient a step reduces, parameters of the EMA teacher), counted
    on the meta device: no weights are made."""
    import torch

    from hvpmtl.models.meta_arch import Student

    with torch.device("meta"):
        student = Student(cfg)
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    teacher = 0
    if student.weights["distill"] > 0:
        teacher = sum(p.numel() for m in (student.backbone, student.label_decoder) for p in m.parameters())
    return trainable, teacher


def zero_stage(cfg) -> int:
    """run.ds_config's ZeRO stage (its batch keys are not read here: the batch sizes are already checked at the
    job's world size)."""
    from hvpmtl.config import ConfigError
    from hvpmtl.train.deepspeed_setup import build_ds_config

    try:
        return int(build_ds_config(cfg, 0, "fp32").get("zero_optimization", {}).get("stage", 0))
    except ConfigError:  # the engine reports a bad ds_config itself; assume the designed ZeRO-2
        return 2


def model_state_bytes(params: int, teacher: int, world: int, precision: str, stage: int) -> int:
    """Bytes per rank of the model states: weights (2 bytes bf16/fp16, 4 fp32), gradients (partitioned from ZeRO
    stage 2), AdamW's fp32 state (master copy under bf16/fp16, m and v; partitioned from stage 1), the fp32
    teacher. Activations come on top (docs/BENCHMARKS.md measures them per config)."""
    w = 4 if precision == "fp32" else 2
    adam = 8 if precision == "fp32" else 12
    grads = w * params / (world if stage >= 2 else 1)
    optim = adam * params / (world if stage >= 1 else 1)
    return int(w * params + grads + optim + 4 * teacher)


def memory(local_rank: int) -> dict:
    import torch

    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(local_rank)
        return {"kind": "gpu", "free_gb": free / GIB, "total_gb": total / GIB}
    avail = 0.0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return {"kind": "cpu", "free_gb": avail, "total_gb": None}
