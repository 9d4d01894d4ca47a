"""DreamConfig: the paper presets, derived geometry, the JSON round trip and its error messages."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from dream_core import DreamConfig

REPO = Path(__file__).resolve().parents[1]

# Official size factories (spec §1.3): width, encoder/decoder depth, heads, MLP hidden.
PAPER_SIZES = {
    "base": (768, 12, 12, 3072),
    "large": (1024, 16, 16, 4096),
    "huge": (1280, 20, 16, 5120),
    "giant": (1664, 24, 16, 8192),
}


@pytest.mark.parametrize("name", list(PAPER_SIZES))
def test_paper_presets_match_the_official_scripts(name):
    c = DreamConfig.preset(name)
    width, depth, heads, mlp = PAPER_SIZES[name]
    assert c.name == name
    assert (c.width, c.encoder_depth, c.decoder_depth, c.num_heads, c.mlp_dim) == (width, depth, depth, heads, mlp)
    # SD-VAE latents (4 channels, stride 8) cut into 2 x 2 patches: 256 tokens of 16 channels.
    assert (c.image_size, c.vae_channels, c.vae_stride, c.patch_size) == (256, 4, 8, 2)
    assert c.vae_scaling_factor == 0.18215
    assert (c.seq_len, c.token_dim, c.tokens_per_side, c.latent_size) == (256, 16, 16, 32)
    assert c.buffer_size == 64
    assert (c.head_depth, c.head_width, c.diffusion_batch_mul, c.num_train_timesteps) == (3, 1024, 4, 1000)
    assert getattr(c, "clip_denoised", 0.0) == 0.0  # the official sampler: x0 is never clipped
    assert (c.clip_width, c.clip_layers, c.clip_heads, c.clip_context_length) == (512, 12, 8, 77)
    assert (c.projector_hidden, c.embed_dim) == (1024, 256)
    assert (c.aligner_depth, c.t5_max_length) == (6, 128)
    assert c.logit_scale_init == pytest.approx(math.log(1 / 0.07))
    assert (c.clip_weight, c.min_visible_for_clip, c.min_masked_for_diffusion, c.caption_dropout) == (
        0.005, 0.25, 0.5, 0.1)


def test_every_preset_is_valid_and_named():
    names = DreamConfig.preset_names()
    assert {"base", "large", "huge", "giant", "shapes", "tiny"} <= set(names)
    for name in names:
        c = DreamConfig.preset(name)
        assert c.name == name
        assert c.validate() is c
        assert c.width % c.num_heads == 0


def test_unknown_preset_raises_naming_it():
    with pytest.raises(ValueError, match="unknown preset 'colossal'"):
        DreamConfig.preset("colossal")


def test_derived_geometry_of_the_tiny_preset():
    c = DreamConfig.preset("tiny")
    assert (c.latent_size, c.tokens_per_side, c.seq_len, c.token_dim, c.head_dim) == (8, 4, 16, 16, 16)


def test_json_round_trip_is_exact(tmp_path):
    c = DreamConfig.preset("giant").replace(t5_dim=1024, repa_block=8, sad_decision_share=0.3)
    path = tmp_path / "config.json"
    c.save(path)
    back = DreamConfig.load(path)
    assert back == c
    assert back.to_dict() == c.to_dict()
    assert json.loads(path.read_text())["width"] == 1664
    # Saving the loaded config gives the same bytes (sorted keys, stable formatting).
    c2 = tmp_path / "again.json"
    back.save(c2)
    assert c2.read_bytes() == path.read_bytes()


def test_replace_returns_a_new_validated_config():
    base = DreamConfig.preset("base")
    c = base.replace(t5_dim=1024)
    assert c.t5_dim == 1024 and base.t5_dim == 4096
    with pytest.raises(ValueError, match="config.num_heads"):
        base.replace(num_heads=0)


def test_unknown_keys_are_rejected_by_name(tmp_path):
    data = DreamConfig.preset("tiny").to_dict()
    data["widht"] = 64
    data["zzz"] = 1
    with pytest.raises(ValueError, match="unknown DreamConfig keys: widht, zzz"):
        DreamConfig.from_dict(data)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="widht"):
        DreamConfig.load(path)
    with pytest.raises(ValueError, match="unknown DreamConfig keys: depth"):
        DreamConfig.preset("tiny").replace(depth=3)


@pytest.mark.parametrize("overrides, key", [
    (dict(width=30, num_heads=4), "config.width=30 must be divisible by num_heads=4"),
    (dict(width=0), "config.width"),
    (dict(encoder_depth=-1), "config.encoder_depth"),
    (dict(num_heads=2.5), "config.num_heads"),
    (dict(buffer_size=True), "config.buffer_size"),
    (dict(mlp_dim="64"), "config.mlp_dim"),
    (dict(image_size=36), "config.image_size=36"),
    (dict(clip_width=30, clip_heads=4), "config.clip_width"),
    (dict(attn_dropout=1.5), "config.attn_dropout"),
    (dict(caption_dropout=-0.1), "config.caption_dropout"),
    (dict(min_visible_for_clip=2.0), "config.min_visible_for_clip"),
    (dict(min_masked_for_diffusion=float("nan")), "config.min_masked_for_diffusion"),
    (dict(clip_weight=float("inf")), "config.clip_weight"),
    (dict(diffusion_weight=-1.0), "config.diffusion_weight"),
    (dict(vae_scaling_factor=float("nan")), "config.vae_scaling_factor"),
    (dict(repa_block=3), "config.repa_block"),
    (dict(aligner_depth=-1), "config.aligner_depth"),
    (dict(t5_dim=0), "config.t5_dim"),
    (dict(t5_max_length=0), "config.t5_max_length"),
    (dict(clip_pooling="max"), "config.clip_pooling must be one of"),
    (dict(clip_pooling="attention", clip_projection="pre"), "it needs clip_projection='post'"),
    (dict(default_temperature=2.5), r"config.default_temperature must be in [0, 2.0], got 2.5"),
    (dict(default_temperature=True), "config.default_temperature"),
    (dict(default_head_sampler="euler"),
     r"config.default_head_sampler must be one of ancestral, ddim, dpm-solver\+\+, got 'euler'"),
    (dict(default_head_steps=0), r"config.default_head_steps must be an integer in [1, num_train_timesteps=1000], got 0"),
    (dict(default_head_steps=1001), "config.default_head_steps"),
    (dict(default_head_steps=25.0), "config.default_head_steps"),
])
def test_impossible_values_raise_naming_the_key(overrides, key):
    with pytest.raises(ValueError, match=key.replace("[", r"\[").replace("]", r"\]")):
        DreamConfig.preset("tiny").replace(**overrides)


def test_sampling_fields_are_the_configs_sampling_section():
    """SAMPLING_FIELDS (what a resume may change) names the config's sampling defaults, every one of
    them and nothing that shapes or trains the weights."""
    from dream_core.config import SAMPLING_FIELDS

    source = (Path(__file__).resolve().parents[1] / "dream_core" / "config.py").read_text()
    section = source.split("# ----- sampling defaults")[1].split("# ----- training losses")[0]
    assert set(SAMPLING_FIELDS) == set(re.findall(r"^    (\w+): ", section, re.M))
    config = DreamConfig.preset("tiny")
    assert set(config.to_dict()) - set(config.weights_dict()) == set(SAMPLING_FIELDS)


def test_config_files_written_before_the_regrouping_still_load(tmp_path):
    """Flat keys as every config.json so far holds them, with the retired `extra` catch-all."""
    bundled = DreamConfig.load(REPO / "assets" / "dream-shapes" / "config.json")
    assert (bundled.name, bundled.seq_len, bundled.clip_denoised, bundled.vae_scaling_factor) == (
        "shapes", 16, 5.0, pytest.approx(0.3715726137161255))
    old = DreamConfig.preset("tiny").to_dict()
    assert "extra" not in old
    path = tmp_path / "old.json"
    path.write_text(json.dumps({**old, "extra": {}}))
    assert DreamConfig.load(path) == DreamConfig.preset("tiny")
    path.write_text(json.dumps({**old, "extra": {"note": "x"}}))  # never dropped silently
    with pytest.raises(ValueError, match=r"config.extra is no longer supported and holds \['note'\]"):
        DreamConfig.load(path)


def test_every_config_field_is_read_outside_config_py():
    """No dead settings: each field is read as an attribute (`config.x`, `c.x`) by the engine,
    training or the app."""
    sources = "".join(p.read_text() for folder in ("dream_core", "training", "app")
                      for p in (REPO / folder).rglob("*.py") if p.name != "config.py")
    unread = [f for f in DreamConfig().to_dict() if f != "name" and not re.search(rf"\.{f}\b", sources)]
    assert unread == []


def test_load_rejects_non_json_and_non_objects(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{width: 3")
    with pytest.raises(ValueError, match="not valid JSON"):
        DreamConfig.load(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        DreamConfig.load(bad)
    # A config whose values are impossible fails at load, naming the key.
    data = DreamConfig.preset("tiny").to_dict()
    data["num_heads"] = 3
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="num_heads=3"):
        DreamConfig.load(bad)


def test_head_sampler_defaults_round_trip_and_old_files_load_as_before(tmp_path):
    """The head's sampler and steps are saved with the model; a config.json written before they
    existed loads with the ancestral sampler over 100 steps, the only sampler it knew."""
    from dream_core.request import DEFAULT_HEAD_SAMPLER, DEFAULT_HEAD_STEPS

    fast = DreamConfig.preset("tiny").replace(default_head_sampler="ddim", default_head_steps=25)
    fast.save(tmp_path / "config.json")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["default_head_sampler"], saved["default_head_steps"]) == ("ddim", 25)
    assert DreamConfig.load(tmp_path / "config.json") == fast
    old = {k: v for k, v in DreamConfig.preset("tiny").to_dict().items()
           if k not in ("default_head_sampler", "default_head_steps")}
    (tmp_path / "old.json").write_text(json.dumps(old))
    loaded = DreamConfig.load(tmp_path / "old.json")
    assert (loaded.default_head_sampler, loaded.default_head_steps) == (DEFAULT_HEAD_SAMPLER, DEFAULT_HEAD_STEPS) \
        == ("ancestral", 100)
    bundled = json.loads((REPO / "assets" / "dream-shapes" / "config.json").read_text())
    if "default_head_sampler" not in bundled:  # the shipped model samples as it was measured
        assert DreamConfig.load(REPO / "assets" / "dream-shapes" / "config.json").default_head_sampler == "ancestral"
