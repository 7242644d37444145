"""Frozen-backbone features for the linear probe and kNN: the mean-pooled last feature map.

`load_backbone` builds a `MaskableBackbone` from a run (its newest checkpoint), from an exported
timm file, or at random (the untrained baseline); `extract_features` runs it over a loader in
eval mode without gradients and returns features, labels and sample ids as numpy arrays.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch

from hvpmtl.models.backbone import MaskableBackbone


def load_backbone(*, run_dir: Optional[str | Path] = None, checkpoint: Optional[str | Path] = None,
                  which: str = "auto", backbone_file: Optional[str | Path] = None,
                  backbone_name: Optional[str] = None, img_size: Optional[int] = None,
                  random_init: bool = False, seed: int = 0) -> MaskableBackbone:
    """One of: a run directory (+ optional checkpoint tag dir, teacher/student), an exported backbone
    file (timm safetensors, or an mmdet/detectron2 export) or `random_init` with a name and size.

    With a run directory, the name and image size come from its config.yaml unless given."""
    from hvpmtl.eval import export

    info = None
    if run_dir is not None:
        state, cfg, info = export.read_run_backbone(run_dir, checkpoint=checkpoint, which=which)
        name = backbone_name or cfg.model.backbone
        size = img_size or cfg.model.img_size
    elif backbone_file is not None:
        state, meta = export.read_backbone_file(backbone_file)
        name = backbone_name or meta.get("timm_model")
        size = img_size or (int(meta["img_size"]) if meta.get("img_size") else None)
        if not name:
            raise ValueError(f"{backbone_file}: no timm model name in its metadata; pass --backbone-name")
        if not size:
            raise ValueError(f"{backbone_file}: no image size in its metadata; pass --img-size")
    else:
        state = None
        name, size = backbone_name, img_size
        if not random_init:
            raise ValueError("load_backbone: give run_dir, backbone_file, or random_init=True")
        if not name or not size:
            raise ValueError("a random-init backbone needs a timm name and an image size "
                             "(--backbone-name, --img-size, or --run-dir for both)")
    if random_init:
        state = None
    torch.manual_seed(seed)
    backbone = MaskableBackbone(name, img_size=size, drop_path_rate=0.0)
    if state is not None:
        result = backbone.model.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(f"backbone weights do not fit timm '{name}' at {size} px: missing "
                             f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    backbone.weights_info = info  # which weights of the run (teacher/student, tag, step, why), for the caller to say
    return backbone.eval()


def split_halves(index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks (probe-train, probe-test) by the parity of the sample's position in the list."""
    train = index % 2 == 0
    return train, ~train


def pooled(backbone: MaskableBackbone, images: torch.Tensor) -> torch.Tensor:
    """[B, D]: the mean over the last feature map's positions."""
    return backbone(images).mean(dim=(1, 2))


@torch.no_grad()
def extract_features(backbone: MaskableBackbone, batches: Iterable[dict], *, device, progress=None,
                     what: str = "features") -> dict[str, np.ndarray]:
    """{"features" [N, D] float32, "labels" [N, C] or [N], "index" [N]} in the loader's order.

    The backbone runs in eval mode in its own parameter dtype (bf16 for a bf16 student); its
    training mode is restored afterwards. `progress(msg)` hears about it every ~5 s."""
    import time

    t0 = last = time.perf_counter()
    total = len(batches) if hasattr(batches, "__len__") else None
    was_training = backbone.training
    backbone.eval()
    dtype = next(backbone.parameters()).dtype
    feats, labels, index = [], [], []
    try:
        for b in batches:
            x = b["image"].to(device, dtype, non_blocking=True)
            feats.append(pooled(backbone, x).float().cpu())
            y = b["labels"] if "labels" in b else b["label"]
            labels.append(y.cpu())
            if "index" in b:
                index.append(b["index"].view(-1).cpu().long())
            if progress is not None and time.perf_counter() - last > 5:
                last = time.perf_counter()
                of = f" of {total}" if total else ""
                progress(f"{what}: batch {len(feats)}{of}, {sum(len(f) for f in feats)} images, {last - t0:.0f} s")
    finally:
        backbone.train(was_training)
    if not feats:
        raise ValueError("extract_features: the loader yielded no batch (empty split?)")
    out = {"features": torch.cat(feats).numpy(), "labels": torch.cat(labels).numpy()}
    out["index"] = torch.cat(index).numpy() if index else np.arange(len(out["features"]))
    return out


# ----------------------------------------------------------------------------- offline splits


def _loader_device(device) -> tuple[str, int]:
    d = torch.device(device)
    return ("gpu" if d.type == "cuda" else "cpu"), (d.index or 0)


def split_features(backbone: MaskableBackbone, data_cfg, *, device, batch_size: int = 64,
                   train_list: Optional[str] = None, test_list: Optional[str] = None,
                   train_dir: Optional[str] = None, test_dir: Optional[str] = None, progress=None) -> dict:
    """Features of a probe-train and a probe-test split, one process.

    ImageFolder dirs (single-label), two Tencent list files (multi-label), or by default the held-out
    list `data_cfg.holdout_list` split in two by position parity, as the online evaluation does.
    Returns {"train": {...}, "test": {...}, "multilabel": bool, "num_classes": int}."""
    kind, local_rank = _loader_device(device)
    data_cfg = data_cfg.model_copy(update={"img_size": backbone.img_size,
                                           "device": kind if data_cfg.device == "auto" else data_cfg.device})
    if train_dir or test_dir:
        if not (train_dir and test_dir):
            raise ValueError("give both --train-dir and --test-dir (ImageFolder roots)")
        from hvpmtl.data.loaders.imagefolder import build_imagefolder_loader

        loaders = [build_imagefolder_loader(d, batch_size, backbone.img_size, train=False, device=data_cfg.device,
                                            num_threads=data_cfg.num_threads, local_rank=local_rank)
                   for d in (train_dir, test_dir)]
        if loaders[0].classes != loaders[1].classes:
            raise ValueError(f"{train_dir} and {test_dir} have different class folders")
        tr, te = (extract_features(backbone, ld, device=device, progress=progress, what=w)
                  for ld, w in zip(loaders, ("probe-train features", "probe-test features")))
        return {"train": tr, "test": te, "multilabel": False, "num_classes": len(loaders[0].classes)}
    from hvpmtl.data.loaders.pretrain import build_eval_loader

    kw = dict(batch_size=batch_size, rank=0, world_size=1, local_rank=local_rank)
    if train_list or test_list:
        if not (train_list and test_list):
            raise ValueError("give both --train-list and --test-list (Tencent-format list files)")
        tr = extract_features(backbone, build_eval_loader(data_cfg, list_file=train_list, **kw), device=device,
                              progress=progress, what="probe-train features")
        te = extract_features(backbone, build_eval_loader(data_cfg, list_file=test_list, **kw), device=device,
                              progress=progress, what="probe-test features")
    else:
        allf = extract_features(backbone, build_eval_loader(data_cfg, **kw), device=device, progress=progress)
        order = np.argsort(allf["index"], kind="stable")
        allf = {k: v[order] for k, v in allf.items()}
        m_tr, m_te = split_halves(allf["index"])
        tr = {k: v[m_tr] for k, v in allf.items()}
        te = {k: v[m_te] for k, v in allf.items()}
    return {"train": tr, "test": te, "multilabel": True, "num_classes": data_cfg.num_classes}
