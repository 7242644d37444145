#!/usr/bin/env python
"""What brings SwAV off the uniform point? Short demo trainings, one per remedy, and their collapse figures.

Each variant is the demo model and data (configs/demo_cpu.yaml: ViT-Tiny at 96 px, 64 prototypes, the
synthetic scenes) trained by the real trainer (launchers/pretrain.py, 1 rank, DeepSpeed ZeRO-2 on the CPU) at
the demo's budget: global batch 32 (1 rank x 32 = the demo's 2 ranks x 16: the Sinkhorn codes and the
BatchNorm head use global-batch statistics, so the split does not matter), 186 steps = 2 epochs, with one
change to the config. From each run's metrics.jsonl it reports the SwAV loss / ln K, the normalised code and
prediction entropies, the prototypes used and the embedding std (hvpmtl/models/collapse.py), at a few steps and
averaged over the last 20 steps:

    nice -n 19 .venv/bin/python benchmarks/swav_study.py --out /tmp/swav_study            # all variants
    nice -n 19 .venv/bin/python benchmarks/swav_study.py --only baseline bn --seed 1       # some, another seed

A finished variant (its metrics.jsonl reaching the last step) is not run again, so an interrupted study resumes;
results go to <out>/study.json and the Markdown table (docs/DESIGN.md) to stdout. `--probe` adds a linear probe
(mAP on the held-out images, benchmarks/results_table.py's protocol) of each variant's student backbone.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from results_table import ROOT, data_overrides, launch, make_data

LN = ["model.proto_head_norm=layernorm"]
BN = ["model.proto_head_norm=batchnorm"]
# the demo's settings (configs/demo_cpu.yaml) chosen by this study
BEST = BN + ["data.color_jitter=0.0", "data.rand_augment_n=0", "objectives.swav.view1=unmasked",
             "objectives.swav.epsilon=0.03"]
# name -> (what it changes, --set overrides on top of the demo config as it was before the study)
VARIANTS = {
    "baseline": ("the demo before the study: LayerNorm head, masked view 1, eps 0.05, no freeze, no queue", LN),
    "freeze": ("prototypes frozen for the first epoch (93 steps)", LN + ["objectives.swav.freeze_prototypes_steps=93"]),
    "eps003": ("eps 0.03 (swav README's first remedy)", LN + ["objectives.swav.epsilon=0.03"]),
    "unmasked": ("SwAV on the unmasked view 1 (one more forward)", LN + ["objectives.swav.view1=unmasked"]),
    "queue": ("queue of 3 global batches (96 rows) from step 20: 128 rows per Sinkhorn for 64 prototypes",
              LN + ["objectives.swav.queue_length=96", "objectives.swav.queue_start_step=20"]),
    "k16": ("16 prototypes instead of 64", LN + ["model.num_prototypes=16"]),
    "bn": ("SwAV's Linear-BatchNorm-ReLU head, global-batch statistics", BN),
    "bn_freeze": ("BatchNorm head + prototypes frozen for the first epoch",
                  BN + ["objectives.swav.freeze_prototypes_steps=93"]),
    "bn_eps003": ("BatchNorm head + eps 0.03", BN + ["objectives.swav.epsilon=0.03"]),
    "bn_unmasked": ("BatchNorm head + SwAV on the unmasked view 1", BN + ["objectives.swav.view1=unmasked"]),
    "bn_queue": ("BatchNorm head + queue of 96 rows from step 20",
                 BN + ["objectives.swav.queue_length=96", "objectives.swav.queue_start_step=20"]),
    # the demo had K = d = 64: a square prototype matrix has a near-null direction (smallest singular value
    # 0.009 at init) where z scores ~0 against every prototype; SwAV has K = 3000 >> d = 128
    "d16": ("embedding dim 16 instead of 64 (K/d = 4)", LN + ["model.proto_out_dim=16"]),
    "d16_freeze": ("embedding dim 16 + prototypes frozen for the first epoch",
                   LN + ["model.proto_out_dim=16", "objectives.swav.freeze_prototypes_steps=93"]),
    "bn_d16": ("BatchNorm head + embedding dim 16", BN + ["model.proto_out_dim=16"]),
    "eps002": ("eps 0.02", LN + ["objectives.swav.epsilon=0.02"]),
    "bn_d16_unmasked": ("BatchNorm head + embedding dim 16 + SwAV on the unmasked view 1",
                        BN + ["model.proto_out_dim=16", "objectives.swav.view1=unmasked"]),
    # diagnostics, not remedies: which part of the multi-task set-up holds SwAV at the uniform point
    "diag_no_mim": ("diagnostic: SimMIM off (both views unmasked, no MIM gradient in the backbone)",
                    LN + ["objectives.mim.enabled=false"]),
    "diag_w1": ("diagnostic: SwAV weight 1.0 instead of 0.02", LN + ["objectives.swav.weight=1.0"]),
    "diag_swav_only": ("diagnostic: SwAV alone (SwAV's BatchNorm head, unmasked views, weight 1)",
                       BN + ["objectives.asl.enabled=false", "objectives.mim.enabled=false",
                             "objectives.distill.enabled=false", "objectives.swav.weight=1.0"]),
    # softer augmentation (swav README): at initialisation the ViT's pooled features of two views of one image
    # agree (double-centred correlation) 0.41 without colour jitter and ~0 with it (even at 0.2)
    "cj0": ("no colour jitter (data.color_jitter 0)", LN + ["data.color_jitter=0.0"]),
    "cj0_unmasked": ("no colour jitter + SwAV on the unmasked view 1",
                     LN + ["data.color_jitter=0.0", "objectives.swav.view1=unmasked"]),
    "bn_cj0_unmasked": ("BatchNorm head + no colour jitter + SwAV on the unmasked view 1",
                        BN + ["data.color_jitter=0.0", "objectives.swav.view1=unmasked"]),
    "bn_cj0": ("BatchNorm head + no colour jitter (masked view 1)", BN + ["data.color_jitter=0.0"]),
    "bn_cj0_unmasked_eps003": ("BatchNorm head + no colour jitter + unmasked view 1 + eps 0.03",
                               BN + ["data.color_jitter=0.0", "objectives.swav.view1=unmasked",
                                     "objectives.swav.epsilon=0.03"]),
    "bn_cj0_unmasked_d16": ("BatchNorm head + no colour jitter + unmasked view 1 + embedding dim 16",
                            BN + ["data.color_jitter=0.0", "objectives.swav.view1=unmasked", "model.proto_out_dim=16"]),
    "bn_cj0_unmasked_queue": ("BatchNorm head + no colour jitter + unmasked view 1 + queue of 96 from step 20",
                              BN + ["data.color_jitter=0.0", "objectives.swav.view1=unmasked",
                                    "objectives.swav.queue_length=96", "objectives.swav.queue_start_step=20"]),
    "bn_cj0_unmasked_eps002": ("BatchNorm head + no colour jitter + unmasked view 1 + eps 0.02",
                               BN + ["data.color_jitter=0.0", "objectives.swav.view1=unmasked",
                                     "objectives.swav.epsilon=0.02"]),
    "bn_cj0_norand_unmasked_eps003": ("BatchNorm head + no colour jitter, no RandAugment + unmasked view 1 + eps 0.03",
                                      BN + ["data.color_jitter=0.0", "data.rand_augment_n=0",
                                            "objectives.swav.view1=unmasked", "objectives.swav.epsilon=0.03"]),
    "bn_cj0_unmasked_eps002_queue": ("BatchNorm head + no colour jitter + unmasked view 1 + eps 0.02 + queue of 96 "
                                     "from step 20", BN + ["data.color_jitter=0.0", "objectives.swav.view1=unmasked",
                                                           "objectives.swav.epsilon=0.02",
                                                           "objectives.swav.queue_length=96",
                                                           "objectives.swav.queue_start_step=20"]),
    "bn_cj0_unmasked_eps002_freeze": ("BatchNorm head + no colour jitter + unmasked view 1 + eps 0.02 + prototypes "
                                      "frozen for the first epoch",
                                      BN + ["data.color_jitter=0.0", "objectives.swav.view1=unmasked",
                                            "objectives.swav.epsilon=0.02",
                                            "objectives.swav.freeze_prototypes_steps=93"]),
    # which parts of the best combination matter: one left out at a time
    "bn_cj0_norand_eps003": ("BatchNorm head + no colour jitter, no RandAugment + eps 0.03 (masked view 1)",
                             BN + ["data.color_jitter=0.0", "data.rand_augment_n=0", "objectives.swav.epsilon=0.03"]),
    "cj0_norand_unmasked_eps003": ("no colour jitter, no RandAugment + unmasked view 1 + eps 0.03 (LayerNorm head)",
                                   LN + ["data.color_jitter=0.0", "data.rand_augment_n=0",
                                         "objectives.swav.view1=unmasked", "objectives.swav.epsilon=0.03"]),
    "bn_cj0_norand_unmasked": ("BatchNorm head + no colour jitter, no RandAugment + unmasked view 1 (eps 0.05)",
                               BN + ["data.color_jitter=0.0", "data.rand_augment_n=0",
                                     "objectives.swav.view1=unmasked"]),
    "cj0_norand": ("no colour jitter, no RandAugment only", LN + ["data.color_jitter=0.0", "data.rand_augment_n=0"]),
    "bn_cj0_norand_unmasked_eps003_queue": ("the best + queue of 96 rows (128 per Sinkhorn) from step 20",
                                            BN + ["data.color_jitter=0.0", "data.rand_augment_n=0",
                                                  "objectives.swav.view1=unmasked", "objectives.swav.epsilon=0.03",
                                                  "objectives.swav.queue_length=96",
                                                  "objectives.swav.queue_start_step=20"]),
    "bn_cj0_norand_unmasked_eps003_freeze": ("the best + prototypes frozen for the first epoch",
                                             BN + ["data.color_jitter=0.0", "data.rand_augment_n=0",
                                                   "objectives.swav.view1=unmasked", "objectives.swav.epsilon=0.03",
                                                   "objectives.swav.freeze_prototypes_steps=93"]),
    # on top of the demo's chosen settings (BEST, configs/demo_cpu.yaml): the clamp, the queue, SwAV's weight
    "best_tmax_none": ("the demo's settings with SwAV's unclamped Sinkhorn (t_max null: at eps 0.03 the clamp "
                       "T_max = 10 makes every cosine above 0.3 score alike)", BEST + ["objectives.swav.t_max=null"]),
    "best_queue": ("the demo's settings + a queue of 96 rows from step 20 (128 rows per Sinkhorn for 64 prototypes)",
                   BEST + ["objectives.swav.queue_length=96", "objectives.swav.queue_start_step=20"]),
    "best_w01": ("the demo's settings with SwAV weight 0.1 instead of 0.02", BEST + ["objectives.swav.weight=0.1"]),
    "best_tmax_none_eps005": ("the demo's settings, unclamped, eps 0.05",
                              BEST[:-1] + ["objectives.swav.epsilon=0.05", "objectives.swav.t_max=null"]),
    "asl05": ("ASL weight 0.5 (the paper's 0.001 is per sum over 11,166 classes; 24 here: docs/RESULTS.md)",
              LN + ["objectives.asl.weight=0.5"]),
}
# settings the demo config had before the study, pinned so the variants stay comparable when it changes
BEFORE = ["data.color_jitter=0.4", "data.rand_augment_n=1", "objectives.swav.epsilon=0.05", "objectives.swav.t_max=10.0",
          "objectives.swav.weight=0.02", "objectives.swav.queue_length=0",
          "objectives.swav.queue_start_step=0", "objectives.swav.freeze_prototypes_steps=0",
          "objectives.swav.view1=masked", "model.num_prototypes=64", "model.proto_out_dim=64"]
FIGURES = ("swav/code_entropy", "swav/pred_entropy", "swav/protos_used", "swav/z_std", "swav/z_rank")


def run_variant(name: str, sets: list[str], args, data: Path) -> Path:
    out = args.out / f"{name}_seed{args.seed}"
    if _finished(out, args.steps):
        print(f"== {name}: done before ({out})", flush=True)
        return out
    common = [f"run.output_dir={out}", "optim.micro_batch_size=32", "optim.grad_accum_steps=1",
              f"optim.max_steps={args.steps}", "run.checkpoint_every=1000000", "run.image_log_every=0",
              "run.eval_every=0", f"run.seed={args.seed}", f"data.seed={args.seed}", "run.progress_bar=false",
              "run.log_every=10", "tracking.enabled=false", *data_overrides(data)]
    cmd = [sys.executable, "launchers/pretrain.py", "--config", args.config, "--resume", "none"]
    for s in common + BEFORE + sets + args.overrides:
        cmd += ["--set", s]
    t0 = time.time()
    # the final export marks a finished run; a half-finished one is removed and run again
    launch(name, cmd, out, out / "backbone.safetensors", fresh=True)
    (out / "wall_s").write_text(f"{time.time() - t0:.0f}\n")
    return out


def _rows(out: Path) -> list[dict]:
    f = out / "metrics.jsonl"
    if not f.is_file():
        return []
    by_step = {}
    for line in f.read_text().splitlines():
        r = json.loads(line)
        if "swav" in r:
            by_step[r["step"]] = r
    return [by_step[s] for s in sorted(by_step)]


def _finished(out: Path, steps: int) -> bool:
    rows = _rows(out)
    return bool(rows) and rows[-1]["step"] >= steps


def summarise(out: Path, num_prototypes: int, last: int = 20) -> dict:
    rows = _rows(out)
    ln_k = math.log(num_prototypes)
    tail = rows[-last:]
    mean = lambda key, rs: sum(r[key] for r in rs) / len(rs)  # noqa: E731
    res = {"steps": rows[-1]["step"], "ln_k": ln_k, "final": {"swav_over_ln_k": mean("swav", tail) / ln_k,
                                                              **{k: mean(k, tail) for k in FIGURES if k in tail[-1]}},
           "curve": {str(r["step"]): round(r["swav"] / ln_k, 4) for r in rows if r["step"] in (1, 10, 20, 40, 93, 140)
                     or r is rows[-1]},
           "linear_map": None}
    for k in ("asl", "mim", "distill"):
        if k in rows[-1]:
            res["final"][k] = mean(k, tail)
    wall = out / "wall_s"
    res["wall_s"] = int(wall.read_text()) if wall.is_file() else None
    return res


def table(results: dict) -> str:
    lines = ["| variant | SwAV loss / ln K | code entropy | pred. entropy | prototypes used | z std (×√d) | z rank | "
             "SwAV/ln K at step 20 → 93 | linear-probe mAP | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        f, c = r["final"], r["curve"]
        probe = f"{r['linear_map']:.1f}" if r.get("linear_map") is not None else "–"
        curve = " → ".join(f"{c[s]:.3f}" for s in ("20", "93") if s in c)
        rank = f"{f['swav/z_rank']:.1f}" if "swav/z_rank" in f else "–"
        lines.append(f"| {name} | {f['swav_over_ln_k']:.3f} | {f['swav/code_entropy']:.3f} | "
                     f"{f['swav/pred_entropy']:.3f} | {f['swav/protos_used']:.1f} | "
                     f"{f['swav/z_std'] * math.sqrt(r['embed_dim']):.2f} | {rank} | {curve} | {probe} | {r['wall_s']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/demo_cpu.yaml")
    p.add_argument("--steps", type=int, default=186, help="optimizer steps per variant (the demo's 2 epochs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", type=Path, default=Path("/tmp/hvpmtl_demo_data"),
                   help="the demo's synthetic data set (made here if missing)")
    p.add_argument("--out", type=Path, default=Path("runs/swav_study"))
    p.add_argument("--num-images", type=int, default=3000, help="synthetic training images when --data is made (the demo's)")
    p.add_argument("--holdout", type=int, default=600, help="synthetic held-out images when --data is made (the demo's)")
    p.add_argument("--only", nargs="*", default=None, help=f"variants to run, in this order (default all: {' '.join(VARIANTS)})")
    p.add_argument("--probe", action="store_true", help="also fit a linear probe on each variant's backbone")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every variant (repeatable)")
    args = p.parse_args(argv)
    args.out = args.out if args.out.is_absolute() else ROOT / args.out
    data = args.data if args.data.is_absolute() else ROOT / args.data
    make_data(data, args)
    unknown = set(args.only or ()) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; known: {' '.join(VARIANTS)}")

    results_file = args.out / f"study_seed{args.seed}.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    for name in args.only or VARIANTS:  # in the order given
        what, sets = VARIANTS[name]
        out = run_variant(name, sets, args, data)
        from hvpmtl.config import load_config
        cfg = load_config(out / "config.yaml")
        prev = results.get(name, {})
        r = summarise(out, cfg.model.num_prototypes)
        r.update(what=what, embed_dim=cfg.model.proto_out_dim, linear_map=prev.get("linear_map"))
        if args.probe and r["linear_map"] is None:
            from results_table import evaluate

            from hvpmtl.eval.features import load_backbone
            r["linear_map"] = evaluate(load_backbone(run_dir=out, which="student"), cfg, "train")["linear_map"]
        results[name] = r
        results_file.parent.mkdir(parents=True, exist_ok=True)
        results_file.write_text(json.dumps(results, indent=1))
    print(table(results))
    return 0


if __name__ == "__main__":
    from provenance import provenance_line  # what the numbers below were measured with
    print(provenance_line(), flush=True)
    sys.exit(main())
