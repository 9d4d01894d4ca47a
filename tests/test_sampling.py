"""MAR decoding and Semantically Aligned Decoding on the tiny model: the CFG schedule, seeds,
batched candidates following their solo trajectories, SAD's choice, successive halving and SAD
in stages with given counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dream_core.config import DreamConfig
from dream_core.masking import decoding_schedule, fraction_decided
from dream_core.sampling import (
    TextCondition,
    candidate_generators,
    complete_in_one_step,
    decode_step,
    guidance_at,
    init_state,
    mar_decode,
)
from dream_core.request import GenerationRequest, decision_step_for_share, default_decision_step
from dream_core.semantic_decoding import alignment_scores, keep_plan

PROMPT = "a large blue square in the middle on a black background"
FAST = dict(num_inference_steps=8, head_steps=8)
# Batched vs solo rows: the same arithmetic, possibly different BLAS blocking. The untrained tiny
# model's tokens reach ~1e4 (its zero-initialised head predicts eps = 0), so the tolerance is relative.
TOL = dict(rtol=1e-4, atol=1e-4)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for this module


def _events(pipe, **kw):
    args = dict(FAST, guidance_scale=3.0)
    args.update(kw)
    return list(pipe.stream(PROMPT, **args))


def _steps(events):
    """step number -> the "step"/"done" event after it."""
    return {e.step: e for e in events if e.kind in ("step", "done")}


# ---------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------


def test_guidance_schedule_formula():
    assert guidance_at(3.0, "constant", 10, 16) == 3.0
    for masked_after in range(17):
        assert guidance_at(3.0, "linear", masked_after, 16) == pytest.approx(1 + 2.0 * (16 - masked_after) / 16)
    assert guidance_at(4.0, "linear", 256, 256) == 1.0
    assert guidance_at(4.0, "linear", 0, 256) == 4.0
    assert guidance_at(4.0, "linear", 192, 256) == pytest.approx(1.75)
    with pytest.raises(ValueError, match="guidance_schedule"):
        guidance_at(3.0, "cosine", 0, 16)


def test_keep_plan_halves_by_default_and_follows_given_counts():
    assert keep_plan(9, [4]) == [1]
    assert keep_plan(5, [2, 4]) == [3, 1]
    assert keep_plan(8, [1, 2, 3]) == [4, 2, 1]
    assert keep_plan(9, [1, 2, 3]) == [5, 3, 1]
    assert keep_plan(2, [1, 2, 3]) == [1, 1, 1]
    assert keep_plan(9, [2, 5], (3, 1)) == [3, 1]
    with pytest.raises(ValueError, match="one count per decision step, got 1 for 2"):
        keep_plan(9, [2, 5], (1,))


def test_decision_steps_are_validated():
    config = DreamConfig.preset("tiny")

    def steps(decision, k=3):
        return GenerationRequest("x", num_candidates=k, decision_step=decision, num_inference_steps=8).validate(
            config).decision_steps

    assert steps(None, k=1) == []
    assert steps(3) == [3]
    assert steps([1, 7]) == [1, 7]
    for bad in (0, 8, -1, 2.5, True, [3, 3], [4, 2], "3"):
        with pytest.raises(ValueError, match="decision_step"):
            steps(bad)


def test_decision_step_for_share_is_the_first_step_with_that_much_decided():
    assert decision_step_for_share(0.25, 16, 16) == 4  # 4 of 16 tokens decided before step 4
    assert fraction_decided(4, 16, 16) == 0.25 and fraction_decided(3, 16, 16) < 0.25
    assert decision_step_for_share(0.25, 64, 256) == 30  # the official T = 32 of 64 shows 29.3 %
    assert fraction_decided(30, 64, 256) >= 0.25 > fraction_decided(29, 64, 256)
    assert decision_step_for_share(0.99, 8, 16) == 7  # none reaches it: the last possible step
    for steps in range(2, 65):
        assert 1 <= decision_step_for_share(0.3, steps, 256) <= steps - 1
    with pytest.raises(ValueError, match="num_inference_steps >= 2"):
        decision_step_for_share(0.25, 1, 16)


def test_default_decision_step_comes_from_the_model_and_never_below_the_contrastive_floor():
    c = DreamConfig.preset("shapes")
    assert default_decision_step(c, 16) == decision_step_for_share(c.sad_decision_share, 16, c.seq_len)
    assert default_decision_step(c.replace(sad_decision_share=0.5), 16) == decision_step_for_share(0.5, 16, 16)
    with pytest.raises(ValueError, match="sad_decision_share"):
        c.replace(sad_decision_share=0.1)  # below min_visible_for_clip = 0.25


def test_candidate_k_uses_seed_plus_k():
    gens = candidate_generators(41, 3)
    for k, g in enumerate(gens):
        assert torch.equal(torch.rand(4, generator=g), torch.rand(4, generator=torch.Generator().manual_seed(41 + k)))


# ---------------------------------------------------------------------------------------------
# Plain decoding
# ---------------------------------------------------------------------------------------------


def test_events_describe_every_step(tiny_pipe):
    events = _events(tiny_pipe, seed=0)
    L = tiny_pipe.config.seq_len
    sched = decoding_schedule(8, L)
    assert [e.kind for e in events] == ["step"] * 7 + ["done"]
    for k, e in enumerate(events):
        assert e.step == k + 1 and e.num_steps == 8 and e.num_candidates == 1
        assert e.tokens.shape == (1, L, tiny_pipe.config.token_dim) and e.tokens.device.type == "cpu"
        assert int(e.mask.sum()) == sched[k]
        assert e.fraction_decided == pytest.approx(1 - sched[k] / L)
        # Decided tokens never change afterwards; undecided ones stay at 0.
        assert bool((e.tokens[e.mask] == 0).all())
        if k:
            prev = events[k - 1]
            assert bool((e.mask <= prev.mask).all())
            decided = ~prev.mask
            assert torch.equal(e.tokens[decided], prev.tokens[decided])
    assert bool(torch.isfinite(events[-1].tokens).all())


def test_same_seed_same_image_different_seed_different(tiny_pipe):
    a = tiny_pipe(PROMPT, seed=7, **FAST)
    b = tiny_pipe(PROMPT, seed=7, **FAST)
    c = tiny_pipe(PROMPT, seed=8, **FAST)
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    assert not np.array_equal(np.asarray(a.images[0]), np.asarray(c.images[0]))
    ta = _events(tiny_pipe, seed=7)[-1].tokens
    assert torch.equal(ta, _events(tiny_pipe, seed=7)[-1].tokens)
    assert not torch.allclose(ta, _events(tiny_pipe, seed=8)[-1].tokens)
    # A generator is an equally reproducible source of the seed.
    g1 = tiny_pipe(PROMPT, generator=torch.Generator().manual_seed(3), **FAST)
    g2 = tiny_pipe(PROMPT, generator=torch.Generator().manual_seed(3), **FAST)
    assert g1.seeds == g2.seeds
    assert np.array_equal(np.asarray(g1.images[0]), np.asarray(g2.images[0]))


def test_num_images_uses_consecutive_seed_blocks(tiny_pipe):
    out = tiny_pipe(PROMPT, seed=20, num_images=2, num_candidates=2, decision_step=2, **FAST)
    assert out.seeds == [20, 22] and len(out.images) == 2
    second = tiny_pipe(PROMPT, seed=22, num_candidates=2, decision_step=2, **FAST)
    assert np.array_equal(np.asarray(out.images[1]), np.asarray(second.images[0]))


@pytest.mark.parametrize("schedule", ["constant", "linear"])
def test_decoding_applies_the_cfg_schedule_at_each_step(tiny_pipe, monkeypatch, schedule):
    head = tiny_pipe.model.head
    seen = []
    original = head.sample

    def spy(z, noise, guidance_scale=1.0, temperature=1.0, **kw):
        seen.append((z.shape[0] // noise.shape[1], float(guidance_scale), noise.shape[1]))
        return original(z, noise, guidance_scale=guidance_scale, temperature=temperature, **kw)

    monkeypatch.setattr(head, "sample", spy)
    _events(tiny_pipe, seed=1, guidance_schedule=schedule)
    L = tiny_pipe.config.seq_len
    sched = decoding_schedule(8, L)
    assert [s[0] for s in seen] == [2] * 8  # [cond; uncond] rows
    assert [s[2] for s in seen] == [L - sched[0]] + [sched[k - 1] - sched[k] for k in range(1, 8)]
    expected = [3.0] * 8 if schedule == "constant" else [1 + 2.0 * (L - n) / L for n in sched]
    assert [s[1] for s in seen] == pytest.approx(expected)
    seen.clear()
    _events(tiny_pipe, seed=1, guidance_scale=1.0)
    assert [s[0] for s in seen] == [1] * 8  # no CFG: the batch is not doubled


def test_stream_stops_between_steps_when_asked(tiny_pipe):
    calls = []

    def stop() -> bool:
        calls.append(1)
        return len(calls) > 3

    events = list(tiny_pipe.stream(PROMPT, seed=0, should_stop=stop, **FAST))
    assert [e.step for e in events] == [1, 2, 3]
    assert all(e.kind == "step" for e in events)


# ---------------------------------------------------------------------------------------------
# Semantically Aligned Decoding
# ---------------------------------------------------------------------------------------------


def test_candidates_share_one_generation_order_by_default(tiny_pipe):
    """As the official SAD: the K candidates decide the same positions at every step, so at the
    decision they differ only in content; candidate 0 is the K = 1 image of the same seed."""
    seed, k_total, decision = 100, 4, 4
    steps = _steps(_events(tiny_pipe, seed=seed, num_candidates=k_total, decision_step=decision))
    solo = _steps(_events(tiny_pipe, seed=seed))
    for s in range(1, decision + 1):
        assert all(torch.equal(steps[s].mask[k], steps[s].mask[0]) for k in range(k_total))
        assert torch.equal(steps[s].mask[0], solo[s].mask[0])
        torch.testing.assert_close(steps[s].tokens[0], solo[s].tokens[0], **TOL)
    assert not torch.allclose(steps[decision].tokens[0], steps[decision].tokens[1])
    independent = _steps(_events(tiny_pipe, seed=seed, num_candidates=k_total, decision_step=decision,
                                 shared_order=False))
    assert not all(torch.equal(independent[1].mask[k], independent[1].mask[0]) for k in range(k_total))


def test_init_state_shares_the_first_order_of_each_group():
    gens = candidate_generators(7, 6)
    shared = init_state(16, 4, candidate_generators(7, 6), torch.device("cpu"), order_groups=2)
    own = init_state(16, 4, gens, torch.device("cpu"), shared_order=False)
    assert torch.equal(shared.orders[:3], own.orders[0].expand(3, -1))
    assert torch.equal(shared.orders[3:], own.orders[3].expand(3, -1))
    with pytest.raises(ValueError, match="equal order groups"):
        init_state(16, 4, candidate_generators(7, 5), torch.device("cpu"), order_groups=2)


def test_batched_candidates_follow_their_solo_trajectories(tiny_pipe):
    """With independent orders, candidate k of a K-candidate run equals decoding it alone with
    seed + k, step for step."""
    seed, k_total, decision = 100, 4, 4  # one decision step: pruning happens only there
    batched = _events(tiny_pipe, seed=seed, num_candidates=k_total, decision_step=decision, shared_order=False)
    steps = _steps(batched)
    for k in range(k_total):
        solo = _steps(_events(tiny_pipe, seed=seed + k))
        for s in range(1, decision + 1):
            assert steps[s].candidate_ids == list(range(k_total))
            assert torch.equal(steps[s].mask[k], solo[s].mask[0])
            torch.testing.assert_close(steps[s].tokens[k], solo[s].tokens[0], **TOL)
    # The candidates really are different trajectories.
    assert not torch.allclose(steps[decision].tokens[0], steps[decision].tokens[1])


def test_sad_with_one_candidate_equals_plain_decoding(tiny_pipe):
    seed = 5
    sad = _events(tiny_pipe, seed=seed, num_candidates=1, decision_step=3)
    assert not any(e.kind == "decision" for e in sad)

    hidden, mask = tiny_pipe.text_encoder([PROMPT, ""])
    text = TextCondition.build(tiny_pipe.model, hidden, mask)
    plain = list(mar_decode(tiny_pipe.model, text, candidate_generators(seed, 1), 8, guidance_scale=3.0,
                            head_steps=8))
    assert len(plain) == len(sad)
    for a, b in zip(sad, plain):
        assert (a.kind, a.step) == (b.kind, b.step)
        assert torch.equal(a.mask, b.mask)
        assert torch.equal(a.tokens, b.tokens)
    image = tiny_pipe(PROMPT, seed=seed, num_candidates=1, **FAST).images[0]
    assert np.array_equal(np.asarray(image), np.asarray(tiny_pipe.decode_tokens(plain[-1].tokens)[0]))


def test_complete_in_one_step_guesses_every_undecided_token_and_leaves_decoding_alone(tiny_pipe):
    model, c = tiny_pipe.model, tiny_pipe.config
    hidden, mask = tiny_pipe.text_encoder([PROMPT, ""])
    text = TextCondition.build(model, hidden, mask)
    schedule = decoding_schedule(8, c.seq_len)

    def run(peek_at: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        state = init_state(c.seq_len, c.token_dim, candidate_generators(7, 3), torch.device("cpu"))
        guess = None
        for _ in range(8):
            if state.step == peek_at:
                before = (state.tokens.clone(), state.mask.clone())
                guess = complete_in_one_step(model, state, text, candidate_generators(99, 3), 3.0, "constant", 1.0, 8)
                assert torch.equal(state.tokens, before[0]) and torch.equal(state.mask, before[1])  # untouched
                decided = ~state.mask
                assert torch.equal(guess[decided], state.tokens[decided])  # decided tokens are kept
                assert (guess[state.mask].abs().sum(-1) > 0).all()  # every undecided one is guessed
            decode_step(model, state, text, schedule, 3.0, "constant", 1.0, 8)
        return state.tokens, guess

    plain, _ = run(None)
    peeked, guess = run(3)
    assert torch.equal(plain, peeked)  # the guess draws no noise from the rows' own generators
    assert guess.shape == plain.shape and not torch.allclose(guess, plain)
    with pytest.raises(ValueError, match="one generator per row: 3 rows, 2 generators"):
        state = init_state(c.seq_len, c.token_dim, candidate_generators(7, 3), torch.device("cpu"))
        complete_in_one_step(model, state, text, candidate_generators(0, 2), 1.0, "constant", 1.0, 8)


def test_sad_keeps_the_argmax_score_candidate(tiny_pipe):
    seed, k_total, decision = 200, 5, 3
    events = _events(tiny_pipe, seed=seed, num_candidates=k_total, decision_step=decision, shared_order=False)
    decisions = [e for e in events if e.kind == "decision"]
    assert len(decisions) == 1
    d = decisions[0]
    assert d.step == decision and d.candidate_ids == list(range(k_total))
    assert torch.equal(d.tokens, _steps(events)[decision].tokens)

    # Scores: the model's own encoder on the visible (decided) tokens vs the text tower's prompt.
    with torch.no_grad():
        text_emb = tiny_pipe.model.encode_text(tiny_pipe.clip_tokenizer([PROMPT]))
        expected = alignment_scores(tiny_pipe.model, d.tokens, d.mask, text_emb)
    torch.testing.assert_close(torch.tensor(d.scores), expected, rtol=1e-5, atol=1e-6)
    assert len(set(d.scores)) == k_total  # the choice is not a tie

    best = int(np.argmax(d.scores))
    assert d.chosen == best
    assert d.ranks[best] == 1
    assert sorted(d.ranks) == list(range(1, k_total + 1))
    assert all(d.scores[i] > d.scores[j] for i in range(k_total) for j in range(k_total) if d.ranks[i] < d.ranks[j])
    assert d.pruned == [i != best for i in range(k_total)]

    final = events[-1]
    assert final.kind == "done" and final.candidate_ids == [best] and final.chosen == best
    assert final.scores == d.scores and final.pruned == d.pruned
    after = [e for e in events if e.kind in ("step", "done") and e.step > decision]
    assert all(e.candidate_ids == [best] and e.tokens.shape[0] == 1 for e in after)

    # The survivor continues its own trajectory: the final tokens equal decoding it alone.
    solo = _events(tiny_pipe, seed=seed + best)[-1]
    torch.testing.assert_close(final.tokens[0], solo.tokens[0], **TOL)
    out = tiny_pipe(PROMPT, seed=seed, num_candidates=k_total, decision_step=decision, shared_order=False, **FAST)
    assert out.chosen == [best] and out.scores == [d.scores]


def test_successive_halving_keeps_half_then_one(tiny_pipe):
    seed, k_total = 300, 5
    events = _events(tiny_pipe, seed=seed, num_candidates=k_total, decision_step=[2, 5], shared_order=False)
    d1, d2 = [e for e in events if e.kind == "decision"]
    assert (d1.step, d2.step) == (2, 5)

    keep = 3  # ceil(5 / 2)
    survivors = sorted(np.argsort(d1.scores)[::-1][:keep].tolist())
    assert d1.chosen is None
    assert sum(d1.pruned) == k_total - keep
    assert [i for i in range(k_total) if not d1.pruned[i]] == survivors
    steps = _steps(events)
    for s in (3, 4, 5):
        assert steps[s].candidate_ids == survivors and steps[s].tokens.shape[0] == keep

    assert d2.candidate_ids == survivors
    live = {c: d2.scores[c] for c in survivors}
    best = max(live, key=live.get)
    assert d2.chosen == best
    assert d2.pruned == [c != best for c in range(k_total)]
    assert d2.ranks[best] == 1
    for s in (6, 7, 8):
        assert steps[s].candidate_ids == [best]
    solo = _events(tiny_pipe, seed=seed + best)[-1]
    torch.testing.assert_close(events[-1].tokens[0], solo.tokens[0], **TOL)


def test_default_decision_step_is_used_for_several_candidates(tiny_pipe):
    events = _events(tiny_pipe, seed=0, num_candidates=3)
    (d,) = [e for e in events if e.kind == "decision"]
    assert d.step == default_decision_step(tiny_pipe.config, 8)
    assert d.fraction_decided >= tiny_pipe.config.min_visible_for_clip


def test_staged_sad_keeps_the_scheduled_counts(tiny_pipe):
    """num_kept (4, 2, 1) at steps (2, 4, 6) of K = 9: each decision keeps that many of the
    survivors, the best-scored, and the winner decodes as it would alone."""
    seed, k_total = 400, 9
    events = _events(tiny_pipe, seed=seed, num_candidates=k_total, decision_step=(2, 4, 6), num_kept=(4, 2, 1),
                     shared_order=False)
    decisions = [e for e in events if e.kind == "decision"]
    assert [d.step for d in decisions] == [2, 4, 6]
    alive = list(range(k_total))
    for d, count in zip(decisions, (4, 2, 1)):
        assert d.candidate_ids == alive
        best = sorted(alive, key=lambda c: -d.scores[c])[:count]
        alive = sorted(best)
        assert [c for c in range(k_total) if not d.pruned[c]] == alive
        assert k_total - sum(d.pruned) == count
    assert decisions[-1].chosen == alive[0]
    steps = _steps(events)
    assert [steps[s].tokens.shape[0] for s in range(1, 9)] == [9, 9, 4, 4, 2, 2, 1, 1]  # pruned after step d
    solo = _events(tiny_pipe, seed=seed + alive[0])[-1]
    torch.testing.assert_close(events[-1].tokens[0], solo.tokens[0], **TOL)


@pytest.mark.parametrize("sampler", ["ddim", "dpm-solver++"])
def test_each_head_sampler_decodes_and_candidates_follow_their_solo_trajectories(tiny_pipe, sampler):
    events = _events(tiny_pipe, seed=7, num_candidates=3, decision_step=3, head_sampler=sampler, head_steps=4,
                     shared_order=False)
    last = events[-1]
    assert last.kind == "done" and not last.mask.any() and torch.isfinite(last.tokens).all()
    solo = _events(tiny_pipe, seed=7 + last.candidate_ids[0], head_sampler=sampler, head_steps=4)[-1]
    torch.testing.assert_close(last.tokens[0], solo.tokens[0], **TOL)
    ancestral = _events(tiny_pipe, seed=7, head_steps=4)[-1]
    assert not torch.allclose(_events(tiny_pipe, seed=7, head_sampler=sampler, head_steps=4)[-1].tokens,
                              ancestral.tokens)
