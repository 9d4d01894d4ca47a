"""End to end over HTTP: gradio_client against the app launched on the tiny model (in-process
for speed; one test starts `launch.py` as a subprocess, as a user would)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from PIL import Image

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from app.handlers import AppContext  # noqa: E402
from app.history import History  # noqa: E402
from app.main import free_port  # noqa: E402
from app.models import ModelManager  # noqa: E402
from app.params import PARAMS_KEY  # noqa: E402
from app.ui import build_app, launch_app  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
FAST = dict(num_candidates=3, decision_step=2, num_inference_steps=4, head_steps=2)


@pytest.fixture(scope="module")
def served(app_dirs, tiny_pipe, tiny_model_dir):
    manager = ModelManager(tiny_model_dir, models_dirs=[], device="cpu",
                           loader=lambda path, device: tiny_pipe).load_initial()
    ctx = AppContext(manager, History(app_dirs / "outputs"), display_dir=app_dirs / "display")
    demo = build_app(context=ctx)
    _, url, _ = launch_app(demo, port=free_port(), prevent_thread_lock=True, quiet=True)
    yield url, ctx
    demo.close()


def test_api_lists_the_typed_endpoints(client):
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert set(api) == {"/generate", "/inpaint", "/variations", "/search"}
    params = {p["parameter_name"]: p for p in api["/generate"]["parameters"]}
    assert list(params) == ["prompt", "negative_prompt", "num_candidates", "decision_step", "num_inference_steps",
                            "head_steps", "guidance_scale", "guidance_schedule", "temperature", "seed", "num_images",
                            "head_sampler"]  # appended: callers that pass the others by position still work
    assert params["head_sampler"]["parameter_default"] == "ancestral"
    assert params["num_candidates"]["python_type"]["type"] == "int"
    assert params["seed"]["parameter_default"] == -1


def test_generate_returns_png_with_parameters(client, tiny_pipe, served):
    files, records = client.predict(prompt="a red circle", seed=7, api_name="/generate", **FAST)
    assert len(files) == 1 and len(records) == 1
    png = Image.open(files[0])
    assert png.format == "PNG" and png.size == (32, 32)
    stored = json.loads(png.text[PARAMS_KEY])
    assert stored == records[0]
    out = tiny_pipe("a red circle", seed=7, **FAST)
    assert stored["chosen_candidate"] == out.chosen[0] and stored["seed"] == 7
    assert stored["candidate_scores"] == [round(s, 6) for s in out.scores[0]]
    assert "Chosen candidate: " in png.text["parameters"]
    saved = list(served[1].history.root.rglob(Path(files[0]).name))
    assert len(saved) == 1 and saved[0].read_bytes() == Path(files[0]).read_bytes()


def test_search_returns_ranked_captions(client, tiny_pipe, tmp_path):
    img = tmp_path / "q.png"
    Image.new("RGB", (40, 40), (30, 30, 220)).save(img)
    results = client.predict(image=handle_file(str(img)), top_k=4, api_name="/search")
    assert [r["rank"] for r in results] == [1, 2, 3, 4]
    assert all(r["caption"] in tiny_pipe.captions and r["details"] == "" for r in results)  # a bank without details
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
    labels = client.predict(image=handle_file(str(img)), mode="labels", labels="circle\nsquare", api_name="/search")
    assert sorted(r["caption"] for r in labels) == ["circle", "square"]
    bank = tmp_path / "bank.txt"
    bank.write_text("a blue square\ta square, blue\na red circle\na green triangle\n")
    mine = client.predict(image=handle_file(str(img)), mode="file", captions_file=handle_file(str(bank)), top_k=2,
                          api_name="/search")
    details = {"a blue square": "a square, blue", "a red circle": "", "a green triangle": ""}
    assert len(mine) == 2 and all(details[r["caption"]] == r["details"] for r in mine)


def test_bad_inputs_return_error_messages(client, tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_text("just text")
    huge = tmp_path / "huge.png"
    Image.new("L", (5000, 4)).save(huge)
    ok = tmp_path / "ok.png"
    Image.new("RGB", (8, 8)).save(ok)
    cases = [
        (dict(prompt="", api_name="/generate"), "prompt must not be empty"),
        (dict(prompt="a red circle", num_inference_steps=99, api_name="/generate"), "between 1 and 16"),
        (dict(prompt="a red circle", num_candidates=0, api_name="/generate"), "num_candidates must be between 1 and 16"),
        (dict(prompt="a red circle", num_inference_steps=4, decision_step=4, api_name="/generate"),
         "decision_step must be between 1 and 3"),
        (dict(prompt="a red circle", guidance_schedule="cosine", api_name="/generate"),
         "guidance_schedule must be one of constant, linear, got 'cosine'"),
        (dict(image=handle_file(str(junk)), api_name="/search"), "junk.png is not an image"),
        (dict(image=handle_file(str(huge)), api_name="/search"), "too large (5000x4 pixels)"),
        (dict(image=handle_file(str(ok)), mode="file", api_name="/search"), "upload a caption file"),
        (dict(image=handle_file(str(ok)), mode="labels", labels="only-one", api_name="/search"), "at least two labels"),
    ]
    for kwargs, message in cases:
        with pytest.raises(AppError) as err:
            client.predict(**kwargs)
        assert message in str(err.value), (kwargs, str(err.value))
        assert "Traceback" not in str(err.value)


def test_oversized_upload_is_refused(client, tmp_path):
    big = tmp_path / "big.png"
    with open(big, "wb") as f:
        f.truncate(21 * 2**20)
    with pytest.raises(ValueError, match="exceeds the maximum file size of 20971520 bytes"):
        client.predict(image=handle_file(str(big)), api_name="/search")


def test_two_users_get_only_their_own_images(served, app_dirs):
    a = Client(served[0], verbose=False, download_files=str(app_dirs / "dl-a"))
    b = Client(served[0], verbose=False, download_files=str(app_dirs / "dl-b"))
    try:
        job_a = a.submit(prompt="a red circle", seed=1, api_name="/generate", **FAST)
        job_b = b.submit(prompt="a blue square", seed=2, api_name="/generate", **FAST)
        files_a, rec_a = job_a.result(timeout=300)
        files_b, rec_b = job_b.result(timeout=300)
    finally:
        a.close()
        b.close()
    assert [r["prompt"] for r in rec_a] == ["a red circle"] and [r["prompt"] for r in rec_b] == ["a blue square"]
    assert json.loads(Image.open(files_a[0]).text[PARAMS_KEY])["seed"] == 1
    assert json.loads(Image.open(files_b[0]).text[PARAMS_KEY])["seed"] == 2


@pytest.mark.slow
def test_launch_py_binds_loopback_and_prints_the_address(tiny_model_dir, tmp_path):
    port = free_port()
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "data"), "XDG_CACHE_HOME": str(tmp_path / "cache"),
           "GRADIO_TEMP_DIR": str(tmp_path / "gradio"), "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "launch.py"), "--model", str(tiny_model_dir), "--port",
                             str(port), "--device", "cpu"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if "running at" in line:
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert ready.wait(timeout=300), "".join(lines)
        address = f"http://127.0.0.1:{port}/"
        assert any(f"DREAM Studio running at {address}" in line for line in lines), "".join(lines)
        assert any("images are saved in " + str(tmp_path / "data") in line for line in lines)
        c = Client(address, verbose=False, download_files=str(tmp_path / "dl"))
        endpoints = c.view_api(print_info=False, return_format="dict")["named_endpoints"]
        assert set(endpoints) == {"/generate", "/inpaint", "/variations", "/search"}
        c.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _edit_files(tmp_path):
    import numpy as np

    rng = np.random.default_rng(3)
    img, mask = tmp_path / "src.png", tmp_path / "mask.png"
    Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(img)
    m = np.zeros((32, 32), np.uint8)
    m[0:5, 0:12] = 255  # tokens 0 and 1
    Image.fromarray(m).save(mask)
    return img, mask


def test_edit_endpoints_are_typed(client):
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    inpaint = {p["parameter_name"]: p for p in api["/inpaint"]["parameters"]}
    assert list(inpaint) == ["image", "mask", "prompt", "negative_prompt", "num_candidates", "decision_step",
                             "head_steps", "guidance_scale", "guidance_schedule", "temperature", "seed", "paste_back",
                             "explain", "head_sampler"]
    variations = {p["parameter_name"]: p for p in api["/variations"]["parameters"]}
    assert list(variations)[:4] == ["image", "prompt", "strength", "negative_prompt"]
    assert inpaint["num_candidates"]["python_type"]["type"] == "int"
    assert inpaint["paste_back"]["parameter_default"] is True and variations["paste_back"]["parameter_default"] is False


def test_inpaint_round_trips_with_the_source_hash_and_explanation(client, tiny_pipe, tmp_path):
    import hashlib

    import numpy as np

    img, mask = _edit_files(tmp_path)
    files, records, explanations = client.predict(
        image=handle_file(str(img)), mask=handle_file(str(mask)), prompt="a red circle", num_candidates=3,
        head_steps=2, seed=5, explain=True, api_name="/inpaint")
    png = Image.open(files[0])
    stored = json.loads(png.text[PARAMS_KEY])
    assert stored == records[0]
    source = Image.open(img).convert("RGB")
    assert stored["source_sha256"] == hashlib.sha256(b"32x32;" + source.tobytes()).hexdigest()
    assert stored["edit"] == "inpaint" and stored["regenerated_tokens"] == [0, 1] and stored["paste_back"] is True
    assert "Source SHA256: " in png.text["parameters"]
    out = tiny_pipe.inpaint(source, np.asarray(Image.open(mask)), "a red circle", num_candidates=3, head_steps=2,
                            seed=5, explain=True)
    assert np.array_equal(np.asarray(png.convert("RGB")), np.asarray(out.images[0]))
    assert stored["chosen_candidate"] == out.chosen[0]
    ex = explanations[0]
    assert ex["candidate_ids"] == [0, 1, 2] and len(ex["contributions"][0]) == 16
    for row in ex["contributions"]:  # one of the two regenerated tokens was still undecided at the decision
        assert sum(v is None for v in row[:2]) == 1 and all(v is not None for v in row[2:])
    assert ex["contributions"][1][5] == pytest.approx(float(out.explanations[0].contributions[1, 5]), abs=1e-5)


def test_variations_and_refusals_over_http(client, tmp_path):
    img, mask = _edit_files(tmp_path)
    files, records, explanations = client.predict(image=handle_file(str(img)), prompt="", strength=0.25,
                                                  num_candidates=1, head_steps=2, seed=1, api_name="/variations")
    assert records[0]["edit"] == "variations" and records[0]["strength"] == 0.25 and explanations == []
    assert len(records[0]["regenerated_tokens"]) == 4 and records[0]["prompt"]  # the model's own caption
    with pytest.raises(AppError, match="strength must be greater than 0 and at most 1"):
        client.predict(image=handle_file(str(img)), prompt="a red circle", strength=0, api_name="/variations")
    empty = tmp_path / "empty.png"
    Image.new("L", (32, 32), 0).save(empty)
    with pytest.raises(AppError, match="mask is empty"):
        client.predict(image=handle_file(str(img)), mask=handle_file(str(empty)), prompt="a red circle",
                       api_name="/inpaint")
    small = tmp_path / "small.png"
    Image.new("L", (16, 16), 255).save(small)
    with pytest.raises(AppError, match=r"mask must be the size of the image \(32x32 pixels\), got 16x16"):
        client.predict(image=handle_file(str(img)), mask=handle_file(str(small)), prompt="a red circle",
                       api_name="/inpaint")
