"""FLOPs per image of the whole HVP-MTL training step, for every pre-training config in configs/ and the options
that change it (view 1 masked or unmasked for SwAV, ML-Decoder groups or one Query2Label query per class, the
number of classes), counted on the CPU with torch.utils.flop_counter.FlopCounterMode.

The step counted is the one the engine runs (hvpmtl.models.meta_arch): the EMA teacher's forward on view 1,
the student's forward (backbone on the masked view 1, on view 2, on the whole view 1 when
`objectives.swav.view1: unmasked`; label decoder, prototype head, SimMIM decoder, losses) and its backward.
FlopCounterMode counts matmuls, convolutions and attention (forward and backward), not elementwise work or the
optimizer, as MFU conventions do; the DeepSpeed engine around the student adds no counted work
(tests/benchmarks/test_flops.py checks both against a real ZeRO-2 step). FLOPs do not depend on the dtype, so
the count runs in fp32, on fake tensors (shapes only, no arithmetic: seconds per config; `--compute` runs the
arithmetic, with the same counts). Also measured: the bytes of the activations
the student's forward keeps for its backward (fp32, parameters left out), per image, and the trainable
parameters.

    python benchmarks/flops.py                       # every pre-training config + the paper configs' options
    python benchmarks/flops.py --configs configs/pretrain_vit_b.yaml --no-options --batch 2
Prints a markdown table (docs/BENCHMARKS.md) and, with --json FILE, writes the rows.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _bootstrap import ROOT, import_package  # noqa: E402

import_package()

from hvpmtl.train.perf import flop_counter  # noqa: E402  (the runtime's own counter)


def vit_forward_flops(depth: int, dim: int, img_size: int, patch: int, mlp_ratio: float = 4.0,
                      cls_tokens: int = 1) -> int:
    """Analytic forward FLOPs of a ViT's features for one image (2 per multiply-add): patch embedding, then per
    block qkv (3D^2), attention scores and weighted sum (2 N^2 D), projection (D^2), MLP (2 r D^2) on N tokens."""
    grid = (img_size // patch) ** 2
    n = grid + cls_tokens
    embed = 2 * grid * (3 * patch * patch) * dim
    block = 2 * n * dim * dim * (3 + 1 + 2 * mlp_ratio) + 2 * 2 * n * n * dim
    return int(embed + depth * block)


class SavedBytes:
    """Bytes of the distinct tensors autograd keeps for backward, parameters (and views of them) left out: a
    parameter is a leaf that requires grad (inputs do not), which holds for the fake twins FakeTensorMode makes
    of parameters too. Storages are told apart by their StorageImpl (`_cdata`), which fake tensors have too."""

    def __init__(self, params):
        self.skip = {p.untyped_storage()._cdata for p in params}
        self.seen: dict[int, int] = {}

    def pack(self, t):
        key = t.untyped_storage()._cdata
        base = t._base if t._base is not None else t
        if key in self.skip or (base.is_leaf and base.requires_grad):
            self.skip.add(key)
            self.seen.pop(key, None)
        else:
            self.seen[key] = t.untyped_storage().nbytes()
        return t

    @property
    def total(self) -> int:
        return sum(self.seen.values())


@contextlib.contextmanager
def _torch_losses(on: bool):
    """Fake tensors cannot enter Triton's interpreter (TRITON_INTERPRET=1): the losses' torch paths then, which
    FlopCounterMode counts the same (elementwise work and reductions: nothing)."""
    old = os.environ.get("TRITON_INTERPRET")
    if on:
        os.environ["TRITON_INTERPRET"] = "0"
    try:
        yield
    finally:
        if on:
            if old is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = old


def make_batch(cfg, batch: int, patch: int, seed: int = 0) -> dict:
    from hvpmtl.data.loaders.masks import SimMIMMaskGenerator
    g = torch.Generator().manual_seed(seed)
    s = cfg.model.img_size
    mask = SimMIMMaskGenerator(s, cfg.data.mask_patch_size, patch, cfg.data.mask_ratio)(
        torch.arange(batch), cfg.data.seed, 0)
    return {"view1": torch.randn(batch, 3, s, s, generator=g), "view2": torch.randn(batch, 3, s, s, generator=g),
            "mask": mask, "labels": (torch.rand(batch, cfg.data.num_classes, generator=g) < 0.01).float()}


def _by_part(counts: dict, root: str) -> dict[str, int]:
    """FLOPs of each direct child of `root` (e.g. Student.backbone) from FlopCounterMode's module rows."""
    out = {}
    for name, ops in counts.items():
        parts = name.split(".")
        if len(parts) == 2 and parts[0] == root:
            out[parts[1]] = sum(ops.values())
    return out


def count_step(cfg, batch: int = 1, seed: int = 0, fake: bool = True) -> dict:
    """FLOPs per image of one training step of `cfg` (an ExperimentConfig), split into teacher forward, student
    forward (by part) and student backward; plus activations kept for backward (fp32 bytes per image).

    fake: the step runs on fake tensors (torch's FakeTensorMode: shapes and dtypes, no arithmetic), so the paper
    configs count in seconds instead of minutes; the modules are real (timm builds them with real values) and
    the tests check that the counts equal those of the computed step."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from hvpmtl.models.meta_arch import Student, Teacher
    torch.manual_seed(seed)
    student = Student(cfg).train()
    teacher = Teacher(student) if student.weights["distill"] > 0 else None
    b = make_batch(cfg, batch, student.backbone.patch_size, seed)
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    with mode, _torch_losses(fake):
        params = list(student.parameters())
        if fake:  # the fake twins the mode makes of the parameters (memoised: one per parameter)
            b = {k: mode.from_tensor(v) for k, v in b.items()}
            params = [mode.from_tensor(p) for p in params]
        # the steady state of a long run: prototypes no longer frozen; the queue's few rows are left out (<0.1%)
        teacher_sim = None
        with flop_counter() as ct:
            if teacher is not None:
                teacher_sim = teacher(b["view1"]).float()
        saved = SavedBytes(params)
        with flop_counter() as cf, torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            out = student(b["view1"], b["view2"], b["mask"], b["labels"], teacher_sim=teacher_sim, queue=None,
                          freeze_prototypes=False, world_size=1)
        with flop_counter() as cb:
            out["loss"].backward()
    fwd, bwd, tfwd = cf.get_total_flops(), cb.get_total_flops(), ct.get_total_flops()
    parts = _by_part(cf.get_flop_counts(), "Student")
    parts["losses"] = fwd - sum(parts.values())  # what runs in the student's own forward (Sinkhorn, similarity)
    m, ob = cfg.model, cfg.objectives
    return {
        "backbone": m.backbone, "img_size": m.img_size, "classes": cfg.data.num_classes,
        "decoder": f"{m.decoder_layers} layers, " + (f"{m.decoder_groups} groups" if m.decoder_groups else "per class"),
        "decoder_groups": m.decoder_groups, "view1": ob.swav.view1 if ob.swav.enabled and ob.mim.enabled else "-",
        "objectives": [k for k, w in student.weights.items() if w > 0], "batch": batch,
        "teacher_fwd": tfwd / batch, "student_fwd": fwd / batch, "student_bwd": bwd / batch,
        "total": (tfwd + fwd + bwd) / batch, "student_fwd_parts": {k: v / batch for k, v in parts.items()},
        "saved_mib_per_image": saved.total / batch / 2**20,
        "trainable_params": sum(p.numel() for p in student.parameters() if p.requires_grad),
    }


def is_pretrain_config(path: Path) -> bool:
    from hvpmtl.config import ConfigError, load_config
    try:
        load_config(path)
        return True
    except ConfigError:  # fine-tuning configs have their own schema and step
        return False


def variants(paths: list[Path], options: bool) -> list[tuple[str, str, list[str]]]:
    """(config, option, overrides): each config as written; for the paper configs also each option alone."""
    out = [(str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p), "as configured", []) for p in paths]
    if options:
        for p in paths:
            if p.name not in ("pretrain_vit_b.yaml", "pretrain_swin_b.yaml"):
                continue
            name = str(p.relative_to(ROOT))
            out += [(name, "view1 masked", ["objectives.swav.view1=masked"]),
                    (name, "128 decoder groups (ML-Decoder)", ["model.decoder_groups=128"]),
                    (name, "128 groups, view1 masked", ["model.decoder_groups=128", "objectives.swav.view1=masked"]),
                    (name, "1,000 classes, per class", ["data.num_classes=1000"])]
    return out


def _g(x: float) -> str:
    return f"{x / 1e9:,.1f}"


def markdown(rows: list[dict], check: dict | None) -> str:
    lines = ["| config | option | backbone | classes | decoder | view 1 for SwAV | teacher fwd | student fwd | "
             "student bwd | **total GFLOP/image** | of it: backbone fwd / label decoder fwd | "
             "activations MiB/image (fp32) | params M |",
             "|---|---|---|---|---|---|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        p = r["student_fwd_parts"]
        lines.append(
            f"| {r['config']} | {r['option']} | {r['backbone']} {r['img_size']} | {r['classes']:,} | {r['decoder']} | "
            f"{r['view1']} | {_g(r['teacher_fwd'])} | {_g(r['student_fwd'])} | {_g(r['student_bwd'])} | "
            f"**{_g(r['total'])}** | {_g(p.get('backbone', 0))} / {_g(p.get('label_decoder', 0))} | "
            f"{r['saved_mib_per_image']:,.0f} | {r['trainable_params'] / 1e6:.1f} |")
    if check:
        lines += ["", f"Analytic check, {check['backbone']} at {check['img_size']} px, one forward of the features: "
                      f"counted {_g(check['counted'])} GFLOP, formula {_g(check['analytic'])} GFLOP "
                      f"({100 * (check['counted'] / check['analytic'] - 1):+.2f}%)."]
    return "\n".join(lines)


def vit_b_check() -> dict:
    """ViT-B/16's features at 224 px counted vs vit_forward_flops."""
    import timm
    m = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    with torch.no_grad(), flop_counter() as c:
        m.forward_features(torch.zeros(1, 3, 224, 224))
    return {"backbone": "vit_base_patch16_224", "img_size": 224, "counted": c.get_total_flops(),
            "analytic": vit_forward_flops(12, 768, 224, 16)}


def main(argv=None) -> int:
    from hvpmtl.config import load_config
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="*", help="config files (default: every pre-training config in configs/)")
    p.add_argument("--no-options", action="store_true", help="only the configs as written")
    p.add_argument("--batch", type=int, default=1, help="images per counted step (FLOPs are per image)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="key=value for every row")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--compute", action="store_true",
                   help="run the step's arithmetic (minutes per paper config) instead of fake tensors (seconds)")
    a = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    paths = [Path(c).resolve() for c in a.configs] if a.configs else sorted(
        q for q in (ROOT / "configs").rglob("*.yaml") if is_pretrain_config(q))
    rows = []
    for config, option, sets in variants(paths, not a.no_options):
        t0 = time.perf_counter()
        cfg = load_config(ROOT / config if not Path(config).is_absolute() else config, [*sets, *a.overrides])
        r = {"config": config, "option": option, **count_step(cfg, a.batch, fake=not a.compute)}
        rows.append(r)
        print(f"{config} [{option}]: {_g(r['total'])} GFLOP/image ({time.perf_counter() - t0:.0f} s)",
              file=sys.stderr, flush=True)
    check = vit_b_check() if not a.no_options else None
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "vit_b_check": check}, indent=1))
    print(markdown(rows, check))
    return 0


if __name__ == "__main__":
    from provenance import provenance_line  # what the numbers below were measured with
    print(provenance_line(), flush=True)
    sys.exit(main())
