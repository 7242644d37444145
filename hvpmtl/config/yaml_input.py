"""Config text in: YAML files with their `base:` chain and `--set KEY=VALUE` overrides, read under bounds (file size,
nesting, values with aliases expanded, chain length) so that no input can exhaust the launcher, and with the line
of each key kept for messages."""
from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any, Optional

import yaml

from hvpmtl.config.errors import ConfigError, _key, _shown, _shown_text

# What a config may be: far above any real one (a few KB, 4 levels, ~200 values), far below what hurts a launch
# (issue 23.6: an alias bomb, 20,000 nested brackets). Each is refused as a ConfigError naming where.
MAX_FILE_BYTES = 1 << 20
MAX_DEPTH = 32  # nested mappings/lists, aliases followed
MAX_VALUES = 10_000  # values once aliases are expanded (what pydantic and the messages walk)
MAX_BASES = 16  # files in one `base:` chain
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _ConfigLoader(yaml.SafeLoader):
    """SafeLoader that stops at MAX_DEPTH while composing (PyYAML's composer recurses: 20,000 brackets would be a
    RecursionError) and names the scalar its constructors fail on with a ValueError (a 5,000-digit int, a 30th of
    February) instead of letting that escape."""

    _depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep)
        except (ValueError, TypeError, OverflowError) as e:  # not YAMLErrors: PyYAML lets them through
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {_shown(node.value)} as {node.tag.rsplit(':', 1)[-1]}: {_shown_text(str(e))}",
                node.start_mark) from None


def _check_tree(root: yaml.Node, key_lines: dict) -> None:
    """Refuse, before anything is constructed, what construction, pydantic or a message would expand without bound:
    an alias inside the value it names, nesting beyond MAX_DEPTH or more than MAX_VALUES values with aliases
    followed (PyYAML shares an aliased object, its consumers copy it: a 571-byte file was 6.5 GB). Also refuse a
    key given twice in one mapping (one of the two would be silently dropped) and strings UTF-8 cannot hold (an
    escaped lone surrogate, NUL). Records the line of each key in `key_lines` for messages."""
    done: dict[int, tuple[int, int]] = {}  # id(node) -> (values, height) once walked
    walking: set[int] = set()

    def refuse(node, path, problem):
        where = f"'{_shown_text(_key(path))}': " if path else ""
        raise yaml.composer.ComposerError(None, None, where + problem, node.start_mark)

    def walk(node, depth: int, path: tuple) -> tuple[int, int]:
        if id(node) in done:  # an alias: its values count again wherever it is used
            size, height = done[id(node)]
            if depth + height - 1 > MAX_DEPTH:
                refuse(node, path, f"nested deeper than {MAX_DEPTH} levels with aliases followed")
            return size, height
        if id(node) in walking:
            refuse(node, path, "an alias refers to a value that contains it")
        if depth > MAX_DEPTH:
            refuse(node, path, f"nested deeper than {MAX_DEPTH} levels with aliases followed")
        walking.add(id(node))
        size, height = 1, 1
        if isinstance(node, yaml.ScalarNode):
            if "\x00" in node.value or not node.value.isascii() and not _utf8(node.value):
                refuse(node, path, "a string with a NUL or an unpaired surrogate (from an escape) cannot be used")
        else:
            pairs = node.value if isinstance(node, yaml.MappingNode) else enumerate(node.value)
            seen: dict = {}
            for k, v in pairs:
                if isinstance(node, yaml.MappingNode):
                    name = k.value if isinstance(k, yaml.ScalarNode) else None
                    if name is not None and k.tag != _MERGE_TAG:
                        if (k.tag, name) in seen:
                            refuse(k, path, f"key '{_shown_text(name)}' is given twice (also on line "
                                            f"{seen[k.tag, name]}); one of the two would be ignored")
                        seen[k.tag, name] = k.start_mark.line + 1
                        key_lines.setdefault((*path, name), k.start_mark.line + 1)
                    ks, kh = walk(k, depth + 1, path)
                    size, height = size + ks, max(height, kh + 1)
                    child = (*path, name) if name is not None and k.tag != _MERGE_TAG else path
                else:
                    child = (*path, k)
                vs, vh = walk(v, depth + 1, child)
                size, height = size + vs, max(height, vh + 1)
                if size > MAX_VALUES:
                    refuse(v, child, f"more than {MAX_VALUES} values with aliases expanded")
        walking.discard(id(node))
        done[id(node)] = (size, height)
        return size, height

    walk(root, 1, ())


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _parse_yaml(text: str) -> tuple[Any, dict]:
    """YAML text -> (value, {key path: line}); yaml.YAMLError for anything refused."""
    loader = _ConfigLoader(text)
    key_lines: dict = {}
    try:
        node = loader.get_single_node()
        if node is None:
            return None, key_lines
        _check_tree(node, key_lines)
        return loader.construct_document(node), key_lines
    finally:
        loader.dispose()


def _yaml_problem(e: yaml.YAMLError, text: str) -> tuple[int, int, str]:
    """(line, column, what is wrong) of a YAML error, both 1-based."""
    if isinstance(e, yaml.reader.ReaderError):
        pos = e.position
        line, col = text.count("\n", 0, pos) + 1, pos - text.rfind("\n", 0, pos)
        char = f"#x{e.character:04x}" if isinstance(e.character, int) else repr(e.character)
        return line, col, f"character {char}: {e.reason}"
    if isinstance(e, yaml.MarkedYAMLError):
        mark = e.problem_mark or e.context_mark
        problem = e.problem or e.context or "cannot be read"
        if e.context and e.problem and e.context_mark is not None:
            problem += f" ({e.context}, from line {e.context_mark.line + 1} column {e.context_mark.column + 1})"
        if mark is not None:
            return mark.line + 1, mark.column + 1, _shown_text(problem)
        return 1, 1, _shown_text(problem)
    return 1, 1, _shown_text(str(e))


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _key_paths(d: dict, prefix: tuple = ()):
    """Every key path of a nested dict, sections included."""
    for k, v in d.items():
        yield (*prefix, k)
        if isinstance(v, dict):
            yield from _key_paths(v, (*prefix, k))


def parse_override(text: str) -> dict:
    """`optim.lr=2e-4` -> {'optim': {'lr': 0.0002}}; the value is parsed as YAML (with the same bounds as a
    file). A value YAML cannot read is refused, naming the override and how to quote it as a string."""
    shown = _shown_text(text)
    if "=" not in text:
        raise ConfigError(f"--set '{shown}': expected KEY=VALUE, e.g. optim.lr=2e-4")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(p.isidentifier() for p in parts):
        raise ConfigError(f"--set '{shown}': KEY must be dotted names like optim.lr, got '{_shown_text(key)}'")
    try:
        value = _parse_yaml(raw)[0] if raw != "" else ""
    except yaml.YAMLError as e:
        line, col, problem = _yaml_problem(e, raw)
        at = f"column {col}" if "\n" not in raw else f"line {line} column {col}"
        # json.dumps is a YAML double-quoted string; shlex makes it one shell word
        quoted = shlex.quote(f"{key.strip()}={json.dumps(raw, ensure_ascii=False)}")
        raise ConfigError(f"--set '{shown}': YAML cannot read the value ({problem}, {at}); to give it as a string, "
                          f"quote it: --set {_shown_text(quoted)}") from None
    out: dict = {}
    node = out
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def _read_yaml(path: Path, chain: tuple[Path, ...] = (), origins: Optional[dict] = None) -> dict:
    """A config file (and its `base:` chain) as a dict; `origins` gets "FILE:LINE" for each key path."""
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain[chain.index(path):], path))
        raise ConfigError(f"{chain[-1]}: 'base' makes a cycle: {cycle}")
    if len(chain) >= MAX_BASES:
        raise ConfigError(f"{chain[-1]}: 'base' chains more than {MAX_BASES} files ({chain[0]} -> ... -> {path})")
    try:
        with open(path, "rb") as f:  # bounded read: a config named /dev/zero or a 10 GB file is refused, not read
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        where = f"{chain[-1]}: 'base': " if chain else ""
        raise ConfigError(f"{where}cannot read config file {path}: {e.strerror}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_FILE_BYTES} bytes; not a config file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line, col = raw.count(b"\n", 0, e.start) + 1, e.start - raw.rfind(b"\n", 0, e.start)
        raise ConfigError(f"{path}:{line}:{col}: not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                          f"save the file as UTF-8") from None
    try:
        data, key_lines = _parse_yaml(text)
    except yaml.YAMLError as e:
        line, col, problem = _yaml_problem(e, text)
        raise ConfigError(f"{path}:{line}:{col}: not valid YAML: {problem}") from None
    if data is None:  # an empty file (or only comments)
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    # `base: other.yaml` inherits (paths relative to this file), as the ablations do.
    base = data.pop("base", None)
    if base:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: 'base' must be a file name, got {_shown(base)}")
        data = _merge(_read_yaml(path.parent / base, (*chain, path), origins), data)
    if origins is not None:
        origins.update({k: f"at {path}:{line}" for k, line in key_lines.items() if k != ("base",)})
    return data
