"""Configuration of both trainers: pydantic models, YAML with `base:` inheritance, `--set` overrides.

`ExperimentConfig` (pre-training) and `FinetuneConfig` share their `run`, `optim` and `tracking`
sections (`RunSection`, `OptimSection`, `TrackingConfig`) and one loader, `load_config(path, overrides,
schema=...)`. Every key is typed and every number bounded; pydantic checks types and bounds, the
schema's `check` the rules that tie keys together. A config is validated in the launcher before any
worker starts, so a typo costs seconds, not a queued 64-GPU allocation. Errors name the file and the
dotted key; a renamed key (RENAMED) is refused with its new name. `save_config` writes the paths of the
run's data absolute, so the saved copy works from any directory.

This package's public API is what it imports here; its files, each importing only those listed before it:
errors.py (ConfigError, messages), sections.py (bounds, types, the shared sections and checks, batch sizes),
pretrain.py (ExperimentConfig), finetune.py (FinetuneConfig), yaml_input.py (files and --set overrides, under
bounds), load.py (load_config, save_config).
"""
from hvpmtl.config.errors import MAX_ERRORS, RENAMED, SHOWN, ConfigError
from hvpmtl.config.finetune import (TASK_FORMATS, TASKS, FinetuneConfig, FTDataConfig, FTModelConfig, FTOptimConfig,
                                    FTRunConfig)
from hvpmtl.config.load import absolute_paths, flatten, load_config, save_config, to_dict
from hvpmtl.config.pretrain import (PRETRAIN_FORMATS, ASLConfig, DataConfig, DistillConfig, ExperimentConfig, MIMConfig,
                                    ModelConfig, ObjectivesConfig, OptimConfig, RunConfig, SwAVConfig)
from hvpmtl.config.sections import (MAX_BATCH, MAX_CLASSES, MAX_EPOCHS, MAX_LR, MAX_SCALE, MAX_SEED, MAX_SIDE,
                                    MAX_STEPS, MAX_WIDTH, PATH, TRACKING_SCHEMES, WEEK_S, Float, OptimSection,
                                    PathStr, RunSection, Section, TrackingConfig, check_batch_sizes,
                                    check_tracking_uri)
from hvpmtl.config.yaml_input import MAX_BASES, MAX_DEPTH, MAX_FILE_BYTES, MAX_VALUES, parse_override

__all__ = [
    # errors
    "ConfigError", "RENAMED", "MAX_ERRORS", "SHOWN",
    # bounds, types and the sections both trainers share
    "WEEK_S", "MAX_STEPS", "MAX_EPOCHS", "MAX_SIDE", "MAX_BATCH", "MAX_CLASSES", "MAX_WIDTH", "MAX_SEED", "MAX_LR",
    "MAX_SCALE", "Float", "PATH", "PathStr", "Section", "RunSection", "OptimSection", "TRACKING_SCHEMES",
    "check_tracking_uri", "TrackingConfig", "check_batch_sizes",
    # pre-training
    "PRETRAIN_FORMATS", "ModelConfig", "DataConfig", "ASLConfig", "SwAVConfig", "MIMConfig", "DistillConfig",
    "ObjectivesConfig", "OptimConfig", "RunConfig", "ExperimentConfig",
    # fine-tuning
    "TASKS", "TASK_FORMATS", "FTModelConfig", "FTDataConfig", "FTOptimConfig", "FTRunConfig", "FinetuneConfig",
    # reading and writing
    "MAX_FILE_BYTES", "MAX_DEPTH", "MAX_VALUES", "MAX_BASES", "parse_override", "load_config", "save_config",
    "absolute_paths", "to_dict", "flatten",
]
