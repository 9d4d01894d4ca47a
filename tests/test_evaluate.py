"""Evaluation commands (training/evaluate) and the Shapes World table (bench/shapes_eval.py) on the
tiny random model: each command runs end to end and writes valid JSON + PNG; the probe learns what
is learnable and not what is not; the judge-based faithfulness is exact on renders; batched
generation equals the pipeline; FID errors name the missing file before any generation; the
data-parallel split covers every prompt once and gives the same images as one process."""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.data.shapes_world import Scene, ShapeObject, full_caption_bank, parse_caption, render
from dream_core.request import SamplerSettings
from dream_core.semantic_decoding import Setting
from training.evaluate import (cli, distributed, faithfulness, fid_clip, linear_probe, sad_sweep, scoring, sets,
                               zero_shot_masking)
from training.evaluate.distributed import dist_info, shard_indices
from training.evaluate.linear_probe import SHAPES_ATTRIBUTES
from training.evaluate.sets import one_object_prompts, prompt_seeds, two_object_prompts

REPO = Path(__file__).resolve().parents[1]
TINY_SAMPLER = ["--steps", "3", "--head-steps", "2", "--cfg", "2.0"]


def read_results(out: Path) -> dict:
    data = json.loads((out / "results.json").read_text())
    png = out / "plot.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as im:
        assert im.size[0] > 100 and im.size[1] > 100
    return data


scene_of = sets.scene_from_caption


# --------------------------------------------------------------------------- prompt sets and helpers


def test_eval_prompt_sets_are_fixed_fully_specified_and_distinct():
    one = one_object_prompts(500)
    assert one == one_object_prompts(500)  # seeded
    assert len(set(one)) == 500 and set(one) <= set(full_caption_bank())
    two = two_object_prompts(50)
    assert two == two_object_prompts(50)
    for text in one[:50] + two:
        spec = parse_caption(text)
        assert spec.background is not None
        assert all(o.size is not None and o.position is not None for o in spec.objects)
    assert all(len(parse_caption(t).objects) == 2 for t in two)
    assert one_object_prompts(20, seed=1) != one_object_prompts(20)
    seeds = prompt_seeds(3, 100)
    assert seeds == [100, 164, 228]  # 64 candidates per prompt never overlap


def test_scene_from_caption_round_trip():
    text = "a small red circle at the top left and a large blue square at the bottom right on a gray background"
    scene = sets.scene_from_caption(text)
    assert scene == Scene("gray", (ShapeObject("red", "circle", "small", "top left"),
                                   ShapeObject("blue", "square", "large", "bottom right")))
    with pytest.raises(ValueError, match="not fully specified"):
        sets.scene_from_caption("a red circle")


def test_vae_round_trip_gives_one_image_per_input(tiny_pipe):
    images = [render(scene_of(p)) for p in one_object_prompts(3)]
    out = scoring.vae_round_trip(tiny_pipe, images)
    assert len(out) == 3 and all(im.size == (32, 32) and im.mode == "RGB" for im in out)


def test_batched_generation_equals_the_pipeline(tiny_pipe):
    prompts = ["a small red circle at the top left on a white background", "a big green triangle on the right"]
    seeds = prompt_seeds(2, 7)
    sampler = SamplerSettings(num_inference_steps=4, guidance_scale=2.0, head_steps=3)
    settings = [Setting(1), Setting(3, 1), Setting(3, 2)]
    run = tiny_pipe.generate_batch(prompts, seeds, settings, sampler, batch_size=2)
    # The shared trunk: 3 rows per prompt up to the last decision step (2), then only the kept rows.
    kept = {(i, run.results[s].chosen[i]) for s in settings for i in range(2)}
    assert run.row_steps == 2 * 3 * 2 + len(kept) * 2
    for s in settings:
        for i, p in enumerate(prompts):
            ref = tiny_pipe(p, num_candidates=s.num_candidates, decision_step=s.decision_step, num_inference_steps=4,
                            guidance_scale=2.0, head_steps=3, seed=seeds[i])
            got = run.results[s]
            assert got.chosen[i] == ref.chosen[0]
            diff = np.abs(np.asarray(got.images[i], dtype=int) - np.asarray(ref.images[0], dtype=int)).max()
            assert diff <= 1, (s, i, diff)
            if s.num_candidates > 1:
                np.testing.assert_allclose(got.scores[i], ref.scores[0], atol=1e-5)


def test_batched_staged_sad_equals_the_pipeline_and_prunes_at_every_stage(tiny_pipe):
    """SAD in stages through the shared trunk gives what a single call gives (the same winner,
    image and each candidate's last score), with a fewer-step head sampler; alone, the staged
    setting decodes only the rows each stage keeps."""
    prompts = ["a small red circle at the top left on a white background", "a big green triangle on the right"]
    seeds = prompt_seeds(2, 9)
    sampler = SamplerSettings(num_inference_steps=6, guidance_scale=2.0, head_steps=3, head_sampler="ddim")
    staged = Setting(5, (1, 3), num_kept=(2, 1))
    assert staged.name == "SAD K=5 steps=1,3 kept=2,1" and staged.stages() == [(1, 2), (3, 1)]
    settings = [Setting(1), Setting(5, 3), staged]
    run = tiny_pipe.generate_batch(prompts, seeds, settings, sampler, batch_size=2)
    for s in settings:
        for i, p in enumerate(prompts):
            ref = tiny_pipe(p, num_candidates=s.num_candidates, decision_step=s.decision_step, num_kept=s.num_kept,
                            num_inference_steps=6, guidance_scale=2.0, head_steps=3, head_sampler="ddim",
                            seed=seeds[i])
            got = run.results[s]
            assert got.chosen[i] == ref.chosen[0], (s, i)
            diff = np.abs(np.asarray(got.images[i], dtype=int) - np.asarray(ref.images[0], dtype=int)).max()
            assert diff <= 1, (s, i, diff)
            if s.num_candidates > 1:
                np.testing.assert_allclose(got.scores[i], ref.scores[0], atol=1e-5)
    alone = tiny_pipe.generate_batch(prompts, seeds, [staged], sampler)
    assert alone.row_steps == 2 * (5 * 1 + 2 * 2 + 1 * 3)  # 5 rows to step 1, 2 rows to step 3, then 1
    assert alone.results[staged].chosen == run.results[staged].chosen


def test_staged_settings_parse_from_shares():
    from dream_core.request import decision_step_for_share

    s = cli.parse_staged("9:0.25/3,0.75/1", 16, 16)
    assert s == Setting(9, (decision_step_for_share(0.25, 16, 16), decision_step_for_share(0.75, 16, 16)),
                        num_kept=(3, 1))
    for bad in ("9", "9:", "x:0.25/3", "9:0.25", "9:0.25/x", "9:1.5/1", "9:0/1"):
        with pytest.raises(ValueError, match="--staged looks like K:share/kept"):
            cli.parse_staged(bad, 16, 16)
    with pytest.raises(ValueError, match="increasing decision steps"):
        cli.parse_staged("9:0.30/3,0.31/1", 16, 16)


def test_generation_rejects_bad_settings(tiny_pipe):
    sampler = SamplerSettings(num_inference_steps=4, head_steps=2)
    with pytest.raises(ValueError, match="decision_step"):
        tiny_pipe.generate_batch(["a red circle"], [0], [Setting(3, 4)], sampler)
    with pytest.raises(ValueError, match="external reranker"):
        tiny_pipe.generate_batch(["a red circle"], [0], [Setting(3, rerank=True)], sampler)
    with pytest.raises(ValueError, match="differ in length"):
        tiny_pipe.generate_batch(["a red circle"], [0, 1], [Setting(1)], sampler)
    with pytest.raises(ValueError, match="num_inference_steps"):
        tiny_pipe.generate_batch(["a red circle"], [0], [Setting(1)], SamplerSettings(num_inference_steps=17))


def test_write_json_is_strict(tmp_path):
    path = cli.write_json(tmp_path / "r.json", {"a": np.float32(0.5), "b": float("nan"), "c": torch.tensor([1, 2])})
    assert json.loads(path.read_text()) == {"a": 0.5, "b": None, "c": [1, 2]}


# --------------------------------------------------------------------------- linear probe


def _clusters(n: int, classes: int, dim: int, gen: torch.Generator, centres: torch.Tensor):
    y = torch.randint(0, classes, (n,), generator=gen)
    return centres[y] + torch.randn(n, dim, generator=gen), y


def test_probe_learns_separable_features_and_not_random_labels():
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 24, generator=gen) * 3 + 40  # a large offset: the BatchNorm must remove it
    tx, ty = _clusters(400, 5, 24, gen, centres)
    vx, vy = _clusters(200, 5, 24, gen, centres)
    good = linear_probe.train_probe(tx, ty, vx, vy, 5, epochs=20)
    assert good.val_acc >= 0.95 and good.train_acc >= 0.95
    assert good.history and good.history_epochs[-1] == good.epochs
    noise = linear_probe.train_probe(tx, torch.randint(0, 5, (400,), generator=gen), vx,
                                     torch.randint(0, 5, (200,), generator=gen), 5, epochs=20)
    assert noise.val_acc < 0.45  # chance is 0.2: held-out accuracy cannot come from memorising


def test_probe_streams_feature_chunks_from_disk_with_the_paper_protocol(tmp_path):
    """Features in several safetensors chunks (only one in memory at a time) train the head as well;
    the paper protocol is LARS with lr = blr x batch / 256."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 24, generator=gen) * 3 + 40
    tx, ty = _clusters(400, 5, 24, gen, centres)
    vx, vy = _clusters(200, 5, 24, gen, centres)
    files = []
    for i in range(4):
        files.append(tmp_path / f"chunk-{i}.safetensors")
        save_file({"x": tx[i * 100:(i + 1) * 100].contiguous(), "y": ty[i * 100:(i + 1) * 100].contiguous()},
                  str(files[-1]))
    train = linear_probe.FeatureChunks(files)
    assert len(train) == 400 and train.dim == 24 and train.sizes == [100] * 4
    val = linear_probe.FeatureChunks.from_tensors(vx, vy)
    res = linear_probe.train_probe(train, None, val, None, 5, protocol="paper", epochs=30)
    assert res.protocol == "paper" and res.lr == pytest.approx(0.1 * 100 / 256)  # batch capped at the chunk
    # LARS (trust 0.001) moves the head by ~1e-4 of its norm a step: 120 steps at blr 0.1 stay near chance,
    # a large blr learns the clusters (ImageNet's 225k steps are what make the default work).
    assert res.val_acc < 0.6
    res = linear_probe.train_probe(train, None, val, None, 5, protocol="paper", epochs=30, blr=20.0)
    assert res.val_acc >= 0.95 and res.lr == pytest.approx(20.0 * 100 / 256)
    with pytest.raises(ValueError, match="protocol must be one of"):
        linear_probe.train_probe(tx, ty, vx, vy, protocol="sgd")


def test_linear_probe_cli_writes_feature_chunks(tiny_model_dir, tmp_path):
    _image_folder(tmp_path / "data")
    out = tmp_path / "probe"
    linear_probe.main(["--model", str(tiny_model_dir), "--out", str(out), "--device", "cpu", "--data",
                       str(tmp_path / "data"), "--epochs", "3", "--chunk-size", "5", "--protocol", "paper"])
    data = read_results(out)
    assert sorted(p.name for p in (out / "features" / "train").iterdir()) == [f"chunk-0000{i}.safetensors" for i in range(3)]
    assert data["data"]["train_images"] == 12 and data["data"]["feature_chunks"] == 3 + 3  # 12 + 12 rows, 5 a file
    assert data["probes"]["label"]["protocol"] == "paper"


def test_probe_rejects_bad_inputs():
    x, y = torch.randn(10, 4), torch.zeros(10, dtype=torch.long)
    with pytest.raises(ValueError, match="same D"):
        linear_probe.train_probe(x, y, torch.randn(5, 3), y[:5])
    with pytest.raises(ValueError, match="differ in length"):
        linear_probe.train_probe(x, y[:9], x, y)


def test_encoder_features_are_deterministic(tiny_pipe):
    images = [render(scene_of("a large red circle at the center on a white background")),
              render(scene_of("a small blue square at the top left on a black background"))]
    a = linear_probe.encoder_features(tiny_pipe, images)
    b = linear_probe.encoder_features(tiny_pipe, images[::-1])
    assert a.shape == (2, tiny_pipe.config.width)
    torch.testing.assert_close(a, b.flip(0), atol=1e-5, rtol=1e-5)  # VAE mean, no sampling
    assert not torch.allclose(a[0], a[1])
    c = tiny_pipe.config
    assert linear_probe.encoder_features(tiny_pipe, images, pool="concat").shape == (2, c.seq_len * c.width)
    buf = linear_probe.encoder_features(tiny_pipe, images, pool="buffer")
    img = linear_probe.encoder_features(tiny_pipe, images, pool="image")
    # `all` is the token-count-weighted mean of the buffer and image means.
    torch.testing.assert_close(a, (c.buffer_size * buf + c.seq_len * img) / (c.buffer_size + c.seq_len),
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="pool must be one of"):
        linear_probe.encoder_features(tiny_pipe, images, pool="cls")


def test_linear_probe_cli_shapes(tiny_model_dir, tmp_path):
    out = tmp_path / "probe"
    res = linear_probe.main(["--model", str(tiny_model_dir), "--out", str(out), "--device", "cpu", "--shapes",
                             "--quick", "--n-train", "40", "--n-val", "20"])
    data = read_results(out)
    assert set(data["probes"]) == {"shape", "color"} == set(res["probes"])
    for r in data["probes"].values():
        assert 0.0 <= r["val_acc"] <= 1.0 and len(r["history"]) == len(r["history_epochs"])
    assert data["data"] == {"source": "shapes", "n_train": 40, "n_val": 20, "seed": sets.EVAL_SEED}


def _image_folder(root: Path, per_class: int = 6) -> None:
    rng = np.random.default_rng(3)
    for split in ("train", "val"):
        for name, caption in (("circles", "a large red circle at the center on a white background"),
                              ("squares", "a large blue square at the center on a black background")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                render(scene_of(caption), rng).save(folder / f"{i}.png")
    (root / "train" / "circles" / "broken.png").write_bytes(b"not a png")


def test_linear_probe_cli_image_folder(tiny_model_dir, tmp_path):
    _image_folder(tmp_path / "data")
    out = tmp_path / "probe"
    linear_probe.main(["--model", str(tiny_model_dir), "--out", str(out), "--device", "cpu",
                       "--data", str(tmp_path / "data"), "--epochs", "5"])
    data = read_results(out)
    assert data["data"]["classes"] == ["circles", "squares"]
    assert data["data"]["unreadable"] == 1 and data["data"]["train_images"] == 12
    assert 0.0 <= data["probes"]["label"]["val_acc"] <= 1.0


def test_linear_probe_folder_errors(tiny_model_dir, tmp_path):
    _image_folder(tmp_path / "data")
    (tmp_path / "data" / "val" / "squares").rename(tmp_path / "data" / "val" / "triangles")
    with pytest.raises(ValueError, match="expected"):
        linear_probe.main(["--model", str(tiny_model_dir), "--out", str(tmp_path / "o"), "--device", "cpu",
                           "--data", str(tmp_path / "data")])
    with pytest.raises(ValueError, match="does not exist"):
        linear_probe.main(["--model", str(tiny_model_dir), "--out", str(tmp_path / "o"), "--device", "cpu",
                           "--data", str(tmp_path / "nowhere")])


# --------------------------------------------------------------------------- zero-shot under masking


def test_zero_shot_masking_cli_shapes(tiny_model_dir, tmp_path):
    out = tmp_path / "zs"
    zero_shot_masking.main(["--model", str(tiny_model_dir), "--out", str(out), "--device", "cpu", "--shapes",
                            "--n-images", "12", "--ratios", "0,0.5,0.9"])
    data = read_results(out)
    assert data["ratios"] == [0.0, 0.5, 0.9]
    assert set(data["accuracy"]) == {"shape", "color", "position"}
    assert all(len(v) == 3 and all(0 <= a <= 1 for a in v) for v in data["accuracy"].values())
    assert data["chance"] == {"shape": 0.2, "color": 0.125, "position": 1 / 9}


def test_zero_shot_masking_rejects_full_mask(tiny_pipe):
    tokens = torch.zeros(2, tiny_pipe.config.seq_len, tiny_pipe.config.token_dim)
    with pytest.raises(ValueError, match="mask ratios"):
        zero_shot_masking.accuracy_vs_mask_ratio(tiny_pipe, tokens, {}, {}, [1.0])


# --------------------------------------------------------------------------- faithfulness


def test_faithfulness_of_renders_is_perfect():
    prompts = one_object_prompts(120) + two_object_prompts(80)
    rng = np.random.default_rng(11)
    images = [render(scene_of(p), rng) for p in prompts]  # jittered renders of the world itself
    report = faithfulness.judge_images(images, prompts)
    assert report.rate == 1.0 and report.faithful == 200
    assert all(v == 0 for v in report.failures.values())


def test_failure_breakdown_names_the_wrong_attribute():
    image = render(scene_of("a small red circle at the top left on a white background"))
    cases = {
        "a small red square at the top left on a white background": "shape",
        "a large red circle at the top left on a white background": "size",
        "a small red circle at the bottom right on a white background": "position",
        "a small blue circle at the top left on a white background": "color",
        "a small red circle at the top left on a black background": "background",
        "a small red circle at the top left and a blue square at the bottom right": "count",
    }
    report = faithfulness.judge_images([image] * len(cases), list(cases))
    assert report.faithful == 0
    assert report.failures == {k: 1 for k in faithfulness.FAILURE_KINDS}
    two = faithfulness.classify_failure("red object: shape circle != square, position top left != left")
    assert two == ["shape", "position"]
    assert faithfulness.classify_failure("something else") == ["other"]


def test_setting_from_args_resolves_and_checks_the_decision_step(tiny_model_dir):
    pipe = cli.load_pipeline(tiny_model_dir, "cpu")
    sampler = SamplerSettings(3, 2.0, head_steps=2)
    ns = lambda k, step: argparse.Namespace(k=k, decision_step=step)  # noqa: E731
    assert cli.setting_from_args(ns(1, 2), pipe, sampler) == Setting(1)
    assert cli.setting_from_args(ns(2, 1), pipe, sampler) == Setting(2, 1)
    default = sampler.request("x", 2).validate(pipe.config).decision_step
    assert cli.setting_from_args(ns(2, None), pipe, sampler) == Setting(2, default)
    with pytest.raises(ValueError, match="decision_step"):
        cli.setting_from_args(ns(2, 3), pipe, sampler)  # the last of 3 steps decides nothing


def test_faithfulness_cli(tiny_model_dir, tmp_path):
    out = tmp_path / "faith"
    res = faithfulness.main(["--model", str(tiny_model_dir), "--out", str(out), "--device", "cpu", "--quick",
                             "--k", "2", "--decision-step", "1", *TINY_SAMPLER])
    data = read_results(out)
    assert data["setting"] == "SAD K=2 step=1" == res["setting"]
    for key in ("1-object", "2-object"):
        s = data["sets"][key]
        assert s["n"] == 8 and s["faithful"] == round(s["rate"] * 8)
        assert (out / f"samples_{key}.png").exists()


# --------------------------------------------------------------------------- SAD sweep


def test_sad_sweep_cli(tiny_model_dir, tmp_path):
    out = tmp_path / "sad"
    sad_sweep.main(["--model", str(tiny_model_dir), "--out", str(out), "--device", "cpu", "--quick", "--objects", "1",
                    "--k", "1,2", "--decision-steps", "1,2", "--timing-prompts", "2", *TINY_SAMPLER,
                    "--reranker-model", str(tiny_model_dir)])
    data = read_results(out)
    # Both models the sweep measured are fingerprinted: the generator and the reranker.
    assert [m["path"] for m in data["meta"]["models"]] == [str(tiny_model_dir)] * 2
    assert [r["setting"] for r in data["rows"]][:3] == ["K=1", "SAD K=2 step=1", "SAD K=2 step=2"]
    for r in data["rows"]:
        assert 0 <= r["faithfulness"] <= 1 and r["seconds_per_image"] > 0
    # Cost per image: K = 1 decodes 3 steps; SAD K=2 at step d decodes 2 rows for d steps, then 1.
    assert [r["row_steps_per_image"] for r in data["rows"]][:3] == [3, 4, 5]


def test_sad_sweep_measures_staged_sad_and_a_head_sampler(tiny_model_dir, tmp_path):
    from dream_core.request import decision_step_for_share

    out = tmp_path / "staged"
    sad_sweep.main(["--model", str(tiny_model_dir), "--out", str(out), "--device", "cpu", "--quick", "--objects", "1",
                    "--k", "1", "--decision-steps", "1", "--staged", "3:0.1/2,0.6/1", "--timing-prompts", "2",
                    "--steps", "4", "--head-steps", "2", "--head-sampler", "dpm-solver++"])
    data = read_results(out)
    assert data["meta"]["args"]["head_sampler"] == "dpm-solver++"
    staged = data["rows"][-1]
    d1, d2 = decision_step_for_share(0.1, 4, 16), decision_step_for_share(0.6, 4, 16)
    assert staged["setting"] == f"SAD K=3 steps={d1},{d2} kept=2,1" and staged["num_kept"] == [2, 1]
    assert [st["decision_step"] for st in staged["stages"]] == staged["decision_step"] == [d1, d2]
    assert staged["row_steps_per_image"] == 3 * d1 + 2 * (d2 - d1) + (4 - d2)


def test_sad_sweep_missing_reranker_weights(tiny_model_dir, tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(ValueError, match="nope.safetensors"):
        sad_sweep.main(["--model", str(tiny_model_dir), "--out", str(tmp_path / "o"), "--device", "cpu",
                        "--reranker-arch", "ViT-B-32", "--reranker-weights", str(missing)])
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- FID / CLIP score


def test_fid_missing_weights_named_before_generation(tiny_model_dir, tmp_path, monkeypatch):
    def no_generation(*args, **kwargs):
        raise AssertionError("generation must not start")

    monkeypatch.setattr(fid_clip, "generate_shard", no_generation)
    base = ["--model", str(tiny_model_dir), "--out", str(tmp_path / "fid"), "--device", "cpu", "--shapes",
            "--num-images", "4"]
    missing = tmp_path / "pt_inception-2015-12-05.pth"
    with pytest.raises(ValueError, match="pt_inception-2015-12-05.pth"):
        fid_clip.main(base + ["--inception-weights", str(missing)])
    with pytest.raises(ValueError, match="clip_b32.safetensors"):
        fid_clip.main(base + ["--clip-arch", "ViT-B-32", "--clip-weights", str(tmp_path / "clip_b32.safetensors")])
    with pytest.raises(ValueError, match="nothing to measure"):
        fid_clip.main(base)
    with pytest.raises(ValueError, match="Inception weights file not found"):
        fid_clip.load_state_dict_file(missing)
    assert not (tmp_path / "fid").exists()


def test_fid_rejects_a_wrong_weights_file_without_unpickling(tmp_path):
    from safetensors.torch import save_file

    bogus = tmp_path / "inception.safetensors"
    save_file({"x": torch.zeros(2)}, str(bogus))
    load = torch.load
    with pytest.raises(ValueError, match="does not hold torch-fidelity's Inception-v3 weights"):
        fid_clip.build_fid(bogus)
    assert torch.load is load  # the temporary hand-over of the state dict is always undone
    pickled = tmp_path / "inception.pth"
    pickled.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(ValueError, match="not a tensors-only state dict"):
        fid_clip.load_state_dict_file(pickled)


def test_dist_info_and_strided_split():
    assert dist_info({}) == distributed.DistInfo(0, 1, 0)
    assert dist_info({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == distributed.DistInfo(3, 4, 1)
    with pytest.raises(ValueError, match="RANK"):
        dist_info({"RANK": "4", "WORLD_SIZE": "4"})
    n, world = 50_003, 8
    shares = [shard_indices(n, r, world) for r in range(world)]
    assert sorted(i for s in shares for i in s) == list(range(n))  # every prompt exactly once
    assert max(map(len, shares)) - min(map(len, shares)) <= 1  # balanced
    assert shares[3][:3] == [3, 11, 19]
    with pytest.raises(ValueError, match="rank"):
        shard_indices(10, 2, 2)


def test_data_parallel_generation_matches_one_process(tiny_pipe, tmp_path):
    prompts = one_object_prompts(5)
    seeds = prompt_seeds(5, 3)
    sampler = SamplerSettings(num_inference_steps=3, guidance_scale=2.0, head_steps=2)
    one, two = tmp_path / "one", tmp_path / "two"
    assert fid_clip.generate_shard(tiny_pipe, prompts, seeds, shard_indices(5, 0, 1), one, Setting(1), sampler) == 5
    written = [fid_clip.generate_shard(tiny_pipe, prompts, seeds, shard_indices(5, r, 2), two, Setting(1), sampler,
                                       batch_size=2) for r in (0, 1)]
    assert written == [3, 2]
    assert sorted(p.name for p in two.iterdir()) == [f"{i:06d}.png" for i in range(5)]
    for i in range(5):
        a = np.asarray(Image.open(fid_clip.sample_path(one, i)), dtype=int)
        b = np.asarray(Image.open(fid_clip.sample_path(two, i)), dtype=int)
        assert np.abs(a - b).max() <= 1
    # A rerun (after a kill) keeps what exists and generates nothing.
    assert fid_clip.generate_shard(tiny_pipe, prompts, seeds, shard_indices(5, 1, 2), two, Setting(1), sampler) == 0


# --------------------------------------------------------------------------- bench/shapes_eval.py


def _bench_module():
    return importlib.import_module("bench.shapes_eval")


def test_shapes_eval_bench_quick(tiny_model_dir, tmp_path, capsys):
    bench = _bench_module()
    out = tmp_path / "table.json"
    res = bench.main(["--model", str(tiny_model_dir), "--device", "cpu", "--quick", "--n-prompts", "3",
                      "--search-n", "6", "--probe-train", "20", "--probe-val", "10", "--steps", "4",
                      "--head-steps", "2", "--json", str(out), "--compare", f"tiny={tiny_model_dir}",
                      "--compare-n-prompts", "2"])
    data = json.loads(out.read_text())
    main = data["main"]
    assert main["settings"]["sad_steps"] == {"sad": 2, "sad_half": 3}  # 4 steps of 16 tokens: 25 % and 50 % decided
    assert set(main["1-object"]["settings"]) == {"K=1", "sad", "sad_half"}
    assert main["1-object"]["vae_ceiling"]["n"] == 3 and 0 <= main["2-object"]["vae_ceiling"]["rate"] <= 1
    for sec in (main["1-object"], main["2-object"]):  # SAD's paired gain over K = 1 on the same prompts
        k1, sad = sec["settings"]["K=1"], sec["settings"]["sad"]
        assert k1["gain_over_k1"] is None and sad["gain_over_k1"]["n"] == 3
        assert sad["gain_over_k1"]["difference"] == pytest.approx(sad["rate"] - k1["rate"])
    assert main["2-object"]["n"] == 3 and main["search"]["n"] == 6 and main["search"]["bank_size"] == 2160
    assert 0 <= main["search"]["top1"] <= main["search"]["top5"] <= 1
    assert set(data["compare"]["tiny"]) >= {"1-object", "2-object", "probe"}
    printed = capsys.readouterr().out
    assert "| 3 | reverse search top-1 |" in printed and "| tiny |" in printed and "ceiling" in printed
    assert "over K = 1, paired |" in printed
    assert res["main"]["probe"]["shape"]["val_acc"] == main["probe"]["shape"]["val_acc"]


def test_shapes_eval_bench_reads_the_models_sampler_defaults_and_probes_its_own_pooling(tiny_model_dir, tmp_path,
                                                                                        capsys):
    from safetensors.torch import load_file, save_file

    from dream_core import DreamConfig, DreamModel

    model_dir = tmp_path / "attention"
    shutil.copytree(tiny_model_dir, model_dir)
    config = DreamConfig.load(model_dir / "config.json").replace(
        clip_pooling="attention", default_guidance_scale=1.0, default_temperature=0.5)
    config.save(model_dir / "config.json")
    model = DreamModel(config)
    model.load_state_dict(load_file(str(model_dir / "model.safetensors")), strict=False)  # + a fresh pooler
    save_file(model.state_dict(), str(model_dir / "model.safetensors"))
    res = _bench_module().main(["--model", str(model_dir), "--device", "cpu", "--quick", "--n-prompts", "2",
                                "--probe-train", "20", "--probe-val", "10", "--steps", "4", "--head-steps", "2",
                                "--sections", "1,4"])["main"]
    assert (res["settings"]["cfg"], res["settings"]["temperature"]) == (1.0, 0.5)
    probe = res["probe"]
    assert set(probe["joint_pooling"]) == set(SHAPES_ATTRIBUTES) and set(SHAPES_ATTRIBUTES) <= set(probe)
    assert "shape (val; train), the joint space's attention pooling" in capsys.readouterr().out


def test_shapes_eval_bench_rejects_bad_compare(tiny_model_dir, tmp_path):
    bench = _bench_module()
    with pytest.raises(ValueError, match="NAME=DIR"):
        bench.main(["--model", str(tiny_model_dir), "--compare", "oops"])
    with pytest.raises(ValueError, match="does not exist"):
        bench.main(["--model", str(tiny_model_dir), "--compare", f"x={tmp_path / 'missing'}"])


def test_converged_probe_fits_separable_features_exactly():
    """The L-BFGS probe is solved to convergence: linearly separable classes are fitted 100 %
    (the SGD head of the same features stops short on small sets), and held-out points follow."""
    from training.evaluate.linear_probe import fit_probe

    g = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 32, generator=g) * 3
    y = torch.arange(5).repeat(40)
    x = centers[y] + 0.5 * torch.randn(200, 32, generator=g)
    yv = torch.arange(5).repeat(10)
    xv = centers[yv] + 0.5 * torch.randn(50, 32, generator=g)
    r = fit_probe(x, y, xv, yv, 5)
    assert r.train_acc == 1.0 and r.val_acc == 1.0
    with pytest.raises(ValueError, match="differ in length"):
        fit_probe(x, y[:10], xv, yv)


# --------------------------------------------------------------------------- bench/sad_bank_normalised.py


def _sad_bank_module():
    return importlib.import_module("bench.sad_bank_normalised")


def test_bank_normalised_score_prefers_the_candidate_no_other_caption_fits():
    """Candidate 0 is closer to the prompt by raw cosine (0.8 against 0.70) but almost as close to
    another caption (0.6); candidate 1 is far from every other caption: the cosine picks 0, log
    P(prompt | image) over the bank picks 1. Only candidate 1 is faithful."""
    bench = _sad_bank_module()
    text = torch.tensor([[1.0, 0.0, 0.0]])
    bank = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    emb = torch.nn.functional.normalize(torch.tensor([[[0.8, 0.6, 0.0], [0.7, -0.5, -0.5]]]), dim=-1)
    rates = bench.pick_rates(emb, text, bank, scale=10.0, verdicts=torch.tensor([[0.0, 1.0]]))
    assert rates == {"cosine": 0.0, "bank_normalised": 1.0}


def test_sad_bank_normalised_bench_runs_on_a_tiny_model(tiny_model_dir, tmp_path):
    bench = _sad_bank_module()
    out = tmp_path / "sbn.json"
    res = bench.main(["--model", str(tiny_model_dir), "--n", "2", "--k", "2", "--decision-steps", "1",
                      "--batch-size", "2", "--threads", "1", "--json", str(out)])
    assert json.loads(out.read_text())["picks"] == res["picks"]
    assert set(res["picks"]) == {"decision step 1", "finished images"}
    for row in res["picks"].values():
        for rate in row.values():
            assert res["best_of_k"] >= rate >= 0.0
    with pytest.raises(SystemExit, match="--k must"):
        bench.main(["--model", str(tiny_model_dir), "--k", "1"])


def _emoji_eval_file(path: Path, verdicts: dict[str, str], digest: str = "d1", weights: str = "w") -> Path:
    split = {"n": len(next(iter(verdicts.values()))), "prompts_digest": digest, "verdicts": verdicts}
    path.write_text(json.dumps({"weights": weights, "generation": {"steps": 16, "seen": split}}))
    return path


def test_emoji_eval_pairs_two_models_verdicts_on_the_same_prompts(tmp_path):
    from bench import emoji_eval

    base = emoji_eval.read_baseline(_emoji_eval_file(tmp_path / "base.json", {"k1": "0011", "sad": "0111"}))
    mine = {"steps": 16, "seen": {"n": 4, "prompts_digest": "d1", "verdicts": {"k1": "1011", "sad": "0111"}}}
    out = emoji_eval.compare_to_baseline(mine, base, tmp_path / "base.json")
    assert out["weights"] == "w" and set(out["differences"]) == {"seen_k1", "seen_sad"}
    k1 = out["differences"]["seen_k1"]
    assert k1["difference"] == pytest.approx(0.25) and (k1["first_only"], k1["second_only"]) == (1, 0)
    assert out["differences"]["seen_sad"]["difference"] == 0.0
    assert emoji_eval.prompts_digest(["a"], [1]) != emoji_eval.prompts_digest(["a"], [2])


def test_emoji_eval_pairs_two_measured_files_without_a_model(tmp_path, capsys):
    from bench import emoji_eval

    old = _emoji_eval_file(tmp_path / "old.json", {"k1": "0011"})
    new = _emoji_eval_file(tmp_path / "new.json", {"k1": "1111"})
    emoji_eval.main(["--paired", str(new), str(old), "--model", str(tmp_path / "no-model")])
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"generation seen_k1, {new} minus {old}: ") and "+50.0" in line
    with pytest.raises(SystemExit, match="--paired .*missing.json: no such file"):
        emoji_eval.main(["--paired", str(new), str(tmp_path / "missing.json")])
    other = _emoji_eval_file(tmp_path / "other.json", {"k1": "0011"}, digest="d2")
    with pytest.raises(SystemExit, match="--paired .*other.json: its seen prompts or seeds differ"):
        emoji_eval.main(["--paired", str(new), str(other)])


def test_emoji_eval_checks_its_decoding_steps_against_the_model(tiny_model_dir, tmp_path, capsys):
    """--steps is checked as a request's num_inference_steps, before any data is read."""
    from bench import emoji_eval

    for bad in ("17", "0"):  # the tiny model has 16 tokens
        with pytest.raises(SystemExit):
            emoji_eval.main(["--model", str(tiny_model_dir), "--data", str(tmp_path / "no-data"),
                             "--sections", "generation", "--steps", bad])
        assert f"--steps: num_inference_steps must be between 1 and 16, got {bad}" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # SAD's K = 9 needs a decision step before the last
        emoji_eval.main(["--model", str(tiny_model_dir), "--data", str(tmp_path / "no-data"), "--steps", "1"])
    assert "--steps: with more than one candidate, num_inference_steps must be at least 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a bad K is named as --candidates, not as the steps
        emoji_eval.main(["--model", str(tiny_model_dir), "--candidates", "65"])
    assert "--candidates must be between 1 and 64, got 65" in capsys.readouterr().err


def test_emoji_eval_refuses_a_baseline_it_cannot_pair(tmp_path):
    from bench import emoji_eval

    old = tmp_path / "old.json"
    old.write_text(json.dumps({"generation": {"seen": {"n": 4, "k1": {}}}}))
    with pytest.raises(SystemExit, match="stores no per-prompt verdicts"):
        emoji_eval.read_baseline(old)
    with pytest.raises(SystemExit, match="no such file"):
        emoji_eval.read_baseline(tmp_path / "missing.json")
    base = emoji_eval.read_baseline(_emoji_eval_file(tmp_path / "base.json", {"k1": "0011"}, digest="other"))
    mine = {"seen": {"n": 4, "prompts_digest": "d1", "verdicts": {"k1": "1011"}}}
    with pytest.raises(SystemExit, match="seen prompts or seeds differ"):
        emoji_eval.compare_to_baseline(mine, base, tmp_path / "base.json")


def test_nearest_ranks_by_cosine_and_by_distance():
    from bench.emoji_eval import judge_ranks, nearest_ranks

    gallery = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 3.0]])
    queries = torch.tensor([[2.0, 0.1], [2.0, 0.1], [0.0, 4.0]])
    # cosine: query 0 points along row 0 (rank 1), query 1 asks for row 2 (behind row 0), query 2 for row 1
    assert nearest_ranks(queries, gallery, np.array([0, 2, 1]), "cosine").tolist() == [1, 2, 1]
    # L2: [0, 4] is nearest [0, 1] (3.0), then [3, 3] (3.16), then [1, 0] (4.1)
    assert nearest_ranks(queries[2:], gallery, np.array([0]), "l2").tolist() == [3]
    with pytest.raises(ValueError, match="metric must be cosine or l2"):
        nearest_ranks(queries, gallery, np.array([0, 0, 0]), "dot")
    white, black = np.full((1, 64, 64, 3), 255, np.uint8), np.zeros((1, 64, 64, 3), np.uint8)
    from bench.emoji_eval import thumbs
    refs = thumbs(np.concatenate([white, black]))
    assert judge_ranks(black, np.array([1]), refs).tolist() == [1]
    assert judge_ranks(black, np.array([0]), refs).tolist() == [2]
