"""Input pipeline throughput: two augmented views + SimMIM mask + label vector per image.

Compares the DALI loader on the GPU (when CUDA is there), the same DALI graph on the CPU, and a
torchvision DataLoader doing the same augmentations (RRC, colour jitter, rotation, RandAugment,
flip, normalise) on the same files. Prints images/s (an image = both its views).

    python benchmarks/data_pipeline.py                       # synthetic data in a temp folder
    python benchmarks/data_pipeline.py --list L --root R --num-classes 11166
    python benchmarks/data_pipeline.py --rand-augment 0 --batch-size 128 --threads 8
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hvpmtl.config import DataConfig  # noqa: E402
from hvpmtl.data.formats.list_file import read_list_file  # noqa: E402
from hvpmtl.data.loaders.labels import LabelTable  # noqa: E402
from hvpmtl.data.loaders.masks import SimMIMMaskGenerator  # noqa: E402
from hvpmtl.data.loaders.pretrain import build_pretrain_loader  # noqa: E402


def make_data(out: Path, n: int, upscale: float) -> tuple[str, str]:
    """Synthetic scenes, rewritten `upscale` times larger (ImageNet-like sizes at 2x: ~320-512 px)."""
    from PIL import Image

    from hvpmtl.data.tools.synthetic import make_synthetic
    paths = make_synthetic(out, n, seed=0)
    if upscale != 1:
        for p in Path(out, "train").rglob("*.jpg"):
            im = Image.open(p)
            im.resize((round(im.width * upscale), round(im.height * upscale)), Image.BICUBIC).save(p, quality=90)
    return paths["list_file"], paths["root"]


class TorchvisionTwoViews(torch.utils.data.Dataset):
    """The same augmentations with PIL + torchvision, one sample = (view1, view2, index)."""

    def __init__(self, cfg: DataConfig, labels, root: str):
        from torchvision import transforms as T
        self.labels, self.root = labels, Path(root)
        cj = cfg.color_jitter
        ops = [T.RandomResizedCrop(cfg.img_size, scale=tuple(cfg.crop_scale)),
               T.ColorJitter(cj, cj, cj, cj / 4), T.RandomRotation(cfg.rotation_deg)]
        if cfg.rand_augment_n:
            ops.append(T.RandAugment(cfg.rand_augment_n, cfg.rand_augment_m))
        ops += [T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]
        self.t = T.Compose(ops)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image
        with Image.open(self.root / self.labels.path(i)) as im:
            im = im.convert("RGB")
            return self.t(im), self.t(im), i


def bench_torchvision(cfg, labels, root, batch_size, workers, batches, warmup, patch, device) -> float:
    ds = TorchvisionTwoViews(cfg, labels, root)
    table = LabelTable(labels, cfg.num_classes, cfg.label_threshold)
    masks = SimMIMMaskGenerator(cfg.img_size, cfg.mask_patch_size, patch, cfg.mask_ratio)
    dl = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
                                     pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    n, t0 = 0, None
    while True:
        for k, (v1, v2, idx) in enumerate(dl):
            v1, v2 = v1.to(device, non_blocking=True), v2.to(device, non_blocking=True)
            y = table.dense(idx, device)
            m = masks(idx.numpy(), 0, 0).to(device)
            n += 1
            if n == warmup:
                _sync(device)
                t0 = time.perf_counter()
            if n == warmup + batches:
                _sync(device)
                del v1, v2, y, m
                return batches * batch_size / (time.perf_counter() - t0)


def bench_dali(cfg, batch_size, batches, warmup, patch, dtype) -> tuple[float, str]:
    loader = build_pretrain_loader(cfg, batch_size=batch_size, patch_size=patch, rank=0, world_size=1, local_rank=0,
                                   seed=0, dtype=dtype)
    n, t0, epoch, info = 0, None, 0, ""
    while True:
        loader.set_epoch(epoch)
        for b in loader:
            n += 1
            if n == 1:
                info = (f"view {tuple(b['view1'].shape)} {b['view1'].dtype} on {b['view1'].device}, "
                        f"mask {tuple(b['mask'].shape)}, labels {tuple(b['labels'].shape)} on {b['labels'].device}")
            if n == warmup:
                _sync(loader.device)
                t0 = time.perf_counter()
            if n == warmup + batches:
                _sync(loader.device)
                return batches * batch_size / (time.perf_counter() - t0), info
        epoch += 1


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--list", help="Tencent-format list file (default: synthetic data in a temp folder)")
    ap.add_argument("--root", help="image root of --list")
    ap.add_argument("--num-classes", type=int, default=24)
    ap.add_argument("--num-images", type=int, default=1024, help="synthetic images to write")
    ap.add_argument("--upscale", type=float, default=2.0, help="enlarge the synthetic images (decode cost)")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--patch-size", type=int, default=4, help="model patch (4: Swin, 16: ViT)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1),
                    help="DALI CPU threads and torchvision workers")
    ap.add_argument("--rand-augment", type=int, default=2, help="RandAugment ops per image (0: off)")
    ap.add_argument("--batches", type=int, default=20, help="timed batches")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--half", action="store_true", help="GPU views in bfloat16")
    ap.add_argument("--only", default="dali-gpu,dali-cpu,torchvision", help="comma-separated backends")
    args = ap.parse_args(argv)

    tmp = None
    if args.list:
        lst, root = args.list, args.root or str(Path(args.list).parent)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="hvpmtl-bench-")
        t = time.perf_counter()
        lst, root = make_data(Path(tmp.name), args.num_images, args.upscale)
        print(f"wrote {args.num_images} synthetic images (x{args.upscale}) in {time.perf_counter() - t:.1f} s")
    labels, _ = read_list_file(lst, args.num_classes)
    need = (args.warmup + args.batches) * args.batch_size
    if len(labels) < args.batch_size:
        raise SystemExit(f"{len(labels)} images make no batch of {args.batch_size}")
    cfg = DataConfig(format="tencent", root=root, list_file=lst, num_classes=args.num_classes, img_size=args.img_size,
                     num_threads=args.threads, rand_augment_n=args.rand_augment,
                     mask_patch_size=32 if args.img_size % 32 == 0 else args.img_size)
    cuda = torch.cuda.is_available()
    rows = []
    wanted = args.only.split(",")
    print(f"{len(labels)} images, {need} per backend ({math.ceil(need / len(labels))} epochs); "
          f"batch {args.batch_size}, threads {args.threads}, RandAugment n={args.rand_augment}")
    for name in wanted:
        if name == "dali-gpu" and not cuda:
            rows.append((name, "skipped: no CUDA", ""))
            continue
        t = time.perf_counter()
        if name in ("dali-gpu", "dali-cpu"):
            cfg.device = "gpu" if name == "dali-gpu" else "cpu"
            dtype = torch.bfloat16 if args.half and name == "dali-gpu" else torch.float32
            ips, info = bench_dali(cfg, args.batch_size, args.batches, args.warmup, args.patch_size, dtype)
        elif name == "torchvision":
            ips = bench_torchvision(cfg, labels, root, args.batch_size, args.threads, args.batches, args.warmup,
                                    args.patch_size, torch.device("cuda" if cuda else "cpu"))
            info = "PIL decode + torchvision transforms in DataLoader workers"
        else:
            raise SystemExit(f"unknown backend '{name}'")
        rows.append((name, f"{ips:8.1f}", f"{info} ({time.perf_counter() - t:.0f} s incl. setup)"))
    dev = torch.cuda.get_device_name(0) if cuda else "CPU only"
    print(f"\n| backend | img/s (2 views + mask + labels) | notes |   [{dev}, {os.cpu_count()} CPUs]")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    from provenance import provenance_line  # what the numbers below were measured with
    print(provenance_line(), flush=True)
    sys.exit(main())
