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
    """Warmup over 10 steps, then a cosine from 1 to 0.2 over the 100 steps after: at a quarter of the decay the
    cosine is at (1 + cos(pi / 4)) / 2 = 0.854 of the way down from 1 (a linear decay would be at 0.75), at half
    way at the mean of 1 and 0.2. Bugs caught: a linear decay, the decay counted from step 0 (not from the end of
    warmup), warmup off by one step."""
    assert lr_factor(0, 110, 10, 0.2) == pytest.approx(0.1)  # (step + 1) / warmup
    assert lr_factor(9, 110, 10, 0.2) == pytest.approx(1.0)
    assert lr_factor(10, 110, 10, 0.2) == pytest.approx(1.0)
    assert lr_factor(35, 110, 10, 0.2) == pytest.approx(0.2 + 0.8 * (1 + 2**-0.5) / 2)
    assert lr_factor(60, 110, 10, 0.2) == pytest.approx(0.6)
    assert lr_factor(110, 110, 10, 0.2) == pytest.approx(0.2)
    mids = [lr_factor(s, 110, 10, 0.2) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(mids, mids[1:], strict=False))
