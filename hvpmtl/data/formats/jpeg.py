"""Cheap JPEG checks: the format from the first bytes, the marker walk up to the scan (which also
gives the image size from the frame header), and the end-of-image marker at the tail. A few small
reads per file, so millions of files scan in minutes; `full_decode` adds a PIL decode for what only
decoding finds (damaged entropy-coded data).

`max_pixels` bounds width x height before anything decodes: a few-KB file whose header claims
30000x30000 makes a decoder allocate ~8.5 GiB (a decompression bomb).
"""
from __future__ import annotations

import io
import os
from typing import Callable, NamedTuple, Optional

from PIL import Image

TAIL = 4096  # bytes searched for the end-of-image marker (some files carry trailing padding)
HEAD = 8192  # the markers up to the scan usually sit in the first 8 KB
# 8192 x 8192: 192 MiB as decoded RGB. Larger than any photo in Tencent ML-Images / ImageNet / Open Images
# (Open Images originals top out around 40 MP), far below what makes a decoder thrash (the 30000^2 bomb).
DEFAULT_MAX_PIXELS = 8192 * 8192
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_STANDALONE = {0x01, *range(0xD0, 0xD8)}
WARNINGS = ("grayscale", "cmyk")  # usable: decoded to RGB


class Check(NamedTuple):
    """code: None (fine) or an issue code (a warning from WARNINGS, else an error); width and height
    from the frame header (0 when the walk did not reach one)."""
    code: Optional[str]
    detail: str = ""
    width: int = 0
    height: int = 0

    @property
    def usable(self) -> bool:
        return self.code is None or self.code in WARNINGS


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


def check_jpeg(read_at: Callable[[int, int], bytes], size: int, max_pixels: int = 0) -> Check:
    """Checks an image given `read_at(offset, n)` over its bytes. A grayscale or CMYK JPEG returns its
    warning code (the caller decides what warnings mean); max_pixels > 0 bounds width x height."""
    if size == 0:
        return Check("zero-byte", "0 bytes")
    head = read_at(0, 16)
    kind = sniff(head)
    if kind != "jpeg":
        return Check("not-jpeg", f"{kind.upper()} content" if kind != "unknown" else
                     f"unknown content starting with {head[:8].hex()}")
    pos, components, adobe_transform, width, height = 2, 0, None, 0, 0
    while True:
        seg = read_at(pos, 4)
        if len(seg) < 2:
            return Check("truncated", f"file ends inside the header at byte {pos}")
        if seg[0] != 0xFF:
            return Check("corrupt-jpeg", f"no marker at byte {pos} (found 0x{seg[0]:02x})")
        m = seg[1]
        if m == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if m in _STANDALONE:
            pos += 2
            continue
        if m == 0xD9:
            return Check("corrupt-jpeg", "end-of-image marker before any scan")
        if len(seg) < 4:
            return Check("truncated", f"file ends inside the header at byte {pos}")
        length = int.from_bytes(seg[2:4], "big")
        if length < 2:
            return Check("corrupt-jpeg", f"segment 0xFF{m:02X} at byte {pos} has length {length}")
        if pos + 2 + length > size:
            return Check("truncated", f"segment 0xFF{m:02X} at byte {pos} runs past the end of the file")
        if m in _SOF:
            body = read_at(pos + 4, 6)
            if len(body) < 6:
                return Check("truncated", "file ends inside the frame header")
            precision, components = body[0], body[5]
            height, width = int.from_bytes(body[1:3], "big"), int.from_bytes(body[3:5], "big")
            if precision != 8:
                return Check("corrupt-jpeg", f"{precision}-bit samples; only 8-bit JPEGs are decoded")
            if components not in (1, 3, 4):
                return Check("corrupt-jpeg", f"{components} colour components")
            if width == 0 or height == 0:
                return Check("corrupt-jpeg", f"frame header says {width}x{height} (a later DNL height is not "
                             "supported)")
            if max_pixels and width * height > max_pixels:
                return Check("oversized", too_big(width, height, max_pixels), width, height)
        elif m == 0xEE:  # Adobe APP14: tells CMYK (transform 0) from YCCK (2)
            body = read_at(pos + 4, length - 2)
            if body[:5] == b"Adobe" and len(body) >= 12:
                adobe_transform = body[11]
        elif m == 0xDA:
            if not components:
                return Check("corrupt-jpeg", "scan before any frame header")
            break
        pos += 2 + length
    tail = read_at(max(0, size - TAIL), TAIL)
    if b"\xff\xd9" not in tail:
        return Check("truncated", f"no end-of-image marker in the last {min(size, TAIL)} bytes", width, height)
    if components == 1:
        return Check("grayscale", "1 colour component", width, height)
    if components == 4:
        return Check("cmyk", "4 colour components (YCCK)" if adobe_transform == 2 else "4 colour components (CMYK)",
                     width, height)
    return Check(None, "", width, height)


def too_big(width: int, height: int, max_pixels: int) -> str:
    return f"{width}x{height} = {width * height:,} pixels > max_pixels {max_pixels:,}"


def check_bytes(data, full_decode: bool = False, max_pixels: int = 0) -> Check:
    """Checks an image already in memory (bytes or a uint8 array)."""
    mv = memoryview(data).cast("B")
    c = check_jpeg(lambda o, n: bytes(mv[o:o + n]), len(mv), max_pixels)
    if full_decode and c.usable:
        bad = decode_error(bytes(mv))
        if bad:
            return Check("corrupt-jpeg", bad, c.width, c.height)
    return c


def check_file(path, full_decode: bool = False, max_pixels: int = 0) -> Check:
    """Checks one image file (str or bytes path); missing and unreadable files get their own codes."""
    shown = os.fsdecode(path) if isinstance(path, bytes) else path
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return Check("missing-file", f"{shown} not found")
    except OSError as e:
        return Check("unreadable", f"{shown}: {e.strerror}")
    try:
        size = os.fstat(fd).st_size
        if full_decode:
            return check_bytes(os.pread(fd, size, 0), True, max_pixels)
        head = os.pread(fd, HEAD, 0)

        def read_at(o: int, n: int) -> bytes:
            return head[o:o + n] if o + n <= len(head) else os.pread(fd, n, o)
        return check_jpeg(read_at, size, max_pixels)
    except OSError as e:
        return Check("unreadable", f"{shown}: {e.strerror}")
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
