"""Small real images for the data tests."""
import io

import numpy as np
from PIL import Image


def jpeg_bytes(rng, width: int = 80, height: int = 64, mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    """A small real image (blocky noise), encoded."""
    a = np.kron(rng.integers(0, 255, (max(1, height // 16), max(1, width // 16), 3), dtype=np.uint8),
                np.ones((16, 16, 1), np.uint8))[:height, :width]
    im = Image.fromarray(np.ascontiguousarray(a))
    im = im.convert(mode) if mode != "RGB" else im
    buf = io.BytesIO()
    im.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def claim_size(data: bytes, width: int, height: int) -> bytes:
    """The same JPEG with a frame header that claims another size (a decompression bomb's trick)."""
    i = data.index(b"\xff\xc0")
    return data[:i + 5] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + data[i + 9:]
