"""Tests for the training pipeline (training/): data sources, the loop, masking statistics, the
latent/T5 cache, two processes over gloo, kill-and-resume, export, every baseline recipe, the REPA
teacher, fine-tuning and bad input. Everything runs on the `tiny` preset (32 x 32 images, 16 tokens)
with a tiny VAE, T5 and open_clip teacher that the tests build themselves; nothing is downloaded."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from dream_core.config import SAMPLING_FIELDS
from training.data import sources
from training.data.sources import CacheSource, FolderSource, TarSource, adm_center_crop, to_tensor
from training.recipes import get_recipe

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "_train_worker.py"
COMPARED = ("loss", "diffusion", "clip", "mask_ratio_mean", "lr", "grad_norm", "diffusion_share", "clip_share")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for this module


# ---------------------------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------------------------

def write_shapes_folder(folder: Path, n: int, seed: int = 0) -> list[str]:
    """n rendered Shapes World scenes (64 x 64 PNG, centre-cropped to 32 by the loader) with unique captions."""
    from training.data.shapes_world import caption, random_scene, render

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    captions: list[str] = []
    while len(captions) < n:
        scene = random_scene(rng)
        text = caption(scene, rng)
        if text in captions:
            continue
        i = len(captions)
        render(scene, rng).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(text)
        captions.append(text)
    return captions


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_model_dir) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("training")
    captions = write_shapes_folder(root / "images", 24)
    return SimpleNamespace(root=root, images=root / "images", captions=captions,
                           vae=tiny_model_dir / "vae", text=tiny_model_dir / "text")


def overrides(d: SimpleNamespace, **kw) -> list[str]:
    """key=value overrides that put any recipe on the tiny model and the image folder."""
    base = {
        "model": "tiny", "data": "folder", "data_path": str(d.images), "vae_path": str(d.vae),
        "t5_path": str(d.text), "model.vae_scaling_factor": 0.5, "model.t5_dim": 32, "model.t5_path": "text",
        "batch_size": 8, "num_workers": 0, "samples_per_epoch": 24, "log_every": 1, "ckpt_every": 0,
        "lr": 0.001, "warmup_epochs": 0.0, "precision": "fp32",
    }
    base.update(kw)
    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in base.items()]


def tiny_recipe(d: SimpleNamespace, name: str = "shapes", **kw):
    return get_recipe(name).overrides(overrides(d, **kw))


def read_log(path: Path) -> dict[int, dict]:
    """log.csv rows by step; a step logged twice (before a kill and after the resume) keeps the last."""
    with open(path, newline="") as f:
        return {int(r["step"]): r for r in csv.DictReader(f)}


def file_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def train_args(d: SimpleNamespace, out: Path, max_steps: int, **kw) -> list[str]:
    return ["--recipe", "shapes", "--out", str(out), "--max-steps", str(max_steps), "--threads", "1",
            *overrides(d, **kw)]


def run_train_main(argv: list[str]) -> int:
    from training.train import main

    try:
        main(argv)
    except SystemExit as err:
        return int(err.code or 0)
    return 0


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """The tiny model trained for 30 steps on the folder (masking fixed at FX so both losses are active)."""
    from training.train import Trainer

    out = tmp_path_factory.mktemp("run") / "run"
    recipe = tiny_recipe(data, masking="fx", max_steps=30, ckpt_every=10)
    trainer = Trainer(recipe, out)
    last = trainer.fit()
    return SimpleNamespace(trainer=trainer, out=out, last=last)


# ---------------------------------------------------------------------------------------------
# Data sources
# ---------------------------------------------------------------------------------------------

def test_adm_center_crop_halves_resizes_and_keeps_the_centre():
    im = Image.new("RGB", (128, 64), (255, 0, 0))
    im.paste((0, 255, 0), (32, 0, 96, 64))  # a green centre square between red bands
    out = adm_center_crop(im, 32)
    assert out.size == (32, 32)
    arr = np.asarray(out).astype(int)
    assert (arr[..., 1] > 250).all() and (arr[..., 0] < 5).all()
    # A small image is upsampled (bicubic) to the size, a non-square one cropped to a square.
    assert adm_center_crop(Image.new("RGB", (20, 40)), 32).size == (32, 32)
    x = to_tensor(Image.new("RGB", (4, 4), (255, 0, 127)))
    assert x.shape == (3, 4, 4) and x[0].eq(1).all() and x[1].eq(-1).all()


def test_folder_source_reads_txt_csv_and_jsonl(tmp_path, data):
    src = FolderSource(data.images)
    assert len(src) == 24
    image, text = src.read(3)
    assert image.size == (64, 64) and text == data.captions[3]

    for kind in ("csv", "jsonl"):
        folder = tmp_path / kind
        (folder / "sub").mkdir(parents=True)
        for i in range(3):
            shutil.copy(data.images / f"{i:03d}.png", folder / "sub" / f"im{i}.png")
        if kind == "csv":
            with open(folder / "captions.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["file", "caption"])
                w.writerows([[f"sub/im{i}.png", f"caption, number {i}"] for i in range(3)])
        else:
            (folder / "captions.jsonl").write_text(
                "".join(json.dumps({"file": f"sub/im{i}.png", "caption": f"caption, number {i}"}) + "\n" for i in range(3)))
        src = FolderSource(folder)
        assert len(src) == 3
        assert [src.read(i)[1] for i in range(3)] == [f"caption, number {i}" for i in range(3)]


def test_missing_or_empty_data_paths_raise_value_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        FolderSource(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image with a caption"):
        FolderSource(tmp_path / "empty")
    (tmp_path / "nocap").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "nocap" / "a.png")
    with pytest.raises(ValueError, match="no image with a caption"):
        FolderSource(tmp_path / "nocap")
    with pytest.raises(ValueError, match="no .tar shard"):
        TarSource(tmp_path / "empty")
    (tmp_path / "bad.tar").write_bytes(b"this is not a tar file at all" * 40)
    with pytest.raises(ValueError, match="bad.tar is not a readable tar"):
        TarSource(tmp_path / "bad.tar")
    with pytest.raises(ValueError, match="no index.json"):
        CacheSource(tmp_path / "empty")
    bad_csv = tmp_path / "badcsv"
    bad_csv.mkdir()
    (bad_csv / "captions.csv").write_text("name,text\na.png,hello\n")
    with pytest.raises(ValueError, match="file,caption"):
        FolderSource(bad_csv)


def _batches(recipe, n, rank=0, world=1, start_step=0):
    loader = sources.build_dataloader(recipe, recipe.model_config(), rank=rank, world=world, start_step=start_step)
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_stream_is_deterministic_resumable_sharded_and_worker_independent(data):
    recipe = tiny_recipe(data, batch_size=5, seed=3)
    fresh = _batches(recipe, 8)
    assert all(b["image"].shape == (5, 3, 32, 32) and len(b["caption"]) == 5 for b in fresh)
    assert fresh[0]["image"].min() >= -1 and fresh[0]["image"].max() <= 1
    # Resume: start_step=3 continues with the 4th batch of the uninterrupted stream.
    resumed = _batches(recipe, 2, start_step=3)
    for a, b in zip(fresh[3:5], resumed):
        assert a["caption"] == b["caption"] and torch.equal(a["image"], b["image"])
    # One pass (24 samples, batches of 5) visits every sample once; the next pass is reshuffled.
    first_pass = [c for b in fresh for c in b["caption"]][:24]
    second_pass = [c for b in fresh for c in b["caption"]][24:40]
    assert sorted(first_pass) == sorted(data.captions)
    assert second_pass != first_pass[:16]
    # Ranks split the stream: 3 ranks x 2 batches x 4 samples = the 24 samples of one pass, once each.
    r4 = tiny_recipe(data, batch_size=4, seed=3)
    by_rank = [[c for b in _batches(r4, 2, rank=r, world=3) for c in b["caption"]] for r in range(3)]
    assert sorted(sum(by_rank, [])) == sorted(data.captions)
    # Two DataLoader workers yield exactly the single-process stream (round-robin over batches).
    two = _batches(tiny_recipe(data, batch_size=5, seed=3, num_workers=2), 4, start_step=1)
    assert [b["caption"] for b in two] == [b["caption"] for b in fresh[1:5]]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(two, fresh[1:5]))


def test_flip_is_seeded_and_only_when_asked(data):
    ref = {c: to_tensor(adm_center_crop(Image.open(data.images / f"{i:03d}.png").convert("RGB"), 32))
           for i, c in enumerate(data.captions)}
    flips = plain = 0
    for b in _batches(tiny_recipe(data, flip=True, batch_size=8), 3):
        for x, c in zip(b["image"], b["caption"]):
            if torch.equal(x, ref[c]):
                plain += 1
            else:
                assert torch.equal(x, ref[c].flip(-1))
                flips += 1
    assert flips > 0 and plain > 0
    for b in _batches(tiny_recipe(data, flip=False, batch_size=8), 3):
        assert all(torch.equal(x, ref[c]) for x, c in zip(b["image"], b["caption"]))


def test_random_crops_are_seeded_resume_exactly_and_are_refused_where_captions_name_positions(data):
    from training.data.sources import Crop

    quadrants = Image.fromarray(np.kron(np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [255, 255, 255]]],
                                                 np.uint8), np.ones((8, 8, 1), np.uint8)))
    assert np.array_equal(np.asarray(Crop(1.0, 0.0, 0.0).apply(quadrants)), np.asarray(quadrants))
    corner = np.asarray(Crop(0.5, 0.5, 0.5).apply(quadrants))  # the bottom-right quadrant, enlarged
    assert corner.shape == (16, 16, 3) and (corner[2:-2, 2:-2] == 255).all()
    ref = {c: to_tensor(adm_center_crop(Image.open(data.images / f"{i:03d}.png").convert("RGB"), 32))
           for i, c in enumerate(data.captions)}
    recipe = tiny_recipe(data, flip=False, crop_min=0.5, batch_size=8)
    fresh = _batches(recipe, 3)
    assert sum(not torch.equal(x, ref[c]) for b in fresh for x, c in zip(b["image"], b["caption"])) >= 20
    again = _batches(recipe, 2, start_step=1)  # a resumed stream draws the same crops
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(again, fresh[1:]))
    with pytest.raises(ValueError, match=r"recipe.crop_min must be in \(0, 1\], got 0.0"):
        tiny_recipe(data, crop_min=0.0)
    with pytest.raises(ValueError, match="crop_min crops images read from files .* not data=shapes: its captions name"):
        get_recipe("shapes").overrides(["crop_min=0.8"])


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tf.addfile(info, io.BytesIO(payload))


def test_webdataset_shards_index_skip_and_count_corrupt_samples(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for s in range(2):
        with tarfile.open(shards / f"{s:05d}.tar", "w") as tf:
            info = tarfile.TarInfo("subdir")
            info.type = tarfile.DIRTYPE
            tf.addfile(info)
            for i in range(5):
                key = f"{s:05d}{i:04d}"
                image = b"\xff\xd8 definitely not a jpeg" if (s, i) == (0, 2) else _jpeg(10 * s + i)
                _add(tf, f"{key}.jpg", image)
                if i == 3:
                    _add(tf, f"{key}.json", json.dumps({"caption": f"json caption {s} {i}", "url": "x"}).encode())
                elif (s, i) != (1, 4):  # (1, 4) has no caption: left out of the index
                    _add(tf, f"{key}.txt", f"caption {s} {i}".encode())
    src = TarSource(shards)
    assert len(src) == 9
    assert len(list((shards / ".index_cache").glob("*.safetensors"))) == 2
    captions = {src.read(i)[1] for i in range(9) if i != 2}
    assert "json caption 0 3" in captions and "caption 1 0" in captions
    with pytest.raises(sources.CorruptSample):
        src.read(2)
    assert len(TarSource(shards)) == 9  # from the index cache

    sources.SKIPPED.reset()
    recipe = get_recipe("dream-base").overrides(["data=webdataset", f"data_path={shards}", "batch_size=4",
                                                 "num_workers=0", "model=tiny"])
    batches = _batches(recipe, 6)  # 24 samples = 2.7 passes over 9: the corrupt one comes up at least twice
    assert all(b["image"].shape == (4, 3, 32, 32) for b in batches)
    skipped = sum(b["skipped"] for b in batches)
    assert skipped >= 2 and sources.SKIPPED.count == skipped
    assert all(c.startswith(("caption", "json caption")) for b in batches for c in b["caption"])


def test_the_tar_index_goes_beside_the_run_when_the_data_folder_is_read_only(tmp_path, monkeypatch):
    """A data folder where `.index_cache` cannot be made (here a file stands in its way, which
    even root cannot write through): the index is written to the fallback folder the trainer
    points at its run, and the next opening reads it there instead of scanning the shard again."""
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "00000.tar", "w") as tf:
        for i in range(3):
            _add(tf, f"{i:04d}.jpg", _jpeg(i))
            _add(tf, f"{i:04d}.txt", f"caption {i}".encode())
    (shards / ".index_cache").write_text("not a folder")
    monkeypatch.setattr(TarSource, "fallback_index_cache", tmp_path / "run" / ".index_cache")
    assert len(TarSource(shards)) == 3
    assert len(list((tmp_path / "run" / ".index_cache").glob("00000.tar.*.safetensors"))) == 1

    def no_scan(path):
        raise AssertionError(f"{path} was scanned again")

    monkeypatch.setattr(sources, "scan_tar", no_scan)
    assert TarSource(shards).read(1)[1] == "caption 1"


# ---------------------------------------------------------------------------------------------
# The loop: loss falls, masking statistics, export
# ---------------------------------------------------------------------------------------------

def test_the_loop_trains_and_the_loss_falls(trained):
    rows = read_log(trained.out / "log.csv")
    assert sorted(rows) == list(range(1, 31))
    losses = [float(rows[s]["loss"]) for s in range(1, 31)]
    assert all(math.isfinite(x) for x in losses)
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.8 * first, (first, last)
    clip = [float(rows[s]["clip"]) for s in range(1, 31)]
    assert np.mean(clip[-5:]) < np.mean(clip[:5])
    row = rows[30]
    for key in ("diffusion", "clip", "mask_ratio_mean", "ratio_std", "diffusion_share", "clip_share", "lr",
                "samples_per_s", "grad_norm", "mask_mean_mu", "ema_decay", "data_skipped"):
        assert key in row, key
    assert float(row["lr"]) == pytest.approx(0.001)
    state = json.loads((trained.out / "checkpoint-last" / "state.json").read_text())
    assert state["step"] == 30 and state["samples_seen"] == 240


class MetaAccelerator:
    """accelerate's interface as the Trainer uses it, on the `meta` device: anything the Trainer
    builds on CPU instead of where the model lives shows up as a non-meta tensor."""

    device = torch.device("meta")
    process_index, num_processes, is_main_process = 0, 1, True

    def __init__(self) -> None:
        self.printed: list[str] = []

    def prepare(self, *objs, device_placement=None):
        return objs if len(objs) > 1 else objs[0]

    def print(self, *args) -> None:
        self.printed.append(" ".join(map(str, args)))


@pytest.mark.filterwarnings("ignore:.*meta parameter")  # loading into meta parameters is a no-op, on purpose
def test_every_state_lives_on_the_model_device_after_prepare_and_resume(data, trained, tmp_path, monkeypatch):
    """The EMA, the optimizer state (loaded at resume) and the null caption are on the model's device
    (the old trainer built the EMA on CPU before prepare moved the model: every CUDA run crashed)."""
    from dream_core.text import ConditioningTextEncoder
    from training.train import Trainer

    def t5_on_its_device(self, prompts):  # T5's attention mask code calls .item(), which meta cannot
        device = next(self.model.parameters()).device
        return (torch.zeros(len(prompts), self.max_length, self.dim, device=device),
                torch.ones(len(prompts), self.max_length, dtype=torch.bool, device=device))

    monkeypatch.setattr(ConditioningTextEncoder, "forward", t5_on_its_device)

    out = tmp_path / "run"
    shutil.copytree(trained.out / "checkpoint-last", out / "checkpoint-last")
    acc = MetaAccelerator()
    trainer = Trainer(tiny_recipe(data, masking="fx", max_steps=40), out, accelerator=acc)
    assert trainer.step == 30  # resumed
    assert {p.device.type for p in trainer.model.parameters()} == {"meta"}
    assert {t.device.type for t in trainer.ema.shadow.values()} == {"meta"}
    states = [v for st in trainer.optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    assert states and {v.device.type for v in states if v.ndim} == {"meta"}
    assert trainer.null_hidden.device.type == "meta" and trainer.null_mask.device.type == "meta"
    assert any("contrastive loss: each query sees 8 captions" in line for line in acc.printed)


def test_resume_refuses_another_world_size_accumulation_or_data(data, trained, tmp_path):
    from training.train import Trainer

    def run_with(edit=None, **kw) -> Path:
        out = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        shutil.copytree(trained.out / "checkpoint-last", out / "checkpoint-last")
        if edit:
            path = out / "checkpoint-last" / "state.json"
            state = json.loads(path.read_text())
            edit(state)
            path.write_text(json.dumps(state))
        return out

    def two_processes(state):
        state["world_size"] = state["layout"]["world_size"] = 2
        state["layout"]["global_batch"] = 16

    with pytest.raises(ValueError, match=r"world_size: checkpoint 2 vs now 1.*global_batch: checkpoint 16 vs now 8"):
        Trainer(tiny_recipe(data, masking="fx", max_steps=40), run_with(two_processes))

    def old_format(state):  # written before the layout was recorded: derived from the recipe
        del state["layout"]
        state["world_size"] = 2

    with pytest.raises(ValueError, match=r"cannot resume .*world_size: checkpoint 2 vs now 1.*same number of processes"):
        Trainer(tiny_recipe(data, masking="fx", max_steps=40), run_with(old_format))
    with pytest.raises(ValueError, match=r"grad_accum: checkpoint 1 vs now 2"):
        Trainer(tiny_recipe(data, masking="fx", max_steps=40, grad_accum=2), run_with())
    other = tmp_path / "other-images"
    shutil.copytree(data.images, other)
    with pytest.raises(ValueError, match=r"data_path: checkpoint .* vs now"):
        Trainer(tiny_recipe(data, masking="fx", max_steps=40, data_path=str(other)), run_with())


def test_resume_refuses_other_caption_templates_and_reads_an_older_layout_as_all_of_them():
    """A resumed emoji run with another caption set or crop would change its data silently."""
    from training.distributed import check_resume, run_layout

    recipe = get_recipe("emoji")
    name_only = recipe.overrides(["caption_templates=0"])
    saved = {"layout": run_layout(name_only, 1), "recipe": {"caption_templates": "0"}}
    check_resume(saved, run_layout(name_only, 1), "ckpt")
    with pytest.raises(ValueError, match=r"cannot resume from ckpt.*caption_templates: checkpoint '0' vs now ''"):
        check_resume(saved, run_layout(recipe, 1), "ckpt")
    older = {"layout": {k: v for k, v in run_layout(recipe, 1).items() if k != "caption_templates"}, "recipe": {}}
    check_resume(older, run_layout(recipe, 1), "ckpt")  # recorded before the key: every template
    with pytest.raises(ValueError, match=r"caption_templates: checkpoint '' vs now '0'"):
        check_resume(older, run_layout(name_only, 1), "ckpt")
    with pytest.raises(ValueError, match=r"crop_min: checkpoint 1.0 vs now 0.8"):
        check_resume(older, run_layout(recipe.overrides(["crop_min=0.8"]), 1), "ckpt")
    with pytest.raises(ValueError, match=r"cross_style_views: checkpoint False vs now True"):
        check_resume(older, run_layout(recipe.overrides(["cross_style_views=true"]), 1), "ckpt")
    before_extra = {"layout": {k: v for k, v in run_layout(recipe, 1).items() if k != "extra_art"}, "recipe": {}}
    check_resume(before_extra, run_layout(recipe, 1), "ckpt")  # recorded before the key: no extra art
    with pytest.raises(ValueError, match=r"extra_art: checkpoint False vs now True"):
        check_resume(before_extra, run_layout(recipe.overrides(["extra_art=true"]), 1), "ckpt")


def test_resume_takes_new_sampling_defaults_but_refuses_another_architecture(data, trained, tmp_path):
    """A run resumes after its init model's card changed a sampling default; a new width it refuses."""
    from training.train import Trainer

    out = tmp_path / "run"
    shutil.copytree(trained.out / "checkpoint-last", out / "checkpoint-last")
    resumed = Trainer(tiny_recipe(data, masking="fx", max_steps=40, **{"model.default_head_steps": 7,
                                                                      "model.default_temperature": 0.3}), out)
    assert resumed.step == 30 and resumed.config.default_head_steps == 7
    assert resumed.config.default_temperature == 0.3
    saved = json.loads((out / "checkpoint-last" / "state.json").read_text())["config"]
    assert resumed.config.weights_dict() == {k: v for k, v in saved.items() if k not in SAMPLING_FIELDS}
    with pytest.raises(ValueError, match="was written for another model config"):
        Trainer(tiny_recipe(data, masking="fx", max_steps=40, **{"model.mlp_dim": 48}), out)


def test_contrastive_negatives_are_stated_for_accumulation():
    from training.distributed import contrastive_negatives_note

    recipe = get_recipe("dream-huge").overrides(["batch_size=32", "grad_accum=4"])
    note = contrastive_negatives_note(recipe, 8)
    assert note.startswith("contrastive loss: each query sees 256 captions (batch_size 32 x 8 processes)")
    assert "NOT the global batch of 1024" in note
    assert "NOT" not in contrastive_negatives_note(recipe.overrides(["grad_accum=1"]), 8)


def test_overrides_keep_a_text_key_as_text_and_check_the_others():
    recipe = get_recipe("emoji").overrides(["caption_templates=0,3", "data_path=2024", "vae_path=null",
                                            "batch_size=32", "blr=1", "flip=true"])
    assert (recipe.caption_templates, recipe.data_path, recipe.vae_path) == ("0,3", "2024", "null")
    assert recipe.batch_size == 32 and recipe.blr == 1.0 and isinstance(recipe.blr, float) and recipe.flip is True
    assert get_recipe("emoji").overrides(["caption_templates=0"]).caption_templates == "0"
    with pytest.raises(ValueError, match="recipe key batch_size expects int, got 'many'"):
        get_recipe("emoji").overrides(["batch_size=many"])
    with pytest.raises(ValueError, match="recipe key flip expects true/false, got '1'"):
        get_recipe("emoji").overrides(["flip=1"])


def _truncated_normal_mean(mu: float, sigma: float, lo: float = 0.0, hi: float = 1.0) -> float:
    pdf = lambda x: math.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)  # noqa: E731
    cdf = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731
    a, b = (lo - mu) / sigma, (hi - mu) / sigma
    return mu + sigma * (pdf(a) - pdf(b)) / (cdf(b) - cdf(a))


def test_masking_statistics_follow_the_schedule(data, tmp_path):
    from training.train import Trainer

    recipe = tiny_recipe(data, masking="warmup", mask_std=0.55, masking_warmup_epochs=4.0, samples_per_epoch=1000)
    trainer = Trainer(recipe, tmp_path / "run")
    n, L = 128, trainer.config.seq_len
    batch = {"image": torch.rand(n, 3, 32, 32) * 2 - 1, "caption": ["a small red circle"] * n}
    for epoch in (0.0, 1.0, 2.0, 3.0, 4.0, 6.0):
        trainer.samples_seen = int(epoch * recipe.samples_per_epoch)
        mu = trainer.schedule.mean(epoch)
        assert mu == pytest.approx(min(epoch / 4.0, 1.0))
        t = trainer.batch_tensors(batch)
        ratios, mask = t["ratios"], t["mask"]
        assert ratios.mean().item() == pytest.approx(_truncated_normal_mean(mu, 0.55), abs=0.06), epoch
        assert ratios.unique().numel() > n // 2  # one ratio per sample, not one per batch
        expected = torch.ceil(ratios.double() * L - 1e-9).long()
        assert torch.equal(mask.sum(dim=1), expected)
    # The MAR baseline's ratios stay in [0.7, 1].
    mar = Trainer(tiny_recipe(data, masking="mar"), tmp_path / "mar")
    r = mar.batch_tensors(batch)["ratios"]
    assert r.min() >= 0.7 and r.max() <= 1.0


def test_export_then_from_pretrained_generates(trained, tmp_path):
    from safetensors.torch import load_file

    from dream_core.pipeline import DreamPipeline

    out = tmp_path / "model"
    trained.trainer.export(out, captions=["a small red circle", "a big blue square"])
    weights = load_file(str(out / "model.safetensors"))
    for name, ema in trained.trainer.ema.shadow.items():
        assert torch.equal(weights[name], ema), name  # EMA weights are what gets exported
    pipe = DreamPipeline.from_pretrained(out, device="cpu")
    assert pipe.captions == ["a small red circle", "a big blue square"]
    result = pipe("a small red circle", num_inference_steps=4, head_steps=5, seed=0)
    assert result.images[0].size == (32, 32)
    assert np.isfinite(np.asarray(result.images[0], dtype=np.float32)).all()


# ---------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------

def test_cache_round_trip_resume_and_sharding(data, tmp_path):
    from safetensors.torch import load_file

    from dream_core.image_tokenizer import ImageTokenizer
    from dream_core.text import ConditioningTextEncoder
    from training.cache import extract, main as cache_main
    from training.train import Trainer

    cache = tmp_path / "cache"
    argv = ["--recipe", "shapes", "--out", str(cache), "--shard-size", "8", "--batch-size", "8", "--num-workers", "0",
            *overrides(data)]
    summary = cache_main(argv)
    assert summary["written"] == [0, 1, 2] and summary["index"]
    index = json.loads((cache / "index.json").read_text())
    assert index["num_samples"] == 24 and [s["n"] for s in index["shards"]] == [8, 8, 8]

    tok = ImageTokenizer.from_pretrained(data.vae, 2)
    t5 = ConditioningTextEncoder.from_pretrained(data.text, 16)
    by_caption = {c: i for i, c in enumerate(data.captions)}

    def crop(i: int, flip: bool = False) -> torch.Tensor:
        im = adm_center_crop(Image.open(data.images / f"{i:03d}.png").convert("RGB"), 32)
        return to_tensor(im.transpose(Image.FLIP_LEFT_RIGHT) if flip else im)[None]

    recipe = tiny_recipe(data, data="cache", cache_path=str(cache), flip=False, batch_size=6)
    batch = _batches(recipe, 1)[0]
    assert batch["moments"].shape == (6, 8, 8, 8) and batch["moments"].dtype == torch.float32
    assert batch["t5_hidden"].shape == (6, 16, 32) and batch["t5_mask"].dtype == torch.bool
    fresh_hidden, fresh_mask = t5(batch["caption"])
    assert torch.equal(batch["t5_mask"], fresh_mask)
    torch.testing.assert_close(batch["t5_hidden"].float(), fresh_hidden, rtol=2e-3, atol=2e-3)  # fp16 storage
    for k, c in enumerate(batch["caption"]):
        torch.testing.assert_close(batch["moments"][k], tok.moments(crop(by_caption[c]))[0], rtol=1e-4, atol=1e-5)
    # The flipped moments are those of the image flipped in pixel space before encoding.
    shard0 = load_file(str(cache / "shard-000000.safetensors"))
    caps0 = json.loads((cache / "shard-000000.json").read_text())["captions"]
    torch.testing.assert_close(shard0["moments_flip"][2], tok.moments(crop(by_caption[caps0[2]], True))[0],
                               rtol=1e-4, atol=1e-5)
    null = load_file(str(cache / "null_caption.safetensors"))
    torch.testing.assert_close(null["t5_hidden"].float(), t5([""])[0], rtol=2e-3, atol=2e-3)
    # With flip on, the loader picks moments or moments_flip per sample, both happen.
    flipped = plain = 0
    src = CacheSource(cache)
    lookup = {src.read(i)["caption"]: i for i in range(len(src))}
    for b in _batches(tiny_recipe(data, data="cache", cache_path=str(cache), flip=True, batch_size=8), 3):
        for m, c in zip(b["moments"], b["caption"]):
            i = lookup[c]
            if torch.equal(m, src.read(i)["moments"]):
                plain += 1
            else:
                assert torch.equal(m, src.read(i, flip=True)["moments"])
                flipped += 1
    assert flipped and plain

    # Training reads the cache.
    trainer = Trainer(tiny_recipe(data, data="cache", cache_path=str(cache), max_steps=2), tmp_path / "from-cache")
    assert trainer.t5 is None  # T5 is never loaded from the cache: its null caption comes from the cache too
    torch.testing.assert_close(trainer.null_hidden, null["t5_hidden"].float())
    assert math.isfinite(float(trainer.fit()["loss"]))

    # Resume after a kill: shard 1 lost its JSON (the completion marker) and left a temporary file.
    before = file_digest(cache)
    (cache / "shard-000001.json").unlink()
    (cache / "shard-000001.safetensors.tmp123").write_bytes(b"partial")
    (cache / "index.json").unlink()
    assert cache_main(argv)["written"] == [1]
    after = file_digest(cache)
    for name in ("shard-000000.safetensors", "shard-000000.json", "shard-000002.safetensors", "null_caption.safetensors"):
        assert after[name] == before[name]
    assert (cache / "index.json").is_file() and not (cache / "shard-000001.safetensors.tmp123").exists()
    # Other settings into the same directory are refused, nothing is touched.
    with pytest.raises(SystemExit) as err:
        cache_main([*argv[:4], "--shard-size", "4", *argv[6:]])
    assert err.value.code == 2 and file_digest(cache) == after

    # Sharded over processes: rank r of W writes shards r, r + W, ...; the index appears when all are done.
    split = tmp_path / "split"
    rec = get_recipe("shapes").overrides(overrides(data))
    s1 = extract(rec, split, shard_size=8, batch_size=8, num_workers=0, rank=1, world=2, progress=False)
    assert s1["written"] == [1] and not s1["index"] and not (split / "index.json").exists()
    s0 = extract(rec, split, shard_size=8, batch_size=8, num_workers=0, rank=0, world=2, progress=False)
    assert s0["written"] == [0, 2] and s0["index"]
    assert file_digest(split)["shard-000001.safetensors"] == after["shard-000001.safetensors"]


@pytest.fixture(scope="module")
def shapes_cache(data, tmp_path_factory) -> Path:
    """24 Shapes World scenes (rendered at 64, cropped to the tiny model's 32) cached with the tiny VAE and T5."""
    from training.cache import extract

    out = tmp_path_factory.mktemp("shapes-cache") / "cache"
    extract(tiny_recipe(data, data="shapes"), out, max_samples=24, shard_size=8, batch_size=8, num_workers=0,
            progress=False)
    return out


def test_the_cache_runs_t5_with_bf16_weights_under_bf16_and_auto_is_fp32_on_the_cpu(data, tmp_path, monkeypatch):
    """--precision bf16 loads T5 in bf16 (T5-XXL: 9.5 GB instead of 19), as the trainer does on
    CUDA; the default, auto, is bf16 on CUDA and fp32 here."""
    from dream_core.text import ConditioningTextEncoder
    from training.cache import extract

    loaded = []
    original = ConditioningTextEncoder.from_pretrained.__func__

    def recording(cls, path, max_length, torch_dtype=None):
        encoder = original(cls, path, max_length, torch_dtype=torch_dtype)
        loaded.append(next(encoder.parameters()).dtype)
        return encoder

    monkeypatch.setattr(ConditioningTextEncoder, "from_pretrained", classmethod(recording))
    for precision, out in (("bf16", tmp_path / "bf16"), ("auto", tmp_path / "auto")):
        extract(tiny_recipe(data, data="shapes"), out, max_samples=4, shard_size=4, batch_size=4, num_workers=0,
                precision=precision, progress=False)
    assert loaded == [torch.bfloat16, torch.float32]
    assert json.loads((tmp_path / "bf16" / "meta.json").read_text())["precision"] == "bf16"
    assert json.loads((tmp_path / "auto" / "meta.json").read_text())["precision"] == "fp32"


def test_a_small_cache_is_held_in_memory_and_reads_the_same(shapes_cache):
    resident, lazy = CacheSource(shapes_cache), CacheSource(shapes_cache, resident_max_bytes=0)
    assert resident.resident and not lazy.resident
    for i in range(len(lazy)):
        for flip in (False, True):
            a, b = resident.read(i, flip), lazy.read(i, flip)
            assert a["caption"] == b["caption"]
            assert all(torch.equal(a[k], b[k]) for k in ("moments", "t5_hidden", "t5_mask"))
            assert a["moments"].dtype == torch.float32 and a["t5_mask"].dtype == torch.bool
    resident.read(3)["moments"].add_(1.0)  # the caller owns what it reads: the held shard is unchanged
    assert torch.equal(resident.read(3)["moments"], lazy.read(3)["moments"])


def test_a_cache_refuses_a_model_whose_vae_encoder_or_t5_differs_from_its_own(data, shapes_cache, tmp_path, caplog):
    """The cache records content fingerprints of the VAE encoder and the T5 it was written with: a
    re-saved copy or a new decoder passes, other encoder or T5 weights are refused before training."""
    from transformers import AutoTokenizer, T5EncoderModel

    from dream_core.image_tokenizer import load_vae, save_vae

    def vae_with(part: str, out: Path) -> Path:
        vae = load_vae(data.vae)
        with torch.no_grad():
            next(getattr(vae, part).parameters()).add_(0.01)
        save_vae(vae, out)
        return out

    def t5_with(delta: float, out: Path) -> Path:
        t5 = T5EncoderModel.from_pretrained(str(data.text), local_files_only=True)
        with torch.no_grad():
            t5.encoder.block[0].layer[0].SelfAttention.q.weight.add_(delta)
        t5.save_pretrained(out, safe_serialization=True)
        AutoTokenizer.from_pretrained(str(data.text), local_files_only=True).save_pretrained(out)
        return out

    cache = CacheSource(shapes_cache)
    cache.check_weights(str(data.vae), str(data.text))
    cache.check_weights(str(vae_with("decoder", tmp_path / "new-decoder")), str(t5_with(0.0, tmp_path / "t5-copy")))
    with pytest.raises(ValueError, match=r"written with another VAE encoder \(.*\) than the one at .*other-encoder; "
                                         r"extract a new cache"):
        cache.check_weights(str(vae_with("encoder", tmp_path / "other-encoder")), str(data.text))
    with pytest.raises(ValueError, match="written with another T5 .* than the one at .*other-t5"):
        cache.check_weights(str(data.vae), str(t5_with(0.01, tmp_path / "other-t5")))
    # The trainer's loader checks before the first batch.
    with pytest.raises(ValueError, match="another VAE encoder"):
        _batches(tiny_recipe(data, data="cache", cache_path=str(shapes_cache),
                             vae_path=str(tmp_path / "other-encoder")), 1)
    # A cache written before the fingerprints is read with a warning that says it cannot be checked.
    old = tmp_path / "old-cache"
    shutil.copytree(shapes_cache, old)
    index = json.loads((old / "index.json").read_text())
    for key in ("vae_encoder_fingerprint", "t5_fingerprint"):
        del index["meta"][key]
    (old / "index.json").write_text(json.dumps(index))
    with caplog.at_level("WARNING", logger="dream.data"):
        CacheSource(old).check_weights(str(tmp_path / "other-encoder"), str(data.text))
    assert "predates weight fingerprints: it cannot be checked against the VAE encoder" in caplog.text


def _fit_until(trainer, stop_at: int) -> None:
    """fit(), stopped after step `stop_at` as Ctrl-C stops it (the step finishes, a checkpoint is saved)."""
    train_step = trainer.train_step

    def step(batch):
        out = train_step(batch)
        if trainer.step + 1 == stop_at:  # the loop counts this step after train_step returns
            trainer.stop_requested = True
        return out

    trainer.train_step = step
    trainer.fit()


def _final_weights(trainer) -> dict[str, torch.Tensor]:
    core = trainer.acc.unwrap_model(trainer.model)
    return {**{f"model.{k}": v for k, v in core.state_dict().items()},
            **{f"ema.{k}": v for k, v in trainer.ema.state_dict(core).items()}}


def _resume_equals_one_go(recipe, tmp_path: Path, steps: int, stop_at: int) -> None:
    """`steps` steps in one go, and `stop_at` + the rest resumed from checkpoint-last, end on equal
    weights and EMA, bit for bit (data position, posterior noise, masks, caption dropout restored)."""
    from training.train import Trainer

    whole = Trainer(recipe, tmp_path / "whole")
    whole.fit()
    first = Trainer(recipe, tmp_path / "split")
    _fit_until(first, stop_at)
    assert first.interrupted and first.step == stop_at
    second = Trainer(recipe, tmp_path / "split")
    assert second.step == stop_at  # resumed from checkpoint-last
    second.fit()
    assert whole.step == second.step == steps
    a, b = _final_weights(whole), _final_weights(second)
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    rows_a, rows_b = read_log(tmp_path / "whole" / "log.csv"), read_log(tmp_path / "split" / "log.csv")
    assert sorted(rows_b) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert {k: rows_b[step][k] for k in COMPARED} == {k: rows_a[step][k] for k in COMPARED}, step


def test_cache_feed_resumes_to_the_same_weights_as_one_run(data, shapes_cache, tmp_path):
    """8 steps of 4 on a 24-sample cache (into its second pass), hard negatives and caption dropout on."""
    recipe = tiny_recipe(data, data="cache", cache_path=str(shapes_cache), batch_size=4, max_steps=8,
                         hard_negatives=2, **{"model.caption_dropout": 0.25})
    _resume_equals_one_go(recipe, tmp_path, steps=8, stop_at=3)


def test_live_shapes_feed_is_position_addressed_and_a_cache_holds_its_first_scenes(data, shapes_cache):
    from training.data.loaders import build_dataloader

    def batches(n: int, start_step: int = 0, **kw) -> list[dict]:
        recipe = tiny_recipe(data, data="shapes", batch_size=4, **kw)
        it = iter(build_dataloader(recipe, recipe.model_config().replace(image_size=64), start_step=start_step))
        return [next(it) for _ in range(n)]

    fresh = batches(4)
    assert fresh[0]["image"].shape == (4, 3, 64, 64) and fresh[0]["skipped"] == 0
    for a, b in zip(fresh[2:], batches(2, start_step=2)):  # a resume continues at the same scene
        assert a["caption"] == b["caption"] and torch.equal(a["image"], b["image"])
    two = batches(3, start_step=1, num_workers=2)
    assert [b["caption"] for b in two] == [b["caption"] for b in fresh[1:]]
    src = CacheSource(shapes_cache)  # extracted with the same seed: scene i of the cache is position i
    assert [src.read(i)["caption"] for i in range(16)] == [c for b in fresh for c in b["caption"]]
    # Hard negatives draw from their own generator: turning them on leaves the scenes as they were.
    negs = batches(2, hard_negatives=3)
    for a, b in zip(fresh, negs):
        assert a["caption"] == b["caption"] and torch.equal(a["image"], b["image"]) and "hard_negatives" not in a
        assert [len(n) for n in b["hard_negatives"]] == [3] * 4


def test_live_shapes_feed_resumes_to_the_same_weights_as_one_run(data, tmp_path):
    recipe = tiny_recipe(data, data="shapes", batch_size=4, max_steps=5, hard_negatives=1,
                         **{"model.image_size": 64, "model.caption_dropout": 0.25})
    _resume_equals_one_go(recipe, tmp_path, steps=5, stop_at=2)


def test_hard_negatives_from_a_shapes_cache(data, shapes_cache, tmp_path):
    from training.data.shapes_world import parse_caption

    recipe = tiny_recipe(data, data="cache", cache_path=str(shapes_cache), batch_size=6, hard_negatives=3)
    batches = _batches(recipe, 4)
    plain = _batches(tiny_recipe(data, data="cache", cache_path=str(shapes_cache), batch_size=6), 4)
    for b, p in zip(batches, plain):
        # The scenes are those of the plain feed; each caption gets 3 one-attribute swaps.
        assert b["caption"] == p["caption"] and torch.equal(b["moments"], p["moments"]) and "hard_negatives" not in p
        assert len(b["hard_negatives"]) == 6
        for text, negs in zip(b["caption"], b["hard_negatives"]):
            truth = parse_caption(text)
            assert len(negs) == 3
            for neg in negs:
                got = parse_caption(neg)
                diffs = (got.background != truth.background) + sum(
                    getattr(x, k) != getattr(y, k) for x, y in zip(got.objects, truth.objects)
                    for k in ("color", "shape", "size", "position"))
                assert diffs == 1, (text, neg)
    # Seeded by the batch's position: a resumed stream makes the same negatives.
    assert [b["hard_negatives"] for b in _batches(recipe, 2, start_step=2)] == [b["hard_negatives"]
                                                                                for b in batches[2:]]
    # A cache of other data is refused in one sentence, before any training.
    folder_cache = tmp_path / "folder-cache"
    from training.cache import extract

    extract(tiny_recipe(data), folder_cache, shard_size=24, batch_size=8, num_workers=0, progress=False)
    with pytest.raises(ValueError, match=r"hard_negatives=2 needs Shapes World captions, but cache .* was "
                                         r"extracted from data=folder; set hard_negatives=0"):
        _batches(tiny_recipe(data, data="cache", cache_path=str(folder_cache), hard_negatives=2), 1)
    with pytest.raises(ValueError, match="hard_negatives needs data=shapes or a Shapes World cache"):
        tiny_recipe(data, hard_negatives=2)  # an image folder
    with pytest.raises(ValueError, match="caption_templates chooses among the emoji set's captions"):
        tiny_recipe(data, caption_templates="0")  # an image folder


# ---------------------------------------------------------------------------------------------
# Several processes, kill and resume (subprocesses)
# ---------------------------------------------------------------------------------------------

def _resume_repeats_the_run(data, run_a: Path, run_b: Path, tmp_path: Path, reps: list[dict], **train_kw):
    """Resume run_b (run_a's step-3 checkpoint) to step 5 on two processes: steps 4-5 repeat the
    uninterrupted run exactly (weights on both ranks, logged losses). Returns (outputs, reports)."""
    outputs = _launch_two(data, run_b, tmp_path / "rep_b", 5, **train_kw)
    assert "at step 3" in outputs[0]
    reps_b = [json.loads((tmp_path / "rep_b" / f"rank{r}.json").read_text()) for r in range(2)]
    assert reps_b[0]["param_digest"] == reps_b[1]["param_digest"] == reps[0]["param_digest"]
    rows_a, rows_b = read_log(run_a / "log.csv"), read_log(run_b / "log.csv")
    assert sorted(rows_b) == [4, 5]
    for step in (4, 5):
        assert {k: rows_b[step][k] for k in COMPARED} == {k: rows_a[step][k] for k in COMPARED}
    return outputs, reps_b


def _launch_two(d: SimpleNamespace, out: Path, report: Path, max_steps: int, extra_worker: list[str] = (),
                expect: int = 0, **train_kw) -> list[str]:
    return _wait_two(_start_two(d, out, report, max_steps, extra_worker, **train_kw), expect)


def _start_two(d: SimpleNamespace, out: Path, report: Path, max_steps: int, extra_worker: list[str] = (),
               **train_kw) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    train_kw = {"batch_size": 4, "ckpt_every": 3, **train_kw}
    for rank in range(2):
        env = subprocess_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=rank, WORLD_SIZE=2, LOCAL_RANK=rank,
                             LOCAL_WORLD_SIZE=2)
        cmd = [sys.executable, str(WORKER), "--report", str(report), *extra_worker, "--",
               *train_args(d, out, max_steps, **train_kw)]
        procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    return procs


def _wait_two(procs: list[subprocess.Popen], expect: int = 0) -> list[str]:
    outputs = []
    for p in procs:
        try:
            text, _ = p.communicate(timeout=1500)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outputs.append(text)
        assert p.returncode == expect, text[-3000:]
    return outputs


@pytest.mark.slow
def test_two_processes_over_gloo(data, tmp_path):
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    run_b.mkdir()
    _launch_two(data, run_a, tmp_path / "rep_a", 5, ["--snapshot-at", "3", "--snapshot-to", str(run_b)])
    reps = [json.loads((tmp_path / "rep_a" / f"rank{r}.json").read_text()) for r in range(2)]
    for rep in reps:
        assert rep["world"] == 2 and rep["final_step"] == 5
        # Every contrastive call gathered the 4 local rows of both ranks: logits are 8 x 8.
        assert rep["gathered_rows"] and all(g == [4, 8] for g in rep["gathered_rows"])
    # Different data on each rank, identical weights after the steps: gradients were synchronised.
    assert reps[0]["local_captions"] != reps[1]["local_captions"]
    assert not set(sum(reps[0]["local_captions"][:1], [])) & set(sum(reps[1]["local_captions"][:1], []))
    assert reps[0]["param_digest"] == reps[1]["param_digest"]
    # Only rank 0 wrote: rank 1's audit hook saw no write inside the run directory.
    assert reps[1]["writes"] == []
    assert {p.name for p in run_a.iterdir()} <= {"checkpoint-last", "log.csv", "recipe.json", "tb"}
    state = json.loads((run_a / "checkpoint-last" / "state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 5

    # Resume both processes from the step-3 checkpoint: steps 4-5 repeat the uninterrupted run exactly.
    outputs, reps_b = _resume_repeats_the_run(data, run_a, run_b, tmp_path, reps)
    assert "resumed from" in outputs[0]
    assert reps_b[1]["writes"] == []


@pytest.mark.slow
def test_fsdp_two_processes_shard_checkpoint_and_resume(data, tmp_path):
    """FSDP2 over gloo: every parameter is a shard, each rank writes its own part of the checkpoint,
    and a resume from step 3 to 5 equals the uninterrupted 5-step run (weights, EMA and losses)."""
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    run_b.mkdir()
    _launch_two(data, run_a, tmp_path / "rep_a", 5, ["--snapshot-at", "3", "--snapshot-to", str(run_b)], fsdp=True)
    reps = [json.loads((tmp_path / "rep_a" / f"rank{r}.json").read_text()) for r in range(2)]
    from dream_core.config import DreamConfig
    from dream_core.model import DreamModel

    ref = DreamModel(DreamConfig.preset("tiny").replace(t5_dim=32))
    names = {n for n, p in ref.named_parameters() if p.ndim}  # the 0-d temperature stays replicated
    for rep in reps:
        assert rep["world"] == 2 and rep["final_step"] == 5
        assert set(rep["sharded"]) == names  # nothing else unsharded (the old FSDP path was one NO_WRAP unit)
    assert reps[0]["param_digest"] == reps[1]["param_digest"]  # gathered full weights agree
    ckpt = run_a / "checkpoint-last"
    state = json.loads((ckpt / "state.json").read_text())
    assert state["sharded_world_size"] == 2 and state["step"] == 5 and state["layout"]["fsdp"] is True
    assert sorted(p.name for p in ckpt.iterdir()) == ["rank-00000", "rank-00001", "rng.safetensors", "state.json"]
    from safetensors.torch import load_file

    shards = [load_file(str(ckpt / f"rank-0000{r}" / "ema.safetensors")) for r in range(2)]
    for n in names:  # dim-0 shards that concatenate to the full shape
        p = ref.get_parameter(n)
        assert shards[0][n].shape[0] + shards[1][n].shape[0] == p.shape[0], n
        assert shards[0][n].shape[1:] == p.shape[1:], n

    _resume_repeats_the_run(data, run_a, run_b, tmp_path, reps, fsdp=True)


FSDP_BF16_PROBE = """
import json, torch
from dream_core.config import DreamConfig
from dream_core.model import DreamModel
from dream_core.text import ClipTokenizer
from training.distributed import shard_model
torch.manual_seed(0)
c = DreamConfig.preset("tiny")
model = DreamModel(c).train()
shard_model(model, torch.device("cpu"), torch.bfloat16)
seen = {}
def probe(name, weight):
    def hook(module, args):
        seen[name] = str(weight(module).dtype)
    return hook
model.encoder.blocks[0].register_forward_pre_hook(probe("block", lambda m: m.attn.qkv.weight))
model.decoder.register_forward_pre_hook(probe("root", lambda m: m.decoder_embed.weight))
model.projector.register_forward_pre_hook(probe("batchnorm", lambda m: m[1].weight))
b = 4
tokens, mask = torch.randn(b, c.seq_len, c.token_dim), torch.rand(b, c.seq_len) < 0.6
t5, t5_mask = torch.randn(b, c.t5_max_length, c.t5_dim), torch.ones(b, c.t5_max_length, dtype=torch.bool)
with torch.autocast("cpu", dtype=torch.bfloat16):
    out = model(tokens, mask, t5, t5_mask, ClipTokenizer(c.clip_context_length)(["a red circle"] * b))
out["loss"].backward()
seen["grads"] = sorted({str(p.grad.dtype) for p in model.parameters() if p.grad is not None})
seen["params"] = sorted({str(p.dtype) for p in model.parameters()})
print(json.dumps(seen))
"""


def test_fsdp_on_a_bf16_run_gathers_bf16_parameters_and_keeps_fp32_gradients():
    """The mixed-precision policy of a bf16 FSDP run (a world of one over gloo, CPU autocast standing
    in for CUDA's): blocks and the root compute with bf16 parameters (half the all-gather traffic),
    BatchNorm keeps fp32 (its running statistics are fp32), gradients are reduced and kept in fp32
    and the sharded parameters the optimizer steps stay fp32."""
    done = subprocess.run([sys.executable, "-c", FSDP_BF16_PROBE], env=subprocess_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == {"block": "torch.bfloat16", "root": "torch.bfloat16", "batchnorm": "torch.float32",
                    "grads": ["torch.float32"], "params": ["torch.float32"]}


@pytest.mark.slow
def test_a_non_finite_loss_on_one_rank_stops_both(data, tmp_path):
    """Rank 1's loss is NaN at step 2: both processes exit (code 3) with the step and the loss terms,
    none is left waiting in a collective."""
    outputs = _launch_two(data, tmp_path / "run", tmp_path / "rep", 4, ["--nan-at-step", "2", "--nan-rank", "1"],
                          expect=3, ckpt_every=0)
    for text in outputs:
        assert "error: non-finite loss at step 2 on rank 1 (loss=nan, diffusion=" in text, text[-2000:]
        assert "rank 0 (" not in text


@pytest.mark.slow
def test_sigterm_or_sigusr1_to_one_rank_saves_on_both_and_the_same_command_resumes(data, tmp_path):
    """A real SIGTERM to rank 1 alone (as a preemption), then SIGUSR1 to rank 0 of the resumed run:
    each time both ranks finish the same step, save one checkpoint and exit 130; the second run
    resumes from the first one's step."""
    out, log = tmp_path / "run", tmp_path / "run" / "log.csv"

    def run_until_signal(report: str, sig: signal.Signals, rank: int, min_rows: int) -> tuple[list[str], int]:
        procs = _start_two(data, out, tmp_path / report, 100_000, ckpt_every=0)
        try:
            deadline = time.monotonic() + 900
            while not (log.is_file() and len(log.read_text().splitlines()) > min_rows):
                assert all(p.poll() is None for p in procs), [p.communicate()[0][-2000:] for p in procs]
                assert time.monotonic() < deadline, "the run never logged its steps"
                time.sleep(0.2)
            procs[rank].send_signal(sig)
            outputs = _wait_two(procs, expect=130)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        state = json.loads((out / "checkpoint-last" / "state.json").read_text())
        assert state["world_size"] == 2
        assert f"saved a checkpoint at step {state['step']} in" in outputs[0], outputs[0][-2000:]  # rank 0 prints
        assert f"{sig.name}: stopping after this step" in outputs[rank]
        assert "Traceback" not in outputs[0] + outputs[1]
        return outputs, state["step"]

    _, first = run_until_signal("rep_a", signal.SIGTERM, 1, 2)
    outputs, second = run_until_signal("rep_b", signal.SIGUSR1, 0, first + 2)
    assert f"resumed from {out / 'checkpoint-last'} at step {first}" in outputs[0]
    assert second > first


@pytest.mark.slow
def test_an_inf_gradient_on_one_rank_skips_the_step_on_every_rank(data, tmp_path):
    """An inf in one of rank 1's gradients at step 2 (after the gradients were synchronised, so
    only rank 1 sees it): both ranks skip that optimizer step, the weights and the EMA stay
    finite and equal on both, and the run goes on to its end."""
    outputs = _launch_two(data, tmp_path / "run", tmp_path / "rep", 4, ["--inf-grad-at-step", "2",
                                                                         "--inf-grad-rank", "1"], ckpt_every=0)
    reps = [json.loads((tmp_path / "rep" / f"rank{r}.json").read_text()) for r in range(2)]
    assert "step 2: non-finite gradient norm on at least one rank" in outputs[0], outputs[0][-2000:]
    for rep in reps:
        assert rep["final_step"] == 4 and rep["finite"]
    assert reps[0]["param_digest"] == reps[1]["param_digest"]
    rows = read_log(tmp_path / "run" / "log.csv")
    assert sorted(rows) == [1, 2, 3, 4] and math.isfinite(float(rows[4]["loss"]))


@pytest.mark.slow
def test_a_run_folder_not_every_rank_sees_is_refused_before_step_1(data, tmp_path):
    """--out names a different folder on each rank (a node-local disk, simulated by running each
    rank in its own working directory with a relative --out): both ranks exit 2 with one message
    naming the folder and the rank that cannot see it, before any training step."""
    outputs = _launch_two(data, Path("run"), tmp_path / "rep", 4, ["--chdir", str(tmp_path / "nodes")], expect=2)
    for text in outputs:
        assert "is not one folder shared by every process: rank 1 on" in text, text[-2000:]
        assert "Traceback" not in text
    run0 = tmp_path / "nodes" / "rank0" / "run"
    assert not (run0 / "log.csv").exists() and not list(run0.glob(".shared-folder-check-*"))


@pytest.mark.parametrize("command, argv", [
    ("training.train", ["--recipe", "no-such-recipe", "--out", "{tmp}/run"]),
    ("training.finetune", ["--model", "{tmp}/missing", "--data", "{tmp}/missing", "--out", "{tmp}/ft"]),
    ("training.evaluate.fid_clip", ["--model", "{tmp}/missing", "--out", "{tmp}/fid"]),
])
def test_every_distributed_command_tears_its_process_group_down_on_an_error_exit(command, argv, tmp_path):
    """A process group left to interpreter shutdown can abort the process (gloo: "terminate called
    without an active exception", exit -6) after the command printed its error and chose exit 2; each
    launched command destroys the group itself on every exit, errors included."""
    import importlib

    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # as a launcher leaves it
    try:
        with pytest.raises((SystemExit, ValueError)):
            importlib.import_module(command).main([a.format(tmp=tmp_path) for a in argv])
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow
def test_kill_and_resume_continues_the_same_run(data, tmp_path):
    """SIGKILL in the middle of writing step 5's checkpoint; the restart resumes from step 4 and its
    losses equal, to the logged precision (6 decimals; the computation is bitwise deterministic on
    one CPU thread), those of an uninterrupted run of the same command."""
    ref_out, run_out = tmp_path / "ref", tmp_path / "run"
    env = subprocess_env()
    cmd = lambda out, report, *extra: [sys.executable, str(WORKER), "--report", str(report), *extra, "--",  # noqa: E731
                                       *train_args(data, out, 8, batch_size=4, ckpt_every=1)]
    ref = subprocess.Popen(cmd(ref_out, tmp_path / "rep_ref"), env=env, cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    victim = subprocess.Popen(cmd(run_out, tmp_path / "rep_run", "--pause-in-save-at", "5"), env=env, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 1500
        while not (tmp_path / "rep_run" / "paused").exists():
            assert victim.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "the run never reached step 5"
            time.sleep(0.1)
        victim.send_signal(signal.SIGKILL)
        assert victim.wait(timeout=60) == -signal.SIGKILL
    finally:
        if victim.poll() is None:
            victim.kill()
    assert json.loads((run_out / "checkpoint-last" / "state.json").read_text())["step"] == 4
    assert (run_out / "checkpoint-last.tmp").is_dir()  # the half-written step-5 checkpoint
    killed_rows = read_log(run_out / "log.csv")
    assert sorted(killed_rows) == [1, 2, 3, 4, 5]

    export = tmp_path / "exported"
    resumed = subprocess.run(cmd(run_out, tmp_path / "rep_res") + ["--export", str(export)], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=1500)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout and "at step 4" in resumed.stdout
    text, _ = ref.communicate(timeout=1500)
    assert ref.returncode == 0, text[-3000:]

    ref_rows, run_rows = read_log(ref_out / "log.csv"), read_log(run_out / "log.csv")
    assert sorted(run_rows) == list(range(1, 9))
    for step in range(1, 9):
        assert {k: run_rows[step][k] for k in COMPARED} == {k: ref_rows[step][k] for k in COMPARED}, step
    assert {k: killed_rows[5][k] for k in COMPARED} == {k: run_rows[5][k] for k in COMPARED}
    assert json.loads((run_out / "checkpoint-last" / "state.json").read_text())["step"] == 8
    assert not (run_out / "checkpoint-last.tmp").exists()
    digests = [json.loads((tmp_path / r / "rank0.json").read_text())["param_digest"] for r in ("rep_ref", "rep_res")]
    assert digests[0] == digests[1]
    # --export wrote a model directory the pipeline loads.
    from dream_core.pipeline import DreamPipeline

    assert DreamPipeline.from_pretrained(export, device="cpu").config.image_size == 32


# ---------------------------------------------------------------------------------------------
# Baselines and the REPA teacher
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def teacher_files(tmp_path_factory) -> SimpleNamespace:
    """A tiny open_clip ViT (32 px, 8 px patches: a 4 x 4 grid of width 24), saved as safetensors."""
    import open_clip
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("teacher")
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 24, "patch_size": 8, "head_width": 12},
           "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}}
    config = root / "tiny-test-vit.json"
    config.write_text(json.dumps(cfg))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-test-vit")
    weights = root / "tiny-test-vit.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return SimpleNamespace(config=config, weights=weights, model=model.eval())


def test_repa_teacher_gives_patch_tokens_on_the_token_grid(teacher_files, tmp_path):
    import open_clip

    from training.repa import RepaTeacher

    teacher = RepaTeacher(str(teacher_files.config), teacher_files.weights, tokens_per_side=4, device="cpu")
    assert teacher.dim == 24 and not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.visual.training
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out = teacher(x)
    assert out.shape == (2, 16, 24)
    # The same as the saved model's own patch tokens (so the local weights were loaded).
    visual = teacher_files.model.visual
    visual.output_tokens = True
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        _, tokens = visual(((x + 1) / 2 - mean) / std)
    torch.testing.assert_close(out, tokens, rtol=1e-5, atol=1e-5)
    # A coarser token grid averages 2 x 2 blocks of patch tokens (area interpolation).
    coarse = RepaTeacher("tiny-test-vit", teacher_files.weights, tokens_per_side=2, device="cpu")(x)
    grid = tokens.reshape(2, 4, 4, 24)
    torch.testing.assert_close(coarse[:, 0], grid[:, :2, :2].mean(dim=(1, 2)), rtol=1e-5, atol=1e-5)
    # Upsampling to a finer grid works too (224 px / 16 = 14 -> 16 in the paper's setting).
    assert RepaTeacher("tiny-test-vit", teacher_files.weights, 5)(x).shape == (2, 25, 24)
    with pytest.raises(ValueError, match="missing.safetensors"):
        RepaTeacher("tiny-test-vit", tmp_path / "missing.safetensors", 4)
    with pytest.raises(ValueError, match="unknown open_clip architecture"):
        RepaTeacher("no-such-vit", teacher_files.weights, 4)


BASELINES = {
    "clip": ({"clip"}, {"diffusion", "repa"}),
    "mar": ({"diffusion"}, {"clip", "repa"}),
    "fluid": ({"diffusion"}, {"clip", "repa"}),
    "repa": ({"diffusion", "repa"}, {"clip"}),
    "shapes-fx": ({"diffusion", "clip"}, {"repa"}),
    "shapes-uni": ({"diffusion", "clip"}, {"repa"}),
}


@pytest.mark.parametrize("name", list(BASELINES))
def test_each_baseline_recipe_runs_a_step(name, data, teacher_files, tmp_path):
    from training.train import Trainer

    extra = {"max_steps": 1, "batch_size": 4}
    if name == "repa":
        extra.update({"model.repa_block": 1, "model.repa_teacher_dim": 24,
                      "repa_teacher_arch": str(teacher_files.config), "repa_teacher_weights": str(teacher_files.weights)})
    recipe = tiny_recipe(data, name, **extra)
    assert recipe.name == name
    trainer = Trainer(recipe, tmp_path / name)
    row = trainer.fit()
    assert row["step"] == 1 and math.isfinite(row["loss"])
    present, absent = BASELINES[name]
    assert present <= set(row) and not absent & set(row), row
    if name == "clip":
        assert row["mask_ratio_mean"] == 0.0
    if name in ("mar", "fluid", "repa"):
        assert row["mask_ratio_mean"] >= 0.7


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error (exit code 2) before any long work, nothing overwritten
# ---------------------------------------------------------------------------------------------

def test_bad_input_fails_early_with_exit_code_2(data, trained, tmp_path, capsys):
    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "000.tar").write_bytes(b"garbage" * 200)
    cases = [
        (overrides(data, data_path=str(tmp_path / "missing")), "does not exist"),
        (overrides(data, data_path=str(tmp_path / "empty")), "empty directory"),
        (overrides(data, data="webdataset", data_path=str(tmp_path / "shards")), "000.tar is not a readable tar"),
        (overrides(data, data="cache", cache_path=str(tmp_path / "empty")), "no index.json"),
        (overrides(data) + ["bogus_key=1"], "unknown recipe key 'bogus_key'"),
        (overrides(data, batch_size=0), "batch_size must be >= 1"),
        (overrides(data) + ["model.width=-8"], "model.width must be a positive integer"),  # the key as typed
        (overrides(data) + ["model.no_such_field=1"], "unknown DreamConfig keys"),
        (overrides(data, masking="sideways"), "recipe.masking must be"),
        (overrides(data, trainable="projector"), "recipe.trainable needs recipe.init_from"),
        (overrides(data, vae_path=str(tmp_path / "novae")), "vae_path"),
    ]
    for over, message in cases:
        assert run_train_main(["--recipe", "shapes", "--out", str(out), *over]) == 2, message
        assert message in capsys.readouterr().err
        assert not out.exists()  # nothing was written
    assert run_train_main(["--recipe", "no-such-recipe", "--out", str(out)]) == 2
    assert "unknown recipe" in capsys.readouterr().err

    # A checkpoint from another model config is refused and left as it was.
    run = tmp_path / "run"
    shutil.copytree(trained.out, run)
    before = file_digest(run)
    over = overrides(data, masking="fx") + ["model.width=64"]
    assert run_train_main(["--recipe", "shapes", "--out", str(run), "--max-steps", "40", *over]) == 2
    assert "another model config" in capsys.readouterr().err
    assert file_digest(run) == before


def test_an_export_writes_the_data_sources_caption_details(trained, tmp_path, monkeypatch):
    """A source that offers (caption, detail) pairs (the emoji set: each name with its emoji and
    keywords) gets them into captions.txt as caption<TAB>detail; a repeated caption keeps its first."""
    class WithDetails:
        def __len__(self) -> int:
            return 3

        def caption_bank_with_details(self):
            return [("grinning face", "\U0001f600  face, grin"), ("red heart", "\u2764\ufe0f  love"),
                    ("grinning face", "a second detail")]

    monkeypatch.setattr(trained.trainer, "source", WithDetails())
    trained.trainer.export(tmp_path / "model")
    lines = (tmp_path / "model" / "captions.txt").read_text(encoding="utf-8").splitlines()
    assert lines == ["grinning face\t\U0001f600  face, grin", "red heart\t\u2764\ufe0f  love"]


def test_a_checkpoint_written_before_a_config_field_existed_resumes(data, trained, tmp_path):
    """A field added to DreamConfig later (loading as the value old models always used) leaves an
    older run resumable: the saved config is read through today's DreamConfig before comparing."""
    import dream_core.request as request
    from training.train import Trainer

    run = tmp_path / "run"
    shutil.copytree(trained.out, run)
    state_path = run / "checkpoint-last" / "state.json"
    state = json.loads(state_path.read_text())
    assert state["config"]["default_head_sampler"] == request.DEFAULT_HEAD_SAMPLER
    del state["config"]["default_head_sampler"], state["config"]["default_head_steps"]
    state_path.write_text(json.dumps(state))
    trainer = Trainer(tiny_recipe(data, masking="fx", max_steps=32, ckpt_every=10), run)
    assert trainer.step == 30  # resumed, not refused and not restarted
    trainer.fit()
    assert json.loads(state_path.read_text())["step"] == 32


# ---------------------------------------------------------------------------------------------
# Fine-tuning
# ---------------------------------------------------------------------------------------------

def _finetune(argv: list[str]) -> int:
    from training.finetune import main

    try:
        main(argv)
    except SystemExit as err:
        return int(err.code or 0)
    return 0


def test_finetune_lora_merges_into_a_loadable_model(data, tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from dream_core.pipeline import DreamPipeline
    from training.finetune import lora_target_names

    out = tmp_path / "my-lora"
    args = ["--model", str(tiny_model_dir), "--data", str(data.images), "--out", str(out), "--lora", "--rank", "4",
            "--steps", "3", "--batch-size", "4", "--num-workers", "0", "--log-every", "1", "--lr", "0.01",
            "--preserve", "4"]
    assert _finetune(args) == 0
    pipe = DreamPipeline.from_pretrained(out, device="cpu")  # --out IS the model directory
    assert pipe.path.name == "my-lora"  # what the app shows
    assert pipe("a small red circle", num_inference_steps=4, head_steps=5, seed=0).images[0].size == (32, 32)
    assert set(data.captions) <= set(pipe.captions)
    before = load_file(str(tiny_model_dir / "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    assert set(before) == set(after)
    targets = {f"{n}.weight" for n in lora_target_names(pipe.model)}
    assert len(targets) == 26
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= targets  # only the adapted Linear weights moved (merged LoRA)
    card = (out / "README.md").read_text()
    # One metadata header, at the top, naming the base model; then the run's heading.
    assert card.startswith(f"---\nbase_model: {json.dumps(str(tiny_model_dir))}\n---\n\n# my-lora\n")
    assert card.count("---\n") == 2 and "(rank 4, merged)" in card and "teaches generation only" in card
    assert "4 preservation samples of the base model" in card
    preserve = sorted(p.name for p in (out / "training" / "preserve").glob("*.png"))
    assert preserve == [f"{i:05d}.png" for i in range(4)]
    assert (out / "training" / "checkpoint-last" / "state.json").is_file()


def test_finetune_trainable_parts_leave_every_other_weight_bit_identical(data, tiny_model_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    base = ["--model", str(tiny_model_dir), "--data", str(data.images), "--batch-size", "4", "--num-workers", "0",
            "--steps", "3", "--lr", "0.01", "--preserve", "0"]
    before = load_file(str(tiny_model_dir / "model.safetensors"))

    def changed_parts(out: Path) -> set[str]:
        after = load_file(str(out / "model.safetensors"))
        return {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}

    # The joint space's heads only: generation's weights (encoder, decoder, aligner, head) stay exact.
    heads = tmp_path / "heads"
    assert _finetune(base + ["--out", str(heads), "masking=none", "trainable=projector,text_tower,logit_scale"]) == 0
    assert "(training projector,text_tower,logit_scale only)" in capsys.readouterr().out
    assert changed_parts(heads) == {"projector", "text_tower", "logit_scale"}
    # A frozen projector also keeps its BatchNorm statistics (eval mode).
    text = tmp_path / "text"
    assert _finetune(base + ["--out", str(text), "masking=none", "trainable=text_tower"]) == 0
    assert changed_parts(text) == {"text_tower"}
    # A part the source lacks (model.clip_pooling=attention adds the pooler) starts from its
    # initialisation when it is trained; everything it does not train is kept bit for bit.
    pooled = tmp_path / "pooled"
    assert _finetune(base + ["--out", str(pooled), "masking=none", "model.clip_pooling=attention",
                             "trainable=pooler,projector"]) == 0
    assert f"init_from: pooler not in {tiny_model_dir / 'model.safetensors'}: trained from initialisation" in \
        capsys.readouterr().out
    assert changed_parts(pooled) == {"projector"}
    assert "pooler.query" in load_file(str(pooled / "model.safetensors"))
    assert json.loads((pooled / "config.json").read_text())["clip_pooling"] == "attention"
    # ... and is refused when it would stay at its initialisation.
    bad = tmp_path / "bad"
    assert _finetune(base + ["--out", str(bad), "model.clip_pooling=attention", "trainable=projector"]) == 2
    assert "missing ['pooler.attn" in capsys.readouterr().err
    # recipe.reinit: a trained part restarts from its initialisation (at lr 0 it stays there, so
    # every one of its tensors differs from the source's trained ones and nothing else moves) ...
    fresh = tmp_path / "fresh"
    assert _finetune(base + ["--out", str(fresh), "--lr", "0", "masking=none", "trainable=text_tower",
                             "reinit=text_tower"]) == 0
    assert "init_from: text_tower trained from initialisation (recipe.reinit)" in capsys.readouterr().out
    assert changed_parts(fresh) == {"text_tower"}
    after = load_file(str(fresh / "model.safetensors"))
    assert all(not torch.equal(before[k], after[k]) for k in before if k.startswith("text_tower.")
               and "ln_" not in k and not k.endswith("bias"))
    # ... and only a trained one.
    assert _finetune(base + ["--out", str(bad), "trainable=projector", "reinit=text_tower"]) == 2
    assert "recipe.reinit names ['text_tower'], which recipe.trainable does not train" in capsys.readouterr().err
    # A part the model does not have is refused, naming the parts it has; nothing is written.
    assert _finetune(base + ["--out", str(bad), "trainable=projector,no_such_part"]) == 2
    err = capsys.readouterr().err
    assert "recipe.trainable names ['no_such_part']" in err and "encoder, decoder" in err
    assert not (bad / "model.safetensors").exists()
    assert _finetune(base + ["--out", str(bad), "--lora", "--", "trainable=projector"]) == 2
    assert "recipe.trainable and recipe.lora_rank exclude each other" in capsys.readouterr().err


def test_finetune_full_resumes_extends_and_validates_inputs(data, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "full"
    base = ["--model", str(tiny_model_dir), "--data", str(data.images), "--out", str(out), "--batch-size", "4",
            "--num-workers", "0", "--log-every", "1", "--ckpt-every", "1", "--preserve", "0"]
    assert _finetune(base + ["--steps", "2"]) == 0
    first = capsys.readouterr().out
    assert f"on 24 images in {data.images} (captions: a .txt beside each image)" in first
    assert "LR at step 1: 0.0001" in first  # the recipe's 30 warm-up steps are capped at a tenth of the run
    # The same command with more steps continues the run and rewrites the model.
    assert _finetune(base + ["--steps", "4"]) == 0
    assert "resumed from" in capsys.readouterr().out
    with open(out / "training" / "log.csv", newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3, 4]
    assert json.loads((out / "training" / "checkpoint-last" / "state.json").read_text())["step"] == 4
    assert "4 steps of 4" in (out / "README.md").read_text()
    # A checkpoint of other settings (LoRA into a full run) is refused and left as it was.
    before = file_digest(out)
    assert _finetune(base + ["--steps", "5", "--lora"]) == 2
    assert "other settings (lora_rank: 0 -> 8" in capsys.readouterr().err
    assert file_digest(out) == before
    # --overwrite starts over.
    assert _finetune(base + ["--steps", "1", "--lora", "--overwrite"]) == 0
    with open(out / "training" / "log.csv", newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1]
    # A directory that holds a model no fine-tuning wrote (or the base model itself) is never overwritten.
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    before = file_digest(other)
    assert _finetune(base[:4] + ["--out", str(other), "--steps", "1", "--preserve", "0"]) == 2
    assert "already holds a model directory" in capsys.readouterr().err
    assert _finetune(base[:4] + ["--out", str(tiny_model_dir), "--steps", "1"]) == 2
    assert "--out must differ from --model" in capsys.readouterr().err
    assert file_digest(other) == before
    (tmp_path / "empty").mkdir()
    cases = [
        (["--model", str(tmp_path / "nomodel"), "--data", str(data.images)], "not a model directory"),
        (["--model", str(tiny_model_dir), "--data", str(tmp_path / "nodata")], "does not exist"),
        (["--model", str(tiny_model_dir), "--data", str(tmp_path / "empty")], "no image with a caption"),
        (["--model", str(tiny_model_dir), "--data", str(data.images), "--steps", "0"], "--steps must be >= 1"),
        (["--model", str(tiny_model_dir), "--data", str(data.images), "--batch-size", "0"], "batch_size must be >= 1"),
        (["--model", str(tiny_model_dir), "--data", str(data.images), "--rank", "4"], "pass --lora with it"),
    ]
    for argv, message in cases:
        assert _finetune(argv + ["--out", str(tmp_path / "x")]) == 2, message
        assert message in capsys.readouterr().err
        assert not (tmp_path / "x").exists()


def test_unreadable_images_are_named_once_and_left_out(data, tiny_model_dir, tmp_path, caplog):
    folder = tmp_path / "imgs"
    shutil.copytree(data.images, folder)
    png = (folder / "000.png").read_bytes()
    (folder / "000.png").write_bytes(png[: len(png) // 2])  # truncated
    (folder / "001.png").write_bytes(png[:-12])  # cut before its last chunk: decodes, but is damaged
    (folder / "nocap.png").write_bytes(png)
    out = tmp_path / "ft"
    with caplog.at_level("WARNING", logger="dream.data"):
        assert _finetune(["--model", str(tiny_model_dir), "--data", str(folder), "--out", str(out), "--steps", "1",
                          "--batch-size", "4", "--num-workers", "0", "--preserve", "0"]) == 0
    messages = [r.getMessage() for r in caplog.records if r.name == "dream.data"]
    for name in ("000.png", "001.png"):
        named = [m for m in messages if f"{folder / name}" in m]
        assert len(named) == 1 and "cannot be read" in named[0], messages
    assert sum("have no .txt caption" in m for m in messages) == 1
    assert "22 images" in (out / "README.md").read_text()


@pytest.mark.slow
def test_ctrl_c_saves_then_the_same_command_resumes_with_one_row_per_step(data, tiny_model_dir, tmp_path):
    """SIGINT to the process group (as a terminal's Ctrl-C, data workers included): the step in
    flight finishes, a checkpoint is saved, the exit is clean (130, no traceback); the same command
    resumes at the next step, rows a kill left past the checkpoint are dropped, --out loads."""
    from dream_core.pipeline import DreamPipeline

    out = tmp_path / "run"
    cmd = lambda steps: [sys.executable, "-m", "training.finetune", "--model", str(tiny_model_dir),  # noqa: E731
                         "--data", str(data.images), "--out", str(out), "--steps", str(steps), "--batch-size", "4",
                         "--num-workers", "1", "--log-every", "1", "--ckpt-every", "0", "--threads", "1",
                         "--preserve", "0"]
    proc = subprocess.Popen(cmd(100_000), env=subprocess_env(), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    log = out / "training" / "log.csv"
    try:
        deadline = time.monotonic() + 600
        while not (log.is_file() and len(log.read_text().splitlines()) >= 4):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    step = json.loads((out / "training" / "checkpoint-last" / "state.json").read_text())["step"]
    assert f"saved a checkpoint at step {step}" in stdout
    with open(log, newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(1, step + 1))
    with open(log, "a") as f:  # as if a kill had come after logging step + 1 but before its checkpoint
        f.write(f"{step + 1}" + ",0" * 5 + "\n")
    resumed = subprocess.run(cmd(step + 2), env=subprocess_env(), cwd=ROOT, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {step}" in resumed.stdout and f"LR at step {step + 1}" in resumed.stdout
    with open(log, newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(1, step + 3))
    assert DreamPipeline.from_pretrained(out, device="cpu").path.name == "run"


def test_short_runs_scale_the_schedules_and_print_the_lr(data, tmp_path, capsys):
    """A 5-step run of a recipe written for 49 epochs (12 of LR warm-up, 36 of Masking Warmup) over
    the 24-image folder (the epoch taken from the data) follows the schedules scaled to its length."""
    from training.train import Trainer

    recipe = get_recipe("dream-base").overrides(overrides(data, samples_per_epoch=0, max_steps=5, warmup_epochs=12.0,
                                                          lr_schedule="constant", model="tiny"))
    trainer = Trainer(recipe, tmp_path / "run")
    assert trainer.samples_per_epoch == 24
    scale = 49 / (5 * 8 / 24)
    assert trainer.schedule_scale == pytest.approx(scale)
    trainer.fit()
    printed = capsys.readouterr().out
    assert "scaled x" in printed and "5-step run" in printed and "on 24 images in" in printed
    rows = read_log(tmp_path / "run" / "log.csv")
    expected = [0.001 * min(1.0, (s * 8 / 24) * scale / 12) for s in range(1, 6)]
    assert [float(rows[s]["lr"]) for s in range(1, 6)] == pytest.approx(expected, abs=1e-6)  # logged to 6 decimals
    assert expected[0] > 0.0005 and expected[-1] == 0.001
    assert f"LR at step 1: {expected[0]:.3g}" in printed
    assert float(rows[5]["mask_mean_mu"]) == pytest.approx(min(1.0, (5 * 8 / 24) * scale / 36), abs=1e-4)


def test_a_run_longer_than_the_recipe_ends_its_lr_cosine_with_the_run(data, tmp_path, capsys):
    """max_steps past the recipe's epochs: the LR cosine spans the run (it used to reach 0 at the
    recipe's last epoch and stay there for the rest of the run); Masking Warmup keeps its epochs."""
    from training.train import Trainer

    recipe = get_recipe("shapes").overrides(overrides(data, samples_per_epoch=0, epochs=1.0, max_steps=30,
                                                      warmup_steps=0, lr_schedule="cosine", masking="warmup",
                                                      masking_warmup_epochs=2.0))
    trainer = Trainer(recipe, tmp_path / "run")  # 24 images, batch 8: the recipe is 3 steps, the run 30
    assert (trainer.lr_scale, trainer.schedule_scale) == (pytest.approx(0.1), 1.0)
    assert "1-epoch LR schedule scaled x10 to this 30-step run" in trainer.start_message()
    assert "masking schedule" not in trainer.start_message()
    lr = {s: trainer.lr_after(s * 8) for s in (3, 15, 30)}
    assert lr[3] == pytest.approx(0.001 * 0.5 * (1 + math.cos(math.pi * 0.1)))  # was 0 from here on
    assert lr[15] == pytest.approx(0.0005) and lr[30] == pytest.approx(0.0)
    trainer.samples_seen = 6 * 8  # 2 epochs: the end of Masking Warmup, at the recipe's own epochs
    assert trainer.schedule.mean(trainer.schedule_epoch) == 1.0


def test_data_workers_are_capped_by_the_usable_cores(caplog):
    cores = sources.usable_cores()
    with caplog.at_level("WARNING", logger="dream.data"):
        assert sources.data_workers(cores + 7) == cores
    assert f"num_workers={cores + 7} capped to {cores}" in caplog.text
    assert sources.data_workers(0) == 0


def _stride8_vae(root: Path, tiny_vae: Path) -> Path:
    """The tiny VAE's config with four levels (stride 8): only configs are read before any work."""
    vae = root / "vae8"
    shutil.copytree(tiny_vae, vae)
    cfg = json.loads((vae / "config.json").read_text())
    cfg["block_out_channels"] = [8, 8, 8, 8]
    cfg["down_block_types"] = ["DownEncoderBlock2D"] * 4
    cfg["up_block_types"] = ["UpDecoderBlock2D"] * 4
    (vae / "config.json").write_text(json.dumps(cfg))
    return vae


def test_a_recipes_choices_are_read_from_their_one_source(monkeypatch):
    """recipe.masking accepts exactly the names dream_core.masking.SCHEDULES builds, and the cache's
    --precision offers the recipe's PRECISIONS: a schedule added there needs no second list here."""
    from dream_core import masking
    from training import cache
    from training.recipes import PRECISIONS

    with pytest.raises(ValueError, match="recipe.masking must be one of warmup, mar, fx, uni, cd, none, got 'probe'"):
        get_recipe("shapes").overrides(["masking=probe"])
    monkeypatch.setitem(masking.SCHEDULES, "probe", masking.no_masking)
    assert get_recipe("shapes").overrides(["masking=probe"]).masking_schedule() == masking.no_masking()
    with pytest.raises(ValueError, match="recipe.precision must be one of auto, bf16, fp32, got 'fp16'"):
        get_recipe("shapes").overrides(["precision=fp16"])
    for precision in PRECISIONS:
        assert cache.parse_args(["--recipe", "shapes", "--out", "x", "--precision", precision]).precision == precision
    with pytest.raises(SystemExit):
        cache.parse_args(["--recipe", "shapes", "--out", "x", "--precision", "fp16"])


def test_geometry_is_read_from_the_weights_and_a_mismatch_is_one_sentence(data, tmp_path, capsys):
    from training.cache import main as cache_main

    vae8 = _stride8_vae(tmp_path, data.vae)
    # Derived: no model.* override needed for the VAE's stride, channels, scaling factor or T5 width.
    derived = get_recipe("shapes").overrides([f"vae_path={vae8}", f"t5_path={data.text}", "model=tiny"]).model_config()
    assert (derived.vae_stride, derived.vae_channels, derived.vae_scaling_factor, derived.t5_dim) == (8, 4, 0.5, 32)
    message = (f"model.vae_stride=4 disagrees with the weights: the VAE at {vae8} downsamples by 8 "
               "(2 ** (len(block_out_channels) - 1), block_out_channels=[8, 8, 8, 8])")
    out = tmp_path / "run"
    over = overrides(data, vae_path=str(vae8)) + ["model.vae_stride=4"]
    assert run_train_main(["--recipe", "shapes", "--out", str(out), *over]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
    # The cache refuses it before any work and leaves nothing behind: the corrected command runs.
    cache = tmp_path / "cache"
    argv = ["--recipe", "shapes", "--out", str(cache), "--shard-size", "32", "--batch-size", "8", "--num-workers", "0"]
    with pytest.raises(SystemExit) as err:
        cache_main(argv + over)
    assert err.value.code == 2 and message in capsys.readouterr().err
    assert not cache.exists()
    over = overrides(data, **{"model.t5_dim": 64})
    with pytest.raises(SystemExit):
        cache_main(argv + over)
    assert "model.t5_dim=64 disagrees with the weights: the T5 at" in capsys.readouterr().err
    # A meta.json left by an older failed run (nothing else written) does not lock --out.
    cache.mkdir()
    (cache / "meta.json").write_text(json.dumps({"image_size": 64, "latent_size": 32}))
    assert cache_main(argv + overrides(data))["index"]
    assert json.loads((cache / "meta.json").read_text())["latent_size"] == 8


def test_the_bundled_models_config_takes_the_heads_architecture_and_the_pretraining_losses(tmp_path):
    """make model's config: the heads stage's architecture (the attention pooler the shapes-heads
    recipe adds), the pretraining's loss weights, the sampler defaults measured on the shipped model
    (which its config.json holds)."""
    from dream_core import DreamConfig
    from training.make_shapes_model import SAMPLER_DEFAULTS, bundled_config

    heads_recipe = get_recipe("shapes-heads")
    pre = DreamConfig.preset("shapes")
    (tmp_path / "pre").mkdir()
    (tmp_path / "heads").mkdir()
    pre.save(tmp_path / "pre" / "config.json")
    pre.replace(**heads_recipe.model_overrides).save(tmp_path / "heads" / "config.json")
    config = bundled_config(tmp_path / "pre", tmp_path / "heads")
    assert config.clip_pooling == "attention"
    assert (config.diffusion_weight, config.clip_weight) == (pre.diffusion_weight, pre.clip_weight) == (1.0, 0.005)
    shipped = DreamConfig.load(ROOT / "assets" / "dream-shapes" / "config.json")
    for key, value in SAMPLER_DEFAULTS.items():
        assert getattr(config, key) == getattr(shipped, key) == value, key


def test_make_models_dream_schedule_ends_masking_warmup_at_its_share_of_the_run_and_keeps_the_lr_warm_up():
    """make model's DREAM stage at 10,000 steps of 64: the mask mean reaches 1 at step 6,000
    (MASKING_WARMUP_SHARE), not at the recipe's 10.56 epochs (step 1,650), and the LR warms up over
    78 steps, as the shipped weights were trained, whatever the run's length."""
    from training.make_shapes_model import MASKING_WARMUP_SHARE, dream_schedule
    from training.train import schedule_scale

    recipe = get_recipe("shapes")
    overrides = dream_schedule(recipe, 10_000)
    assert overrides == ["masking_warmup_epochs=38.4", "warmup_steps=78"]
    schedule = recipe.overrides(overrides).masking_schedule()
    epoch_at = lambda step: step * recipe.batch_size / recipe.samples_per_epoch  # noqa: E731
    assert schedule.mean(epoch_at(6_000)) == pytest.approx(1.0)
    assert schedule.mean(epoch_at(3_000)) == pytest.approx(0.5)
    assert MASKING_WARMUP_SHARE == 0.6
    assert dream_schedule(recipe, 8_000) == ["masking_warmup_epochs=30.72", "warmup_steps=78"]
    # No --steps: the recipe's own length (19.2 epochs).
    assert dream_schedule(recipe, 0)[0] == f"masking_warmup_epochs={0.6 * recipe.epochs:g}"
    # A run shorter than the recipe: the trainer scales the masking schedule's epochs (x3 at 1,000
    # steps), and the ramp still ends at step 600.
    short = dream_schedule(recipe, 1_000)
    assert short[0] == "masking_warmup_epochs=11.52"
    scale = schedule_scale(recipe.overrides(["max_steps=1000"]), 1_000, recipe.batch_size, recipe.samples_per_epoch)
    assert scale == pytest.approx(3.0)
    short_schedule = recipe.overrides(short).masking_schedule()
    assert short_schedule.mean(epoch_at(600) * scale) == pytest.approx(1.0)
    assert short_schedule.mean(epoch_at(300) * scale) == pytest.approx(0.5)


def test_make_model_lets_a_stage_save_its_checkpoint_on_ctrl_c(tmp_path):
    """Ctrl-C on `make model` reaches the build and its running stage alike; the stage (like
    training.train) finishes its step and saves before it exits. The build waits for it instead of
    killing it (subprocess.run kills the child 0.25 s after the KeyboardInterrupt), then stops."""
    ready, saved = tmp_path / "ready", tmp_path / "saved"
    stage = tmp_path / "stage.py"
    stage.write_text(
        "import signal, sys, time\n"
        "from pathlib import Path\n"
        "stop = []\n"
        "signal.signal(signal.SIGINT, lambda *a: stop.append(1))\n"
        f"Path({str(ready)!r}).touch()\n"
        "while not stop:\n"
        "    time.sleep(0.01)\n"
        "time.sleep(1.0)  # the step in flight and the checkpoint\n"
        f"Path({str(saved)!r}).write_text('checkpoint')\n")
    # Python raises KeyboardInterrupt on SIGINT only if SIGINT was not ignored when it started, and a
    # test suite run as a background job starts with it ignored: install the handler a terminal's
    # foreground process has.
    build_code = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                  f"from training.make_shapes_model import run; run([sys.executable, {str(stage)!r}])")
    build = subprocess.Popen([sys.executable, "-c", build_code], cwd=ROOT, start_new_session=True,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not ready.exists():
        assert build.poll() is None and time.time() < deadline, build.stderr.read() if build.poll() is not None else "timeout"
        time.sleep(0.05)
    os.killpg(build.pid, signal.SIGINT)  # a terminal's Ctrl-C: the whole foreground group
    _, err = build.communicate(timeout=60)
    assert saved.read_text() == "checkpoint"
    assert "KeyboardInterrupt" in err  # and the build itself stops: no later stage starts


def test_make_model_sums_each_stages_wall_time_over_interrupted_sittings(tmp_path, monkeypatch):
    """build_timings.json adds a stage's time to what earlier runs of the build saved, and is written
    even when the stage is interrupted, so a build stopped and resumed states its whole wall time."""
    from training import make_shapes_model

    clock = iter([100.0, 160.5, 200.0, 230.0])
    monkeypatch.setattr(make_shapes_model.time, "time", lambda: next(clock))
    path = tmp_path / "build_timings.json"
    timings = {"vae_seconds": 5000.0}
    with pytest.raises(KeyboardInterrupt):
        with make_shapes_model.timed(timings, "dream_seconds", path):
            raise KeyboardInterrupt
    assert json.loads(path.read_text()) == {"vae_seconds": 5000.0, "dream_seconds": 60.5}
    with make_shapes_model.timed(timings, "dream_seconds", path):
        pass
    assert json.loads(path.read_text()) == {"vae_seconds": 5000.0, "dream_seconds": 90.5}


def test_a_cache_for_a_fine_tuning_recipe_reads_the_model_directorys_vae_and_t5(tiny_model_dir, tmp_path):
    """`training.cache --recipe shapes-heads` (init_from, no vae_path / t5_path) caches with the
    model directory's own VAE and T5, as the trainer would read them, instead of refusing."""
    from training.cache import extract

    recipe = get_recipe("shapes-heads").overrides([f"init_from={tiny_model_dir}", "num_workers=0"])
    assert recipe.vae_path == "" and recipe.t5_path == ""
    out = tmp_path / "cache"
    extract(recipe, out, max_samples=8, shard_size=8, batch_size=8, num_workers=0, progress=False)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["vae_path"] == str(tiny_model_dir / "vae") and meta["t5_path"] == str(tiny_model_dir / "text")
    assert CacheSource(out).read(0, False)["caption"]
