"""Every command in README.md and docs/CLUSTER.md is correct as written.

Commands that need a GPU cluster cannot run here, so each is checked as far as this machine allows: its program
and options parse (deepspeed's own parser, hvpmtl's CLI, MLflow's click commands, the Makefile's targets), the
files it names exist, and the launcher's config loads and passes the batch-size check at the world size the
command would start (`--num_gpus`, the hostfile, or sbatch's nodes x the script's tasks per node). The README's
sbatch line itself runs on the test Slurm (tests/cluster/test_slurm_sbatch.py). A new kind of command fails
here until it is given a check.
"""
from __future__ import annotations

import argparse
import importlib
import re

import pytest

from hvpmtl.config import ConfigError, check_batch_sizes, load_config

from .checkout import REPO
from .commands import Command, documented_commands

DOCS = ("README.md", "docs/CLUSTER.md")
COMMANDS = [c for doc in DOCS for c in documented_commands(REPO / doc, REPO)]

# which config schema each launcher loads (hvpmtl.config.load_config(path, overrides, schema=...))
CONFIG_LOADERS = {
    "launchers/pretrain.py": "hvpmtl.config:ExperimentConfig",
    "launchers/finetune.py": "hvpmtl.config:FinetuneConfig",
    "launchers/doctor.py": "hvpmtl.config:ExperimentConfig",
}
# shell commands of the cluster docs that only make sense there: the program and nothing more is checked
CLUSTER_SHELL = {"squeue", "tail", "mkdir", "scancel"}


def load(spec: str):
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def check_launcher(cmd: Command, script: str, args: list[str], world: int, default_config: str | None = None):
    """The launcher's arguments, and its config at this world size, as the launcher would check them."""
    assert script in CONFIG_LOADERS, f"{cmd.where()}\nunknown launcher {script}"
    assert (REPO / script).is_file(), f"{cmd.where()}\n{script} does not exist"
    p = argparse.ArgumentParser(prog=script)  # the launchers' documented interface
    p.add_argument("--config", default=default_config)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--resume", default="auto")
    try:
        a = p.parse_args(args)
    except SystemExit:
        raise AssertionError(f"{cmd.where()}\n{script} does not take {args}") from None
    assert a.config, f"{cmd.where()}\nno --config"
    assert (REPO / a.config).is_file(), f"{cmd.where()}\n{a.config} does not exist"
    try:
        cfg = load_config(REPO / a.config, a.overrides, schema=load(CONFIG_LOADERS[script]))
        if hasattr(cfg.optim, "global_batch_size"):
            check_batch_sizes(cfg, world)
    except ConfigError as e:
        raise AssertionError(f"{cmd.where()}\nrefused at world size {world}: {e}") from None


def hostfile_slots(name: str) -> int:
    # the docs make `hosts` by copying launchers/hosts.example
    assert name == "hosts", f"documented hostfile {name}: only `hosts` (from launchers/hosts.example) is known"
    lines = [ln.split("#")[0].split() for ln in (REPO / "launchers/hosts.example").read_text().splitlines()]
    return sum(int(f[1].split("=")[1]) for f in lines if f)


def check_deepspeed(cmd: Command, argv: list[str]):
    from deepspeed.launcher.runner import parse_args

    try:
        a = parse_args(argv[1:])
    except SystemExit:
        raise AssertionError(f"{cmd.where()}\ndeepspeed does not accept these options") from None
    world = hostfile_slots(a.hostfile) if "--hostfile" in argv else a.num_gpus
    if "--hostfile" in argv and "--master_addr" in argv:  # rank 0 runs on the hostfile's first host
        first = next(ln.split()[0] for ln in (REPO / "launchers/hosts.example").read_text().splitlines()
                     if ln.split("#")[0].strip())
        assert a.master_addr == first, f"{cmd.where()}\n--master_addr {a.master_addr}, but hosts starts with {first}"
    assert world > 0, f"{cmd.where()}\nno --num_gpus or --hostfile: the world size depends on the machine"
    check_launcher(cmd, a.user_script, a.user_args, world)


def sbatch_header(script_text: str, option: str) -> str | None:
    m = re.search(rf"^#SBATCH --{option}=(\S+)", script_text, re.M)
    return m.group(1) if m else None


def check_sbatch(cmd: Command, argv: list[str]):
    script_at = next((i for i, t in enumerate(argv) if t.endswith(".sbatch")), None)
    assert script_at, f"{cmd.where()}\nno .sbatch script"
    script = argv[script_at]
    assert (REPO / script).is_file(), f"{cmd.where()}\n{script} does not exist"
    text = (REPO / script).read_text()
    options = {}
    tokens = argv[1:script_at]
    while tokens:
        t = tokens.pop(0)
        assert t.startswith("--"), f"{cmd.where()}\nunexpected sbatch argument {t}"
        key, _, value = t[2:].partition("=")
        options[key] = value or tokens.pop(0)
    nodes = int(options.get("nodes") or sbatch_header(text, "nodes"))
    tasks = int(options.get("ntasks-per-node") or sbatch_header(text, "ntasks-per-node"))
    gpus = (options.get("gres") or sbatch_header(text, "gres") or "gpu:0").split(":")[-1]
    assert int(gpus) == tasks, f"{cmd.where()}\n{tasks} tasks per node but gres {gpus} GPUs: one task per GPU"
    entry = re.search(r"^ENTRY=(\S+)", text, re.M).group(1)
    default_config = re.search(r"^CONFIG=\$\{CONFIG:-(\S+)\}", text, re.M).group(1)
    check_launcher(cmd, entry, argv[script_at + 1:], nodes * tasks, default_config)


def check_hvpmtl(cmd: Command, argv: list[str]):
    from hvpmtl.cli import build_parser

    try:
        build_parser().parse_args(argv[1:])
    except SystemExit:
        raise AssertionError(f"{cmd.where()}\nhvpmtl does not accept these arguments") from None


def check_mlflow(cmd: Command, argv: list[str]):
    import click
    from mlflow.cli import cli

    sub = cli.get_command(click.Context(cli), argv[1])
    assert sub is not None, f"{cmd.where()}\nno `mlflow {argv[1]}` command"
    try:
        sub.make_context(argv[1], argv[2:])  # parses and validates the options, runs nothing
    except click.ClickException as e:
        raise AssertionError(f"{cmd.where()}\n{e.format_message()}") from None


def check_make(cmd: Command, argv: list[str]):
    targets = set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.M))
    for t in argv[1:]:
        assert "=" in t or t in targets, f"{cmd.where()}\nno Makefile target {t}"


def check_shell(cmd: Command, argv: list[str]):
    prog = argv[0]
    if prog == ".":
        assert argv[1:] == [".venv/bin/activate"], f"{cmd.where()}\nthe docs activate .venv/bin/activate only"
    elif prog == "cp":
        assert (REPO / argv[1]).is_file(), f"{cmd.where()}\n{argv[1]} does not exist"
    elif prog == "cat":  # cat > FILE <<EOF: KEY=VALUE lines, no blank ones (DeepSpeed splits each on '=')
        assert cmd.heredoc and all(re.match(r"^[A-Z_][A-Z0-9_]*=\S", ln) for ln in cmd.heredoc), (
            f"{cmd.where()}\n{cmd.heredoc}")
    elif prog == "export":
        assert all(re.match(r"^[A-Z_][A-Z0-9_]*=", a) for a in argv[1:]), cmd.where()
    else:
        assert prog in CLUSTER_SHELL, f"{cmd.where()}\na command this test has no check for: give it one"


CHECKS = {"deepspeed": check_deepspeed, "sbatch": check_sbatch, "hvpmtl": check_hvpmtl, "mlflow": check_mlflow,
          "make": check_make}


def test_the_docs_have_commands_to_check():
    progs = {c.argv[0] for c in COMMANDS}
    assert {"make", ".", "deepspeed", "sbatch", "hvpmtl", "mlflow"} <= progs, progs


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: f"{c.doc}:{c.line}")
def test_documented_command_is_correct(cmd):
    argv = cmd.argv
    CHECKS.get(argv[0], check_shell)(cmd, argv)


def test_the_check_catches_a_wrong_world_size():
    # 3 GPUs x micro batch 16 = 48 does not divide the paper's global batch 1024: no accumulation fits
    bad = Command("README.md", 0, "deepspeed --num_gpus 3 launchers/pretrain.py --config configs/pretrain_swin_b.yaml",
                  [])
    with pytest.raises(AssertionError, match="refused at world size 3: optim.global_batch_size=1024"):
        check_deepspeed(bad, bad.argv)


def test_run_folders_named_in_the_docs_are_the_configs_output_dirs():
    """finetune.sbatch pointed at runs/pretrain_swin_b/ while the config wrote runs/swin_b_mlimages."""
    dirs = {m for f in (REPO / "configs").rglob("*.yaml")
            for m in re.findall(r"^  output_dir: (\S+)", f.read_text(), re.M)}
    assert "runs/demo" in dirs, dirs
    files = [REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "launchers").rglob("*.*")]
    named = {(f.relative_to(REPO), m) for f in files for m in re.findall(r"\bruns/[\w.-]+", f.read_text())}
    assert named, "the docs name no run folder"
    # a folder a documented command itself creates (`--out runs/x` of a benchmark) is not a config's to name
    made = {m for f in files for m in re.findall(r"--out (runs/[\w.-]+)", f.read_text())}
    store = {"runs/mlflow.db", "runs/mlartifacts"}  # the default MLflow store and its artifacts (train/tracking/check.py)
    wrong = {(str(f), m) for f, m in named if m not in dirs | made | store}
    assert not wrong, f"run folders no config writes: {sorted(wrong)}"
