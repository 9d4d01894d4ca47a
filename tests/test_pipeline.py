"""DreamPipeline: save/load round trip, argument checks, checkpoint checks, reverse search with its
on-disk bank cache, and zero-shot labels."""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import dream_core.retrieval as retrieval
from dream_core import DreamOutput, DreamPipeline
from dream_core.pipeline import check_image_tokenizer
from dream_core.retrieval import CaptionBank

PROMPT = "a small red circle at the top left on a white background"
FAST = dict(num_inference_steps=4, head_steps=5)


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    """Caption-bank caches go to a per-test folder, never the user's cache."""
    cache = tmp_path / "cache"
    monkeypatch.setattr(retrieval, "cache_dir", lambda: cache)
    return cache


@pytest.fixture(scope="module")
def picture() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))


def _copy(model_dir, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(model_dir, dst)
    return dst


# ---------------------------------------------------------------------------------------------
# Generation output
# ---------------------------------------------------------------------------------------------


def test_call_returns_images_scores_and_the_chosen_candidate(tiny_pipe):
    out = tiny_pipe(PROMPT, seed=3, **FAST)
    assert isinstance(out, DreamOutput)
    size = tiny_pipe.config.image_size
    assert len(out.images) == 1 and out.images[0].size == (size, size) and out.images[0].mode == "RGB"
    assert out.chosen == [0] and out.scores == [[None]] and out.seeds == [3]
    out = tiny_pipe(PROMPT, seed=3, num_candidates=3, decision_step=2, **FAST)
    assert len(out.scores[0]) == 3 and all(isinstance(s, float) for s in out.scores[0])
    assert out.chosen == [int(np.argmax(out.scores[0]))]


@pytest.mark.parametrize("sampler", ["ancestral", "ddim", "dpm-solver++"])
def test_generate_with_each_head_sampler(tiny_pipe, sampler):
    out = tiny_pipe(PROMPT, seed=3, head_sampler=sampler, **FAST)
    size = tiny_pipe.config.image_size
    assert out.images[0].size == (size, size)
    again = tiny_pipe(PROMPT, seed=3, head_sampler=sampler, **FAST)
    assert np.array_equal(np.asarray(out.images[0]), np.asarray(again.images[0]))
    assert tiny_pipe.request(PROMPT, head_sampler=sampler).head_sampler == sampler


def test_the_models_head_defaults_are_the_samplers(tiny_model_dir, tiny_pipe, tmp_path):
    """A model whose config names a head sampler and steps decodes with them when a request names
    none: the same image as asking for them."""
    from dream_core import DreamConfig

    path = _copy(tiny_model_dir, tmp_path)
    config = DreamConfig.load(path / "config.json").replace(default_head_sampler="ddim", default_head_steps=5)
    config.save(path / "config.json")
    fast = DreamPipeline.from_pretrained(path, device="cpu")
    by_default = fast(PROMPT, seed=4, num_inference_steps=4)
    asked = tiny_pipe(PROMPT, seed=4, num_inference_steps=4, head_sampler="ddim", head_steps=5)
    assert np.array_equal(np.asarray(by_default.images[0]), np.asarray(asked.images[0]))


def test_image_i_is_streamed_alone_with_seed_plus_i_times_k(tiny_pipe):
    """The app streams a request one image at a time; image i decodes candidates seed + i*K ...,
    the same picture as the whole call's image i and as a call of its own with that seed."""
    settings = dict(num_candidates=2, decision_step=2, **FAST)
    out = tiny_pipe(PROMPT, seed=7, num_images=2, **settings)
    assert out.seeds == [7, 9]
    alone = tiny_pipe(PROMPT, seed=9, **settings)
    assert np.array_equal(np.asarray(out.images[1]), np.asarray(alone.images[0]))
    events = list(tiny_pipe.stream(PROMPT, seed=7, num_images=2, image_index=1, decode_image=True, **settings))
    last = events[-1]
    assert last.kind == "done" and last.seed == 9 and last.candidate_ids == [out.chosen[1]]
    assert np.array_equal(np.asarray(last.image), np.asarray(out.images[1]))
    assert not any(hasattr(e, "image") for e in events[:-1])  # only the finished image is decoded
    with pytest.raises(ValueError, match="image_index must be between 0 and 1, got 2"):
        next(iter(tiny_pipe.stream(PROMPT, seed=7, num_images=2, image_index=2, **settings)))


def test_pipeline_parts_and_device(tiny_pipe, tiny_model_dir):
    assert tiny_pipe.device.type == "cpu"
    assert tiny_pipe.config == tiny_pipe.model.config
    assert tiny_pipe.path == tiny_model_dir
    assert tiny_pipe.captions and all(isinstance(c, str) for c in tiny_pipe.captions)
    assert tiny_pipe.model_card.startswith("# tiny test model")
    assert not tiny_pipe.model.training


# ---------------------------------------------------------------------------------------------
# Save / load
# ---------------------------------------------------------------------------------------------


def test_save_and_load_round_trip_is_bit_exact(tiny_pipe, tmp_path):
    out_dir = tmp_path / "saved"
    tiny_pipe.save_pretrained(out_dir)
    for name in ("config.json", "model.safetensors", "vae/config.json", "text/config.json", "captions.txt", "README.md"):
        assert (out_dir / name).is_file(), name
    assert not [p for p in out_dir.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    loaded = DreamPipeline.from_pretrained(out_dir, device="cpu")

    assert loaded.config == tiny_pipe.config
    assert loaded.captions == tiny_pipe.captions
    assert loaded.model_card == tiny_pipe.model_card
    for ours, theirs in ((tiny_pipe.model, loaded.model), (tiny_pipe.image_tokenizer.vae, loaded.image_tokenizer.vae),
                         (tiny_pipe.text_encoder.model, loaded.text_encoder.model)):
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert loaded.image_tokenizer.scaling_factor == tiny_pipe.image_tokenizer.scaling_factor

    x = tiny_pipe(PROMPT, seed=11, num_candidates=2, decision_step=2, **FAST)
    y = loaded(PROMPT, seed=11, num_candidates=2, decision_step=2, **FAST)
    assert np.array_equal(np.asarray(x.images[0]), np.asarray(y.images[0]))
    assert x.scores == y.scores and x.chosen == y.chosen


def test_save_with_a_new_model_card(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "m", model_card="# another card\n")
    assert (tmp_path / "m" / "README.md").read_text() == "# another card\n"
    assert DreamPipeline.from_pretrained(tmp_path / "m", device="cpu").model_card == "# another card\n"


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------

BAD_CALLS = [
    (dict(prompt=""), "prompt must not be empty"),
    (dict(prompt="   \n "), "prompt must not be empty"),
    (dict(prompt="a " * 600), "prompt is too long"),
    (dict(prompt=None), "prompt must be a string"),
    (dict(prompt=["a red circle", "a blue square"]), "prompt must be a single string"),
    (dict(num_candidates=0), "num_candidates"),
    (dict(num_candidates=-2), "num_candidates"),
    (dict(num_candidates=2.0), "num_candidates"),
    (dict(num_candidates=1000), "num_candidates"),
    (dict(num_candidates=3, decision_step=0), "decision_step"),
    (dict(num_candidates=3, decision_step=4), "decision_step"),  # = steps: no step left after it
    (dict(num_candidates=3, decision_step=[3, 2]), "decision_step"),
    (dict(num_candidates=3, decision_step=1.5), "decision_step"),
    (dict(num_candidates=3, decision_step=[]), "decision_step"),
    (dict(num_candidates=1, decision_step=9), "decision_step"),
    (dict(num_candidates=3, num_inference_steps=1), "num_inference_steps"),
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(num_inference_steps=17), "num_inference_steps"),  # > 16 tokens of the tiny model
    (dict(num_inference_steps=4.0), "num_inference_steps"),
    (dict(guidance_scale=float("nan")), "guidance_scale"),
    (dict(guidance_scale=float("inf")), "guidance_scale"),
    (dict(guidance_scale=-1.0), "guidance_scale"),
    (dict(guidance_scale="3"), "guidance_scale"),
    (dict(guidance_schedule="cosine"), "guidance_schedule"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=-0.5), "temperature"),
    (dict(negative_prompt=3), "negative_prompt"),
    (dict(negative_prompt="x" * 1001), "negative_prompt"),
    (dict(head_steps=0), "head_steps"),
    (dict(head_steps=1001), "head_steps"),
    (dict(seed=-1), "seed"),
    (dict(seed="7"), "seed"),
    (dict(generator=7), "generator"),
]


@pytest.mark.parametrize("kwargs, match", BAD_CALLS)
def test_bad_generation_arguments_raise_naming_the_argument(tiny_pipe, kwargs, match):
    args = dict(prompt=PROMPT, **FAST)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        tiny_pipe(**args)
    with pytest.raises(ValueError, match=match):
        next(iter(tiny_pipe.stream(**args)))


def test_bad_num_images_raises(tiny_pipe):
    for bad in (0, 65, 1.5):
        with pytest.raises(ValueError, match="num_images"):
            tiny_pipe(PROMPT, num_images=bad, **FAST)


def test_valid_edge_arguments_are_accepted(tiny_pipe):
    """The boundaries themselves: one step, as many steps as tokens, K = 1 with a valid decision
    step (a no-op), the last possible decision step, CFG off and unconditional, numpy integers."""
    L = tiny_pipe.config.seq_len
    for kwargs in (dict(num_inference_steps=1), dict(num_inference_steps=L), dict(decision_step=3),
                   dict(num_candidates=2, decision_step=3), dict(guidance_scale=1.0), dict(guidance_scale=0.0),
                   dict(temperature=0.0), dict(negative_prompt="a purple cross"), dict(negative_prompt="  "),
                   dict(num_candidates=np.int64(2), seed=np.int64(4))):
        args = dict(FAST, seed=0)
        args.update(kwargs)
        out = tiny_pipe(PROMPT, **args)
        assert len(out.images) == 1, kwargs


# ---------------------------------------------------------------------------------------------
# Checkpoint checks
# ---------------------------------------------------------------------------------------------


def test_missing_directory_or_files_raise(tmp_path, tiny_model_dir):
    with pytest.raises(ValueError, match="does not exist"):
        DreamPipeline.from_pretrained(tmp_path / "nowhere", device="cpu")
    for name in ("config.json", "model.safetensors", "vae", "text"):
        d = _copy(tiny_model_dir, tmp_path / name)
        target = d / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
        with pytest.raises(ValueError, match=f"missing {name}"):
            DreamPipeline.from_pretrained(d, device="cpu")


def test_a_vae_other_than_the_trained_one_is_refused(tmp_path, tiny_model_dir):
    """config.vae_scaling_factor is the latent scale the weights were trained with: a vae/ that
    scales differently (or has other channels) would decode garbage, so loading refuses it."""
    d = _copy(tiny_model_dir, tmp_path)
    vae_config = d / "vae" / "config.json"
    vae_config.write_text(json.dumps({**json.loads(vae_config.read_text()), "scaling_factor": 0.25}))
    with pytest.raises(ValueError, match=r"^vae/ scales latents by 0.25 but the weights were trained with "
                                         r"config.vae_scaling_factor=0.5$"):
        DreamPipeline.from_pretrained(d, device="cpu")
    tiny = DreamPipeline.from_pretrained(tiny_model_dir, device="cpu")
    with pytest.raises(ValueError, match="^vae/ has 4 latent channels but config.vae_channels=8$"):
        check_image_tokenizer(tiny.config.replace(vae_channels=8), tiny.image_tokenizer)


@pytest.mark.parametrize("how", ["garbage", "truncated", "empty"])
def test_corrupt_weights_raise(tmp_path, tiny_model_dir, how):
    d = _copy(tiny_model_dir, tmp_path)
    weights = d / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"garbage": b"this is not a safetensors file" * 10, "truncated": data[: len(data) // 2],
                         "empty": b""}[how])
    with pytest.raises(ValueError, match="model.safetensors"):
        DreamPipeline.from_pretrained(d, device="cpu")


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "extra.pkl", "ema.ckpt"])
def test_pickled_files_are_refused(tmp_path, tiny_model_dir, name):
    d = _copy(tiny_model_dir, tmp_path)
    (d / name).write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    with pytest.raises(ValueError, match="pickle"):
        DreamPipeline.from_pretrained(d, device="cpu")


def test_a_pickled_file_in_a_subfolder_is_refused(tmp_path, tiny_model_dir):
    d = _copy(tiny_model_dir, tmp_path)
    (d / "vae" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(ValueError, match="pickle"):
        DreamPipeline.from_pretrained(d, device="cpu")


@pytest.mark.parametrize("change, match", [
    (dict(width=64, mlp_dim=128), "does not match config.json"),
    (dict(encoder_depth=3), "does not match config.json"),
    (dict(image_size=64), "does not match config.json"),
    (dict(num_heads=3), "num_heads=3"),
    (dict(depth=3), "unknown DreamConfig keys: depth"),
])
def test_mismatched_config_raises(tmp_path, tiny_model_dir, change, match):
    d = _copy(tiny_model_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(change)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        DreamPipeline.from_pretrained(d, device="cpu")


def test_t5_width_must_match_the_config(tmp_path, tiny_model_dir):
    from dream_core.text import build_t5_from_scratch

    d = _copy(tiny_model_dir, tmp_path)
    shutil.rmtree(d / "text")
    build_t5_from_scratch(d / "text", ["a red circle", "a blue square on a white background"], d_model=48,
                          num_layers=1, num_heads=2, d_ff=32, vocab_size=32)
    with pytest.raises(ValueError, match="t5_dim"):
        DreamPipeline.from_pretrained(d, device="cpu")


def test_unavailable_cuda_is_a_clear_error(tiny_model_dir):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ValueError, match="CUDA"):
        DreamPipeline.from_pretrained(tiny_model_dir, device="cuda")


# ---------------------------------------------------------------------------------------------
# Reverse search and zero-shot
# ---------------------------------------------------------------------------------------------


def test_search_returns_the_top_k_captions_sorted(tiny_pipe, picture):
    results = tiny_pipe.search(picture, top_k=3)
    assert len(results) == 3
    scores = [s for _, s in results]
    assert scores == sorted(scores, reverse=True)
    assert all(c in tiny_pipe.captions for c, _ in results)
    # Against a direct computation in the joint space.
    img = tiny_pipe.embed_images([picture])[0]
    txt = tiny_pipe.embed_texts(tiny_pipe.captions)
    expected = (txt @ img).topk(3)
    assert [c for c, _ in results] == [tiny_pipe.captions[i] for i in expected.indices.tolist()]
    np.testing.assert_allclose(scores, expected.values.tolist(), rtol=1e-5, atol=1e-6)
    # top_k beyond the bank returns the whole bank; a custom bank is searched when given.
    assert len(tiny_pipe.search(picture, top_k=100)) == len(tiny_pipe.captions)
    custom = ["a purple cross", "a big green triangle on the right"]
    assert {c for c, _ in tiny_pipe.search(picture, top_k=5, captions=custom)} == set(custom)
    # Numpy images work as well as PIL.
    assert tiny_pipe.search(np.asarray(picture), top_k=3) == results


def test_search_rank_of_agrees_with_search(tiny_pipe, picture):
    bank = tiny_pipe.caption_bank()
    img = tiny_pipe.embed_images([picture])[0]
    for rank, (caption, _) in enumerate(bank.search(img, top_k=len(bank.captions)), start=1):
        assert bank.rank_of(img, caption) == rank


@pytest.mark.parametrize("image, match", [
    ("picture.png", "image must be a PIL image"),
    (None, "image must be a PIL image"),
    (torch.zeros(3, 32, 32), "image must be a PIL image"),
    (np.zeros((1, 2, 32, 32, 3)), "image array"),
])
def test_search_rejects_wrong_image_types(tiny_pipe, image, match):
    with pytest.raises(ValueError, match=match):
        tiny_pipe.search(image)


def test_search_rejects_bad_arguments(tiny_pipe, picture):
    with pytest.raises(ValueError, match="top_k"):
        tiny_pipe.search(picture, top_k=0)
    with pytest.raises(ValueError, match="captions"):
        tiny_pipe.search(picture, captions=["ok", ""])
    with pytest.raises(ValueError, match="captions"):
        tiny_pipe.search(picture, captions=[])


def test_a_bank_line_is_a_caption_or_a_caption_tab_detail():
    text = ("a red circle\n\n  a blue square\t🟦  blue, square  \na green triangle\t\n   \n\tonly a detail\n"
            "a b\tc\td\r\n")
    captions, details = retrieval.parse_caption_bank(text)
    assert captions == ["a red circle", "a blue square", "a green triangle", "a b"]  # blank and caption-less skipped
    assert details == ["", "🟦  blue, square", "", "c d"]  # none, stripped, empty, a further tab read as a space
    assert retrieval.parse_caption_bank("") == ([], [])


def test_a_bank_refuses_what_would_not_read_back(tmp_path):
    for captions, details in ((["a"], ["one\ntwo"]), (["a"], ["one\ttwo"]), (["a\tb"], None), (["a", "b"], ["x"])):
        with pytest.raises(ValueError, match="tab or a line break|caption details"):
            retrieval.write_caption_bank(tmp_path / "captions.txt", captions, details)
    assert not (tmp_path / "captions.txt").exists()


def test_bank_details_round_trip_and_are_never_embedded(tiny_model_dir, tmp_path, picture, _cache_in_tmp):
    import hashlib

    model = _copy(tiny_model_dir, tmp_path)
    plain = (model / "captions.txt").read_bytes()
    captions = plain.decode().splitlines()
    assert plain == ("\n".join(captions) + "\n").encode()  # a bank without details: one caption a line, as ever
    assert DreamPipeline.from_pretrained(model, device="cpu").caption_details == [""] * len(captions)
    details = ["😀  face, grin, grinning face"] + [""] * (len(captions) - 2) + ["❤️  heart, love"]
    retrieval.write_caption_bank(model / "captions.txt", captions, details)
    pipe = DreamPipeline.from_pretrained(model, device="cpu")
    assert pipe.captions == captions and pipe.caption_details == details
    assert pipe.caption_detail(captions[0]) == details[0] and pipe.caption_detail(captions[1]) == ""
    assert pipe.caption_detail("not in the bank") == ""
    pipe.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "captions.txt").read_bytes() == (model / "captions.txt").read_bytes()
    again = DreamPipeline.from_pretrained(tmp_path / "again", device="cpu")
    assert again.captions == captions and again.caption_details == details
    # The cache key is the weights' and the captions' alone, as for a bank without details.
    pipe.caption_bank()
    key = hashlib.sha256((pipe.weights_fingerprint() + "\n" + "\n".join(captions)).encode()).hexdigest()[:24]
    assert [p.name for p in _cache_in_tmp.glob("*.safetensors")] == [f"{key}.safetensors"]
    assert pipe.search(picture, top_k=3) == _bank(pipe, captions).search(pipe.embed_images([picture])[0], 3)


def _bank(pipe, captions):
    """A bank built from what it needs (an embedding function and the weights' fingerprint)."""
    return CaptionBank.build(pipe.embed_texts, pipe.weights_fingerprint(), captions)


def test_bank_embeddings_are_cached_on_disk_and_reused(tiny_pipe, monkeypatch, _cache_in_tmp):
    captions = ["a purple cross", "a tiny yellow diamond at the bottom", "a large blue square in the middle"]
    first = _bank(tiny_pipe, captions)
    files = list(_cache_in_tmp.glob("*.safetensors"))
    assert len(files) == 1

    def no_recompute(*args, **kwargs):
        raise AssertionError("bank embeddings were recomputed instead of read from the cache")

    real_embed_texts = tiny_pipe.embed_texts
    monkeypatch.setattr(tiny_pipe, "embed_texts", no_recompute)
    again = _bank(tiny_pipe, captions)
    assert again.captions == captions
    assert torch.equal(again.embeddings, first.embeddings)
    # Another caption list is another cache entry (and needs computing).
    with pytest.raises(AssertionError, match="recomputed"):
        _bank(tiny_pipe, captions[:2])
    monkeypatch.setattr(tiny_pipe, "embed_texts", real_embed_texts)
    _bank(tiny_pipe, captions[:2])
    assert len(list(_cache_in_tmp.glob("*.safetensors"))) == 2


def test_a_damaged_cache_file_is_rebuilt(tiny_pipe, _cache_in_tmp):
    captions = ["a purple cross", "a big green triangle on the right"]
    first = _bank(tiny_pipe, captions)
    (path,) = _cache_in_tmp.glob("*.safetensors")
    path.write_bytes(b"damaged")
    again = _bank(tiny_pipe, captions)
    torch.testing.assert_close(again.embeddings, first.embeddings)


def test_zero_shot_probabilities_sum_to_one(tiny_pipe, picture):
    labels = ["circle", "square", "triangle", "diamond"]
    result = tiny_pipe.zero_shot(picture, labels)
    assert sorted(lab for lab, _ in result) == sorted(labels)
    probs = [p for _, p in result]
    assert sum(probs) == pytest.approx(1.0, abs=1e-5)
    assert all(0 <= p <= 1 for p in probs) and probs == sorted(probs, reverse=True)
    templated = tiny_pipe.zero_shot(picture, labels, template="a {} on a white background")
    assert sum(p for _, p in templated) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="template"):
        tiny_pipe.zero_shot(picture, labels, template="no slot")
    with pytest.raises(ValueError, match="labels"):
        tiny_pipe.zero_shot(picture, [])


def test_embeddings_are_normalised(tiny_pipe, picture):
    img = tiny_pipe.embed_images([picture, picture.rotate(90)])
    txt = tiny_pipe.embed_texts(["a purple cross", "a red circle"])
    assert img.shape == txt.shape == (2, tiny_pipe.config.embed_dim)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(2))
    with pytest.raises(ValueError, match="empty"):
        tiny_pipe.embed_images([])
