"""Config errors and their messages: `ConfigError`, values shown short, pydantic's errors said in the config's words
(the dotted key, the bound, where the value was set), renamed keys refused with their new name."""
from __future__ import annotations

import reprlib
from typing import Any


class ConfigError(ValueError):
    """A config problem, with the key and the file it came from."""


MAX_ERRORS = 10  # validation errors listed; the rest counted
SHOWN = 200  # characters of a value or an override a message shows

_short_repr = reprlib.Repr()  # reprlib stops at a few items / characters: no message prints a huge value
_short_repr.maxlevel, _short_repr.maxlist, _short_repr.maxdict = 3, 6, 6
_short_repr.maxstring = _short_repr.maxother = SHOWN
_short_repr.maxlong = 40


def _shown(value: Any) -> str:
    """repr of a value for a message, at most about SHOWN characters."""
    text = _short_repr.repr(value)
    return text if len(text) <= SHOWN else text[:SHOWN] + "..."


def _shown_text(text: str) -> str:
    """At most SHOWN characters of a text; what UTF-8 cannot hold (argv's undecodable bytes) escaped."""
    short = text if len(text) <= SHOWN else f"{text[:SHOWN]}... ({len(text)} characters)"
    return short.encode("utf-8", "backslashreplace").decode("utf-8")


def _key(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# old keys -> their new name and what to know: refused (an old config fails at load, naming the new key), never
# read silently under the new name when the meaning changed
RENAMED = {
    "optim.base_lr": "'optim.lr': the peak learning rate, as in pre-training (with optim.lr_scale_batch N > 0, the "
                     "peak at global batch N, scaled linearly to the run's; 0, the default: as is). Fine-tuning's "
                     "base_lr was always scaled, by global batch / optim.lr_scale_batch (512 when not given): for the "
                     "same LR, keep that rule (optim.lr: the old base_lr, optim.lr_scale_batch: the old one, 512 if "
                     "none was set) or give optim.lr the peak itself with optim.lr_scale_batch: 0",
}

_TYPE_WORDS = {"float": "a number", "int": "an integer", "bool": "true or false", "string": "a string",
               "list": "a list", "model": "a mapping", "dict": "a mapping"}
_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _section_fields(schema, loc: tuple) -> list[str]:
    cls = schema
    for part in loc:
        ann = cls.model_fields[part].annotation
        cls = ann
    return sorted(cls.model_fields)


def _message(schema, err: dict) -> str:
    loc, kind, value = err["loc"], err["type"], err.get("input")
    key = _shown_text(_key(loc))
    if kind == "extra_forbidden" and key in RENAMED:
        return f"'{key}' was renamed {RENAMED[key]}"
    if kind == "extra_forbidden":
        return f"unknown key '{key}' (known: {', '.join(_section_fields(schema, loc[:-1]))})"
    if kind == "invalid_key":
        return f"key {_shown(loc[-1])} of '{_key(loc[:-1]) or 'the top level'}' must be a name (a string)"
    if kind in _BOUNDS:
        bound = next(iter(err["ctx"].values()))
        return f"'{key}' must be {_BOUNDS[kind]} {bound}, got {_shown(value)}"
    if kind == "literal_error":
        return f"'{key}' must be one of {err['ctx']['expected']}, got {_shown(value)}"
    if kind == "finite_number":
        return f"'{key}' must be a finite number, got {_shown(value)}"
    base = kind.split("_")[0]
    if base in _TYPE_WORDS and kind.endswith(("_type", "_parsing", "_from_float")):
        shown = type(value).__name__ if base in ("model", "dict") else _shown(value)
        return f"'{key}' must be {_TYPE_WORDS[base]}, got {shown}"
    return f"'{key}' {_shown_text(err['msg'])}"


def _origin(origins: dict, loc: tuple) -> str:
    """Where the value at `loc` was set: " (at FILE:LINE)" or " (from --set ...)", "" when unknown."""
    for n in range(len(loc), 0, -1):
        if loc[:n] in origins:
            return f" ({origins[loc[:n]]})"
    return ""
