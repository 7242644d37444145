"""A checkpoint of another world size, re-partitioned through DeepSpeed's universal checkpoint.

Rank 0 converts the chosen tag (`deepspeed.checkpoint.ds_to_universal`) into `checkpoints/.universal/<tag>`
before the model is built; then every rank loads its new ZeRO partition of the fp32 master weights and Adam
moments (`load_universal`, see run.resume). The converter and DeepSpeed's loader unpickle without
restriction, so every file they read is checked by the weights-only unpickler first. The per-rank state
follows rank_state.rank_state_for_world.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import hvpmtl.checkpoint.safe_load as safe_load
from hvpmtl.checkpoint.manifest import UNIVERSAL_DIR, CheckpointError, check_unpickles, glob_safe, rank0_decides
from hvpmtl.dist import gather_objects


def convert_for_world(run, choice, rank: int, world: int, log):
    """Re-partition the chosen checkpoint (run.Choice) of another world size for this one with DeepSpeed's
    universal checkpoint converter (rank 0), before any engine exists; returns the choice with its
    universal_root set. Collective."""
    saved = choice.manifest["world_size"]
    root = run.ckpt_dir / UNIVERSAL_DIR
    out = root / choice.tag_dir.name
    command = (f"python -m deepspeed.checkpoint.ds_to_universal --input_folder {choice.tag_dir} "
               f"--output_folder {out} --inject_missing_state")

    def convert():
        log(f"{choice.tag_dir.name} was written by {saved} rank(s), resuming on {world}: converting it "
            f"to a universal checkpoint in {out}")
        shutil.rmtree(out, ignore_errors=True)
        try:
            universal(choice.tag_dir, out)
        except Exception as e:  # noqa: BLE001 — any failure of the converter is a refusal
            raise CheckpointError(f"{choice.tag_dir} was written by {saved} rank(s) and cannot be re-partitioned "
                                  f"for {world} ({type(e).__name__}: {e}). Resume on {saved} rank(s), or convert "
                                  f"it yourself: {command}") from None

    rank0_decides(convert)
    bad = ""
    for p in sorted(out.rglob("*.pt")):  # the converter's output is read by DeepSpeed's own torch.load
        try:
            check_unpickles(p)
        except safe_load.UnsafeFileError as e:
            bad = str(e)
            break
    if any(gather_objects(bad)):
        raise CheckpointError(f"the universal checkpoint {out} cannot be read safely: {bad or 'on another rank'}")
    choice.universal_root = root
    return choice


def universal(tag_dir: Path, out: Path, workers: int = 1) -> None:
    """DeepSpeed's ZeRO -> universal checkpoint conversion of one tag (files checked weights-only first:
    the converter unpickles them without restriction)."""
    from argparse import Namespace

    from deepspeed.checkpoint import ds_to_universal

    for p in sorted(tag_dir.glob("*.pt")):
        check_unpickles(p)
    out.parent.mkdir(parents=True, exist_ok=True)
    with glob_safe(tag_dir) as src, glob_safe(out.parent) as dst:
        ds_to_universal.main(Namespace(input_folder=str(src), output_folder=str(dst / out.name),
                                       num_extract_workers=workers, num_merge_workers=workers,
                                       keep_temp_folder=False, strict=True, inject_missing_state=True))
    (out.parent / "latest_universal").unlink(missing_ok=True)  # written by the converter; hvpmtl names tags itself
