"""The per-step schedules (hand-derived values): LR warm-up + cosine of both trainers, EMA momentum, and the
EMA teacher's default-backbone policy."""
import math

import pytest

from hvpmtl.config import FinetuneConfig, load_config
from hvpmtl.schedules import Schedule, default_weights, lr_schedule, momentum_schedule, teacher_init_share


def test_warmup_then_cosine_hand_values():
    lr, min_lr = 1e-4, 1e-7
    schedule = Schedule(lr, min_lr, total_steps=110, warmup_steps=10)

    def lr_factor(step, *_):
        return schedule[step] / lr

    # 10 warm-up steps: step 0 -> 1/10, step 9 -> 1
    assert lr_factor(0, 10, 110, lr, min_lr) == pytest.approx(0.1)
    assert lr_factor(9, 10, 110, lr, min_lr) == pytest.approx(1.0)
    # right after warm-up: the peak
    assert lr_factor(10, 10, 110, lr, min_lr) * lr == pytest.approx(lr)
    # half-way through the cosine: (lr + min_lr) / 2
    assert lr_factor(60, 10, 110, lr, min_lr) * lr == pytest.approx((lr + min_lr) / 2)
    # a quarter: min + (lr - min) * (1 + cos(pi/4)) / 2
    assert lr_factor(35, 10, 110, lr, min_lr) * lr == pytest.approx(min_lr + (lr - min_lr) * (1 + math.cos(math.pi / 4)) / 2)
    # the end and beyond: min_lr
    assert lr_factor(110, 10, 110, lr, min_lr) * lr == pytest.approx(min_lr)
    assert lr_factor(500, 10, 110, lr, min_lr) * lr == pytest.approx(min_lr)



def test_fine_tuning_warms_up_from_warmup_lr_on_the_same_schedule():
    """Fine-tuning starts its warm-up at optim.warmup_lr (SimMIM's 2.5e-7), one increment per step as
    pre-training, then the same cosine to min_lr."""
    s = Schedule(1.0, 0.01, total_steps=110, warmup_steps=10, start=0.1)
    assert s[0] == pytest.approx(0.1 + 0.9 * 1 / 10)
    assert s[5] == pytest.approx(0.1 + 0.9 * 6 / 10)
    assert s[9] == pytest.approx(1.0) and s[10] == pytest.approx(1.0)
    assert s[60] == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert s[110] == pytest.approx(0.01)
    cfg = load_config("configs/finetune_tiny.yaml", ["model.random_init=true", "data.train_dir=a", "data.val_dir=b"],
                      schema=FinetuneConfig)
    ft = lr_schedule(cfg.optim, 1.0, steps_per_epoch=6, start=cfg.optim.warmup_lr)
    assert len(ft) == cfg.optim.epochs * 6 + 1 and ft[0] == pytest.approx(2.5e-7 + (1 - 2.5e-7) / 3)


def test_poly_and_step_shapes_hand_values():
    """UperNet's poly decay (power 1: a straight line to min_lr) and Mask R-CNN 1x's drops (x0.1 at epochs 8
    and 11 of 12), after the same warm-up."""
    poly = Schedule(1.0, 0.0, total_steps=110, warmup_steps=10, shape="poly", power=1.0)
    assert poly[9] == pytest.approx(1.0) and poly[10] == pytest.approx(1.0)
    assert poly[60] == pytest.approx(0.5) and poly[85] == pytest.approx(0.25) and poly[110] == 0.0
    sq = Schedule(1.0, 0.1, total_steps=10, shape="poly", power=2.0)
    assert sq[5] == pytest.approx(0.1 + 0.9 * 0.25)
    step = Schedule(2.0, 0.0, total_steps=12, warmup_steps=2, shape="step", drops=(8, 11), rate=0.1)
    assert [step[s] for s in (0, 1)] == pytest.approx([1.0, 2.0])
    assert [step[s] for s in (2, 7, 8, 10, 11, 12)] == pytest.approx([2.0, 2.0, 0.2, 0.2, 0.02, 0.02])
    cfg = load_config("configs/finetune_tiny.yaml", ["model.random_init=true", "data.train_dir=a", "data.val_dir=b",
                                                      "optim.schedule=step", "optim.decay_epochs=[1.0]",
                                                      "optim.warmup_epochs=0"], schema=FinetuneConfig)
    s = lr_schedule(cfg.optim, 1.0, steps_per_epoch=5)
    assert [s[i] for i in (4, 5, 9)] == pytest.approx([1.0, 0.1, 0.1])
    assert len(lr_schedule(cfg.optim, 1.0, steps_per_epoch=5, total_steps=7)) == 8  # optim.max_steps ends it


def test_a_run_capped_far_before_its_epochs_allocates_only_its_own_steps():
    """optim.epochs=1e5 with max_steps=2: the values up to the run's end, same shape as the uncapped schedule."""
    capped = Schedule(1.0, 0.0, total_steps=10**9, warmup_steps=10, length=2)
    assert len(capped) == 3
    full = Schedule(1.0, 0.0, total_steps=1000, warmup_steps=10)
    assert [Schedule(1.0, 0.0, total_steps=1000, warmup_steps=10, length=20)[s] for s in (5, 15, 20, 99)] == \
        pytest.approx([full[5], full[15], full[20], full[20]])


def test_teacher_momentum_schedule():
    cfg = load_config("configs/test_tiny.yaml", ["objectives.distill.momentum_schedule=cosine",
                                                  "objectives.distill.momentum=0.99"])

    def teacher_momentum(cfg, step, total):
        return momentum_schedule(cfg.objectives.distill, total)[step]

    assert teacher_momentum(cfg, 0, 100) == pytest.approx(0.99)
    assert teacher_momentum(cfg, 50, 100) == pytest.approx(0.995)
    assert teacher_momentum(cfg, 100, 100) == pytest.approx(1.0)
    assert teacher_momentum(load_config("configs/test_tiny.yaml"), 50, 100) == 0.995


def test_default_backbone_is_the_student_until_the_teacher_has_left_its_random_start():
    cfg = load_config("configs/test_tiny.yaml")
    share, exact = teacher_init_share(cfg, 186)
    assert exact and share == pytest.approx(0.995 ** 186) and 0.39 < share < 0.40  # the demo's 186 steps
    assert default_weights(cfg, 186, True)[0] == "student"
    assert default_weights(cfg, 1000, True)[0] == "teacher"  # 0.995^1000 = 0.7% left
    assert default_weights(cfg, 10**6, False)[0] == "student"
    cos = load_config("configs/test_tiny.yaml", ["objectives.distill.momentum_schedule=cosine",
                                                 "objectives.distill.momentum=0.99", "optim.max_steps=400"])
    m = momentum_schedule(cos.objectives.distill, 400)
    expect = float(math.prod([m[t] for t in range(1, 401)]))
    share, exact = teacher_init_share(cos, 400)
    assert exact and share == pytest.approx(expect, rel=1e-9) and share > 0.99 ** 400
