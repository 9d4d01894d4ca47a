"""Reliability probes replayed on loopback (127.0.0.1): a cancel really cancels, a Stop never
sticks, no image is ever overwritten, a kill mid-save leaves a consistent history, every error a
client can trigger reads clearly, and oversized images are refused from their header.

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
    """The /generate inputs as JSON text: the session state (null) first, then the API's 11 values."""
    values = dict(prompt='"a red circle"', negative_prompt='""', num_candidates="3", decision_step="2",
                  num_inference_steps="4", head_steps="2", guidance_scale="3.0", guidance_schedule='"constant"',
                  temperature="1.0", seed="5", num_images="1")
    values.update(overrides)
    return "[null, " + ", ".join(values.values()) + "]"


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
        inputs = '[null, "a red circle", "", 3, 2, 4, 2, 3.0, "constant", 1.0, 6000, false, 2, "' + \
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
        ("[]", "/generate takes 12 input values (session state (send null), prompt, negative_prompt"),
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
