"""Shapes World: a tiny image-caption world the project can render, caption and judge exactly.

The project cannot download web-scale data, a pretrained VAE or T5 here, so it
ships this world instead.  It is the training data of the bundled default model,
the default caption bank of reverse search, the fixture of many tests, and an
exact judge of prompt faithfulness.  ``shared/shapes-world.md`` is the contract;
everything below follows it so that a checker written from that page alone
agrees with this module.

Coordinates: the 64 px canvas uses continuous coordinates in which pixel ``i``
covers ``[i, i + 1)``; cell centres are at 16, 32 and 48.  Rendering happens at
4x (pixel ``j`` of the 256 px canvas covers ``[j, j + 1)`` in 4x units).

Canonical caption wording (``caption(scene, rng=None)``, ``full_caption_bank``,
``spec_to_caption``): size words ``small`` / ``large``, positions ``at the P``,
background ``on a B background``, e.g.::

    a small red circle at the top left on a white background
    a small red circle at the top left and a large blue square at the bottom right on a black background
"""

from __future__ import annotations

import dataclasses

import itertools
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw

try:  # scipy is optional: its labelling is faster on noisy images, the fallback is exact too.
    from scipy import ndimage as _ndimage
except ImportError:  # pragma: no cover - depends on the environment
    _ndimage = None

try:  # torch is optional for everything but the Dataset wrapper.
    import torch
    from torch.utils.data import IterableDataset as _IterableDataset
except ImportError:  # pragma: no cover - depends on the environment
    torch = None  # type: ignore[assignment]
    _IterableDataset = object  # type: ignore[assignment,misc]

__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "SIZES",
    "SHAPES",
    "POSITIONS",
    "IMAGE_SIZE",
    "ShapeObject",
    "Scene",
    "render",
    "random_scene",
    "caption",
    "ObjectSpec",
    "CaptionSpec",
    "parse_caption",
    "spec_to_caption",
    "full_caption_bank",
    "two_object_captions",
    "stream",
    "ShapesWorldDataset",
    "DetectedObject",
    "Reading",
    "read_image",
    "judge",
    "judge_details",
]

# --------------------------------------------------------------------------- constants

IMAGE_SIZE = 64
_SCALE = 4  # render at 4x, then box-downsample: anti-aliased edges
_HI = IMAGE_SIZE * _SCALE

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (240, 240, 240),
    "gray": (128, 128, 128),
    "black": (16, 16, 16),
}
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 90, 230),
    "yellow": (245, 210, 40),
    "purple": (150, 70, 200),
    "orange": (250, 140, 30),
    "cyan": (40, 200, 220),
    "pink": (245, 130, 190),
}
SIZES: dict[str, int] = {"small": 14, "large": 26}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
#: position name -> (column, row) in the 3 x 3 grid, row by row.
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0),
    "top": (1, 0),
    "top right": (2, 0),
    "left": (0, 1),
    "center": (1, 1),
    "right": (2, 1),
    "bottom left": (0, 2),
    "bottom": (1, 2),
    "bottom right": (2, 2),
}
_CELL_CENTRES = (16, 32, 48)
_JITTER = 2.0
_POSITION_BY_CELL: dict[tuple[int, int], str] = {cell: name for name, cell in POSITIONS.items()}
_CORNERS = ("top left", "top right", "bottom left", "bottom right")

# Caption vocabulary (contract, "Captions").
_SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
_SIZE_OF_WORD: dict[str, str] = {w: s for s, ws in _SIZE_WORDS.items() for w in ws}
_P_OPTIONAL = 0.7
_P_BACKGROUND = 0.5

# Judge tolerances (contract, "Judging"): part of the contract, do not tune.
_OBJECT_DISTANCE = 60.0
_MIN_COMPONENT = 12
_VOTE_DISTANCE = 80.0
_LARGE_SIDE = 20

# Two-object layouts: ordered cell pairs at Chebyshev distance exactly 2, so objects never touch.
_CELL_PAIRS: tuple[tuple[str, str], ...] = tuple(
    (a, b)
    for a, (ca, ra) in POSITIONS.items()
    for b, (cb, rb) in POSITIONS.items()
    if max(abs(ca - cb), abs(ra - rb)) == 2
)


# --------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class ShapeObject:
    """One object of a scene; every field is a name from the tables above."""

    color: str
    shape: str
    size: str
    position: str


@dataclass(frozen=True)
class Scene:
    """A background and one or two objects (the contract's whole state of an image)."""

    background: str
    objects: tuple[ShapeObject, ...]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, size: str, cx4: int, cy4: int, fill: Any) -> None:
    """Draw one shape on a 4x canvas, centred at 4x coordinates (cx4, cy4).

    Shared by the renderer and the judge's ideal masks, so the two agree to the
    hi-res pixel.  The shape covers 4x pixels ``[c - h, c + h)`` on each axis
    (``h = 2 d``); PIL's inclusive end coordinates are therefore ``c + h - 1``,
    and points on the axis of symmetry use the two pixels ``c - 1`` and ``c``.
    """
    d4 = SIZES[size] * _SCALE
    h = d4 // 2
    x0, x1, y0, y1 = cx4 - h, cx4 + h - 1, cy4 - h, cy4 + h - 1
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif shape == "square":
        s = int(round(0.85 * d4 / 2))  # half side of 0.85 d
        draw.rectangle([cx4 - s, cy4 - s, cx4 + s - 1, cy4 + s - 1], fill=fill)
    elif shape == "triangle":
        draw.polygon([(x0, y1), (x1, y1), (cx4, y0), (cx4 - 1, y0)], fill=fill)
    elif shape == "diamond":
        draw.polygon(
            [
                (cx4 - 1, y0), (cx4, y0), (x1, cy4 - 1), (x1, cy4),
                (cx4, y1), (cx4 - 1, y1), (x0, cy4), (x0, cy4 - 1),
            ],
            fill=fill,
        )
    elif shape == "cross":
        t = int(round(d4 / 6))  # half thickness of d / 3
        draw.rectangle([x0, cy4 - t, x1, cy4 + t - 1], fill=fill)
        draw.rectangle([cx4 - t, y0, cx4 + t - 1, y1], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _check_scene(scene: Scene) -> None:
    """Reject names outside the world early, with a message naming the bad field."""
    if scene.background not in BACKGROUNDS:
        raise ValueError(f"unknown background {scene.background!r}; expected one of {tuple(BACKGROUNDS)}")
    for obj in scene.objects:
        if obj.color not in COLORS:
            raise ValueError(f"unknown colour {obj.color!r}; expected one of {tuple(COLORS)}")
        if obj.shape not in SHAPES:
            raise ValueError(f"unknown shape {obj.shape!r}; expected one of {SHAPES}")
        if obj.size not in SIZES:
            raise ValueError(f"unknown size {obj.size!r}; expected one of {tuple(SIZES)}")
        if obj.position not in POSITIONS:
            raise ValueError(f"unknown position {obj.position!r}; expected one of {tuple(POSITIONS)}")


def render(scene: Scene, rng: np.random.Generator | None = None) -> Image.Image:
    """Render a scene to a 64 x 64 RGB image.

    Drawn at 4x with PIL and box-downsampled so edges are anti-aliased like a
    real image.  ``rng`` supplies the centre jitter (uniform in [-2, 2] px per
    axis, quantised to the 4x grid, i.e. 0.25 px); ``None`` renders every
    object exactly at its cell centre.
    """
    _check_scene(scene)
    img = Image.new("RGB", (_HI, _HI), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        col, row = POSITIONS[obj.position]
        cx, cy = float(_CELL_CENTRES[col]), float(_CELL_CENTRES[row])
        if rng is not None:
            jx, jy = rng.uniform(-_JITTER, _JITTER, size=2)
            cx, cy = cx + jx, cy + jy
        _draw_shape(draw, obj.shape, obj.size, int(round(cx * _SCALE)), int(round(cy * _SCALE)), COLORS[obj.color])
    return img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX)


def _random_object(rng: np.random.Generator, color: str, position: str) -> ShapeObject:
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    size = tuple(SIZES)[int(rng.integers(len(SIZES)))]
    return ShapeObject(color=color, shape=shape, size=size, position=position)


def random_scene(rng: np.random.Generator, num_objects: int | None = None) -> Scene:
    """Draw a uniform random scene with ``num_objects`` objects (1 or 2; 50/50 when None).

    Two objects always differ in colour and stand at Chebyshev distance 2 in
    the grid, so they never touch and the judge can always separate them.
    """
    if num_objects is None:
        num_objects = 1 + int(rng.integers(2))
    if num_objects not in (1, 2):
        raise ValueError(f"num_objects must be 1 or 2, got {num_objects}")
    background = tuple(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    names = tuple(COLORS)
    if num_objects == 1:
        color = names[int(rng.integers(len(names)))]
        position = tuple(POSITIONS)[int(rng.integers(len(POSITIONS)))]
        objects: tuple[ShapeObject, ...] = (_random_object(rng, color, position),)
    else:
        i, j = rng.choice(len(names), size=2, replace=False)
        pa, pb = _CELL_PAIRS[int(rng.integers(len(_CELL_PAIRS)))]
        objects = (_random_object(rng, names[int(i)], pa), _random_object(rng, names[int(j)], pb))
    return Scene(background=background, objects=objects)


# --------------------------------------------------------------------------- captions


@dataclass(frozen=True)
class ObjectSpec:
    """What a caption states about one object; ``None`` means "not stated, not judged"."""

    color: str
    shape: str
    size: str | None = None
    position: str | None = None


@dataclass
class CaptionSpec:
    """What a caption states: the background (or None) and the named objects."""

    background: str | None
    objects: list[ObjectSpec] = field(default_factory=list)


def _position_phrasings(position: str) -> tuple[str, ...]:
    """Every phrasing the grammar allows for a position; the first one is canonical."""
    out = [f"at the {position}", f"in the {position}"]
    if position in _CORNERS:
        out.append(f"in the {position} corner")
    if position in ("left", "right"):
        out.append(f"on the {position}")
    if position == "center":
        out.append("in the middle")
    return tuple(out)


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _object_phrase(obj: ObjectSpec | ShapeObject, rng: np.random.Generator | None, full: bool) -> str:
    words = ["a"]
    if obj.size is not None and (full or rng is None or rng.random() < _P_OPTIONAL):
        words.append(_SIZE_WORDS[obj.size][0] if rng is None else _pick(rng, _SIZE_WORDS[obj.size]))
    words += [obj.color, obj.shape]
    if obj.position is not None and (full or rng is None or rng.random() < _P_OPTIONAL):
        phr = _position_phrasings(obj.position)
        words.append(phr[0] if rng is None else _pick(rng, phr))
    return " ".join(words)


def caption(scene: Scene, rng: np.random.Generator | None = None, full: bool = False) -> str:
    """Caption a scene with the contract's grammar; it only ever states what is true.

    With an ``rng``, each optional part (size, position) is present with
    probability 0.7 and the background with 0.5, unless ``full`` is set, in
    which case every part is present; synonyms and phrasings are drawn from
    ``rng`` either way.  Without an ``rng`` the caption is fully specified in
    the canonical wording (``full`` is then implied): size ``small``/``large``,
    ``at the P``, ``on a B background``.  Objects appear in scene order.
    """
    _check_scene(scene)
    parts = [_object_phrase(obj, rng, full) for obj in scene.objects]
    text = " and ".join(parts)
    if full or rng is None or rng.random() < _P_BACKGROUND:
        text += f" on a {scene.background} background"
    return text


def spec_to_caption(spec: CaptionSpec) -> str:
    """Write a spec back as a caption in the canonical wording (unstated parts left out)."""
    if not spec.objects:
        raise ValueError("a caption names at least one object")
    text = " and ".join(_object_phrase(obj, None, True) for obj in spec.objects)
    if spec.background is not None:
        text += f" on a {spec.background} background"
    return text


def _alt(words: Sequence[str]) -> str:
    # Longest first so e.g. "top left" wins over "top" without relying on backtracking.
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


def _object_regex(k: int) -> str:
    pos_names = _alt(POSITIONS)
    corners = _alt(_CORNERS)
    return (
        rf"a (?:(?P<size{k}>{_alt(_SIZE_OF_WORD)}) )?"
        rf"(?P<color{k}>{_alt(COLORS)}) (?P<shape{k}>{_alt(SHAPES)})"
        rf"(?: (?:in the (?P<corner{k}>{corners}) corner"
        rf"|(?:at|in) the (?P<pos{k}>{pos_names})"
        rf"|on the (?P<side{k}>left|right)"
        rf"|(?P<middle{k}>in the middle)))?"
    )


_CAPTION_RE = re.compile(
    rf"{_object_regex(0)}(?: and {_object_regex(1)})?(?: on a (?P<background>{_alt(BACKGROUNDS)}) background)?"
)


def parse_caption(text: str) -> CaptionSpec:
    """Parse any caption the grammar produces (all synonyms and phrasings, one or two objects).

    Case, surrounding/repeated whitespace and one final full stop are forgiven
    (prompts typed by people); anything else outside the grammar raises
    ``ValueError``.
    """
    if not isinstance(text, str):
        raise ValueError(f"caption must be a string, got {type(text).__name__}")
    norm = " ".join(text.lower().split())
    if norm.endswith("."):
        norm = norm[:-1].rstrip()
    m = _CAPTION_RE.fullmatch(norm)
    if m is None:
        raise ValueError(
            f"caption {text!r} is outside the Shapes World grammar "
            "('a [size] COLOR SHAPE [position] [and a [size] COLOR SHAPE [position]] [on a B background]')"
        )
    objects = []
    for k in (0, 1):
        color = m.group(f"color{k}")
        if color is None:
            continue
        size_word = m.group(f"size{k}")
        position = m.group(f"corner{k}") or m.group(f"pos{k}") or m.group(f"side{k}")
        if m.group(f"middle{k}"):
            position = "center"
        objects.append(
            ObjectSpec(
                color=color,
                shape=m.group(f"shape{k}"),
                size=_SIZE_OF_WORD[size_word] if size_word else None,
                position=position,
            )
        )
    return CaptionSpec(background=m.group("background"), objects=objects)


def hard_negative_captions(text: str, rng: np.random.Generator, n: int) -> list[str]:
    """`n` captions that each differ from `text` in exactly one attribute the caption states
    (one object's colour, shape, size or position, or the background), worded with the same
    random synonyms as training captions (so wording never tells a negative from a positive).

    They are contrastive hard negatives: in a batch of random scenes almost no caption differs
    from an image's own in position or shape alone, so mean-pooled features are never pushed to
    keep where and what an object is (issue 9)."""
    spec = parse_caption(text)
    choices: list[tuple[int | None, str]] = [(None, "background")] if spec.background is not None else []
    for k, obj in enumerate(spec.objects):
        choices += [(k, "color"), (k, "shape")]
        choices += [(k, key) for key in ("size", "position") if getattr(obj, key) is not None]
    pools = {"color": tuple(COLORS), "shape": SHAPES, "size": tuple(SIZES), "position": tuple(POSITIONS),
             "background": tuple(BACKGROUNDS)}
    out = []
    for _ in range(n):
        k, key = choices[int(rng.integers(len(choices)))]
        current = spec.background if k is None else getattr(spec.objects[k], key)
        new = _pick(rng, [v for v in pools[key] if v != current])
        background, objects = spec.background, list(spec.objects)
        if k is None:
            background = new
        else:
            objects[k] = dataclasses.replace(objects[k], **{key: new})
        phrase = " and ".join(_object_phrase(obj, rng, True) for obj in objects)
        out.append(phrase + (f" on a {background} background" if background is not None else ""))
    return out


def full_caption_bank() -> list[str]:
    """The 2,160 fully specified one-object captions, canonical wording.

    Order: ``itertools.product(SIZES, COLORS, SHAPES, POSITIONS, BACKGROUNDS)``
    in the tables' own orders, i.e. the caption's word order with the last
    part (background) varying fastest.
    """
    return [
        spec_to_caption(CaptionSpec(bg, [ObjectSpec(color, shape, size, pos)]))
        for size, color, shape, pos, bg in itertools.product(SIZES, COLORS, SHAPES, POSITIONS, BACKGROUNDS)
    ]


def two_object_captions(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` fully specified two-object captions of random valid scenes, canonical wording."""
    return [caption(random_scene(rng, 2)) for _ in range(n)]


# --------------------------------------------------------------------------- streams


def _stream_from(rng: np.random.Generator, full_prob: float) -> Iterator[tuple[Image.Image, str, Scene]]:
    while True:
        scene = random_scene(rng)
        image = render(scene, rng)
        full = bool(rng.random() < full_prob)  # always drawn: the stream's layout ignores full_prob
        yield image, caption(scene, rng, full=full), scene


def stream(seed: int, full_prob: float = 0.0) -> Iterator[tuple[Image.Image, str, Scene]]:
    """Endless seeded stream of (image, caption, scene); the same seed gives the same sequence.

    ``full_prob`` is the share of fully specified captions; the rest drop
    optional parts at random as the contract says training captions do.
    """
    return _stream_from(np.random.default_rng(seed), full_prob)


def _to_tensor(image: Image.Image) -> "torch.Tensor":
    """PIL RGB -> float tensor [3, 64, 64] in [-1, 1] (the models' pixel convention)."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous() / 127.5 - 1.0


class ShapesWorldDataset(_IterableDataset):  # type: ignore[misc,valid-type]
    """Endless, worker- and rank-aware Shapes World stream of {"image", "caption"} dicts.

    Each (rank, DataLoader worker) pair reads its own deterministic sub-stream,
    seeded by ``numpy.random.SeedSequence([seed, rank, worker_id])``, so workers
    never duplicate samples and a restart reproduces them.  Rank 0 / worker 0
    reads exactly ``stream(seed)``.  ``transform`` (if given) maps the PIL
    image to whatever ``"image"`` should hold; by default it is a float tensor
    [3, 64, 64] in [-1, 1].
    """

    def __init__(
        self,
        seed: int,
        transform: Callable[[Image.Image], Any] | None = None,
        rank: int = 0,
        full_prob: float = 0.0,
    ) -> None:
        if torch is None:  # pragma: no cover - depends on the environment
            raise ImportError("ShapesWorldDataset needs torch")
        super().__init__()
        self.seed = int(seed)
        self.transform = transform
        self.rank = int(rank)
        self.full_prob = float(full_prob)

    def _rng(self) -> np.random.Generator:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        if self.rank == 0 and worker == 0:
            return np.random.default_rng(self.seed)
        return np.random.default_rng(np.random.SeedSequence([self.seed, self.rank, worker]))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rng = self._rng()
        for image, text, _scene in _stream_from(rng, self.full_prob):
            out = self.transform(image) if self.transform is not None else _to_tensor(image)
            yield {"image": out, "caption": text}


# --------------------------------------------------------------------------- the judge


@dataclass(frozen=True)
class DetectedObject:
    """One component read back from an image. ``bbox`` is (x0, y0, x1, y1), inclusive pixel indices."""

    color: str | None  # None when no pixel lies within 80 of a palette colour
    shape: str
    size: str
    position: str
    pixel_count: int
    bbox: tuple[int, int, int, int]


@dataclass(frozen=True)
class Reading:
    """Everything the reference procedure reads from an image."""

    background: str
    objects: list[DetectedObject]
    background_rgb: tuple[float, float, float] = (0.0, 0.0, 0.0)


_BG_NAMES = tuple(BACKGROUNDS)
_BG_RGB = np.array([BACKGROUNDS[b] for b in _BG_NAMES], dtype=np.float32)
_COLOR_NAMES = tuple(COLORS)
_COLOR_RGB = np.array([COLORS[c] for c in _COLOR_NAMES], dtype=np.float32)
_BORDER = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
_BORDER[0, :] = _BORDER[-1, :] = _BORDER[:, 0] = _BORDER[:, -1] = True
_STRUCTURE = np.ones((3, 3), dtype=bool)


def _build_ideal_coverage() -> dict[tuple[str, str, int, int], tuple[np.ndarray, int, int]]:
    """Ideal shape coverage per (shape, size, x half-pixel?, y half-pixel?), rendered once.

    Each is rendered exactly like ``render`` does (4x, box filter) and kept as
    per-pixel coverage in [0, 1], cropped with a 1-px margin.  A bbox centre
    ``(x0 + x1 + 1) / 2`` is always a whole or half pixel, so four sub-pixel
    phases cover every case and placing an ideal shape is an integer shift.
    Value: (coverage crop, top offset, left offset), offsets from floor(centre).
    """
    out = {}
    base = IMAGE_SIZE // 2
    for shape in SHAPES:
        for size in SIZES:
            for hx in (0, 1):
                for hy in (0, 1):
                    img = Image.new("L", (_HI, _HI), 0)
                    cx4 = base * _SCALE + 2 * hx
                    cy4 = base * _SCALE + 2 * hy
                    _draw_shape(ImageDraw.Draw(img), shape, size, cx4, cy4, 255)
                    cov = np.asarray(img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX), dtype=np.float32) / 255.0
                    ys, xs = np.nonzero(cov > 0)
                    y0, y1, x0, x1 = ys.min() - 1, ys.max() + 1, xs.min() - 1, xs.max() + 1
                    crop = np.ascontiguousarray(cov[y0 : y1 + 1, x0 : x1 + 1])
                    out[(shape, size, hx, hy)] = (crop, int(y0) - base, int(x0) - base)
    return out


_IDEAL = _build_ideal_coverage()


def _label_fallback(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected labelling without scipy: row runs joined by a small union-find.

    Runs are found with numpy; only runs (not pixels) are visited in Python,
    which keeps clean images well under a millisecond.
    """
    h, w = mask.shape
    padded = np.zeros((h, w + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    diff = np.diff(padded, axis=1)
    ry, rs = np.nonzero(diff == 1)  # run starts (row-major, so paired with ends)
    _, re_ = np.nonzero(diff == -1)  # run ends, exclusive
    n = len(ry)
    labels = np.zeros((h, w), dtype=np.int32)
    if n == 0:
        return labels, 0
    parent = list(range(n))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    # Runs i (row y) and j (row y+1) touch in 8-connectivity when s_j <= e_i and s_i <= e_j
    # (ends exclusive).  Within a row runs are sorted, so the j's for one i are contiguous.
    key_start = ry.astype(np.int64) * (w + 2) + rs
    key_end = ry.astype(np.int64) * (w + 2) + re_
    nxt = (ry.astype(np.int64) + 1) * (w + 2)
    lo = np.searchsorted(key_end, nxt + rs, side="left")  # first j in row y+1 with e_j >= s_i
    hi = np.searchsorted(key_start, nxt + re_, side="right")  # past last j in row y+1 with s_j <= e_i
    for i in np.nonzero(hi > lo)[0].tolist():
        ri = find(i)
        for j in range(int(lo[i]), int(hi[i])):
            rj = find(j)
            if rj != ri:
                parent[rj] = ri
    roots = [find(i) for i in range(n)]
    ids: dict[int, int] = {}
    run_label = np.array([ids.setdefault(r, len(ids) + 1) for r in roots], dtype=np.int32)
    rows = np.repeat(ry, re_ - rs)
    lengths = re_ - rs
    offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    labels[rows, np.repeat(rs, lengths) + offsets] = np.repeat(run_label, lengths)
    return labels, len(ids)


def _label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    if _ndimage is not None:
        labels, n = _ndimage.label(mask, structure=_STRUCTURE)
        return labels, int(n)
    return _label_fallback(mask)


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """Any image -> uint8 [64, 64, 3]; other sizes are box-resized to 64 first."""
    if isinstance(image, np.ndarray):
        arr = image
        if arr.dtype != np.uint8:
            if np.issubdtype(arr.dtype, np.floating) and arr.max(initial=0) <= 1.0 + 1e-6:
                arr = arr * 255.0
            arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
            arr = np.transpose(arr, (1, 2, 0))  # CHW -> HWC
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        if arr.shape[:2] == (IMAGE_SIZE, IMAGE_SIZE) and arr.shape[2] == 3:
            return arr
        image = Image.fromarray(np.ascontiguousarray(arr[..., :3]))
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX)
    return np.asarray(image)


def _best_shape(comp: np.ndarray, count: int, size: str, cx2: int, cy2: int, min_cov: float) -> str:
    """Shape with the highest IoU between the component and the ideal shapes at its bbox centre.

    The ideal shape is "rendered as above": its coverage is that of the
    renderer, and a pixel belongs to it when the rendered pixel would be an
    object pixel, i.e. ``coverage * |colour - background| > 60``, which is
    ``coverage > min_cov``.  So anti-aliased edges are read the same way on
    both sides of the comparison, whatever the colour contrast.  ``cx2``/``cy2``
    are twice the bbox centre (integers).  Ties go to the earlier shape in ``SHAPES``.
    """
    hx, hy = cx2 & 1, cy2 & 1
    fx, fy = cx2 >> 1, cy2 >> 1
    best, best_iou = SHAPES[0], -1.0
    n = IMAGE_SIZE
    for shape in SHAPES:
        crop, oy, ox = _IDEAL[(shape, size, hx, hy)]
        y0, x0 = fy + oy, fx + ox
        y1, x1 = y0 + crop.shape[0], x0 + crop.shape[1]
        cy0, cx0, cy1, cx1 = max(y0, 0), max(x0, 0), min(y1, n), min(x1, n)
        if cy1 <= cy0 or cx1 <= cx0:
            iou = 0.0
        else:
            ideal = crop[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] > min_cov
            inter = int(np.count_nonzero(comp[cy0:cy1, cx0:cx1] & ideal))
            area = int(np.count_nonzero(ideal))  # the part of the ideal shape on the canvas
            iou = inter / (count + area - inter)
        if iou > best_iou:
            best, best_iou = shape, iou
    return best


def read_image(image: Image.Image | np.ndarray) -> Reading:
    """Read an image back with the contract's reference procedure (steps 1-5).

    Accepts a PIL image or an array (HWC or CHW, uint8 or float in [0, 1]).
    Coordinates are continuous (pixel i covers [i, i+1)), so a bbox with
    inclusive pixel indices x0..x1 has centre (x0 + x1 + 1) / 2.
    """
    arr = _as_array(image)
    px = arr.astype(np.float32)
    # 1. Background: per-channel median of the 1-px border, named by the nearest background colour.
    bg = np.median(px[_BORDER], axis=0)
    background = _BG_NAMES[int(np.argmin(((_BG_RGB - bg) ** 2).sum(axis=1)))]
    # 2. Object pixels: farther than 60 from the measured background.
    diff = px - bg
    mask = np.einsum("ijk,ijk->ij", diff, diff) > _OBJECT_DISTANCE**2
    # 3. Components (8-neighbourhood); small ones are noise.
    labels, n = _label(mask)
    objects: list[DetectedObject] = []
    if n == 0:
        return Reading(background, objects, tuple(float(v) for v in bg))
    counts = np.bincount(labels.ravel(), minlength=n + 1)
    keep = np.nonzero(counts[1:] >= _MIN_COMPONENT)[0] + 1
    if len(keep) == 0:
        return Reading(background, objects, tuple(float(v) for v in bg))
    # 4. Colour votes: every object pixel's nearest palette colour, if within 80.
    flat_labels = labels[mask]
    obj_px = px[mask]
    d2 = ((obj_px[:, None, :] - _COLOR_RGB[None, :, :]) ** 2).sum(axis=2)
    nearest = d2.argmin(axis=1)
    voting = d2[np.arange(len(nearest)), nearest] <= _VOTE_DISTANCE**2
    ncol = len(_COLOR_NAMES)
    votes = np.bincount(
        flat_labels[voting] * ncol + nearest[voting], minlength=(n + 1) * ncol
    ).reshape(n + 1, ncol)
    if _ndimage is not None:
        slices = _ndimage.find_objects(labels)
    else:
        slices = None
    for lab in keep.tolist():
        if slices is not None:
            sy, sx = slices[lab - 1]
            y0, y1, x0, x1 = sy.start, sy.stop - 1, sx.start, sx.stop - 1
        else:
            ys, xs = np.nonzero(labels == lab)
            y0, y1, x0, x1 = int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max())
        v = votes[lab]
        color = _COLOR_NAMES[int(v.argmax())] if v.max() > 0 else None
        # 5. Cell from the bbox centre, size from the larger side, shape by IoU.
        cx2, cy2 = x0 + x1 + 1, y0 + y1 + 1
        col = 0 if cx2 < 2 * IMAGE_SIZE / 3 else (1 if cx2 < 4 * IMAGE_SIZE / 3 else 2)
        row = 0 if cy2 < 2 * IMAGE_SIZE / 3 else (1 if cy2 < 4 * IMAGE_SIZE / 3 else 2)
        side = max(x1 - x0 + 1, y1 - y0 + 1)
        size = "large" if side > _LARGE_SIDE else "small"
        comp = labels == lab
        count = int(counts[lab])
        if color is not None:
            ink = _COLOR_RGB[_COLOR_NAMES.index(color)]
        else:  # off-palette component: its own median colour stands in for the ink
            ink = np.median(obj_px[flat_labels == lab], axis=0)
        contrast = float(np.sqrt(((ink - bg) ** 2).sum()))
        min_cov = _OBJECT_DISTANCE / contrast if contrast > _OBJECT_DISTANCE else 0.5
        shape = _best_shape(comp, count, size, cx2, cy2, min_cov)
        objects.append(
            DetectedObject(
                color=color,
                shape=shape,
                size=size,
                position=_POSITION_BY_CELL[(col, row)],
                pixel_count=count,
                bbox=(int(x0), int(y0), int(x1), int(y1)),
            )
        )
    return Reading(background, objects, tuple(float(v) for v in bg))


def _matches(spec: ObjectSpec, obj: DetectedObject) -> bool:
    return (
        obj.color == spec.color
        and obj.shape == spec.shape
        and (spec.size is None or obj.size == spec.size)
        and (spec.position is None or obj.position == spec.position)
    )


def _describe(obj: DetectedObject) -> str:
    return f"{obj.size} {obj.color} {obj.shape} at the {obj.position} ({obj.pixel_count} px, bbox {obj.bbox})"


def judge_details(
    image: Image.Image | np.ndarray | Reading, caption_or_spec: str | CaptionSpec
) -> tuple[bool, str]:
    """Judge faithfulness (contract rule 6) and say why an image fails.

    Named objects are matched to components by colour; each must then show
    every stated attribute, and the image must hold exactly as many
    components as the caption names.  The background is judged only when
    stated.  ``image`` may also be a ``Reading`` already taken, to judge one
    image against many captions cheaply.  Returns (faithful, reason).
    """
    spec = parse_caption(caption_or_spec) if isinstance(caption_or_spec, str) else caption_or_spec
    reading = image if isinstance(image, Reading) else read_image(image)
    if spec.background is not None and reading.background != spec.background:
        return False, f"background is {reading.background}, caption says {spec.background}"
    found = reading.objects
    if len(found) != len(spec.objects):
        seen = "; ".join(_describe(o) for o in found[:6]) or "nothing"
        return False, f"caption names {len(spec.objects)} object(s), image holds {len(found)}: {seen}"
    # Match by colour; permutations keep this right even for captions repeating a colour.
    for perm in itertools.permutations(range(len(found))):
        if all(_matches(s, found[p]) for s, p in zip(spec.objects, perm)):
            return True, "faithful"
    reasons = []
    for s in spec.objects:
        same = [o for o in found if o.color == s.color]
        if not same:
            reasons.append(f"no {s.color} object (found: {', '.join(str(o.color) for o in found)})")
            continue
        o = same[0]
        bad = []
        if o.shape != s.shape:
            bad.append(f"shape {o.shape} != {s.shape}")
        if s.size is not None and o.size != s.size:
            bad.append(f"size {o.size} != {s.size}")
        if s.position is not None and o.position != s.position:
            bad.append(f"position {o.position} != {s.position}")
        if bad:
            reasons.append(f"{s.color} object: " + ", ".join(bad))
    return False, "; ".join(reasons) or "objects do not match the caption"


def judge(image: Image.Image | np.ndarray | Reading, caption_or_spec: str | CaptionSpec) -> bool:
    """True when the image is faithful to the caption (see ``judge_details``)."""
    return judge_details(image, caption_or_spec)[0]
