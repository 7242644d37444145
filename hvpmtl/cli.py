"""`hvpmtl` command line: `hvpmtl data ...`, `hvpmtl export ...`, `hvpmtl eval ...`.

Each command group lives beside its logic and registers itself through `add_parser(subparsers)`;
this file only wires them together.
"""
from __future__ import annotations

import argparse
import importlib
import sys

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
    sub = parser.add_subparsers(dest="group", required=True)
    for name, module in COMMAND_GROUPS.items():
        try:
            importlib.import_module(module).add_parser(sub)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
