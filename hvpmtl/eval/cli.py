"""`hvpmtl eval linear-probe|knn`: frozen-backbone evaluation of a run, an exported file or a random init.

    hvpmtl eval linear-probe --run-dir RUN [--checkpoint TAG] [--which auto|teacher|student]
    hvpmtl eval linear-probe --backbone FILE [--backbone-name NAME] [--img-size S] --config EXP.yaml
    hvpmtl eval knn ... [--k 20] [--temperature 0.07]
    ... --random-init         the same architecture untrained (the baseline)

Data (default: the held-out list of the run's / --config's data section, split in two by position):
    --train-list A --test-list B   two Tencent-format lists (multi-label, mAP), images under data.root
    --train-dir A --test-dir B     two ImageFolder roots (single-label, top-1)
Prints one JSON line ({"metric": ..., "value": ...}); --out also writes it to a file.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from hvpmtl.cli import HelpFormatter as FMT
from hvpmtl.eval.export import add_weights_arguments, describe




def _say(msg: str) -> None:
    print(f"hvpmtl eval: {msg}", file=sys.stderr, flush=True)


def _add_common(p) -> None:
    src = p.add_argument_group("backbone (one of)")
    src.add_argument("--run-dir", help="a pre-training run (config.yaml + checkpoints/)")
    src.add_argument("--backbone", help="an exported backbone file (hvpmtl export)")
    src.add_argument("--random-init", action="store_true", help="untrained weights (the baseline)")
    add_weights_arguments(p)
    p.add_argument("--backbone-name", help="timm name (default: from the file's metadata or the run)")
    p.add_argument("--img-size", type=int, help="input size (default: from the file's metadata or the run)")
    p.add_argument("--config", help="experiment YAML for the data section when there is no --run-dir")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override the experiment config, e.g. --set data.root=/data (repeatable)")
    d = p.add_argument_group("data (default: the held-out list split in halves)")
    d.add_argument("--train-list", help="Tencent-format list the probe is fitted on (images under data.root; "
                                        "default: the even positions of data.holdout_list)")
    d.add_argument("--test-list", help="Tencent-format list the probe is scored on (default: the odd positions of "
                                       "data.holdout_list)")
    d.add_argument("--train-dir", help="ImageFolder root the probe is fitted on (single-label: top-1)")
    d.add_argument("--test-dir", help="ImageFolder root the probe is scored on (with --train-dir)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass of feature extraction")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0, help="seed of a --random-init backbone")
    p.add_argument("--out", help="also write the JSON result here (default: stdout only)")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="linear-probe and kNN evaluation of a pre-trained backbone",
                              description=__doc__.split("\n\n")[0], formatter_class=FMT)
    sub = p.add_subparsers(dest="eval_command", required=True)
    lp = sub.add_parser("linear-probe", help="logistic-regression probe on frozen features (mAP or top-1)",
                        formatter_class=FMT)
    _add_common(lp)
    lp.add_argument("--max-iter", type=int, default=100, help="L-BFGS iterations per fit")
    lp.set_defaults(func=_linear_probe)
    kn = sub.add_parser("knn", help="weighted cosine k-NN on frozen features (mAP or top-1)", formatter_class=FMT)
    _add_common(kn)
    kn.add_argument("--k", type=int, default=20, help="neighbours that vote (the DINO/solo-learn k-NN protocol)")
    kn.add_argument("--temperature", type=float, default=0.07,
                    help="each neighbour votes with weight exp(cosine similarity / temperature)")
    kn.set_defaults(func=_knn)


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def prepare(args):
    """(features dict from split_features, description) for the parsed arguments."""
    from hvpmtl.config import ExperimentConfig, load_config
    from hvpmtl.eval.features import load_backbone, split_features

    sources = [bool(args.run_dir), bool(args.backbone)]
    if sum(sources) > 1:
        raise ValueError("give one of --run-dir and --backbone")
    if not any(sources) and not args.random_init:
        raise ValueError("give --run-dir, --backbone, or --random-init (with --backbone-name/--img-size or --config)")
    if args.run_dir:
        cfg = load_config(Path(args.run_dir) / "config.yaml", args.overrides)
    elif args.config:
        cfg = load_config(args.config, args.overrides)
    else:
        cfg = ExperimentConfig() if not args.overrides else load_config(None, args.overrides)
    name = args.backbone_name or (cfg.model.backbone if (args.run_dir or args.config) and not args.backbone else None)
    size = args.img_size or (cfg.model.img_size if (args.run_dir or args.config) and not args.backbone else None)
    backbone = load_backbone(run_dir=None if args.random_init else args.run_dir, checkpoint=args.checkpoint,
                             which=args.which, backbone_file=None if args.random_init else args.backbone,
                             backbone_name=name, img_size=size, random_init=args.random_init, seed=args.seed)
    info = getattr(backbone, "weights_info", None)
    if info:
        _say(f"using the {describe(info)}")
    elif args.backbone:
        _say(f"using {args.backbone}")
    device = _device(args.device)
    backbone.to(device)
    feats = split_features(backbone, cfg.data, device=device, batch_size=args.batch_size,
                           train_list=args.train_list, test_list=args.test_list,
                           train_dir=args.train_dir, test_dir=args.test_dir, progress=_say)
    what = "random-init " + backbone.name if args.random_init else (args.run_dir or args.backbone)
    return feats, what, device, info


def _report(args, result: dict) -> int:
    line = json.dumps(result)
    print(line)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(line + "\n")
    return 0


def _run(args, evaluate) -> int:
    from hvpmtl.config import ConfigError
    from hvpmtl.data.formats.issues import DataError

    t0 = time.perf_counter()
    try:
        f, what, device, info = prepare(args)
    except (ValueError, ConfigError, DataError) as e:  # ExportError is a ValueError
        print(f"hvpmtl eval: {e}", file=sys.stderr)
        return 2
    tr, te = f["train"], f["test"]
    _say(f"fitting on {len(tr['features'])} images, scoring {len(te['features'])} ...")
    result = evaluate(tr, te, f, device)
    result.update(backbone=what, n_train=int(len(tr["features"])), n_test=int(len(te["features"])),
                  seconds=round(time.perf_counter() - t0, 1))
    if info:
        result.update(which=info["which"], checkpoint=info["checkpoint"], step=info["step"])
    return _report(args, result)


def _linear_probe(args) -> int:
    from hvpmtl.eval.linear_probe import linear_probe

    def evaluate(tr, te, f, device):
        r = linear_probe(tr["features"], tr["labels"], te["features"], te["labels"], multilabel=f["multilabel"],
                         num_classes=f["num_classes"], max_iter=args.max_iter, device=device, progress=_say)
        key = "map" if f["multilabel"] else "top1"
        return {"eval": "linear-probe", "metric": key, "value": r[key], "weight_decay": r["weight_decay"]}
    return _run(args, evaluate)


def _knn(args) -> int:
    from hvpmtl.eval.knn import knn_eval

    def evaluate(tr, te, f, device):
        r = knn_eval(tr["features"], tr["labels"], te["features"], te["labels"], multilabel=f["multilabel"],
                     num_classes=f["num_classes"], k=args.k, temperature=args.temperature, device=device)
        key = "map" if f["multilabel"] else "top1"
        return {"eval": "knn", "metric": key, "value": r[key], "k": args.k, "temperature": args.temperature}
    return _run(args, evaluate)
