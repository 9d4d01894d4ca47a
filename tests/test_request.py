"""GenerationRequest: every bad value is refused with one sentence naming the field and the allowed
range, nothing is clamped or rounded, defaults are resolved from the model, and the limits the
app and evaluation use are the request's."""

from __future__ import annotations

import re

import numpy as np
import pytest

from dream_core import request as rq
from dream_core.config import DreamConfig
from dream_core.masking import fraction_decided
from dream_core.request import GenerationRequest, SamplerSettings
from dream_core.request import GUIDANCE_SCHEDULES, default_decision_step

TINY = DreamConfig.preset("tiny")  # 16 tokens, 1000 diffusion steps
OK = dict(num_inference_steps=8)

BAD = [
    (dict(prompt=""), "prompt must not be empty"),
    (dict(prompt=None), "prompt must be a string or a list of strings, got NoneType"),
    (dict(prompt="a " * 600), "prompt is too long (1199 characters, at most 1000)"),
    (dict(prompt=["a", "b"]), "prompt must be a single string (one request per prompt)"),
    (dict(negative_prompt=3), "negative_prompt must be a string, got int"),
    (dict(num_candidates=0), "num_candidates must be between 1 and 64, got 0"),
    (dict(num_candidates=65), "num_candidates must be between 1 and 64, got 65"),
    (dict(num_candidates=2.5), "num_candidates must be an integer, got 2.5"),
    (dict(num_candidates=4.0), "num_candidates must be an integer, got 4.0"),
    (dict(num_candidates=True), "num_candidates must be an integer, got True"),
    (dict(num_candidates=float("nan")), "num_candidates must be an integer, got nan"),
    (dict(num_inference_steps=0), "num_inference_steps must be between 1 and 16, got 0"),
    (dict(num_inference_steps=17), "num_inference_steps must be between 1 and 16, got 17"),
    (dict(num_candidates=2, num_inference_steps=1),
     "with more than one candidate, num_inference_steps must be at least 2 (the decision happens before the last step)"),
    (dict(num_candidates=2, decision_step=8), "decision_step must be between 1 and 7, got 8"),
    (dict(num_candidates=2, decision_step=0), "decision_step must be between 1 and 7, got 0"),
    (dict(num_candidates=1, decision_step=9), "decision_step must be between 1 and 7, got 9"),  # even for K = 1
    (dict(num_candidates=2, decision_step=(4, 2)), "decision_step list must be strictly increasing, got [4, 2]"),
    (dict(num_candidates=2, decision_step=()),
     "decision_step must name at least one step (or be None for the model's default)"),
    (dict(num_candidates=2, decision_step="3"), "decision_step must be an integer, got '3'"),
    (dict(guidance_scale=10.5), "guidance_scale must be between 0.0 and 10.0, got 10.5"),
    (dict(guidance_scale=-0.1), "guidance_scale must be between 0.0 and 10.0, got -0.1"),
    (dict(guidance_scale=float("nan")), "guidance_scale must be a number, got nan"),
    (dict(guidance_scale=True), "guidance_scale must be a number, got True"),
    (dict(guidance_scale="3"), "guidance_scale must be a number, got '3'"),
    (dict(guidance_schedule="cosine"), "guidance_schedule must be one of constant, linear, got 'cosine'"),
    (dict(temperature=2.5), "temperature must be between 0.0 and 2.0, got 2.5"),
    (dict(temperature=float("inf")), "temperature must be a number, got inf"),
    (dict(head_steps=0), "head_steps must be between 1 and 1000, got 0"),
    (dict(head_steps=1001), "head_steps must be between 1 and 1000, got 1001"),
    (dict(head_sampler="euler"), "head_sampler must be one of ancestral, ddim, dpm-solver++, got 'euler'"),
    (dict(head_sampler=3), "head_sampler must be one of ancestral, ddim, dpm-solver++, got 3"),
    (dict(num_candidates=9, decision_step=(2, 4), num_kept=3),
     "num_kept must be a list of candidate counts (one per decision step), got 3"),
    (dict(num_candidates=9, decision_step=(2, 4), num_kept=()),
     "num_kept must give at least one count (or be None for successive halving)"),
    (dict(num_candidates=9, decision_step=(2, 4), num_kept=(2.5, 1)), "num_kept must be an integer, got 2.5"),
    (dict(num_candidates=9, decision_step=(2, 4), num_kept=(0, 1)), "num_kept must be between 1 and 64, got 0"),
    (dict(num_candidates=9, decision_step=(2, 4), num_kept=(3, 3)),
     "num_kept must be strictly decreasing (every decision prunes), got [3, 3]"),
    (dict(num_candidates=9, decision_step=(2, 4), num_kept=(4, 2)),
     "num_kept must end at 1 (the last decision picks the image), got [4, 2]"),
    (dict(num_candidates=9, decision_step=(2, 4), num_kept=(1,)),
     "num_kept must give one count per decision step: 1 count for 2 decision steps"),
    (dict(num_candidates=9, decision_step=4, num_kept=(3, 1)),
     "num_kept must give one count per decision step: 2 counts for 1 decision step"),
    (dict(num_candidates=3, decision_step=(2, 4), num_kept=(3, 1)),
     "num_kept must start below num_candidates=3 (the first decision prunes), got [3, 1]"),
    (dict(num_candidates=9, num_kept=(3, 1)), "num_kept gives 2 counts but the model's default is one decision "
                                              "step; name the decision steps with decision_step (one count per step)"),
    (dict(num_candidates=1, num_kept=(2, 2)), "num_kept must be strictly decreasing (every decision prunes), "
                                              "got [2, 2]"),  # even for K = 1
    (dict(seed=-5), "seed must be between 0 and 4294967295, got -5"),
    (dict(seed=2**32), "seed must be between 0 and 4294967295, got 4294967296"),
    (dict(seed=7.0), "seed must be an integer, got 7.0"),
    (dict(num_images=0), "num_images must be between 1 and 8, got 0"),
    (dict(num_images=9), "num_images must be between 1 and 8, got 9"),
    (dict(shared_order=1), "shared_order must be true or false, got 1"),
]


@pytest.mark.parametrize("kwargs, message", BAD)
def test_each_bad_value_is_refused_with_its_message(kwargs, message):
    args = {"prompt": "a red circle", **OK, **kwargs}
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        GenerationRequest(**args).validate(TINY)


def test_nothing_is_clamped_or_rounded_at_the_limits():
    top = GenerationRequest("a red circle", num_candidates=rq.MAX_CANDIDATES, decision_step=15,
                            num_inference_steps=16, guidance_scale=rq.MAX_GUIDANCE_SCALE,
                            temperature=rq.MAX_TEMPERATURE, head_steps=1000, seed=rq.MAX_SEED,
                            num_images=rq.MAX_IMAGES).validate(TINY)
    assert (top.num_candidates, top.decision_step, top.num_inference_steps, top.guidance_scale, top.temperature,
            top.head_steps, top.seed, top.num_images) == (64, 15, 16, 10.0, 2.0, 1000, 2**32 - 1, 8)
    low = GenerationRequest("a red circle", num_inference_steps=1, guidance_scale=0.0, temperature=0.0,
                            head_steps=1, seed=0).validate(TINY)
    assert (low.num_inference_steps, low.guidance_scale, low.temperature, low.head_steps, low.seed) == (1, 0.0, 0.0, 1, 0)
    # Numpy integers are integers; values pass through unchanged.
    np_req = GenerationRequest("x", num_candidates=np.int64(3), decision_step=np.int32(2), seed=np.int64(9),
                               **OK).validate(TINY)
    assert (np_req.num_candidates, np_req.decision_step, np_req.seed) == (3, 2, 9)
    assert type(np_req.num_candidates) is int


def test_defaults_are_resolved_from_the_model():
    r = GenerationRequest("  a  red   circle ", num_candidates=3).validate(TINY)
    assert r.prompt == "a red circle"  # whitespace normalised, as the text encoder would see it
    assert r.num_inference_steps == 16 == min(rq.DEFAULT_STEPS, TINY.seq_len)
    assert r.decision_step == default_decision_step(TINY, 16) and r.decision_steps == [r.decision_step]
    assert r.fraction_decided(TINY) == fraction_decided(r.decision_step, 16, TINY.seq_len)
    assert r.fraction_decided(TINY) >= TINY.min_visible_for_clip
    shifted = TINY.replace(sad_decision_share=0.5)
    assert GenerationRequest("x", num_candidates=3).validate(shifted).decision_step == default_decision_step(shifted, 16)
    solo = GenerationRequest("x", decision_step=3, **OK).validate(TINY)  # K = 1: nothing to decide
    assert solo.decision_step is None and solo.decision_steps == [] and solo.fraction_decided(TINY) is None
    halving = GenerationRequest("x", num_candidates=8, decision_step=[2, 4], **OK).validate(TINY)
    assert halving.decision_step == (2, 4) and halving.decision_steps == [2, 4]
    assert halving.fraction_decided(TINY) == fraction_decided(4, 8, 16)  # where the winner is picked
    assert GenerationRequest("x", negative_prompt="   ").validate(TINY).negative_prompt == ""
    assert GenerationRequest("x").validate(TINY).seed is None  # drawn later, by whoever runs it
    # The temperature is the model's unless the request names one (0 included).
    assert GenerationRequest("x").validate(TINY).temperature == TINY.default_temperature == 1.0
    cooler = TINY.replace(default_temperature=0.5)
    assert GenerationRequest("x").validate(cooler).temperature == 0.5
    assert GenerationRequest("x", temperature=0.0).validate(cooler).temperature == 0.0
    assert GenerationRequest("x", temperature=1.2).validate(cooler).temperature == 1.2


def test_a_caller_may_lower_the_candidate_limit_but_not_raise_past_it():
    with pytest.raises(ValueError, match="^num_candidates must be between 1 and 16, got 17$"):
        GenerationRequest("x", num_candidates=17, **OK).validate(TINY, max_candidates=rq.APP_MAX_CANDIDATES)
    assert rq.APP_MAX_CANDIDATES <= rq.MAX_CANDIDATES and 1 <= rq.APP_DEFAULT_CANDIDATES <= rq.APP_MAX_CANDIDATES


def test_keyword_settings_build_a_request_and_unknown_ones_are_named():
    r = GenerationRequest.from_settings("x", num_candidates=2, decision_step=[1, 3])
    assert r == GenerationRequest("x", num_candidates=2, decision_step=(1, 3))
    assert GenerationRequest.from_settings(r) is r
    with pytest.raises(ValueError, match="^unknown generation setting cfg, stepz; the settings are negative_prompt, "):
        GenerationRequest.from_settings("x", stepz=3, cfg=2.0)
    with pytest.raises(ValueError, match="not both"):
        GenerationRequest.from_settings(r, seed=1)


def test_sampler_settings_share_the_request_defaults():
    s = SamplerSettings()
    req = GenerationRequest("x")
    for name in ("guidance_scale", "guidance_schedule", "temperature", "head_steps", "head_sampler", "negative_prompt",
                 "shared_order"):
        assert getattr(s, name) == getattr(req, name), name
    assert s.request("y", 3, 2, seed=5) == GenerationRequest("y", num_candidates=3, decision_step=2, seed=5)
    assert rq.request_defaults()["guidance_schedule"] in GUIDANCE_SCHEDULES


def test_the_app_and_evaluation_read_their_limits_from_the_request():
    from app import ui
    from app.params import GenerationSettings
    from training.evaluate import sets

    assert ui.APP_MAX_CANDIDATES is rq.APP_MAX_CANDIDATES and ui.MAX_SEED is rq.MAX_SEED
    assert GenerationSettings("x").num_candidates == rq.APP_DEFAULT_CANDIDATES
    assert sets.prompt_seeds(2, 0) == [0, rq.MAX_CANDIDATES]
    # The app turns a slider's 4.0 into 4 before the request sees it; 2.5 stays refused.
    assert GenerationSettings("x", num_candidates=4.0, **OK).validated(TINY).num_candidates == 4
    with pytest.raises(ValueError, match="^num_candidates must be an integer, got 2.5$"):
        GenerationSettings("x", num_candidates=2.5).validated(TINY)


def test_head_sampler_and_steps_default_to_the_models():
    """None resolves to the model's `default_head_sampler` / `default_head_steps` (ancestral over
    100 steps unless the model says otherwise); a request's own value wins."""
    plain = GenerationRequest("x", **OK).validate(TINY)
    assert (plain.head_sampler, plain.head_steps) == (rq.DEFAULT_HEAD_SAMPLER, rq.DEFAULT_HEAD_STEPS) == ("ancestral", 100)
    fast = TINY.replace(default_head_sampler="dpm-solver++", default_head_steps=20)
    resolved = GenerationRequest("x", **OK).validate(fast)
    assert (resolved.head_sampler, resolved.head_steps) == ("dpm-solver++", 20)
    assert rq.sampler_defaults(fast)["head_sampler"] == "dpm-solver++"
    own = GenerationRequest("x", head_sampler="ddim", head_steps=7, **OK).validate(fast)
    assert (own.head_sampler, own.head_steps) == ("ddim", 7)
    for name in rq.HEAD_SAMPLERS:
        assert GenerationRequest("x", head_sampler=name, **OK).validate(TINY).head_sampler == name


def test_num_kept_schedules_staged_sad():
    staged = GenerationRequest.from_settings("x", num_candidates=9, decision_step=[2, 4, 6], num_kept=[4, 2, 1],
                                             **OK).validate(TINY)
    assert staged.num_kept == (4, 2, 1) and staged.decision_steps == [2, 4, 6]
    assert staged.fraction_decided(TINY) == fraction_decided(6, 8, 16)
    halving = GenerationRequest("x", num_candidates=9, decision_step=(2, 4), **OK).validate(TINY)
    assert halving.num_kept is None  # successive halving, as before
    single = GenerationRequest("x", num_candidates=9, num_kept=(1,), **OK).validate(TINY)  # the model's step
    assert single.decision_step == default_decision_step(TINY, 8) and single.num_kept == (1,)
    assert GenerationRequest("x", decision_step=(2, 4), num_kept=(3, 1), **OK).validate(TINY).num_kept is None  # K = 1
