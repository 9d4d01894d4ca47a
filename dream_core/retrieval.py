"""Reverse search: image -> best captions of a caption bank, in the model's joint space.

Bank embeddings are computed once per (weights, captions) and cached on disk as safetensors in the
user's cache folder (platformdirs), so the app starts fast the second time.

A caption file a user uploads is embedded while the user waits, so its size is bounded by what
two CPU cores embed in a few seconds (MAX_CAPTION_FILE_LINES, MAX_CAPTION_FILE_BYTES). The same
bank is embedded once (a second request for it waits and reads the first one's result); building
one never holds up searches in other banks. The disk cache keeps the MAX_CACHED_BANKS most
recently used banks within MAX_CACHE_BYTES: every distinct upload writes a bank, and nothing else
would ever remove one.

A bank file (a model's captions.txt, an uploaded caption file) holds one caption a line, or
`caption<TAB>detail`: the detail is free text shown beside the caption (the emoji model's: the
emoji and its keywords) and never embedded, so it changes neither the ranking nor the cache key.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from platformdirs import user_cache_dir
from safetensors.torch import load_file, save_file

#: Captions one uploaded file may hold. Measured with the bundled dream-shapes model on this
#: project's 2-core machine beside a training run: 1,349 captions/s on one thread (0.73 ms of
#: CPU a caption, tokenizer included), so 5,000 take about 3.7 s; two threads fighting the
#: training run for the cores manage 541/s. (The 99,000-line file a probe sent took 65.9 s.)
MAX_CAPTION_FILE_LINES = 5_000
#: Bytes of one uploaded caption file: 5,000 captions of up to ~200 characters.
MAX_CAPTION_FILE_BYTES = 2**20
#: Banks kept in the disk cache, least recently used removed first, and their total size.
MAX_CACHED_BANKS = 32
MAX_CACHE_BYTES = 256 * 2**20
#: A temporary bank file older than this is what a killed process left behind.
STALE_TMP_SECONDS = 600.0
TMP_SUFFIX = ".tmp"
#: Between a bank line's caption and its detail (text shown beside the caption, never embedded).
DETAIL_SEPARATOR = "\t"

_building: dict[str, threading.Lock] = {}  # cache key -> the lock of the thread embedding that bank
_building_guard = threading.Lock()


def _lock_for(key: str) -> threading.Lock:
    """The lock that makes one thread embed the bank `key` while others asking for it wait."""
    with _building_guard:
        if len(_building) > 256:  # forget idle locks (at worst a bank is then embedded twice at once)
            for k in [k for k, lock in _building.items() if not lock.locked()]:
                del _building[k]
        return _building.setdefault(key, threading.Lock())


def cache_dir() -> Path:
    return Path(user_cache_dir("dream-studio", appauthor=False)) / "caption-banks"


def parse_caption_bank(text: str) -> tuple[list[str], list[str]]:
    """(captions, details) of a bank file's text: each line is `caption` or `caption<TAB>detail`.
    Captions and details are stripped, a detail is "" where a line has none and a further tab in it
    reads as a space; blank lines and lines with an empty caption are skipped. Every bank is read here,
    so a model's bank and an uploaded file mean the same thing."""
    captions, details = [], []
    for line in text.splitlines():
        caption, _, detail = line.partition(DETAIL_SEPARATOR)
        if caption.strip():
            captions.append(caption.strip())
            details.append(detail.replace(DETAIL_SEPARATOR, " ").strip())
    return captions, details


def read_caption_bank(path: str | Path) -> tuple[list[str], list[str]]:
    """(captions, details) of a model's captions.txt (UTF-8; see parse_caption_bank)."""
    return parse_caption_bank(Path(path).read_text(encoding="utf-8"))


def check_caption_details(captions: Sequence[str], details: Sequence[str] | None) -> list[str]:
    """The details of a bank, one per caption ("" for each when None). ValueError when the lengths
    differ or a caption or detail holds a tab or a line break: written out, it would not read back
    as the same bank."""
    details = [""] * len(captions) if details is None else list(details)
    if len(details) != len(captions):
        raise ValueError(f"{len(details)} caption details for {len(captions)} captions")
    for text in (*captions, *details):
        if DETAIL_SEPARATOR in text or text != "".join(text.splitlines()):
            raise ValueError(f"a caption or its detail holds a tab or a line break: {text[:80]!r}")
    return details


def write_caption_bank(path: str | Path, captions: Sequence[str], details: Sequence[str] | None = None) -> None:
    """Write a bank as read_caption_bank reads it: `caption<TAB>detail` where there is a detail."""
    details = check_caption_details(captions, details)
    lines = [c + DETAIL_SEPARATOR + d if d else c for c, d in zip(captions, details)]
    Path(path).write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def read_caption_file(path: str | Path | None, max_lines: int = MAX_CAPTION_FILE_LINES,
                      max_bytes: int = MAX_CAPTION_FILE_BYTES) -> tuple[list[str], list[str]]:
    """(captions, details) of an uploaded UTF-8 text file, one caption a line or `caption<TAB>detail`
    as in a model's bank (whitespace in a caption collapsed, blank lines skipped, a repeated caption
    kept once with its first detail). ValueError with a message for the user when the file is
    missing, not text, empty, or beyond the limits (checked before anything is embedded)."""
    if path is None:
        raise ValueError("upload a caption file: a .txt with one caption per line")
    path = Path(path)
    if not path.is_file():
        raise ValueError("the caption file could not be found on the server; please upload it again")
    size = path.stat().st_size
    if size > max_bytes:
        raise ValueError(f"the caption file is too large ({size / 2**20:.1f} MB); the limit is "
                         f"{max_bytes / 2**20:g} MB and {max_lines:,} captions")
    try:
        text = path.read_bytes()[: max_bytes + 1].decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError("the caption file is not UTF-8 text (a .txt with one caption per line is expected)") from None
    if "\x00" in text:
        raise ValueError("the caption file is not a text file (a .txt with one caption per line is expected)")
    detail_of: dict[str, str] = {}
    for caption, detail in zip(*parse_caption_bank(text)):
        detail_of.setdefault(" ".join(caption.split()), detail)
    if not detail_of:
        raise ValueError("the caption file holds no captions (one caption per line is expected)")
    if len(detail_of) > max_lines:
        raise ValueError(f"the caption file holds {len(detail_of):,} captions; the app embeds at most "
                         f"{max_lines:,} captions from a file (a few seconds of work)")
    return list(detail_of), list(detail_of.values())


def _cached(path: Path, rows: int) -> torch.Tensor | None:
    """The cached embeddings at `path` if they are whole and of `rows` rows (the file's time is
    touched: the cache removes the least recently used first); None otherwise."""
    try:
        emb = load_file(str(path))["embeddings"]
    except Exception:  # missing, damaged or half-written: rebuilt, never trusted
        return None
    if emb.shape[0] != rows:
        return None
    try:
        os.utime(path)
    except OSError:
        pass
    return emb


def _store(path: Path, emb: torch.Tensor) -> None:
    """Write atomically under a name of its own (two processes may store the same bank), then
    prune the cache. A read-only cache folder only costs speed."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=TMP_SUFFIX, dir=path.parent)
        os.close(fd)
        try:
            save_file({"embeddings": emb.contiguous()}, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError:
        return
    prune_cache(path.parent, keep=path)


def prune_cache(folder: Path, keep: Path | None = None, max_banks: int = MAX_CACHED_BANKS,
                max_bytes: int = MAX_CACHE_BYTES) -> None:
    """Remove the least recently used banks beyond `max_banks` files or `max_bytes`, and temporary
    files older than STALE_TMP_SECONDS. `keep` (the bank just written) stays. Files that another
    process removes meanwhile are skipped."""
    now = time.time()
    banks = []
    for p in folder.iterdir():
        try:
            st = p.stat()
            if p.name.endswith(TMP_SUFFIX):
                if now - st.st_mtime > STALE_TMP_SECONDS:
                    p.unlink()
            elif p.suffix == ".safetensors":
                banks.append((p != keep, -st.st_mtime, p, st.st_size))
        except OSError:
            continue
    count, total = 0, 0
    for _, _, p, size in sorted(banks):  # the kept bank first, then newest first
        count, total = count + 1, total + size
        if p != keep and (count > max_banks or total > max_bytes):
            try:
                p.unlink()
            except OSError:
                pass


class CaptionBank:
    def __init__(self, captions: list[str], embeddings: torch.Tensor) -> None:
        if len(captions) != embeddings.shape[0]:
            raise ValueError("captions and embeddings differ in length")
        self.captions = captions
        self.embeddings = embeddings.float()

    @classmethod
    def build(cls, embed_texts: Callable[[list[str]], torch.Tensor], fingerprint: str, captions: Sequence[str],
              use_cache: bool = True) -> "CaptionBank":
        """Embed `captions` with `embed_texts` (normalised [N, E]), or read them from the on-disk
        cache, keyed by `fingerprint` (which identifies the weights) and the captions."""
        captions = list(captions)
        if not captions:
            raise ValueError("the caption bank is empty")
        key = hashlib.sha256((fingerprint + "\n" + "\n".join(captions)).encode()).hexdigest()[:24]
        path = cache_dir() / f"{key}.safetensors"
        emb = _cached(path, len(captions)) if use_cache else None
        if emb is not None:
            return cls(captions, emb)
        with _lock_for(key):
            emb = _cached(path, len(captions)) if use_cache else None  # embedded while this one waited
            if emb is None:
                emb = embed_texts(captions).cpu()
                if use_cache:
                    _store(path, emb)
        return cls(captions, emb)

    def search(self, image_embedding: torch.Tensor, top_k: int = 5) -> list[tuple[str, float]]:
        """Top-k (caption, cosine) for one normalised image embedding [E]."""
        scores = self.embeddings @ image_embedding.float().cpu()
        k = min(top_k, len(self.captions))
        vals, idx = scores.topk(k)
        return [(self.captions[i], float(v)) for v, i in zip(vals.tolist(), idx.tolist())]

    def rank_of(self, image_embedding: torch.Tensor, caption: str) -> int:
        """1-based rank of `caption` for the image (for evaluation)."""
        scores = self.embeddings @ image_embedding.float().cpu()
        i = self.captions.index(caption)
        return int((scores > scores[i]).sum()) + 1
