"""Rank 0's view of the loop's progress: a tqdm bar of the steps (run.progress_bar, when stderr is a terminal),
else a line of the step's figures every run.log_every steps."""
from __future__ import annotations

import sys
import time


def open_bar(cfg, is_main: bool, total: int, initial: int, desc: str):
    """A tqdm bar of the run's steps on rank 0 when run.progress_bar is on and stderr is a terminal, else None."""
    if is_main and cfg.run.progress_bar and sys.stderr.isatty():
        from tqdm import tqdm
        return tqdm(total=total, initial=initial, desc=desc, unit="step")
    return None


def show_step(bar, metrics: dict, keys: list[str], logging_step: bool, head: str) -> None:
    """One optimizer step on the console: the bar moves on with the step's figures (but the LR), or on a logging
    step `head` and the figures are printed. Both end with the perf short form (data wait, MFU)."""
    short = {"wait": metrics.get("perf/data_wait_frac"), "mfu": metrics.get("perf/mfu")}
    short = {k: f"{v:.1%}" for k, v in short.items() if v is not None}
    if bar is not None:
        bar.update(1)
        bar.set_postfix({**{k: f"{metrics[k]:.4g}" for k in keys if k != "lr"}, **short}, refresh=False)
    elif logging_step:
        parts = " ".join([*(f"{k}={metrics[k]:.4g}" for k in keys), *(f"{k}={v}" for k, v in short.items())])
        print(f"{head} {parts}", flush=True)


class Eta:
    """Time left at the pace of this process's steps so far (evaluations and checkpoints included: the wall
    time a user waits), from the step it started at; '' until a step is done."""

    def __init__(self, step: int, total: int):
        self.t0, self.step0, self.total = time.monotonic(), step, total

    def text(self, step: int, now: float | None = None) -> str:
        done = step - self.step0
        if done <= 0:
            return ""
        left = max(self.total - step, 0) * ((now if now is not None else time.monotonic()) - self.t0) / done
        m, s = divmod(int(round(left)), 60)
        return f"eta {m // 60}h{m % 60:02d}m" if m >= 60 else f"eta {m}m{s:02d}s"
