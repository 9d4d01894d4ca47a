"""The app's behaviour as plain functions over DreamPipeline (no Blocks here), so every button can
be tested without a browser. User mistakes become gr.Error messages, never tracebacks.

Generation is a generator: it yields a `GenerateView` after decoding steps (throttled, so the
browser keeps up), always at the SAD decision and at the end, and it checks its job's stop flag
between decoding steps, so Stop lands within one step. One job runs at a time (AppContext.job_lock),
whatever the queue does on a cancel (see app.jobs).
"""

from __future__ import annotations

import dataclasses
import html
import math
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator

import gradio as gr
import pandas as pd
from platformdirs import user_cache_dir

from dream_core.config import DreamConfig
from dream_core.masking import fraction_decided
from dream_core.request import APP_MAX_CANDIDATES, GUIDANCE_SCHEDULES, MAX_SEED, EditRequest, default_steps
from dream_core.sampling import default_decision_step

from .history import APP_NAME, History
from .images import (DISPLAY_SIZE, MAX_UPLOAD_BYTES, Tile, candidate_grid, explanation_overlay, fit, image_sha256,
                     mark_undecided, open_checked, read_record, save_png, score_chart, tile_size_for, upscale)
from .jobs import Job
from .models import ModelManager
from .params import GenerationSettings, ImageRecord

PREVIEW_MARKED = "Decided tokens (undecided hatched)"
PREVIEW_PARTIAL = "Partial decode (raw latent)"
PREVIEW_MODES = (PREVIEW_MARKED, PREVIEW_PARTIAL)
SEARCH_BANK, SEARCH_FILE, SEARCH_LABELS = "bank", "file", "labels"
SEARCH_MODES = (SEARCH_BANK, SEARCH_FILE, SEARCH_LABELS)
SEARCH_MODE_LABELS = {SEARCH_BANK: "Model caption bank", SEARCH_FILE: "Caption file (.txt)",
                      SEARCH_LABELS: "Labels (zero-shot)"}
MAX_CAPTION_FILE_BYTES = 5 * 2**20
MAX_CAPTIONS = 100_000
MAX_LABELS = 200
DEFAULT_MIN_INTERVAL = 0.125  # at most ~8 preview updates per second
DEFAULT_PREVIEW_BUDGET = 0.10  # live previews may cost at most 10 % of the decoding time (issue 6)


def fail(message: str) -> gr.Error:
    """A user-facing error (Gradio renders the message as HTML, so it is escaped)."""
    return gr.Error(html.escape(str(message), quote=False), print_exception=False)


@dataclass
class SessionState:
    """Per-browser-session state (a gr.State): never shared between users."""

    last_seed: int | None = None
    paths: list[str] = field(default_factory=list)  # this session's images, newest first
    shown: list[str] = field(default_factory=list)  # what the history gallery shows, by index
    selected: str | None = None  # history entry picked by the user
    jobs: list[Job] = field(default_factory=list)  # queued (Generate clicked) or running, oldest first

    @property
    def running(self) -> bool:
        return any(job.started for job in self.jobs)


@dataclass
class AppContext:
    """What the handlers share: the model, the history folder and the app's policies."""

    manager: ModelManager
    history: History
    shared_history: bool = True  # show every PNG in the outputs folder (local use) or only the session's
    display_dir: Path = field(default_factory=lambda: Path(user_cache_dir(APP_NAME, appauthor=False)) / "display")
    min_interval: float = DEFAULT_MIN_INTERVAL
    preview_budget: float = DEFAULT_PREVIEW_BUDGET
    keep_display_files: int = 200
    job_lock: threading.Lock = field(default_factory=threading.Lock)  # one generation at a time


@dataclass
class PreviewBudget:
    """Keeps live previews (VAE decode of the K partial states + the tile grid) within `share` of
    the decoding time: a preview is drawn only if the time spent on previews so far, plus the
    next one at the last one's cost, stays within `share` x the decoding time so far. The first
    step and the decision are always drawn (they are what the user waits for), and count too."""

    share: float
    spent: float = 0.0  # seconds spent on previews
    last_cost: float = 0.0

    def allows(self, elapsed: float) -> bool:
        """`elapsed`: seconds since decoding started, previews included."""
        return self.spent + self.last_cost <= self.share * max(0.0, elapsed - self.spent)

    def add(self, seconds: float) -> None:
        self.spent += seconds
        self.last_cost = seconds


@dataclass
class GenerateView:
    """One update of the Generate tab; None fields are left unchanged."""

    status: str | None = None  # HTML: progress bar and a line of text
    grid: Any = None  # PIL image of the candidate tiles
    scores: Any = None  # PIL bar chart of the scores at the decision
    final: str | None = None  # upscaled display copy (PNG with the same text chunks)
    download: str | None = None  # the saved PNG (native size)
    gallery: list[tuple[str, str]] | None = None
    infotext: str | None = None
    records: list[dict] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    stopped: bool = False
    done: bool = False
    reset: bool = False  # a new job starts: clear the live grid and the score chart
    preview_seconds: float | None = None  # on an image's final view: time its live previews took
    decode_seconds: float | None = None  # ... and its decoding took (T5 + steps + final VAE decode)
    explanations: list[dict] = field(default_factory=list)  # per finished image, when asked (see explanation_dict)


@dataclass
class EditInput:
    """What an edit adds to the generation settings: the source image and either a pixel mask
    (inpainting, True = regenerate, the size of the image) or a strength (variations)."""

    image: Any  # PIL image
    mask: Any = None
    strength: Any = None
    paste_back: bool = True

    @property
    def kind(self) -> str:
        return "inpaint" if self.mask is not None else "variations"


def explanation_dict(ex, image_index: int = 0) -> dict:
    """A DecisionExplanation as JSON: per scored candidate, its score and every token's
    leave-one-out contribution (raster order; null where the token was not visible)."""
    return {"image_index": image_index, "step": ex.step, "candidate_ids": list(ex.candidate_ids),
            "scores": [round(float(v), 6) for v in ex.scores],
            "contributions": [[None if math.isnan(v) else round(float(v), 6) for v in row.tolist()]
                              for row in ex.contributions]}


# ----- small helpers -----
def resolve_seed(seed: Any, randomize: bool) -> int | None:
    """UI/API seed: random toggle, no seed or -1 -> None (draw one); else a validated integer."""
    if randomize or seed is None or seed == "":
        return None
    try:
        value = float(seed)
    except (TypeError, ValueError):
        raise fail(f"seed must be a whole number, got {seed!r}") from None
    if not math.isfinite(value) or value != int(value):
        raise fail(f"seed must be a whole number, got {seed!r}")
    if value == -1:
        return None
    if not 0 <= value <= MAX_SEED:  # never replaced by a random seed without a word
        raise fail(f"seed must be between 0 and {MAX_SEED}, or -1 for a random seed; got {int(value)}")
    return int(value)


def draw_seed() -> int:
    return secrets.randbelow(2**31)


def decision_info(num_steps: Any, decision_step: Any, seq_len: int, num_candidates: Any) -> str:
    """The decision step as a step and as the share of tokens decided when candidates are scored."""
    try:
        steps, k = int(num_steps), int(num_candidates)
        decision = int(decision_step)
    except (TypeError, ValueError):
        return ""
    if k <= 1:
        return "One candidate: plain MAR decoding, nothing to decide."
    if steps < 2:
        return "Needs at least 2 steps to decide between candidates."
    if not 1 <= decision <= steps - 1:
        return f"The decision step must be between 1 and {steps - 1} for {steps} steps."
    share = fraction_decided(decision, steps, seq_len)
    return (f"Candidates are scored after step **{decision}** of {steps}, when **{100 * share:.1f} %** of the "
            f"{seq_len} tokens are decided; the best one continues.")


def progress_html(fraction: float, text: str, state: str = "running") -> str:
    pct = max(0.0, min(1.0, fraction)) * 100
    return (f'<div class="ds-status ds-{state}"><div class="ds-track"><div class="ds-fill" '
            f'style="width:{pct:.1f}%"></div></div><div class="ds-text">{html.escape(text)}</div></div>')


def candidate_states(pruned: list[bool], chosen: int | None) -> list[str]:
    return ["pruned" if p else ("chosen" if cid == chosen else "kept") for cid, p in enumerate(pruned)]


def _display_copy(ctx: AppContext, path: Path, image, record: ImageRecord) -> Path:
    """An upscaled (NEAREST) copy for the big view, carrying the same parameters."""
    out = ctx.display_dir / f"{path.parent.name}-{path.name}"
    save_png(upscale(image, DISPLAY_SIZE), out, record)
    old = sorted(ctx.display_dir.glob("*.png"), key=lambda p: p.stat().st_mtime_ns)
    for p in old[: max(0, len(old) - ctx.keep_display_files)]:
        p.unlink(missing_ok=True)
    return out


# ----- generation -----
def settings_from_inputs(prompt: Any, negative_prompt: Any, num_candidates: Any, decision_step: Any,
                         num_inference_steps: Any, head_steps: Any, guidance_scale: Any, guidance_schedule: Any,
                         temperature: Any, seed: int | None, num_images: Any) -> GenerationSettings:
    return GenerationSettings(
        prompt=prompt if isinstance(prompt, str) else "", negative_prompt=negative_prompt or "",
        num_candidates=num_candidates, decision_step=decision_step, num_inference_steps=num_inference_steps,
        head_steps=head_steps, guidance_scale=guidance_scale, guidance_schedule=guidance_schedule,
        temperature=temperature, seed=seed, num_images=num_images)


def begin_job(session: SessionState) -> None:
    """Runs (unqueued) the moment Generate is clicked: a Stop after this point reaches the job,
    even while it still waits in the queue."""
    session.jobs.append(Job())


def next_job(session: SessionState) -> Job:
    """The job a starting generation runs as: the session's oldest one still queued (Generate was
    clicked), else a new one (an API call)."""
    job = next((j for j in session.jobs if not j.started), None)
    if job is None:
        job = Job()
        session.jobs.append(job)
    return job


def end_job(session: SessionState, job: Job) -> None:
    if job in session.jobs:
        session.jobs.remove(job)


def request_stop(session: SessionState) -> None:
    """Runs (unqueued): stops the session's queued and running jobs. The job itself reports where
    it stopped, so this writes nothing to the page (two writers would race). With nothing to stop
    it changes nothing: a Stop never reaches a later job."""
    if not session.jobs:
        gr.Info("Nothing is running; the next generation starts normally.")
    for job in session.jobs:
        job.stop()


def generate_stream(ctx: AppContext, session: SessionState, settings: GenerationSettings,
                    preview_mode: str = PREVIEW_MARKED, previews: bool = True, min_interval: float | None = None,
                    preview_budget: float | None = None, clock: Callable[[], float] = time.monotonic,
                    job: Job | None = None, edit: EditInput | None = None,
                    explain: bool = False) -> Iterator[GenerateView]:
    """Decode `settings.num_images` images of K candidates each, yielding live views; save each
    finished image as a PNG with its parameters. Stops between decoding steps when `job` (by
    default the session's oldest queued job, else a new one) is stopped.

    Progress updates come at most every `min_interval` s; candidate previews also within the
    `preview_budget` share of decoding time (see PreviewBudget); the last step is never decoded
    for a preview: the final image, decoded anyway, fills the winner's tile.

    `edit`: inpaint or vary a source image instead (the kept tokens show plainly, the regenerated
    ones hatched until decided); the record carries the source's SHA-256. `explain`: at the
    decision, every candidate's tile shows why it scored what it did (explanation_overlay)."""
    if job is None:
        job = next_job(session)
    elif job not in session.jobs:
        session.jobs.append(job)
    job.started = True
    try:
        with ctx.job_lock:  # the previous job has really ended (a cancelled one finishes its step first)
            yield from _generate(ctx, session, settings, job, preview_mode, previews, min_interval,
                                 preview_budget, clock, edit, explain)
    finally:
        end_job(session, job)


def _generate(ctx: AppContext, session: SessionState, settings: GenerationSettings, job: Job, preview_mode: str,
              previews: bool, min_interval: float | None, preview_budget: float | None,
              clock: Callable[[], float], edit: EditInput | None = None,
              explain: bool = False) -> Iterator[GenerateView]:
    try:
        pipe = ctx.manager.require()
    except ValueError as err:
        raise fail(str(err)) from None
    cfg = pipe.config
    edit_req = None
    try:
        if edit is None:
            s = settings.validated(cfg)  # the engine's request checks, defaults resolved
        else:  # the same checks, with the steps counted over the regenerated tokens
            edit_req = EditRequest(edit.image, settings.request(), mask=edit.mask, strength=edit.strength,
                                   paste_back=edit.paste_back).validate(cfg, APP_MAX_CANDIDATES)
            s = GenerationSettings.from_request(edit_req.generation)
    except ValueError as err:
        raise fail(str(err)) from None
    if not isinstance(explain, bool):
        raise fail(f"explain must be true or false, got {explain!r}")
    num_tokens = cfg.seq_len if edit_req is None else edit_req.num_regenerated(cfg)
    if preview_mode not in PREVIEW_MODES:
        raise fail(f"preview mode must be one of {', '.join(PREVIEW_MODES)}")
    base_seed = s.seed if s.seed is not None else draw_seed()
    s.seed = base_seed
    interval = ctx.min_interval if min_interval is None else min_interval
    share = ctx.preview_budget if preview_budget is None else preview_budget
    if not share >= 0:
        raise fail(f"preview budget must be a share >= 0, got {share}")
    k, steps, n = s.num_candidates, s.num_inference_steps, s.num_images
    tile = tile_size_for(s.num_candidates)
    decided_share = fraction_decided(s.decision_step, steps, num_tokens) if s.decision_step else None
    model_name = ctx.manager.name
    done_paths: list[str] = []
    done_records: list[dict] = []
    done_explanations: list[dict] = []
    gallery: list[tuple[str, str]] = []
    started = clock()
    if job.stop_requested:
        yield GenerateView(status=progress_html(0.0, "Stopped before it started.", "stopped"), stopped=True)
        return
    yield GenerateView(status=progress_html(0.0, f"Starting: {k} candidate{'s' * (k > 1)}, {steps} steps, "
                                                 f"seed {base_seed}…"), reset=True)
    for i in range(n):
        seed_i = base_seed + i * k
        tiles: dict[int, Tile] = {}
        decided = False
        last = None
        last_yield = -math.inf
        budget = PreviewBudget(share)
        t_start = clock()
        explained: dict[int, Any] = {}  # candidate -> its token contributions at the decision
        explanation = None
        request = dataclasses.replace(s, seed=seed_i, num_images=1).request()
        try:
            if edit_req is None:
                events = pipe.stream(request, should_stop=job.stop_event.is_set, explain=explain)
            else:
                edit_i = dataclasses.replace(edit_req, generation=dataclasses.replace(
                    edit_req.generation, seed=seed_i, num_images=1))
                start = pipe.edit_start(edit_i, seed_i)
                events = pipe.stream_edit(edit_i, should_stop=job.stop_event.is_set, explain=explain, start=start)
            for ev in events:
                last = ev
                if ev.kind == "decision":
                    decided = True
                    if ev.explanation is not None:
                        explanation = ev.explanation
                        explained.update({cid: ev.explanation.for_candidate(cid).numpy()
                                          for cid in ev.explanation.candidate_ids})
                now = clock()
                first = last_yield == -math.inf
                if not (first or ev.kind in ("decision", "done")) and now - last_yield < interval:
                    continue
                last_yield = now
                view = GenerateView()
                if previews and ev.kind != "done" and (first or ev.kind == "decision"
                                                       or budget.allows(now - t_start)):
                    _update_tiles(pipe, tiles, ev, preview_mode, decided, tile, explained)
                    view.grid = candidate_grid(list(tiles.values()), tile)
                    if ev.kind == "decision":
                        view.scores = score_chart(ev.scores, candidate_states(ev.pruned, ev.chosen))
                    budget.add(clock() - now)
                view.status = progress_html((i + ev.step / steps) / n, _step_text(ev, i, n, decided_share, s))
                yield view
        except ValueError as err:  # the engine's argument checks
            raise fail(str(err)) from None
        except RuntimeError as err:  # e.g. out of memory: say so instead of a bare "Error"
            raise fail(f"generation failed on {pipe.device}: {err}") from None
        if last is None or last.kind != "done":
            at = last.step if last is not None else 0
            view = GenerateView(status=progress_html((i + at / steps) / n,
                                                     f"Stopped at step {at} of {steps} (image {i + 1} of {n}); "
                                                     "the unfinished image was not saved.", "stopped"),
                                stopped=True, records=done_records, paths=done_paths)
            if previews and tiles:
                for t in tiles.values():
                    if t.state != "pruned":
                        t.state = "stopped"
                view.grid = candidate_grid(list(tiles.values()), tile)
            yield view
            return
        if edit_req is None:
            image = pipe.decode_tokens(last.tokens[:1])[0]
        else:
            image = pipe.edit_result(edit_i, last.tokens[:1], start.regenerate)
        decode_seconds = clock() - t_start - budget.spent
        chosen = last.candidate_ids[0]
        record = ImageRecord.build(s, seed_i, chosen, last.scores, model_name, image.size, num_tokens,
                                   image_index=i, created=datetime.now().isoformat(timespec="seconds"))
        if edit_req is not None:
            record.edit, record.source_sha256 = edit_req.kind, image_sha256(edit_req.image)
            record.strength, record.paste_back = edit_req.strength, edit_req.paste_back
            record.regenerated_tokens = start.regenerate.nonzero().flatten().tolist()
        if explanation is not None:
            done_explanations.append(explanation_dict(explanation, i))
        path = ctx.history.save(image, record)
        session.paths.insert(0, str(path))
        session.last_seed = base_seed
        display = _display_copy(ctx, path, image, record)
        done_paths.append(str(path))
        done_records.append(record.to_dict())
        gallery.append((str(display), f"{i + 1}: candidate #{chosen}, seed {seed_i}"))
        view = GenerateView(final=str(display), download=str(path), gallery=list(gallery),
                            infotext=record.infotext(), records=list(done_records), paths=list(done_paths),
                            preview_seconds=budget.spent, decode_seconds=decode_seconds,
                            explanations=list(done_explanations))
        if previews:
            prev = tiles.get(chosen)  # absent only if the very first event was the last step
            tiles[chosen] = Tile(fit(image, tile), chosen, "final", *((prev.score, prev.rank, prev.num_ranked)
                                                                      if prev else ()))
            view.grid = candidate_grid(list(tiles.values()), tile)
        finished = i + 1 == n
        took = clock() - started
        text = (f"Done: {n} image{'s' * (n > 1)} in {took:.1f} s, saved as {path.name}" if finished else
                f"Image {i + 1} of {n} saved ({path.name}); decoding the next…")
        if k > 1 and last.scores[chosen] is not None:
            text += f" · candidate #{chosen} won with score {last.scores[chosen]:+.3f}"
        view.status = progress_html((i + 1) / n, text, "done" if finished else "running")
        view.done = finished
        yield view


def _step_text(ev, i: int, n: int, share: float | None, s: GenerationSettings) -> str:
    prefix = f"Image {i + 1}/{n} · " if n > 1 else ""
    seq_len = ev.mask.shape[1]
    pct = f"{round(ev.fraction_decided * seq_len)} of {seq_len} tokens decided"
    if ev.kind == "decision":
        alive = [c for c in range(ev.num_candidates) if not ev.pruned[c]]
        if ev.chosen is not None:
            return (f"{prefix}Decision at step {ev.step} ({100 * (share or 0):.1f} % decided): candidate "
                    f"#{ev.chosen} wins with score {ev.scores[ev.chosen]:+.3f}; "
                    f"{ev.num_candidates - 1} pruned")
        return f"{prefix}Decision at step {ev.step}: {len(alive)} of {ev.num_candidates} candidates kept"
    active = len(ev.candidate_ids)
    who = (f"{active} candidates decoding" if active > 1 else
           (f"candidate #{ev.candidate_ids[0]} continues" if ev.num_candidates > 1 else "decoding"))
    return f"{prefix}Step {ev.step}/{ev.num_steps} · {pct} · {who}"


def _update_tiles(pipe, tiles: dict[int, Tile], ev, preview_mode: str, decided: bool, size: int,
                  explained: dict[int, Any] | None = None) -> None:
    """Decode the active rows (frozen pruned tiles are not decoded again) and set their states.
    Uses the model's preview decoder when it has one (a fraction of the VAE's cost). Candidates in
    `explained` show their decision-time token contributions over the tile."""
    images = pipe.decode_previews(ev.tokens)
    side = pipe.config.tokens_per_side
    mask = ev.mask.numpy()
    ranked = sum(1 for s in ev.scores if s is not None) or None
    for row, cid in enumerate(ev.candidate_ids):
        img = fit(images[row], size)
        if preview_mode == PREVIEW_MARKED:
            img = mark_undecided(img, mask[row], side)
        if explained and cid in explained:
            img = explanation_overlay(img, explained[cid], side)
        if ev.pruned and ev.pruned[cid]:
            state = "pruned"
        elif ev.kind == "done":
            state = "final"
        elif not decided:
            state = "decoding"
        elif ev.chosen == cid or len(ev.candidate_ids) == 1:
            state = "chosen"
        else:
            state = "kept"
        score = ev.scores[cid] if ev.scores else None
        rank = ev.ranks[cid] if ev.ranks else None
        tiles[cid] = Tile(img, cid, state, score, rank, ranked)


def generate_api_stream(ctx: AppContext, session: SessionState, settings: GenerationSettings,
                        job: Job | None = None, edit: EditInput | None = None,
                        explain: bool = False) -> Iterator[tuple | None]:
    """The `generate` API: None after every decoding step (each one is a point where the server
    notices a closed connection or a cancel), then the saved PNG paths and their records (and,
    for the edit endpoints, the explanations asked for: [] without `explain`)."""
    last = None
    for view in generate_stream(ctx, session, settings, previews=False, min_interval=0.0, job=job, edit=edit,
                                explain=explain):
        last = view
        if not view.done:
            yield None
    if last is None or last.stopped or not last.done:
        raise fail("generation was stopped before it finished")
    yield (last.paths, last.records) if edit is None else (last.paths, last.records, last.explanations)


def generate_images(ctx: AppContext, session: SessionState, settings: GenerationSettings) -> tuple[list[str], list[dict]]:
    """Run a whole generation without previews: saved PNG paths and records."""
    *_, result = generate_api_stream(ctx, session, settings)
    return result


# ----- editing -----
EDIT_INPAINT, EDIT_VARIATIONS = "inpaint", "variations"
EDIT_MODES = (EDIT_INPAINT, EDIT_VARIATIONS)
EDIT_MODE_LABELS = {EDIT_INPAINT: "Inpaint the painted region", EDIT_VARIATIONS: "Variations (strength)"}


def editor_mask(layers: list | None, size: tuple[int, int]) -> Any:
    """The painted mask of an image editor: every pixel any brush layer covers (alpha > 0)."""
    import numpy as np

    mask = np.zeros((size[1], size[0]), dtype=bool)
    for layer in layers or []:
        if layer is None:
            continue
        rgba = layer.convert("RGBA")
        if rgba.size != size:
            raise fail(f"the painted layer is {rgba.width}x{rgba.height} pixels but the image is "
                       f"{size[0]}x{size[1]}; paint on the image again")
        mask |= np.asarray(rgba.getchannel("A")) > 0
    return mask


def edit_input(editor: Any, mode: Any, strength: Any, paste_back: Any) -> EditInput:
    """The Edit tab's image editor value (background + brush layers) as an edit: the painted
    layers are the mask (inpainting), or `strength` makes variations."""
    if mode not in EDIT_MODES:
        raise fail(f"edit mode must be one of {', '.join(EDIT_MODES)}, got {mode!r}")
    image = editor.get("background") if isinstance(editor, dict) else None
    if image is None:
        raise fail("upload, paste or send an image to edit first")
    image = image.convert("RGB")
    if mode == EDIT_INPAINT:
        return EditInput(image, mask=editor_mask(editor.get("layers"), image.size), paste_back=paste_back)
    return EditInput(image, strength=strength, paste_back=paste_back)


def edit_input_from_files(image_path: Any, mask_path: Any, strength: Any, paste_back: Any) -> EditInput:
    """The `inpaint` / `variations` API's files: the source image, and for inpainting a mask image
    the size of the source (white, i.e. nonzero, = regenerate; transparent pixels are not masked)."""
    try:
        image = open_checked(image_path).convert("RGB")
        mask = None if mask_path is None else open_checked(mask_path)
    except ValueError as err:
        raise fail(str(err)) from None
    if mask is None and strength is None:
        raise fail("inpaint needs a mask image: the size of the image, white where it is regenerated")
    return EditInput(image, mask=mask, strength=strength, paste_back=paste_back)


def edit_prompt(ctx: AppContext, prompt: Any, edit: EditInput) -> Any:
    """The prompt of an edit; variations without one use the model's own best caption of the image."""
    if edit.kind == EDIT_INPAINT or (isinstance(prompt, str) and prompt.strip()):
        return prompt
    try:
        pipe = ctx.manager.require()
        if not pipe.captions:
            raise ValueError("this model has no caption bank to describe the image")
        return pipe.search(edit.image, top_k=1)[0][0]
    except ValueError as err:
        raise fail(f"type a prompt for the variations ({err})") from None


def edit_source(ctx: AppContext, session: SessionState, which: str) -> dict:
    """An image editor value holding a picture from History (the selected one) or the last result."""
    path = session.selected if which == "history" else (session.paths[0] if session.paths else None)
    if not path:
        raise fail("pick an image in the history first" if which == "history" else
                   "generate an image first: there is no result to edit yet")
    if not Path(path).is_file():
        raise fail("this image no longer exists; press Refresh in History")
    return {"background": path, "layers": [], "composite": path}


# ----- reverse search -----
def read_caption_file(path: str | Path | None) -> list[str]:
    if path is None:
        raise fail("upload a caption file: a .txt with one caption per line")
    path = Path(path)
    if not path.is_file():
        raise fail("the caption file could not be found on the server; please upload it again")
    if path.stat().st_size > MAX_CAPTION_FILE_BYTES:
        raise fail(f"the caption file is too large ({path.stat().st_size / 2**20:.1f} MB); "
                   f"the limit is {MAX_CAPTION_FILE_BYTES // 2**20} MB")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise fail("the caption file is not UTF-8 text (a .txt with one caption per line is expected)") from None
    if "\x00" in text:
        raise fail("the caption file is not a text file (a .txt with one caption per line is expected)")
    captions = list(dict.fromkeys(" ".join(line.split()) for line in text.splitlines() if line.strip()))
    if not captions:
        raise fail("the caption file holds no captions (one caption per line is expected)")
    if len(captions) > MAX_CAPTIONS:
        raise fail(f"the caption file holds {len(captions)} captions; at most {MAX_CAPTIONS}")
    return captions


def parse_labels(text: Any) -> list[str]:
    """Labels one per line, or comma-separated on one line."""
    if not isinstance(text, str) or not text.strip():
        raise fail("type at least two labels, one per line (or separated by commas)")
    parts = text.splitlines() if "\n" in text.strip() else text.split(",")
    labels = list(dict.fromkeys(" ".join(p.split()) for p in parts if p.strip()))
    if len(labels) < 2:
        raise fail("zero-shot classification needs at least two labels")
    if len(labels) > MAX_LABELS:
        raise fail(f"too many labels ({len(labels)}); at most {MAX_LABELS}")
    return labels


def search(ctx: AppContext, image_path: str | None, top_k: Any = 5, mode: str = SEARCH_BANK,
           captions_file: str | None = None, labels: str | None = None) -> list[dict]:
    """Reverse search: [{rank, caption, score}] best first. Score = cosine similarity in the joint
    space (caption bank, caption file) or the softmax probability (zero-shot labels)."""
    try:
        pipe = ctx.manager.require()
    except ValueError as err:
        raise fail(str(err)) from None
    if mode not in SEARCH_MODES:
        raise fail(f"search mode must be one of: {', '.join(SEARCH_MODES)}")
    try:
        k = int(top_k)
        if k != top_k or not 1 <= k <= 100:
            raise ValueError
    except (TypeError, ValueError):
        raise fail(f"top_k must be a whole number between 1 and 100, got {top_k!r}") from None
    try:
        image = open_checked(image_path).convert("RGB")
    except ValueError as err:
        raise fail(str(err)) from None
    try:
        if mode == SEARCH_LABELS:
            results = pipe.zero_shot(image, parse_labels(labels))[:k]
        elif mode == SEARCH_FILE:
            results = pipe.search(image, top_k=k, captions=read_caption_file(captions_file))
        else:
            if not pipe.captions:
                raise fail("this model has no caption bank; upload a caption file or type labels instead")
            results = pipe.search(image, top_k=k)
    except gr.Error:  # already a message (gr.Error is a ValueError whose str() adds quotes)
        raise
    except ValueError as err:
        raise fail(str(err)) from None
    return [{"rank": r + 1, "caption": c, "score": round(float(v), 4)} for r, (c, v) in enumerate(results)]


def search_table(results: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([[r["rank"], r["caption"], r["score"]] for r in results], columns=["rank", "caption", "score"])


# ----- history and parameters -----
def history_items(ctx: AppContext, session: SessionState, limit: int = 200) -> list[tuple[str, str]]:
    """Gallery items (path, caption); the session remembers what is shown so a click maps to a
    server-side path (a path is never taken from the browser)."""
    if ctx.shared_history:
        entries = ctx.history.entries(limit)
        items = [(str(e.path), e.caption()) for e in entries]
    else:
        items = []
        for p in session.paths[:limit]:
            record = ctx.history.record(Path(p))
            if record is not None:
                items.append((p, f"{record.prompt[:47]}{'…' * (len(record.prompt) > 47)} · seed {record.seed}"))
    session.shown = [p for p, _ in items]
    return items


def select_history(ctx: AppContext, session: SessionState, index: Any) -> ImageRecord:
    if not isinstance(index, int) or not 0 <= index < len(session.shown):
        raise fail("pick an image in the history first")
    path = session.shown[index]
    record = ctx.history.record(Path(path))
    if record is None:
        raise fail("this image no longer exists or carries no parameters; press Refresh")
    session.selected = path
    return record


def read_parameters(path: str | None) -> ImageRecord:
    """Parameters of a dropped PNG (made by this app, or A1111-style 'parameters' text)."""
    try:
        record = read_record(path)
    except ValueError as err:
        raise fail(str(err)) from None
    if record is None:
        raise fail("this image carries no DREAM Studio parameters (only PNGs saved by the app have them)")
    return record


def controls_from_record(record: ImageRecord, config: DreamConfig) -> dict[str, Any]:
    """Values for the Generate controls that reproduce a record, fitted to what the loaded model's
    widgets can show (a record from a longer model is cut to its token count: the UI shows that)."""
    steps = max(1, min(int(record.num_inference_steps), config.seq_len))
    k = max(1, min(int(record.num_candidates), APP_MAX_CANDIDATES))
    decision = record.decision_step if record.decision_step is not None else (
        default_decision_step(config, steps) if steps > 1 else 1)
    decision = max(1, min(int(decision or 1), max(1, steps - 1)))
    return dict(prompt=record.prompt, negative_prompt=record.negative_prompt, num_candidates=k,
                decision_step=decision, num_inference_steps=steps, head_steps=int(record.head_steps),
                guidance_scale=float(record.guidance_scale), guidance_schedule=record.guidance_schedule
                if record.guidance_schedule in GUIDANCE_SCHEDULES else GUIDANCE_SCHEDULES[0],
                temperature=float(record.temperature), seed=int(record.seed), randomize=False, num_images=1)


def reuse_last_seed(session: SessionState) -> int:
    if session.last_seed is None:
        raise fail("no image generated in this session yet: there is no last seed to reuse")
    return session.last_seed


# ----- model panel -----
def model_card(ctx: AppContext) -> str:
    pipe = ctx.manager.pipe
    if pipe is None:
        return "_No model loaded._"
    return pipe.model_card.strip() or "_This model directory has no README.md model card._"


def switch_model(ctx: AppContext, name: Any) -> None:
    if not isinstance(name, str) or not name:
        raise fail("pick a model from the list")
    try:
        ctx.manager.switch(name)
    except ValueError as err:
        raise fail(str(err)) from None


def default_controls(ctx: AppContext) -> dict[str, Any]:
    """Slider ranges and defaults for the loaded model, from the engine's request: steps <= its
    number of tokens, the default steps, the model's default decision step, guidance and temperature."""
    pipe = ctx.manager.pipe
    config = pipe.config if pipe is not None else DreamConfig.preset("shapes")
    steps = default_steps(config.seq_len)
    decision = default_decision_step(config, steps) if steps > 1 else 1
    return dict(seq_len=config.seq_len, steps=steps, decision=decision, head_steps_max=config.num_train_timesteps,
                guidance_scale=config.default_guidance_scale, temperature=config.default_temperature)


__all__ = ["AppContext", "EDIT_MODES", "EditInput", "GenerateView", "edit_input", "edit_input_from_files",
           "edit_prompt", "edit_source", "editor_mask", "explanation_dict", "PREVIEW_MODES", "SEARCH_MODES", "SessionState", "begin_job",
           "controls_from_record", "decision_info", "default_controls", "end_job", "generate_api_stream",
           "generate_images", "generate_stream", "history_items", "model_card", "parse_labels", "read_caption_file", "read_parameters",
           "next_job", "request_stop", "resolve_seed", "reuse_last_seed", "search", "search_table", "select_history",
           "settings_from_inputs", "switch_model", "MAX_UPLOAD_BYTES"]
