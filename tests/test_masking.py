"""Mask-ratio schedules (Masking Warmup, FX, UNI, CD, MAR), ratio -> token mask, and the decoding
schedule of MAR inference."""

from __future__ import annotations

import math

import pytest
import torch

from dream_core.masking import (
    MaskSchedule,
    build_schedule,
    cooldown_masking,
    decoding_schedule,
    fixed_masking,
    fraction_decided,
    mar_masking,
    masking_warmup,
    no_masking,
    num_masked,
    random_token_mask,
    truncated_normal,
    uniform_masking,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("std", [0.45, 0.55])
def test_masking_warmup_mean_moves_linearly_from_0_to_1_then_stays(std):
    s = masking_warmup(std=std, warmup_epochs=36)
    assert (s.low, s.high, s.std) == (0.0, 1.0, std)
    for epoch in [0.0, 0.5, 3.0, 9.0, 18.0, 27.0, 35.9]:
        assert s.mean(epoch) == pytest.approx(epoch / 36)
    for epoch in [36.0, 36.1, 48.0, 1000.0]:
        assert s.mean(epoch) == 1.0
    assert s.mean(-1.0) == 0.0


def test_masking_warmup_sampled_mean_follows_the_spec_table():
    """E[r] of N(mu, 0.45^2) truncated to [0, 1] (spec §2.1, computed with scipy): 0.338 at mu = 0,
    0.500 at mu = 0.5, 0.662 at mu = 1."""
    s = masking_warmup()
    for epoch, expected in [(0, 0.338), (18, 0.500), (36, 0.662), (48, 0.662)]:
        r = s.sample(epoch, 20000, _gen(epoch))
        assert float(r.mean()) == pytest.approx(expected, abs=0.01), epoch


@pytest.mark.parametrize("schedule", [masking_warmup(), masking_warmup(0.55), mar_masking(), fixed_masking(),
                                      uniform_masking(), cooldown_masking(), no_masking()])
def test_sampled_ratios_respect_the_truncation_bounds(schedule):
    for epoch in [0, 7.5, 18, 36, 60]:
        r = schedule.sample(epoch, 4000, _gen(1))
        assert r.dtype == torch.float32 and r.shape == (4000,)
        assert float(r.min()) >= schedule.low and float(r.max()) <= schedule.high


def test_per_sample_ratios_differ_within_one_batch():
    for schedule in (masking_warmup(), mar_masking(), uniform_masking()):
        r = schedule.sample(10.0, 64, _gen(2))
        assert len(set(r.tolist())) == 64
    # Light and heavy masking coexist in one batch during the warm-up.
    r = masking_warmup().sample(18.0, 256, _gen(3))
    assert float(r.min()) < 0.25 and float(r.max()) > 0.75


def test_per_sample_false_gives_one_ratio_for_the_batch():
    r = masking_warmup().sample(10.0, 32, _gen(4), per_sample=False)
    assert r.shape == (32,) and len(set(r.tolist())) == 1
    # Different calls still draw different ratios.
    g = _gen(5)
    a = masking_warmup().sample(10.0, 8, g, per_sample=False)
    b = masking_warmup().sample(10.0, 8, g, per_sample=False)
    assert a[0] != b[0]


def test_sampling_is_reproducible_from_the_generator():
    s = masking_warmup()
    assert torch.equal(s.sample(5.0, 16, _gen(7)), s.sample(5.0, 16, _gen(7)))
    assert not torch.equal(s.sample(5.0, 16, _gen(7)), s.sample(5.0, 16, _gen(8)))


def test_fx_is_a_fixed_gaussian_centred_at_one():
    s = fixed_masking()
    assert (s.std, s.low, s.high) == (0.45, 0.0, 1.0)
    assert [s.mean(e) for e in (0, 18, 36, 100)] == [1.0] * 4
    assert float(s.sample(0, 20000, _gen(0)).mean()) == pytest.approx(0.662, abs=0.01)


def test_uni_is_uniform_on_0_1():
    s = uniform_masking()
    r = s.sample(0, 20000, _gen(0))
    assert float(r.mean()) == pytest.approx(0.5, abs=0.01)
    hist = torch.histc(r, bins=4, min=0, max=1) / 20000
    torch.testing.assert_close(hist, torch.full((4,), 0.25), atol=0.02, rtol=0)
    # Same distribution at every epoch.
    assert float(s.sample(40, 20000, _gen(1)).mean()) == pytest.approx(0.5, abs=0.01)


def test_cd_mean_moves_from_1_to_0_then_stays():
    s = cooldown_masking()
    for epoch in [0.0, 9.0, 18.0, 27.0]:
        assert s.mean(epoch) == pytest.approx(1 - epoch / 36)
    for epoch in [36.0, 48.0]:
        assert s.mean(epoch) == 0.0
    assert float(s.sample(40, 20000, _gen(0)).mean()) == pytest.approx(0.338, abs=0.01)


def test_mar_masking_is_n_1_025_truncated_to_0_7_1():
    s = mar_masking()
    assert (s.mean(0), s.std, s.low, s.high) == (1.0, 0.25, 0.7, 1.0)
    r = s.sample(0, 20000, _gen(0))
    assert float(r.min()) >= 0.7 and float(r.max()) <= 1.0
    assert float(r.mean()) == pytest.approx(0.867, abs=0.01)  # spec §2.1


def test_no_masking_keeps_every_token():
    assert torch.equal(no_masking().sample(3, 10, _gen(0)), torch.zeros(10))


def test_cosine_shape_eases_in_and_out():
    s = MaskSchedule(ramp_end=10.0, shape="cosine")
    assert s.mean(0) == 0.0 and s.mean(10) == 1.0
    assert s.mean(5) == pytest.approx(0.5)
    assert s.mean(2) == pytest.approx(0.5 * (1 - math.cos(math.pi * 0.2)))


def test_build_schedule_by_name():
    assert build_schedule("warmup", std=0.55).std == 0.55
    assert build_schedule("mar") == mar_masking()
    for name in ("fx", "uni", "cd", "none"):
        assert isinstance(build_schedule(name), MaskSchedule)
    with pytest.raises(ValueError, match="unknown masking schedule 'wm'"):
        build_schedule("wm")


@pytest.mark.parametrize("kwargs, match", [
    (dict(low=0.5, high=0.2), "low <= high"),
    (dict(high=1.5), "low <= high"),
    (dict(std=-0.1), "std"),
    (dict(ramp_start=10.0, ramp_end=5.0), "ramp_end"),
    (dict(shape="square"), "shape"),
])
def test_impossible_schedules_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MaskSchedule(**kwargs)


def test_truncated_normal_with_zero_std_is_the_clamped_mean():
    assert truncated_normal(1.4, 0.0, 0.0, 1.0, 3).tolist() == [1.0, 1.0, 1.0]


# ---------------------------------------------------------------------------------------------
# Ratio -> token mask
# ---------------------------------------------------------------------------------------------


def test_token_counts_are_ceil_of_ratio_times_length():
    ratios = torch.tensor([0.0, 0.01, 0.5, 0.7, 0.75, 0.99, 1.0])
    assert num_masked(ratios, 16).tolist() == [0, 1, 8, 12, 12, 16, 16]
    assert num_masked(ratios, 256).tolist() == [0, 3, 128, 180, 192, 254, 256]
    # Exactly representable products are not bumped up by rounding.
    assert num_masked(torch.tensor([0.25, 0.5], dtype=torch.float64), 4).tolist() == [1, 2]


def test_random_token_mask_masks_each_samples_own_random_positions():
    ratios = torch.tensor([0.0, 0.3, 0.3, 0.3, 1.0])
    mask = random_token_mask(ratios, 64, _gen(0))
    assert mask.dtype == torch.bool and mask.shape == (5, 64)
    assert mask.sum(dim=1).tolist() == [0, 20, 20, 20, 64]
    assert not torch.equal(mask[1], mask[2]) and not torch.equal(mask[2], mask[3])
    assert torch.equal(mask, random_token_mask(ratios, 64, _gen(0)))
    # Every position is equally likely to be masked.
    many = random_token_mask(torch.full((4000,), 0.5), 16, _gen(1)).float().mean(dim=0)
    torch.testing.assert_close(many, torch.full((16,), 0.5), atol=0.04, rtol=0)


# ---------------------------------------------------------------------------------------------
# Decoding schedule
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seq_len", [1, 2, 16, 64, 256])
def test_decoding_schedule_is_strictly_decreasing_to_zero_for_every_step_count(seq_len):
    for steps in range(1, seq_len + 1):
        sched = decoding_schedule(steps, seq_len)
        assert len(sched) == steps
        assert sched[-1] == 0
        prev = seq_len
        for n in sched:
            assert 0 <= n < prev, (steps, sched)
            prev = n


def test_decoding_schedule_follows_mar_cosine():
    # MAR: floor(L * cos(pi/2 * (k+1)/S)) clamped to [1, masked - 1]; spec §3.1's table for S = 64.
    sched = decoding_schedule(64, 256)
    after = [7, 15, 19, 20, 23, 31, 39, 47, 55, 63]
    assert [256 - sched[k] for k in after] == [8, 20, 31, 34, 44, 75, 114, 159, 207, 256]
    remaining = 256
    for k in range(63):
        official = max(1, min(remaining - 1, math.floor(256 * math.cos(math.pi / 2 * (k + 1) / 64))))
        assert sched[k] == official
        remaining = official
    assert decoding_schedule(1, 16) == [0]
    assert decoding_schedule(16, 16) == list(range(15, -1, -1))


@pytest.mark.parametrize("steps", [0, -1, 17])
def test_decoding_schedule_rejects_impossible_step_counts(steps):
    with pytest.raises(ValueError, match="num_inference_steps"):
        decoding_schedule(steps, 16)


def test_fraction_decided_before_each_step():
    sched = decoding_schedule(8, 16)
    assert fraction_decided(0, 8, 16) == 0.0
    for step in range(1, 9):
        assert fraction_decided(step, 8, 16) == pytest.approx(1 - sched[step - 1] / 16)
    assert fraction_decided(8, 8, 16) == 1.0
