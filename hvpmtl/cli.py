"""`hvpmtl` command line: `hvpmtl data ...`, `hvpmtl export ...`, `hvpmtl eval ...`, `hvpmtl doctor ...`.

Each command group lives beside its logic and registers itself through `add_parser(subparsers)`;
this file only wires them together. `hvpmtl` alone prints the full help (exit 0), `hvpmtl --version`
the package version.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
import traceback

from hvpmtl import __version__
from hvpmtl.notices import SHOWN_CHARS, show_notices_as_lines, shown  # noqa: F401 (shown: re-exported)


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
    "data": "hvpmtl.data.tools.cli",
    "export": "hvpmtl.eval.export",
    "eval": "hvpmtl.eval.cli",
    "doctor": "hvpmtl.doctor.cli",  # pre-flight of every node of a job (launchers/doctor.py)
    "tracking": "hvpmtl.train.tracking.sync",  # `tracking sync`: what a run logged while MLflow was away
}


# -- the input boundary: every command's errors caused by input end as one line and exit 2 ----------------------

EXIT_INPUT = 2  # the documented exit code of a config, data or file problem (README, DATA.md, CLUSTER.md)
BUG = "internal error (a bug, please report it with this traceback)"
def _file_in_frames(tb) -> str:
    """The file an exception without a file name (UnicodeDecodeError) was reading: the innermost frame's
    local that names an existing file. Python's decoders do not say which file they read."""
    found = ""
    while tb is not None:
        for name in ("path", "src", "list_file", "idx_path", "file", "filename", "p"):
            v = tb.tb_frame.f_locals.get(name)
            if isinstance(v, (str, os.PathLike)) and len(str(v)) < 4096:
                try:
                    if os.path.isfile(v):
                        found = str(v)
                        break
                except (OSError, ValueError):
                    pass
        tb = tb.tb_next
    return found


def input_error(e: BaseException) -> str | None:
    """The one-line message of an error caused by input (config, data, files, disk), or None for a bug."""
    from hvpmtl.config import ConfigError
    from hvpmtl.data.formats.issues import DataError
    if isinstance(e, ConfigError):
        return f"config error: {e}"
    if isinstance(e, DataError):
        return f"data error: {e}"
    if isinstance(e, UnicodeDecodeError):
        where = _file_in_frames(e.__traceback__)
        return (f"{shown(where) or 'a file'}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                "save it as UTF-8")
    if isinstance(e, OSError) and (e.filename is not None or e.errno is not None):
        what = shown(e.filename) if e.filename is not None else "a file"
        if e.filename2 is not None:
            what += f" -> {shown(e.filename2)}"
        hint = {errno.ENOSPC: "the disk is full: free space or point the output elsewhere",
                errno.EDQUOT: "the disk quota is used up",
                errno.EACCES: "no permission: fix the permissions or choose a folder you can write",
                errno.EPERM: "not permitted",
                errno.EROFS: "a read-only file system: choose a writable folder",
                errno.ENOTDIR: "a part of the path is a regular file, not a folder",
                errno.EISDIR: "it is a folder, a file was expected"}.get(e.errno, "")
        return f"{what}: {e.strerror or e}" + (f" ({hint})" if hint else "")
    return None


def report_input_error(e: BaseException, prog: str = "hvpmtl") -> int:
    """Print the one line for an input error and return EXIT_INPUT; for anything else print the traceback
    saying it is a bug, and return 1."""
    msg = input_error(e)
    if msg is not None:
        print(f"{prog}: {msg}", file=sys.stderr, flush=True)
        return EXIT_INPUT
    traceback.print_exception(e)
    print(f"{prog}: {BUG}", file=sys.stderr, flush=True)
    return 1


def guarded(fn, prog: str = "hvpmtl"):
    """`fn(args) -> exit code` behind the input boundary."""
    def run(args) -> int:
        show_notices_as_lines()
        try:
            return int(fn(args) or 0)
        except Exception as e:  # noqa: BLE001 -- the boundary: input errors to one line, bugs said to be bugs
            return report_input_error(e, prog)
    return run


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a clear usage error, exit 2, instead of a traceback later)."""
    return _bounded_int(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _bounded_int(text, 0)


def _bounded_int(text: str, low: int) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{shown(text)}' is not an integer") from None
    if v < low:
        raise argparse.ArgumentTypeError(f"{v} is below {low}")
    return v


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
    return guarded(args.func)(args)


if __name__ == "__main__":
    sys.exit(main())
