"""The app's handlers as plain functions (no server, no browser), on the tiny random model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from dream_core.config import DreamConfig

from app import handlers as h
from app.history import History
from app.images import (COLORS, Tile, candidate_grid, grid_columns, mark_undecided, open_checked, read_record,
                        render_tile, save_png, score_chart, upscale)
from app.main import address, is_loopback, parse_args
from app.models import ModelManager, discover_models, missing_model_message
from app.params import INFOTEXT_KEY, PARAMS_KEY, GenerationSettings, ImageRecord, parse_infotext

FAST = dict(num_candidates=3, decision_step=2, num_inference_steps=4, head_steps=2)
TINY = DreamConfig.preset("tiny")  # 16 tokens, 1000 diffusion steps


@pytest.fixture
def ctx(tmp_path, tiny_pipe, tiny_model_dir):
    manager = ModelManager(tiny_model_dir, models_dirs=[], device="cpu", loader=lambda path, device: tiny_pipe)
    return h.AppContext(manager.load_initial(), History(tmp_path / "outputs"), display_dir=tmp_path / "display")


def run(ctx, settings, session=None, **kw):
    kw.setdefault("preview_budget", math.inf)
    return list(h.generate_stream(ctx, session or h.SessionState(), settings, min_interval=0, **kw))


def record_example(**kw) -> ImageRecord:
    s = GenerationSettings("a red circle, top left", negative_prompt="blue", seed=11, **FAST).validated(TINY)
    return ImageRecord.build(s, 11, 2, [0.1, -0.2, 0.3], "tiny", (32, 32), 16, created="2026-01-01T00:00:00", **kw)


# ----- parameters -----
def test_settings_validation_messages():
    ok = GenerationSettings("  a  red circle ", num_candidates=4.0, decision_step=2, num_inference_steps=8).validated(TINY)
    assert (ok.prompt, ok.num_candidates, ok.decision_step) == ("a red circle", 4, 2)
    assert GenerationSettings("x", num_candidates=1, decision_step=7, num_inference_steps=8).validated(TINY).decision_step is None
    cases = [(dict(prompt="   "), "prompt must not be empty"),
             (dict(num_inference_steps=17), "num_inference_steps must be between 1 and 16"),
             (dict(decision_step=8, num_inference_steps=8), "decision_step must be between 1 and 7"),
             (dict(num_candidates=17), "num_candidates must be between 1 and 16"),
             (dict(num_candidates=2.5), "num_candidates must be an integer"),
             (dict(seed=-3), "seed must be between 0"),
             (dict(guidance_schedule="cosine"), "guidance_schedule must be one of constant, linear"),
             (dict(temperature=float("nan")), "temperature must be a number"),
             (dict(num_candidates=2, num_inference_steps=1), "at least 2")]
    for kw, message in cases:
        base = dict(prompt="a red circle", num_inference_steps=8)
        with pytest.raises(ValueError, match=message):
            GenerationSettings(**{**base, **kw}).validated(TINY)


def test_record_infotext_round_trip():
    rec = record_example()
    text = rec.infotext()
    assert text.splitlines()[0] == "a red circle, top left"
    assert text.splitlines()[1] == "Negative prompt: blue"
    assert "Decision step: 2 (31.2% decided)" in text  # 2 of 4 steps: 5 of 16 tokens and "Chosen candidate: 2" in text
    back = ImageRecord.from_dict(parse_infotext(text))
    for name in ("prompt", "negative_prompt", "num_candidates", "decision_step", "num_inference_steps", "head_steps",
                 "head_sampler", "guidance_scale", "guidance_schedule", "temperature", "seed", "chosen_candidate",
                 "chosen_seed", "candidate_scores", "model", "width", "height"):
        assert getattr(back, name) == getattr(rec, name), name
    assert ImageRecord.from_dict(json.loads(json.dumps(rec.to_dict()))) == rec
    assert rec.chosen_seed == 13 and rec.settings().seed == 11


def test_the_head_sampler_round_trips_and_old_texts_read_as_the_models_default():
    """The head sampler is recorded ("Head sampler: ddim" in the parameters text) and sent back;
    a text or record without it (written before there was a choice) re-runs with the model's."""
    s = GenerationSettings("a red circle", seed=11, head_sampler="ddim", **FAST).validated(TINY)
    rec = ImageRecord.build(s, 11, 0, [0.1, 0.2, 0.3], "tiny", (32, 32), 16)
    text = rec.infotext()
    assert "Head steps: 2, Head sampler: ddim," in text
    back = ImageRecord.from_dict(parse_infotext(text))
    assert back.head_sampler == "ddim" and back.settings().head_sampler == "ddim"
    assert h.controls_from_record(back, TINY)["head_sampler"] == "ddim"
    assert GenerationSettings.from_request(back.settings().request().validate(TINY)).head_sampler == "ddim"

    old_text = text.replace(" Head sampler: ddim,", "")
    old = ImageRecord.from_dict(parse_infotext(old_text))
    assert old.head_sampler is None and "Head sampler" not in old.infotext()
    fast = TINY.replace(default_head_sampler="dpm-solver++", default_head_steps=20)
    assert old.settings().request().validate(fast).head_sampler == "dpm-solver++"
    assert h.controls_from_record(old, fast)["head_sampler"] == "dpm-solver++"
    foreign = ImageRecord.from_dict(parse_infotext("a cat\nSteps: 8, Sampler: Euler a, Seed: 42"))
    assert foreign.head_steps is None and h.controls_from_record(foreign, fast)["head_steps"] == 20
    legacy = {k: v for k, v in rec.to_dict().items() if k != "head_sampler"}  # a JSON record of before
    assert ImageRecord.from_dict(legacy).head_sampler is None


def test_parse_a1111_infotext_keeps_unknown_keys():
    out = parse_infotext("a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 42, Size: 512x512, Clip skip: 2")
    assert (out["prompt"], out["num_inference_steps"], out["seed"], out["width"]) == ("a cat", 20, 42, 512)
    assert out["extra"] == {"Clip skip": "2"}
    with pytest.raises(ValueError):
        parse_infotext("  ")


# ----- images -----
def test_png_keeps_parameters_in_text_chunks(tmp_path):
    rec = record_example()
    path = save_png(Image.new("RGB", (32, 32), (200, 10, 10)), tmp_path / "a" / "x.png", rec)
    im = Image.open(path)
    assert im.format == "PNG" and json.loads(im.text[PARAMS_KEY]) == rec.to_dict()
    assert im.text[INFOTEXT_KEY] == rec.infotext()
    assert read_record(path) == rec
    assert not list(path.parent.glob("*.tmp"))


def test_unicode_prompts_survive_the_png(tmp_path):
    s = GenerationSettings("un cercle rouge — 赤い円", seed=3, **FAST).validated(TINY)
    rec = ImageRecord.build(s, 3, 0, [0.5, 0.1, 0.2], "tiny", (32, 32), 16)
    path = save_png(Image.new("RGB", (32, 32)), tmp_path / "u.png", rec)
    assert read_record(path).prompt == "un cercle rouge — 赤い円"
    assert Image.open(path).text[INFOTEXT_KEY].startswith("un cercle rouge — 赤い円\n")


def test_read_record_fallbacks_and_refusals(tmp_path):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    assert read_record(plain) is None
    a1111 = tmp_path / "a1111.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a dog\nSteps: 12, Seed: 5, CFG scale: 2.5")
    Image.new("RGB", (8, 8)).save(a1111, pnginfo=info)
    rec = read_record(a1111)
    assert (rec.prompt, rec.seed, rec.num_inference_steps, rec.guidance_scale) == ("a dog", 5, 12, 2.5)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ValueError, match="'notes.png' is not an image"):
        read_record(text)
    wide = tmp_path / "wide.png"
    Image.new("L", (4097, 2)).save(wide)
    with pytest.raises(ValueError, match=r"too large \(4097x2 pixels\); at most 4096"):
        open_checked(wide)
    with pytest.raises(ValueError, match="the file is too large"):
        open_checked(plain, max_bytes=10)
    with pytest.raises(ValueError, match="no image given"):
        open_checked(None)


def test_mark_undecided_touches_only_undecided_patches():
    img = Image.new("RGB", (64, 64), (250, 250, 250))
    mask = np.zeros(16, dtype=bool)
    mask[5] = True  # row 1, col 1 -> pixels [16, 32) x [16, 32)
    out = np.asarray(mark_undecided(img, mask, 4)).astype(int)
    src = np.asarray(img).astype(int)
    changed = np.any(out != src, axis=-1)
    assert changed[16:32, 16:32].all()
    changed[16:32, 16:32] = False
    assert not changed.any()
    assert mark_undecided(img, np.zeros(16, bool), 4) is img
    with pytest.raises(ValueError, match="mask has 9 tokens"):
        mark_undecided(img, np.zeros(9, bool), 4)


def test_upscale_is_exact_nearest():
    rng = np.random.default_rng(0)
    src = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    big = upscale(src, 512)
    assert big.size == (512, 512)
    assert np.array_equal(np.asarray(big)[::16, ::16], np.asarray(src))
    assert upscale(Image.new("RGB", (600, 600)), 512).size == (600, 600)


def test_tiles_grid_and_chart():
    assert [grid_columns(n) for n in (1, 2, 4, 5, 9, 10, 16)] == [1, 2, 2, 3, 3, 4, 4]
    tiles = [Tile(Image.new("RGB", (32, 32), (0, 0, 255)), c, "pruned" if c else "chosen", 0.1 * c, c + 1, 5)
             for c in range(5)]
    grid = candidate_grid(tiles, 64)
    assert grid.size == (3 * 70 + 2 * 6, 2 * (70 + 38) + 6)
    pruned = np.asarray(render_tile(tiles[1], 64))
    assert (pruned == np.array(COLORS["pruned"])).all(axis=-1).sum() > 300  # red frame and cross
    chosen = np.asarray(render_tile(tiles[0], 64))
    assert (chosen == np.array(COLORS["chosen"])).all(axis=-1).sum() > 200
    chart = np.asarray(score_chart([0.2, None, -0.1], ["chosen", "pruned", "pruned"]))
    assert (chart == np.array(COLORS["chosen"])).all(axis=-1).any()
    assert (chart == np.array(COLORS["pruned"])).all(axis=-1).any()
    with pytest.raises(ValueError):
        score_chart([None], ["kept"])
    with pytest.raises(ValueError, match="unknown tile state"):
        render_tile(Tile(Image.new("RGB", (8, 8)), 0, "lost"))
    # rendering is cached per tile, and redone when what it shows changes
    t = tiles[1]
    assert render_tile(t, 64) is render_tile(t, 64)
    before = render_tile(t, 64)
    t.state = "stopped"
    assert render_tile(t, 64) is not before
    t.image = Image.new("RGB", (32, 32), (255, 0, 0))
    assert np.asarray(render_tile(t, 64))[40, 40].tolist() == [255, 0, 0]


# ----- generation -----
def test_generate_stream_shows_candidates_decision_and_saves_png(ctx, tiny_pipe):
    session = h.SessionState()
    views = run(ctx, GenerationSettings("a red circle", seed=7, **FAST), session)
    # start, 4 steps + 1 decision event, final
    assert len(views) == 7 and views[0].reset and views[-1].done
    # every step is previewed except the last, whose tile the final image fills
    assert [v.grid is not None for v in views] == [False, True, True, True, True, False, True]
    assert [v.scores is not None for v in views] == [False, False, False, True, False, False, False]
    assert "Decision at step 2 (31.2 % decided)" in views[3].status
    final = views[-1]
    saved = Path(final.download)
    assert saved.parent.parent == ctx.history.root and saved.name == "00001-7.png"
    record = read_record(saved)
    assert read_record(final.final) == record  # the big display copy carries the same parameters
    assert Image.open(final.final).size == (512, 512) and Image.open(saved).size == (32, 32)
    # the stored record is exactly what the engine does with those settings
    out = tiny_pipe("a red circle", seed=7, **FAST)
    assert (record.chosen_candidate, record.candidate_scores) == (out.chosen[0], [round(s, 6) for s in out.scores[0]])
    assert np.array_equal(np.asarray(Image.open(saved).convert("RGB")), np.asarray(out.images[0]))
    assert (record.seed, record.chosen_seed, record.decision_step, record.fraction_decided) == (7, 7 + out.chosen[0], 2, 0.3125)
    assert session.last_seed == 7 and session.paths == [str(saved)] and not session.running
    assert final.infotext == record.infotext()


def test_controls_take_the_models_head_sampler_and_steps(ctx, tiny_pipe, monkeypatch):
    c = h.default_controls(ctx)
    assert (c["head_sampler"], c["head_steps"]) == ("ancestral", 100)
    monkeypatch.setattr(tiny_pipe, "config", tiny_pipe.config.replace(default_head_sampler="ddim",
                                                                      default_head_steps=3))
    c = h.default_controls(ctx)
    assert (c["head_sampler"], c["head_steps"]) == ("ddim", 3)
    views = run(ctx, GenerationSettings("a red circle", seed=7, **{**FAST, "head_steps": None}))
    record = read_record(Path(views[-1].download))
    assert (record.head_sampler, record.head_steps) == ("ddim", 3)  # the values used, not "default"


def test_controls_and_records_take_the_models_default_temperature(ctx, tiny_pipe, monkeypatch):
    assert h.default_controls(ctx)["temperature"] == tiny_pipe.config.default_temperature == 1.0
    monkeypatch.setattr(tiny_pipe, "config", tiny_pipe.config.replace(default_temperature=0.5))
    assert h.default_controls(ctx)["temperature"] == 0.5
    views = run(ctx, GenerationSettings("a red circle", seed=7, **{**FAST, "temperature": None}))
    assert read_record(Path(views[-1].download)).temperature == 0.5  # the value used, not "default"


def test_previews_are_throttled_but_key_events_always_shown(ctx):
    views = run(ctx, GenerationSettings("a red circle", seed=1, **FAST))
    throttled = list(h.generate_stream(ctx, h.SessionState(), GenerationSettings("a red circle", seed=1, **FAST),
                                       min_interval=10.0, clock=lambda: 0.0))
    assert len(views) == 7
    # with a frozen clock only the first step, the decision and the end are drawn
    assert len(throttled) == 5 and throttled[2].scores is not None and throttled[-1].done


def test_preview_budget_arithmetic():
    b = h.PreviewBudget(0.1)
    assert b.allows(0.0)  # nothing spent, nothing estimated
    b.add(0.05)  # a 50 ms preview: the next needs 2 x 50 ms <= 10 % of (elapsed - 50 ms)
    assert not b.allows(1.0) and b.allows(1.05)
    b.add(0.01)
    assert b.spent == pytest.approx(0.06) and b.last_cost == 0.01
    assert not b.allows(0.75) and b.allows(0.77)  # the boundary is 0.76 s


def test_preview_budget_keeps_first_and_decision_previews(ctx):
    """With no budget only the first step and the decision are drawn; the final image fills the
    winner's tile; the final view reports what the previews cost."""
    views = run(ctx, GenerationSettings("a red circle", seed=1, **FAST), preview_budget=0.0)
    assert len(views) == 7
    assert [v.grid is not None for v in views] == [False, True, False, True, False, False, True]
    assert views[3].scores is not None
    final = views[-1]
    assert final.preview_seconds > 0 and final.decode_seconds > 0
    with pytest.raises(gr.Error, match="preview budget"):
        run(ctx, GenerationSettings("a red circle", **FAST), preview_budget=-1.0)


def test_stop_lands_within_one_decoding_step(ctx):
    session = h.SessionState()
    h.begin_job(session)  # the click
    gen = h.generate_stream(ctx, session, GenerationSettings("a red circle", seed=3, **FAST), min_interval=0)
    assert next(gen).reset
    first = next(gen)
    assert "Step 1/4" in first.status and session.running
    h.request_stop(session)
    rest = list(gen)
    assert len(rest) == 1 and rest[0].stopped
    assert "Stopped at step 1 of 4" in rest[0].status
    assert not ctx.history.root.exists() or not list(ctx.history.root.rglob("*.png"))
    assert session.jobs == [] and not session.running
    # a Stop while the job waits in the queue reaches that job
    h.begin_job(session)
    h.request_stop(session)
    early = run(ctx, GenerationSettings("a red circle", seed=3, **FAST), session)
    assert len(early) == 1 and early[0].stopped and "before it started" in early[0].status
    # a Stop while idle reaches no later job (UI click or API call)
    h.request_stop(session)
    assert run(ctx, GenerationSettings("a red circle", seed=3, **FAST), session)[-1].done
    h.begin_job(session)
    assert run(ctx, GenerationSettings("a red circle", seed=3, **FAST), session)[-1].done
    assert session.jobs == []


def test_several_images_use_successive_seeds_and_sessions_are_isolated(ctx):
    a, b = h.SessionState(), h.SessionState()
    views = run(ctx, GenerationSettings("a blue square", seed=100, num_images=2, **FAST), a)
    records = views[-1].records
    assert [r["seed"] for r in records] == [100, 103] and [r["image_index"] for r in records] == [0, 1]
    assert len(views[-1].gallery) == 2 and len(a.paths) == 2
    assert b.paths == [] and b.last_seed is None
    private = h.AppContext(ctx.manager, ctx.history, shared_history=False, display_dir=ctx.display_dir)
    assert h.history_items(private, b) == []
    assert [p for p, _ in h.history_items(private, a)] == a.paths
    shared = h.history_items(ctx, b)
    assert sorted(p for p, _ in shared) == sorted(a.paths)


def test_generate_errors_are_messages(ctx, tmp_path):
    with pytest.raises(gr.Error, match="num_inference_steps must be between 1 and 16"):
        run(ctx, GenerationSettings("a red circle", num_inference_steps=40))
    with pytest.raises(gr.Error, match="prompt must not be empty"):
        run(ctx, GenerationSettings(""))
    with pytest.raises(gr.Error, match="preview mode"):
        run(ctx, GenerationSettings("a red circle", **FAST), preview_mode="x-ray")
    empty = ModelManager(tmp_path / "nope", models_dirs=[]).load_initial()
    with pytest.raises(gr.Error, match="does not exist yet"):
        run(h.AppContext(empty, ctx.history), GenerationSettings("a red circle"))


def test_generate_images_api_and_partial_decode_mode(ctx):
    paths, records = h.generate_images(ctx, h.SessionState(), GenerationSettings("a purple cross", seed=5, **FAST))
    assert len(paths) == 1 and records[0]["prompt"] == "a purple cross" and Path(paths[0]).is_file()
    views = run(ctx, GenerationSettings("a purple cross", seed=5, **FAST), preview_mode=h.PREVIEW_PARTIAL)
    assert views[-1].done


def test_seed_and_decision_helpers():
    assert h.resolve_seed(5, True) is None and h.resolve_seed(-1, False) is None and h.resolve_seed(None, False) is None
    assert h.resolve_seed(12.0, False) == 12
    with pytest.raises(gr.Error, match="whole number"):
        h.resolve_seed(2.5, False)
    with pytest.raises(gr.Error, match="seed must be between 0 and 4294967295, or -1 for a random seed; got 1099"):
        h.resolve_seed(2**40, False)
    assert "step **2** of 16, when **12.5 %**" in h.decision_info(16, 2, 16, 4)
    assert h.decision_info(16, 2, 16, 1).startswith("One candidate")
    with pytest.raises(gr.Error, match="no image generated"):
        h.reuse_last_seed(h.SessionState())
    assert h.reuse_last_seed(h.SessionState(last_seed=9)) == 9
    running = h.SessionState(jobs=[h.Job(started=True)])
    h.request_stop(running)
    assert running.running and running.jobs[0].stop_requested


# ----- reverse search -----
def test_search_modes_rank_best_first(ctx, tmp_path, tiny_pipe):
    img = tmp_path / "q.png"
    Image.new("RGB", (32, 32), (220, 30, 30)).save(img)
    bank = h.search(ctx, str(img), 3)
    assert [r["rank"] for r in bank] == [1, 2, 3]
    assert [r["score"] for r in bank] == sorted((r["score"] for r in bank), reverse=True)
    assert [(r["caption"], r["score"]) for r in bank] == [(c, round(s, 4)) for c, s in
                                                         tiny_pipe.search(Image.open(img), top_k=3)]
    captions = tmp_path / "bank.txt"
    captions.write_text("a red circle\n\na blue square\na red circle\n")
    mine = h.search(ctx, str(img), 5, h.SEARCH_FILE, str(captions))
    assert sorted(r["caption"] for r in mine) == ["a blue square", "a red circle"]
    labels = h.search(ctx, str(img), 5, h.SEARCH_LABELS, labels="circle, square, triangle")
    assert sorted(r["caption"] for r in labels) == ["circle", "square", "triangle"]
    assert abs(sum(r["score"] for r in labels) - 1.0) < 1e-3


def test_search_shows_each_captions_details(ctx, tmp_path, tiny_pipe, monkeypatch):
    img = tmp_path / "q.png"
    Image.new("RGB", (32, 32), (220, 30, 30)).save(img)
    monkeypatch.setattr(tiny_pipe, "caption_details", [f"detail of {c}" for c in tiny_pipe.captions])
    bank = h.search(ctx, str(img), 3)
    assert [list(r) for r in bank] == [list(h.SEARCH_COLUMNS)] * 3
    assert [r["details"] for r in bank] == [f"detail of {r['caption']}" for r in bank]
    table = h.search_table(bank)
    assert list(table.columns) == list(h.SEARCH_COLUMNS) and table["details"].tolist() == [r["details"] for r in bank]
    # An uploaded file's `caption<TAB>detail` lines: the detail is shown, only the caption embedded.
    captions = tmp_path / "bank.txt"
    captions.write_text("a red circle\t🔴  red, round\na blue square\n", encoding="utf-8")
    mine = h.search(ctx, str(img), 5, h.SEARCH_FILE, str(captions))
    assert {r["caption"]: r["details"] for r in mine} == {"a red circle": "🔴  red, round", "a blue square": ""}
    plain = tiny_pipe.search(Image.open(img), top_k=5, captions=["a red circle", "a blue square"])
    assert [(r["caption"], r["score"]) for r in mine] == [(c, round(v, 4)) for c, v in plain]
    labels = h.search(ctx, str(img), 5, h.SEARCH_LABELS, labels="circle, square")
    assert [r["details"] for r in labels] == ["", ""]


def test_search_refuses_bad_inputs_with_messages(ctx, tmp_path):
    img = tmp_path / "q.png"
    Image.new("RGB", (32, 32)).save(img)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x00\x01 not a picture")
    binary = tmp_path / "bank.txt"
    binary.write_bytes(b"\xff\xfe\x00\x00")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n \n")
    cases = [((str(junk), 5), "is not an image"),
             ((None, 5), "no image given"),
             ((str(img), 0), "top_k must be a whole number between 1 and 100"),
             ((str(img), 5, "everything"), "search mode must be one of"),
             ((str(img), 5, h.SEARCH_FILE, None), "upload a caption file"),
             ((str(img), 5, h.SEARCH_FILE, str(binary)), "not UTF-8 text"),
             ((str(img), 5, h.SEARCH_FILE, str(blank)), "holds no captions"),
             ((str(img), 5, h.SEARCH_LABELS, None, "circle"), "at least two labels")]
    for args, message in cases:
        with pytest.raises(gr.Error, match=message):
            h.search(ctx, *args)


# ----- history, parameters, models -----
def test_history_numbering_selection_and_send_to_generate(ctx, tmp_path):
    hist = ctx.history
    rec = record_example()
    p1 = hist.save(Image.new("RGB", (32, 32)), rec)
    p2 = hist.save(Image.new("RGB", (32, 32)), rec)
    assert (p1.name, p2.name) == ("00001-11.png", "00002-11.png")
    Image.new("RGB", (4, 4)).save(p1.parent / "foreign.png")  # no parameters: not listed
    session = h.SessionState()
    items = h.history_items(ctx, session)
    assert [p for p, _ in items] == [str(p2), str(p1)] and items[0][1].endswith("seed 11")
    assert h.select_history(ctx, session, 1) == rec and session.selected == str(p1)
    with pytest.raises(gr.Error, match="pick an image"):
        h.select_history(ctx, session, 5)
    assert hist.contains(p1) and not hist.contains(tmp_path / "elsewhere.png")
    shapes = DreamConfig.preset("shapes")  # 16 tokens
    c = h.controls_from_record(rec, shapes)
    assert (c["prompt"], c["seed"], c["randomize"], c["num_candidates"], c["decision_step"]) == (rec.prompt, 11, False, 3, 2)
    long = ImageRecord.from_dict({**rec.to_dict(), "num_inference_steps": 64, "decision_step": 32})
    assert (h.controls_from_record(long, shapes)["num_inference_steps"], h.controls_from_record(long, shapes)["decision_step"]) == (16, 15)


def test_read_parameters_of_a_dropped_png(tmp_path):
    rec = record_example()
    assert h.read_parameters(str(save_png(Image.new("RGB", (32, 32)), tmp_path / "x.png", rec))) == rec
    bare = tmp_path / "bare.png"
    Image.new("RGB", (8, 8)).save(bare)
    with pytest.raises(gr.Error, match="carries no DREAM Studio parameters"):
        h.read_parameters(str(bare))
    with pytest.raises(gr.Error, match="no image given"):
        h.read_parameters(None)


def test_model_discovery_and_switching_only_by_listed_name(tmp_path, tiny_pipe, tiny_model_dir):
    for name in ("alpha", "beta"):
        (tmp_path / "models" / name).mkdir(parents=True)
        (tmp_path / "models" / name / "config.json").write_text("{}")
        (tmp_path / "models" / name / "model.safetensors").write_bytes(b"")
    (tmp_path / "models" / "not-a-model").mkdir()
    found = discover_models([tmp_path / "models", tmp_path / "missing"])
    assert sorted(found) == ["alpha", "beta"]
    loaded = []

    def loader(path, device):
        loaded.append(Path(path).name)
        return tiny_pipe

    m = ModelManager(tiny_model_dir, models_dirs=[tmp_path / "models"], device="cpu", loader=loader).load_initial()
    assert m.pipe is tiny_pipe and list(m.choices())[0] == tiny_model_dir.name
    m.switch("beta")
    assert m.name == "beta" and loaded[-1] == "beta"
    with pytest.raises(ValueError, match="unknown model '/etc'"):
        m.switch("/etc")
    with pytest.raises(ValueError, match="unknown model"):
        m.switch(str(tiny_model_dir))

    def broken(path, device):
        raise ValueError("model.safetensors does not match config.json")

    m.loader = broken
    with pytest.raises(ValueError, match="could not load model 'alpha'"):
        m.switch("alpha")
    assert m.name == "beta" and m.pipe is tiny_pipe  # a failed switch keeps the old model
    assert "DREAM total" in m.info_markdown()


def test_missing_default_model_is_explained(tmp_path, monkeypatch):
    monkeypatch.setenv("DREAM_MODEL", str(tmp_path / "dream-shapes"))
    m = ModelManager(None, models_dirs=[]).load_initial()
    assert m.pipe is None and m.error == missing_model_message(tmp_path / "dream-shapes")
    assert "does not exist yet" in m.error and "--model DIR" in m.error
    with pytest.raises(ValueError, match="does not exist yet"):
        m.require()
    assert m.info_markdown().startswith("**No model loaded.**")


def test_cli_defaults_bind_loopback(tmp_path):
    args = parse_args([])
    assert (args.host, args.port, args.share, args.device, args.model) == ("127.0.0.1", 7860, False, "auto", None)
    args = parse_args(["--model", str(tmp_path), "--port", "0", "--device", "cpu", "--models-dir", str(tmp_path)])
    assert args.model == tmp_path and args.models_dir == [tmp_path]
    with pytest.raises(SystemExit):
        parse_args(["--model", str(tmp_path / "missing")])
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and not is_loopback("0.0.0.0")
    assert (address("127.0.0.1", 7860), address("0.0.0.0", 80), address("::1", 7860)) == \
        ("http://127.0.0.1:7860/", "http://127.0.0.1:80/", "http://[::1]:7860/")


# ----- editing -----
def _source() -> Image.Image:
    return Image.fromarray((np.random.default_rng(7).random((32, 32, 3)) * 255).astype(np.uint8))


def test_edit_stream_hatches_only_regenerated_tokens_and_records_the_source(ctx, tiny_pipe):
    brush = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    brush.paste((255, 0, 255, 255), (0, 0, 12, 5))  # tokens 0 and 1 (8 px patches)
    edit = h.edit_input({"background": _source(), "layers": [brush], "composite": None}, h.EDIT_INPAINT, 0.5, True)
    assert edit.mask.sum() == 60 and edit.kind == "inpaint"
    settings = GenerationSettings("a red circle", num_candidates=3, head_steps=2, seed=9)
    views = run(ctx, settings, edit=edit, explain=True)
    assert sum(v.grid is not None for v in views) >= 2 and any(v.scores is not None for v in views)
    done = views[-1]
    assert done.done and len(done.records) == 1 and len(done.explanations) == 1
    rec = done.records[0]
    assert rec["edit"] == "inpaint" and rec["regenerated_tokens"] == [0, 1] and rec["paste_back"] is True
    assert rec["source_sha256"] == h.image_sha256(_source()) and len(rec["source_sha256"]) == 64
    assert rec["num_inference_steps"] == 2 and rec["decision_step"] == 1 and rec["fraction_decided"] == 0.5
    out = tiny_pipe.inpaint(_source(), edit.mask, "a red circle", num_candidates=3, head_steps=2, seed=9)
    assert np.array_equal(np.asarray(Image.open(done.paths[0]).convert("RGB")), np.asarray(out.images[0]))
    assert read_record(done.paths[0]).to_dict() == rec


def test_edit_refusals_are_messages(ctx):
    settings = GenerationSettings("a red circle", num_candidates=2, head_steps=2, seed=1)
    with pytest.raises(gr.Error, match="upload, paste or send an image to edit first"):
        h.edit_input(None, h.EDIT_INPAINT, 0.5, True)
    empty = h.edit_input({"background": _source(), "layers": [], "composite": None}, h.EDIT_INPAINT, 0.5, True)
    with pytest.raises(gr.Error, match="mask is empty: mark the pixels to regenerate"):
        run(ctx, settings, edit=empty)
    with pytest.raises(gr.Error, match=r"strength must be between 0.0 and 1.0, got 2.0"):
        run(ctx, settings, edit=h.EditInput(_source(), strength=2.0))
    with pytest.raises(gr.Error, match="edit mode must be one of inpaint, variations"):
        h.edit_input({"background": _source()}, "outpaint", 0.5, True)


def test_edit_records_round_trip_and_old_records_still_load():
    rec = record_example()
    rec.edit, rec.source_sha256, rec.strength, rec.regenerated_tokens, rec.paste_back = \
        "variations", "ab" * 32, 0.25, [1, 5, 9, 13], False
    back = ImageRecord.from_dict(parse_infotext(rec.infotext()))
    assert (back.edit, back.source_sha256, back.strength, back.regenerated_tokens, back.paste_back) == \
        ("variations", "ab" * 32, 0.25, [1, 5, 9, 13], False)
    old = record_example().to_dict()
    for key in ("edit", "source_sha256", "strength", "regenerated_tokens", "paste_back"):
        old.pop(key)
    loaded = ImageRecord.from_dict(old)
    assert loaded.edit is None and loaded.source_sha256 is None and loaded.extra == {}
    assert "Edit:" not in loaded.infotext()
