"""`hvpmtl` command line: `hvpmtl data ...`, `hvpmtl export ...`, `hvpmtl eval ...`.

Each command group lives beside its logic and registers itself through `add_parser(subparsers)`;
this file only wires them together. `hvpmtl` alone prints the full help (exit 0), `hvpmtl --version`
the package version.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from hvpmtl import __version__


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's help ends with its default, unless there is none to show (a required option, a flag) or the
    help already says in words what happens when the option is not given (no "(default: None)" after "default:
    from the run")."""

    def _get_help_string(self, action):
        says_it = action.default is None and "default" in (action.help or "").lower()
        if action.required or action.nargs == 0 or says_it:
            return action.help
        return super()._get_help_string(action)


# group name -> module that defines add_parser(subparsers) and sets args.func
COMMAND_GROUPS = {
    "data": "hvpmtl.data.cli",
    "export": "hvpmtl.eval.export",
    "eval": "hvpmtl.eval.cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hvpmtl", description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    # Not required: `hvpmtl` alone is a request for help, answered in main() (argparse would exit 2).
    sub = parser.add_subparsers(dest="group", title="commands")
    for name, module in COMMAND_GROUPS.items():
        try:
            importlib.import_module(module).add_parser(sub)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.group is None:
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
