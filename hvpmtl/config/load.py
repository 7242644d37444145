"""A config in and out: `load_config` (YAML + `--set` -> a checked schema instance, or a ConfigError naming the file,
line and key) and `save_config` (data paths written absolute, so the copy loads from any directory)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import yaml
from pydantic import BaseModel, ValidationError

from hvpmtl.config.errors import MAX_ERRORS, ConfigError, _message, _origin, _shown_text
from hvpmtl.config.pretrain import ExperimentConfig
from hvpmtl.config.sections import PATH
from hvpmtl.config.yaml_input import _key_paths, _merge, _read_yaml, parse_override


def load_config(path: Optional[str | Path] = None, overrides: tuple[str, ...] | list[str] = (),
                schema=ExperimentConfig):
    """YAML file (or defaults) + `--set` overrides -> a checked `schema` instance (ExperimentConfig for
    pre-training, FinetuneConfig for fine-tuning). Anything wrong is a ConfigError naming the file (line,
    column) or the override, and the key."""
    values: dict = {}
    origins: dict = {}
    source = "<defaults>"
    if path is not None:
        values = _read_yaml(Path(path), origins=origins)
        source = str(path)
    for o in overrides:
        over = parse_override(o)
        values = _merge(values, over)
        origins.update({k: f"from --set {_shown_text(o)}" for k in _key_paths(over)})
    if overrides:
        source += " + --set " + " ".join(_shown_text(o) for o in overrides)
    try:
        cfg = schema.model_validate(values)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        lines = [f"{_message(schema, err)}{_origin(origins, err['loc'])}" for err in errors[:MAX_ERRORS]]
        if len(errors) > MAX_ERRORS:
            lines.append(f"... and {len(errors) - MAX_ERRORS} more errors")
        raise ConfigError(f"{source}: " + "\n  ".join(lines)) from None
    cfg.check(source)
    return cfg


# ----------------------------------------------------------------------------- writing


def to_dict(cfg: BaseModel) -> dict:
    return cfg.model_dump()


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def absolute_paths(cfg: BaseModel) -> dict:
    """cfg as a dict, with every non-empty path field (PathStr) made absolute against the working directory."""
    out = {}
    for name, field in type(cfg).model_fields.items():
        value = getattr(cfg, name)
        if isinstance(value, BaseModel):
            out[name] = absolute_paths(value)
        elif PATH in field.metadata and value:
            out[name] = value if "://" in value else os.path.abspath(value)  # a bucket URI stays as it is
        else:
            out[name] = value.model_dump() if isinstance(value, BaseModel) else value
    return out


def save_config(cfg: BaseModel, path: str | Path) -> None:
    """The config as loaded (after --set), data paths absolute: `load_config(path, schema=type(cfg))` reads it back
    from any working directory."""
    Path(path).write_text(yaml.safe_dump(absolute_paths(cfg), sort_keys=False))
