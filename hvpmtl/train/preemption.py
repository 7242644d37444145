"""Preemption: Slurm's --signal (SIGUSR1) or SIGTERM sets a flag that the next step's one all-reduce carries to
every rank; the loop then saves a checkpoint and exits 3 for the requeue (hvpmtl/train/exit_codes.py)."""
import signal


class Preemption:
    """SIGUSR1 (Slurm's --signal) or SIGTERM: finish the step, checkpoint, exit 3."""

    def __init__(self):
        self.requested = False
        for s in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(s, self._handler)

    def _handler(self, signum, frame):
        self.requested = True
