"""The paper-table commands (bench/paper_*.py) on tiny random models: the settings they build, the
network evaluations they count (against what `generate_batch` actually runs), the DREAM-directory
reranker, zero-shot position labels, the Table 4 driver's resume, and their error messages."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dream_core.fingerprint import model_fingerprint
from dream_core.request import SamplerSettings
from dream_core.rerankers import DreamReranker
from dream_core.semantic_decoding import Setting, rank_candidates
from training.evaluate.sets import one_object_prompts, prompt_seeds
from training.evaluate.sad_sweep import decision_steps_for_shares
from training.evaluate.stats import format_rate, rate_with_interval, wilson_interval

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]
TINY_SAMPLER = ["--steps", "4", "--head-steps", "2", "--cfg", "2.0"]


def bench_module(name: str):
    return importlib.import_module(f"bench.{name}")


def read_out(out: Path) -> dict:
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return json.loads((out / "results.json").read_text())


# --------------------------------------------------------------------------- intervals


def test_wilson_interval_known_values_and_errors():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(50, 100)
    assert (lo, hi) == (pytest.approx(0.4038, abs=1e-4), pytest.approx(0.5962, abs=1e-4))
    assert rate_with_interval(3, 4)["rate"] == 0.75 and wilson_interval(7, 7)[1] == 1.0
    assert format_rate(rate_with_interval(50, 100)) == "50.0 % [40.4, 59.6]"
    with pytest.raises(ValueError, match="n must be >= 1"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(5, 4)


def test_paired_difference_newcombe_interval():
    from training.evaluate.stats import compare_paired, format_difference, paired_difference

    # 40 both, 8 first only, 2 second only, 10 neither: +10 points, yet only 10 discordant pairs
    # (McNemar's exact p = 0.11), so the interval holds 0.
    first = [True] * 48 + [False] * 12
    second = [True] * 40 + [False] * 8 + [True] * 2 + [False] * 10
    e = paired_difference(first, second)
    assert (e["first_only"], e["second_only"], e["n"]) == (8, 2, 60)
    assert e["difference"] == pytest.approx(0.1)
    assert e["ci95"] == [pytest.approx(-0.006378, abs=1e-6), pytest.approx(0.206571, abs=1e-6)]
    assert format_difference(e) == "+10.0 pts [-0.6, +20.7]"
    assert compare_paired("SAD", "K=1", e) == \
        "SAD vs K=1: +10.0 pts [-0.6, +20.7], no difference within noise (the paired interval holds 0)"
    # Swapping the two negates the difference and mirrors the interval.
    back = paired_difference(second, first)
    assert back["difference"] == pytest.approx(-0.1)
    assert back["ci95"] == [pytest.approx(-0.206571, abs=1e-6), pytest.approx(0.006378, abs=1e-6)]
    # Many pairs: the interval tightens to the normal one on the per-pair differences.
    rng = np.random.default_rng(0)
    x = rng.random(20000) < 0.8
    y = np.where(rng.random(20000) < 0.9, x, ~x)
    big = paired_difference(x.tolist(), y.tolist())
    diffs = x.astype(float) - y.astype(float)
    half = 1.96 * diffs.std() / np.sqrt(len(diffs))
    assert big["ci95"] == [pytest.approx(diffs.mean() - half, abs=5e-4), pytest.approx(diffs.mean() + half, abs=5e-4)]
    assert compare_paired("A", "B", big).startswith(f"A beats B by {100 * diffs.mean():.1f} points (paired 95 %")
    with pytest.raises(ValueError, match="same length"):
        paired_difference([True], [True, False])
    with pytest.raises(ValueError, match="at least one pair"):
        paired_difference([], [])


# --------------------------------------------------------------------------- Table 17


def test_budget_settings_decide_at_budget_over_k():
    t17 = bench_module("paper_table17")
    settings = t17.budget_settings([1, 2, 4, 9, 16], 64, 64)
    assert [(s.num_candidates, s.decision_step) for s in settings] == [(1, None), (2, 32), (4, 16), (9, 7), (16, 4)]
    assert t17.nfe_per_image(Setting(9, 7), 64) == 9 * 7 + 57
    assert t17.nfe_per_image(Setting(9, rerank=True), 64) == 9 * 64
    assert t17.nfe_per_image(Setting(1), 64) == 64
    with pytest.raises(ValueError, match=r"--budget 8 gives K=16 the decision step 0 .*use a budget in 16\.\.1008"):
        t17.budget_settings([1, 16], 8, 64)
    with pytest.raises(ValueError, match="decision step 4 .* must be in 1..3"):
        t17.budget_settings([2], 8, 4)
    # The paper's numbers: 128 NFE in all with 64 steps gives K = 9 the decision at step 8, K = 17 at 4.
    total = t17.budget_settings([1, 5, 9, 17], 128, 64, "total-nfe")
    assert [s.decision_step for s in total] == [None, 16, 8, 4]
    assert all(t17.nfe_per_image(s, 64) == 128 for s in total[1:])
    assert t17.nfe_per_image(Setting(2, rerank=True), 64) == 128
    with pytest.raises(ValueError, match=r"\(budget - S\) // \(K - 1\).*use a budget in 72..568"):
        t17.budget_settings([9], 64, 64, "total-nfe")


def test_nfe_formula_equals_the_row_steps_generate_batch_runs(tiny_pipe):
    t17 = bench_module("paper_table17")
    prompts = one_object_prompts(3, seed=5)
    seeds = prompt_seeds(3, 7)
    sampler = SamplerSettings(num_inference_steps=4, guidance_scale=2.0, head_steps=2)
    reranker = DreamReranker(tiny_pipe.path, "cpu")
    for s in t17.budget_settings([1, 2, 3], 4, 4) + [Setting(2, rerank=True)]:
        run = tiny_pipe.generate_batch(prompts, seeds, [s], sampler, reranker=reranker)
        assert run.row_steps == 3 * t17.nfe_per_image(s, 4), s.name


def test_dream_reranker_scores_with_the_directory_joint_space(tiny_pipe, tiny_model_dir):
    """The score is the cosine of the directory's own image embedding (VAE -> encoder, nothing
    masked) and text embedding; given a caption that matches image A better than B (by that joint
    space), the reranker keeps A, in either order, and generate_batch keeps its argmax."""
    from dream_core.pipeline import image_to_tensor

    reranker = DreamReranker(tiny_model_dir, "cpu")
    rng = np.random.default_rng(0)
    a = Image.fromarray(np.full((32, 32, 3), (220, 30, 30), dtype=np.uint8))
    b = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    pipe = reranker.pipe
    with torch.inference_mode():
        x = torch.cat([image_to_tensor(im, pipe.config.image_size) for im in (a, b)])
        tokens = pipe.image_tokenizer.encode(x, sample=False)
        img = pipe.model.encode_image(tokens, torch.zeros(2, pipe.config.seq_len, dtype=torch.bool))
    captions = one_object_prompts(60, seed=3)
    txt = pipe.embed_texts(captions)
    margin = (txt @ img[0]) - (txt @ img[1])  # how much more each caption matches A than B
    for caption, want in ((captions[int(margin.argmax())], 0), (captions[int(margin.argmin())], 1)):
        scores = reranker.scores([a, b], caption)
        assert torch.allclose(scores, img @ pipe.embed_texts([caption])[0], atol=1e-5)
        assert rank_candidates(scores)[0] == want
        assert rank_candidates(reranker.scores([b, a], caption))[0] == 1 - want
    # Through generate_batch: the kept candidate is the reranker's best of the finished K.
    sampler = SamplerSettings(num_inference_steps=3, guidance_scale=1.0, head_steps=2)
    s = Setting(3, rerank=True)
    run = tiny_pipe.generate_batch(captions[:2], prompt_seeds(2, 11), [s, Setting(1)], sampler, reranker=reranker)
    for p in range(2):
        sc = run.results[s].scores[p]
        assert run.results[s].chosen[p] == int(np.argmax(sc)) and len(sc) == 3


def test_pipeline_rejects_a_reranker_without_scores(tiny_pipe):
    sampler = SamplerSettings(num_inference_steps=3, head_steps=2)
    with pytest.raises(ValueError, match=r"reranker must have a scores\(images, prompt\) method"):
        tiny_pipe.generate_batch(["a red circle"], [0], [Setting(2, rerank=True)], sampler, reranker=object())


def test_table17_cli_end_to_end(tiny_model_dir, tmp_path, capsys):
    t17 = bench_module("paper_table17")
    out = tmp_path / "t17"
    argv = ["--model", str(tiny_model_dir), "--out", str(out), "--device", "cpu", "--k", "1,2,4", "--budget", "4",
            "--objects", "1", "--n-prompts", "2", "--timing-prompts", "1", "--reranker-model", str(tiny_model_dir),
            *TINY_SAMPLER]
    t17.main(argv)
    data = read_out(out)
    assert data["command"].startswith("python -m bench.paper_table17 --model ")
    assert data["reranker"] == {"kind": "dream", "model": str(tiny_model_dir)} and data["model"] == str(tiny_model_dir)
    # The weights of both models it measured: the generator's and the reranker's
    record = {"path": str(tiny_model_dir), "fingerprint": model_fingerprint(tiny_model_dir)}
    assert data["meta"]["models"] == [record, record]
    got = [(r["setting"], r["decision_step"], r["nfe_per_image"], r["row_steps_per_image"]) for r in data["rows"]]
    assert got == [("K=1", None, 4, 4), ("SAD K=2 step=2", 2, 6, 6), ("SAD K=4 step=1", 1, 7, 7),
                   ("K=2 external reranker", None, 8, 8), ("K=4 external reranker", None, 16, 16)]
    for r in data["rows"]:
        f = r["faithfulness"]
        assert f["n"] == 2 and f["ci95"][0] <= f["rate"] <= f["ci95"][1] and r["images_per_second"] > 0
    assert [f.split(" K=")[0] for f in data["findings"]] == ["1-object: SAD", "1-object: external reranker"]
    printed = capsys.readouterr().out
    assert "| 1-object | 4 | SAD | 1 (" in printed and "| 1-object | 4 | external reranker | - | 16 (16) |" in printed


def test_table17_errors_before_generation(tiny_model_dir, tmp_path):
    t17 = bench_module("paper_table17")
    base = ["--model", str(tiny_model_dir), "--out", str(tmp_path / "o"), "--device", "cpu", "--k", "1,2",
            *TINY_SAMPLER]
    with pytest.raises(ValueError, match="--reranker-model .* is not a model directory"):
        t17.main(base + ["--reranker-model", str(tmp_path / "missing")])
    with pytest.raises(ValueError, match="name two rerankers"):
        t17.main(base + ["--reranker-model", str(tiny_model_dir), "--reranker-arch", "ViT-B-32"])
    with pytest.raises(ValueError, match="--budget 2 gives K=4"):
        t17.main(base + ["--k", "1,4", "--budget", "2"])
    with pytest.raises(ValueError, match="--k must be a comma-separated list of integers"):
        t17.main(base + ["--k", "one"])
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- the decision-step curve


def test_critic_stats_on_a_constructed_case():
    from training.evaluate.critic import critic_stats

    verdicts = [[1, 0, 0], [0, 0, 0], [1, 1, 0], [0, 1, 0]]
    scores = [[0.9, 0.1, 0.2], [0.5, 0.4, 0.3], [0.1, 0.2, 0.9], [0.3, 0.5, 0.1]]
    chosen = [0, 0, 2, 0]
    s = critic_stats(verdicts, scores, chosen)
    assert (s["sad_faithful"], s["best_of_k_faithful"], s["prompts_with_mixed_candidates"]) == (1, 3, 3)
    assert s["sad_rate"] == 0.25 and s["best_of_k_rate"] == 0.75 and s["gap"] == 0.5
    assert s["candidate_rate"] == pytest.approx(4 / 12)
    # The mean Pearson correlation over the prompts with mixed candidates (0, 2, 3).
    want = np.mean([np.corrcoef(scores[i], verdicts[i])[0, 1] for i in (0, 2, 3)])
    assert s["score_verdict_correlation"] == pytest.approx(want, abs=1e-5) and want > 0.2


def test_sad_curve_cli(tiny_model_dir, tmp_path, capsys):
    curve = bench_module("paper_sad_curve")
    out = tmp_path / "curve"
    curve.main(["--model", str(tiny_model_dir), "--out", str(out), "--device", "cpu", "--k", "3",
                "--shares", "0.125,0.25,0.5,0.75", "--objects", "1,2", "--n-prompts", "3", *TINY_SAMPLER])
    data = read_out(out)
    assert (out / "plot_critic.png").exists()
    assert data["decision_steps"] == decision_steps_for_shares(4, 16, [0.125, 0.25, 0.5, 0.75]) == [1, 2, 3]
    for sec in data["sets"].values():
        for p in sec["points"]:
            # SAD's image is its chosen candidate finished: the judge agrees with the critic's record.
            assert p["faithfulness"]["successes"] == p["sad_faithful"] and p["k"] == 3 and p["n"] == 3
            assert p["sad_rate"] <= p["best_of_k_rate"] == sec["best_of_k"]["rate"]
            # The paired gain is SAD's rate minus K = 1's on the same prompts.
            assert p["gain_over_k1"]["difference"] == pytest.approx(p["faithfulness"]["rate"] - sec["k1"]["rate"])
    assert "| 2-object | 3 (" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--shares must be comma-separated numbers in"):
        curve.main(["--model", str(tiny_model_dir), "--out", str(tmp_path / "x"), "--shares", "0,0.5"])
    with pytest.raises(ValueError, match="--k must be >= 2"):
        curve.main(["--model", str(tiny_model_dir), "--out", str(tmp_path / "x"), "--k", "1"])


def test_sad_lookahead_cli(tiny_model_dir, tmp_path, capsys):
    look = bench_module("sad_lookahead")
    out = tmp_path / "look"
    look.main(["--model", str(tiny_model_dir), "--out", str(out), "--device", "cpu", "--k", "3",
               "--shares", "0.25,0.5", "--objects", "1,2", "--n-prompts", "3", *TINY_SAMPLER])
    data = json.loads((out / "results.json").read_text())
    assert data["decision_steps"] == decision_steps_for_shares(4, 16, [0.25, 0.5]) == [2, 3]
    curve = bench_module("paper_sad_curve")
    curve.main(["--model", str(tiny_model_dir), "--out", str(tmp_path / "curve"), "--device", "cpu", "--k", "3",
                "--shares", "0.25,0.5", "--objects", "1,2", "--n-prompts", "3", *TINY_SAMPLER])
    reference = read_out(tmp_path / "curve")
    for name, sec in data["sets"].items():
        ref = reference["sets"][name]
        # The same seeds decode the same candidates as the decision-step curve, which the guesses leave alone.
        assert sec["k1"] == ref["k1"] and sec["best_of_k"] == ref["best_of_k"]
        for p, rp in zip(sec["points"], ref["points"]):
            assert p["decision_step"] == rp["decision_step"]
            # SAD on the partial latent is exactly the curve's SAD at that step.
            assert p["partial"]["faithfulness"] == rp["faithfulness"]
            for critic in ("partial", "completion", "completion_judge"):
                c = p[critic]
                gain = c["gain_over_k1"]["difference"]
                assert gain == pytest.approx(c["faithfulness"]["rate"] - sec["k1"]["rate"])
    assert "| 2-object | 2 (" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--k must be >= 2"):
        look.main(["--model", str(tiny_model_dir), "--out", str(tmp_path / "x"), "--k", "1"])


def test_sad_lookahead_summary_scores_each_critics_choice():
    look = bench_module("sad_lookahead")
    verdicts = torch.tensor([[False, True, False], [True, False, False], [False, False, False], [True, True, True]])
    # Ties go to the lower index (rank_candidates), as SAD's.
    scores = {5: {"partial": torch.tensor([[0.1, 0.9, 0.0], [0.2, 0.5, 0.1], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]),
                  "completion": torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.3]])}}
    out = look.summarise(verdicts, scores, steps=16, seq_len=16)
    assert out["n"] == 4 and out["k1"]["successes"] == 2 and out["best_of_k"]["successes"] == 3
    assert out["random_candidate"] == pytest.approx(5 / 12)
    point = out["points"][0]
    assert point["decision_step"] == 5 and point["fraction_decided"] == pytest.approx(5 / 16)
    # partial picks 1, 1, 0, 0: faithful in prompts 0 and 3; K = 1 is faithful in 1 and 3.
    assert point["partial"]["faithfulness"]["successes"] == 2
    assert (point["partial"]["gain_over_k1"]["first_only"], point["partial"]["gain_over_k1"]["second_only"]) == (1, 1)
    # completion picks 2, 0, 1, 2: faithful in prompts 1 and 3.
    assert point["completion"]["faithfulness"]["successes"] == 2
    assert point["completion"]["gain_over_k1"]["difference"] == 0.0


# --------------------------------------------------------------------------- Fig. 7


def test_zero_shot_position_classes_follow_the_grammar(tiny_pipe):
    from training.data.shapes_world import COLORS, POSITIONS, SHAPES, Scene, ShapeObject, parse_caption
    from training.evaluate.zero_shot_masking import shapes_class_prompts, shapes_labels

    names, prompts = shapes_class_prompts("position")
    assert names == list(POSITIONS) and len(prompts) == 9
    assert prompts[names.index("top left")][0] == "a red circle at the top left"
    for name, group in zip(names, prompts):
        assert len(group) == len(COLORS) * len(SHAPES)
        assert {parse_caption(p).objects[0].position for p in group} == {name}
    scenes = [Scene("white", (ShapeObject("red", "circle", "small", p),)) for p in ("center", "bottom right", "top")]
    labels, class_emb, classes = shapes_labels(tiny_pipe, scenes)
    assert labels["position"].tolist() == [4, 8, 1] and labels["shape"].tolist() == [0, 0, 0]
    assert class_emb["position"].shape == (9, tiny_pipe.config.embed_dim)
    assert torch.allclose(class_emb["position"].norm(dim=1), torch.ones(9), atol=1e-5)
    with pytest.raises(ValueError, match="zero-shot attributes are shape, color, position"):
        shapes_class_prompts("size")


def test_fig7_cli_compares_models_on_the_same_renders_and_masks(tiny_model_dir, tmp_path, capsys):
    fig7 = bench_module("paper_fig7")
    out = tmp_path / "fig7"
    fig7.main(["--models", f"a={tiny_model_dir}", f"b={tiny_model_dir}", "--out", str(out), "--device", "cpu",
               "--ratios", "0,0.5,0.95", "--n-images", "12"])
    data = read_out(out)
    assert data["models"] == {"a": str(tiny_model_dir), "b": str(tiny_model_dir)}
    # Each model's weights, so a table citing it can be checked (tests/test_results_fresh.py)
    record = {"path": str(tiny_model_dir), "fingerprint": model_fingerprint(tiny_model_dir)}
    assert data["meta"]["models"] == [record, record]
    assert data["accuracy"]["a"] == data["accuracy"]["b"]  # one model twice: identical renders and masks
    for attr, chance in (("shape", 0.2), ("color", 0.125), ("position", 1 / 9)):
        assert data["chance"][attr] == pytest.approx(chance)
        entries = data["accuracy"]["a"][attr]
        assert len(entries) == 3 and all(e["n"] == 12 and e["ci95"][0] <= e["rate"] <= e["ci95"][1] for e in entries)
    assert "position, a vs b: no difference within noise at any mask ratio" in data["findings"]
    assert "| a | position |" in capsys.readouterr().out
    for bad, msg in ((["--models", "oops"], "NAME=DIR"), (["--models", f"a={tmp_path / 'none'}"], "does not exist"),
                     (["--models", f"a={tiny_model_dir}", "--ratios", "0,1"], r"in \[0, 1\)")):
        with pytest.raises(ValueError, match=msg):
            fig7.main(bad + ["--out", str(tmp_path / "x")])


# --------------------------------------------------------------------------- Table 4


def tiny_run_overrides(tiny_model_dir: Path, images: Path) -> list[str]:
    """key=value overrides that put every schedule's recipe on the tiny model and an image folder."""
    base = {"model": "tiny", "data": "folder", "data_path": str(images), "vae_path": str(tiny_model_dir / "vae"),
            "t5_path": str(tiny_model_dir / "text"), "model.vae_scaling_factor": 0.5, "model.t5_path": "text",
            "batch_size": 8, "num_workers": 0, "samples_per_epoch": 16, "log_every": 1, "ckpt_every": 0,
            "sample_every": 0, "lr": 0.001, "warmup_epochs": 0.0, "precision": "fp32"}
    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in base.items()]


def write_scenes(folder: Path, n: int) -> None:
    from training.data.shapes_world import caption, random_scene, render

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        scene = random_scene(rng)
        render(scene, rng).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(caption(scene, rng))


def test_table4_recipes_and_paper_order():
    from training.recipes import get_recipe

    t4 = bench_module("paper_table4")
    assert {s: get_recipe(r).masking for s, r in t4.SCHEDULES.items()} == {
        "warmup": "warmup", "fx": "fx", "uni": "uni", "cd": "cd", "mar": "mar"}
    common = {k: v for k, v in vars(get_recipe("shapes")).items() if k not in ("name", "masking", "mask_std")}
    for r in t4.SCHEDULES.values():  # one budget and data feed; only the masking differs
        assert {k: vars(get_recipe(r))[k] for k in common} == common
    clip = get_recipe("shapes-clip")
    assert clip.masking == "none" and clip.data == "shapes" and clip.model_overrides == {
        "diffusion_weight": 0.0, "clip_weight": 1.0, "min_visible_for_clip": 0.0}
    paper = t4.PAPER_ORDER["understanding"]

    def rates(**per_100: int) -> dict:  # k of 100 per schedule
        return {s: rate_with_interval(k, 100) for s, k in per_100.items()}

    assert t4.compare_order(rates(cd=90, uni=80, warmup=70, fx=10), paper)["matches"]  # a tie: any order
    got = t4.compare_order(rates(warmup=90, uni=80, fx=10), t4.PAPER_ORDER["generation"])
    assert got == {"measured": ["warmup", "uni", "fx"], "paper": ["warmup", "uni", "fx"], "matches": True,
                   "rates": {"warmup": 0.9, "uni": 0.8, "fx": 0.1}, "beyond_noise": [["uni", "fx"]]}
    assert not t4.compare_order(rates(fx=90, uni=80, warmup=70), t4.PAPER_ORDER["generation"])["matches"]


def test_table4_rejects_bad_arguments(tmp_path):
    t4 = bench_module("paper_table4")
    out = ["--out", str(tmp_path / "t4")]
    for bad, msg in ((["--steps", "5", "--schedules", "warmup,wm"], "--schedules must list some of warmup, fx"),
                     (["--steps", "0"], "--steps must be >= 1"),
                     (["--steps", "5", "--seeds", "1,1"], "--seeds must be distinct"),
                     (["--steps", "5", "--chunk-minutes", "-1"], "--chunk-minutes must be >= 0"),
                     (["--steps", "5", "seed=3"], "override seed is set by this command")):
        with pytest.raises(ValueError, match=msg):
            t4.main(bad + out)
    assert not (tmp_path / "t4").exists()


@pytest.mark.slow
def test_table4_driver_trains_resumes_skips_and_aggregates(tiny_model_dir, tmp_path, capsys, monkeypatch):
    t4 = bench_module("paper_table4")
    write_scenes(tmp_path / "images", 16)
    out = tmp_path / "t4"
    argv = ["--steps", "6", "--schedules", "warmup,fx", "--seeds", "1,2", "--out", str(out), "--threads", "1",
            "--device", "cpu", "--n-prompts", "2", "--search-n", "4", "--probe-train", "10", "--probe-val", "5",
            "--eval-steps", "4", "--head-steps", "2", *tiny_run_overrides(tiny_model_dir, tmp_path / "images")]
    # 1. A chunk far shorter than one run: the first run stops at its first step check and saves.
    first = t4.main(argv + ["--chunk-minutes", "0.001"])
    assert not first["complete"] and "metrics" not in first
    assert first["status"]["warmup-s1"] == "not finished (chunk time is up; checkpoint saved)"
    assert first["status"]["fx-s2"] == "not finished (chunk time is up)"
    state = json.loads((out / "runs" / "warmup-s1" / "checkpoint-last" / "state.json").read_text())
    assert state["step"] < 6 and not (out / "runs" / "warmup-s1" / "model").exists()
    capsys.readouterr()
    # 2. The same command without a chunk limit continues that run from its checkpoint and finishes all.
    second = t4.main(argv)
    assert f"resumed from {out / 'runs' / 'warmup-s1' / 'checkpoint-last'} at step {state['step']}" in capsys.readouterr().out
    assert second["complete"] and set(second["status"].values()) == {"done"}
    for name in ("warmup-s1", "warmup-s2", "fx-s1", "fx-s2"):
        ev = json.loads((out / "runs" / name / "eval.json").read_text())
        assert ev["steps"] == 6 and ev["1-object"]["settings"]["sad"]["k"] == 9
    m = second["metrics"]["warmup"]["1-object K=1"]
    assert m["n"] == 4 and m["rate"] == pytest.approx(sum(m["per_seed"].values()) / 2)  # pooled = mean of seeds
    assert set(second["ordering"]["probe shape"]) == {"warmup", "fx"}
    assert second["metrics"]["fx"]["search color"]["n"] == 8 and second["metrics"]["fx"]["1-object VAE ceiling"]["n"] == 4
    assert read_out(out)["command"].startswith("python -m bench.paper_table4 --steps 6")

    # 3. Once more: nothing is trained or evaluated again, and the table is the same.
    def forbidden(*args, **kwargs):
        raise AssertionError("a finished run must be skipped")

    monkeypatch.setattr(t4, "train_run", forbidden)
    monkeypatch.setattr(t4, "evaluate_model", forbidden)
    third = t4.main(argv)
    assert set(third["status"].values()) == {"done (skipped)"} and third["metrics"] == second["metrics"]
    with pytest.raises(ValueError, match="was trained for 6 steps, not --steps 7"):
        t4.main([a if a != "6" else "7" for a in argv])


def test_table4_aggregate_pools_seeds_per_attribute_and_keeps_the_vae_ceiling_out_of_the_ranking():
    t4 = bench_module("paper_table4")
    attrs = ("shape", "color", "size", "position", "background")

    def ev(probe: float, search: float, k1: int, ceiling: int) -> dict:
        objects = {"vae_ceiling": {"faithful": ceiling, "n": 10},
                   "settings": {"K=1": {"faithful": k1, "n": 10}, "sad": {"faithful": k1, "n": 10}}}
        return {"probe": {"n_val": 100, **{a: {"val_acc": probe} for a in attrs}},
                "search": {"n": 50, "top1": search, "per_attribute": {a: search for a in attrs}},
                "1-object": objects, "2-object": objects}

    out = t4.aggregate({"warmup": {1: ev(0.9, 0.5, 8, 10), 2: ev(0.7, 0.3, 6, 10)},
                        "fx": {1: ev(0.2, 0.1, 2, 10), 2: ev(0.4, 0.1, 4, 10)}})
    m = out["metrics"]
    assert m["warmup"]["search color"]["successes"] == 40 and m["warmup"]["search color"]["n"] == 100
    assert m["warmup"]["search color"]["per_seed"] == {"1": 0.5, "2": 0.3}
    assert m["fx"]["1-object K=1"]["rate"] == pytest.approx(0.3)
    assert m["fx"]["2-object VAE ceiling"]["rate"] == 1.0
    assert out["ordering"]["search position"] == ["warmup", "fx"]
    assert not any("ceiling" in k for k in out["ordering"])
    understanding = out["paper_comparison"]["understanding (mean probe accuracy)"]
    assert understanding["matches"] and understanding["rates"] == {"warmup": 0.8, "fx": pytest.approx(0.3)}
    assert understanding["beyond_noise"] == [["warmup", "fx"]]  # 800 / 1000 against 300 / 1000
    generation = out["paper_comparison"]["generation (1-object K=1 faithfulness)"]
    assert generation["measured"] == ["warmup", "fx"] and generation["beyond_noise"] == []  # 14 / 20 vs 6 / 20


def test_compare_claims_a_difference_only_beyond_noise():
    from training.evaluate.stats import compare

    assert compare("SAD", rate_with_interval(90, 100), "K=1", rate_with_interval(60, 100)) == \
        "SAD beats K=1 by 30.0 points (95 % intervals do not overlap)"
    assert compare("SAD", rate_with_interval(6, 10), "K=1", rate_with_interval(5, 10)) == \
        "SAD vs K=1: +10.0 points, no difference within noise (95 % intervals overlap)"
