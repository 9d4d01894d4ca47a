"""Training on your own data: the vocabulary check (unknown words named, a refusal above the
threshold with the way out), the names of images left out for want of a caption, the messages of
mistyped model keys, image sizes, --max-steps and memory, the fine-tuned model card's one metadata
header, and launch.py's --threads. Tiny models only (tests/conftest.py)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.recipes import get_recipe

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for this module


def write_folder(folder: Path, captions: list[str], txt: bool = True) -> list[str]:
    """One 32 x 32 PNG per caption (a .txt beside each when `txt`); returns the file names."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, text in enumerate(captions):
        colour = tuple(int(c) for c in np.random.default_rng(i).integers(0, 255, 3))
        Image.new("RGB", (32, 32), colour).save(folder / f"{i:03d}.png")
        if txt:
            (folder / f"{i:03d}.txt").write_text(text)
        names.append(f"{i:03d}.png")
    return names


def tiny_overrides(model_dir: Path, data: Path, **kw) -> list[str]:
    base = {"model": "tiny", "data": "folder", "data_path": str(data), "vae_path": str(model_dir / "vae"),
            "t5_path": str(model_dir / "text"), "model.vae_scaling_factor": 0.5, "model.t5_path": "text",
            "batch_size": 4, "num_workers": 0, "samples_per_epoch": 8, "log_every": 1, "ckpt_every": 0,
            "precision": "fp32"}
    base.update(kw)
    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in base.items()]


def run_main(main, argv: list[str]) -> int:
    try:
        main(argv)
    except SystemExit as err:
        return int(err.code or 0)
    return 0


KNOWN = "a small red circle at the top left on a white background"


# ---------------------------------------------------------------------------------------------
# Unknown words
# ---------------------------------------------------------------------------------------------

def test_training_names_unknown_words_and_refuses_above_the_share(tiny_model_dir, tmp_path, capsys):
    from training.train import Trainer, check_vocabulary, main

    data = tmp_path / "stars"
    write_folder(data, ["a small red star at the top left"] * 3 + ["a large blue heart, banana on the right"])
    recipe = get_recipe("shapes").overrides(tiny_overrides(tiny_model_dir, data))
    with pytest.raises(ValueError) as err:
        check_vocabulary(recipe, ["a small red star at the top left"])
    message = str(err.value)
    assert "'star' (1)" in message and "more than max_unknown_share=0.05" in message
    assert "python -m training.text_vocab" in message and "add max_unknown_share=1" in message
    # The command line refuses before any work, naming the words most frequent first.
    out = tmp_path / "run"
    assert run_main(main, ["--recipe", "shapes", "--out", str(out), "--max-steps", "1",
                           *tiny_overrides(tiny_model_dir, data)]) == 2
    err_text = capsys.readouterr().err
    assert "'star' (3), 'heart,' (1), 'banana' (1)" in err_text and not out.exists()
    # max_unknown_share=1 goes on, and the start says what it goes on with.
    Trainer(get_recipe("shapes").overrides(tiny_overrides(tiny_model_dir, data, max_unknown_share=1.0)), out)
    assert "of the T5 tokens of 4 captions are <unk>" in capsys.readouterr().out
    # Known words: one line that says so.
    assert check_vocabulary(recipe, [KNOWN]).startswith("vocabulary: every word of 1 captions is known")


def test_finetuning_refuses_unknown_words_before_the_preservation_samples(tiny_model_dir, tmp_path, capsys):
    from training.finetune import main

    data = tmp_path / "stars"
    write_folder(data, ["a small red star at the top left"] * 4)
    out = tmp_path / "ft"
    assert run_main(main, ["--model", str(tiny_model_dir), "--data", str(data), "--out", str(out),
                           "--steps", "1", "--num-workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "'star' (4)" in err and "fine-tuning keeps the base model's vocabulary" in err
    assert "add max_unknown_share=1" in err and not out.exists()  # no preservation sample was made


def test_finetune_help_says_it_teaches_generation_only(capsys):
    from training.finetune import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    assert "What it teaches: generation only" in " ".join(capsys.readouterr().out.split())


# ---------------------------------------------------------------------------------------------
# Captions that are missing
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["csv", "jsonl", "txt"])
def test_images_without_a_caption_are_named(form, tmp_path, caplog):
    from training.data.sources import NAMED_MAX, open_source

    data = tmp_path / "imgs"
    names = write_folder(data, [KNOWN] * 14, txt=form == "txt")
    listed = names[:2]
    if form == "csv":
        (data / "captions.csv").write_text("file,caption\n" + "".join(f"{n},{KNOWN}\n" for n in listed))
    elif form == "jsonl":
        (data / "captions.jsonl").write_text("".join(json.dumps({"file": f"./{n}", "caption": KNOWN}) + "\n"
                                                     for n in listed))
    else:
        for n in names[2:]:
            (data / n).with_suffix(".txt").unlink()
    recipe = get_recipe("finetune").overrides([f"data_path={data}"])
    with caplog.at_level("WARNING", logger="dream.data"):
        source = open_source(recipe)
    assert len(source) == 2
    [message] = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    where = {"csv": "no row in captions.csv", "jsonl": "no row in captions.jsonl", "txt": "no .txt caption beside them"}
    assert f"12 images in {data} have {where[form]} and are left out: " in message
    assert ", ".join(names[2:2 + NAMED_MAX]) in message and "and 2 more" in message and names[0] not in message


# ---------------------------------------------------------------------------------------------
# Mistyped keys, sizes, steps, memory
# ---------------------------------------------------------------------------------------------

def test_mistyped_keys_get_the_closest_name_and_the_list():
    with pytest.raises(ValueError) as err:
        get_recipe("shapes").overrides(["model.widht=64"])
    assert "unknown DreamConfig keys: model.widht (did you mean model.width?)" in str(err.value)
    assert "the model keys: " in str(err.value) and "t5_max_length" in str(err.value)
    with pytest.raises(ValueError, match=r"unknown recipe key 'batch_sise' \(did you mean batch_size\?\)"):
        get_recipe("shapes").overrides(["batch_sise=4"])


def test_an_image_size_error_names_the_key_as_typed_and_the_nearest_sizes(tiny_model_dir, tmp_path):
    recipe = get_recipe("shapes").overrides(tiny_overrides(tiny_model_dir, tmp_path) + ["model.image_size=30"])
    with pytest.raises(ValueError) as err:
        recipe.model_config()
    assert str(err.value).startswith("model.image_size=30 must be divisible by vae_stride*patch_size=4*2=8")
    assert "the nearest valid sizes are 24 or 32" in str(err.value)


def test_max_steps_says_it_replaces_the_override(tiny_model_dir, tmp_path, capsys):
    from training.train import main

    argv = ["--recipe", "shapes", "--out", str(tmp_path / "run"), "--max-steps", "1",
            *tiny_overrides(tiny_model_dir, tmp_path / "missing", max_steps=5)]
    assert run_main(main, argv) == 2  # the data is missing: the note comes before that error
    assert "--max-steps 1 replaces the override max_steps=5" in capsys.readouterr().out


def test_a_run_that_cannot_fit_in_memory_stops_with_a_reason(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from training import plan
    from training.train import main

    data = tmp_path / "imgs"
    write_folder(data, [KNOWN] * 4)
    monkeypatch.setattr(plan, "available_memory", lambda: 1 << 20)  # 1 MiB left
    out = tmp_path / "run"
    assert run_main(main, ["--recipe", "shapes", "--out", str(out), "--max-steps", "1",
                           *tiny_overrides(tiny_model_dir, data)]) == 2
    err = capsys.readouterr().err
    assert "GiB of RAM a step" in err and "0.0 GiB are available: lower batch_size" in err and not out.exists()
    need = plan.cpu_step_bytes(get_recipe("shapes").overrides(tiny_overrides(tiny_model_dir, data)),
                               get_recipe("shapes").overrides(tiny_overrides(tiny_model_dir, data)).model_config(), 10**6)
    assert 20e6 < need < 1e9  # five fp32 copies of a million parameters, the frozen weights and a batch of 4


# ---------------------------------------------------------------------------------------------
# The fine-tuned card, launch.py --threads
# ---------------------------------------------------------------------------------------------

def test_a_fine_tuned_card_has_one_metadata_header_at_the_top():
    from training.finetune import fine_tuned_card

    base_card = "---\nlicense: mit\ntags:\n- dream\nbase_model: older\n---\n\n# dream-shapes\n\nThe base.\n"
    card = fine_tuned_card(base_card, Path("assets/dream-shapes"), "# my-stars\n\nFine-tuned.")
    assert card.startswith("---\nlicense: mit\ntags:\n- dream\nbase_model: \"assets/dream-shapes\"\n---\n\n# my-stars\n")
    assert card.count("---\n") == 2 and "older" not in card
    assert card.endswith("## The base model\n\n# dream-shapes\n\nThe base.\n")
    plain = fine_tuned_card("# tiny\n", Path("m"), "# x\n\nFine-tuned.")
    assert plain == "---\nbase_model: \"m\"\n---\n\n# x\n\nFine-tuned.\n\n## The base model\n\n# tiny\n"


def test_launch_sets_the_torch_threads_before_building_the_app(monkeypatch):
    import torch

    from app.main import main, parse_args

    assert parse_args(["--threads", "1"]).threads == 1 and parse_args([]).threads == 0
    with pytest.raises(SystemExit):
        parse_args(["--threads", "-1"])
    calls = []

    def build_app(*args, **kwargs):
        calls.append("build_app")
        raise RuntimeError("stop here")

    monkeypatch.setitem(sys.modules, "app.ui", types.SimpleNamespace(build_app=build_app, launch_app=None))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(n))
    with pytest.raises(RuntimeError, match="stop here"):
        main(["--threads", "3"])
    assert calls == [3, "build_app"]
