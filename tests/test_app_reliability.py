"""Reliability probes replayed on loopback (127.0.0.1): a cancel really cancels, a Stop never
sticks, no image is ever overwritten, a kill mid-save leaves a consistent history, every error a
client can trigger reads clearly, oversized images are refused from their header, uploads are
read as they look (alpha, 16 bit, EXIF orientation), files that vanish never break a page, and
caption files stay within what the app embeds in a few seconds.

The app runs in-process on the tiny random model behind an instrumented pipeline that records
when each decoding stream starts and ends and how many steps it ran; raw HTTP requests speak
Gradio's queue protocol (POST queue/join, then the queue/data event stream)."""

from __future__ import annotations

import json
import os
import struct
import threading
import time
import zlib
from pathlib import Path

import gradio as gr
import httpx
import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from app import handlers as h  # noqa: E402
from app import history as history_module  # noqa: E402
from app.history import History  # noqa: E402
from app.images import TMP_SUFFIX, open_checked, save_png  # noqa: E402
from app.main import free_port  # noqa: E402
from app.models import ModelManager  # noqa: E402
from app.params import GenerationSettings, ImageRecord  # noqa: E402
from app.ui import CheckedImage, build_app, launch_app  # noqa: E402
from dream_core.config import DreamConfig  # noqa: E402
from dream_core.text import validate_prompts  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

#: What the attack probes try, by category: each round replays these against two app instances
#: on loopback, and the next round starts from them.
PROBE_CATEGORIES = {
    "inputs": "bad values on every endpoint: wrong types (numbers, lists, booleans for strings and "
              "integers), NaN and Infinity, lone surrogates, invisible text, too few or extra values",
    "uploads": "images and masks: non-images, huge and decompression-bomb headers, modes (16 bit, "
               "alpha, palette), EXIF orientation",
    "files": "file routes with traversal and symlinks; files that vanish while listed or served",
    "history": "PNGs dropped into History with hostile parameters (Infinity, 1e400, deep JSON)",
    "cancel": "cancel, Stop and closed connections, while queued and while decoding",
    "concurrency": "3 clients x 3 jobs; two processes on one outputs and display folder",
    "kills": "kill -9 mid-save",
    "resources": "memory over 100 generations; caption files: time, memory, blocking, disk",
}

FAST = dict(num_candidates=3, decision_step=2, num_inference_steps=4, head_steps=2)
WAIT = 60.0  # upper bound of every wait loop (seconds); a healthy run needs a fraction of it


class ProbePipe:
    """The tiny pipeline, instrumented: every `stream` records its start, end and decoded steps.
    With `gate` set, a stream waits after its first step until its job is stopped (at most WAIT
    seconds), so a cancel cannot be won by a fast generation; `delay` slows every step."""

    def __init__(self, pipe) -> None:
        self._pipe = pipe
        self.runs: list[dict] = []
        self.gate = False
        self.delay = 0.0
        self.first_step = threading.Event()

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def stream(self, *args, should_stop=None, **kwargs):
        request = args[0] if args else None
        run = {"start": time.monotonic(), "end": None, "steps": 0,
               "seed": getattr(request, "seed", None) if request is not None else kwargs.get("seed")}
        self.runs.append(run)
        try:
            for event in self._pipe.stream(*args, should_stop=should_stop, **kwargs):
                run["steps"] += 1
                yield event
                if self.gate:
                    self.first_step.set()
                    deadline = time.monotonic() + WAIT
                    while not should_stop() and time.monotonic() < deadline:
                        time.sleep(0.01)
                elif self.delay:
                    time.sleep(self.delay)
        finally:
            run["end"] = time.monotonic()


@pytest.fixture(scope="module")
def served(app_dirs, tiny_pipe, tiny_model_dir):
    # a save killed before this start-up left a temp file: the start-up removes it
    leftover = app_dirs / "outputs" / "2026-01-01" / f"tmpkilled{TMP_SUFFIX}"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"\x89PNG half")
    os.utime(leftover, (time.time() - 3600, time.time() - 3600))
    probe = ProbePipe(tiny_pipe)
    manager = ModelManager(tiny_model_dir, models_dirs=[], device="cpu",
                           loader=lambda path, device: probe).load_initial()
    ctx = h.AppContext(manager, History(app_dirs / "outputs"), display_dir=app_dirs / "display")
    demo = build_app(context=ctx)
    _, url, _ = launch_app(demo, port=free_port(), prevent_thread_lock=True, quiet=True)
    assert url.startswith("http://127.0.0.1:")
    assert not leftover.exists()
    yield url, ctx, probe, demo
    probe.gate, probe.delay = False, 0.0
    demo.close()


def wait_until(condition, timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def saved_with_seed(ctx, seed: int) -> list[Path]:
    return sorted(ctx.history.root.rglob(f"*-{seed}.png"))


def fn_index(demo, name: str) -> int:
    return next(i for i, fn in demo.fns.items() if fn.api_name == name or getattr(fn.fn, "__name__", "") == name)


def raw_queue(url: str, fn: int, data_json: str, session: str, on_message=None, timeout: float = WAIT) -> dict:
    """One request through Gradio's queue over plain HTTP (the body is sent as written, so NaN and
    lone surrogates arrive as a client could send them); returns the final message. `on_message`
    may return True to hang up early (the function then returns that message)."""
    body = f'{{"data": {data_json}, "fn_index": {fn}, "session_hash": "{session}", "event_data": null, "trigger_id": null}}'
    with httpx.Client(timeout=timeout) as http:
        r = http.post(url + "gradio_api/queue/join", content=body.encode("utf-8", "surrogatepass"),
                      headers={"Content-Type": "application/json"})
        r.raise_for_status()
        event_id = r.json()["event_id"]
        with http.stream("GET", url + "gradio_api/queue/data", params={"session_hash": session}) as stream:
            for line in stream.iter_lines():
                if not line.startswith("data:"):
                    continue
                msg = json.loads(line[5:])
                if msg.get("event_id") not in (None, event_id):
                    continue
                if on_message is not None and on_message(msg):
                    return msg
                if msg.get("msg") == "process_completed":
                    return msg
    raise AssertionError("the queue stream ended without a result")


def generate_json(**overrides) -> str:
    """The /generate inputs as JSON text: the session state (null) first, then the API's 12 values."""
    values = dict(prompt='"a red circle"', negative_prompt='""', num_candidates="3", decision_step="2",
                  num_inference_steps="4", head_steps="2", guidance_scale="3.0", guidance_schedule='"constant"',
                  temperature="1.0", seed="5", num_images="1", head_sampler="null")
    values.update(overrides)
    return "[null, " + ", ".join(values.values()) + "]"


def refusal(url: str, fn: int, data_json: str, session: str) -> str:
    """The error message of a raw request that must be refused (checked to read clearly)."""
    msg = raw_queue(url, fn, data_json, session)
    assert msg["msg"] == "process_completed" and not msg["success"], (data_json, msg)
    error = msg["output"]["error"]
    assert_readable(error)
    return error


def assert_readable(message: str) -> None:
    for leak in ("Traceback", "object at 0x", "[state, textbox", "Could not preprocess", "TextEncodeInput"):
        assert leak not in message, message
    assert not message.startswith(("'", '"')), message  # no repr() of an error


# ----- cancel, disconnect, stop -----
def test_cancel_stops_decoding_and_the_next_job_waits(served, client, app_dirs):
    url, ctx, probe, _ = served
    other = Client(url, verbose=False, download_files=str(app_dirs / "dl-other"))
    try:
        probe.runs.clear()
        probe.first_step.clear()
        probe.gate = True
        job = client.submit(prompt="a red circle", seed=1000, num_images=3, api_name="/generate", **FAST)
        assert probe.first_step.wait(WAIT), "the job never started decoding"
        queued = other.submit(prompt="a blue square", seed=2000, api_name="/generate", **FAST)
        job.cancel()
        assert wait_until(lambda: probe.runs[0]["end"] is not None), "decoding went on after the cancel"
        probe.gate = False
        assert probe.runs[0]["steps"] == 1  # stopped before its second decoding step
        files, records = queued.result(timeout=WAIT)
        assert [r["seed"] for r in records] == [2000]
    finally:
        probe.gate = False
        other.close()
    assert len(probe.runs) == 2 and probe.runs[1]["seed"] == 2000
    assert probe.runs[1]["start"] >= probe.runs[0]["end"]  # one job at a time, even across a cancel
    assert saved_with_seed(ctx, 1000) == []  # nothing unfinished was saved
    # the session is ready again: the same client generates normally
    files, records = client.predict(prompt="a red circle", seed=1001, api_name="/generate", **FAST)
    assert len(files) == 1 and records[0]["seed"] == 1001 and len(saved_with_seed(ctx, 1001)) == 1
    assert ctx.job_lock.acquire(blocking=False)
    ctx.job_lock.release()


def test_closed_connection_stops_decoding(served):
    url, ctx, probe, demo = served
    probe.runs.clear()
    probe.delay = 0.2
    updates = []

    def hang_up(msg: dict) -> bool:  # the API reports "Starting", then every decoding step
        updates.append(msg.get("msg") == "process_generating")
        return sum(updates) == 2

    try:
        msg = raw_queue(url, fn_index(demo, "generate"), generate_json(seed="3000", num_images="3"), "hangup-1",
                        on_message=hang_up)
        assert msg["msg"] == "process_generating" and probe.runs  # hung up after the first decoding step
        assert wait_until(lambda: probe.runs and all(r["end"] is not None for r in probe.runs)
                          and time.monotonic() - probe.runs[-1]["end"] > 0.5)
    finally:
        probe.delay = 0.0
    steps = [r["steps"] for r in probe.runs]
    assert sum(steps) < 3 * 4, steps  # 3 images of 4 steps were asked for
    finished = sum(s == 4 for s in steps)
    assert len(saved_with_seed(ctx, 3000)) + len(saved_with_seed(ctx, 3003)) == finished  # only whole images
    assert ctx.job_lock.acquire(blocking=False)
    ctx.job_lock.release()


def test_stop_button_stops_the_ui_generation(served):
    """The page's own events over HTTP: Generate (begin_job, then the queued ui_generate), and
    Stop while it decodes (the browser tests do this with clicks, where Chromium is installed)."""
    url, ctx, probe, demo = served
    session = "ui-stop"

    def call(name: str) -> None:
        r = httpx.post(url + "gradio_api/run/predict", timeout=WAIT,
                       json={"data": [None], "fn_index": fn_index(demo, name), "session_hash": session})
        assert r.status_code == 200, r.text

    def stop_after_first_step(msg: dict) -> bool:
        if msg.get("msg") == "process_generating" and not stopped:
            assert probe.first_step.wait(WAIT), "the job never started decoding"
            stopped.append(True)
            call("request_stop")  # while the job waits after its first step
        return False

    stopped: list[bool] = []
    probe.runs.clear()
    probe.first_step.clear()
    probe.gate = True
    try:
        call("begin_job")
        inputs = '[null, "a red circle", "", 3, 2, 4, 2, "ancestral", 3.0, "constant", 1.0, 6000, false, 2, "' + \
            h.PREVIEW_MARKED + '"]'
        msg = raw_queue(url, fn_index(demo, "ui_generate"), inputs, session, on_message=stop_after_first_step)
    finally:
        probe.gate = False
    assert msg["success"] and stopped
    assert [r["steps"] for r in probe.runs] == [1] and saved_with_seed(ctx, 6000) == []


def test_stop_while_idle_does_not_stick(served, app_dirs):
    url, ctx, probe, demo = served
    c = Client(url, verbose=False, download_files=str(app_dirs / "dl-stop"))
    try:
        stop = fn_index(demo, "request_stop")
        r = httpx.post(url + "gradio_api/run/predict", timeout=WAIT,
                       json={"data": [None], "fn_index": stop, "session_hash": c.session_hash})
        assert r.status_code == 200, r.text
        files, records = c.predict(prompt="a red circle", seed=4000, api_name="/generate", **FAST)
        assert len(files) == 1 and records[0]["seed"] == 4000
    finally:
        c.close()


# ----- errors a client can trigger -----
def test_bad_inputs_through_the_client_read_clearly(client, tmp_path):
    ok = tmp_path / "ok.png"
    Image.new("RGB", (8, 8)).save(ok)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    cases = [
        (dict(prompt="a red circle", num_candidates=2.5, api_name="/generate"), ("num_candidates", "2.5")),
        (dict(prompt="a red circle", seed=-5, api_name="/generate"), ("seed", "-5")),
        (dict(prompt="a red circle", seed=2.5, api_name="/generate"), ("seed", "2.5")),
        (dict(prompt="a red circle", num_candidates="four", api_name="/generate"), ("num_candidates", "four")),
        (dict(image=handle_file(str(ok)), top_k=2.5, api_name="/search"), ("top_k", "2.5")),
        (dict(image=handle_file(str(ok)), mode="everything", api_name="/search"),
         ("search mode must be one of: bank, file, labels",)),
        (dict(image=handle_file(str(ok)), mode="labels", labels="circle", api_name="/search"),
         ("zero-shot classification needs at least two labels",)),
        (dict(image=handle_file(str(ok)), mode="file", captions_file=handle_file(str(latin)), api_name="/search"),
         ("the caption file is not UTF-8 text",)),
    ]
    for kwargs, parts in cases:
        with pytest.raises(AppError) as err:
            client.predict(**kwargs)
        message = str(err.value)
        assert all(p in message for p in parts), (kwargs, message)
        assert_readable(message)


def test_malformed_raw_requests_read_clearly(served):
    url, ctx, probe, demo = served
    gen = fn_index(demo, "generate")
    cases = [
        (generate_json(prompt='"\\ud800"'), "prompt contains invalid characters"),
        (generate_json(negative_prompt='"x\\udfff"'), "negative_prompt contains invalid characters"),
        (generate_json(seed="NaN"), "seed must be a whole number"),
        (generate_json(num_candidates="NaN"), "num_candidates"),
        (generate_json(num_candidates='"four"'), "num_candidates"),
        ("[]", "/generate takes 13 input values (session state (send null), prompt, negative_prompt"),
    ]
    for i, (data, expected) in enumerate(cases):
        msg = raw_queue(url, gen, data, f"raw-{i}")
        assert msg["msg"] == "process_completed" and not msg["success"], msg
        error = msg["output"]["error"]
        assert expected in error, (data, error)
        assert_readable(error)
    assert saved_with_seed(ctx, 5) == []


def test_lone_surrogates_are_refused_by_prompt_validation():
    for bad in ("\ud800", "a red \udfff circle"):
        with pytest.raises(ValueError, match="^labels contains invalid characters"):
            validate_prompts(["circle", bad], "labels")


# ----- images too large, refused from the header -----
def one_bit_png(path: Path, side: int) -> Path:
    """A valid 1-bit black PNG of side x side pixels, a few KB on disk (written without PIL)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (side + 7) // 8)
    idat = zlib.compress(row * side, 9)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


@pytest.fixture
def decodes(monkeypatch):
    """Sizes of the images PIL decodes (ImageFile.load) while the test runs."""
    from PIL import ImageFile

    seen: list[tuple[int, int]] = []
    load = ImageFile.ImageFile.load

    def counting(self):
        seen.append(self.size)
        return load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting)
    return seen


def test_huge_image_is_refused_before_decoding(client, tmp_path, decodes):
    big = one_bit_png(tmp_path / "big.png", 13_000)
    assert big.stat().st_size < 100_000
    with pytest.raises(AppError, match=r"big.png: the image is too large \(13000x13000 pixels\); at most 4096"):
        client.predict(image=handle_file(str(big)), api_name="/search")
    with pytest.raises(ValueError, match=r"too large \(13000x13000 pixels\)"):
        open_checked(big)  # what a PNG dropped in History goes through
    component = CheckedImage(type="filepath")
    with pytest.raises(gr.Error, match=r"too large \(13000x13000 pixels\)"):
        component.preprocess(gr.FileData(path=str(big), orig_name="big.png"))
    bomb = one_bit_png(tmp_path / "bomb.png", 20_000)  # beyond PIL's own decompression-bomb limit
    with pytest.raises(ValueError, match="too large"):
        open_checked(bomb)
    assert (13_000, 13_000) not in decodes and (20_000, 20_000) not in decodes


# ----- saving: no overwrite across processes, consistent after a kill -----
def _image(value: int) -> Image.Image:
    return Image.new("RGB", (8, 8), (value % 256, value // 256, 7))


def _record(seed: int = 42) -> ImageRecord:
    s = GenerationSettings("a red circle", seed=seed, **FAST).validated(DreamConfig.preset("shapes"))
    return ImageRecord.build(s, seed, 0, [0.1, 0.2, 0.3], "tiny", (8, 8), 16)


def test_a_name_taken_by_another_process_is_never_overwritten(tmp_path, monkeypatch):
    """History A has counted the day's files; before it writes, another process (History B, its
    own lock) takes that very name. A must take the next one."""
    root = tmp_path / "outputs"
    a, b = History(root), History(root)
    real_save = history_module.save_png
    raced = []

    def racing_save(image, path, record, exclusive=False):
        if not raced:
            raced.append(path)
            monkeypatch.setattr(history_module, "save_png", real_save)
            b.save(_image(2), record)  # the other process wins the race for `path`
            monkeypatch.setattr(history_module, "save_png", racing_save)
        return real_save(image, path, record, exclusive=exclusive)

    monkeypatch.setattr(history_module, "save_png", racing_save)
    path_a = a.save(_image(1), _record())
    files = sorted(root.rglob("*.png"))
    assert [p.name for p in files] == ["00001-42.png", "00002-42.png"] and raced[0].name == "00001-42.png"
    assert path_a.name == "00002-42.png"
    assert Image.open(files[0]).getpixel((0, 0)) == (2, 0, 7) and Image.open(files[1]).getpixel((0, 0)) == (1, 0, 7)
    with pytest.raises(FileExistsError):
        save_png(_image(3), files[0], _record(), exclusive=True)
    assert Image.open(files[0]).getpixel((0, 0)) == (2, 0, 7)


def test_two_writers_with_one_seed_keep_every_image(tmp_path):
    root = tmp_path / "outputs"
    writers = [History(root), History(root)]  # separate locks: as two processes
    per_writer = 15
    start = threading.Barrier(2)
    errors: list[BaseException] = []

    def work(w: int) -> None:
        try:
            start.wait(timeout=WAIT)
            for i in range(per_writer):
                writers[w].save(_image(w * 100 + i), _record())
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=WAIT)
    assert not errors and not any(t.is_alive() for t in threads)
    files = sorted(root.rglob("*.png"))
    assert len(files) == 2 * per_writer
    colors = sorted(Image.open(p).getpixel((0, 0)) for p in files)
    assert colors == sorted(_image(w * 100 + i).getpixel((0, 0)) for w in range(2) for i in range(per_writer))
    assert not list(root.rglob(f"*{TMP_SUFFIX}"))


def test_a_kill_during_a_save_leaves_a_consistent_history(tmp_path, monkeypatch):
    root = tmp_path / "outputs"
    history = History(root)
    good = history.save(_image(1), _record(5))
    day = good.parent
    # what a kill leaves: a temp file of the interrupted save, and (from a writer that did not
    # save atomically) a truncated PNG under a real name
    stale = day / f"tmp123{TMP_SUFFIX}"
    stale.write_bytes(good.read_bytes()[:40])
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    truncated = day / "00002-5.png"
    truncated.write_bytes(good.read_bytes()[:60])
    fresh = day / f"tmp456{TMP_SUFFIX}"  # another process saving right now: not a leftover
    fresh.write_bytes(b"\x89PNG")

    restarted = History(root)  # the next start-up
    assert restarted.remove_leftovers() == [stale]
    assert not stale.exists() and fresh.exists()
    assert [e.path for e in restarted.entries()] == [good]  # the truncated file is not an entry
    assert restarted.save(_image(2), _record(5)).name == "00003-5.png"  # and its name is not reused
    assert truncated.read_bytes() == good.read_bytes()[:60]

    # an interrupted save (an exception mid-write) leaves neither a file under the name nor a temp file
    def broken_save(self, fp, format=None, **params):
        Path(fp).write_bytes(b"\x89PNG partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        restarted.save(_image(3), _record(5))
    assert sorted(p.name for p in day.iterdir()) == ["00001-5.png", "00002-5.png", "00003-5.png", fresh.name]


# ----- uploads: masks, modes, bit depth, orientation -----
def _source_png(path: Path) -> Path:
    Image.new("RGB", (32, 32), (200, 30, 30)).save(path)
    return path


def test_a_masks_transparent_pixels_are_not_masked(client, tmp_path):
    source = _source_png(tmp_path / "source.png")
    clear = tmp_path / "clear.png"
    Image.new("RGBA", (32, 32), (255, 255, 255, 0)).save(clear)  # white, fully transparent
    corner = tmp_path / "corner.png"
    mask = Image.new("RGBA", (32, 32), (255, 255, 255, 0))
    mask.paste((255, 255, 255, 255), (0, 0, 16, 16))  # opaque only over the top-left 16 x 16
    mask.save(corner)
    edit = dict(prompt="a red circle", num_candidates=2, head_steps=2, seed=21, api_name="/inpaint")
    with pytest.raises(AppError, match="mask is empty"):
        client.predict(image=handle_file(str(source)), mask=handle_file(str(clear)), **edit)
    files, records, _ = client.predict(image=handle_file(str(source)), mask=handle_file(str(corner)), **edit)
    assert records[0]["regenerated_tokens"] == [0, 1, 4, 5]  # 2 x 2 of the 4 x 4 tokens


def _grey_gradient() -> np.ndarray:
    return (np.arange(32 * 32).reshape(32, 32) % 251).astype(np.uint8)


def test_16_bit_greyscale_is_scaled_not_clipped(client, tmp_path):
    eight = tmp_path / "grey8.png"
    Image.fromarray(_grey_gradient()).save(eight)
    sixteen = tmp_path / "grey16.png"
    Image.fromarray(_grey_gradient().astype(np.uint16) * 257).save(sixteen)  # the same picture, 16 bit
    assert Image.open(sixteen).mode.startswith("I")
    same = client.predict(image=handle_file(str(eight)), top_k=3, api_name="/search")
    assert client.predict(image=handle_file(str(sixteen)), top_k=3, api_name="/search") == same
    image = h.edit_input_from_files(str(sixteen), None, 0.5, False).image
    assert np.array_equal(np.asarray(image)[..., 0], _grey_gradient())


def test_exif_orientation_is_applied_to_images_and_masks(tmp_path):
    wide = Image.new("RGB", (40, 20), (0, 0, 255))
    wide.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: 20 wide, 40 tall, red on top
    photo = tmp_path / "photo.jpg"
    wide.save(photo, quality=95, exif=exif.tobytes())
    mask = tmp_path / "mask.png"
    painted = Image.new("L", (40, 20), 0)
    painted.paste(255, (0, 0, 20, 20))
    painted.save(mask, exif=exif.tobytes())
    edit = h.edit_input_from_files(str(photo), str(mask), None, True)
    assert edit.image.size == (20, 40)
    r, g, b = edit.image.getpixel((10, 5))
    assert r > 200 and b < 60, (r, g, b)
    assert edit.mask.size == (20, 40) and edit.mask.getpixel((10, 5)) and not edit.mask.getpixel((10, 35))


# ----- inputs: types, invisible prompts, extra values -----
def test_wrong_types_are_refused_not_coerced(served, client, tmp_path):
    url, ctx, probe, demo = served
    gen = fn_index(demo, "generate")
    cases = [
        (generate_json(prompt="123"), "prompt must be a string"),
        (generate_json(prompt='["a", "b"]'), "prompt must be a single string"),
        (generate_json(guidance_scale="true"), "guidance_scale must be a number"),
        (generate_json(temperature='"0.5"'), "temperature must be a number"),
        (generate_json(negative_prompt="7"), "negative_prompt must be a string"),
    ]
    for i, (data, expected) in enumerate(cases):
        error = refusal(url, gen, data, f"types-{i}")
        assert expected in error, (data, error)
    ok = tmp_path / "ok.png"
    Image.new("RGB", (8, 8)).save(ok)
    with pytest.raises(AppError, match="top_k must be a whole number between 1 and 100, got True"):
        client.predict(image=handle_file(str(ok)), top_k=True, api_name="/search")
    assert saved_with_seed(ctx, 5) == []


def test_prompts_of_only_invisible_characters_are_empty(served):
    url, ctx, probe, demo = served
    gen = fn_index(demo, "generate")
    for i, prompt in enumerate(['"\\u0000\\u0000"', '"\\u200b\\u200b"', '"\\u200b \\ufeff\\u2060\\u00ad"']):
        assert "prompt must not be empty" in refusal(url, gen, generate_json(prompt=prompt), f"invisible-{i}")
    assert saved_with_seed(ctx, 5) == []
    tiny = DreamConfig.preset("tiny")
    kept = GenerationSettings("a red\u00a0circle \U0001f600\u200d\U0001f600", **FAST).validated(tiny).prompt
    assert kept == "a red circle \U0001f600\u200d\U0001f600"  # visible text keeps its joiners


def test_extra_or_shifted_values_are_refused(served):
    url, ctx, probe, demo = served
    twelve = generate_json()[len("[null, "):-1]  # the API's 12 values, without the session state
    cases = [
        ("generate", generate_json()[:-1] + ", 7]", "/generate takes 13 input values", "the request sent 14"),
        ("generate", "[" + twelve + ", 7]", "/generate: value 1 is the session state", "send null"),
        ("inpaint", '[null, null, null, "a", "", 3, 0, 2, 3.0, "constant", 1.0, 5, true, false, null, 9]',
         "/inpaint takes 15 input values", "the request sent 16"),
        ("inpaint", '["a", null, null, "a", "", 3, 0, 2, 3.0, "constant", 1.0, 5, true, false, null]',
         "/inpaint: value 1 is the session state", "send null"),
        ("variations", '[null, null, "", 0.5, "", 3, 0, 2, 3.0, "constant", 1.0, 5, false, false, null, 1]',
         "/variations takes 15 input values", "the request sent 16"),
        ("search", '[null, 5, "bank", null, "", 1]', "/search takes 5 input values", "the request sent 6"),
    ]
    for i, (name, data, *expected) in enumerate(cases):
        error = refusal(url, fn_index(demo, name), data, f"extra-{i}")
        assert all(e in error for e in expected), (name, error)
    assert saved_with_seed(ctx, 5) == []


def test_variations_without_strength_name_the_strength(client, tmp_path):
    source = _source_png(tmp_path / "source.png")
    with pytest.raises(AppError) as err:
        client.predict(image=handle_file(str(source)), prompt="a red circle", strength=None,
                       api_name="/variations")
    message = str(err.value)
    assert "strength" in message and "inpaint" not in message and "mask" not in message, message
    assert_readable(message)


# ----- history: hostile parameters, files that vanish -----
def _png_with_text(path: Path, key: str, text: str) -> Path:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text(key, text)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


def test_hostile_parameters_in_a_dropped_png_read_clearly(tmp_path):
    from app.params import INFOTEXT_KEY, PARAMS_KEY

    deep = "[" * 3000 + "]" * 3000
    cases = {
        "infinity": (PARAMS_KEY, '{"prompt": "a red circle", "seed": Infinity}'),
        "overflow": (PARAMS_KEY, '{"prompt": "a red circle", "seed": 1e400}'),
        "nan": (PARAMS_KEY, '{"prompt": "a red circle", "seed": 3, "guidance_scale": NaN}'),
        "deep": (PARAMS_KEY, '{"prompt": "a red circle", "seed": 3, "extra": ' + deep + "}"),
        "deep-infotext": (INFOTEXT_KEY, "a red circle\nSteps: 4, Seed: 3, Candidate scores: " + deep),
    }
    for name, (key, text) in cases.items():
        path = _png_with_text(tmp_path / f"{name}.png", key, text)
        try:
            record = h.read_parameters(str(path))
        except gr.Error as err:
            assert_readable(err.message)
            continue
        json.dumps(record.to_dict(), allow_nan=False)  # what the page shows is plain JSON
        h.controls_from_record(record, DreamConfig.preset("tiny"))


def test_a_vanishing_history_file_is_skipped(tmp_path, monkeypatch):
    history = History(tmp_path / "outputs")
    paths = [history.save(_image(i), _record(40 + i)) for i in range(3)]
    real_stat = Path.stat

    def racing_stat(self, *args, **kwargs):  # another process deletes the file as it is listed
        if self == paths[1]:
            self.unlink(missing_ok=True)
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", racing_stat)
    assert [e.path for e in history.entries()] == [paths[2], paths[0]]


def test_a_file_deleted_while_the_page_loads_is_left_out(served, monkeypatch):
    url, ctx, probe, demo = served
    saved = [ctx.history.save(_image(70 + i), _record(7000 + i)) for i in range(2)]
    real_stat = Path.stat

    def racing_stat(self, *args, **kwargs):  # deleted by another process while the page lists it
        if self == saved[0]:
            self.unlink(missing_ok=True)
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", racing_stat)
    r = httpx.post(url + "gradio_api/run/predict", timeout=WAIT,
                   json={"data": [None], "fn_index": fn_index(demo, "on_load"), "session_hash": "load-race"})
    assert r.status_code == 200, r.text
    names = [item["image"]["orig_name"] for item in r.json()["data"][-1]]
    assert saved[1].name in names and saved[0].name not in names


def test_display_copies_are_pruned_while_another_instance_prunes(tmp_path, tiny_pipe, tiny_model_dir, monkeypatch):
    manager = ModelManager(tiny_model_dir, models_dirs=[], device="cpu", loader=lambda path, device: tiny_pipe)
    display = tmp_path / "display"
    ctx = h.AppContext(manager.load_initial(), History(tmp_path / "outputs"), display_dir=display)
    display.mkdir()
    old = time.time() - 3600
    for i in range(ctx.keep_display_files + 5):
        p = display / f"old-{i:03d}.png"
        p.write_bytes(b"\x89PNG")
        os.utime(p, (old + i, old + i))
    real_stat = Path.stat
    vanished: list[str] = []

    def racing_stat(self, *args, **kwargs):  # the other instance prunes the same files meanwhile
        if self.parent == display and self.name.startswith("old-") and len(vanished) < 3:
            self.unlink(missing_ok=True)
            vanished.append(self.name)
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", racing_stat)
    paths, records = h.generate_images(ctx, h.SessionState(), GenerationSettings("a red circle", seed=77, **FAST))
    monkeypatch.setattr(Path, "stat", real_stat)
    assert len(paths) == 1 and Path(paths[0]).is_file() and vanished
    left = sorted(p.name for p in display.glob("*.png"))
    assert len(left) <= ctx.keep_display_files and any(not n.startswith("old-") for n in left)


# ----- resources: caption files -----
def test_caption_files_over_the_stated_limit_are_refused(client, tmp_path):
    from dream_core.retrieval import MAX_CAPTION_FILE_BYTES, MAX_CAPTION_FILE_LINES

    assert MAX_CAPTION_FILE_LINES <= 5_000 and MAX_CAPTION_FILE_BYTES <= 2**20  # what 2 cores embed in seconds
    ok = tmp_path / "ok.png"
    Image.new("RGB", (8, 8)).save(ok)
    many = tmp_path / "many.txt"
    many.write_text("".join(f"a red circle number {i}\n" for i in range(MAX_CAPTION_FILE_LINES + 1)))
    with pytest.raises(AppError, match=f"at most {MAX_CAPTION_FILE_LINES:,} captions"):
        client.predict(image=handle_file(str(ok)), mode="file", captions_file=handle_file(str(many)),
                       api_name="/search")
    wide = tmp_path / "wide.txt"
    wide.write_text("a red circle " * (MAX_CAPTION_FILE_BYTES // 13 + 1) + "\n")
    with pytest.raises(AppError, match="the caption file is too large"):
        client.predict(image=handle_file(str(ok)), mode="file", captions_file=handle_file(str(wide)),
                       api_name="/search")


def test_embedding_a_caption_file_does_not_block_other_searches(served, client, app_dirs, tiny_pipe, tmp_path,
                                                                monkeypatch):
    url, ctx, probe, demo = served
    ok = tmp_path / "ok.png"
    Image.new("RGB", (8, 8), (10, 200, 10)).save(ok)
    captions = tmp_path / "captions.txt"
    captions.write_text("".join(f"a green square number {i}\n" for i in range(40)))
    real_embed = tiny_pipe.embed_texts
    embedding, release = threading.Event(), threading.Event()

    def slow_embed(texts, *args, **kwargs):  # the caption file takes as long as the test wants
        if len(texts) >= 40:
            embedding.set()
            release.wait(WAIT)
        return real_embed(texts, *args, **kwargs)

    monkeypatch.setattr(tiny_pipe, "embed_texts", slow_embed)
    other = Client(url, verbose=False, download_files=str(app_dirs / "dl-search"))
    try:
        job = client.submit(image=handle_file(str(ok)), mode="file", captions_file=handle_file(str(captions)),
                            api_name="/search")
        assert embedding.wait(WAIT), "the caption file was never embedded"
        plain = other.submit(image=handle_file(str(ok)), top_k=2, api_name="/search")
        started = time.monotonic()
        results = plain.result(timeout=20)
        assert len(results) == 2 and time.monotonic() - started < 20
        assert not job.done()  # the caption file is still being embedded
    finally:
        release.set()
        other.close()
    assert len(job.result(timeout=WAIT)) == 5


def test_the_bank_cache_is_bounded_and_cleaned(tmp_path, monkeypatch):
    import torch

    from dream_core import retrieval

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = retrieval.cache_dir()
    folder.mkdir(parents=True)
    stale, fresh = folder / "killed.safetensors.tmp", folder / "writing.safetensors.tmp"
    stale.write_bytes(b"half")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    fresh.write_bytes(b"half")

    def embed(texts):
        return torch.nn.functional.normalize(torch.ones(len(texts), 8), dim=-1)

    first = retrieval.CaptionBank.build(embed, "weights", ["the first bank"])
    for i in range(3 * retrieval.MAX_CACHED_BANKS):
        retrieval.CaptionBank.build(embed, "weights", [f"caption file {i}", "a red circle"])
        retrieval.CaptionBank.build(embed, "weights", ["the first bank"])  # in use: kept
    banks = list(folder.glob("*.safetensors"))
    assert len(banks) <= retrieval.MAX_CACHED_BANKS
    assert sum(p.stat().st_size for p in banks) <= retrieval.MAX_CACHE_BYTES
    assert not stale.exists() and fresh.exists()
    calls = []
    again = retrieval.CaptionBank.build(lambda t: calls.append(t) or embed(t), "weights", ["the first bank"])
    assert calls == [] and torch.equal(again.embeddings, first.embeddings)  # still served from the cache


# ----- the second bundled model: menu, examples, search display, card -----
EMOJI_LINES = ["grinning face\t😀  face, grin, smile",
               "red heart\t❤️  " + ", ".join(f"love {i}" for i in range(60))]  # caption<TAB>detail, a long detail


@pytest.fixture
def two_models(tmp_path, tiny_model_dir):
    import shutil

    assets = tmp_path / "assets"
    shapes = shutil.copytree(tiny_model_dir, assets / "dream-shapes")
    emoji = shutil.copytree(tiny_model_dir, assets / "dream-emoji")
    (shapes / "examples.txt").write_text("a red circle\n\na blue square at the top\n")
    (emoji / "examples.txt").write_text("grinning face\nred heart\nthumbs up\n")
    (emoji / "captions.txt").write_text("\n".join(EMOJI_LINES) + "\n", encoding="utf-8")
    (emoji / "README.md").write_text("---\nlicense: cc-by-4.0\ntags:\n- emoji\n---\n\n# dream-emoji\n\nEmoji.\n")
    return assets


def test_the_model_menu_examples_and_card_follow_the_model(two_models, tmp_path, app_dirs):
    from dream_core.pipeline import DreamPipeline, default_model_dir

    assert default_model_dir().name == "dream-shapes" or "DREAM_MODEL" in os.environ
    manager = ModelManager(two_models / "dream-shapes", models_dirs=[two_models], device="cpu",
                           loader=lambda path, device: DreamPipeline.from_pretrained(path, device="cpu"))
    ctx = h.AppContext(manager.load_initial(), History(tmp_path / "outputs"), display_dir=tmp_path / "display")
    assert sorted(manager.choices()) == ["dream-emoji", "dream-shapes"] and manager.name == "dream-shapes"
    demo = build_app(context=ctx)
    examples = next(b for b in demo.blocks.values() if isinstance(b, gr.Dataset))
    assert examples.raw_samples == [["a red circle"], ["a blue square at the top"]]
    switch = next(f for f in demo.fns.values() if f.name == "ui_switch")
    out = dict(zip([b._id for b in switch.outputs], switch.fn("dream-emoji")))
    update = out[examples._id]
    assert update.raw_samples == [["grinning face"], ["red heart"], ["thumbs up"]]
    card = h.model_card(ctx)
    assert card.startswith("# dream-emoji") and "license" not in card and "---" not in card
    ok = tmp_path / "ok.png"
    Image.new("RGB", (8, 8)).save(ok)
    found = h.search(ctx, str(ok), 5)
    # each name, with its emoji and keywords beside it, shown whole in a column of their own
    assert {r["caption"]: r["details"] for r in found} == dict(line.split("\t") for line in EMOJI_LINES)
    results = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "ds-results")
    assert results.headers == list(h.SEARCH_COLUMNS) and results.wrap
    assert len(results.column_widths) == len(h.SEARCH_COLUMNS) and "auto" not in results.column_widths
