"""Reading a batch's image files for the DALI loaders' external_source: a few threads, each file's JPEG
header checked on the bytes read, a sample that fails named by file:line or (skip_corrupt) replaced; and the
DataError for a batch DALI cannot decode, naming the files in flight.
"""
from __future__ import annotations

import collections
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np

from hvpmtl.data.formats import jpeg
from hvpmtl.data.formats.issues import DataError
from hvpmtl.data.loaders.prepare import Skipped
from hvpmtl.data.loaders.root_guard import RootGuard

log = logging.getLogger(__name__)


class LeftOut:
    """What a loader left out, for the loaders (and the random-tensor source) that hold `skipped` (a
    prepare.Skipped): start-up's counts, and the runtime count FileReader keeps."""

    skipped: Skipped

    @property
    def skipped_corrupt(self) -> int:
        """Samples left out at start-up (parse errors, skip list, skip_corrupt)."""
        return self.skipped.at_start

    def skipped_description(self) -> str:
        return self.skipped.describe()


class FileReader:
    """Reads the encoded images of a batch of ids with a few threads (file I/O releases the GIL) and
    checks each one's JPEG header on the bytes read (format, markers, end of image, width x height
    against max_pixels) before DALI decodes it: the check costs no extra I/O, so start-up need not
    open any image. A sample that fails is an error naming file:line, or with skip_corrupt is left
    out: replaced by the next readable id (i+1, i+2, ...), a choice that depends on nothing but the
    files, so a resumed run replaces it the same way; counted in `skipped.runtime`."""

    MAX_TRIES = 64  # unreadable samples in a row before the root itself is suspect

    def __init__(self, root: str, labels, threads: int = 4, *, max_pixels: int = 0, skip_corrupt: bool = False,
                 skipped: Optional[Skipped] = None, allow_outside_root: bool = False):
        self.root, self.labels = Path(root), labels
        self.guard = None if allow_outside_root else RootGuard(root)
        self.max_pixels, self.skip_corrupt = max_pixels, skip_corrupt
        self.skipped = skipped if skipped is not None else Skipped()
        self.bad: dict[int, str] = {}  # sample id -> why it was left out
        self.pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="hvpmtl-read")

    def where(self, i: int) -> str:
        return f"{self.labels.source}:{self.labels.line(int(i))} ({self.labels.path(int(i))})"

    def path(self, i: int) -> Path:
        return self.root / self.labels.path(int(i))

    def _read(self, i: int) -> tuple[Optional[np.ndarray], str]:
        if i in self.bad:
            return None, self.bad[i]
        real = self.guard.outside(self.path(i)) if self.guard is not None else b""
        if real:
            return None, (f"[bad-path] {self.path(i)} resolves to {os.fsdecode(real)}, outside the image root (a "
                          "symlink): not opened (data.allow_outside_root: true reads such links)")
        try:
            data = np.fromfile(self.path(i), dtype=np.uint8)
        except FileNotFoundError:
            return None, f"[missing-file] {self.path(i)} not found"
        except OSError as e:
            return None, f"[unreadable] cannot read {self.path(i)}: {e.strerror}"
        c = jpeg.check_bytes(data, max_pixels=self.max_pixels)
        return (data, "") if c.usable else (None, f"[{c.code}] {c.detail}")

    def _failed(self, i: int, problem: str) -> None:
        if not self.skip_corrupt:
            raise DataError(f"{self.where(i)}: {problem}. Run `hvpmtl data validate` and train with its skip list "
                            "(data.skip_list), or set data.skip_corrupt: true to leave such samples out")
        if i not in self.bad:
            self.bad[i] = problem
            self.skipped.runtime = len(self.bad)
            n = len(self.bad)
            if n <= 20 or n % 1000 == 0:
                log.warning("data: %s: %s; left out (data.skip_corrupt), %d so far", self.where(i), problem, n)

    def __call__(self, ids) -> tuple[list[np.ndarray], np.ndarray]:
        """(the images' bytes, the ids they belong to: `ids` with any replacement)."""
        ids = [int(i) for i in ids]
        got = list(self.pool.map(self._read, ids))
        for j, (data, problem) in enumerate(got):
            if data is None:
                self._failed(ids[j], problem)
                ids[j], data = self._replacement(ids[j])
                got[j] = (data, "")
        return [d for d, _ in got], np.asarray(ids, np.int64)

    def _replacement(self, i: int) -> tuple[int, np.ndarray]:
        n = len(self.labels)
        for step in range(1, self.MAX_TRIES + 1):
            j = (i + step) % n
            data, problem = self._read(j)
            if data is not None:
                return j, data
            self._failed(j, problem)
        raise DataError(f"{self.MAX_TRIES} samples after {self.where(i)} cannot be read either ({self.bad[i]}): "
                        f"is data.root ({self.root}) right?")

    def close(self) -> None:
        self.pool.shutdown(wait=False)


class BatchSource:
    """external_source callback: batch `info.iteration` of a fixed list of id batches.

    A callable taking BatchInfo is what DALI's checkpointing resumes at the saved iteration.
    """

    def __init__(self, batches, reader: FileReader):
        self.batches, self.reader = batches, reader
        self.in_flight: collections.deque = collections.deque(maxlen=4)  # for error messages

    def __call__(self, info):
        k = info.iteration
        if k >= len(self.batches):
            raise StopIteration
        data, ids = self.reader(np.asarray(self.batches[k], np.int64))
        self.in_flight.append(ids)
        return data, ids.reshape(-1, 1)


def explain_failure(err: Exception, reader: Optional[FileReader], source: Optional[BatchSource], what: str):
    """A DataError for a DALI failure, naming the in-flight files that do not decode."""
    said = str(err).strip()
    if reader is None or source is None:
        return DataError(f"DALI failed while reading {what}. Run `hvpmtl data validate --full-decode` to find the bad "
                         f"sample and pass its skip list (data.skip_list).\nDALI said: {said[:2000]}")
    bad = []
    for ids in source.in_flight:
        for i in ids:
            c = jpeg.check_file(str(reader.path(i)), full_decode=True, max_pixels=reader.max_pixels)
            if not c.usable:
                bad.append(f"  {reader.where(i)}: [{c.code}] {c.detail}")
    names = "\n".join(bad) or "  (every image in flight decodes with PIL; see what DALI said)"
    return DataError(f"DALI failed to decode a batch of {what}; images in flight that fail a full check:\n{names}\n"
                     "Run `hvpmtl data validate --full-decode` and pass its skip list (data.skip_list): a stream "
                     "that breaks inside DALI's decoder cannot be skipped while training, even with "
                     f"data.skip_corrupt.\nDALI said: {said[:2000]}")
