"""MLflow image panels of what the student does, every `run.image_log_every` steps (the `ImagePanels` step hook).

  panels/mim_step_XXXXXX.png        input, masked input, reconstruction, reconstruction in the masked area
  panels/labels_step_XXXXXX.png     top-k predicted labels (class names from data.dictionary) vs the truth
                                    (+ panels/labels_step_XXXXXX.json with the numbers)
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


def _font():
    return ImageFont.load_default()


def _grid(rows: list[np.ndarray], names: list[str]) -> Image.Image:
    """rows of [B, H, W, 3] uint8 -> one image, a label at the left of each row."""
    b, h, w, _ = rows[0].shape
    scale = max(1, math.ceil(MIN_TILE / h))
    th, tw, margin, gap = h * scale, w * scale, 110, 2
    canvas = Image.new("RGB", (margin + b * (tw + gap), len(rows) * (th + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (row, name) in enumerate(zip(rows, names)):
        y = r * (th + gap)
        draw.text((4, y + th // 2 - 6), name, fill="black", font=_font())
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


def mim_panel(view1: torch.Tensor, mask: torch.Tensor, rec: torch.Tensor) -> Image.Image:
    """Rows: input, masked input (grey), reconstruction, reconstruction pasted into the masked area."""
    rec = rec.float().cpu()
    patch = view1.shape[-1] // mask.shape[-1]
    m = mask.float().repeat_interleave(patch, 1).repeat_interleave(patch, 2).unsqueeze(1).cpu()
    x = view1.float().cpu()
    grey = torch.zeros_like(x)  # 0 in normalised space = the ImageNet mean colour
    masked = x * (1 - m) + grey * m
    pasted = x * (1 - m) + rec * m
    return _grid([to_uint8(x), to_uint8(masked), to_uint8(rec), to_uint8(pasted)],
                 ["input", "masked", "reconstruction", "rec. in mask"])


def class_names(cfg: ExperimentConfig) -> list[str]:
    if cfg.data.dictionary and Path(cfg.data.dictionary).is_file():
        from hvpmtl.data.tencent import read_dictionary
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


def labels_panel(view1: torch.Tensor, preds: list[dict]) -> Image.Image:
    thumbs = to_uint8(view1)
    side, line, width = 96, 12, 560
    blocks = []
    for p in preds:
        lines = ["predicted (top-%d):" % len(p["predicted"])]
        truth = {n for n, _ in p["true"]}
        lines += [f"  {'+' if n in truth else '-'} {n[:28]}  {v:.2f}" for n, v in p["predicted"]]
        lines.append("true:")
        lines += ["  " + s for s in textwrap.wrap(", ".join(n for n, _ in p["true"]) or "(none)", 60)]
        blocks.append(lines)
    heights = [max(side, len(ls) * line + 8) for ls in blocks]
    canvas = Image.new("RGB", (width, sum(heights) + 2 * len(heights)), "white")
    draw = ImageDraw.Draw(canvas)
    y = 0
    for img, lines, h in zip(thumbs, blocks, heights):
        canvas.paste(Image.fromarray(img).resize((side, side), Image.BILINEAR), (0, y))
        for j, s in enumerate(lines):
            draw.text((side + 8, y + 4 + j * line), s, fill="black", font=_font())
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


def log_panels(tracker, student, batch: dict, cfg: ExperimentConfig, step: int, *, world_size: int = 1,
               is_main: bool = True) -> list[str]:
    """Log every panel the student's enabled heads allow; returns the artifact names logged.

    batch: {"view1", "view2", "mask", "labels", "index"}, a few fixed training samples. Collective when
    world_size > 1 (every rank runs the student); only `is_main` draws and logs."""
    p = next(student.parameters())
    dev, dtype = p.device, p.dtype
    v1 = batch["view1"].to(dev, dtype)
    was_training = student.training
    student.eval()
    try:
        out = student.inspect(v1, batch["view2"].to(dev, dtype), batch["mask"].to(dev), world_size=world_size)
    except Exception as e:  # noqa: BLE001 — see the module docstring (every rank fails alike: same code, same shapes)
        notice(f"image panels at step {step} failed: {type(e).__name__}: {e}")
        return []
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
        emit("mim", lambda: mim_panel(v1, mask, out["reconstruction"]))
    if "logits" in out:
        def labels_image():
            preds = label_predictions(out["logits"], labels, class_names(cfg))
            path = Path(cfg.run.output_dir) / "panels" / f"labels_{tag}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"step": step, "index": batch["index"].view(-1).tolist(),
                                        "samples": preds}, indent=1))
            tracker.log_artifact(path, "panels")
            logged.append(f"panels/{path.name}")
            return labels_panel(v1, preds)
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
