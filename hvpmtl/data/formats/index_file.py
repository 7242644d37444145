"""Reading the data index (the format: index_format.py): `DataIndex` maps the file, checks what it cannot afford
to trust before any array is used, reads a batch's rows by pread, and verifies the whole file offline."""
from __future__ import annotations

import json
import mmap
import os
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa

from hvpmtl.data.formats.index_format import (CHUNK_ROWS, COLUMN_TYPES, FORMAT, KEY_FORMAT, KEY_HEADER, KEY_ISSUES,
                                              KEY_SHA256, LIST_COLUMNS, MAGIC, NUMPY, OLD_MAGIC, PER_SAMPLE, REBUILD,
                                              SHARD_COLUMNS, VERDICTS, checksum_digest, checksum_spots,
                                              default_index_path, is_int, schema_regions)
from hvpmtl.data.formats.issues import CODES, DataError, Issue, make_issue


def _shown(s: str) -> str:
    """A stored text as the format before showed it: bytes that are not UTF-8 as \\xNN."""
    try:
        return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return s.encode("utf-8", "backslashreplace").decode()


class DataIndex:
    """A mapped index. Arrays are read-only numpy views of the mapping (through Arrow's zero-copy IPC reader);
    nothing is copied.

    Nothing in the file is trusted before it is checked: the magic at both ends, the footer's length, the format
    and header, every column's name and type (a closed list), every buffer's extent inside the file, the lengths
    against the sample count, the CSR end points; all before an array is used (O(1): no array is scanned). The
    file stays open: `check_unchanged()` (one fstat, called before each batch's rows are read) turns an index
    truncated or rewritten in place under a running job into a DataError instead of a SIGBUS, and `take()` reads a
    batch's rows with pread at the arrays' file offsets. `verify()` checks the whole-file checksum and every
    array's invariants (offline)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._mm = None
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            raise DataError(f"{self.path}: no data index") from None
        except OSError as e:
            raise DataError(f"{self.path}: cannot read the data index: {e.strerror}") from None
        try:
            self._open(f)
        except BaseException:
            self.close(f)
            raise
        self._file = f

    def _damaged(self, what: str) -> DataError:
        return DataError(f"{self.path}: damaged data index: {what}; {REBUILD}")

    def _old_format(self, fd: int, size: int) -> DataError:
        """An index of the custom format before Arrow IPC: named with the command that rebuilds it (its JSON
        header says from what, when it can be read)."""
        cmd = "hvpmtl data index --list LIST (or --shards FOLDER)"
        try:
            n = int.from_bytes(os.pread(fd, 8, 8), "little")
            h = json.loads(os.pread(fd, n, 16)) if n <= min(size - 16, 64 << 20) else {}
            if h.get("kind") in ("list", "shards") and isinstance(h.get("source"), str):
                cmd = f"hvpmtl data index --{h['kind']} {h['source']}"
                if is_int(h.get("num_classes")):
                    cmd += f" --num-classes {h['num_classes']}"
                if default_index_path(h["source"]) != self.path.resolve():
                    cmd += f" --out {self.path}"
        except (ValueError, RecursionError, AttributeError, OSError):
            pass
        return DataError(f"{self.path}: a data index in the old format (hvpmtl-data-index-v1, before Arrow IPC), "
                         f"which this hvpmtl does not read; rebuild it with `{cmd}`")

    def _open(self, f) -> None:
        fd = f.fileno()
        st = os.fstat(fd)
        size = st.st_size
        head = os.pread(fd, 8, 0)
        if head == OLD_MAGIC:
            raise self._old_format(fd, size)
        if head[:6] != MAGIC:
            raise DataError(f"{self.path}: not an hvpmtl data index (rebuild it with `hvpmtl data index`)")
        if size < 18 or os.pread(fd, 6, size - 6) != MAGIC:
            raise DataError(f"{self.path}: truncated data index (no Arrow footer at its end); {REBUILD}")
        if not schema_regions(fd, size):
            raise self._damaged(f"the schema or footer length runs past the file's {size} bytes")
        self._size, self._mtime = size, st.st_mtime_ns
        self._mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        if len(self._mm) != size:  # changed between fstat and mmap
            raise DataError(f"{self.path}: the data index changed while it was opened; open it again")
        self._buf = pa.py_buffer(self._mm)
        try:
            reader = pa.ipc.open_file(pa.BufferReader(self._buf))
            self._read_metadata(reader.schema.metadata or {})
            if reader.num_record_batches != 1:
                raise self._damaged(f"{reader.num_record_batches} record batches, 1 expected")
            self._check_columns(reader.schema)
            batch = reader.get_batch(0)
            batch.validate()
        except (pa.ArrowException, OSError) as e:  # Arrow's own checks (flatbuffers, body extents)
            why = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            raise self._damaged(f"Arrow cannot read it ({why})") from None
        self._batch = batch
        self._map(batch)

    def _read_metadata(self, meta: dict) -> None:
        def text(key: str) -> str:
            v = meta.get(key.encode())
            if v is None:
                raise self._damaged(f"no {key} in its metadata")
            try:
                return v.decode()
            except UnicodeDecodeError:
                raise self._damaged(f"{key} is not UTF-8") from None
        fmt = meta.get(KEY_FORMAT.encode())
        if fmt is None:
            raise DataError(f"{self.path}: not an hvpmtl data index (an Arrow file without {KEY_FORMAT} in its "
                            "metadata); rebuild it with `hvpmtl data index`")
        if fmt != FORMAT.encode():
            raise DataError(f"{self.path}: index format {fmt[:80]!r}, expected {FORMAT}; rebuild it")
        try:
            h = json.loads(text(KEY_HEADER))
        except (ValueError, RecursionError):
            raise self._damaged("its header is not JSON") from None
        if not isinstance(h, dict) or not is_int(h.get("num_samples")) or h.get("kind") not in ("list", "shards"):
            raise self._damaged("header fields kind or num_samples are missing or of the wrong type")
        if not is_int(h.get("nnz")):
            raise self._damaged(f"nnz {str(h.get('nnz'))[:40]}")
        if not is_int(h.get("max_class", -1), -1, 2**31 - 1):
            raise self._damaged(f"max_class {str(h.get('max_class'))[:40]}")
        if not is_int(h.get("max_labels", 0), 0, 2**31):
            raise self._damaged(f"max_labels {str(h.get('max_labels'))[:40]}")
        files = h.get("issue_files", [])
        if not isinstance(files, list) or not all(isinstance(x, str) for x in files):
            raise self._damaged("issue_files is not a list of names")
        self.checksum = text(KEY_SHA256)
        if len(self.checksum) != 64 or not all(c in "0123456789abcdef" for c in self.checksum):
            raise self._damaged(f"no sha256 checksum in its metadata ({KEY_SHA256} is {self.checksum[:70]!r})")
        self._issues_text = text(KEY_ISSUES)
        self._issues = None
        self.has_checksum = True
        h["format"] = FORMAT
        self.header = h

    def _check_columns(self, schema: pa.Schema) -> None:
        names = schema.names
        want = SHARD_COLUMNS if self.header["kind"] == "shards" else LIST_COLUMNS
        for name in names:
            if name not in want:
                raise self._damaged(f"unknown column '{str(name)[:40]}'")
        if len(set(names)) != len(names) or set(names) != set(want):
            raise self._damaged(f"columns {', '.join(names)[:200]}; expected {', '.join(want)}")
        for field in schema:
            if field.type not in COLUMN_TYPES[field.name]:
                raise self._damaged(f"column {field.name} has type {str(field.type)[:120]} (allowed: "
                                    f"{'; '.join(str(t) for t in COLUMN_TYPES[field.name])})")

    def _view(self, name: str, buf: Optional[pa.Buffer], dtype, length: int) -> None:
        """Array `name`: `length` values of `dtype` at the start of `buf`, which must lie inside the file."""
        dtype = np.dtype(dtype)
        need = length * dtype.itemsize
        if need == 0:
            self._at[name] = (0, dtype, 0)
            self.arrays[name] = np.zeros(0, dtype)
            return
        if buf is None or buf.size < need:
            raise self._damaged(f"array {name} holds {0 if buf is None else buf.size} bytes, {need} expected")
        off = buf.address - self._buf.address
        if not 0 <= off <= self._size - need:
            raise DataError(f"{self.path}: truncated data index (array {name} runs past the end); {REBUILD}")
        self._at[name] = (off, dtype, length)
        self.arrays[name] = np.frombuffer(buf, dtype, length)

    def _offsets(self, name: str, buf: Optional[pa.Buffer], dtype, n: int) -> None:
        """The n + 1 offsets of a variable-length column (Arrow may store none for 0 rows: then [0])."""
        if n == 0 and (buf is None or buf.size < np.dtype(dtype).itemsize):
            self._at[name] = (0, np.dtype(dtype), 0)
            self.arrays[name] = np.zeros(1, dtype)
        else:
            self._view(name, buf, dtype, n + 1)

    def _plain(self, arr: pa.Array, what: str) -> list:
        if arr.offset != 0 or arr.null_count != 0:
            raise self._damaged(f"{what}: offset {arr.offset}, {arr.null_count} nulls (none expected)")
        return arr.buffers()

    def _map(self, batch: pa.RecordBatch) -> None:
        """The numpy views (by the array names of the format before) and their file offsets for take()."""
        h, n = self.header, self.header["num_samples"]
        if batch.num_rows != n:
            raise self._damaged(f"{batch.num_rows} rows for {n} samples")
        self.arrays: dict[str, np.ndarray] = {}
        self._at: dict[str, tuple[int, np.dtype, int]] = {}
        col = batch.column("path")
        wide = col.type in (pa.large_string(), pa.large_binary())
        bufs = self._plain(col, "column path")
        self._offsets("path_offsets", bufs[1], np.int64 if wide else np.int32, n)
        blob = self._ends("path_offsets", bufs[2], "path")
        self._view("path_blob", bufs[2], np.uint8, blob)
        for name, column in PER_SAMPLE.items():
            if column not in batch.schema.names:
                continue
            col = batch.column(column)
            if isinstance(col, pa.DictionaryArray):
                self._plain(col, f"column {column}")
                col = col.indices
            bufs = self._plain(col, f"column {column}")
            self._view(name, bufs[1], NUMPY[col.type], n)
        col = batch.column("labels")
        bufs = self._plain(col, "column labels")
        self._offsets("indptr", bufs[1], np.int64 if isinstance(col, pa.LargeListArray) else np.int32, n)
        item = col.values
        self._plain(item, "labels' items")
        nnz = self._ends("indptr", None, "labels", len(item))
        if nnz != h["nnz"]:
            raise self._damaged(f"{nnz} labels, nnz {h['nnz']} in the header")
        self._view("classes", self._plain(item.field(0), "labels' classes")[1], np.int32, nnz)
        conf = item.field(1)
        if isinstance(conf, pa.DictionaryArray):
            self._plain(conf, "labels' confidences")
            values = conf.dictionary  # at most 256 float32 (Arrow's to_numpy() would import pandas)
            vbuf = values.buffers()[1]
            if values.null_count or values.offset or (len(values) and (vbuf is None or vbuf.size < 4 * len(values))):
                raise self._damaged("the confidence table is not plain float32 values")
            table = np.frombuffer(vbuf, np.float32, len(values)) if len(values) else np.zeros(0, np.float32)
            if len(table) > 256 or (nnz and not len(table)) or not np.all((table > 0) & (table <= 1)):
                raise self._damaged("the confidence table is missing or holds values outside (0, 1]")
            h["conf_table"] = [float(v) for v in table]
            conf = conf.indices
            dt = np.uint8
        else:
            h["conf_table"] = None
            dt = np.float32
        self._view("confs", self._plain(conf, "labels' confidences")[1], dt, nnz)
        names = batch.column("verdict").dictionary
        try:
            names.validate(full=True)  # 14 strings: their offsets are read below
        except pa.ArrowInvalid as e:
            raise self._damaged(f"the verdict names: {str(e)[:120]}") from None
        verdicts = names.to_pylist()
        if verdicts != list(VERDICTS[:len(verdicts)]):
            raise self._damaged(f"verdict names {str(verdicts)[:120]}, not a prefix of {', '.join(VERDICTS)}")
        self._verdict_names = len(verdicts)

    def _ends(self, ptr: str, blob: Optional[pa.Buffer], what: str, values: Optional[int] = None) -> int:
        """The CSR end points (two values): offsets start at 0 and end inside (at the end of) their values.
        Returns the number of values."""
        a = self.arrays[ptr]
        first, last = int(a[0]), int(a[-1])
        top = values if values is not None else (blob.size if blob is not None else 0)
        if first != 0 or not 0 <= last <= top or (values is not None and last != values):
            raise self._damaged(f"{ptr} ({what}) runs from {first} to {last}, not 0 to "
                                f"{values if values is not None else f'at most {top}'}")
        return last

    def check_unchanged(self) -> None:
        """DataError when the file under the mapping was truncated or rewritten in place (one fstat).
        A new file renamed over the path is fine: this mapping keeps the old one."""
        f = self.__dict__.get("_file")
        if f is None or f.closed:
            return
        st = os.fstat(f.fileno())
        if st.st_size != self._size or st.st_mtime_ns != self._mtime:
            what = "truncated" if st.st_size < self._size else "rewritten"
            raise DataError(f"{self.path} was {what} in place while this job was reading it ({self._size} -> "
                            f"{st.st_size} bytes): the job stops before it reads damaged labels. A data index must "
                            "never be overwritten in place: build a new one (`hvpmtl data index` writes a new file "
                            "and renames it), then restart the job")

    def file_offset(self, name: str) -> int:
        """Where array `name`'s first value lies in the file."""
        return self._at[name][0]

    def take(self, name: str, pos) -> np.ndarray:
        """array `name` at positions `pos`, read with pread rather than through the mapping: a batch's
        rows read while the file is truncated or rewritten in place give a short read or a changed
        fstat (a DataError), never a SIGBUS. One pread per run of consecutive positions (a label row
        is one run); the fstat after the reads catches bytes that changed while they were read."""
        start, dt, length = self._at[name]
        pos = np.asarray(pos, np.int64).ravel()
        if not len(pos):
            return np.zeros(0, dt)
        if int(pos.min()) < 0 or int(pos.max()) >= length:
            raise self._damaged(f"a read of {name} at {int(pos.min())}..{int(pos.max())} runs past its {length} values")
        cut = np.flatnonzero(np.diff(pos) != 1) + 1
        firsts, lens = pos[np.r_[0, cut]], np.diff(np.r_[0, cut, len(pos)])
        fd, size = self._file.fileno(), dt.itemsize
        parts = []
        for a, n in zip(firsts.tolist(), lens.tolist()):
            b = os.pread(fd, n * size, start + a * size)
            if len(b) != n * size:
                self.check_unchanged()
                raise DataError(f"{self.path}: short read of {name} (the file changed under this job); {REBUILD}")
            parts.append(b)
        self.check_unchanged()
        return np.frombuffer(b"".join(parts), dt)

    def __getattr__(self, name):
        arrays = self.__dict__.get("arrays", {})
        if name in arrays:
            return arrays[name]
        raise AttributeError(name)

    @property
    def kind(self) -> str:
        return self.header["kind"]

    @property
    def source(self) -> str:
        return self.header["source"]

    @property
    def num_samples(self) -> int:
        return int(self.header["num_samples"])

    def __len__(self) -> int:
        return self.num_samples

    def conf_values(self, pos: np.ndarray) -> np.ndarray:
        """float32 confidences at label positions `pos`."""
        return self.decode_confs(self.confs[pos])

    def decode_confs(self, raw: np.ndarray) -> np.ndarray:
        """float32 confidences of stored values `raw` (codes into the table, or floats)."""
        table = self.header.get("conf_table")
        return np.asarray(table, np.float32)[raw] if table is not None else raw.astype(np.float32)

    def issue_rows(self) -> list:
        """The stored issues as written ([code, file number, line, detail, path] each), checked."""
        if self._issues is None:
            try:
                rows = json.loads(self._issues_text)
            except (ValueError, RecursionError):
                raise self._damaged("its issues are not JSON") from None
            files = self.header.get("issue_files", [])
            if not isinstance(rows, list):
                raise self._damaged("its issues are not a list")
            for j, r in enumerate(rows):
                if not (isinstance(r, list) and len(r) == 5 and r[0] in CODES and is_int(r[1], 0, len(files) - 1)
                        and is_int(r[2]) and isinstance(r[3], str) and isinstance(r[4], str)):
                    raise self._damaged(f"stored issue {j} is out of range")
            self._issues = rows
        return self._issues

    def issues(self, errors_only: bool = False, limit: Optional[int] = None) -> list[Issue]:
        """The stored parse/shard issues, in file order."""
        files = self.header.get("issue_files", [])
        out = []
        for code, fid, line, detail, path in self.issue_rows():
            if errors_only and CODES[code][0] != "error":
                continue
            out.append(make_issue(code, files[fid], line, _shown(detail), _shown(path)))
            if limit is not None and len(out) >= limit:
                break
        return out

    def summary(self) -> list[str]:
        """What `hvpmtl data index --show` prints (counts the class ids and verdicts: a pass over those arrays)."""
        h, a = self.header, self.arrays
        key = h.get("key") or {}
        if self.kind == "list":
            built = (f"{self.source} ({key.get('size', 0):,} bytes, mtime_ns {key.get('mtime_ns')}, sha256 "
                     f"{str(key.get('sha256'))[:16]}…)")
        else:
            built = (f"{self.source} (manifest.json sha256 {str((key.get('manifest') or {}).get('sha256'))[:16]}…, "
                     f"{len(h.get('shards', []))} tars; {h.get('absent', 0):,} samples in no tar)")
        used = np.zeros(max(0, h.get("max_class", -1)) + 1, bool)
        for s in range(0, len(a["classes"]), CHUNK_ROWS * 8):
            c = a["classes"][s:s + CHUNK_ROWS * 8]
            used[c[(c >= 0) & (c < len(used))]] = True
        verdicts = np.zeros(len(VERDICTS), np.int64)
        for s in range(0, len(self), CHUNK_ROWS * 8):
            verdicts += np.bincount(a["verdict"][s:s + CHUNK_ROWS * 8], minlength=len(VERDICTS))[:len(VERDICTS)]
        table = h.get("conf_table")
        confs = (f"{len(table)} distinct ({', '.join(f'{v:.6g}' for v in table[:8])}"
                 f"{', …' if len(table) > 8 else ''}), one byte each" if table is not None else "float32")
        meta = h.get("verdicts") or {}
        by = (f"by {meta.get('by')}" + (f", root {meta['root']}" if meta.get("root") else "") +
              f", full decode {'yes' if meta.get('full_decode') else 'no'}") if meta else "no validator run yet"
        issues = h.get("issue_counts") or {}
        size = self._size
        return [
            f"{self.path}",
            f"  format       {h['format']} (Arrow IPC: pandas.read_feather, pyarrow, duckdb; docs/DATA.md)",
            f"  kind         {self.kind}, built from {built}",
            f"  samples      {len(self):,} (of {h.get('num_lines', len(self)):,} lines)",
            f"  labels       {h['nnz']:,} ({h['nnz'] / max(1, len(self)):.2f} per sample, at most "
            f"{h.get('max_labels', 0)}); confidences: {confs}",
            f"  classes      {int(used.sum()):,} used, ids up to {h.get('max_class', -1)} (num_classes "
            f"{h.get('num_classes')})",
            "  verdicts     " + ", ".join(f"{VERDICTS[i]} {int(v):,}" for i, v in enumerate(verdicts) if v) +
            f" ({by})",
            f"  issues       {sum(issues.values()):,}" +
            (": " + ", ".join(f"{k} {v:,}" for k, v in sorted(issues.items())) if issues else ""),
            f"  size         {size:,} bytes ({size / 2**20:.1f} MiB); sha256 {self.checksum}" if size >= 2**20 else
            f"  size         {size:,} bytes; sha256 {self.checksum}",
        ]

    def verify(self, progress=None) -> list[str]:
        """Every problem a full read finds (offline: `hvpmtl data index --verify`, the validator): the
        whole-file checksum, then each array's invariants in chunks (offsets rising, classes, confidence
        codes and verdicts in range, per-sample sizes)."""
        problems = []
        with open(self.path, "rb") as f:
            spots = checksum_spots(f.fileno(), self._size, self.checksum.encode())
            if spots is None or checksum_digest(f, self._size, spots, progress) != self.checksum:
                problems.append("the sha256 checksum does not match the content")
        a, hd = self.arrays, self.header
        top = hd.get("max_class", -1)
        rows = hd.get("max_labels")
        for s in range(0, len(self) + 1, CHUNK_ROWS * 8):
            for ptr in ("indptr", "path_offsets"):
                d = np.diff(a[ptr][s:s + CHUNK_ROWS * 8 + 1].astype(np.int64))
                if len(d) and d.min() < 0:
                    problems.append(f"{ptr} falls at sample {s + int(np.argmax(d < 0))}")
                if ptr == "indptr" and rows is not None and len(d) and d.max() > rows:
                    problems.append(f"sample {s + int(np.argmax(d > rows))} has more than max_labels {rows} labels")
        table = hd.get("conf_table")
        for s in range(0, len(a["classes"]), CHUNK_ROWS * 8):
            c = a["classes"][s:s + CHUNK_ROWS * 8]
            if len(c) and (int(c.min()) < 0 or int(c.max()) > top):
                problems.append(f"class ids outside [0, {top}] at label {s + int(np.argmax((c < 0) | (c > top)))}")
            f = a["confs"][s:s + CHUNK_ROWS * 8]
            bad = (f >= len(table)) if a["confs"].dtype == np.uint8 else ~((f > 0) & (f <= 1))
            if bad.any():
                problems.append(f"confidences out of range at label {s + int(np.argmax(bad))}")
        if "shard" in a:
            n_sh = len(hd.get("shards", []))
            for s in range(0, len(self), CHUNK_ROWS * 8):
                x = a["shard"][s:s + CHUNK_ROWS * 8]
                if len(x) and (int(x.min()) < -1 or int(x.max()) >= n_sh):
                    problems.append(f"shard numbers outside [-1, {n_sh}) at sample {s}")
        try:
            self.issues()
        except DataError as e:
            problems.append(str(e))
        v = a["verdict"]
        for s in range(0, len(v), CHUNK_ROWS * 8):
            if len(v[s:s + CHUNK_ROWS * 8]) and int(v[s:s + CHUNK_ROWS * 8].max()) >= self._verdict_names:
                problems.append(f"verdict codes outside the table near sample {s}")
        return problems

    def close(self, f=None) -> None:
        self.arrays = {}
        self._batch = self._buf = None
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # views still alive: the mapping goes with them
                pass
        f = f or self.__dict__.get("_file")
        if f is not None:
            f.close()
