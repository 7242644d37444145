"""What the offline data commands share: work split in parts over machines (`--part i/N`, e.g. a
Slurm array), a process pool over all cores, resumable work files, and progress output."""
from __future__ import annotations

import io
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np

from hvpmtl.data.formats.issues import DataError
from hvpmtl.fileio import atomic_write


def default_workers() -> int:
    """The cores this process may run on (Slurm and taskset restrict them)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return os.cpu_count() or 1


def parse_part(text: Optional[str]) -> Optional[tuple[int, int]]:
    """'i/N' (0 <= i < N, e.g. $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT) -> (i, N)."""
    if not text:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise DataError(f"--part {text}: expected i/N with 0 <= i < N, e.g. --part 0/8") from None
    if not 0 <= i < n:
        raise DataError(f"--part {text}: expected i/N with 0 <= i < N, e.g. --part 0/8")
    return i, n


def part_units(count: int, part: Optional[tuple[int, int]]) -> range:
    """Part i of N of `count` work units: a contiguous run, parts differing by at most one unit."""
    if part is None:
        return range(count)
    i, n = part
    return range(i * count // n, (i + 1) * count // n)


def process_pool(workers: int) -> ProcessPoolExecutor:
    # spawn: the parent may hold pyarrow/DALI threads, which a fork would copy in a broken state
    return ProcessPoolExecutor(max_workers=max(1, workers), mp_context=multiprocessing.get_context("spawn"))


def save_npz_atomic(path: Path, **arrays) -> None:
    """A work file appears whole or not at all (hvpmtl.fileio.atomic_write)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write(path, buf.getvalue())


def load_npz(path: Path) -> Optional[dict]:
    try:
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError):
        return None


class Progress:
    """Progress of a long command: tqdm on a terminal, else one line every `every` seconds (logs)."""

    def __init__(self, what: str, total: int, unit: str = "samples", every: float = 10.0, stream=None,
                 enabled: bool = True):
        self.what, self.total, self.unit, self.every = what, total, unit, every
        self.stream = stream or sys.stderr
        self.done, self.t0, self.last = 0, time.perf_counter(), time.perf_counter()
        self.bar = None
        self.enabled = enabled
        if enabled and getattr(self.stream, "isatty", lambda: False)():
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, desc=what, unit=unit, file=self.stream, unit_scale=True)
            except ImportError:
                pass

    def add(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last = now
            rate = self.done / max(now - self.t0, 1e-9)
            left = (self.total - self.done) / rate if rate > 0 and self.total else 0
            pct = f" ({100 * self.done / self.total:.1f}%)" if self.total else ""
            print(f"{self.what}: {self.done:,}/{self.total:,} {self.unit}{pct}, {rate:,.0f}/s, "
                  f"~{left / 60:.1f} min left", file=self.stream, flush=True)

    def close(self) -> float:
        if self.bar is not None:
            self.bar.close()
        return time.perf_counter() - self.t0
