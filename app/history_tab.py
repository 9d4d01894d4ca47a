"""The History tab: past images (the session's, or the whole outputs folder), the parameters
a PNG carries, and those parameters sent back to the Generate controls."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dream_core.config import DreamConfig
from dream_core.request import (APP_MAX_CANDIDATES, DEFAULT_GUIDANCE_SCHEDULE, GUIDANCE_SCHEDULES, HEAD_SAMPLERS,
                                default_decision_step, sampler_defaults)

from .images import read_record
from .params import ImageRecord
from .session import AppContext, SessionState, fail


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
    widgets can show (a record from a longer model is cut to its token count: the UI shows that).
    A record without the head's sampler or steps (written before there was a choice, or by
    another tool) gets the loaded model's defaults."""
    steps = max(1, min(int(record.num_inference_steps), config.seq_len))
    k = max(1, min(int(record.num_candidates), APP_MAX_CANDIDATES))
    decision = record.decision_step if record.decision_step is not None else (
        default_decision_step(config, steps) if steps > 1 else 1)
    decision = max(1, min(int(decision or 1), max(1, steps - 1)))
    defaults = sampler_defaults(config)  # for a record without the head's settings
    head_steps = defaults["head_steps"] if record.head_steps is None else int(record.head_steps)
    head_sampler = record.head_sampler if record.head_sampler in HEAD_SAMPLERS else defaults["head_sampler"]
    return dict(prompt=record.prompt, negative_prompt=record.negative_prompt, num_candidates=k,
                decision_step=decision, num_inference_steps=steps, head_steps=head_steps, head_sampler=head_sampler,
                guidance_scale=float(record.guidance_scale), guidance_schedule=record.guidance_schedule
                if record.guidance_schedule in GUIDANCE_SCHEDULES else DEFAULT_GUIDANCE_SCHEDULE,
                temperature=float(record.temperature), seed=int(record.seed), randomize=False, num_images=1)


def reuse_last_seed(session: SessionState) -> int:
    if session.last_seed is None:
        raise fail("no image generated in this session yet: there is no last seed to reuse")
    return session.last_seed
