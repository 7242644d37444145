"""The README's commands that can run on a CPU run, as written, on a fresh clone (issue 13, "done when").

The clone is `git clone` of this repository with the working tree's changes on top (the commit they would make),
set up as `make setup` leaves a checkout: `.venv` (the venv running these tests) and the editable install's
`hvpmtl.kernels` -> `kernels/`. Every command runs in a new bash in the clone, after the README's
`. .venv/bin/activate` and with nothing of this process's venv on PATH, in README order, except that the data set
is made first and smaller by the README's own make-synthetic line, as its "quicker try" says (`make demo` then uses
it). Commands for a GPU cluster are left to test_documented_commands.py (parsed, files checked, config validated
at their world size); `make test` is this suite. A README command without a rule here fails the test.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import stat
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from .checkout import REPO, VENV_ROOT, checkout_env
from .commands import Command, documented_commands
from subprocs import free_port

CPU_RANKS = 2  # the demo's: a deepspeed command with more, or a hostfile, or sbatch, is for a GPU cluster
QUICK_DATA = ("--num-images 3000 --holdout 600", "--num-images 256 --holdout 64")  # the README's "quicker try"
QUICK_DEMO = 'make demo ARGS="--set run.eval_every=4"'  # 256 images / 32 per step x 2 epochs = 16 steps
# the README's placeholders for a user's data and a cluster run, and what stands for them here
DATA_PLACES = {"/data/ml-images": ".", "/data/shards": "../runs/shards"}  # run from demo_data/
RUN_PLACES = {"runs/swin_b_mlimages": "runs/demo"}
DENSE_DEMOS = {"det_demo": ("eval/bbox_AP", "eval/segm_AP"), "seg_demo": ("eval/mIoU",)}  # config -> its figures


def git(*args, cwd=REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def fresh_clone(where: Path) -> Path:
    root = where / "hvpmtl"
    git("clone", "-q", "--no-hardlinks", str(REPO), str(root))
    for f in filter(None, git("ls-files", "-z", "--modified", "--others", "--exclude-standard").split("\0")):
        if (REPO / f).is_file() and not (REPO / f).is_symlink():
            (root / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, root / f)
    for f in filter(None, git("ls-files", "-z", "--deleted").split("\0")):
        (root / f).unlink(missing_ok=True)
    (root / ".venv").symlink_to(VENV_ROOT, target_is_directory=True)
    if not (root / "hvpmtl/kernels").exists():
        (root / "hvpmtl/kernels").symlink_to("../kernels", target_is_directory=True)
    # `make setup` is done: its stamp is newer than what it was made from (make would reinstall into this venv)
    stamp = VENV_ROOT / ".hvpmtl-installed"
    if stamp.exists():
        old = stamp.stat().st_mtime - 60
        for f in ("requirements.txt", "constraints.txt", "setup.py", "tools/setup_env.sh"):
            os.utime(root / f, (old, old))
    plan = subprocess.run(["make", "-n", "demo"], cwd=root, capture_output=True, text=True).stdout
    assert "setup_env.sh" not in plan, f"the venv running the tests was not made by `make setup`:\n{plan}"
    return root


def shell_env(root: Path) -> dict:
    """A fresh shell's environment: nothing of a venv, no tracking URI; this clone's package first."""
    env = checkout_env(PYTHONPATH=str(root))
    for k in ("VIRTUAL_ENV", "MLFLOW_TRACKING_URI", "DS_ACCELERATOR"):
        env.pop(k, None)
    bins = {str(VENV_ROOT / "bin"), os.path.realpath(VENV_ROOT / "bin")}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if p not in bins and p)
    return env


def sh(root: Path, line: str, timeout: float = 600, **kw):
    """`line` in a new bash in the clone, after the README's activation step."""
    return subprocess.run(["bash", "-c", f"set -e; . .venv/bin/activate; {line}"], cwd=root, env=shell_env(root),
                          text=True, timeout=timeout, **kw)


def run(root: Path, line: str, timeout: float = 600) -> subprocess.CompletedProcess:
    cp = sh(root, line, timeout, capture_output=True)
    assert cp.returncode == 0, f"`{line}` exited {cp.returncode}\n{cp.stdout[-3000:]}\n{cp.stderr[-5000:]}"
    return cp


def replaced(text: str, places: dict) -> str:
    for a, b in places.items():
        text = text.replace(a, b)
    return text


def deepspeed_ranks(argv: list[str]) -> int | None:
    if argv[0] != "deepspeed" or "--hostfile" in argv:
        return None
    return int(argv[argv.index("--num_gpus") + 1])


def rule(cmd: Command) -> str | None:
    """The command line to run here for a README command, or None when it does not run here (see the docstring)."""
    argv = cmd.argv
    t = shlex.join(argv)  # the line without its comment
    if t in ("make test", ". .venv/bin/activate"):  # this suite; the prefix of every line
        return None
    if argv[0] == "sbatch" or (argv[0] == "deepspeed" and (deepspeed_ranks(argv) or 99) > CPU_RANKS):
        return None
    if t == "make demo":
        return QUICK_DEMO
    if argv[:3] == ["hvpmtl", "data", "make-synthetic"]:
        assert QUICK_DATA[0] in t, f"{cmd.where()}\nthe quicker try no longer fits: {QUICK_DATA}"
        return t.replace(*QUICK_DATA)
    if argv[:2] == ["hvpmtl", "data"]:
        return "cd demo_data && " + replaced(t, DATA_PLACES)
    if argv[:2] == ["hvpmtl", "export"]:
        return replaced(t, RUN_PLACES)
    if argv[0] in ("hvpmtl", "cp", "mlflow", "deepspeed"):
        return t
    raise AssertionError(f"{cmd.where()}\na README command this test has no rule for: give it one")


def mlflow_api(base: str, path: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(base + path, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def check_mlflow_ui(root: Path, line: str) -> str:
    """Start the UI as documented (on a free port: others may hold 5000), find the demo's run through it, stop it."""
    argv = line.split()
    port = free_port()
    argv[argv.index("--port") + 1] = str(port)
    ui = subprocess.Popen(["bash", "-c", f". .venv/bin/activate; exec {' '.join(argv)}"], cwd=root,
                          env=shell_env(root), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):  # a hang guard: the server usually answers within seconds
            if ui.poll() is not None:
                raise AssertionError(f"`{line}` exited {ui.returncode}:\n{ui.stdout.read()[-3000:]}")
            try:
                exp = mlflow_api(base, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=hvpmtl")["experiment"]
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise AssertionError(f"`{line}`: no answer on {base}")
        tags = {t["key"]: t["value"] for t in exp.get("tags", [])}
        assert tags.get("mlflow.experimentKind") == "custom_model_development", tags  # opens on its runs
        runs = mlflow_api(base, "/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
        demo = [r for r in runs if r["info"]["run_name"] == "demo-cpu"]
        assert demo, [r["info"]["run_name"] for r in runs]
        metrics = {m["key"]: m for m in demo[0]["data"].get("metrics", [])}
        assert metrics["eval/linear_map"]["step"] == 16 and "eval/knn_map" in metrics, sorted(metrics)
        run_id = demo[0]["info"]["run_id"]
        files = mlflow_api(base, f"/api/2.0/mlflow/artifacts/list?run_id={run_id}&path=panels").get("files", [])
        assert any(f["path"].endswith("_step_000016.png") for f in files), files  # panels of the last step
        return base
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        try:
            ui.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(ui.pid, signal.SIGKILL)
            ui.wait()


@pytest.mark.slow
def test_the_readme_cpu_commands_run_on_a_fresh_clone(tmp_path):
    root = fresh_clone(tmp_path)
    commands = documented_commands(root / "README.md", root)
    lines = [(c, rule(c)) for c in commands]
    ran = []

    hvpmtl_bin = run(root, "command -v hvpmtl").stdout.strip()
    assert os.path.samefile(hvpmtl_bin, root / ".venv/bin/hvpmtl"), hvpmtl_bin  # the activation step does it

    # the quicker try: the data set first, made by the README's own line (smaller), then every line in order
    first_data = next(line for c, line in lines if line and "make-synthetic" in line)
    run(root, first_data)
    for cmd, line in lines:
        if line is None:
            continue
        ran.append(cmd.text)
        if line == QUICK_DEMO:
            cp = run(root, line, timeout=900)
            assert "== done." in cp.stdout, cp.stdout[-3000:]
            out = root / "runs/demo"
            rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
            # online evaluation: step 0 is the random init, printed beside every later one
            assert [r["step"] for r in rows if "eval/linear_map" in r] == [0, 4, 8, 12, 16]
            assert "online eval step 0 (random init): kNN mAP" in cp.stdout, cp.stdout[-3000:]
            assert "online eval step 16: kNN mAP" in cp.stdout and "(random init: " in cp.stdout, cp.stdout[-3000:]
            assert "?workflowType=machine_learning" in cp.stdout[cp.stdout.index("== done."):], cp.stdout[-3000:]
            assert " eta " in cp.stdout, cp.stdout[-3000:]  # the step lines say the time left
            # no deprecation noise on the console (DeepSpeed's own deprecated collective is filtered by the entry)
            assert "FutureWarning" not in cp.stdout + cp.stderr, (cp.stdout + cp.stderr)[-3000:]
            assert (out / "backbone.safetensors").is_file() and (out / "config.yaml").is_file()
            again = run(root, line)  # and a second `make demo` says it is done, trains nothing
            assert "the demo already ran to step 16" in again.stdout, again.stdout
        elif line.startswith("mlflow ui"):
            check_mlflow_ui(root, line)
        elif " export " in f" {line} ":
            cp = run(root, line)
            res = json.loads(cp.stdout.strip().splitlines()[-1])
            f = root / res["out"]
            assert f.is_file() and res["format"] == "timm" and f.stat().st_mode & stat.S_IRGRP, res
            assert "hvpmtl export: using the" in cp.stderr, cp.stderr  # which weights
        elif line.startswith("hvpmtl eval"):
            cp = run(root, line)
            res = json.loads(cp.stdout.strip().splitlines()[-1])
            assert res["metric"] == "map" and 0 < res["value"] <= 100 and res["n_test"] == 32, res
            # which weights, and progress while it works
            assert "hvpmtl eval: using the" in cp.stderr and "hvpmtl eval: fitting on 32" in cp.stderr, cp.stderr
            # from another directory: the run's saved config names its data by absolute paths
            away = run(root, f"cd {tmp_path} && {line.replace('runs/demo', str(root / 'runs/demo'))}")
            assert json.loads(away.stdout.strip().splitlines()[-1])["value"] == res["value"]
        elif "launchers/finetune.py" in line:
            cp = run(root, line, timeout=1200)
            task = next((t for t in DENSE_DEMOS if f"configs/{t}.yaml" in line), "finetune_demo")
            figures = DENSE_DEMOS.get(task, ("val/top1",))
            out = root / "runs" / task
            for f in figures:  # on the console and in metrics.jsonl
                assert f"{f}=" in cp.stdout + cp.stderr, (cp.stdout + cp.stderr)[-3000:]
                assert any(f in json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()), f
            assert (out / "model.safetensors").is_file()
            if task in DENSE_DEMOS:  # the demo's backbone, every weight of it
                assert "backbone from runs/demo/backbone.safetensors" in cp.stdout + cp.stderr
        else:
            cp = run(root, line)
            if "to-shards" in line:
                assert "wrote 256 samples" in cp.stdout, cp.stdout
    kinds = {t.split()[0] + (" " + t.split()[1] if t.startswith("hvpmtl") else "") for t in ran}
    assert {"make", "mlflow", "cp", "hvpmtl data", "hvpmtl export", "hvpmtl eval", "deepspeed"} <= kinds, kinds


def test_every_readme_command_has_a_rule():
    for cmd in documented_commands(REPO / "README.md", REPO):
        rule(cmd)  # raises for a command nobody decided about
    odd = Command("README.md", 0, "rsync -a runs/ elsewhere/", [])
    with pytest.raises(AssertionError, match="no rule for"):
        rule(odd)
