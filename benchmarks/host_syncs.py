"""Collectives and host reads per training step, counted in the real loop: `Pretrainer.train_one_epoch` on
configs/test_tiny.yaml (DeepSpeed ZeRO-2 on gloo, all four objectives), ranks as processes of this script.

Counted: calls of torch.distributed.all_reduce, and reads of a tensor's value on the host (Tensor.item, .tolist,
.cpu, .numpy, bool(), float(), int()), made from hvpmtl's own files (hvpmtl/, kernels/). Each read is a host sync
when the tensor is on a GPU. DeepSpeed's own gradient reduction and its reads are not counted (their calls come
from deepspeed/). Step 1 (set-up, first log) is run and dropped; the next --steps are counted, with
run.log_every larger than the run (steps that print or read the gradient norm add one read; see BENCHMARKS.md).
Runs against any checkout: PYTHONPATH=<checkout> python benchmarks/host_syncs.py.

  python benchmarks/host_syncs.py --ranks 2 --steps 4 [--accum 2]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


class CallCounter:
    """Counts all_reduce calls and host reads whose immediate caller is a file under one of `roots`, by file."""

    def __init__(self, roots):
        self.roots = [os.path.realpath(r) + os.sep for r in roots]
        self.counts: collections.Counter = collections.Counter()
        self._ours: dict[str, str | None] = {}
        self._saved = []

    def _where(self, filename: str) -> str | None:
        if filename not in self._ours:
            real = os.path.realpath(filename)
            root = next((r for r in self.roots if real.startswith(r)), None)
            self._ours[filename] = None if root is None else os.path.relpath(real, os.path.dirname(root[:-1]))
        return self._ours[filename]

    def _wrap(self, owner, name: str, kind: str):
        import sys as _sys

        original = getattr(owner, name)
        counter = self

        def wrapper(*args, **kwargs):
            where = counter._where(_sys._getframe(1).f_code.co_filename)
            if where is not None:
                counter.counts[(kind, where)] += 1
            return original(*args, **kwargs)

        self._saved.append((owner, name, original))
        setattr(owner, name, wrapper)

    def __enter__(self):
        import torch
        import torch.distributed as dist

        self._wrap(dist, "all_reduce", "all_reduce")
        for name in READS:
            self._wrap(torch.Tensor, name, "host_read")
        return self

    def __exit__(self, *exc):
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        self._saved.clear()

    def reset(self) -> None:
        self.counts.clear()

    def summary(self, per: int) -> dict:
        """{kind: {file: calls per step}} and totals per kind."""
        out: dict = collections.defaultdict(dict)
        for (kind, where), n in sorted(self.counts.items()):
            out[kind][where] = n / per
        for kind in ("all_reduce", "host_read"):
            out[kind + "_total"] = sum(v for k, v in out.get(kind, {}).items())
        return dict(out)


class ListLoader:
    """The loader interface of the engine over a list of batches."""

    def __init__(self, batches):
        self.batches, self.position, self.epoch = batches, 0, 0

    def __iter__(self):
        while self.position < len(self.batches):
            self.position += 1
            yield self.batches[self.position - 1]

    def __len__(self):
        return len(self.batches)

    def set_epoch(self, e):
        self.epoch = e

    def state_dict(self):
        return {"position": self.position, "epoch": self.epoch}

    def load_state_dict(self, sd):
        self.position, self.epoch = sd["position"], sd["epoch"]


def count_steps(out_dir: str, steps: int, accum: int = 1, root: Path | None = None) -> dict:
    """In this process (a rank of an initialised or to-be-initialised world): counts per optimizer step."""
    from hvpmtl.config import load_config
    from hvpmtl.train.pretrain import Pretrainer

    root = root or Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs/test_tiny.yaml", [
        f"run.output_dir={out_dir}", "tracking.enabled=false", "run.log_every=100000", "run.checkpoint_every=100000",
        f"optim.max_steps={steps + 1}", "optim.micro_batch_size=2", f"optim.grad_accum_steps={accum}",
        f"run.ds_config={root / 'ds_configs/zero2.json'}"])
    trainer = Pretrainer(cfg, resume="none")
    source = trainer.loader
    source.set_epoch(0)
    batches = [b for _, b in zip(range((steps + 1) * accum), source)]
    import hvpmtl
    import hvpmtl.kernels

    counter = CallCounter([Path(hvpmtl.__file__).parent, Path(hvpmtl.kernels.__file__).parent])
    with counter:
        trainer.loader = ListLoader(batches[:accum])  # step 1: dropped
        trainer.train_one_epoch()
        counter.reset()
        trainer.loader = ListLoader(batches[accum:])
        trainer.train_one_epoch()
    assert trainer.step == steps + 1, f"ran {trainer.step} steps"
    if trainer.tracker is not None:
        trainer.tracker.close()
    result = counter.summary(per=steps)
    result.update(steps=steps, accum=accum, world_size=trainer.world)
    return result


def _worker(rank: int, world: int, port: int, out_dir: str, steps: int, accum: int, queue) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch

    torch.set_num_threads(1)
    try:
        queue.put((rank, count_steps(f"{out_dir}/run", steps, accum)))
    except BaseException as e:  # noqa: BLE001 — the parent must hear of it
        queue.put((rank, {"error": f"{type(e).__name__}: {e}"}))
        raise


def count_ranks(world: int, steps: int, accum: int = 1) -> dict[int, dict]:
    """Counts on every rank of a `world`-rank run (spawned processes, gloo)."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as d:
        procs = [ctx.Process(target=_worker, args=(r, world, port, d, steps, accum, queue)) for r in range(world)]
        for p in procs:
            p.start()
        try:
            results = dict(queue.get(timeout=600) for _ in procs)
        finally:
            for p in procs:
                p.join(60)
                if p.is_alive():
                    p.kill()
    return results


def main() -> None:
    try:  # the checkout on PYTHONPATH (to count another version), else this one
        import hvpmtl.kernels  # noqa: F401
    except ModuleNotFoundError:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _bootstrap import import_package

        import_package()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    a = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a.add_argument("--ranks", type=int, default=2)
    a.add_argument("--steps", type=int, default=4)
    a.add_argument("--accum", type=int, default=1)
    args = a.parse_args()
    print(json.dumps(count_ranks(args.ranks, args.steps, args.accum)[0], indent=1))


if __name__ == "__main__":
    from provenance import provenance_line  # what the numbers below were measured with
    print(provenance_line(), flush=True)
    main()
