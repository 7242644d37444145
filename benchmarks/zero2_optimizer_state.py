"""ZeRO-2 partitions the optimizer state: measure it per rank for 1 and 2 ranks (CPU, gloo).

Runs one optimizer step of the tiny config through the `deepspeed` launcher with 1 and 2 ranks and
reads back each rank's optimizer-state file of the checkpoint (fp32 master weights + AdamW moments).
  python benchmarks/zero2_optimizer_state.py [--config configs/test_tiny.yaml]
"""
import argparse
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def numel(obj):
    if torch.is_tensor(obj):
        return obj.numel()
    if isinstance(obj, dict):
        return sum(numel(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(numel(v) for v in obj)
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/test_tiny.yaml")
    a = ap.parse_args()
    bin_dir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", MLFLOW_DISABLE_TELEMETRY="true", PATH=f"{bin_dir}:{env['PATH']}")
    rows = []
    for world in (1, 2):
        out = Path(tempfile.mkdtemp()) / "run"
        cmd = [str(bin_dir / "deepspeed"), "--num_gpus", str(world), "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "launchers/pretrain.py", "--config", a.config,
               "--set", f"run.output_dir={out}", "--set", "optim.max_steps=1", "--set", "tracking.enabled=false",
               "--set", f"optim.micro_batch_size={4 // world}"]
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
        tag = sorted((out / "checkpoints").glob("step_*"))[-1]
        for f in sorted(tag.glob("zero_pp_rank_*_optim_states.pt")):
            sd = torch.load(f, map_location="cpu", weights_only=False)
            rows.append((world, f.name, f.stat().st_size, numel(sd["optimizer_state_dict"])))
    print(f"{'ranks':>5} {'file':45} {'MiB':>8} {'fp32 elements':>14}")
    for world, name, size, n in rows:
        print(f"{world:5d} {name:45} {size / 2**20:8.2f} {n:14,d}")


if __name__ == "__main__":
    from provenance import provenance_line  # what the numbers below were measured with
    print(provenance_line(), flush=True)
    main()
