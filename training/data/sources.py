"""Training data beyond the Shapes World: webdataset shards, image folders and the latent/T5 cache.

Every source is map-style (a sample index -> raw sample) so that the stream is a pure function of
(seed, position): pass p visits the samples in the order of a permutation seeded by (seed, p), rank r
takes global micro-batches r, r + W, ..., and DataLoader worker w builds every K-th of the rank's
micro-batches. A resumed run (start_step) therefore continues exactly where it stopped, whatever
the number of workers. Flips, and the random crops of `recipe.crop_min`, are drawn per global
batch from the same seed, never from the global RNG. An unreadable sample is replaced by the next
readable one in the pass's order and counted (`SKIPPED`, `batch["skipped"]`), with a warning every
`WARN_EVERY` skips: never a crash.

    webdataset  a directory of uncompressed img2dataset tars: <key>.jpg|jpeg|png|webp + <key>.txt,
                or <key>.json with "caption" (or the first of "captions"); read with tarfile by
                seeking to member offsets (indexed once, cached in <data>/.index_cache/)
    folder      images with a .txt caption beside each, or captions.csv (file,caption) or
                captions.jsonl ({"file": ..., "caption": ...}) at the root
    cache       the directory written by `python -m training.cache` (VAE moments of the crop and of
                its flip, T5 states in fp16, captions)
    shapes      the Shapes World rendered on the fly (ShapesSource: scene q from its own seed, read in
                order, endless); a Shapes cache of N scenes holds its first N

Batches: {"caption": list[str], "image": [B, 3, H, W] in [-1, 1]} or {"caption", "moments":
[B, 2C, h, w] float32, "t5_hidden": [B, T, d] float16, "t5_mask": [B, T] bool}, plus "skipped"
(int, samples replaced while building the batch).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import tarfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

log = logging.getLogger("dream.data")

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
CAPTION_FILES = ("captions.csv", "captions.jsonl")
WARN_EVERY = 100  # log a warning on the first and every N-th skipped sample
NAMED_MAX = 10  # files named in a warning about many (the rest are counted)
VERIFY_MAX = 20_000  # image folders up to this size are checked image by image before training
MAX_REPLACEMENTS = 64  # consecutive unreadable samples before the data is declared broken
INDEX_VERSION = 1
RESIDENT_MAX_BYTES = 2 << 30  # caches up to this size on disk are held in memory once read (CacheSource)


class SkipCounter:
    """Counts unreadable samples in this process (a DataLoader worker counts its own; batches carry
    their count in batch["skipped"] so the trainer can total them across workers)."""

    def __init__(self) -> None:
        self.count = 0
        self.reasons: dict[str, int] = {}
        self._lock = threading.Lock()

    def add(self, what: str, reason: str) -> None:
        with self._lock:
            self.count += 1
            self.reasons[reason] = self.reasons.get(reason, 0) + 1
            n = self.count
        if n == 1 or n % WARN_EVERY == 0:
            log.warning("skipped unreadable sample %s (%s); %d skipped so far in this process", what, reason, n)

    def reset(self) -> None:
        with self._lock:
            self.count, self.reasons = 0, {}


SKIPPED = SkipCounter()


class CorruptSample(Exception):
    """A sample that cannot be read or decoded (replaced and counted, never fatal)."""


# ---------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------

def adm_center_crop(image: Image.Image, size: int) -> Image.Image:
    """ADM's centre crop: halve with a box filter while the short side is >= 2 x size, bicubic
    resize so the short side is `size`, then take the centre size x size square."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> float32 [3, H, W] in [-1, 1]."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous() / 127.5 - 1.0


def decode_image(data: bytes | Path) -> Image.Image:
    """Fully decode an image (lazy PIL errors surface here, not later in a worker)."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
            im.load()
            return im.convert("RGB")
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, DecompressionBomb, ...)
        raise CorruptSample(f"undecodable image: {type(err).__name__}: {err}") from err


def clean_caption(text: str) -> str:
    text = " ".join(str(text).split())
    if not text:
        raise CorruptSample("empty caption")
    return text


# ---------------------------------------------------------------------------------------------
# Sources: index -> raw sample
# ---------------------------------------------------------------------------------------------

class FolderSource:
    """Images under `root` (recursive) with their captions. Captions come from captions.csv or
    captions.jsonl at the root when present, otherwise from `<image stem>.txt` beside each image
    (read lazily, so indexing a large folder lists it once and reads nothing else)."""

    def __init__(self, root: str | Path) -> None:
        root = Path(root)
        if not str(root) or not root.exists():
            raise ValueError(f"data path {str(root)!r} does not exist")
        if not root.is_dir():
            raise ValueError(f"data path {root} must be a directory of images with captions")
        self.root = root
        self.items: list[tuple[str, str | None]] = []  # (relative image path, caption or None = .txt)
        table = self._caption_table()
        if table is not None:
            self.items = table
            self.caption_source = "captions.csv" if (root / "captions.csv").is_file() else "captions.jsonl"
        else:
            self.caption_source = "a .txt beside each image"
        # Images left out for want of a caption (relative paths), named once by open_source.
        self.no_caption: list[str] = []
        if table is None:
            for path in sorted(self._images()):
                if path.with_suffix(".txt").is_file():
                    self.items.append((str(path.relative_to(root)), None))
                else:
                    self.no_caption.append(str(path.relative_to(root)))
        else:
            listed = {os.path.normpath(rel) for rel, _ in table}
            self.no_caption = sorted(rel for rel in (str(p.relative_to(root)) for p in self._images())
                                     if os.path.normpath(rel) not in listed)
        if not self.items:
            raise ValueError(f"data path {root} holds no image with a caption (images {', '.join(IMAGE_EXTS)} with "
                             f"a .txt beside each, or a captions.csv / captions.jsonl at the root)")

    def _images(self) -> Iterator[Path]:
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in filenames:
                if name.lower().endswith(IMAGE_EXTS):
                    yield Path(dirpath) / name

    def _caption_table(self) -> list[tuple[str, str | None]] | None:
        csv_path, jsonl_path = self.root / "captions.csv", self.root / "captions.jsonl"
        rows: list[tuple[str, str | None]] = []
        if csv_path.is_file():
            with open(csv_path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                if not reader.fieldnames or not {"file", "caption"} <= set(reader.fieldnames):
                    raise ValueError(f"{csv_path} must have a header with columns file,caption; got {reader.fieldnames}")
                for row in reader:
                    rows.append((row["file"], row["caption"] or ""))
            return rows
        if jsonl_path.is_file():
            with open(jsonl_path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                        rows.append((str(obj["file"]), str(obj["caption"])))
                    except (json.JSONDecodeError, KeyError, TypeError) as err:
                        raise ValueError(f"{jsonl_path}:{n} is not a JSON object with file and caption: {err}") from err
            return rows
        return None

    def __len__(self) -> int:
        return len(self.items)

    def describe(self, i: int) -> str:
        return str(self.root / self.items[i][0])

    def verify(self) -> list[tuple[str, str]]:
        """Decode every image once (PIL's verify, which checks a PNG to its last chunk, then a full
        load) and leave out the unreadable ones; returns [(file, reason)] of those left out."""
        good, bad = [], []
        for rel, text in self.items:
            path = self.root / rel
            try:
                with Image.open(path) as im:
                    im.verify()
                with Image.open(path) as im:
                    im.load()
            except Exception as err:  # PIL raises many types (OSError, SyntaxError, ...)
                bad.append((str(path), f"{type(err).__name__}: {err}"))
                continue
            good.append((rel, text))
        self.items = good
        if not good:
            raise ValueError(f"data path {self.root}: none of its images can be read")
        return bad

    def captions(self) -> list[str]:
        """Every caption (the .txt files are read here), for the caption bank of an exported model."""
        out = []
        for i in range(len(self.items)):
            rel, text = self.items[i]
            if text is None:
                try:
                    text = (self.root / rel).with_suffix(".txt").read_text(encoding="utf-8", errors="replace")
                except OSError:
                    continue
            text = " ".join(text.split())
            if text:
                out.append(text)
        return out


    def read(self, i: int) -> tuple[Image.Image, str]:
        rel, text = self.items[i]
        path = self.root / rel
        if text is None:
            try:
                text = path.with_suffix(".txt").read_text(encoding="utf-8", errors="replace")
            except OSError as err:
                raise CorruptSample(f"unreadable caption: {err}") from err
        if not path.is_file():
            raise CorruptSample("image file is missing")
        return decode_image(path), clean_caption(text)


class ConcatSource:
    """Several map-style sources read as one (fine-tuning data plus a preservation folder)."""

    def __init__(self, sources: list) -> None:
        self.sources = sources
        self.offsets = np.cumsum([0] + [len(s) for s in sources])

    def _find(self, i: int) -> tuple[Any, int]:
        k = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return self.sources[k], i - int(self.offsets[k])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def describe(self, i: int) -> str:
        src, j = self._find(i)
        return src.describe(j)

    def read(self, i: int):
        src, j = self._find(i)
        return src.read(j)

class TarSource:
    """img2dataset webdataset shards, read by seeking to each member (no webdataset dependency).

    Each shard is scanned once for member offsets (headers only); the index is cached beside the
    data in `.index_cache/`, or, when the data's folder is read-only, in `fallback_index_cache`
    (the trainer sets its run folder's, which every rank sees, so the shards are scanned once per
    run rather than by every rank at every start), and checked against the tar's size and mtime.
    A shard that is not a tar at all is an error up front; a truncated one keeps the members
    before the damage."""

    IMG, TXT, JSON = 0, 1, 2
    fallback_index_cache: Path | None = None

    def __init__(self, root: str | Path, index_cache: str | Path | None = None) -> None:
        root = Path(root)
        if not str(root) or not root.exists():
            raise ValueError(f"data path {str(root)!r} does not exist")
        shards = [root] if root.is_file() else sorted(p for p in root.rglob("*.tar") if ".index_cache" not in p.parts)
        if not shards:
            raise ValueError(f"data path {root} holds no .tar shard")
        self.root = root
        self.shards = shards
        self.cache_dir = Path(index_cache) if index_cache else (root.parent if root.is_file() else root) / ".index_cache"
        parts, counts = [], []
        for shard in shards:
            idx = self._index(shard)
            parts.append(idx)
            counts.append(len(idx["img_off"]))
        if sum(counts) == 0:
            raise ValueError(f"the shards under {root} hold no sample with both an image and a caption")
        self.shard_of = np.repeat(np.arange(len(shards), dtype=np.int32), counts)
        self.local = np.concatenate([np.arange(c, dtype=np.int64) for c in counts])
        self.fields = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        self._files: OrderedDict[int, Any] = OrderedDict()
        self._pid = os.getpid()

    # ----- indexing -----
    def _cache_file(self, shard: Path, folder: Path) -> Path:
        digest = hashlib.md5(str(shard.resolve()).encode()).hexdigest()[:8]
        return Path(folder) / f"{shard.name}.{digest}.v{INDEX_VERSION}.safetensors"

    def _index(self, shard: Path) -> dict[str, np.ndarray]:
        from safetensors import safe_open
        from safetensors.numpy import save_file

        st = shard.stat()
        stamp = {"size": str(st.st_size), "mtime_ns": str(st.st_mtime_ns)}
        folders = [self.cache_dir] + ([self.fallback_index_cache] if self.fallback_index_cache else [])
        caches = [self._cache_file(shard, folder) for folder in folders]
        for cache in caches:
            if cache.is_file():
                try:
                    with safe_open(str(cache), "np") as f:
                        if f.metadata() == stamp:
                            return {k: f.get_tensor(k) for k in f.keys()}
                except Exception:  # a damaged cache is rebuilt
                    pass
        idx = scan_tar(shard)
        for cache in caches:
            try:
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
                save_file(idx, str(tmp), metadata=stamp)
                os.replace(tmp, cache)
                break
            except OSError:  # read-only: the next folder (without one, index again next time)
                continue
        return idx

    # ----- reading -----
    def _file(self, shard: int):
        if os.getpid() != self._pid:  # a forked worker must not share its parent's file offsets
            self._files, self._pid = OrderedDict(), os.getpid()
        f = self._files.get(shard)
        if f is None:
            f = open(self.shards[shard], "rb")
            self._files[shard] = f
            if len(self._files) > 64:
                self._files.popitem(last=False)[1].close()
        else:
            self._files.move_to_end(shard)
        return f

    def _bytes(self, shard: int, offset: int, size: int) -> bytes:
        f = self._file(shard)
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise CorruptSample("member is truncated")
        return data

    def __len__(self) -> int:
        return len(self.shard_of)

    def describe(self, i: int) -> str:
        return f"{self.shards[self.shard_of[i]]}#{self.local[i]}"

    def read(self, i: int) -> tuple[Image.Image, str]:
        g = self.fields
        shard = int(self.shard_of[i])
        try:
            raw = self._bytes(shard, int(g["cap_off"][i]), int(g["cap_size"][i]))
            image_bytes = self._bytes(shard, int(g["img_off"][i]), int(g["img_size"][i]))
        except OSError as err:
            raise CorruptSample(f"unreadable shard: {err}") from err
        text = raw.decode("utf-8", errors="replace")
        if int(g["cap_kind"][i]) == self.JSON:
            try:
                obj = json.loads(text)
                text = obj["caption"] if obj.get("caption") else (obj.get("captions") or [""])[0]
            except (json.JSONDecodeError, AttributeError, TypeError, IndexError) as err:
                raise CorruptSample(f"bad json caption: {err}") from err
        return decode_image(image_bytes), clean_caption(text or "")

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_files"] = OrderedDict()  # handles are never pickled
        return state


def scan_tar(path: Path) -> dict[str, np.ndarray]:
    """Member offsets of every key with an image and a caption (.txt preferred over .json)."""
    members: dict[str, dict[str, tuple[int, int, str]]] = {}
    order: list[str] = []
    try:
        tf = tarfile.open(path, mode="r:")
    except (tarfile.TarError, OSError) as err:
        raise ValueError(f"shard {path} is not a readable tar file: {err}") from err
    try:
        try:
            for info in tf:
                if not info.isfile():
                    continue
                base = info.name.rsplit("/", 1)[-1]
                if base.startswith(".") or "." not in base:
                    continue
                key = info.name[: len(info.name) - len(base)] + base.split(".", 1)[0]
                ext = "." + base.split(".", 1)[1].lower()
                if key not in members:
                    members[key] = {}
                    order.append(key)
                members[key][ext] = (info.offset_data, info.size, ext)
        except (tarfile.TarError, OSError) as err:
            log.warning("shard %s is damaged after %d members (%s); keeping those", path, len(order), err)
    finally:
        tf.close()
    img_off, img_size, cap_off, cap_size, cap_kind = [], [], [], [], []
    for key in order:
        m = members[key]
        img = next((m[e] for e in IMAGE_EXTS if e in m), None)
        cap = m.get(".txt")
        kind = TarSource.TXT
        if cap is None and ".json" in m:
            cap, kind = m[".json"], TarSource.JSON
        if img is None or cap is None:
            continue
        img_off.append(img[0]), img_size.append(img[1])
        cap_off.append(cap[0]), cap_size.append(cap[1]), cap_kind.append(kind)
    return {
        "img_off": np.asarray(img_off, dtype=np.int64), "img_size": np.asarray(img_size, dtype=np.int64),
        "cap_off": np.asarray(cap_off, dtype=np.int64), "cap_size": np.asarray(cap_size, dtype=np.int64),
        "cap_kind": np.asarray(cap_kind, dtype=np.uint8),
    }


class ShapesSource:
    """The Shapes World as a map-style source: sample i is the scene rendered from its own generator
    seeded by (seed, i). Endless (`n=None`: the live feed, read in order) or the first `n` scenes
    (what `training.cache` extracts), so a cache of N scenes holds the live feed's first N."""

    ENDLESS = 2 ** 62

    def __init__(self, seed: int, n: int | None = None) -> None:
        self.seed, self.n = seed, n

    @property
    def endless(self) -> bool:
        return self.n is None

    def __len__(self) -> int:
        return self.ENDLESS if self.n is None else self.n

    def describe(self, i: int) -> str:
        return f"shapes:{self.seed}:{i}"

    def read(self, i: int) -> tuple[Image.Image, str]:
        from training.data.shapes_world import caption, random_scene, render

        rng = np.random.default_rng([self.seed, i])
        scene = random_scene(rng)
        image = render(scene, rng)
        return image, caption(scene, rng)


class CacheSource:
    """The directory written by `training.cache`: shards of moments, flipped moments, T5 states
    (fp16) and masks, with a JSON of captions beside each. Files are opened lazily per worker.

    A cache of at most `resident_max_bytes` on disk (a Shapes cache of ~95,000 scenes at the default)
    is held in memory shard by shard once read: a sample is then one index into each tensor instead
    of three reads through safetensors' slices (~0.15 ms a sample, ~10 ms a batch of 64 here). Each
    DataLoader worker holds its own copy; a larger cache is read slice by slice."""

    def __init__(self, root: str | Path, resident_max_bytes: int = RESIDENT_MAX_BYTES) -> None:
        root = Path(root)
        if not str(root) or not root.is_dir():
            raise ValueError(f"cache path {str(root)!r} does not exist (write one with python -m training.cache)")
        index_file = root / "index.json"
        if not index_file.is_file():
            raise ValueError(f"cache {root} has no index.json: the extraction is incomplete "
                             f"(rerun python -m training.cache with the same --out to finish it)")
        try:
            self.index = json.loads(index_file.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{index_file} is not valid JSON: {err}") from err
        self.root = root
        shards = self.index.get("shards", [])
        counts = [int(s["n"]) for s in shards]
        for s in shards:
            if not (root / s["name"]).is_file() or not (root / s["captions"]).is_file():
                raise ValueError(f"cache {root} is missing {s['name']} listed in index.json")
        if sum(counts) == 0:
            raise ValueError(f"cache {root} holds no sample")
        self.names = [s["name"] for s in shards]
        self.caption_files = [s["captions"] for s in shards]
        self.shard_of = np.repeat(np.arange(len(shards), dtype=np.int32), counts)
        self.local = np.concatenate([np.arange(c, dtype=np.int64) for c in counts if c > 0])
        self.resident = sum((root / n).stat().st_size for n in self.names) <= resident_max_bytes
        self._handles: OrderedDict[int, Any] = OrderedDict()
        self._captions: OrderedDict[int, list[str]] = OrderedDict()
        self._tensors: dict[int, dict[str, torch.Tensor]] = {}  # resident shards

    def check_config(self, config) -> None:
        """The cache must have been written for this model's geometry and T5."""
        meta = self.index.get("meta", {})
        want = {"image_size": config.image_size, "latent_channels": config.vae_channels,
                "latent_size": config.latent_size, "t5_dim": config.t5_dim, "t5_max_length": config.t5_max_length}
        bad = {k: (meta.get(k), v) for k, v in want.items() if meta.get(k) != v}
        if bad:
            detail = ", ".join(f"{k}: cache {a} vs model {b}" for k, (a, b) in bad.items())
            raise ValueError(f"cache {self.root} was written for another model geometry ({detail})")

    def check_weights(self, vae_path: str, t5_path: str) -> None:
        """The cached moments and T5 states must come from the VAE encoder and the T5 the model
        trains with (their content fingerprints, so a re-saved copy passes and a new decoder too)."""
        from dream_core.image_tokenizer import encoder_fingerprint
        from dream_core.text import t5_fingerprint

        meta = self.index.get("meta", {})
        checks = (("vae_encoder_fingerprint", "vae_path", "VAE encoder", vae_path, encoder_fingerprint),
                  ("t5_fingerprint", "t5_path", "T5", t5_path, t5_fingerprint))
        for key, source_key, what, path, fingerprint in checks:
            if key not in meta:
                log.warning("cache %s predates weight fingerprints: it cannot be checked against the %s at %s",
                            self.root, what, path)
            elif meta[key] != fingerprint(path):
                raise ValueError(f"cache {self.root} was written with another {what} ({meta.get(source_key)}) "
                                 f"than the one at {path}; extract a new cache with these weights")

    def check_hard_negatives(self, n: int) -> None:
        """Hard negatives are made from the Shapes World grammar: only a cache of the Shapes World has it."""
        data = self.index.get("meta", {}).get("data")
        if n and data != "shapes":
            raise ValueError(f"recipe.hard_negatives={n} needs Shapes World captions, but cache {self.root} was "
                             f"extracted from data={data}; set hard_negatives=0 or train from a Shapes World cache")

    def __len__(self) -> int:
        return len(self.shard_of)

    def describe(self, i: int) -> str:
        return f"{self.names[self.shard_of[i]]}#{self.local[i]}"

    def _handle(self, s: int):
        from safetensors import safe_open

        h = self._handles.get(s)
        if h is None:
            h = safe_open(str(self.root / self.names[s]), "pt")
            self._handles[s] = h
            self._captions[s] = json.loads((self.root / self.caption_files[s]).read_text())["captions"]
            if len(self._handles) > 32:
                old, _ = self._handles.popitem(last=False)
                self._captions.pop(old, None)
        else:
            self._handles.move_to_end(s)
        return h

    def _shard(self, s: int) -> dict[str, torch.Tensor]:
        """Shard s's tensors, read once and kept (resident caches only)."""
        from safetensors.torch import load_file

        t = self._tensors.get(s)
        if t is None:
            t = load_file(str(self.root / self.names[s]))
            self._captions[s] = json.loads((self.root / self.caption_files[s]).read_text())["captions"]
            self._tensors[s] = t
        return t

    def read(self, i: int, flip: bool = False) -> dict[str, Any]:
        s, j = int(self.shard_of[i]), int(self.local[i])
        try:
            if self.resident:
                t = self._shard(s)
                get = lambda key: t[key][j].clone()  # noqa: E731 - a copy: the caller owns it
            else:
                h = self._handle(s)
                get = lambda key: h.get_slice(key)[j:j + 1][0]  # noqa: E731
            return {"moments": get("moments_flip" if flip else "moments").float(), "t5_hidden": get("t5_hidden"),
                    "t5_mask": get("t5_mask").bool(), "caption": self._captions[s][j]}
        except Exception as err:  # a damaged shard file: counted like any unreadable sample
            raise CorruptSample(f"unreadable cache shard: {type(err).__name__}: {err}") from err

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"], state["_captions"], state["_tensors"] = OrderedDict(), OrderedDict(), {}
        return state


# ---------------------------------------------------------------------------------------------
# The deterministic, resumable stream of batches
# ---------------------------------------------------------------------------------------------

class SampleStream(IterableDataset):
    """Endless batches from a map-style source, a pure function of (seed, rank, micro-batch index).

    Global micro-batch g = j * world + rank holds stream positions g*B ... g*B + B - 1; position q
    is sample perm_p[q mod N] of pass p = q // N (perm_p seeded by (seed, p)), or sample q of an
    endless source (the Shapes World, whose every sample is already a fresh random scene). Worker w
    of K yields the rank's micro-batches start + w, start + w + K, ..., which the DataLoader's
    round-robin puts back in order. Hard negatives (Shapes World captions only) are drawn per
    global micro-batch from (seed, g), like the flips."""

    def __init__(self, source, make: Callable[..., dict], batch_size: int, rank: int, world: int,
                 start_batch: int, seed: int, flip: bool, hard_negatives: int = 0, crop_min: float = 1.0) -> None:
        super().__init__()
        self.source, self.make = source, make
        self.batch_size, self.rank, self.world = batch_size, rank, world
        self.start_batch, self.seed, self.flip = start_batch, seed, flip
        self.crop_min = crop_min
        self.hard_negatives = hard_negatives
        self.skipped = 0  # in this process (see SKIPPED for the module-wide count)
        self._perm: tuple[int, np.ndarray] | None = None

    def permutation(self, p: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != p:
            self._perm = (p, np.random.default_rng([self.seed, p]).permutation(len(self.source)))
        return self._perm[1]

    def index_at(self, q: int) -> int:
        """The sample at stream position q: an endless source is read in order (each of its
        samples is already a fresh random draw), a finite one in its pass's permutation."""
        if getattr(self.source, "endless", False):
            return q
        n = len(self.source)
        return int(self.permutation(q // n)[q % n])

    def sample_at(self, q: int, flip: bool, crop: Crop | None = None) -> tuple[dict, int]:
        """The sample at stream position q (or the next readable one of its pass), and the skips."""
        n = len(self.source)
        skipped = 0
        for k in range(min(n, MAX_REPLACEMENTS)):
            # the next readable sample of the pass (replacements stay inside pass q // n)
            idx = self.index_at((q // n) * n + (q + k) % n)
            try:
                # only the image sources' sample maker takes a crop (the recipe refuses it for others)
                return self.make(self.source, idx, flip, *([crop] if crop else [])), skipped
            except CorruptSample as err:
                skipped += 1
                self.skipped += 1
                SKIPPED.add(self.source.describe(idx), str(err))
        raise RuntimeError(f"{min(n, MAX_REPLACEMENTS)} consecutive samples of {self.source.describe(0)}... are "
                           f"unreadable: the data looks broken")

    def batch(self, j: int) -> dict:
        """Micro-batch j of this rank."""
        g = j * self.world + self.rank
        b = self.batch_size
        flips = np.random.default_rng([self.seed, 0xF11F, g]).random(b) < 0.5 if self.flip else np.zeros(b, bool)
        crops = random_crops(np.random.default_rng([self.seed, 0xC209, g]), b, self.crop_min) \
            if self.crop_min < 1.0 else [None] * b
        samples, skipped = [], 0
        for t in range(b):
            s, k = self.sample_at(g * b + t, bool(flips[t]), crops[t])
            samples.append(s)
            skipped += k
        out: dict = {"caption": [s.pop("caption") for s in samples]}
        for key in samples[0]:
            out[key] = torch.stack([s[key] for s in samples])
        out["skipped"] = skipped
        if self.hard_negatives:  # made at load time from the captions, seeded by the batch's position
            from training.data.shapes_world import hard_negative_captions

            rng = np.random.default_rng([self.seed, 0x4E6, g])
            out["hard_negatives"] = [hard_negative_captions(c, rng, self.hard_negatives) for c in out["caption"]]
        return out

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        w, k = (info.id, info.num_workers) if info is not None else (0, 1)
        j = self.start_batch + w
        while True:
            yield self.batch(j)
            j += k


@dataclass(frozen=True)
class Crop:
    """A random view of a square image: side and top-left corner as shares of its side."""
    side: float
    left: float
    top: float

    def apply(self, image: Image.Image) -> Image.Image:
        n = image.width
        box = (self.left * n, self.top * n, (self.left + self.side) * n, (self.top + self.side) * n)
        return image.resize((n, n), Image.BICUBIC, box=box)


def random_crops(rng: np.random.Generator, n: int, crop_min: float) -> list[Crop]:
    """n crops, each side uniform in [crop_min, 1], placed uniformly inside the image."""
    sides = rng.uniform(crop_min, 1.0, n)
    corners = rng.random((n, 2)) * (1.0 - sides)[:, None]
    return [Crop(float(s), float(x), float(y)) for s, (x, y) in zip(sides, corners)]


def _image_sample(size: int) -> Callable[..., dict]:
    def make(source, idx: int, flip: bool, crop: Crop | None = None) -> dict:
        image, text = source.read(idx)
        image = adm_center_crop(image, size)
        if crop is not None:
            image = crop.apply(image)
        if flip:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        sample = {"image": to_tensor(image), "caption": text}
        if getattr(source, "views", False):  # a second picture of the subject, whole (EmojiSource)
            sample["view"] = to_tensor(adm_center_crop(source.read_view(idx), size))
        return sample

    return make


def image_batches(source, size: int, batch_size: int, seed: int, flip: bool = False) -> Iterator[torch.Tensor]:
    """Endless [B, 3, size, size] batches in [-1, 1] from any image source (the stream of
    `build_dataloader`, images only): what the VAE trains on, whatever the data."""
    stream = SampleStream(source, _image_sample(size), batch_size, rank=0, world=1, start_batch=0, seed=seed,
                          flip=flip)
    for batch in stream:
        yield batch["image"]


def _cache_sample(source, idx: int, flip: bool) -> dict:
    return source.read(idx, flip=flip)


def _shapes_sample(source, idx: int, flip: bool) -> dict:
    image, text = source.read(idx)  # already 64 x 64: no crop
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return {"image": to_tensor(image), "caption": text}


def _identity(batch):
    return batch


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------

def uses_cache(recipe) -> bool:
    return recipe.data == "cache"


def check_data(recipe) -> None:
    """Cheap up-front checks (before any model is built): the path exists and is not empty."""
    if uses_cache(recipe):
        path = recipe.cache_path or recipe.data_path
        if not path or not Path(path).is_dir():
            raise ValueError(f"recipe.cache_path={path!r} does not exist (write a cache with python -m training.cache)")
        if not (Path(path) / "index.json").is_file():
            raise ValueError(f"cache {path} has no index.json: the extraction is incomplete")
        return
    path = recipe.data_path
    if not path or not Path(path).exists():
        raise ValueError(f"recipe.data_path={path!r} does not exist")
    p = Path(path)
    if p.is_dir() and next(p.iterdir(), None) is None:
        raise ValueError(f"recipe.data_path={path!r} is an empty directory")


def open_source(recipe, verify: bool = True):
    """The map-style source a recipe names (raises ValueError on a missing, empty or bad path).
    Image folders up to VERIFY_MAX images are checked image by image (`verify`): each unreadable
    file is named once in a warning and left out. A preservation folder (recipe.preserve_path) is
    appended to the data."""
    if uses_cache(recipe):
        return CacheSource(recipe.cache_path or recipe.data_path)
    if recipe.data == "webdataset":
        return TarSource(recipe.data_path)
    if recipe.data == "emoji":
        from training.data.emoji import EmojiSource

        return EmojiSource(recipe.data_path, "train", recipe.caption_templates, views=recipe.cross_style_views,
                           extra_art=recipe.extra_art)
    if recipe.data == "folder":
        folders = [FolderSource(recipe.data_path)]
        if getattr(recipe, "preserve_path", ""):
            folders.append(FolderSource(recipe.preserve_path))
        for folder in folders:
            if folder.no_caption:
                where = ("no .txt caption beside them" if folder.caption_source.endswith("image")
                         else f"no row in {folder.caption_source}")
                names = ", ".join(folder.no_caption[:NAMED_MAX])
                more = f" and {len(folder.no_caption) - NAMED_MAX} more" if len(folder.no_caption) > NAMED_MAX else ""
                log.warning("%d images in %s have %s and are left out: %s%s",
                            len(folder.no_caption), folder.root, where, names, more)
            if verify and len(folder) <= VERIFY_MAX:
                for path, reason in folder.verify():
                    log.warning("left out %s: the image cannot be read (%s)", path, reason)
        return folders[0] if len(folders) == 1 else ConcatSource(folders)
    raise ValueError(f"recipe.data={recipe.data!r} is not a file source (webdataset, folder, emoji or cache)")


def describe_source(source) -> str:
    """One line for the start of a run: how many samples, where from, and where the captions are."""
    if isinstance(source, ConcatSource):
        return " + ".join(describe_source(s) for s in source.sources)
    if isinstance(source, FolderSource):
        return f"{len(source)} images in {source.root} (captions: {source.caption_source})"
    if isinstance(source, TarSource):
        return f"{len(source)} samples in {len(source.shards)} shards under {source.root} (captions: .txt/.json members)"
    if isinstance(source, CacheSource):
        return f"{len(source)} cached samples in {source.root} (captions: the cache)"
    if hasattr(source, "styles"):  # training.data.emoji.EmojiSource
        extra = f" + {len(source.extra_emoji)} older Noto pictures" if len(source.extra_emoji) else ""
        return (f"{len(source.pairs)} emoji images ({source.split} split){extra} x {len(source.template_ids)} caption "
                f"templates in {source.root}")
    return f"{len(source)} samples"


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def data_workers(requested: int) -> int:
    """recipe.num_workers capped by the usable cores (PyTorch warns above that), said when capped."""
    cores = usable_cores()
    workers = max(0, min(int(requested), cores))
    if workers < requested:
        log.warning("num_workers=%d capped to %d: this process may use %d CPU cores", requested, workers, cores)
    return workers


def build_dataloader(recipe, config, rank: int = 0, world: int = 1, start_step: int = 0, source=None) -> DataLoader:
    """The training loader for recipe.data in webdataset | folder | cache (see the module doc), or
    the Shapes World's endless ShapesSource; `source` is the already opened source of the recipe
    (opened here when None)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank}")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    if source is None:
        source = open_source(recipe)
    if isinstance(source, CacheSource):
        source.check_config(config)
        if recipe.vae_path and recipe.t5_path:
            source.check_weights(recipe.vae_path, recipe.t5_path)
        source.check_hard_negatives(recipe.hard_negatives)
        make = _cache_sample
    elif isinstance(source, ShapesSource):
        make = _shapes_sample
    else:
        make = _image_sample(config.image_size)
    n = None if getattr(source, "endless", False) else len(source)
    if rank == 0 and n and recipe.samples_per_epoch and abs(n - recipe.samples_per_epoch) > 0.1 * n:
        log.info("the data holds %d samples but recipe.samples_per_epoch=%d (which sets the fractional epoch)",
                 len(source), recipe.samples_per_epoch)
    start_batch = start_step * max(1, getattr(recipe, "grad_accum", 1))
    stream = SampleStream(source, make, recipe.batch_size, rank, world, start_batch, recipe.seed, recipe.flip,
                          hard_negatives=recipe.hard_negatives, crop_min=recipe.crop_min)
    workers = data_workers(recipe.num_workers)
    return DataLoader(
        stream, batch_size=None, num_workers=workers, collate_fn=_identity,
        pin_memory=torch.cuda.is_available(), persistent_workers=False,
        prefetch_factor=2 if workers else None,
        generator=torch.Generator().manual_seed(recipe.seed),  # never touch the global RNG
    )


__all__ = [
    "SKIPPED", "SkipCounter", "CorruptSample", "adm_center_crop", "to_tensor", "decode_image", "FolderSource",
    "TarSource", "CacheSource", "ConcatSource", "ShapesSource", "SampleStream", "scan_tar", "check_data", "open_source",
    "describe_source", "usable_cores", "data_workers", "build_dataloader", "image_batches",
]
