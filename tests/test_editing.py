"""Editing by masked decoding (inpainting, variations) and the explanation of SAD's choice, on the
tiny random model: the kept tokens stay the source's VAE tokens bit for bit, masks of every shape
map to the right tokens (an empty one is refused, a full one is text-to-image), images of any
size are centre-cropped and resized, seeds reproduce, and the explanation is what it claims."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dream_core.editing import pixel_mask_to_tokens, resize_square, variation_tokens
from dream_core.request import EditRequest, GenerationRequest
from dream_core.sampling import EditStart, init_state
from dream_core.semantic_decoding import alignment_scores

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = dict(head_steps=2)


@pytest.fixture(scope="module")
def source() -> Image.Image:
    rng = np.random.default_rng(5)
    return Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8))


def corner_mask(h: int = 32, w: int = 32) -> np.ndarray:
    mask = np.zeros((h, w), dtype=bool)
    mask[0:5, 0:12] = True  # rows of token row 0, columns of token columns 0 and 1 (8 px patches)
    return mask


def test_kept_tokens_are_the_source_vae_tokens_bit_for_bit(tiny_pipe, source):
    edit = tiny_pipe.edit_request(source, "a red circle", mask=corner_mask(), num_candidates=3, seed=4, **FAST)
    assert edit.regenerate.nonzero().flatten().tolist() == [0, 1]
    assert edit.generation.num_inference_steps == 2 and edit.generation.decision_step == 1
    kept = tiny_pipe.encode_image_tokens(source)[0]
    events = list(tiny_pipe.stream_edit(edit))
    assert [e.kind for e in events] == ["step", "decision", "done"]
    for ev in events:
        assert torch.equal(ev.tokens[:, 2:], kept[2:].expand(ev.tokens.shape[0], -1, -1))
        assert not ev.mask[:, 2:].any()  # kept tokens are decided from the start
    assert events[1].fraction_decided == 15 / 16  # 14 kept + 1 decoded before the decision
    assert not torch.equal(events[-1].tokens[0, :2], kept[:2])
    # The finished image: the source's pixels outside the two regenerated 8 x 8 patches (hard paste).
    out = tiny_pipe.inpaint(source, corner_mask(), "a red circle", num_candidates=3, seed=4, **FAST)
    result, src = np.asarray(out.images[0]), np.asarray(source)
    assert np.array_equal(result[8:], src[8:]) and np.array_equal(result[:, 16:], src[:, 16:])
    assert not np.array_equal(result[:8, :16], src[:8, :16])
    assert out.regenerated[0].nonzero().flatten().tolist() == [0, 1]
    raw = tiny_pipe.inpaint(source, corner_mask(), "a red circle", num_candidates=3, seed=4, paste_back=False, **FAST)
    assert np.array_equal(np.asarray(raw.images[0]), np.asarray(tiny_pipe.decode_tokens(events[-1].tokens[:1])[0]))


def test_full_mask_is_text_to_image_with_the_same_seed(tiny_pipe, source):
    settings = dict(num_candidates=3, seed=11, num_inference_steps=6, decision_step=2, **FAST)
    t2i = list(tiny_pipe.stream("a blue square", **settings))
    edit = tiny_pipe.edit_request(source, "a blue square", mask=np.ones((32, 32), np.uint8), **settings)
    inp = list(tiny_pipe.stream_edit(edit))
    assert len(t2i) == len(inp)
    for a, b in zip(t2i, inp):
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.mask, b.mask) and a.scores == b.scores
    out = tiny_pipe.inpaint(source, np.ones((32, 32)), "a blue square", paste_back=False, **settings)
    assert np.array_equal(np.asarray(out.images[0]), np.asarray(tiny_pipe("a blue square", **settings).images[0]))


@pytest.mark.parametrize("rows, cols, tokens", [
    ((0, 1), (0, 1), [0]),  # one pixel
    ((7, 9), (7, 9), [0, 1, 4, 5]),  # a 2 x 2 stroke on the corner of four patches
    ((0, 32), (8, 16), [1, 5, 9, 13]),  # a column of patches
    ((31, 32), (0, 32), [12, 13, 14, 15]),  # the last pixel row
])
def test_any_token_the_mask_touches_is_regenerated(rows, cols, tokens):
    mask = np.zeros((32, 32), dtype=bool)
    mask[rows[0]:rows[1], cols[0]:cols[1]] = True
    assert pixel_mask_to_tokens(mask, 32, 4).nonzero().flatten().tolist() == tokens


def test_non_square_images_are_centre_cropped_with_their_mask(tiny_pipe):
    rng = np.random.default_rng(1)
    wide = Image.fromarray((rng.random((40, 64, 3)) * 255).astype(np.uint8))  # 64 x 40: crop x 12..52
    mask = np.zeros((40, 64), dtype=bool)
    mask[:, :12] = True  # outside the crop only: nothing left to regenerate
    with pytest.raises(ValueError, match=r"^mask lies outside the image's centre square \(the part the model sees\)"):
        tiny_pipe.edit_request(wide, "a red circle", mask=mask)
    mask[:, 12] = True  # the crop's first column -> the first token column
    edit = tiny_pipe.edit_request(wide, "a red circle", mask=mask, seed=0, **FAST)
    assert edit.regenerate.nonzero().flatten().tolist() == [0, 4, 8, 12]
    assert edit.source.size == (32, 32)
    assert np.array_equal(np.asarray(edit.source), np.asarray(resize_square(wide, 32)))
    tokens = list(tiny_pipe.stream_edit(edit))[-1].tokens[0]
    keep = ~edit.regenerate
    assert torch.equal(tokens[keep], tiny_pipe.encode_image_tokens(wide)[0][keep])
    small = Image.new("RGB", (10, 10), (200, 30, 30))  # smaller than the model's size: upsampled
    out = tiny_pipe.inpaint(small, np.ones((10, 10)), "a red circle", seed=0, num_inference_steps=2, **FAST)
    assert out.images[0].size == (32, 32)


BAD_EDITS = [
    (dict(mask=np.zeros((32, 32))), "mask is empty: mark the pixels to regenerate (nonzero), or make variations"),
    (dict(mask=np.ones((16, 32))), "mask must be the size of the image (32x32 pixels), got 32x16"),
    (dict(mask=np.ones((32, 32, 3))), "mask must be a 2-D array (height x width), got shape (32, 32, 3)"),
    (dict(mask="everything"), "mask must be a PIL image or a 2-D array, got str"),
    (dict(), "an edit needs a mask (inpainting: the pixels to regenerate) or a strength"),
    (dict(mask=np.ones((32, 32)), strength=0.5), "an edit takes either a mask (inpainting) or a strength"),
    (dict(strength=0.0), "strength must be greater than 0 and at most 1 (the share of tokens regenerated), got 0.0"),
    (dict(strength=1.5), "strength must be between 0.0 and 1.0, got 1.5"),
    (dict(strength="half"), "strength must be a number, got 'half'"),
    (dict(strength=0.5, paste_back="yes"), "paste_back must be true or false, got 'yes'"),
    (dict(mask=corner_mask(), num_inference_steps=3),
     "num_inference_steps must be between 1 and 2 (the number of tokens this edit regenerates), got 3"),
    (dict(mask=corner_mask(), num_inference_steps=0), "num_inference_steps must be between 1 and 16, got 0"),
    (dict(mask=corner_mask(), num_candidates=2, decision_step=2), "decision_step must be between 1 and 1, got 2"),
    (dict(strength=0.25, num_candidates=0), "num_candidates must be between 1 and 64, got 0"),
]


@pytest.mark.parametrize("settings, message", BAD_EDITS)
def test_bad_edits_are_refused_by_name(tiny_pipe, source, settings, message):
    edit = {k: settings.pop(k) for k in ("mask", "strength", "paste_back") if k in settings}
    with pytest.raises(ValueError) as err:
        EditRequest(source, GenerationRequest("a red circle", **settings), **edit).validate(tiny_pipe.config)
    assert str(err.value).startswith(message)


def test_bad_images_are_refused(tiny_pipe):
    with pytest.raises(ValueError, match="image must be a PIL image or a numpy array, got str"):
        tiny_pipe.inpaint("photo.png", np.ones((32, 32)), "a red circle")
    with pytest.raises(ValueError, match=r"image array must be HxW or HxWxC \(C = 1, 3 or 4\), got shape \(2, 3, 4, 5\)"):
        tiny_pipe.variations(np.zeros((2, 3, 4, 5), np.uint8), "a red circle")


def test_seeds_reproduce_and_choose_the_variation_tokens(tiny_pipe, source):
    a = tiny_pipe.variations(source, "a red circle", strength=0.3, seed=21, num_candidates=2, **FAST)
    b = tiny_pipe.variations(source, "a red circle", strength=0.3, seed=21, num_candidates=2, **FAST)
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0])) and a.scores == b.scores
    assert int(a.regenerated[0].sum()) == 5  # ceil(0.3 * 16)
    assert torch.equal(a.regenerated[0], variation_tokens(21, 0.3, 16))
    assert not torch.equal(variation_tokens(21, 0.3, 16), variation_tokens(22, 0.3, 16))
    two = tiny_pipe.variations(source, "a red circle", strength=0.3, seed=21, num_candidates=2, num_images=2, **FAST)
    assert two.seeds == [21, 23] and torch.equal(two.regenerated[1], variation_tokens(23, 0.3, 16))
    assert np.array_equal(np.asarray(two.images[0]), np.asarray(a.images[0]))
    x = tiny_pipe.inpaint(source, corner_mask(), "a red circle", seed=8, **FAST)
    y = tiny_pipe.inpaint(source, corner_mask(), "a red circle", seed=8, **FAST)
    assert np.array_equal(np.asarray(x.images[0]), np.asarray(y.images[0]))
    # No prompt: the model describes the image itself (its caption bank's best caption).
    auto = tiny_pipe.variations(source, strength=0.3, seed=21, num_candidates=2, **FAST)
    best = tiny_pipe.search(source, top_k=1)[0][0]
    same = tiny_pipe.variations(source, best, strength=0.3, seed=21, num_candidates=2, **FAST)
    assert np.array_equal(np.asarray(auto.images[0]), np.asarray(same.images[0]))


def test_edit_orders_put_the_regenerated_tokens_first():
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    regen = torch.zeros(16, dtype=torch.bool)
    regen[[2, 7, 9]] = True
    start = EditStart(torch.randn(16, 5), regen)
    state = init_state(16, 5, gens, torch.device("cpu"), shared_order=False, start=start)
    plain = init_state(16, 5, [torch.Generator().manual_seed(s) for s in (3, 4)], torch.device("cpu"),
                       shared_order=False)
    for row in range(2):
        first = state.orders[row, :3].tolist()
        assert sorted(first) == [2, 7, 9]
        assert first == [p for p in plain.orders[row].tolist() if p in (2, 7, 9)]  # the row's own order
    assert torch.equal(state.mask, regen.expand(2, -1))
    assert torch.equal(state.tokens[:, ~regen], start.tokens[~regen].expand(2, -1, -1))
    assert (state.tokens[:, regen] == 0).all()


def test_explanation_is_the_leave_one_token_out_delta(tiny_pipe, source):
    edit = tiny_pipe.edit_request(source, "a green triangle", mask=np.ones((32, 32)), num_candidates=3, seed=2,
                                  num_inference_steps=8, decision_step=4, **FAST)
    decision = next(e for e in tiny_pipe.stream_edit(edit, explain=True) if e.kind == "decision")
    ex = decision.explanation
    assert ex.step == 4 and ex.candidate_ids == [0, 1, 2]
    assert ex.scores.tolist() == pytest.approx([decision.scores[c] for c in range(3)], abs=1e-6)
    text_emb = tiny_pipe.embed_texts(["a green triangle"])
    visible = ~decision.mask
    assert torch.isnan(ex.contributions[decision.mask]).all() and not torch.isnan(ex.contributions[visible]).any()
    for row in (0, 2):
        j = int(visible[row].nonzero()[1])
        hidden = decision.mask[row:row + 1].clone()
        hidden[0, j] = True
        with torch.inference_mode():
            full = alignment_scores(tiny_pipe.model, decision.tokens[row:row + 1], decision.mask[row:row + 1], text_emb)
            without = alignment_scores(tiny_pipe.model, decision.tokens[row:row + 1], hidden, text_emb)
        assert float(ex.contributions[row, j]) == pytest.approx(float(full - without), abs=1e-5)
        assert float(full) == pytest.approx(float(ex.scores[row]), abs=1e-5)
    assert torch.equal(ex.for_candidate(2).nan_to_num(), ex.contributions[2].nan_to_num())
    out = tiny_pipe("a green triangle", num_candidates=3, seed=2, num_inference_steps=8, decision_step=4,
                    explain=True, **FAST)
    assert torch.allclose(out.explanations[0].contributions, ex.contributions, equal_nan=True)
    assert tiny_pipe("a green triangle", num_candidates=3, seed=2, num_inference_steps=8, **FAST).explanations == [None]
