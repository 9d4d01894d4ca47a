"""Reverse search: an image against the model's caption bank, an uploaded caption file, or
zero-shot labels. Each result shows its caption's detail where the bank has one (a bank line's
`caption<TAB>detail`: the emoji model's emoji and keywords)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from dream_core import retrieval

from .images import load_rgb
from .session import AppContext, fail

SEARCH_BANK, SEARCH_FILE, SEARCH_LABELS = "bank", "file", "labels"
SEARCH_MODES = (SEARCH_BANK, SEARCH_FILE, SEARCH_LABELS)
SEARCH_MODE_LABELS = {SEARCH_BANK: "Model caption bank", SEARCH_FILE: "Caption file (.txt)",
                      SEARCH_LABELS: "Labels (zero-shot)"}
MAX_LABELS = 200
#: The results table's columns, and the keys of each result the API returns.
SEARCH_COLUMNS = ("rank", "caption", "score", "details")


def read_caption_file(path: str | Path | None) -> tuple[list[str], list[str]]:
    """(captions, details) of an uploaded file, within the limits the caption-bank code states."""
    try:
        return retrieval.read_caption_file(path)
    except ValueError as err:
        raise fail(str(err)) from None


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
    """Reverse search: [{rank, caption, score, details}] best first. Score = cosine similarity in the
    joint space (caption bank, caption file) or the softmax probability (zero-shot labels); details =
    the bank's or the file's detail of the caption, "" where none (always for labels)."""
    try:
        pipe = ctx.manager.require()
    except ValueError as err:
        raise fail(str(err)) from None
    if mode not in SEARCH_MODES:
        raise fail(f"search mode must be one of: {', '.join(SEARCH_MODES)}")
    try:
        if isinstance(top_k, bool):  # True == 1 in Python, but no client means one result by it
            raise ValueError
        k = int(top_k)
        if k != top_k or not 1 <= k <= 100:
            raise ValueError
    except (TypeError, ValueError):
        raise fail(f"top_k must be a whole number between 1 and 100, got {top_k!r}") from None
    try:
        image = load_rgb(image_path)
    except ValueError as err:
        raise fail(str(err)) from None
    try:
        if mode == SEARCH_LABELS:
            results = pipe.zero_shot(image, parse_labels(labels))[:k]
            detail_of = {}
        elif mode == SEARCH_FILE:
            captions, details = read_caption_file(captions_file)
            results = pipe.search(image, top_k=k, captions=captions)
            detail_of = dict(zip(captions, details))
        else:
            if not pipe.captions:
                raise fail("this model has no caption bank; upload a caption file or type labels instead")
            results = pipe.search(image, top_k=k)
            detail_of = {c: pipe.caption_detail(c) for c, _ in results}
    except gr.Error:  # already a message (gr.Error is a ValueError whose str() adds quotes)
        raise
    except ValueError as err:
        raise fail(str(err)) from None
    return [dict(zip(SEARCH_COLUMNS, (r + 1, c, round(float(v), 4), detail_of.get(c, ""))))
            for r, (c, v) in enumerate(results)]


def search_table(results: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([[r[col] for col in SEARCH_COLUMNS] for r in results], columns=list(SEARCH_COLUMNS))
