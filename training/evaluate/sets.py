"""What is evaluated on: the fixed, seeded Shapes World prompt sets and renders, prompt files and
image folders.

`EVAL_SEED` is the dedicated seed of the fixed Shapes World evaluation sets. Nothing that tunes
anything (tests, training, hyper-parameter choices) may draw from it; sub-streams are numpy
SeedSequence([EVAL_SEED, k]) with k = 1 one-object prompts, 2 two-object prompts, 3 reverse-search
renders, 4 / 5 probe train / val renders, 6 zero-shot renders, 7 masks, 10 editing scenes
(bench/shapes_eval.py section 8; 8 is fid_clip's scenes, 9 the bench's VAE-ceiling jitter).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from dream_core.request import MAX_CANDIDATES
from dream_core.retrieval import read_caption_bank
from dream_core.text import validate_prompts

EVAL_SEED = 20261123
STREAM_ONE_OBJECT, STREAM_TWO_OBJECT, STREAM_SEARCH, STREAM_PROBE_TRAIN, STREAM_PROBE_VAL = 1, 2, 3, 4, 5
STREAM_ZERO_SHOT, STREAM_MASKS = 6, 7
STREAM_EDITS = 10
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _stream_rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(stream)]))


def one_object_prompts(n: int, seed: int = EVAL_SEED) -> list[str]:
    """n fully specified one-object captions (canonical wording), drawn without replacement from
    the 2,160 of the bank while n allows, so the set covers the bank evenly."""
    from training.data.shapes_world import full_caption_bank

    if n < 1:
        raise ValueError(f"the number of prompts must be >= 1, got {n}")
    bank = full_caption_bank()
    rng = _stream_rng(seed, STREAM_ONE_OBJECT)
    idx = np.concatenate([rng.permutation(len(bank)) for _ in range(math.ceil(n / len(bank)))])[:n]
    return [bank[int(i)] for i in idx]


def two_object_prompts(n: int, seed: int = EVAL_SEED) -> list[str]:
    """n fully specified two-object captions of random valid scenes (canonical wording)."""
    from training.data.shapes_world import two_object_captions

    if n < 1:
        raise ValueError(f"the number of prompts must be >= 1, got {n}")
    return two_object_captions(_stream_rng(seed, STREAM_TWO_OBJECT), n)


def rendered_scenes(n: int, seed: int, stream: int, num_objects: int | None = 1) -> tuple[list[Image.Image], list]:
    """n fresh renders (random scenes, jittered) and their scenes, from sub-stream `stream`."""
    from training.data.shapes_world import random_scene, render

    rng = _stream_rng(seed, stream)
    images, scenes = [], []
    for _ in range(n):
        scene = random_scene(rng, num_objects)
        images.append(render(scene, rng))
        scenes.append(scene)
    return images, scenes


def scene_from_caption(text: str):
    """The scene a fully specified caption describes (for renders of the prompts themselves)."""
    from training.data.shapes_world import Scene, ShapeObject, parse_caption

    spec = parse_caption(text)
    if spec.background is None or any(o.size is None or o.position is None for o in spec.objects):
        raise ValueError(f"caption {text!r} is not fully specified")
    return Scene(spec.background, tuple(ShapeObject(o.color, o.shape, o.size, o.position) for o in spec.objects))


def prompt_seeds(n: int, base: int = EVAL_SEED) -> list[int]:
    """Per-prompt seeds: prompt i uses base + 64 i, so its candidates (seed + k, k < 64) never
    share a seed with another prompt's."""
    return [int(base) + MAX_CANDIDATES * i for i in range(n)]


def read_prompts(path: str | Path) -> list[str]:
    """One prompt a line; read as a caption bank, so a model's captions.txt serves as is (the detail
    after a line's tab is not part of the prompt)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prompt file {path} does not exist")
    prompts, _ = read_caption_bank(path)
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts")
    return validate_prompts(prompts, "prompts")


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def image_folder(root: str | Path, classes: Sequence[str] | None = None) -> tuple[list[Path], list[int], list[str]]:
    """ImageFolder layout root/<class>/*.png -> (paths, labels, classes). With `classes`, the
    folder must hold exactly those (so train and val agree on the label indices)."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"image folder {root} does not exist")
    found = sorted(d.name for d in root.iterdir() if d.is_dir())
    if classes is None:
        classes = found
    elif sorted(classes) != found:
        raise ValueError(f"{root} holds classes {found}, expected {sorted(classes)}")
    if len(classes) < 2:
        raise ValueError(f"image folder {root} needs at least 2 class sub-folders, found {len(classes)}")
    paths, labels = [], []
    for i, name in enumerate(classes):
        files = list_images(root / name)
        paths += files
        labels += [i] * len(files)
    if not paths:
        raise ValueError(f"image folder {root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return paths, labels, list(classes)


def load_images(paths: Sequence[Path]) -> tuple[list[Image.Image], list[int]]:
    """Read images; unreadable files are skipped and their indices returned, never a crash."""
    images, bad = [], []
    for i, p in enumerate(paths):
        try:
            with Image.open(p) as im:
                images.append(im.convert("RGB"))
        except Exception:  # corrupt or unsupported file: counted, not fatal
            images.append(None)
            bad.append(i)
    return images, bad
