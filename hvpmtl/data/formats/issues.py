"""Problems found in a data set, each naming its file and line (or shard and key).

Errors make a sample unusable (the loader refuses the data set, or skips the sample with
`data.skip_corrupt` / `data.skip_list`); warnings are reported and the sample is used.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

from hvpmtl.notices import shown, shown_message

ERROR = "error"
WARNING = "warning"

# code -> (severity, one-line advice). The codes are stable: tests and skip lists use them.
CODES = {
    "missing-file": (ERROR, "the image file does not exist under the image root"),
    "unreadable": (ERROR, "the image file cannot be read (permissions or I/O error)"),
    "zero-byte": (ERROR, "the image file is empty"),
    "truncated": (ERROR, "the JPEG stream ends before its end-of-image marker"),
    "corrupt-jpeg": (ERROR, "the JPEG markers are broken or it does not decode"),
    "not-jpeg": (ERROR, "not JPEG content; the pipeline decodes JPEG only: convert it or skip it"),
    "oversized": (ERROR, "more pixels than data.max_pixels (a decompression bomb, or a huge original): "
                         "downscale it or skip it"),
    "grayscale": (WARNING, "1-channel JPEG; decoded to RGB by repeating the channel"),
    "cmyk": (WARNING, "CMYK/YCCK JPEG; decoded to RGB by the decoder's colour conversion"),
    "empty-line": (WARNING, "empty line, ignored"),
    "empty-list": (ERROR, "the list file holds no samples"),
    "bad-path": (ERROR, "the image path must be relative to the image root and stay inside it"),
    "non-utf8-path": (WARNING, "the path is not valid UTF-8; the file is opened by its raw bytes"),
    "no-labels": (WARNING, "image without labels: a negative for every class"),
    "malformed": (ERROR, "expected 'path idx:conf idx:conf ...'"),
    "bad-index": (ERROR, "class index outside [0, num_classes)"),
    "bad-conf": (ERROR, "confidence outside (0, 1]"),
    "duplicate-label": (WARNING, "class listed twice on one line; the larger confidence is kept"),
    "duplicate-path": (ERROR, "the same image listed twice; the later line is skipped"),
    "empty-shard": (ERROR, "the shard holds no samples"),
    "bad-shard": (ERROR, "the shard or its members cannot be read"),
    "missing-index": (WARNING, "no DALI index next to the shard; `hvpmtl data index-shards` writes it"),
    "bad-dictionary": (ERROR, "dictionary row is not 'index<TAB>id<TAB>parent<TAB>name'"),
    "class-count": (ERROR, "num_classes does not match the dictionary"),
}


@dataclass(frozen=True)
class Issue:
    code: str
    file: str  # list file, dictionary or shard
    line: int  # 1-based line in the list file; 0 = whole file; for shards the sample's position
    message: str
    path: str = ""  # the image path as written in the list file, or the shard member key

    @property
    def severity(self) -> str:
        return CODES[self.code][0]

    @property
    def is_error(self) -> bool:
        return self.severity == ERROR

    def format(self) -> str:
        where = f"{shown(self.file)}:{self.line}" if self.line else shown(self.file)
        what = f" ({shown(self.path)})" if self.path else ""
        return f"{where}: {self.severity} [{self.code}]{what}: {shown_message(self.message)}"


class DataError(RuntimeError):
    """A data set that cannot be used as it is; the message says where and how to fix it."""


def make_issue(code: str, file: str, line: int, detail: str = "", path: str = "") -> Issue:
    advice = CODES[code][1]
    return Issue(code, file, line, f"{detail}; {advice}" if detail else advice, path)


SHOW = 8  # errors listed in a refusal


@dataclass
class Report:
    """What a validation found: issues (sorted by file and line) and how many samples were checked."""
    issues: list = field(default_factory=list)
    num_samples: int = 0

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.is_error]

    @property
    def warnings(self) -> list[Issue]:
        return [i for i in self.issues if not i.is_error]

    def counts(self) -> Counter:
        return Counter(i.code for i in self.issues)


def format_report(rep: Report, max_per_code: int = 20) -> str:
    lines, shown = [], Counter()
    for i in rep.issues:
        shown[i.code] += 1
        if shown[i.code] <= max_per_code:
            lines.append(i.format())
    for code, n in sorted(rep.counts().items()):
        if n > max_per_code:
            lines.append(f"... {n - max_per_code} more [{code}]")
    summary = ", ".join(f"{k}: {v}" for k, v in sorted(rep.counts().items())) or "no issues"
    lines.append(f"{rep.num_samples} samples checked; {len(rep.errors)} errors, {len(rep.warnings)} warnings ({summary})")
    return "\n".join(lines)


def refusal(what: str, errors: list[Issue], validate_cmd: str, total: Optional[int] = None) -> DataError:
    """The DataError for a data set with samples that cannot be used and no permission to leave them out."""
    total = len(errors) if total is None else total
    shown = "\n".join("  " + e.format() for e in errors[:SHOW])
    more = f"\n  ... and {total - min(SHOW, len(errors))} more" if total > SHOW else ""
    return DataError(
        f"{what}: {total} sample(s) cannot be used:\n{shown}{more}\n"
        f"Fix the files, or run `{validate_cmd} --write-skip-list skip.txt` and train with "
        "`--set data.skip_list=skip.txt`, or set `data.skip_corrupt: true` to leave bad samples out "
        "(they are counted and reported).")
