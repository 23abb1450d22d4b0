import pytest

from sfcd.models.schedule import PYTHIA_STEPS, checkpoint_steps, lr_factor


def test_pythia_schedule_is_reproduced():
    assert len(PYTHIA_STEPS) == 154
    assert checkpoint_steps(143000, log_until=512, every=1000) == list(PYTHIA_STEPS)


def test_small_schedule_and_extras():
    assert checkpoint_steps(100, log_until=16, every=40, extra=(7, 500)) == [
        0,
        1,
        2,
        4,
        7,
        8,
        16,
        40,
        80,
        100,
    ]


def test_lr_warmup_then_cosine_to_min_ratio():
    assert lr_factor(0, 100, 10, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, 0.1) == pytest.approx(1.0)
    assert lr_factor(100, 100, 10, 0.1) == pytest.approx(0.1)
    mids = [lr_factor(s, 100, 10, 0.1) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(mids, mids[1:], strict=False))
