"""One rank's pre-flight (launchers/doctor.py): the config and its batch sizes at this world size, then the rank's
record (versions.py, data_index.py, output_dir.py, allreduce.py, memory.py), gathered on rank 0, compared and
printed (compare.py, report.py). Every rank returns the same exit code: 0 every check passed, 2 config error, 5 a
rank did not answer (collective failed or timed out), 7 some check failed."""
from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

from hvpmtl.doctor.allreduce import timed_allreduce
from hvpmtl.doctor.compare import Limits, compare
from hvpmtl.doctor.data_index import index_record
from hvpmtl.doctor.memory import GIB, gradient_numel, memory, model_state_bytes, zero_stage
from hvpmtl.doctor.output_dir import check_output_dir, remove_probes
from hvpmtl.doctor.report import report
from hvpmtl.doctor.versions import revision, sources_hash, versions

EXIT_OK, EXIT_CONFIG, EXIT_PEER_LOST, EXIT_CHECK_FAILED = 0, 2, 5, 7


def main(args: argparse.Namespace) -> int:
    """One rank's pre-flight; rank 0 prints the table. Every rank returns the same exit code."""
    from hvpmtl.config import ConfigError, check_batch_sizes, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    except OSError as e:
        print(f"config error: cannot read {args.config}: {e.strerror or e}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    from hvpmtl.train.deepspeed_setup import DTYPES, prepare_deepspeed, resolve_precision

    prepare_deepspeed()
    import torch
    import torch.distributed as dist

    from hvpmtl.dist import destroy_process_group, init_distributed

    rank, local_rank, world = init_distributed(timeout_s=args.timeout_s)
    host = socket.gethostname()
    try:  # the batch sizes at this world size, as training checks them: every rank refuses alike
        check_batch_sizes(cfg, world)
    except ConfigError as e:
        print(f"config error at {world} rank(s): {e}", file=sys.stderr, flush=True)
        destroy_process_group()
        return EXIT_CONFIG
    try:
        return _run(args, cfg, rank, local_rank, world, host, torch, dist, DTYPES[resolve_precision(cfg)],
                    resolve_precision(cfg))
    except (RuntimeError, dist.DistBackendError) as e:  # a collective timed out or a peer went away
        print(f"[hvpmtl doctor] {host} (rank {rank}): a collective failed, a rank is missing or hung "
              f"(waited up to {args.timeout_s} s): {type(e).__name__}: {str(e).splitlines()[0][:300]}",
              file=sys.stderr, flush=True)
        return EXIT_PEER_LOST
    finally:
        destroy_process_group()


def _run(args, cfg, rank, local_rank, world, host, torch, dist, dtype, precision) -> int:
    started = time.monotonic()
    rec: dict = {"rank": rank, "local_rank": local_rank, "host": host, "pid": os.getpid(),
                 "revision": revision(), "sources": sources_hash(), **versions(local_rank)}
    rec["index"] = index_record(cfg)
    out_dir = Path(cfg.run.output_dir).absolute()
    o, made, nonce = check_output_dir(out_dir, rank, world, dist)

    # clocks: read right after a barrier, so ranks differ by the barrier's latency (milliseconds) plus their skew
    if world > 1:
        dist.barrier()
    rec["clock"] = time.time()

    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    params, teacher = gradient_numel(cfg)
    numel = args.allreduce_numel or params
    try:
        rec["allreduce"] = timed_allreduce(numel, dtype, device, world)
    except (MemoryError, torch.OutOfMemoryError) as e:
        rec["allreduce"] = {"error": f"no memory for {numel:,} {dtype}: {e}"[:300]}
    need = args.need_gb if args.need_gb is not None else \
        model_state_bytes(params, teacher, world, precision, zero_stage(cfg)) / GIB
    rec.update(memory=memory(local_rank), need_gb=need, params=params, seconds=time.monotonic() - started)
    rec["output_dir"] = o

    records = [None] * world
    if world > 1:
        dist.all_gather_object(records, rec)
    else:
        records = [rec]
    limits = Limits(args.max_clock_skew_s, args.min_busbw_gbs, args.need_gb)
    code = [EXIT_OK]
    if rank == 0:
        problems = compare(records, limits)
        print(report(records, problems, limits), flush=True)
        print(f"[hvpmtl doctor] {params:,} trainable parameters, {precision}, "
              f"{time.monotonic() - started:.1f} s on rank 0", flush=True)
        code[0] = EXIT_CHECK_FAILED if problems else EXIT_OK
    if world > 1:
        dist.broadcast_object_list(code, src=0)
    remove_probes(out_dir, nonce, rank, world, made, dist)
    return int(code[0])
