"""Independent readings of list files for the data tests (not through hvpmtl's parser)."""
from pathlib import Path

import numpy as np


def list_labels(path, num_classes=24):
    """path in the list -> dense label vector (float64), parsed line by line."""
    out = {}
    for line in Path(path).read_text().splitlines():
        parts = line.split()
        v = np.zeros(num_classes)
        for tok in parts[1:]:
            k, c = tok.split(":")
            v[int(k)] = float(c)
        out[parts[0]] = v
    return out
