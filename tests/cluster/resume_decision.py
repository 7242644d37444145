"""Run on every rank by the fault-matrix test: the resume decision (hvpmtl.checkpoint.open_run: the lock,
rank 0's proposals, each rank's verification of its own files, the agreement) for each run folder given, with
no engine and no training. Each rank writes what it decided to <result>.rank<r>.json."""
import argparse
import hashlib
import json
import warnings
from pathlib import Path

import torch.distributed as dist

from hvpmtl import checkpoint
from hvpmtl.dist import init_distributed


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--result", required=True)
    p.add_argument("--local_rank", type=int, default=None)  # set by the deepspeed launcher
    p.add_argument("folders", nargs="+")
    args = p.parse_args()
    rank, _, world = init_distributed(120)
    out = {}
    for folder in args.folders:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                run = checkpoint.open_run(folder, "auto", log=lambda m: None)
                out[folder] = {"tag": run.choice.tag_dir.name if run.choice else None, "run_id": run.run_id,
                               "rng": hashlib.sha256(run.choice.rank_state["rng"]["torch"].numpy().tobytes()).hexdigest()
                               if run.choice else None,
                               "warnings": [str(w.message) for w in caught]}
                if run.lock is not None:
                    run.lock.release()
            except checkpoint.CheckpointError as e:
                out[folder] = {"error": str(e)}
    Path(f"{args.result}.rank{rank}.json").write_text(json.dumps({"world": world, "folders": out}))
    # leave together, with the process group torn down: a rank exiting while gloo's threads still run was
    # seen to abort ("terminate called without an active exception", exit -6) on a loaded machine
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
