"""`make bench-gpu`: everything worth measuring on one GPU, in under 8 minutes, as JSON + a markdown table.

Sections (each in its own process, under its own time budget, so one hang, crash or out-of-memory costs only its
budget):
  peak            bf16 matmul peak of the card (8192^3): the denominator of every MFU below
  data            synthetic JPEGs (~2x ImageNet size) as a list file and as webdataset shards
  dali            the DALI GPU pipeline alone at 224 px with the paper configs' augmentations (2 views + mask +
                  labels, RandAugment), from the list and from the shards
  step_<b>_<v>    the paper config of backbone <b> (vit: configs/pretrain_vit_b.yaml, swin: pretrain_swin_b.yaml),
                  its whole step (teacher, student, four objectives, DeepSpeed) fed by the DALI loader, in
                  variant <v>, each one change from `zero2` (the config as shipped: ZeRO-2, its own micro-batch, no
                  accumulation, view 1 unmasked for SwAV):
                    zero2   as shipped       zero1 / zero0   ZeRO stage 1 / no ZeRO (ds_configs/zero{1,0}.json)
                    accum   micro-batch 16 with accumulation to the same batch per optimizer step (16 x 8 for 128)
                    masked  objectives.swav.view1=masked (one backbone forward and backward less)
                  -> img/s, MFU (FLOPs per image counted with FlopCounterMode on this step), the share of the step
                     spent waiting for data, peak allocated and reserved memory
  kernels         benchmarks/kernels.py --check (Triton kernels against float64 references)

    python benchmarks/bench_gpu.py --out bench_gpu/          # on a GPU (make bench-gpu)
    python benchmarks/bench_gpu.py --tiny --out /tmp/b       # CPU, tiny models, CPU DALI, Triton interpreter:
                                                             # the same code paths, in the tests
Writes OUT/bench_gpu.json and OUT/bench_gpu.md. Exit code 0 when every section ran and every kernel check
passed, 1 otherwise (the files are written either way).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _bootstrap import ROOT, import_package  # noqa: E402
from provenance import provenance  # noqa: E402

# the step variants: (backbone, ZeRO stage, batching, SwAV's view 1); each is one change from "zero2"
STEP_VARIANTS = {
    f"step_{b}_{v}": (b, stage, batching, view1) for b in ("vit", "swin")
    for v, stage, batching, view1 in (("zero2", 2, "micro", "unmasked"), ("zero1", 1, "micro", "unmasked"),
                                      ("zero0", 0, "micro", "unmasked"), ("accum", 2, "accum", "unmasked"),
                                      ("masked", 2, "micro", "masked"))}
# seconds per section on one GPU; the sum stays under 8 minutes with the start-up of each process included
BUDGET_S = {"peak": 10, "data": 25, "dali": 35,
            **{k: 30 if v[0] == "vit" else 38 for k, v in STEP_VARIANTS.items()}, "kernels": 30, "dense": 40}
SECTIONS = list(BUDGET_S)
TOTAL_LIMIT_S = 480

# what each section runs: full size on the GPU, tiny on the CPU. "micro": the micro-batch of the variants
# without accumulation (None: the config's own optim.micro_batch_size); "accum_micro": the accumulation variant's
FULL = {"vit": dict(config="configs/pretrain_vit_b.yaml", sets=[], micro=None, accum_micro=16, steps=4, warmup=2),
        "swin": dict(config="configs/pretrain_swin_b.yaml", sets=[], micro=None, accum_micro=16, steps=4, warmup=2),
        "data": dict(num_images=1024, upscale=2.0, shard_size=256, batch=128, batches=12, warmup=3, threads=8,
                     img_size=224, config="configs/pretrain_vit_b.yaml")}
# tiny steps: no warm-up (the FLOP-counted step comes first), and no RandAugment in their loader: its DALI graph
# (seconds to build on the CPU, in every step process) is the dali section's, which runs it in the same report
_TINY_HEADS = ["data.num_classes=24", "data.rand_augment_n=0"]
TINY = {"vit": dict(config="configs/test_tiny.yaml", micro=2, accum_micro=1, steps=1, warmup=0,
                    sets=["model.backbone=vit_tiny_patch16_224", "model.img_size=32", "data.img_size=32",
                          *_TINY_HEADS]),
        "swin": dict(config="configs/test_tiny.yaml", micro=2, accum_micro=1, steps=1, warmup=0,
                     sets=["model.backbone=swin_tiny_patch4_window7_224", "model.img_size=64", "data.img_size=64",
                           *_TINY_HEADS]),
        "data": dict(num_images=16, upscale=1.0, shard_size=8, batch=4, batches=2, warmup=1, threads=1, img_size=64,
                     config="configs/pretrain_vit_b.yaml")}


def _sync(device) -> None:
    import torch
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- sections (each in a child process)
def section_peak(tiny: bool) -> dict:
    import torch
    cuda = torch.cuda.is_available() and not tiny
    n, dtype, dev = (8192, torch.bfloat16, "cuda") if cuda else (256, torch.float32, "cpu")
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(dev)
    times = []
    for _ in range(20 if cuda else 3):
        t0 = time.perf_counter()
        for _ in range(5):
            a @ b
        _sync(dev)
        times.append((time.perf_counter() - t0) / 5)
    t = statistics.median(times)
    return {"n": n, "dtype": str(dtype)[6:], "device": torch.cuda.get_device_name() if cuda else "cpu",
            "tflops": 2 * n**3 / t / 1e12}


def section_data(tiny: bool, work: Path) -> dict:
    import data_pipeline

    from hvpmtl.data.tools.to_shards import write_shards
    spec = (TINY if tiny else FULL)["data"]
    t0 = time.perf_counter()
    lst, root = data_pipeline.make_data(work / "images", spec["num_images"], spec["upscale"])
    write_shards(lst, root, str(work / "shards"), spec["shard_size"], num_classes=24)
    return {"list_file": lst, "root": root, "shards": str(work / "shards"), "images": spec["num_images"],
            "seconds": time.perf_counter() - t0}


def _on_gpu(tiny: bool) -> bool:
    import torch
    return torch.cuda.is_available() and not tiny


def _data_sets(tiny: bool, data: dict, fmt: str) -> list[str]:
    """Overrides that point a paper config's data section at the generated data set (its augmentations kept)."""
    spec = (TINY if tiny else FULL)["data"]
    return [f"data.format={fmt}", f"data.root={data['root']}", f"data.list_file={data['list_file']}",
            f"data.shards={data['shards']}", "data.dictionary=''", "data.index=''", "data.index_auto_build=1000000",
            "data.skip_list=''", "data.holdout_list=''", f"data.num_threads={spec['threads']}",
            f"data.device={'gpu' if _on_gpu(tiny) else 'cpu'}"]


def section_dali(tiny: bool, data: dict) -> dict:
    """DALI alone at the paper configs' augmentations (crop, flip, colour jitter, rotation, RandAugment n=2 m=9;
    tiny: at 64 px on the CPU)."""
    import torch

    import data_pipeline
    from hvpmtl.config import load_config
    spec = (TINY if tiny else FULL)["data"]
    out = {}
    for fmt in ("tencent", "shards"):
        cfg = load_config(ROOT / spec["config"], [*_data_sets(tiny, data, fmt), f"data.img_size={spec['img_size']}",
                                                  f"model.img_size={spec['img_size']}", "data.num_classes=24"]).data
        dtype = torch.float32 if cfg.device == "cpu" else torch.bfloat16
        ips, info = data_pipeline.bench_dali(cfg, spec["batch"], spec["batches"], spec["warmup"], 16, dtype)
        out["list" if fmt == "tencent" else "shards"] = {
            "img_per_s": ips, "device": cfg.device, "batch": spec["batch"], "img_size": cfg.img_size,
            "rand_augment_n": cfg.rand_augment_n, "rand_augment_m": cfg.rand_augment_m,
            "rotation_deg": cfg.rotation_deg, "color_jitter": cfg.color_jitter, "info": info}
    return out


def load_paper_config(which: str, tiny: bool = False):
    from hvpmtl.config import load_config
    spec = (TINY if tiny else FULL)[which]
    return load_config(ROOT / spec["config"], spec["sets"])


def step_config(tiny: bool, name: str, data: dict, out_dir: str):
    """The experiment config of step variant `name`: the paper config (tiny: test_tiny's heads on a tiny backbone)
    fed by the generated data through DALI, at one rank, with the variant's ZeRO stage, batching and view 1."""
    from hvpmtl.config import load_config
    which, stage, batching, view1 = STEP_VARIANTS[name]
    spec = (TINY if tiny else FULL)[which]
    shipped = load_paper_config(which, tiny)
    micro = spec["micro"] or shipped.optim.micro_batch_size
    micro, accum = (micro, 1) if batching == "micro" else (spec["accum_micro"], micro // spec["accum_micro"])
    return load_config(ROOT / spec["config"], [
        *spec["sets"], *_data_sets(tiny, data, "tencent"), f"run.output_dir={out_dir}",
        f"run.ds_config={ROOT / 'ds_configs' / f'zero{stage}.json'}",
        f"run.precision={'bf16' if _on_gpu(tiny) else 'fp32'}",
        "tracking.enabled=false", "run.progress_bar=false", f"optim.micro_batch_size={micro}",
        f"optim.grad_accum_steps={accum}", "optim.global_batch_size=0", f"objectives.swav.view1={view1}"])


def section_step(tiny: bool, name: str, peak: float, data: dict) -> dict:
    """One step variant fed by the DALI loader: warm-up, one optimizer step under FlopCounterMode (FLOPs per
    image), then timed optimizer steps; data wait = time blocked on the loader (each micro-batch reads the
    device once, so the host cannot run ahead of the GPU and hide it)."""
    import resource

    import torch

    import flops
    from hvpmtl.train.pretrain import Pretrainer
    spec = (TINY if tiny else FULL)[STEP_VARIANTS[name][0]]
    cfg = step_config(tiny, name, data, tempfile.mkdtemp(prefix="hvpmtl-bench-"))
    t = Pretrainer(cfg, resume="none")
    micro, accum = cfg.optim.micro_batch_size, cfg.optim.grad_accum_steps
    step_no = cfg.objectives.swav.freeze_prototypes_steps  # the steady state: prototypes no longer frozen

    def batches():
        epoch = 0
        while True:
            t.loader.set_epoch(epoch)
            yield from t.loader
            epoch += 1
    it = batches()

    def optimizer_step() -> float:
        wait = 0.0
        for _ in range(accum):
            t0 = time.perf_counter()
            batch = next(it)
            wait += time.perf_counter() - t0
            r = t.meta.forward_backward(batch, step=step_no)
            assert not r.nonfinite, r.nonfinite
        assert r.boundary
        t.meta.update_teacher(t.momentum[0])
        return wait

    for _ in range(spec["warmup"]):
        optimizer_step()
    with flops.flop_counter() as counter:
        optimizer_step()
    flop_per_image = counter.get_total_flops() / (micro * accum)
    _sync(t.device)
    if t.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(t.device)
    times, waits = [], []
    for _ in range(spec["steps"]):
        t0 = time.perf_counter()
        waits.append(optimizer_step())
        _sync(t.device)
        times.append(time.perf_counter() - t0)
    if t.device.type == "cuda":
        mem = torch.cuda.max_memory_allocated(t.device) / 2**30
        reserved = torch.cuda.max_memory_reserved(t.device) / 2**30
    else:  # the process's peak RSS: an upper bound of what the step holds on the CPU
        mem = reserved = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    img_per_s = micro * accum * len(times) / sum(times)
    m = cfg.model
    return {"variant": name.split("_", 2)[2], "backbone": m.backbone, "img_size": m.img_size,
            "zero_stage": t.engine.zero_optimization_stage(), "micro": micro, "accum": accum,
            "view1": cfg.objectives.swav.view1, "classes": cfg.data.num_classes,
            "decoder": f"{m.decoder_layers} layers, "
                       + (f"{m.decoder_groups} groups" if m.decoder_groups else "per class"),
            "precision": t.precision, "img_per_s": img_per_s, "step_ms": 1e3 * statistics.median(times),
            "tflop_per_image": flop_per_image / 1e12, "achieved_tflops": flop_per_image * img_per_s / 1e12,
            "mfu": flop_per_image * img_per_s / (peak * 1e12) if peak else None, "peak_tflops": peak or None,
            "data_wait_frac": sum(waits) / sum(times), "peak_mem_gib": mem, "reserved_gib": reserved,
            "data_device": cfg.data.device}


def section_kernels(tiny: bool) -> dict:
    cmd = [sys.executable, str(HERE / "kernels.py"), "--check"] + (["--tiny"] if tiny else [])
    env = dict(os.environ, **({"TRITON_INTERPRET": "1"} if tiny else {}))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=BUDGET_S["kernels"] * (4 if tiny else 1))
    lines = p.stdout.strip().splitlines()
    summary = next((x for x in reversed(lines) if x.endswith(" FAIL")), "")
    fails = [x for x in lines if x.startswith("FAIL")]
    rows = int(summary.split()[0]) if summary else 0
    return {"rc": p.returncode, "rows": rows, "failed": len(fails), "fail_rows": fails[:20],
            "summary": summary or (p.stderr.strip().splitlines() or ["no output"])[-1]}


def section_dense(tiny: bool) -> dict:
    """The paper's dense fine-tunings, one training step at the recipes' 2 images per GPU (benchmarks/dense_step.py):
    Mask R-CNN 1x and UperNet 160k on Swin-B; img/s and peak memory."""
    cmd = [sys.executable, str(HERE / "dense_step.py"), "--warmup", "0" if tiny else "2",
           "--steps", "1" if tiny else "5"] + (["--tiny", "--device", "cpu"] if tiny else ["--device", "cuda"])
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=BUDGET_S["dense"] * (6 if tiny else 1))
    rows = [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")]
    return {"rc": p.returncode, "rows": rows,
            "error": "" if p.returncode == 0 else (p.stderr.strip().splitlines() or ["no output"])[-1]}


def run_section(name: str, tiny: bool, work: Path, peak: float, data: dict) -> dict:
    import_package()
    if name == "peak":
        return section_peak(tiny)
    if name in STEP_VARIANTS:
        return section_step(tiny, name, peak, data)
    if name == "data":
        return section_data(tiny, work)
    if name == "dali":
        return section_dali(tiny, data)
    if name == "kernels":
        return section_kernels(tiny)
    if name == "dense":
        return section_dense(tiny)
    raise SystemExit(f"unknown section {name}")


# ----------------------------------------------------------------------------- the report
def _f(x, fmt="{:.1f}"):
    return fmt.format(x) if isinstance(x, (int, float)) else "n/a"


def markdown(report: dict) -> str:
    r, s = report, report["sections"]
    out = [f"# bench-gpu ({'tiny, CPU' if r['tiny'] else 'full'}) — {r['device']}, {r['date']}", "",
           f"`{r['command']}`; {r['elapsed_s']:.0f} s of {TOTAL_LIMIT_S} s", "",
           f"code {r['provenance']['revision']}; " + ", ".join(f"{k} {v}" for k, v in r['provenance']['versions'].items()),
           "",
           "| section | result | seconds (budget) |", "|---|---|---|"]

    def row(name, text):
        if name not in s:  # not asked for (--sections)
            return
        sec = s[name]
        status = sec.get("error")
        out.append(f"| {name} | {('FAILED: ' + status) if status else text} | "
                   f"{_f(sec.get('seconds'), '{:.0f}')} ({r['budget_s'].get(name, BUDGET_S[name])}) |")
    pk = s.get("peak", {}).get("result", {})
    row("peak", f"{_f(pk.get('tflops'))} TFLOP/s ({pk.get('dtype')} matmul {pk.get('n')}³)")
    d = s.get("data", {}).get("result", {})
    row("data", f"{d.get('images')} JPEGs as a list file and as shards")
    dl = s.get("dali", {}).get("result", {})
    row("dali", " / ".join(f"{k}: {_f(v.get('img_per_s'))} img/s ({v.get('device')}, {v.get('img_size')} px, "
                           f"RandAugment n={v.get('rand_augment_n')} m={v.get('rand_augment_m')})"
                           for k, v in dl.items()) or "n/a")
    for name in STEP_VARIANTS:
        x = s.get(name, {}).get("result", {})
        row(name, f"{x.get('backbone')}: **{_f(x.get('img_per_s'))} img/s**, MFU {_pct(x.get('mfu'))}"
                  if x else "n/a")
    k = s.get("kernels", {}).get("result", {})
    row("kernels", f"{k.get('rows')} checks, {k.get('failed')} FAIL" + (
        "" if not k.get("fail_rows") else ": " + "; ".join(k["fail_rows"][:3])))
    dn = s.get("dense", {}).get("result", {})
    row("dense", " / ".join(f"{x['row']} {x['backbone']} {x['size']} x{x['batch']}: {_f(x['img_per_s'])} img/s, "
                            f"{_f(x['mem_gib'])} GiB" for x in dn.get("rows", [])) or f"n/a {dn.get('error', '')}")
    out += ["", "## The step: paper configs, one change at a time", "",
            "| backbone | variant | ZeRO | micro x accum | view 1 | decoder | img/s | step ms | TFLOP/img | MFU | "
            "data wait | peak GiB | reserved GiB |", "|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, (which, stage, batching, view1) in STEP_VARIANTS.items():
        if name not in s:
            continue
        sec = s[name]
        x = sec.get("result")
        if not x:
            out.append(f"| {which} | {name.split('_', 2)[2]} | {stage} | {batching} | {view1} | | "
                       f"FAILED: {sec.get('error', 'not run')} | | | | | | |")
            continue
        out.append(f"| {x['backbone']} {x['img_size']} | {x['variant']} | {x['zero_stage']} | "
                   f"{x['micro']} x {x['accum']} | "
                   f"{x['view1']} | {x['decoder']} | **{_f(x['img_per_s'])}** | {_f(x['step_ms'])} | "
                   f"{_f(x['tflop_per_image'], '{:.3f}')} | {_pct(x.get('mfu'))} | {_pct(x['data_wait_frac'])} | "
                   f"{_f(x['peak_mem_gib'])} | {_f(x['reserved_gib'])} |")
    return "\n".join(out) + "\n"


def _pct(x) -> str:
    return f"{100 * x:.1f}%" if isinstance(x, (int, float)) else "n/a"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", default="bench_gpu", help="folder for bench_gpu.json and bench_gpu.md (default: %(default)s)")
    p.add_argument("--tiny", action="store_true", help="CPU: tiny models, CPU DALI, Triton interpreter (for the tests)")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset (default: all)")
    p.add_argument("--section", help=argparse.SUPPRESS)  # internal: run one section in this process
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--peak", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--data", default="{}", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.section:
        result = run_section(a.section, a.tiny, Path(a.work), a.peak, json.loads(a.data))
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    import torch
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="hvpmtl-bench-gpu-"))
    scale = 6 if a.tiny else 1  # the CPU is slower, not the budget's owner: the tiny run only proves the paths
    wanted = a.sections.split(",")
    print("budget per section (s): " + ", ".join(f"{k} {BUDGET_S[k] * scale}" for k in wanted)
          + f"; total {sum(BUDGET_S[k] for k in wanted) * scale} (limit {TOTAL_LIMIT_S * scale})", flush=True)
    report = {"tiny": a.tiny, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "command": " ".join(["python", "benchmarks/bench_gpu.py", *(argv if argv is not None else sys.argv[1:])]),
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() and not a.tiny else "cpu",
              "torch": torch.__version__, "provenance": provenance(), "budget_s": {k: BUDGET_S[k] * scale for k in wanted},
              "sections": {}}
    # each section is a world of one rank: not the rendezvous of whatever process started this one
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONUNBUFFERED"] = "1"
    if a.tiny:
        env.update(TRITON_INTERPRET="1", DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    else:
        env.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    t_all = time.perf_counter()
    peak, data, ok = 0.0, {}, True
    for name in wanted:
        budget = BUDGET_S[name] * scale
        cmd = [sys.executable, __file__, "--section", name, "--work", str(work), "--peak", str(peak),
               "--data", json.dumps(data)] + (["--tiny"] if a.tiny else [])
        t0 = time.perf_counter()
        entry: dict = {}
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=budget)
            (out / f"{name}.log").write_text(proc.stdout + proc.stderr)
            found = [line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode == 0 and found:
                entry["result"] = json.loads(found[-1])
            else:
                tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines() or ["no output"]
                entry["error"] = f"exit {proc.returncode}: {tail[-1][:300]}"
        except subprocess.TimeoutExpired as e:
            (out / f"{name}.log").write_text((e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes)
                                             else (e.stdout or ""))
            entry["error"] = f"over its budget of {budget} s"
        entry["seconds"] = time.perf_counter() - t0
        report["sections"][name] = entry
        res = entry.get("result", {})
        if name == "peak":
            peak = res.get("tflops", 0.0)
        if name == "data":
            data = res
        if name == "kernels" and (res.get("failed") or res.get("rc")):
            ok = False
        ok = ok and "error" not in entry
        print(f"{name}: {entry['seconds']:.0f} s of {budget} s — "
              f"{'ok' if 'error' not in entry else entry['error']}", flush=True)
    report["elapsed_s"] = time.perf_counter() - t_all
    (out / "bench_gpu.json").write_text(json.dumps(report, indent=1))
    md = markdown(report)
    (out / "bench_gpu.md").write_text(md)
    print(md)
    print(f"written: {out / 'bench_gpu.json'}, {out / 'bench_gpu.md'}")
    return 0 if ok else 1


if __name__ == "__main__":
    from provenance import provenance_line  # what the numbers below were measured with
    print(provenance_line(), flush=True)
    sys.exit(main())
