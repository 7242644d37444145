"""Run checkpoints and every reader of them, below both train/ and eval/.

    manifest.py    a tag on disk: names, the manifest, the checks before trusting it, CheckpointError
    rank_state.py  per-rank state: RNG streams, the data position and queue for another world size
    finite.py      only a finite state is saved or resumed
    run.py         open_run (lock, resume decision), resume, rollback
    convert.py     a checkpoint of another world size, through DeepSpeed's universal checkpoint
    save.py        save (manifest last, atomically) and prune
    weights.py     reading weights for export, evaluation and fine-tuning
    safe_load.py   loading exchanged files without running code from them
    run_lock.py    the exclusive lock of a run's output directory

What the trainers, exporters and evaluators use is importable from here (`from hvpmtl import checkpoint`).
"""
from hvpmtl.checkpoint.finite import NonFiniteState, check_finite, nonfinite_state
from hvpmtl.checkpoint.manifest import (EXIT_CHECKPOINT, MANIFEST, MODEL_FILE, RESUME_MODES, SUPERSEDED_DIR,
                                        CheckpointError, candidates, check_contents, check_presence, is_complete,
                                        read_manifest, resolve_tag, step_of, tag_dirs, tag_for)
from hvpmtl.checkpoint.rank_state import rank_state_for_world, rng_state, set_rng_state
from hvpmtl.checkpoint.run import Choice, RunState, folder_run_id, new_run_id, open_run, resume, rollback
from hvpmtl.checkpoint.run_lock import LockError, RunLock
from hvpmtl.checkpoint.safe_load import UnsafeFileError
from hvpmtl.checkpoint.save import prune, save
from hvpmtl.checkpoint.weights import TIMM_PREFIX, read_backbone, read_backbone_file, read_weights

__all__ = ["EXIT_CHECKPOINT", "MANIFEST", "MODEL_FILE", "RESUME_MODES", "SUPERSEDED_DIR", "TIMM_PREFIX",
           "CheckpointError", "Choice", "LockError", "NonFiniteState", "RunLock", "RunState", "UnsafeFileError", "candidates",
           "check_contents", "check_finite", "check_presence", "folder_run_id", "is_complete", "new_run_id",
           "nonfinite_state", "open_run", "prune", "rank_state_for_world", "read_backbone", "read_backbone_file",
           "read_manifest", "read_weights", "resolve_tag", "resume", "rng_state", "rollback", "save",
           "set_rng_state", "step_of", "tag_dirs", "tag_for"]
