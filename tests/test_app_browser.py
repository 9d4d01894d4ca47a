"""In a real browser: Playwright drives Debian's Chromium (/usr/bin/chromium, never a downloaded
browser) against the app on the tiny model. Screenshots go to test-artifacts/browser/."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "browser"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed "
                       "(apt-get install -y chromium); the browser tests need /usr/bin/chromium"),
]
playwright = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")

from app.handlers import AppContext  # noqa: E402
from app.history import History  # noqa: E402
from app.main import free_port  # noqa: E402
from app.models import ModelManager  # noqa: E402
from app.params import PARAMS_KEY  # noqa: E402
from app.ui import build_app, launch_app  # noqa: E402

TIMEOUT_MS = 120_000


class GatedPipe:
    """The tiny pipeline, except that after the first decoding step it waits (up to a minute)
    until the session asks to stop: the Stop test cannot be won by a fast generation."""

    def __init__(self, pipe) -> None:
        self._pipe = pipe

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def stream(self, *args, should_stop=None, **kwargs):
        for i, event in enumerate(self._pipe.stream(*args, should_stop=should_stop, **kwargs)):
            yield event
            if i == 0:
                deadline = time.monotonic() + 60
                while not should_stop() and time.monotonic() < deadline:
                    time.sleep(0.02)


def serve(root: Path, pipe, model_dir: Path):
    manager = ModelManager(model_dir, models_dirs=[], device="cpu", loader=lambda path, device: pipe).load_initial()
    ctx = AppContext(manager, History(root / "outputs"), display_dir=root / "display")
    demo = build_app(context=ctx)
    _, url, _ = launch_app(demo, port=free_port(), prevent_thread_lock=True, quiet=True)
    return demo, url, ctx


@pytest.fixture(scope="module")
def served(app_dirs, tiny_pipe, tiny_model_dir):
    demo, url, ctx = serve(app_dirs, tiny_pipe, tiny_model_dir)
    yield url, ctx
    demo.close()


@pytest.fixture(scope="module")
def browser_context():
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    profile = tempfile.mkdtemp(prefix="dream-chromium-")
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(profile, executable_path=str(CHROMIUM), headless=True,
                                                       args=ARGS, viewport={"width": 1400, "height": 1000})
        context.set_default_timeout(TIMEOUT_MS)
        yield context
        context.close()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def page(browser_context):
    page = browser_context.new_page()
    yield page
    page.close()


def set_number(page, label: str, value: int) -> None:
    """Type into a slider's number box, as a user would."""
    box = page.locator(f"input[aria-label='number input for {label}']")
    box.fill(str(value))
    box.press("Enter")


def open_app(page, url: str) -> None:
    page.goto(url)
    page.locator("#ds-prompt textarea").wait_for()


def test_generate_shows_candidates_scores_and_final_image(page, served):
    from playwright.sync_api import expect

    url, ctx = served
    open_app(page, url)
    page.locator("#ds-prompt textarea").fill("a large red circle in the middle")
    set_number(page, "Candidates (K)", 4)
    set_number(page, "Decoding steps", 6)
    expect(page.locator("#ds-decision-info")).to_contain_text(" of 6")
    set_number(page, "Decision step", 2)
    expect(page.locator("#ds-decision-info")).to_contain_text("after step 2 of 6")
    page.get_by_text("Sampling", exact=True).click()
    set_number(page, "Diffusion-head steps", 4)
    page.locator("#ds-generate").click()

    expect(page.locator("#ds-status")).to_contain_text("Done: 1 image", timeout=TIMEOUT_MS)
    expect(page.locator("#ds-status")).to_contain_text("won with score")
    expect(page.locator("#ds-grid img")).to_be_visible()
    expect(page.locator("#ds-scores img")).to_be_visible()
    expect(page.locator("#ds-final img")).to_be_visible()
    expect(page.locator("#ds-infotext textarea")).to_have_value(
        re.compile(r"Candidates: 4, Decision step: 2 .*Candidate scores: "))
    page.screenshot(path=str(ARTIFACTS / "generate.png"), full_page=True)

    # the download is the PNG with its parameters
    with page.expect_download() as download:
        page.locator("#ds-download").click()
    saved = ARTIFACTS / "downloaded.png"
    download.value.save_as(saved)
    from PIL import Image

    record = json.loads(Image.open(saved).text[PARAMS_KEY])
    assert (record["prompt"], record["num_candidates"], record["num_inference_steps"]) == \
        ("a large red circle in the middle", 4, 6)
    assert len(record["candidate_scores"]) == 4 and 0 <= record["chosen_candidate"] < 4


def test_ctrl_enter_generates_and_history_sends_settings_back(page, served):
    from playwright.sync_api import expect

    url, _ = served
    open_app(page, url)
    set_number(page, "Decoding steps", 4)
    page.get_by_text("Sampling", exact=True).click()
    set_number(page, "Diffusion-head steps", 2)
    page.locator("#ds-prompt textarea").fill("a small blue square at the top left")
    page.locator("#ds-prompt textarea").press("Control+Enter")
    expect(page.locator("#ds-status")).to_contain_text("Done: 1 image", timeout=TIMEOUT_MS)

    page.get_by_role("tab", name="History").click()
    page.locator("#ds-history img").first.wait_for()
    page.locator("#ds-history img").first.click()
    expect(page.locator("#ds-picked")).to_contain_text("a small blue square at the top left")
    page.screenshot(path=str(ARTIFACTS / "history.png"), full_page=True)
    page.get_by_role("tab", name="Generate").click()
    page.locator("#ds-prompt textarea").fill("")
    page.get_by_role("tab", name="History").click()
    page.get_by_role("button", name="Send to Generate", exact=True).click()
    expect(page.locator("#ds-prompt textarea")).to_have_value("a small blue square at the top left")
    expect(page.get_by_label("Random seed")).not_to_be_checked()


def test_dropping_an_app_png_reads_its_parameters(page, served, tmp_path):
    from playwright.sync_api import expect
    from PIL import Image

    from app.images import save_png
    from app.params import GenerationSettings, ImageRecord
    from dream_core.config import DreamConfig

    url, _ = served
    settings = GenerationSettings("a green triangle on the right", seed=77, num_candidates=2,
                                  num_inference_steps=4, decision_step=1).validated(DreamConfig.preset("tiny"))
    record = ImageRecord.build(settings, 77, 1, [0.1, 0.2], "tiny", (32, 32), 16)
    png = save_png(Image.new("RGB", (32, 32), (0, 160, 0)), tmp_path / "made-by-app.png", record)
    open_app(page, url)
    page.get_by_role("tab", name="History").click()
    page.locator("#ds-png-in input[type=file]").set_input_files(str(png))
    expect(page.locator("#ds-picked")).to_contain_text("a green triangle on the right")
    page.screenshot(path=str(ARTIFACTS / "png-info.png"), full_page=True)
    page.get_by_role("button", name="Send these parameters to Generate").click()
    expect(page.locator("#ds-prompt textarea")).to_have_value("a green triangle on the right")
    expect(page.locator("input[aria-label='number input for Candidates (K)']")).to_have_value("2")


def test_missing_model_is_explained(app_dirs, page, tmp_path):
    from playwright.sync_api import expect

    manager = ModelManager(tmp_path / "dream-shapes", models_dirs=[tmp_path / "models"], device="cpu").load_initial()
    demo = build_app(context=AppContext(manager, History(app_dirs / "nomodel"), display_dir=app_dirs / "nm-display"))
    _, url, _ = launch_app(demo, port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        open_app(page, url)
        expect(page.locator(".ds-banner-missing")).to_contain_text("does not exist yet")
        page.locator("#ds-prompt textarea").fill("a red circle")
        page.locator("#ds-generate").click()
        expect(page.get_by_text("No model is loaded").last).to_be_visible()
        page.screenshot(path=str(ARTIFACTS / "no-model.png"), full_page=True)
        page.get_by_role("tab", name="Model").click()
        expect(page.locator("#ds-model-info")).to_contain_text("No model loaded")
        page.screenshot(path=str(ARTIFACTS / "no-model-panel.png"), full_page=True)
    finally:
        demo.close()


def test_reverse_search_lists_captions(page, served, tmp_path):
    from playwright.sync_api import expect
    from PIL import Image

    url, ctx = served
    img = tmp_path / "query.png"
    Image.new("RGB", (32, 32), (230, 40, 40)).save(img)
    open_app(page, url)
    page.get_by_role("tab", name="Reverse search").click()
    page.locator("#ds-search-img input[type=file]").set_input_files(str(img))
    page.locator("#ds-search-img img").wait_for()
    page.locator("#ds-search").click()
    expect(page.locator("#ds-results")).to_contain_text("on a white background", timeout=TIMEOUT_MS)
    page.screenshot(path=str(ARTIFACTS / "search.png"), full_page=True)
    page.get_by_role("button", name="Use the best caption as the prompt").click()
    best = ctx.manager.pipe.search(Image.open(img), top_k=1)[0][0]
    expect(page.locator("#ds-prompt textarea")).to_have_value(best)


def test_switching_models_from_the_list(app_dirs, tiny_pipe, tiny_model_dir, page, tmp_path):
    from playwright.sync_api import expect

    (tmp_path / "models").mkdir()
    shutil.copytree(tiny_model_dir, tmp_path / "models" / "tiny-b")
    manager = ModelManager(tiny_model_dir, models_dirs=[tmp_path / "models"], device="cpu",
                           loader=lambda path, device: tiny_pipe).load_initial()
    demo = build_app(context=AppContext(manager, History(app_dirs / "switch"), display_dir=app_dirs / "sw-display"))
    _, url, _ = launch_app(demo, port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        open_app(page, url)
        page.get_by_role("tab", name="Model").click()
        expect(page.locator("#ds-model-info")).to_contain_text(f"{tiny_model_dir.name} on cpu")
        page.locator("#ds-model-dd input").click()
        page.get_by_role("option", name="tiny-b").click()
        page.get_by_role("button", name="Load", exact=True).click()
        expect(page.locator("#ds-model-info")).to_contain_text("tiny-b on cpu")
        assert manager.name == "tiny-b"
        page.screenshot(path=str(ARTIFACTS / "model.png"), full_page=True)
    finally:
        demo.close()


def test_stop_interrupts_a_running_generation(app_dirs, tiny_pipe, tiny_model_dir, page):
    from playwright.sync_api import expect

    demo, url, ctx = serve(app_dirs / "gated", GatedPipe(tiny_pipe), tiny_model_dir)
    try:
        open_app(page, url)
        page.locator("#ds-prompt textarea").fill("a purple cross")
        page.locator("#ds-generate").click()
        expect(page.locator("#ds-status")).to_contain_text("Step 1/", timeout=TIMEOUT_MS)
        page.locator("#ds-stop").click()
        expect(page.locator("#ds-status")).to_contain_text("Stopped at step 1 of 16", timeout=TIMEOUT_MS)
        page.screenshot(path=str(ARTIFACTS / "stopped.png"), full_page=True)
        assert not list((app_dirs / "gated" / "outputs").rglob("*.png"))
    finally:
        demo.close()
