"""Cheap JPEG checks: the format from the first bytes, the marker walk up to the scan, and the
end-of-image marker at the tail. A few small reads per file, so millions of files scan in minutes;
`full_decode` adds a PIL decode for what only decoding finds (damaged entropy-coded data).
"""
from __future__ import annotations

import io
import os
from typing import Callable, Optional

from PIL import Image

TAIL = 4096  # bytes searched for the end-of-image marker (some files carry trailing padding)
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_STANDALONE = {0x01, *range(0xD0, 0xD8)}


def sniff(head: bytes) -> str:
    """The container format from its magic bytes."""
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:2] == b"BM":
        return "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    return "unknown"


def check_jpeg(read_at: Callable[[int, int], bytes], size: int) -> tuple[Optional[str], str]:
    """(issue code or None, detail). `read_at(offset, n)` reads from the image's bytes.

    A grayscale or CMYK JPEG returns its warning code: the caller decides what warnings mean.
    """
    if size == 0:
        return "zero-byte", "0 bytes"
    head = read_at(0, 16)
    kind = sniff(head)
    if kind != "jpeg":
        return "not-jpeg", f"{kind.upper()} content" if kind != "unknown" else \
            f"unknown content starting with {head[:8].hex()}"
    pos, components, adobe_transform = 2, 0, None
    while True:
        seg = read_at(pos, 4)
        if len(seg) < 2:
            return "truncated", f"file ends inside the header at byte {pos}"
        if seg[0] != 0xFF:
            return "corrupt-jpeg", f"no marker at byte {pos} (found 0x{seg[0]:02x})"
        m = seg[1]
        if m == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if m in _STANDALONE:
            pos += 2
            continue
        if m == 0xD9:
            return "corrupt-jpeg", "end-of-image marker before any scan"
        if len(seg) < 4:
            return "truncated", f"file ends inside the header at byte {pos}"
        length = int.from_bytes(seg[2:4], "big")
        if length < 2:
            return "corrupt-jpeg", f"segment 0xFF{m:02X} at byte {pos} has length {length}"
        if pos + 2 + length > size:
            return "truncated", f"segment 0xFF{m:02X} at byte {pos} runs past the end of the file"
        if m in _SOF:
            body = read_at(pos + 4, 6)
            if len(body) < 6:
                return "truncated", "file ends inside the frame header"
            precision, components = body[0], body[5]
            if precision != 8:
                return "corrupt-jpeg", f"{precision}-bit samples; only 8-bit JPEGs are decoded"
            if components not in (1, 3, 4):
                return "corrupt-jpeg", f"{components} colour components"
        elif m == 0xEE:  # Adobe APP14: tells CMYK (transform 0) from YCCK (2)
            body = read_at(pos + 4, length - 2)
            if body[:5] == b"Adobe" and len(body) >= 12:
                adobe_transform = body[11]
        elif m == 0xDA:
            if not components:
                return "corrupt-jpeg", "scan before any frame header"
            break
        pos += 2 + length
    tail = read_at(max(0, size - TAIL), TAIL)
    if b"\xff\xd9" not in tail:
        return "truncated", f"no end-of-image marker in the last {min(size, TAIL)} bytes"
    if components == 1:
        return "grayscale", "1 colour component"
    if components == 4:
        return "cmyk", "4 colour components (YCCK)" if adobe_transform == 2 else "4 colour components (CMYK)"
    return None, ""


def check_bytes(data: bytes, full_decode: bool = False) -> tuple[Optional[str], str]:
    code, detail = check_jpeg(lambda o, n: data[o:o + n], len(data))
    if full_decode and (code is None or code in ("grayscale", "cmyk")):
        bad = decode_error(data)
        if bad:
            return "corrupt-jpeg", bad
    return code, detail


def check_file(path: str, full_decode: bool = False) -> tuple[Optional[str], str]:
    """Checks one image file; missing and unreadable files get their own codes."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return "missing-file", f"{path} not found"
    except OSError as e:
        return "unreadable", f"{path}: {e.strerror}"
    try:
        size = os.fstat(fd).st_size
        if full_decode:
            data = os.pread(fd, size, 0)
            return check_bytes(data, True)
        head = os.pread(fd, 8192, 0)  # the markers up to the scan usually sit in the first 8 KB

        def read_at(o: int, n: int) -> bytes:
            return head[o:o + n] if o + n <= len(head) else os.pread(fd, n, o)
        return check_jpeg(read_at, size)
    except OSError as e:
        return "unreadable", f"{path}: {e.strerror}"
    finally:
        os.close(fd)


def decode_error(data: bytes) -> str:
    """'' when PIL decodes the whole image, else why not."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for broken streams
        return f"does not decode: {e}"
    return ""
