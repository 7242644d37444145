"""The trainers' exit codes (docs/CLUSTER.md): 0 finished, 2 config or data error (a message, no traceback),
3 preempted (checkpoint saved, requeue me), 4 too many non-finite losses or skipped steps, 5 another rank died or
hung (named in the message), 6 the run's saved state cannot be used safely (output_dir locked by another job, no
loadable checkpoint, a load that failed half-way, --resume none into a used folder, lock lost:
hvpmtl.checkpoint.CheckpointError)."""
from hvpmtl import checkpoint

EXIT_OK, EXIT_CONFIG, EXIT_PREEMPTED, EXIT_NONFINITE, EXIT_PEER_LOST = 0, 2, 3, 4, 5
EXIT_CHECKPOINT = checkpoint.EXIT_CHECKPOINT  # 6
