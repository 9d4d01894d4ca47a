"""Generation as a generator of views: it yields a `GenerateView` after decoding steps (throttled,
so the browser keeps up), always at the SAD decision and at the end, and it checks its job's stop
flag between decoding steps, so Stop lands within one step. One job runs at a time
(AppContext.job_lock), whatever the queue does on a cancel (see app.jobs). The pipeline decodes
(`DreamPipeline.stream`, one image at a time); this module draws the previews and saves."""

from __future__ import annotations

import dataclasses
import html
import math
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator

from dream_core.masking import fraction_decided
from dream_core.request import APP_MAX_CANDIDATES, EditRequest

from .editing import EditInput
from .history import prune_oldest
from .images import (DISPLAY_SIZE, Tile, candidate_grid, explanation_overlay, fit, image_sha256, mark_undecided,
                     save_png, score_chart, tile_size_for, upscale)
from .jobs import Job
from .params import GenerationSettings, ImageRecord
from .session import AppContext, SessionState, draw_seed, end_job, fail, next_job

PREVIEW_MARKED = "Decided tokens (undecided hatched)"
PREVIEW_PARTIAL = "Partial decode (raw latent)"
PREVIEW_MODES = (PREVIEW_MARKED, PREVIEW_PARTIAL)


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


def explanation_dict(ex, image_index: int = 0) -> dict:
    """A DecisionExplanation as JSON: per scored candidate, its score and every token's
    leave-one-out contribution (raster order; null where the token was not visible)."""
    return {"image_index": image_index, "step": ex.step, "candidate_ids": list(ex.candidate_ids),
            "scores": [round(float(v), 6) for v in ex.scores],
            "contributions": [[None if math.isnan(v) else round(float(v), 6) for v in row.tolist()]
                              for row in ex.contributions]}


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
    prune_oldest(ctx.display_dir, ctx.keep_display_files)
    return out


def settings_from_inputs(prompt: Any, negative_prompt: Any, num_candidates: Any, decision_step: Any,
                         num_inference_steps: Any, head_steps: Any, guidance_scale: Any, guidance_schedule: Any,
                         temperature: Any, seed: int | None, num_images: Any,
                         head_sampler: Any = None) -> GenerationSettings:
    """The inputs of the Generate controls and the API (`head_sampler` None or "": the model's)."""
    return GenerationSettings(
        prompt="" if prompt is None else prompt,  # anything else as sent: the request names a wrong type
        negative_prompt="" if negative_prompt is None else negative_prompt,
        num_candidates=num_candidates, decision_step=decision_step, num_inference_steps=num_inference_steps,
        head_steps=head_steps, head_sampler=head_sampler, guidance_scale=guidance_scale,
        guidance_schedule=guidance_schedule, temperature=temperature, seed=seed, num_images=num_images)


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
    # The pipeline streams each image (its seeds, an edit's start, the finished picture); this
    # function draws the previews and saves what it finishes.
    request = s.request()
    if edit_req is not None:
        request = dataclasses.replace(edit_req, generation=dataclasses.replace(edit_req.generation, seed=base_seed))
    for i in range(n):
        tiles: dict[int, Tile] = {}
        decided = False
        last = None
        last_yield = -math.inf
        budget = PreviewBudget(share)
        t_start = clock()
        explained: dict[int, Any] = {}  # candidate -> its token contributions at the decision
        try:
            events = pipe.stream(request, should_stop=job.stop_event.is_set, explain=explain, image_index=i,
                                 decode_image=True)
            for ev in events:
                last = ev
                if ev.kind == "decision":
                    decided = True
                    if ev.explanation is not None:
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
        image, seed_i = last.image, last.seed
        decode_seconds = clock() - t_start - budget.spent
        chosen = last.candidate_ids[0]
        record = ImageRecord.build(s, seed_i, chosen, last.scores, model_name, image.size, num_tokens,
                                   image_index=i, created=datetime.now().isoformat(timespec="seconds"))
        if edit_req is not None:
            record.edit, record.source_sha256 = edit_req.kind, image_sha256(edit_req.image)
            record.strength, record.paste_back = edit_req.strength, edit_req.paste_back
            record.regenerated_tokens = last.regenerated.nonzero().flatten().tolist()
        if last.explanation is not None:
            done_explanations.append(explanation_dict(last.explanation, i))
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
