#!/usr/bin/env python
"""Does pre-training learn? A small version of the paper's Table 5 on the synthetic data (docs/RESULTS.md).

Pre-trains the demo model (configs/demo_cpu.yaml: ViT-Tiny, 96 px) on the demo's synthetic data with
the same seed and budget once with all four objectives and once with each objective switched off,
then fits a linear probe and a kNN classifier on frozen features of the training list and scores
them on the held-out list, next to the same architecture at random init:

    .venv/bin/python benchmarks/results_table.py            # 3 epochs per run, 1 rank, ~1 h on 2 CPU cores

Each pre-training run goes to <out>/<variant>; a finished run (its backbone exported) is not run
again and finished evaluations are kept in <out>/results.json, so an interrupted table resumes.
Prints the Markdown table of docs/RESULTS.md.

Two deliberate choices (docs/RESULTS.md says why): the ASL weight is 0.5 (the paper's 0.001 is for a
sum over 11,166 classes; 0.001 x 11166 / 24 ~ 0.5 gives the same weight per class for 24 classes),
and the student's backbone is evaluated in every variant (the EMA teacher at momentum 0.995 still
carries much of its random start after a few hundred steps).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {  # name -> --set overrides
    "full (4 objectives)": [],
    "no ASL": ["objectives.asl.enabled=false"],
    "no SwAV": ["objectives.swav.enabled=false"],
    "no SimMIM": ["objectives.mim.enabled=false"],
    "no distillation": ["objectives.distill.enabled=false"],
}


def slug(name: str) -> str:
    return name.split(" (")[0].replace(" ", "_").lower()


def env() -> dict:
    e = dict(os.environ)
    e.setdefault("DS_ACCELERATOR", "cpu")
    e.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    e.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    e.setdefault("OMP_NUM_THREADS", "1")
    e["PYTHONUNBUFFERED"] = "1"
    e["PATH"] = f"{Path(sys.executable).parent}:{e.get('PATH', '')}"
    return e


def make_data(data: Path) -> None:
    if (data / "holdout.txt").is_file():
        return
    # the demo's data set (launchers/demo.sh): 3000 training and 600 held-out scenes, seed 0
    subprocess.run([sys.executable, "-m", "hvpmtl", "data", "make-synthetic", "--out", str(data), "--num-images",
                    "3000", "--holdout", "600", "--seed", "0"], check=True, cwd=ROOT, env=env())


def data_overrides(data: Path) -> list[str]:
    return [f"data.root={data}", f"data.list_file={data / 'train.txt'}", f"data.dictionary={data / 'dictionary.txt'}",
            f"data.holdout_list={data / 'holdout.txt'}"]


def tracking_uri(args) -> str:
    return f"sqlite:///{args.out}/mlflow.db"


def make_experiment(args) -> None:
    """The results' MLflow experiment, its artifacts under <out>/mlruns (not the working directory's)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri(args))
    if client.get_experiment_by_name("hvpmtl-results") is None:
        client.create_experiment("hvpmtl-results", artifact_location=str(args.out / "mlruns"))


def pretrain(name: str, sets: list[str], args, data: Path) -> Path:
    out = args.out / slug(name)
    if (out / "backbone.safetensors").is_file():
        print(f"== {name}: done before ({out})", flush=True)
        return out
    common = [f"run.output_dir={out}", f"optim.epochs={args.epochs}", f"optim.max_steps={args.steps}",
              f"optim.warmup_epochs={args.warmup_epochs}", "run.checkpoint_every=1000000",
              "run.image_log_every=0", "run.eval_every=0", f"run.seed={args.seed}", f"data.seed={args.seed}",
              "run.progress_bar=false", f"run.name=results-{slug(name)}", "tracking.experiment=hvpmtl-results",
              f"tracking.tracking_uri={tracking_uri(args)}", *data_overrides(data)]
    cmd = ["launchers/pretrain.py", "--config", args.config]
    if args.ranks > 1:
        cmd = ["deepspeed", "--num_gpus", str(args.ranks), "--master_addr", "127.0.0.1", *cmd]
    else:
        cmd = [sys.executable, *cmd]
    for s in common + args.overrides + sets:
        cmd += ["--set", s]
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "pretrain.log", "w") as log:
        code = subprocess.run(cmd, cwd=ROOT, env=env(), stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"{name}: pre-training failed with exit code {code}; see {out / 'pretrain.log'}")
    print(f"   {time.time() - t0:.0f} s", flush=True)
    return out


def evaluate(backbone, cfg, probe: str) -> dict:
    import torch

    from hvpmtl.eval.features import split_features
    from hvpmtl.eval.knn import knn_eval
    from hvpmtl.eval.linear_probe import linear_probe

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lists = {"train_list": cfg.data.list_file, "test_list": cfg.data.holdout_list} if probe == "train" else {}
    f = split_features(backbone.to(dev), cfg.data, device=dev, batch_size=64, **lists)
    tr, te = f["train"], f["test"]
    kw = dict(multilabel=True, num_classes=f["num_classes"], device=dev)
    lin = linear_probe(tr["features"], tr["labels"], te["features"], te["labels"], **kw)
    knn = knn_eval(tr["features"], tr["labels"], te["features"], te["labels"], **kw)
    return {"linear_map": lin["map"], "knn_map": knn["map"], "weight_decay": lin["weight_decay"],
            "groups": group_map(lin["class_ap"]), "n_train": int(len(tr["features"])),
            "n_test": int(len(te["features"]))}


def group_map(class_ap: list[float]) -> dict[str, float]:
    """Linear-probe mAP per kind of label of the synthetic data: shape, colour, texture, crowded."""
    import math

    from hvpmtl.data import synthetic

    kinds = {"shape": {"round shape", "polygon", "spiky shape", *synthetic.SHAPES},
             "colour": {"warm colour", "cool colour", *synthetic.COLOURS},
             "texture": {"patterned", *synthetic.TEXTURES}, "crowded": {"crowded scene"}}
    names = [n for n, _ in synthetic.CLASSES]
    out = {}
    for kind, members in kinds.items():
        aps = [a for n, a in zip(names, class_ap) if n in members and not math.isnan(a)]
        out[kind] = sum(aps) / len(aps) if aps else float("nan")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/demo_cpu.yaml")
    p.add_argument("--epochs", type=int, default=3, help="pre-training epochs (the cosine schedule spans them)")
    p.add_argument("--steps", type=int, default=0, help="> 0: stop each run after this many optimizer steps")
    p.add_argument("--warmup-epochs", type=float, default=0.1)
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", type=Path, default=None, help="synthetic data dir (default: <out>/data)")
    p.add_argument("--out", type=Path, default=Path("runs/results"))
    p.add_argument("--probe", choices=("train", "holdout"), default="train",
                   help="train: probes fit on the training list, tested on the held-out list; holdout: the "
                        "held-out list split in halves (the online evaluation's protocol)")
    p.add_argument("--only", nargs="*", default=None, help="variant slugs to run (default: all)")
    p.add_argument("--asl-weight", type=float, default=0.5,
                   help="objectives.asl.weight for every run (0.001 x 11166 / 24 classes); negative: the config's")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every pre-training run (repeatable)")
    args = p.parse_args(argv)
    args.out = args.out if args.out.is_absolute() else ROOT / args.out
    if args.asl_weight >= 0:
        args.overrides = [f"objectives.asl.weight={args.asl_weight}", *args.overrides]
    data = args.data or args.out / "data"
    data = data if data.is_absolute() else ROOT / data
    make_data(data)
    make_experiment(args)

    from hvpmtl.config import load_config
    from hvpmtl.eval.features import load_backbone

    results_file = args.out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    cfg = load_config(ROOT / args.config, data_overrides(data))
    if "random init" not in results:
        bb = load_backbone(backbone_name=cfg.model.backbone, img_size=cfg.model.img_size, random_init=True,
                           seed=args.seed)
        results["random init"] = evaluate(bb, cfg, args.probe)
        results_file.write_text(json.dumps(results, indent=1))
    for name, sets in VARIANTS.items():
        if args.only is not None and slug(name) not in args.only:
            continue
        run_dir = pretrain(name, sets, args, data)
        if name not in results:
            bb = load_backbone(run_dir=run_dir, which="student")
            r = evaluate(bb, load_config(run_dir / "config.yaml"), args.probe)
            r["final_losses"] = _final_losses(run_dir)
            results[name] = r
            results_file.write_text(json.dumps(results, indent=1))
    print(table(results, args))
    return 0


def _final_losses(run_dir: Path, last: int = 10) -> dict:
    """Mean of each objective over the last `last` logged steps."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r][-last:]
    keys = ("asl", "swav", "mim", "distill")
    return {k: sum(r[k] for r in rows) / len(rows) for k in keys if rows and all(k in r for r in rows)}


def table(results: dict, args) -> str:
    base = results.get("random init", {}).get("linear_map")
    lines = ["| backbone | linear-probe mAP | Δ vs random | kNN mAP | shape | colour | texture | crowded |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in ["random init", *VARIANTS]:
        if name not in results:
            continue
        r = results[name]
        delta = "" if name == "random init" or base is None else f"{r['linear_map'] - base:+.1f}"
        g = r.get("groups", {})
        kinds = " | ".join(f"{g[k]:.1f}" if k in g else "" for k in ("shape", "colour", "texture", "crowded"))
        lines.append(f"| {name} | {r['linear_map']:.1f} | {delta} | {r['knn_map']:.1f} | {kinds} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
