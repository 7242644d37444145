"""`make bench-gpu`: everything worth measuring on one GPU, in under 8 minutes, as JSON + a markdown table.

Sections (each in its own process, under its own time budget, so one hang or crash costs only its budget):
  peak        bf16 matmul peak of the card (8192^3, CUDA events): the denominator of every MFU below
  step_vit    ViT-B/16 full HVP-MTL step under ZeRO-2 (benchmarks/train_step.py): img/s, MFU, peak memory
  step_swin   Swin-B, the same
  data        synthetic JPEGs (~2x ImageNet size) as a list file and as webdataset shards
  dali        the DALI GPU pipeline alone (2 views + mask + labels, RandAugment on), from the list and the shards
  dali_loop   the ViT-B step fed by DALI vs the same step on a batch already on the GPU: the slowdown
  kernels     benchmarks/kernels.py --check (Triton kernels against float64 references)

    python benchmarks/bench_gpu.py --out bench_gpu/          # on a GPU (make bench-gpu)
    python benchmarks/bench_gpu.py --tiny --out /tmp/b       # CPU, tiny model, CPU DALI, Triton interpreter:
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

# seconds per section on one GPU; the sum stays under 8 minutes with the start-up of each process included
BUDGET_S = {"peak": 30, "step_vit": 100, "step_swin": 100, "data": 40, "dali": 60, "dali_loop": 90, "kernels": 50}
SECTIONS = list(BUDGET_S)
TOTAL_LIMIT_S = 480

# what each section runs: full size on the GPU, tiny on the CPU
FULL = {"vit": dict(backbone="vit_base_patch16_224", batch=128, img_size=224, classes=11166, decoder_groups=128,
                    decoder_layers=2, steps=8, warmup=3),
        "swin": dict(backbone="swin_base_patch4_window7_224", batch=64, img_size=224, classes=11166,
                     decoder_groups=128, decoder_layers=2, steps=8, warmup=3),
        "data": dict(num_images=1024, upscale=2.0, shard_size=256, batch=128, batches=12, warmup=3, threads=8),
        "loop": dict(steps=8, warmup=3)}
TINY = {"vit": dict(backbone="vit_tiny_patch16_224", batch=2, img_size=32, classes=24, decoder_groups=0,
                    decoder_layers=1, steps=1, warmup=1, config="configs/test_tiny.yaml"),
        "swin": dict(backbone="swin_tiny_patch4_window7_224", batch=2, img_size=64, classes=24, decoder_groups=0,
                     decoder_layers=1, steps=1, warmup=1, config="configs/test_tiny.yaml"),
        "data": dict(num_images=16, upscale=1.0, shard_size=8, batch=4, batches=2, warmup=1, threads=1),
        "loop": dict(steps=1, warmup=1)}


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


def _train_step_args(spec: dict, peak: float, precision: str):
    import train_step
    args = ["--backbone", spec["backbone"], "--batch", str(spec["batch"]), "--img-size", str(spec["img_size"]),
            "--classes", str(spec["classes"]), "--decoder-groups", str(spec["decoder_groups"]),
            "--decoder-layers", str(spec["decoder_layers"]), "--steps", str(spec["steps"]),
            "--warmup", str(spec["warmup"]), "--precision", precision, "--peak-tflops", str(peak)]
    if spec.get("config"):
        args += ["--config", str(ROOT / spec["config"])]
    p = argparse.ArgumentParser()
    train_step.add_arguments(p)
    return p.parse_args(args)


def section_step(tiny: bool, which: str, peak: float) -> dict:
    import torch

    import train_step
    spec = (TINY if tiny else FULL)[which]
    a = _train_step_args(spec, peak, "fp32" if tiny or not torch.cuda.is_available() else "bf16")
    return train_step.run(a, "zero2")


def section_data(tiny: bool, work: Path) -> dict:
    import data_pipeline

    from hvpmtl.data.shards import write_shards
    spec = (TINY if tiny else FULL)["data"]
    t0 = time.perf_counter()
    lst, root = data_pipeline.make_data(work / "images", spec["num_images"], spec["upscale"])
    write_shards(lst, root, str(work / "shards"), spec["shard_size"], num_classes=24)
    return {"list_file": lst, "root": root, "shards": str(work / "shards"), "images": spec["num_images"],
            "seconds": time.perf_counter() - t0}


def _data_cfg(tiny: bool, data: dict, fmt: str, img_size: int):
    import torch

    from hvpmtl.config import DataConfig
    spec = (TINY if tiny else FULL)["data"]
    return DataConfig(format=fmt, root=data["root"], list_file=data["list_file"], shards=data["shards"],
                      num_classes=24, img_size=img_size, num_threads=spec["threads"], rand_augment_n=2,
                      mask_patch_size=32, device="cpu" if tiny or not torch.cuda.is_available() else "gpu")


def section_dali(tiny: bool, data: dict) -> dict:
    import torch

    import data_pipeline
    spec = (TINY if tiny else FULL)["data"]
    img = 64 if tiny else 224
    out = {}
    for fmt in ("tencent", "shards"):
        cfg = _data_cfg(tiny, data, fmt, img)
        dtype = torch.float32 if cfg.device == "cpu" else torch.bfloat16
        ips, info = data_pipeline.bench_dali(cfg, spec["batch"], spec["batches"], spec["warmup"], 16, dtype)
        out["list" if fmt == "tencent" else "shards"] = {"img_per_s": ips, "device": cfg.device, "batch": spec["batch"],
                                                         "rand_augment_n": cfg.rand_augment_n, "info": info}
    return out


def section_dali_loop(tiny: bool, data: dict, peak: float) -> dict:
    """The ViT step fed by the DALI loader, then the same step on the last batch again (already on the device):
    the ratio is what the input pipeline costs the step."""
    import torch

    import train_step
    from hvpmtl.train.pretrain import Pretrainer
    spec = (TINY if tiny else FULL)["vit"]
    loop = (TINY if tiny else FULL)["loop"]
    a = _train_step_args(spec, peak, "fp32" if tiny or not torch.cuda.is_available() else "bf16")
    cfg = train_step.make_cfg(a, tempfile.mkdtemp(prefix="hvpmtl-bench-"))
    dc = _data_cfg(tiny, data, "tencent", spec["img_size"])
    for k in ("format", "root", "list_file", "num_threads", "rand_augment_n", "device", "mask_patch_size"):
        setattr(cfg.data, k, getattr(dc, k))
    t = Pretrainer(cfg, resume="none")

    def batches():
        epoch = 0
        while True:
            t.loader.set_epoch(epoch)
            yield from t.loader
            epoch += 1

    def step(batch):
        assert not t.meta.forward_backward(batch, step=1).nonfinite
        t.meta.update_teacher(t.momentum[1])

    it = batches()
    batch = None
    for _ in range(loop["warmup"]):
        batch = next(it)
        step(batch)
    _sync(t.device)
    t0 = time.perf_counter()
    for _ in range(loop["steps"]):
        batch = next(it)
        step(batch)
    _sync(t.device)
    fed = (time.perf_counter() - t0) / loop["steps"]
    t0 = time.perf_counter()
    for _ in range(loop["steps"]):
        step(batch)
    _sync(t.device)
    synthetic = (time.perf_counter() - t0) / loop["steps"]
    b = cfg.optim.micro_batch_size
    return {"backbone": cfg.model.backbone, "batch": b, "dali_device": cfg.data.device,
            "img_per_s_dali": b / fed, "img_per_s_synthetic": b / synthetic, "slowdown": fed / synthetic}


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


def run_section(name: str, tiny: bool, work: Path, peak: float, data: dict) -> dict:
    import_package()
    if name == "peak":
        return section_peak(tiny)
    if name == "step_vit":
        return section_step(tiny, "vit", peak)
    if name == "step_swin":
        return section_step(tiny, "swin", peak)
    if name == "data":
        return section_data(tiny, work)
    if name == "dali":
        return section_dali(tiny, data)
    if name == "dali_loop":
        return section_dali_loop(tiny, data, peak)
    if name == "kernels":
        return section_kernels(tiny)
    raise SystemExit(f"unknown section {name}")


# ----------------------------------------------------------------------------- the report
def _f(x, fmt="{:.1f}"):
    return fmt.format(x) if isinstance(x, (int, float)) else "n/a"


def markdown(report: dict) -> str:
    r, s = report, report["sections"]
    out = [f"# bench-gpu ({'tiny, CPU' if r['tiny'] else 'full'}) — {r['device']}, {r['date']}", "",
           f"`{r['command']}`; torch {r['torch']}; {r['elapsed_s']:.0f} s of {TOTAL_LIMIT_S} s", "",
           "| section | result | seconds (budget) |", "|---|---|---|"]

    def row(name, text):
        sec = s.get(name, {})
        status = sec.get("error")
        out.append(f"| {name} | {('FAILED: ' + status) if status else text} | "
                   f"{_f(sec.get('seconds'), '{:.0f}')} ({BUDGET_S[name]}) |")
    pk = s.get("peak", {}).get("result", {})
    row("peak", f"{_f(pk.get('tflops'))} TFLOP/s ({pk.get('dtype')} matmul {pk.get('n')}³)")
    for name in ("step_vit", "step_swin"):
        x = s.get(name, {}).get("result", {})
        mfu = f"{100 * x['mfu']:.1f}%" if x.get("mfu") else "n/a"
        row(name, f"{x.get('backbone')} batch {x.get('batch')}: **{_f(x.get('img_per_s'))} img/s**, "
                  f"{_f(x.get('step_ms'))} ms/step, MFU {mfu} ({_f(x.get('tflop_per_step'), '{:.2f}')} TFLOP/step), "
                  f"peak {_f(x.get('peak_mem_gib'))} GiB")
    d = s.get("data", {}).get("result", {})
    row("data", f"{d.get('images')} JPEGs as a list file and as shards")
    dl = s.get("dali", {}).get("result", {})
    row("dali", " / ".join(f"{k}: {_f(v.get('img_per_s'))} img/s ({v.get('device')}, RandAugment n="
                           f"{v.get('rand_augment_n')})" for k, v in dl.items()) or "n/a")
    lp = s.get("dali_loop", {}).get("result", {})
    row("dali_loop", f"{lp.get('backbone')}: {_f(lp.get('img_per_s_dali'))} img/s fed by DALI vs "
                     f"{_f(lp.get('img_per_s_synthetic'))} on a resident batch: slowdown ×{_f(lp.get('slowdown'), '{:.2f}')}")
    k = s.get("kernels", {}).get("result", {})
    row("kernels", f"{k.get('rows')} checks, {k.get('failed')} FAIL" + (
        "" if not k.get("fail_rows") else ": " + "; ".join(k["fail_rows"][:3])))
    return "\n".join(out) + "\n"


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
              "torch": torch.__version__, "budget_s": {k: BUDGET_S[k] * scale for k in wanted}, "sections": {}}
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
    sys.exit(main())
