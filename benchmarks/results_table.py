#!/usr/bin/env python
"""Does pre-training learn, and what does each objective add? A small version of the paper's Table 5 on the
synthetic data, with error bars (docs/RESULTS.md).

For every seed: pre-trains the demo model (configs/demo_cpu.yaml, ViT-Tiny) on the synthetic data once with
all four objectives and once with each objective switched off; fits a linear probe and a kNN classifier on
frozen student features of the training list and scores them on the held-out list, next to the same
architecture at random init; then fine-tunes end to end (launchers/finetune.py, configs/finetune_tiny.yaml)
the full model's student (and those of --ft-variants) and a random init with the same recipe and budget on
object-centric downstream
images (one object per image, class = its colour and texture, 18 classes; by default 150 labelled training
images, SwAV's 10 %-label protocol) and reports the first and the last epoch's top-1; and the same two
initialisations multi-label on scenes of their own (the pre-training's 24 labels, drawn with another data
seed, so never seen in pre-training: 150 labelled, 500 validation), reporting mAP. Each variant's
collapse figures (SwAV loss / ln K and whatever swav/* and distill/* figures the run logs) come from its
metrics.jsonl. Every number is reported as mean ± std over the seeds:

    .venv/bin/python benchmarks/results_table.py --seeds 0 1 2     # 64 px, 1500 images, 188 steps: ~1 h on 2 shared cores

Resumable: a finished pre-training (backbone exported) or fine-tuning (model exported) is not run again, a
run killed half-way restarts, and every finished evaluation is kept in <out>/results.json with the budget it
was measured at; a table continued with another budget is refused. Seeds run one after the other (all
variants of seed 0 first), so a table stopped early still has whole seeds. Prints the Markdown tables of
docs/RESULTS.md.

Two deliberate choices (docs/RESULTS.md says why): the ASL weight is 0.5 (the paper's 0.001 is for a
sum over 11,166 classes; 0.001 x 11166 / 24 ~ 0.5 gives the same weight per class for 24 classes),
and the student's backbone is evaluated and fine-tuned in every variant (the EMA teacher at momentum
0.995 still carries much of its random start after a few hundred steps).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RANDOM = "random init"
FULL = "full (4 objectives)"
VARIANTS = {  # name -> --set overrides
    FULL: [],
    "no ASL": ["objectives.asl.enabled=false"],
    "no SwAV": ["objectives.swav.enabled=false"],
    "no SimMIM": ["objectives.mim.enabled=false"],
    "no distillation": ["objectives.distill.enabled=false"],
}
# fine-tuning task -> its validation figure (val/<figure>; eval/<figure> for the dense tasks)
TASKS = {"objects": "top1", "scenes": "mAP", "detection": "bbox_AP", "segmentation": "mIoU"}
FT_RESULTS = {"finetune": "objects", "finetune_scenes": "scenes", "finetune_det": "detection",
              "finetune_seg": "segmentation"}  # results.json key -> task
DENSE = {"detection": "configs/det_demo.yaml", "segmentation": "configs/seg_demo.yaml"}  # task -> its config
SECOND = {"bbox_AP": "segm_AP", "mIoU": "aAcc"}  # what a dense task reports next to its figure
MULTILABEL_DATA_SEED = 1  # the multi-label fine-tuning scenes: another data seed than the pre-training's 0
LOSSES = ("loss", "asl", "swav", "mim", "distill")
KINDS = ("shape", "colour", "texture", "crowded")


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


def make_scenes(dest: Path, num_images: int, holdout: int, seed: int) -> None:
    if not (dest / "holdout.txt").is_file():
        subprocess.run([sys.executable, "-m", "hvpmtl", "data", "make-synthetic", "--out", str(dest), "--num-images",
                        str(num_images), "--holdout", str(holdout), "--seed", str(seed)],
                       check=True, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL)


def make_data(data: Path, args) -> None:
    """The pre-training scenes, the fine-tuning ImageFolder and the multi-label fine-tuning scenes of this
    --ft-train-images (each once)."""
    make_scenes(data, args.num_images, args.holdout, seed=0)
    make_scenes(multilabel_data(data, args), args.ft_train_images, args.holdout, seed=MULTILABEL_DATA_SEED)
    folder = finetune_data(data, args)
    if not (folder / "val").is_dir():
        from hvpmtl.data.tools.synthetic import write_imagefolder

        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        write_imagefolder(tmp, args.ft_train_images, args.holdout)
        tmp.rename(folder)  # whole or absent


def dense_data(data: Path, args) -> dict:
    """The dense fine-tuning data: the synthetic scenes' objects as COCO instances and ADE20K label maps
    (scenes of their own split ids, never seen in pre-training), --ft-train-images to train on, --dense-val to
    evaluate."""
    dest = data / f"dense_train{args.ft_train_images}_val{args.dense_val}"
    if not (dest / "ade20k" / "classes.txt").is_file():
        from hvpmtl.data.tools.synthetic import make_synthetic

        make_synthetic(dest, 1, seed=0, coco=True, coco_train=args.ft_train_images, coco_val=args.dense_val,
                       ade20k=True, ade20k_train=args.ft_train_images, ade20k_val=args.dense_val)
    coco = dest / "coco"
    return {"detection": [f"data.train_ann={coco / 'annotations/instances_train.json'}",
                          f"data.train_images={coco / 'train'}", f"data.val_ann={coco / 'annotations/instances_val.json'}",
                          f"data.val_images={coco / 'val'}"],
            "segmentation": [f"data.root={dest / 'ade20k'}"]}


def finetune_data(data: Path, args) -> Path:
    return data / f"objects_train{args.ft_train_images}_val{args.holdout}"


def multilabel_data(data: Path, args) -> Path:
    return data / f"scenes_seed{MULTILABEL_DATA_SEED}_train{args.ft_train_images}_val{args.holdout}"


def data_overrides(data: Path) -> list[str]:
    return [f"data.root={data}", f"data.list_file={data / 'train.txt'}", f"data.dictionary={data / 'dictionary.txt'}",
            f"data.holdout_list={data / 'holdout.txt'}"]


def tracking_sets(args) -> list[str]:
    return ["tracking.experiment=hvpmtl-results", f"tracking.tracking_uri=sqlite:///{args.out}/mlflow.db"]


def make_experiment(args) -> None:
    """The results' MLflow experiment, its artifacts under <out>/mlruns (not the working directory's)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{args.out}/mlflow.db")
    if client.get_experiment_by_name("hvpmtl-results") is None:
        client.create_experiment("hvpmtl-results", artifact_location=str(args.out / "mlruns"))


def launch(name: str, cmd: list[str], out: Path, done: Path, fresh: bool) -> None:
    """Run one training process unless `done` exists; `fresh`: a half-finished earlier attempt is removed first
    (pre-training saves no checkpoint before its end here, so it cannot be continued)."""
    if done.is_file():
        print(f"== {name}: done before ({out})", flush=True)
        return
    if fresh and out.exists():
        print(f"== {name}: removing an unfinished earlier attempt in {out}", flush=True)
        shutil.rmtree(out)
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train.log", "a") as log:
        code = subprocess.run(cmd, cwd=ROOT, env=env(), stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0 or not done.is_file():
        tail = "".join((out / "train.log").read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise SystemExit(f"{name}: failed with exit code {code}; the end of {out / 'train.log'}:\n{tail}")
    print(f"   {time.time() - t0:.0f} s", flush=True)


def python_cmd(script: str, config: str, sets: list[str], ranks: int) -> list[str]:
    cmd = [sys.executable, script, "--config", config]
    if ranks > 1:
        cmd = ["deepspeed", "--num_gpus", str(ranks), "--master_addr", "127.0.0.1", script, "--config", config]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def pretrain(name: str, seed: int, args, data: Path) -> Path:
    out = args.out / slug(name) / f"seed{seed}"
    sets = [f"run.output_dir={out}", f"optim.epochs={args.epochs}", f"optim.max_steps={args.steps}",
            f"optim.warmup_epochs={args.warmup_epochs}", "run.checkpoint_every=1000000", "run.image_log_every=0",
            "run.eval_every=0", f"run.seed={seed}", f"data.seed={seed}", "run.progress_bar=false",
            f"run.name=results-{slug(name)}-seed{seed}", *tracking_sets(args), *data_overrides(data),
            *args.overrides, *VARIANTS[name]]
    launch(f"{name}, seed {seed}", python_cmd("launchers/pretrain.py", args.config, sets, args.ranks), out,
           out / "backbone.safetensors", fresh=True)
    return out


def finetune_dir(args, task: str = "objects") -> Path:
    """One folder per fine-tuning task and budget: another budget is measured anew, pre-training and probes kept."""
    kind = "" if task == "objects" else f"{task}_"
    return args.out / f"finetune_{kind}{args.ft_train_images}img_{args.ft_epochs}ep_b{args.ft_batch}"


def ft_slug(name: str) -> str:
    return "random" if name == RANDOM else slug(name)


def finetune(name: str, seed: int, args, data: Path, task: str = "objects") -> Path:
    """End-to-end fine-tuning of a variant's student (seed `seed`; the full model by default) or of a random
    init, same recipe: single-label on the object images (task "objects") or multi-label on scenes of their
    own ("scenes")."""
    out = finetune_dir(args, task) / ft_slug(name) / f"seed{seed}"
    if name == RANDOM:
        init = ["model.random_init=true"]
    else:
        from hvpmtl.eval.export import export_run

        init_file = out.parent / f"init_seed{seed}.safetensors"
        if not init_file.is_file():
            export_run(args.out / slug(name) / f"seed{seed}", init_file, which="student")
        init = [f"model.init={init_file}"]
    if task in DENSE:  # the dense demos' recipes, at their own epochs and batch
        task_sets = dense_data(data, args)[task]
        sets = [f"run.output_dir={out}", f"model.img_size={args.img_size}", f"optim.epochs={args.dense_epochs}",
                f"run.seed={seed}", f"data.seed={seed}", f"run.name=results-{task}-{ft_slug(name)}-seed{seed}",
                *task_sets, "run.log_every=50", *tracking_sets(args), *init]
        launch(f"fine-tune {name} on {task}, seed {seed}", python_cmd("launchers/finetune.py", DENSE[task], sets,
                                                                     args.ranks),
               out, out / "model.safetensors", fresh=False)
        return out
    if task == "objects":
        folder = finetune_data(data, args)
        task_sets = [f"data.train_dir={folder / 'train'}", f"data.val_dir={folder / 'val'}"]
    else:
        scenes = multilabel_data(data, args)
        task_sets = [f"data.train_list={scenes / 'train.txt'}", f"data.val_list={scenes / 'holdout.txt'}",
                     f"data.root={scenes}", f"data.dictionary={scenes / 'dictionary.txt'}"]
    sets = [f"run.output_dir={out}", f"model.img_size={args.img_size}", f"optim.epochs={args.ft_epochs}",
            f"optim.micro_batch_size={args.ft_batch}", f"run.seed={seed}", f"data.seed={seed}",
            f"run.name=results-finetune-{task}-{ft_slug(name)}-seed{seed}", *task_sets,
            "run.log_every=50", f"run.checkpoint_every_epochs={max(1, args.ft_epochs // 4)}", *tracking_sets(args),
            *init]
    # a killed fine-tuning continues from its last checkpoint (resume=auto)
    launch(f"fine-tune {name} on {task}, seed {seed}",
           python_cmd("launchers/finetune.py", args.ft_config, sets, args.ranks),
           out, out / "model.safetensors", fresh=False)
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
    from hvpmtl.data.tools import synthetic_scenes as synthetic

    kinds = {"shape": {"round shape", "polygon", "spiky shape", *synthetic.SHAPES},
             "colour": {"warm colour", "cool colour", *synthetic.COLOURS},
             "texture": {"patterned", *synthetic.TEXTURES}, "crowded": {"crowded scene"}}
    names = [n for n, _ in synthetic.CLASSES]
    out = {}
    for kind, members in kinds.items():
        aps = [a for n, a in zip(names, class_ap) if n in members and not math.isnan(a)]
        out[kind] = sum(aps) / len(aps) if aps else float("nan")
    return out


def final_values(run_dir: Path, last: int = 10) -> dict[str, float]:
    """Mean over the last `last` logged values of each loss and of every collapse figure the run logged
    (swav/*, distill/*: code and prediction entropy, prototypes used, ... whatever this version writes);
    a key the run never logged is absent. `swav/ln_k` adds SwAV's loss over ln K (1 = the uniform point)."""
    series: dict[str, list[float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        for k, v in json.loads(line).items():
            if (k in LOSSES or k.startswith(("swav/", "distill/"))) and isinstance(v, (int, float)):
                series.setdefault(k, []).append(float(v))
    out = {k: sum(v[-last:]) / len(v[-last:]) for k, v in series.items()}
    if "swav" in out:
        from hvpmtl.config import load_config

        out["swav/ln_k"] = out["swav"] / math.log(load_config(run_dir / "config.yaml").model.num_prototypes)
    return out


def finetune_result(run_dir: Path, figure: str = "top1") -> dict:
    """The last epoch's validation figure (not the best epoch's: that would pick on the test split), and every
    epoch's (top1: single-label; mAP: multi-label)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    if figure in SECOND:  # a dense task: eval/<figure>, and its second figure beside it
        epochs = [r for r in rows if f"eval/{figure}" in r]
        second = SECOND[figure]
        return {figure: epochs[-1][f"eval/{figure}"], second: epochs[-1][f"eval/{second}"], "epochs": len(epochs),
                f"{figure}_per_epoch": [r[f"eval/{figure}"] for r in epochs]}
    epochs = [r for r in rows if f"val/{figure}" in r]
    return {figure: epochs[-1][f"val/{figure}"], "val_loss": epochs[-1]["val/loss"], "epochs": len(epochs),
            f"{figure}_per_epoch": [r[f"val/{figure}"] for r in epochs]}


def budget(args, data: Path) -> dict:
    """What the numbers depend on; a results.json measured at another budget is not continued."""
    count = lambda f: sum(1 for line in open(f) if line.strip())  # noqa: E731
    return {"config": args.config, "epochs": args.epochs, "steps": args.steps, "warmup_epochs": args.warmup_epochs,
            "img_size": args.img_size, "ranks": args.ranks, "probe": args.probe, "overrides": args.overrides,
            "train_images": count(data / "train.txt"), "holdout_images": count(data / "holdout.txt")}


def ft_budget(args) -> dict:
    return {"ft_config": args.ft_config, "ft_epochs": args.ft_epochs, "ft_batch": args.ft_batch,
            "ft_train_images": args.ft_train_images, "ft_data": "objects: colour-texture, 18 classes",
            "dense_epochs": args.dense_epochs, "dense_val": args.dense_val}


def commit() -> str:
    r = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


def load_results(path: Path, want: dict, want_ft: dict) -> dict:
    """results.json: the pre-training budget must match (else refused); fine-tuning results of another
    fine-tuning budget are set aside (kept under "finetune_earlier") and measured anew."""
    if not path.is_file():
        return {"budget": want, "ft_budget": want_ft, "commit": commit(), "probe": {}, **{k: {} for k in FT_RESULTS}}
    results = json.loads(path.read_text())
    if results.get("commit") != commit():  # code may differ; the budget alone is enforced
        print(f"note: {path} was begun at commit {results.get('commit')}, this is {commit()}", flush=True)
    if "budget" not in results:
        raise SystemExit(f"{path}: a table of an older results_table.py (one seed, no budget); give another --out")
    if results["budget"] != want:
        diff = {k: (results["budget"].get(k), v) for k, v in want.items() if results["budget"].get(k) != v}
        raise SystemExit(f"{path}: measured at another budget {diff} (was, now); give another --out or the same "
                         "options")
    if results.get("ft_budget") != want_ft:
        earlier = {k: results.pop(k) for k in FT_RESULTS if results.get(k)}
        if earlier:
            print(f"note: fine-tuning results of another fine-tuning budget {results.get('ft_budget')} set aside "
                  f"under finetune_earlier; measuring {want_ft}", flush=True)
            results.setdefault("finetune_earlier", []).append({"ft_budget": results.get("ft_budget"), **earlier})
        results["ft_budget"] = want_ft
    for k in FT_RESULTS:
        results.setdefault(k, {})
    return results


def save(path: Path, results: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(path)  # a kill while writing leaves the previous file whole


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of every run (model init, "
                   "augmentation and data order; the data set itself is seed 0 for all)")
    p.add_argument("--config", default="configs/demo_cpu.yaml")
    p.add_argument("--img-size", type=int, default=64, help="image size of pre-training, probes and fine-tuning")
    p.add_argument("--num-images", type=int, default=1500, help="training images of the synthetic data")
    p.add_argument("--holdout", type=int, default=500, help="held-out images of the synthetic data")
    p.add_argument("--epochs", type=int, default=2, help="pre-training epochs (the cosine schedule spans them)")
    p.add_argument("--steps", type=int, default=0, help="> 0: stop each pre-training after this many steps")
    p.add_argument("--warmup-epochs", type=float, default=0.1)
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--data", type=Path, default=None, help="synthetic data dir (default: <out>/data)")
    p.add_argument("--out", type=Path, default=Path("runs/results"))
    p.add_argument("--probe", choices=("train", "holdout"), default="train",
                   help="train: probes fit on the training list, tested on the held-out list; holdout: the "
                        "held-out list split in halves (the online evaluation's protocol)")
    p.add_argument("--only", nargs="*", default=None, help="variant slugs to pre-train (default: all)")
    p.add_argument("--asl-weight", type=float, default=0.5,
                   help="objectives.asl.weight for every run (0.001 x 11166 / 24 classes); negative: the config's")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every pre-training run (repeatable)")
    p.add_argument("--ft-config", default="configs/finetune_tiny.yaml")
    p.add_argument("--ft-epochs", type=int, default=20, help="fine-tuning epochs; 0: no fine-tuning")
    p.add_argument("--ft-train-images", type=int, default=150,
                   help="labelled images to fine-tune on (object-centric, 18 classes in turn; 150 = 10 %% of "
                        "--num-images, SwAV's semi-supervised protocol)")
    p.add_argument("--ft-batch", type=int, default=16, help="fine-tuning micro batch (lr scales with it)")
    p.add_argument("--dense-epochs", type=int, default=4,
                   help="epochs of the detection and segmentation fine-tunings (configs/det_demo.yaml, seg_demo.yaml)")
    p.add_argument("--dense-val", type=int, default=100, help="validation images of the dense fine-tunings")
    p.add_argument("--ft-tasks", nargs="*", default=list(TASKS), choices=list(TASKS),
                   help="fine-tuning tasks to run: objects (single-label), scenes (multi-label), detection, "
                        "segmentation")
    p.add_argument("--ft-variants", nargs="*", default=["full"],
                   help="variant slugs whose students are fine-tuned (next to a random init), among those pre-trained")
    args = p.parse_args(argv)
    args.out = args.out if args.out.is_absolute() else ROOT / args.out
    args.overrides = [f"model.img_size={args.img_size}", f"data.img_size={args.img_size}", *args.overrides]
    if args.asl_weight >= 0:
        args.overrides = [f"objectives.asl.weight={args.asl_weight}", *args.overrides]
    data = args.data or args.out / "data"
    data = data if data.is_absolute() else ROOT / data
    args.out.mkdir(parents=True, exist_ok=True)
    make_data(data, args)
    make_experiment(args)

    from hvpmtl.config import load_config
    from hvpmtl.eval.features import load_backbone

    results_file = args.out / "results.json"
    results = load_results(results_file, budget(args, data), ft_budget(args))
    cfg = load_config(ROOT / args.config, data_overrides(data))
    variants = [v for v in VARIANTS if args.only is None or slug(v) in args.only]
    for seed in args.seeds:
        s = str(seed)
        if s not in results["probe"].setdefault(RANDOM, {}):
            bb = load_backbone(backbone_name=cfg.model.backbone, img_size=args.img_size, random_init=True, seed=seed)
            results["probe"][RANDOM][s] = evaluate(bb, cfg, args.probe)
            save(results_file, results)
        for name in variants:
            run_dir = pretrain(name, seed, args, data)
            if s not in results["probe"].setdefault(name, {}):
                bb = load_backbone(run_dir=run_dir, which="student")
                r = evaluate(bb, load_config(run_dir / "config.yaml"), args.probe)
                r["final"] = final_values(run_dir)
                results["probe"][name][s] = r
                save(results_file, results)
        tuned = [RANDOM, *(v for v in variants if slug(v) in args.ft_variants)]
        for key, task in FT_RESULTS.items() if args.ft_epochs > 0 and len(tuned) > 1 else ():
            if task not in args.ft_tasks:
                continue
            for name in tuned:
                if s not in results[key].setdefault(name, {}):
                    run_dir = finetune(name, seed, args, data, task)
                    results[key][name][s] = finetune_result(run_dir, TASKS[task])
                    save(results_file, results)
    print(tables(results))
    return 0


# ----------------------------------------------------------------------------- the tables


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (nan for one value)."""
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else math.nan)


def pm(xs: list[float], digits: int = 1) -> str:
    if not xs:
        return "—"
    m, s = mean_std(xs)
    return f"{m:.{digits}f}" if math.isnan(s) else f"{m:.{digits}f} ± {s:.{digits}f}"


def delta(a: list[float], b: list[float]) -> str:
    """Difference of the means a - b, ± its noise sqrt(s_a² + s_b²), and how many of those it is."""
    if not a or not b:
        return "—"
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    d, s = ma - mb, math.hypot(sa, sb)
    if math.isnan(s):
        return f"{d:+.1f}"
    return f"{d:+.1f} ± {s:.1f} ({abs(d) / s:.1f}σ)" if s > 0 else f"{d:+.1f}"


def column(runs: dict, get) -> list[float]:
    out = []
    for r in runs.values():
        try:
            out.append(float(get(r)))
        except KeyError:
            pass
    return [x for x in out if not math.isnan(x)]


def tables(results: dict) -> str:
    probe = results["probe"]
    lin = {n: column(probe.get(n, {}), lambda r: r["linear_map"]) for n in [RANDOM, *VARIANTS]}
    lines = ["| backbone | seeds | linear-probe mAP | Δ vs random init | Δ vs full | kNN mAP | shape | colour | "
             "texture | crowded |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in [RANDOM, *VARIANTS]:
        runs = probe.get(name, {})
        if not runs:
            continue
        kinds = " | ".join(pm(column(runs, lambda r, k=k: r["groups"][k])) for k in KINDS)
        d_rand = "" if name == RANDOM else delta(lin[name], lin[RANDOM])
        d_full = "" if name in (RANDOM, FULL) else delta(lin[name], lin[FULL])
        lines.append(f"| {name} | {len(runs)} | {pm(lin[name])} | {d_rand} | {d_full} | "
                     f"{pm(column(runs, lambda r: r['knn_map']))} | {kinds} |")
    for key, task in FT_RESULTS.items():
        ft, fig = results.get(key), TASKS[task]
        if not ft:
            continue
        what = {"top1": "top-1 (%)", "mAP": "mAP (%)", "bbox_AP": "box AP (%)", "mIoU": "mIoU (%)"}[fig]
        second = SECOND.get(fig)
        extra = f" {second.replace('_', ' ')} (%), last epoch | Δ vs random init |" if second else ""
        lines += ["", f"| initialisation ({task}) | seeds | {what}, last epoch | Δ vs random init | "
                      "Δ vs full (same seeds) | "
                      f"{what}, first epoch | Δ vs random init | {what}, mean over epochs | Δ vs random init |"
                      f"{extra} linear-probe mAP | kNN mAP |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if second else "") + "---:|"]
        figures = {"last": lambda r, f=fig: r[f], "first": lambda r, f=fig: r[f"{f}_per_epoch"][0],
                   "mean": lambda r, f=fig: statistics.fmean(r[f"{f}_per_epoch"])}  # mean: area under the curve
        for name in [n for n in [RANDOM, *VARIANTS] if ft.get(n)]:
            runs = probe.get(name, {})
            cells = []
            for figure, get in figures.items():
                col, base = column(ft.get(name, {}), get), column(ft.get(RANDOM, {}), get)
                cells += [pm(col), "" if name == RANDOM else delta(col, base)]
                if figure == "last":  # what removing an objective does, against the full model's same seeds
                    full = {s: r for s, r in ft.get(FULL, {}).items() if s in ft.get(name, {})}
                    cells.append("" if name in (RANDOM, FULL) else delta(col, column(full, get)))
            if second:
                col, base = (column(ft.get(n, {}), lambda r: r[second]) for n in (name, RANDOM))
                cells += [pm(col), "" if name == RANDOM else delta(col, base)]
            lines.append(f"| {name} | {len(ft.get(name, {}))} | " + " | ".join(cells) +
                         f" | {pm(lin[name])} | {pm(column(runs, lambda r: r['knn_map']))} |")
    keys = []
    for name in VARIANTS:
        for r in probe.get(name, {}).values():
            keys += [k for k in r.get("final", {}) if k not in keys and k not in LOSSES]
    if keys:
        keys.sort(key=lambda k: (not k.startswith("swav"), k != "swav/ln_k", k))
        lines += ["", "| variant (last 10 logged steps) | SwAV loss | " + " | ".join(keys) + " |",
                  "|---|---:|" + "---:|" * len(keys)]
        for name in VARIANTS:
            runs = probe.get(name, {})
            if runs:
                cells = [pm(column(runs, lambda r, k=k: r["final"][k]), 3) for k in ["swav", *keys]]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    from provenance import provenance_line  # what the numbers below were measured with
    print(provenance_line(), flush=True)
    sys.exit(main())
