"""The step line's time left (hvpmtl/train/progress.py): the pace of this process's own steps, hand-derived."""
from hvpmtl.train.progress import Eta


def test_time_left_is_the_pace_so_far_times_the_steps_left():
    eta = Eta(step=40, total=186)  # resumed at step 40: the pace counts only the steps this process ran
    t0 = eta.t0
    assert eta.text(40, now=t0 + 5) == ""  # no step done yet: no guess
    assert eta.text(50, now=t0 + 20) == "eta 4m32s"  # 2 s per step x 136 steps left = 272 s
    assert eta.text(186, now=t0 + 300) == "eta 0m00s"
    long = Eta(step=0, total=3601)
    assert long.text(1, now=long.t0 + 1) == "eta 1h00m"  # 3600 s left at 1 s per step
