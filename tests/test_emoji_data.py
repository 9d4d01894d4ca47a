"""The emoji data (training.data.emoji) on a tiny fake npm cache, and the general commands the emoji
model is built with: the VAE on any file source and the text vocabulary from captions."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from training.data import emoji
from training.data.emoji import (CAPTION_TEMPLATES, EXTRA_PACKAGES, PACKAGE_OF_STYLE, STYLES, EmojiSource, base_key,
                                 build_emoji_set, build_extra_art, caption, emoji_key, is_heldout, normalise,
                                 package_dir)

ROOT = Path(__file__).resolve().parents[1]
SVG = ('<svg xmlns="http://www.w3.org/2000/svg" width="72" height="72" viewBox="0 0 72 72">'
       '<rect x="16" y="16" width="40" height="40" fill="{colour}"/></svg>')
# (hexcode as OpenMoji writes it, name, keywords, colour); the second is a skin-tone variant of the first.
EMOJI = [("1F44B", "waving hand", "hand, wave, waving", "#ff0000"),
         ("1F44B-1F3FB", "waving hand: light skin tone", "", "#00ff00"),
         ("2764-FE0F", "red heart", "heart, love", "#0000ff"),
         ("1F600", "grinning face", "face, grin", "#ffff00")]


def heldout_base() -> str:
    """A 4-hex-digit codepoint whose OpenMoji images the fixed split holds out."""
    return next(f"{c:04X}" for c in range(0x2000, 0x3000) if is_heldout(f"{c:04X}"))


def require_cairo() -> None:
    """Skip a test that renders OpenMoji's SVGs on a machine without cairosvg or libcairo2."""
    try:
        emoji.svg_renderer()
    except RuntimeError as err:
        pytest.skip(str(err))


def fake_cache(root: Path) -> Path:
    """The three unpacked packages, as `fetch_packages` leaves them, with a held-out emoji added."""
    held = heldout_base()
    rows = EMOJI + [(held, "held out thing", "thing", "#ff00ff")]
    meta = []
    for pkg in PACKAGE_OF_STYLE.values():
        folder = package_dir(root, pkg) / "package" / pkg.images
        folder.mkdir(parents=True)
        (package_dir(root, pkg) / "package" / "package.json").write_text("{}")
        for hexcode, _, _, colour in rows:
            if pkg.suffix == ".svg":
                (folder / f"{hexcode}.svg").write_text(SVG.format(colour=colour))
            else:  # emoji-datasource names files in lower case with FE0F kept
                im = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
                im.paste(Image.new("RGBA", (30, 40), colour), (10, 5))
                im.save(folder / f"{hexcode.lower()}.png")
    for hexcode, name, tags, _ in rows:
        meta.append({"hexcode": hexcode, "annotation": name, "tags": tags, "group": "people-body",
                     "subgroups": "hand", "skintone": ""})
    data = package_dir(root, PACKAGE_OF_STYLE["openmoji"]) / "package" / "data"
    data.mkdir()
    (data / "openmoji.json").write_text(json.dumps(meta))
    return root


def test_keys_drop_fe0f_and_pad_codepoints():
    assert emoji_key("2764-fe0f") == "2764"
    assert emoji_key("23-fe0f-20e3") == "0023-20E3"
    assert base_key("1F44B-1F3FB") == "1F44B"
    assert base_key("1F9D1-1F3FB-200D-1F91D-200D-1F9D1-1F3FC") == "1F9D1-200D-1F91D-200D-1F9D1"


def test_split_is_the_published_sha256_rule():
    for key in ("1F600", "1F44B", "2764", heldout_base()):
        assert is_heldout(key) == (int(hashlib.sha256(key.encode()).hexdigest(), 16) % 10 == 0)


def test_normalise_fills_the_box_whatever_the_art_size():
    small = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    small.paste(Image.new("RGBA", (20, 20), (255, 0, 0, 255)), (22, 22))
    out = normalise(small)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    red = (out[..., 0] > 200) & (out[..., 1] < 60)
    rows, cols = np.where(red)
    # a square of art becomes a square filling the box but for the margin, on white
    assert rows.min() <= emoji.MARGIN + 1 and rows.max() >= 63 - emoji.MARGIN - 1
    assert cols.min() <= emoji.MARGIN + 1 and cols.max() >= 63 - emoji.MARGIN - 1
    assert (out[0, 0] == 255).all()


def test_captions_are_a_pure_function_of_the_sample():
    rec = {"key": "1F600", "name": "grinning face", "keywords": ["face", "grin", "smile", "happy", "cheerful"]}
    texts = [caption(rec, "twemoji", t) for t in range(len(CAPTION_TEMPLATES))]
    assert texts[0] == "grinning face"
    assert texts[1] == "grinning face, twemoji style"
    assert texts[2] == "a grinning face emoji in twemoji style"
    assert texts[3].startswith("grinning face, ") and "style" not in texts[3]
    assert texts[3].count(",") == emoji.MAX_KEYWORDS  # the name, then 3 keywords
    assert "face" not in texts[3][len("grinning face"):]  # a keyword inside the name is not repeated
    assert texts == [caption(rec, "twemoji", t) for t in range(len(CAPTION_TEMPLATES))]
    # no keyword to add: the name and the style
    assert caption({**rec, "keywords": []}, "noto", 3) == "grinning face, noto style"


def test_the_bank_shows_each_emoji_and_its_keywords():
    records = [{"key": "1F600", "name": "grinning face", "keywords": ["face", "grin"],
                "files": {"noto": "1f600.png", "twemoji": "1f600.png", "openmoji": "1F600.svg"}},
               {"key": "2764", "name": "red heart", "keywords": ["heart", "love"],  # the key drops FE0F
                "files": {"noto": "2764-fe0f.png", "twemoji": "2764-fe0f.png", "openmoji": "2764.svg"}},
               {"key": "1F44D-1F3FF", "name": "thumbs up: dark skin tone", "keywords": ["hand", "thumb\tup"],
                "files": {"noto": "1f44d-1f3ff.png"}},
               {"key": "1F680", "name": "rocket", "keywords": []}]  # no file: the key's codepoints
    bank = emoji.caption_bank_with_details(records)
    assert bank == [("grinning face", "😀  face, grin"), ("red heart", "\u2764\ufe0f  heart, love"),
                    ("thumbs up: dark skin tone", "👍🏿  hand, thumb up"), ("rocket", "🚀")]
    assert [c for c, _ in bank] == [emoji.bank_entry(r) for r in records]  # the captions: the names alone


def test_build_and_source_on_a_fake_cache(tmp_path):
    require_cairo()
    cache = fake_cache(tmp_path / "cache")
    path = build_emoji_set(cache)
    assert path.name == "emoji-64.npz" and not list(cache.glob("*.partial*"))
    meta = json.loads(path.with_suffix(".json").read_text())
    names = [r["name"] for r in meta["records"]]
    assert names[:4] == [e[1] for e in EMOJI] and len(names) == 5
    tone = meta["records"][1]
    assert tone["skin_tone"] == "light skin tone" and tone["keywords"] == ["hand", "wave", "waving"]  # inherited
    assert meta["records"][2]["key"] == "2764"
    train, held, every = (EmojiSource(cache, s) for s in ("train", "heldout", "all"))
    assert len(every.pairs) == 15 and len(held.pairs) == 1 and len(train.pairs) == 14
    assert held.pairs.tolist() == [[4, STYLES.index("openmoji")]]
    assert len(train) == 14 * len(CAPTION_TEMPLATES) and len(held) == 1
    image, text = train.read(0)
    assert image.size == (64, 64) and text == "waving hand"
    assert train.read(14)[1] == "waving hand, noto style"  # sample i: image i % P, template i // P
    assert train.caption_bank() == names  # reverse search's bank: every name, every split
    bank = train.caption_bank_with_details()
    assert [c for c, _ in bank] == names and bank[2] == ("red heart", "\u2764\ufe0f  heart, love")
    assert bank[1] == ("waving hand: light skin tone", "\U0001f44b\U0001f3fb  hand, wave, waving")  # the base's
    assert len(train.captions()) == len(train)
    style_free = EmojiSource(cache, "train", "0,3")  # recipe.caption_templates: these templates only
    assert len(style_free) == 14 * 2 and style_free.read(0)[1] == "waving hand"
    assert style_free.read(14)[1] == train.read(14 * 3)[1] == "waving hand, wave"
    for bad in ("5", "0,0", "name"):
        with pytest.raises(ValueError, match=r"caption_templates must list distinct indices 0-4"):
            EmojiSource(cache, "train", bad)
    # the first image of each style is its package's art in the emoji's colour, on white
    assert tuple(every.images[0, 0, 32, 32]) == (255, 0, 0)
    assert tuple(every.images[0, 2, 32, 32]) == (255, 0, 0)
    # built once: a second call reads nothing from the packages
    assert build_emoji_set(cache) == path


def test_cross_style_views_show_the_emoji_in_its_other_trained_styles(tmp_path):
    """recipe.cross_style_views: each sample also carries its emoji in another style of the split,
    turning with the caption template; a held-out OpenMoji image is never anyone's view."""
    require_cairo()
    from training.data.sources import build_dataloader
    from training.recipes import get_recipe

    path = build_emoji_set(fake_cache(tmp_path / "cache"))
    train = EmojiSource(path.parent, "train", views=True)
    assert not EmojiSource(path.parent, "train").views
    noto, twemoji, openmoji = (STYLES.index(s) for s in ("noto", "twemoji", "openmoji"))
    n = len(train.pairs)
    seen = []
    for t in range(len(CAPTION_TEMPLATES)):  # emoji 0 in Noto: Twemoji and OpenMoji in turn
        view = np.asarray(train.read_view(t * n))
        seen.append(next(s for s in (twemoji, openmoji) if np.array_equal(view, train.images[0, s])))
    assert seen == [twemoji, openmoji, twemoji, openmoji, twemoji]
    held_noto = next(i for i, (e, s) in enumerate(train.pairs.tolist()) if e == 4 and s == noto)
    for t in range(len(CAPTION_TEMPLATES)):  # the held-out emoji: only Twemoji, whatever the template
        assert np.array_equal(np.asarray(train.read_view(held_noto + t * n)), train.images[4, twemoji])
    recipe = get_recipe("emoji").overrides([f"data_path={path.parent}", "batch_size=4", "cross_style_views=true"])
    batch = next(iter(build_dataloader(recipe, SimpleNamespace(image_size=64))))
    assert batch["view"].shape == batch["image"].shape == (4, 3, 64, 64)
    with pytest.raises(ValueError, match="recipe.cross_style_views pairs each emoji with its other styles "
                                         r"\(data=emoji\), not data=shapes"):
        get_recipe("shapes").overrides(["cross_style_views=true"])


def fake_extra_art(cache: Path) -> None:
    """EXTRA_PACKAGES unpacked: waving hand redrawn in the first (then the same drawing again in the
    second), red heart as the set's Noto art, grinning face redrawn in the second, and an emoji the
    set lacks."""
    art = {0: {"1f44b": "#123456", "2764-fe0f": "#0000ff", "1f9ff": "#abcdef"},
           1: {"1f44b": "#123456", "1f600": "#00ffff"}}
    for j, pkg in enumerate(EXTRA_PACKAGES):
        folder = package_dir(cache, pkg) / "package" / pkg.images
        folder.mkdir(parents=True)
        (package_dir(cache, pkg) / "package" / "package.json").write_text("{}")
        for name, colour in art[j].items():
            im = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
            im.paste(Image.new("RGBA", (30, 40), colour), (10, 5))  # the set's Noto art has this shape
            im.save(folder / f"{name}.png")


def test_extra_art_adds_distinct_older_pictures_captioned_without_a_style(tmp_path):
    """recipe.extra_art: the older Noto pictures that differ from an emoji's current one follow the
    set's images, each under the style-free templates in turn, in the train split only."""
    require_cairo()
    from training.data.sources import build_dataloader
    from training.recipes import get_recipe

    cache = fake_cache(tmp_path / "cache")
    fake_extra_art(cache)
    path = build_extra_art(cache)
    assert path.name == "emoji-extra-64.npz" and not list(cache.glob("*.partial*"))
    assert json.loads(path.with_suffix(".json").read_text())["per_package"] == [1, 1]
    train = EmojiSource(cache, "train", extra_art=True)
    assert train.extra_emoji.tolist() == [0, 3]  # the heart (unchanged) and the repeat drawing are dropped
    assert tuple(train.extra_images[0, 32, 32]) == (0x12, 0x34, 0x56)
    n = 14 + 2
    assert len(train) == n * len(CAPTION_TEMPLATES)
    assert len(EmojiSource(cache / "emoji-64.npz", "train", extra_art=True)) == len(train)  # the set's file as root
    plain = EmojiSource(cache, "train")
    assert [train.read(i)[1] for i in range(14)] == [plain.read(i)[1] for i in range(14)]
    # the extras' samples: templates 0 and 3 in turn, keywords drawn afresh each time
    assert [train.read(14 + r * n)[1] for r in range(5)] == ["waving hand", "waving hand, wave"] * 2 + ["waving hand"]
    assert train.read(15 + n)[1] == "grinning face"  # its keywords are in its name: no style word instead
    assert np.array_equal(np.asarray(train.read(15)[0]), train.extra_images[1])
    assert train.describe(15) == "emoji 1F600 (extra picture 1, template 0)"
    # views of an extra picture: its emoji's set images
    view = np.asarray(EmojiSource(cache, "train", views=True, extra_art=True).read_view(14))
    assert any(np.array_equal(view, train.images[0, s]) for s in range(len(STYLES)))
    assert len(EmojiSource(cache, "train", "0", extra_art=True)) == n  # the heads round's name-only captions
    with pytest.raises(ValueError, match=r"caption templates must include a style-free one \(0, 3\), got 1, 2"):
        EmojiSource(cache, "train", "1,2", extra_art=True)
    with pytest.raises(ValueError, match="extra art is training data: the heldout split has none"):
        EmojiSource(cache, "heldout", extra_art=True)
    recipe = get_recipe("emoji").overrides([f"data_path={cache}", "batch_size=4", "extra_art=true"])
    assert next(iter(build_dataloader(recipe, SimpleNamespace(image_size=64))))["image"].shape == (4, 3, 64, 64)
    with pytest.raises(ValueError, match=r"recipe.extra_art adds older pictures .*\(data=emoji\), not data=shapes"):
        get_recipe("shapes").overrides(["extra_art=true"])
    assert build_extra_art(cache) == path  # built once


def test_extra_art_must_be_built_first(tmp_path):
    require_cairo()
    cache = fake_cache(tmp_path / "cache")
    build_emoji_set(cache)
    with pytest.raises(ValueError, match=r"holds no extra art \(emoji-extra-64.npz \+ .json\): build it with "
                                         r"python -m training.data.emoji --cache .* --extra-art"):
        EmojiSource(cache, "train", extra_art=True)


def test_a_run_with_cross_style_views_trains_the_view_loss(tmp_path, tiny_model_dir):
    """The trainer encodes each sample's view and the model logs the image-to-image loss; the
    views and model.view_weight come together or not at all."""
    require_cairo()
    from training.recipes import get_recipe
    from training.train import Trainer, views_config

    path = build_emoji_set(fake_cache(tmp_path / "cache"))
    tiny = ["model=tiny", f"data_path={path.parent}", f"vae_path={tiny_model_dir / 'vae'}",
            f"t5_path={tiny_model_dir / 'text'}", "model.vae_scaling_factor=0.5", "model.t5_dim=32",
            "model.t5_path=text", "model.t5_max_length=16", "model.clip_context_length=16", "batch_size=4",
            "samples_per_epoch=70", "max_steps=2", "log_every=1", "ckpt_every=0", "sample_every=0",
            "precision=fp32", "max_unknown_share=1", "masking=fx", "mask_std=1.0"]
    run = Trainer(get_recipe("emoji").overrides(tiny + ["cross_style_views=true", "model.view_weight=0.5"]),
                  tmp_path / "run")
    last = run.fit()
    assert "view" in last and last["view"] > 0
    for extra, typed in ((["cross_style_views=true"], "cross_style_views=True with model.view_weight=0.0"),
                         (["model.view_weight=0.5"], "cross_style_views=False with model.view_weight=0.5")):
        with pytest.raises(ValueError, match=f"recipe.{typed}: the views feed the image-to-image loss"):
            Trainer(get_recipe("emoji").overrides(tiny + extra), tmp_path / "refused")
    # a weight inherited from init_from's config (a heads round of a model trained with views) is off
    heads = get_recipe("emoji-heads").overrides([f"init_from={tmp_path / 'run'}"])
    assert views_config(heads, run.config).view_weight == 0.0 and run.config.view_weight == 0.5


def test_missing_npm_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(emoji.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="npm, which is not installed"):
        emoji.fetch_packages(tmp_path)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_missing_cairo_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "cairosvg", None)  # import fails as without the package
    with pytest.raises(RuntimeError, match="libcairo2"):
        emoji.svg_renderer()


def test_source_refuses_an_unbuilt_folder(tmp_path):
    with pytest.raises(ValueError, match="python -m training.data.emoji --cache"):
        EmojiSource(tmp_path)
    with pytest.raises(ValueError, match="recipe.data must be one of"):
        from training.recipes import TrainRecipe

        TrainRecipe(data="emojis").validate()


def image_folder(root: Path, n: int = 12) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / f"im{i}.png")
        (root / f"im{i}.txt").write_text(f"a picture of a {['zebra', 'kettle', 'violin'][i % 3]} number {i}")
    return root


def test_vae_trains_on_an_image_folder(tmp_path):
    folder = image_folder(tmp_path / "images")
    out = tmp_path / "vae"
    proc = subprocess.run([sys.executable, "-m", "training.vae", "--out", str(out), "--steps", "2", "--batch-size", "4",
                           "--data", "folder", "--data-path", str(folder), "--channels", "8,16", "--image-size", "32",
                           "--object-boost", "0", "--threads", "1"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["data"] == "folder" and summary["steps"] == 2 and summary["decoder_channels"] == [8, 16]
    assert (out / "config.json").is_file()
    bad = subprocess.run([sys.executable, "-m", "training.vae", "--out", str(out), "--data", "folder"], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--data folder needs --data-path" in bad.stderr


def test_text_vocab_from_a_folder_spells_new_words_in_pieces(tmp_path):
    folder = image_folder(tmp_path / "images")
    out = tmp_path / "text"
    proc = subprocess.run([sys.executable, "-m", "training.text_vocab", "--out", str(out), "--data", "folder",
                           "--data-path", str(folder), "--vocab-size", "60"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["captions"] == 12 and report["tokens_longest"] >= 6
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    ids = tok("a picture of a blue kite")["input_ids"]  # two words the captions never use
    assert tok.unk_token_id not in ids  # a unigram vocabulary spells an unseen word in known pieces
    none = subprocess.run([sys.executable, "-m", "training.text_vocab", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True)
    assert none.returncode == 2 and "--captions FILE or as --data" in none.stderr


def test_the_bundled_emoji_model_carries_its_bank_examples_and_attributions():
    from app.models import card_body, model_examples
    from dream_core.pipeline import DreamPipeline

    model = ROOT / "assets" / "dream-emoji"
    pipe = DreamPipeline.from_pretrained(model, device="cpu")
    assert len(pipe.captions) == 3786 and pipe.captions[0] == "grinning face"
    assert pipe.caption_detail("grinning face").startswith("😀  ") and "grin" in pipe.caption_detail("grinning face")
    assert pipe.caption_detail("red heart").startswith("\u2764\ufe0f  ")  # FE0F kept: shown as an emoji
    assert pipe.config.t5_max_length >= 34 and pipe.config.image_size == 64
    card = (model / "README.md").read_text()
    assert card.startswith("---\nlicense: cc-by-sa-4.0\n")
    for pkg in PACKAGE_OF_STYLE.values():  # every source's licence and attribution, as the data module states it
        assert pkg.licence.replace("-", " ").split()[0] in card.replace("-", " ")
    assert "Twemoji by Twitter, Inc. and other contributors, CC-BY 4.0" in card
    assert "All emojis designed by OpenMoji - the open-source emoji and icon project. License: CC BY-SA 4.0" in card
    assert "Apache" in card_body(card) and not card_body(card).startswith("---")
    measured = json.loads((ROOT / "bench" / "results" / "emoji" / "eval.json").read_text())
    assert measured["weights"] == pipe.weights_fingerprint()  # the card's table measured these weights
    assert f"`{measured['weights']}`" in card  # and the card names them
    examples = model_examples(model)
    assert examples and all(any(name in e for name in pipe.captions) for e in examples)


def test_every_emoji_export_decodes_with_the_bundled_models_sampler_defaults(tiny_model_dir):
    """The emoji recipes' model config carries the sampler defaults `make model-emoji` writes, so an
    ablation arm's export (no heads round) is judged as the bundled model decodes, with no step after."""
    from dream_core.config import DreamConfig
    from training.recipes import EMOJI_SAMPLER_DEFAULTS, get_recipe

    paths = [f"vae_path={tiny_model_dir / 'vae'}", f"t5_path={tiny_model_dir / 'text'}", "model=tiny"]
    shipped = DreamConfig.load(ROOT / "assets" / "dream-emoji" / "config.json")
    for name, over in (("emoji", paths), ("emoji-heads", [f"init_from={tiny_model_dir}"])):
        config = get_recipe(name).overrides(over).model_config()
        for key, value in EMOJI_SAMPLER_DEFAULTS.items():
            assert getattr(config, key) == getattr(shipped, key) == value, (name, key)
    # A model.KEY=value override on the command line still wins over the recipe's, as for any other field.
    config = get_recipe("emoji").overrides([*paths, "model.default_head_steps=100"]).model_config()
    assert config.default_head_steps == 100


def test_make_model_emoji_continues_pretraining_from_the_first_heads_round_and_ships_the_last(tmp_path, monkeypatch):
    """`make model-emoji`'s stages in order, each command as the build runs it (run faked: every
    stage writes what it would): DREAM, a heads round, then each stage of continued pretraining from
    the model directory the last heads round wrote (fresh optimizer through init_from, masking fx,
    the next data order; the last stage's lr cooling down on a cosine) and its own heads round; the
    model directory ends with the last round's weights, its config carrying the shipped sampler
    defaults."""
    import argparse

    from dream_core.config import DreamConfig
    from training import make_emoji_model as build_mod
    from training.recipes import EMOJI_SAMPLER_DEFAULTS

    calls: list[list[str]] = []

    def fake_run(cmd: list[str]) -> None:
        calls.append(cmd)
        opt = lambda name: Path(cmd[cmd.index(name) + 1])  # noqa: E731
        keys = dict(a.split("=", 1) for a in cmd if "=" in a and not a.startswith("-"))
        if cmd[2] in ("training.vae", "training.text_vocab", "training.preview_decoder"):
            opt("--out").mkdir(parents=True)
            (opt("--out") / "config.json").write_text("{}")
        elif cmd[2] == "training.train":
            export = opt("--export")
            export.mkdir(parents=True, exist_ok=True)
            DreamConfig.preset("tiny").replace(diffusion_weight=1.0, clip_weight=0.005).save(export / "config.json")
            weights = f"heads from {keys['init_from']}" if "emoji-heads" in cmd else f"dream from {keys.get('init_from')}"
            (export / "model.safetensors").write_text(weights)

    monkeypatch.setattr(build_mod, "run", fake_run)
    out, work = tmp_path / "model", tmp_path / "work"
    args = argparse.Namespace(work=work, out=out, data=tmp_path / "data", steps=12000, heads_steps=400,
                              continue_steps=list(build_mod.CONTINUE_STAGES), overrides=[])
    build_mod.build(args, {}, tmp_path / "timings.json")

    trains = [c for c in calls if c[2] == "training.train"]
    assert [c[c.index("--recipe") + 1] for c in trains] == ["emoji", "emoji-heads"] * 4
    stages = [(18000, 2, "continued"), (2500, 3, "continued2"), (2500, 4, "continued3")]
    for stage, (steps, seed, name) in enumerate(stages):
        continued, heads = trains[2 + 2 * stage], trains[3 + 2 * stage]
        assert continued[continued.index("--max-steps") + 1] == str(steps)
        assert continued[continued.index("--out") + 1] == str(work / f"dream-{name}")
        assert f"init_from={out}" in continued and "masking=fx" in continued and "warmup_steps=86" in continued
        assert f"seed={seed}" in continued and sum(a.startswith("seed=") for a in continued) == 1
        assert f"init_from={work / f'dream-{name}-export'}" in heads and "caption_templates=0" in heads
        # only the last stage cools down; the others keep the recipe's constant lr
        assert ("lr_schedule=cosine" in continued) == (name == "continued3"), name
    assert not any(a.startswith("lr_schedule=") for a in trains[0] + trains[1])
    assert not any("caption_templates" in a for a in trains[1])  # the first round trains on every template
    assert (out / "model.safetensors").read_text() == f"heads from {work / 'dream-continued3-export'}"
    config = DreamConfig.load(out / "config.json")
    assert (config.diffusion_weight, config.clip_weight) == (1.0, 0.005)
    shipped = DreamConfig.load(ROOT / "assets" / "dream-emoji" / "config.json")
    for key, value in EMOJI_SAMPLER_DEFAULTS.items():
        assert getattr(config, key) == getattr(shipped, key) == value, key
    # --continue-steps 0 (no stage): the first heads round's model is the result.
    calls.clear()
    args = argparse.Namespace(**{**vars(args), "work": tmp_path / "w0", "out": tmp_path / "m0", "continue_steps": []})
    build_mod.build(args, {}, tmp_path / "t0.json")
    assert [c[c.index("--recipe") + 1] for c in calls if c[2] == "training.train"] == ["emoji", "emoji-heads"]
    assert "caption_templates=0" in calls[-2]  # the only heads round is the last (the preview decoder follows)
    assert (tmp_path / "m0" / "model.safetensors").read_text() == f"heads from {tmp_path / 'w0' / 'dream-export'}"
    assert build_mod.stage_steps("18000,2500") == [18000, 2500] and build_mod.stage_steps("0") == []
    for bad in ("0,2500", "-5", "many", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="step"):
            build_mod.stage_steps(bad)
