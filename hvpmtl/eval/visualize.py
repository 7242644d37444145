"""MLflow image panels of what the student does, every `run.image_log_every` steps (the `ImagePanels` step hook).

  panels/mim_step_XXXXXX.png        input, masked input, reconstruction, reconstruction in the masked area, under
                                    a caption of what to expect (flat grey reconstructions early on)
  panels/labels_step_XXXXXX.png     top-k predicted labels (class names from data.dictionary) vs the truth, on the
                                    whole image the labels belong to, not a training crop that may cut objects
                                    away (+ panels/labels_step_XXXXXX.json with the numbers)
  panels/swav_codes_step_XXXXXX.png histograms of the argmax Sinkhorn code and of the argmax prototype
                                    score per view, under the collapse figures of the step's global batch
                                    (code / prediction entropy, prototypes used, z std and rank) and a verdict:
                                    a few panel views always spread over some prototypes, uniform codes do not
  panels/losses_step_XXXXXX.png     loss curves per objective from <run.output_dir>/metrics.jsonl

A panel whose head is off (objective disabled) is skipped. The student's own `inspect` gives what
the heads make of a few fixed training images, without gradients in eval mode (its training mode is
restored); every rank takes part (the Sinkhorn codes span the ranks), rank 0 draws and logs. A panel
that fails is reported as a warning: a picture must not stop a training run.
"""
from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from hvpmtl.config import ExperimentConfig
from hvpmtl.models.collapse import CollapseMonitor, collapse_figures, swav_sums
from hvpmtl.notices import notice

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TOP_K = 5
MIN_TILE = 128  # small training crops are enlarged to at least this many pixels
LOSS_KEYS = ("loss", "asl", "swav", "mim", "distill")


# ----------------------------------------------------------------------------- image helpers


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """ImageNet-normalised [B, 3, H, W] -> [B, H, W, 3] uint8."""
    x = images.detach().float().cpu()
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = (x * std + mean).clamp(0, 1)
    return (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


FONT_PX = 13
LINE_PX = FONT_PX + 3


def _font():
    try:
        return ImageFont.load_default(size=FONT_PX)  # Pillow >= 10.1 with FreeType
    except (TypeError, ValueError, OSError, ImportError):
        return ImageFont.load_default()


def _grid(rows: list[np.ndarray], names: list[str], caption: list[str] = ()) -> Image.Image:
    """rows of [B, H, W, 3] uint8 -> one image, a label at the left of each row, caption lines above."""
    b, h, w, _ = rows[0].shape
    scale = max(1, math.ceil(MIN_TILE / h))
    th, tw, margin, gap = h * scale, w * scale, 120, 2
    top = len(caption) * LINE_PX + (6 if caption else 0)
    canvas = Image.new("RGB", (margin + b * (tw + gap), top + len(rows) * (th + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, line in enumerate(caption):
        draw.text((4, 3 + j * LINE_PX), line, fill="black", font=_font())
    for r, (row, name) in enumerate(zip(rows, names)):
        y = top + r * (th + gap)
        draw.text((4, y + th // 2 - FONT_PX // 2), name, fill="black", font=_font())
        for i in range(b):
            tile = Image.fromarray(row[i]).resize((tw, th), Image.NEAREST)
            canvas.paste(tile, (margin + i * (tw + gap), y))
    return canvas


def _figure_to_image(fig) -> Image.Image:
    fig.canvas.draw()
    img = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy())
    import matplotlib.pyplot as plt
    plt.close(fig)
    return img


def _pyplot():
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt


# ----------------------------------------------------------------------------- panels


def mim_caption(step: int, width_px: int) -> list[str]:
    text = (f"SimMIM at step {step}: training crop, masked input, the decoder's reconstruction, and the "
            "reconstruction pasted into the masked area. Flat grey or blurred reconstructions are expected for the "
            "first few hundred steps (a short run such as the 186-step demo ends there): the decoder first learns "
            "each masked patch's average colour; edges and shapes come with much longer training. Judge the "
            "first steps by the falling `mim` loss, not by these pictures.")
    return textwrap.wrap(text, max(40, width_px // 7))


def mim_panel(view1: torch.Tensor, mask: torch.Tensor, rec: torch.Tensor, step: int | None = None) -> Image.Image:
    """Rows: input, masked input (grey), reconstruction, reconstruction pasted into the masked area; with `step`,
    a caption that says what to expect."""
    rec = rec.float().cpu()
    patch = view1.shape[-1] // mask.shape[-1]
    m = mask.float().repeat_interleave(patch, 1).repeat_interleave(patch, 2).unsqueeze(1).cpu()
    x = view1.float().cpu()
    grey = torch.zeros_like(x)  # 0 in normalised space = the ImageNet mean colour
    masked = x * (1 - m) + grey * m
    pasted = x * (1 - m) + rec * m
    rows = [to_uint8(x), to_uint8(masked), to_uint8(rec), to_uint8(pasted)]
    b, h, w = x.shape[0], x.shape[-2], x.shape[-1]
    width = 120 + b * (w * max(1, math.ceil(MIN_TILE / h)) + 2)
    return _grid(rows, ["input", "masked", "reconstruction", "rec. in mask"],
                 mim_caption(step, width) if step is not None else ())


def class_names(cfg: ExperimentConfig) -> list[str]:
    if cfg.data.dictionary and Path(cfg.data.dictionary).is_file():
        from hvpmtl.data.formats.dictionary import read_dictionary
        names = read_dictionary(cfg.data.dictionary).names
        if len(names) == cfg.data.num_classes:
            return names
    return [str(i) for i in range(cfg.data.num_classes)]


def label_predictions(logits: torch.Tensor, labels: torch.Tensor, names: list[str], k: int = TOP_K):
    """Per sample: top-k predicted (name, probability) and the true (name, confidence) labels."""
    probs = torch.sigmoid(logits.float()).cpu()
    k = min(k, probs.shape[1])
    top_p, top_i = probs.topk(k, dim=1)
    out = []
    for b in range(probs.shape[0]):
        truth = [(names[c], round(float(labels[b, c]), 3)) for c in torch.nonzero(labels[b] > 0).view(-1).tolist()]
        pred = [(names[c], round(float(p), 3)) for c, p in zip(top_i[b].tolist(), top_p[b].tolist())]
        out.append({"predicted": pred, "true": truth})
    return out


WHOLE_CAPTION = ("The whole images the true labels belong to (not the training crops); predicted: the student's "
                 "top-5 on each whole image, resized to {size}x{size} px")
CROP_CAPTION = ("Training crops: the true labels are the whole scene's, and a crop may have cut some of those "
                "objects away (no whole image at hand: tensor or shard data, or a file that could not be read)")


def whole_images(loader, ids, allow_outside_root: bool = False) -> list[Image.Image] | None:
    """The whole images of training sample ids, read from data.root as listed (None for shards, tensors, or a file
    that cannot be read: the panel then shows the training crops and says so)."""
    samples, root = getattr(loader, "labels", None), getattr(loader, "root", None)
    if not root or getattr(loader, "shards", None) or not hasattr(samples, "path"):
        return None
    from hvpmtl.data.loaders.root_guard import RootGuard

    guard = None if allow_outside_root else RootGuard(root)
    out = []
    try:
        for i in ids:
            path = Path(root) / samples.path(int(i))
            if guard is not None and guard.outside(path):
                return None
            with Image.open(path) as im:
                out.append(im.convert("RGB"))
    except (OSError, ValueError) as e:
        notice(f"image panels: the labels panel shows training crops: {type(e).__name__}: {e}")
        return None
    return out


def model_input(images: list[Image.Image], size: int) -> torch.Tensor:
    """Whole images -> [B, 3, size, size] ImageNet-normalised (resized, not cropped)."""
    x = np.stack([np.asarray(im.resize((size, size), Image.BILINEAR), np.float32) / 255 for im in images])
    x = (x - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


def labels_panel(images, preds: list[dict], caption: str = "") -> Image.Image:
    """images: whole PIL images (shown at their aspect ratio) or a [B, 3, H, W] batch of crops."""
    thumbs = [Image.fromarray(a) for a in to_uint8(images)] if isinstance(images, torch.Tensor) else list(images)
    side, width = 128, 640
    blocks = []
    for p in preds:
        lines = ["predicted (top-%d):" % len(p["predicted"])]
        truth = {n for n, _ in p["true"]}
        lines += [f"  {'+' if n in truth else '-'} {n[:28]}  {v:.2f}" for n, v in p["predicted"]]
        lines.append("true:")
        lines += ["  " + s for s in textwrap.wrap(", ".join(n for n, _ in p["true"]) or "(none)", 56)]
        blocks.append(lines)
    sized = []
    for t in thumbs:  # the longer side at `side` px
        f = side / max(t.size)
        sized.append(t.resize((max(1, round(t.width * f)), max(1, round(t.height * f))), Image.BILINEAR))
    head = textwrap.wrap(caption, 80) if caption else []
    top = len(head) * LINE_PX + (6 if head else 0)
    heights = [max(t.height, len(ls) * LINE_PX + 8) for t, ls in zip(sized, blocks)]
    canvas = Image.new("RGB", (width, top + sum(heights) + 2 * len(heights)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, s in enumerate(head):
        draw.text((4, 3 + j * LINE_PX), s, fill="black", font=_font())
    y = top
    for img, lines, h in zip(sized, blocks, heights):
        canvas.paste(img, (0, y))
        for j, s in enumerate(lines):
            draw.text((side + 8, y + 4 + j * LINE_PX), s, fill="black", font=_font())
        y += h + 2
    return canvas


def code_counts(scores: torch.Tensor, codes: torch.Tensor) -> dict[str, np.ndarray]:
    """Per prototype, how many views pick it: {"codes": argmax of the Sinkhorn codes (the targets), "scores":
    argmax of the raw prototype scores (the predictions)}.

    With collapsed embeddings every score row is the same, so "scores" is one bar; the Sinkhorn
    rows are then uniform and their argmax only follows rounding noise, so "codes" shows the
    equipartition Sinkhorn imposes rather than the collapse. The two together tell them apart."""
    k = scores.shape[1]
    return {"codes": np.bincount(codes.argmax(dim=1).cpu().numpy(), minlength=k),
            "scores": np.bincount(scores.argmax(dim=1).cpu().numpy(), minlength=k)}


def code_assignments(student, view1: torch.Tensor, view2: torch.Tensor, world_size: int = 1) -> dict[str, np.ndarray]:
    """`code_counts` of both views of a batch through the student (eval mode is the caller's)."""
    out = student.inspect(view1, view2, None, world_size=world_size)
    return code_counts(out["scores"], out["codes"])


def swav_health(train: dict[str, float], panel: dict[str, float], embed_dim: int) -> tuple[bool, list[str]]:
    """(collapsed?, text lines) for the SwAV panel. `train`: the collapse figures of the last logged step (global
    batch, metrics.jsonl), `panel`: those of the panel's own views; the verdict follows the training figures when
    there are any (the panel's few views are no sample of the codes), with CollapseMonitor's thresholds."""
    figures = train or panel
    bad = CollapseMonitor(1, embed_dim).collapsed(figures)
    src = f"global batch of step {int(train['step'])}" if train else "panel views only"
    lines = [f"{'COLLAPSED' if bad else 'not collapsed'} ({src}): " +
             (", ".join(k.split("/")[1] for k in sorted(bad)) + " at collapsed values" if bad else
              "codes and predictions below uniform entropy, embeddings spread")]
    for name, f in (("global batch", train), ("panel views", panel)):
        if f:
            lines.append(f"{name}: code entropy {f['swav/code_entropy']:.3f}, prediction entropy "
                         f"{f['swav/pred_entropy']:.3f} (1 = uniform), prototypes used {f['swav/protos_used']:.0f}, "
                         f"z std x sqrt(d) {f['swav/z_std'] * math.sqrt(embed_dim):.2f}, z rank {f['swav/z_rank']:.1f}")
    return bool(bad), lines


def codes_panel(counts: dict[str, np.ndarray], step: int, health: tuple[bool, list[str]] | None = None) -> Image.Image:
    plt = _pyplot()
    collapsed, lines = health or (False, [])
    fig, axes = plt.subplots(2, 1, figsize=(8, 4.5 + 0.3 * len(lines)), dpi=100, sharex=True)
    titles = {"codes": "argmax of Sinkhorn codes (targets)", "scores": "argmax of prototype scores (predictions)"}
    for ax, (key, colour) in zip(axes, (("codes", "tab:blue"), ("scores", "tab:orange"))):
        c = counts[key]
        ax.bar(np.arange(len(c)), c, width=1.0, color=colour)
        ax.set_title(f"{titles[key]}: {int((c > 0).sum())}/{len(c)} prototypes hit by {int(c.sum())} panel views, "
                     f"largest {100 * c.max() / max(1, c.sum()):.0f}%", fontsize=9)
        ax.set_ylabel("views", fontsize=8)
    axes[-1].set_xlabel("prototype")
    head = f"SwAV assignments at step {step}"
    fig.suptitle("\n".join([head, *lines]), fontsize=8, color="tab:red" if collapsed else "black")
    fig.tight_layout()
    return _figure_to_image(fig)


def last_swav_figures(path: str | Path) -> dict[str, float]:
    """The collapse figures of the last step in a metrics.jsonl that has them (with its 'step'), else {}."""
    last = {}
    for rec in _records(path):
        if "swav/code_entropy" in rec:
            last = {k: float(v) for k, v in rec.items() if k == "step" or k.startswith("swav/")}
    return last


def _records(path: str | Path):
    """The step records of a metrics.jsonl (none when it is missing; a line being written is left out)."""
    p = Path(path)
    if not p.is_file():
        return
    for line in p.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line being written
        if isinstance(rec, dict) and "step" in rec:
            yield rec


def read_metrics(path: str | Path) -> dict[str, tuple[list[int], list[float]]]:
    """{key: (steps, values)} for the loss keys in a metrics.jsonl (later lines win on a repeated step)."""
    series: dict[str, dict[int, float]] = {}
    for rec in _records(path):
        for k in LOSS_KEYS:
            if k in rec and rec[k] is not None and math.isfinite(rec[k]):
                series.setdefault(k, {})[int(rec["step"])] = float(rec[k])
    return {k: (sorted(v), [v[s] for s in sorted(v)]) for k, v in series.items()}


def losses_panel(series: dict, step: int) -> Image.Image:
    plt = _pyplot()
    keys = [k for k in LOSS_KEYS if k in series]
    fig, axes = plt.subplots(1, len(keys), figsize=(3 * len(keys), 2.6), dpi=100, squeeze=False)
    for ax, k in zip(axes[0], keys):
        steps, values = series[k]
        ax.plot(steps, values, lw=1)
        ax.set_title(k if k != "loss" else "loss (weighted total)", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"losses up to step {step}", fontsize=9)
    fig.tight_layout()
    return _figure_to_image(fig)


# ----------------------------------------------------------------------------- entry point


@torch.no_grad()
def whole_image_logits(student, images: list[Image.Image], size: int) -> torch.Tensor:
    """The label head's logits of whole images (eval mode is the caller's); one rank, no collective."""
    from hvpmtl.models.meta_arch import autocast

    p = next(student.parameters())
    x = model_input(images, size).to(p.device, p.dtype)
    with autocast(p.device.type, p.dtype):
        return student.label_decoder(student.backbone(x))[0].float()


def log_panels(tracker, student, batch: dict, cfg: ExperimentConfig, step: int, *, world_size: int = 1,
               is_main: bool = True, whole: list[Image.Image] | None = None) -> list[str]:
    """Log every panel the student's enabled heads allow; returns the artifact names logged.

    batch: {"view1", "view2", "mask", "labels", "index"}, a few fixed training samples. Collective when
    world_size > 1 (every rank runs the student); only `is_main` draws and logs. whole: those samples' whole
    images (`whole_images`), which the labels panel shows and predicts on; None: it shows the crops."""
    p = next(student.parameters())
    dev, dtype = p.device, p.dtype
    v1 = batch["view1"].to(dev, dtype)
    was_training = student.training
    student.eval()
    try:
        out = student.inspect(v1, batch["view2"].to(dev, dtype), batch["mask"].to(dev), world_size=world_size)
    except Exception as e:  # noqa: BLE001 — see the module docstring (every rank fails alike: same code, same shapes)
        student.train(was_training)
        notice(f"image panels at step {step} failed: {type(e).__name__}: {e}")
        return []
    try:
        if is_main and whole is not None and "logits" in out:
            out["whole_logits"] = whole_image_logits(student, whole, cfg.model.img_size)
    except Exception as e:  # noqa: BLE001 — see the module docstring
        notice(f"image panels at step {step}: the labels panel shows training crops: {type(e).__name__}: {e}")
    finally:
        student.train(was_training)
    if not is_main:
        return []
    labels = batch["labels"].float().cpu()
    mask = batch["mask"].cpu()
    tag = f"step_{step:06d}"
    logged = []

    def emit(name, make):
        try:
            img = make()
        except Exception as e:  # noqa: BLE001 — see the module docstring
            notice(f"image panel '{name}' at step {step} failed: {type(e).__name__}: {e}")
            return
        if img is not None:
            tracker.log_image(img, f"panels/{name}_{tag}.png")
            logged.append(f"panels/{name}_{tag}.png")

    if "reconstruction" in out:
        emit("mim", lambda: mim_panel(v1, mask, out["reconstruction"], step))
    if "logits" in out:
        def labels_image():
            on_whole = "whole_logits" in out
            preds = label_predictions(out["whole_logits" if on_whole else "logits"], labels, class_names(cfg))
            path = Path(cfg.run.output_dir) / "panels" / f"labels_{tag}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"step": step, "index": batch["index"].view(-1).tolist(),
                                        "shown": "whole image" if on_whole else "training crop",
                                        "samples": preds}, indent=1))
            tracker.log_artifact(path, "panels")
            logged.append(f"panels/{path.name}")
            if on_whole:
                return labels_panel(whole, preds, WHOLE_CAPTION.format(size=cfg.model.img_size))
            return labels_panel(v1, preds, CROP_CAPTION)
        emit("labels", labels_image)
    if "scores" in out:
        def codes_image():
            panel = collapse_figures(swav_sums(out["scores"], out["codes"], out["z"], cfg.objectives.swav.temperature))
            train = last_swav_figures(Path(cfg.run.output_dir) / "metrics.jsonl")
            return codes_panel(code_counts(out["scores"], out["codes"]), step,
                               swav_health(train, panel, cfg.model.proto_out_dim))
        emit("swav_codes", codes_image)
    emit("losses", lambda: (lambda s: losses_panel(s, step) if s else None)(
        read_metrics(Path(cfg.run.output_dir) / "metrics.jsonl")))
    return logged
