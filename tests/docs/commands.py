"""The shell commands of the docs' ```bash blocks, as a user would copy them: continuation lines joined, comments
dropped, a here-document kept with the command that reads it."""
from __future__ import annotations

import re
import shlex
import textwrap
from dataclasses import dataclass
from pathlib import Path

_FENCE = re.compile(r"^( *)```bash\n(.*?)^\1```", re.M | re.S)
_HEREDOC = re.compile(r"<<-?\s*'?(\w+)'?")


@dataclass
class Command:
    doc: str
    line: int  # 1-based line of the command's first line in the doc
    text: str
    heredoc: list[str]

    @property
    def argv(self) -> list[str]:
        return shlex.split(_HEREDOC.sub("", self.text), comments=True)

    def where(self) -> str:
        return f"{self.doc}:{self.line}: {self.text}"


def documented_commands(path: Path, root: Path) -> list[Command]:
    text = path.read_text()
    out = []
    for fence in _FENCE.finditer(text):
        first = text.count("\n", 0, fence.start(2)) + 1
        lines = textwrap.dedent(fence.group(2)).splitlines()
        i = 0
        while i < len(lines):
            start, cmd = i, lines[i]
            while cmd.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                cmd = cmd.rstrip()[:-1] + " " + lines[i].strip()
            i += 1
            body = []
            m = _HEREDOC.search(cmd)
            if m:
                while i < len(lines) and lines[i].strip() != m.group(1):
                    body.append(lines[i])
                    i += 1
                i += 1  # the terminator
            if shlex.split(cmd, comments=True):
                out.append(Command(str(path.relative_to(root)), first + start, cmd.strip(), body))
    return out
