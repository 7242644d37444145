"""Every option of every command line a user is shown (`hvpmtl` and all its subcommands, the two launchers)
says what it does and shows its default (issue 13.5: `--k`, `--temperature`, `--list`, `--format` had neither). A new option without help fails here."""
from __future__ import annotations

import argparse

import pytest

import hvpmtl
from hvpmtl.cli import build_parser, main
from hvpmtl.train.args import finetune_parser, pretrain_parser

PARSERS = {"hvpmtl": build_parser, "launchers/pretrain.py": pretrain_parser, "launchers/finetune.py": finetune_parser}
# flags have no value to default: --random-init, --merge, --version, ...
FLAGS = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._StoreConstAction, argparse._CountAction,
         argparse._VersionAction)


def walk(parser: argparse.ArgumentParser, name: str):
    """(command name, parser) for the parser and every subcommand under it."""
    yield name, parser
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sub, p in a.choices.items():
                yield from walk(p, f"{name} {sub}")


def problems(parser: argparse.ArgumentParser, name: str) -> list[str]:
    out = []
    fmt = parser._get_formatter()
    for a in parser._actions:
        if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) or a.help == argparse.SUPPRESS:
            continue
        what = f"{name} {'/'.join(a.option_strings) or a.dest}"
        if not (a.help and a.help.strip()):
            out.append(f"{what}: no help text")
        elif a.option_strings and not a.required and not isinstance(a, FLAGS) \
                and "default" not in fmt._get_help_string(a).lower():  # "%(default)s", or in words
            out.append(f"{what}: its default is not shown")
    return out


COMMANDS = [(name, p) for prog, make in PARSERS.items() for name, p in walk(make(), prog)]


def test_the_walk_reaches_every_command():
    names = {n for n, _ in COMMANDS}
    assert {"hvpmtl data validate", "hvpmtl data to-shards", "hvpmtl export", "hvpmtl eval knn",
            "hvpmtl eval linear-probe", "launchers/pretrain.py", "hvpmtl tracking sync"} <= names


@pytest.mark.parametrize("name,parser", COMMANDS, ids=[n for n, _ in COMMANDS])
def test_every_option_has_help_and_shows_its_default(name, parser):
    assert problems(parser, name) == []


def test_the_named_options_render_help_and_default():
    helps = {n: p.format_help() for n, p in COMMANDS}
    assert "neighbours that vote" in helps["hvpmtl eval knn"] and "(default: 20)" in helps["hvpmtl eval knn"]
    assert "(default: 0.07)" in helps["hvpmtl eval knn"]
    assert "--format {timm,mmdet,mmseg,detectron2}" in helps["hvpmtl export"]
    assert "default: from the --out suffix" in helps["hvpmtl export"]
    assert "(default: auto)" in helps["launchers/pretrain.py"]


def test_the_check_catches_an_option_without_help():
    p = argparse.ArgumentParser()
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--temperature", type=float, default=0.07, help="softmax temperature")
    p.add_argument("--list", required=True, help="a list file")
    assert problems(p, "x") == ["x --k: no help text", "x --temperature: its default is not shown"]


def test_no_arguments_prints_the_full_help_and_exits_0(capsys):
    assert main([]) == 0
    out, err = capsys.readouterr()
    assert out == build_parser().format_help() and err == ""
    assert out.startswith("usage: hvpmtl") and all(g in out for g in ("data", "export", "eval", "--version"))


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"hvpmtl {hvpmtl.__version__}\n"


def test_a_missing_subcommand_below_a_group_is_still_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["data"])
    assert e.value.code == 2 and "usage: hvpmtl data" in capsys.readouterr().err


HELP_PROBE = """
import sys
from hvpmtl.cli import main
try:
    code = main({argv!r})
except SystemExit as e:
    code = e.code
heavy = sorted(m for m in ("torch", "deepspeed", "timm", "nvidia.dali", "mlflow") if m in sys.modules)
print("EXIT", code, "HEAVY", heavy)
"""


@pytest.mark.slow
@pytest.mark.parametrize("argv", [[], ["--help"], ["eval", "knn", "--help"], ["export", "--help"],
                                  ["data", "validate", "--help"]], ids=lambda a: " ".join(a) or "no-arguments")
def test_help_imports_nothing_heavy(argv):
    """`hvpmtl eval knn --help` loaded torch (2.5-4 s) before it answered."""
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", HELP_PROBE.format(argv=argv)], capture_output=True, text=True,
                       timeout=120)
    assert "usage: hvpmtl" in p.stdout, p.stdout + p.stderr
    assert p.stdout.strip().splitlines()[-1] == "EXIT 0 HEAVY []", p.stdout[-500:] + p.stderr
