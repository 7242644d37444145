"""One timed all-reduce of the gradient's size (the config's trainable parameters) over every rank: its time, the
bus bandwidth as nccl-tests reports it, and a check that the sum arrived intact."""
from __future__ import annotations

import time


def timed_allreduce(numel: int, dtype, device, world: int, iters: int = 3) -> dict:
    import torch
    import torch.distributed as dist

    x = torch.ones(numel, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    dist.all_reduce(x)  # warm-up: connections, NCCL's buffers
    times = []
    for _ in range(iters):
        x.fill_(1)
        sync()
        dist.barrier()
        t = time.perf_counter()
        dist.all_reduce(x)
        sync()
        times.append(time.perf_counter() - t)
    seconds = sorted(times)[len(times) // 2]
    nbytes = numel * x.element_size()
    out = {"numel": numel, "dtype": str(dtype).replace("torch.", ""), "bytes": nbytes, "seconds": seconds,
           # nccl-tests' bus bandwidth: what each link carries in a ring all-reduce, comparable across world sizes
           "busbw_gbs": nbytes * 2 * (world - 1) / world / seconds / 1e9 if world > 1 else 0.0}
    ends = (float(x[0]), float(x[-1]))
    if ends != (world, world):
        out["error"] = f"all-reduce of ones summed to {ends}, not {world}: corrupted traffic"
    return out
