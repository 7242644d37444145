"""Our shard index (hvpmtl/data/formats/shards.py) is DALI's: byte-identical to what DALI's own wds2idx writes
for the same tar (50 samples in folders, of several member kinds and sizes, some samples with a member more)."""
import io
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

from hvpmtl.data.formats.shards import read_index, write_index

WDS2IDX = Path(sys.executable).parent / "wds2idx"  # installed with nvidia-dali


def _tar(path: Path, n: int = 50) -> None:
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for i in range(n):
            key = f"{i // 10:03d}/s{i:05d}"
            exts = ["jpg", "cls"] + (["json"] if i % 7 == 3 else [])
            for ext in exts:
                data = rng.bytes(int(rng.integers(1, 3000)) if ext == "jpg" else int(rng.integers(1, 40)))
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_our_index_equals_dalis_wds2idx(tmp_path):
    tar = tmp_path / "shard-000000.tar"
    _tar(tar)
    ours, dalis = tmp_path / "ours.idx", tmp_path / "dali.idx"
    assert write_index(tar, ours) == 50
    cp = subprocess.run([str(WDS2IDX), str(tar), str(dalis)], capture_output=True, text=True, timeout=120)
    assert cp.returncode == 0, cp.stderr
    assert ours.read_bytes() == dalis.read_bytes()
    samples = read_index(ours)
    assert len(samples) == 50 and sum(len(s) == 3 for s in samples) == sum(i % 7 == 3 for i in range(50))
