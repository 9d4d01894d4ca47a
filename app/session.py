"""What every handler shares: the per-browser session, the app's context (model, history,
policies), the jobs a session queues and stops, seeds as the UI sends them, and user-facing errors
(gr.Error messages, never tracebacks)."""

from __future__ import annotations

import html
import math
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
from platformdirs import user_cache_dir

from dream_core.request import MAX_SEED

from .history import APP_NAME, History
from .jobs import Job
from .models import ModelManager

DEFAULT_MIN_INTERVAL = 0.125  # at most ~8 preview updates per second
DEFAULT_PREVIEW_BUDGET = 0.10  # live previews may cost at most 10 % of the decoding time (docs/performance.md)


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
