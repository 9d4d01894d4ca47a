"""Shapes World: renderer, caption grammar and judge agree exactly (shared/shapes-world.md)."""

from __future__ import annotations

import itertools
import re
from collections import deque

import numpy as np
import pytest
from PIL import Image

from training.data import shapes_world as sw
from training.data.shapes_world import (
    BACKGROUNDS,
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    CaptionSpec,
    ObjectSpec,
    Scene,
    ShapeObject,
    caption,
    full_caption_bank,
    judge,
    judge_details,
    parse_caption,
    random_scene,
    read_image,
    render,
    spec_to_caption,
    stream,
    two_object_captions,
)

N_SCENES = 3000


def _spec_of(scene: Scene) -> CaptionSpec:
    return CaptionSpec(
        scene.background, [ObjectSpec(o.color, o.shape, o.size, o.position) for o in scene.objects]
    )


@pytest.fixture(scope="module")
def rendered() -> list[tuple[Scene, Image.Image]]:
    rng = np.random.default_rng(20240601)
    scenes = [random_scene(rng) for _ in range(N_SCENES)]
    return [(s, render(s, rng)) for s in scenes]


@pytest.fixture(scope="module")
def readings(rendered):
    return [read_image(img) for _, img in rendered]


def test_constants_follow_the_contract():
    assert sw.IMAGE_SIZE == 64
    assert BACKGROUNDS == {"white": (240, 240, 240), "gray": (128, 128, 128), "black": (16, 16, 16)}
    assert len(COLORS) == 8 and COLORS["red"] == (220, 40, 40) and COLORS["pink"] == (245, 130, 190)
    assert SIZES == {"small": 14, "large": 26}
    assert SHAPES == ("circle", "square", "triangle", "diamond", "cross")
    assert list(POSITIONS) == [
        "top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right",
    ]


def test_every_render_reads_back_exactly(rendered, readings):
    counts = {1: 0, 2: 0}
    for (scene, img), reading in zip(rendered, readings):
        assert img.size == (64, 64) and img.mode == "RGB"
        counts[len(scene.objects)] += 1
        assert reading.background == scene.background, scene
        got = sorted((o.color, o.shape, o.size, o.position) for o in reading.objects)
        want = sorted((o.color, o.shape, o.size, o.position) for o in scene.objects)
        assert got == want, (scene, reading)
    assert min(counts.values()) > N_SCENES // 3  # both kinds well represented


def test_full_and_partial_captions_judge_true(rendered, readings):
    rng = np.random.default_rng(7)
    for (scene, img), reading in zip(rendered, readings):
        full = caption(scene, rng, full=True)
        assert judge(reading, full), (full, judge_details(reading, full))
        partial = caption(scene, rng)
        assert judge(reading, partial), (partial, judge_details(reading, partial))
        assert judge(reading, caption(scene)), caption(scene)
    # The image paths (PIL in, str in) give the same answer as the Reading path.
    for scene, img in rendered[:200]:
        assert judge(img, caption(scene, rng))
        assert judge(np.asarray(img), _spec_of(scene))


def test_full_captions_state_every_part():
    rng = np.random.default_rng(3)
    for _ in range(300):
        scene = random_scene(rng)
        spec = parse_caption(caption(scene, rng, full=True))
        assert spec == _spec_of(scene)


def test_canonical_caption_template():
    scene = Scene("white", (ShapeObject("red", "circle", "small", "top left"),))
    assert caption(scene) == "a small red circle at the top left on a white background"
    two = Scene(
        "black",
        (ShapeObject("red", "circle", "small", "top left"), ShapeObject("blue", "square", "large", "bottom right")),
    )
    assert caption(two) == (
        "a small red circle at the top left and a large blue square at the bottom right on a black background"
    )
    assert spec_to_caption(_spec_of(two)) == caption(two)


def test_partial_caption_part_rates():
    rng = np.random.default_rng(11)
    n = 4000
    size = pos = bg = 0
    for _ in range(n):
        scene = random_scene(rng, 1)
        spec = parse_caption(caption(scene, rng))
        size += spec.objects[0].size is not None
        pos += spec.objects[0].position is not None
        bg += spec.background is not None
    assert abs(size / n - 0.7) < 0.04 and abs(pos / n - 0.7) < 0.04 and abs(bg / n - 0.5) < 0.04


def test_caption_bank():
    bank = full_caption_bank()
    assert len(bank) == 2160 and len(set(bank)) == 2160
    assert bank == full_caption_bank()  # deterministic
    assert bank[0] == "a small red circle at the top left on a white background"
    assert bank[1] == "a small red circle at the top left on a gray background"
    assert bank[-1] == "a large pink cross at the bottom right on a black background"
    expected = itertools.product(SIZES, COLORS, SHAPES, POSITIONS, BACKGROUNDS)
    for text, (size, color, shape, pos, bg) in zip(bank, expected):
        assert parse_caption(text) == CaptionSpec(bg, [ObjectSpec(color, shape, size, pos)])


def test_bank_captions_judge_their_renders():
    rng = np.random.default_rng(5)
    bank = full_caption_bank()
    for i in rng.choice(len(bank), size=200, replace=False):
        spec = parse_caption(bank[int(i)])
        o = spec.objects[0]
        img = render(Scene(spec.background, (ShapeObject(o.color, o.shape, o.size, o.position),)), rng)
        assert judge(img, bank[int(i)])


def test_every_phrasing_parses():
    for pos in POSITIONS:
        phrasings = [f"at the {pos}", f"in the {pos}"]
        if pos in ("top left", "top right", "bottom left", "bottom right"):
            phrasings.append(f"in the {pos} corner")
        if pos in ("left", "right"):
            phrasings.append(f"on the {pos}")
        if pos == "center":
            phrasings.append("in the middle")
        for phr in phrasings:
            spec = parse_caption(f"a blue diamond {phr}")
            assert spec == CaptionSpec(None, [ObjectSpec("blue", "diamond", None, pos)])
    for word, size in [("small", "small"), ("little", "small"), ("tiny", "small"), ("large", "large"), ("big", "large")]:
        assert parse_caption(f"a {word} green cross on a gray background").objects[0].size == size
    spec = parse_caption("a tiny red circle in the top left corner and a big cyan triangle on the right on a black background")
    assert spec == CaptionSpec(
        "black", [ObjectSpec("red", "circle", "small", "top left"), ObjectSpec("cyan", "triangle", "large", "right")]
    )
    spec = parse_caption("a pink square and a yellow circle in the middle")
    assert spec == CaptionSpec(None, [ObjectSpec("pink", "square"), ObjectSpec("yellow", "circle", None, "center")])
    # People's typing: case, spaces and one final full stop are forgiven.
    assert parse_caption("  A Red  Circle at the Top.") == CaptionSpec(None, [ObjectSpec("red", "circle", None, "top")])


def test_random_captions_use_all_wordings():
    rng = np.random.default_rng(9)
    seen: set[str] = set()
    for _ in range(3000):
        text = caption(random_scene(rng), rng)
        seen.update(re.findall(r"\b(little|tiny|big|corner|middle|on the left|on the right|in the|at the)\b", text))
    assert {"little", "tiny", "big", "corner", "middle", "on the left", "on the right", "in the", "at the"} <= seen


@pytest.mark.parametrize(
    "junk",
    [
        "",
        "a red",
        "red circle",
        "the red circle",
        "a red circle at the moon",
        "a huge red circle",
        "a red circle on a blue background",
        "a red circle and",
        "a red circle in the top corner",
        "a red circle in the center corner",
        "a red circle on the top",
        "a red circle on a white background and a blue square",
        "a red circle and a blue square and a green cross",
        "a small small red circle",
        "a red circles",
        "a red circle at the top left!",
    ],
)
def test_parse_rejects_junk(junk):
    with pytest.raises(ValueError):
        parse_caption(junk)


def test_stream_captions_are_true_of_their_images():
    for i, (img, text, scene) in enumerate(stream(42, full_prob=0.3)):
        if i == 1500:
            break
        spec = parse_caption(text)
        assert len(spec.objects) == len(scene.objects)
        ok, why = judge_details(img, spec)
        assert ok, (text, scene, why)


def test_same_seed_same_stream():
    a = [x for _, x in zip(range(60), stream(123))]
    b = [x for _, x in zip(range(60), stream(123))]
    c = [x for _, x in zip(range(60), stream(124))]
    for (ia, ta, sa), (ib, tb, sb) in zip(a, b):
        assert ia.tobytes() == ib.tobytes() and ta == tb and sa == sb
    assert [x[1] for x in a] != [x[1] for x in c]
    # rng=None renders without jitter: deterministic too.
    scene = a[0][2]
    assert render(scene).tobytes() == render(scene).tobytes()


def test_two_object_constraints():
    rng = np.random.default_rng(2)
    n_two = 0
    pairs = set()
    for _ in range(3000):
        scene = random_scene(rng)
        assert len(scene.objects) in (1, 2)
        if len(scene.objects) == 2:
            n_two += 1
            a, b = scene.objects
            assert a.color != b.color
            (ca, ra), (cb, rb) = POSITIONS[a.position], POSITIONS[b.position]
            assert max(abs(ca - cb), abs(ra - rb)) == 2
            pairs.add((a.position, b.position))
    assert 1300 < n_two < 1700
    assert len(pairs) == 32  # every ordered pair of cells two apart is used (corners 4 x 5 + edges 4 x 3)
    texts = two_object_captions(np.random.default_rng(0), 50)
    assert len(texts) == 50
    for t in texts:
        spec = parse_caption(t)
        assert len(spec.objects) == 2 and spec.background is not None
        assert all(o.size is not None and o.position is not None for o in spec.objects)


def _mutations(scene: Scene, rng: np.random.Generator) -> list[tuple[str, CaptionSpec]]:
    base = _spec_of(scene)
    out = []
    k = int(rng.integers(len(scene.objects)))
    o = base.objects[k]
    others = {x.color for x in base.objects}

    def with_obj(**kw) -> CaptionSpec:
        objs = list(base.objects)
        objs[k] = ObjectSpec(**{**o.__dict__, **kw})
        return CaptionSpec(base.background, objs)

    out.append(("colour", with_obj(color=rng.choice([c for c in COLORS if c not in others]).item())))
    out.append(("shape", with_obj(shape=rng.choice([s for s in SHAPES if s != o.shape]).item())))
    out.append(("size", with_obj(size="large" if o.size == "small" else "small")))
    out.append(("position", with_obj(position=rng.choice([p for p in POSITIONS if p != o.position]).item())))
    out.append(("background", CaptionSpec(rng.choice([b for b in BACKGROUNDS if b != base.background]).item(), base.objects)))
    if len(base.objects) == 1:
        extra = ObjectSpec(rng.choice([c for c in COLORS if c not in others]).item(), "circle")
        out.append(("extra object", CaptionSpec(base.background, base.objects + [extra])))
    else:
        out.append(("missing object", CaptionSpec(base.background, [base.objects[1 - k]])))
    return out


def test_wrong_captions_judge_false(rendered, readings):
    rng = np.random.default_rng(13)
    for (scene, _img), reading in list(zip(rendered, readings))[:500]:
        for what, spec in _mutations(scene, rng):
            text = spec_to_caption(spec)
            ok, why = judge_details(reading, text)
            assert not ok, (what, text, scene)
            assert why != "faithful"


def test_blank_and_noisy_images():
    blank = Image.new("RGB", (64, 64), BACKGROUNDS["gray"])
    r = read_image(blank)
    assert r.background == "gray" and r.objects == []
    assert not judge(blank, "a red circle")
    # Specks under 12 px are noise, not objects.
    arr = np.array(blank)
    arr[10:13, 10:13] = COLORS["red"]  # 9 px
    scene = Scene("gray", (ShapeObject("blue", "cross", "large", "center"),))
    arr2 = np.array(render(scene))
    arr2[2:5, 2:5] = COLORS["red"]
    assert read_image(arr).objects == []
    assert judge(arr2, "a large blue cross in the middle on a gray background")
    arr2[2:6, 2:5] = COLORS["red"]  # 12 px: now an extra object
    assert not judge(arr2, "a large blue cross in the middle on a gray background")


def test_read_image_input_forms():
    scene = Scene("white", (ShapeObject("orange", "triangle", "large", "bottom left"),))
    img = render(scene, np.random.default_rng(0))
    want = read_image(img)
    arr = np.asarray(img)
    assert read_image(arr) == want
    assert read_image(arr.transpose(2, 0, 1).astype(np.float32) / 255.0).objects == want.objects
    assert read_image(img.resize((256, 256), Image.NEAREST)).objects == want.objects
    det = want.objects[0]
    assert det.pixel_count > 0 and det.bbox[0] <= det.bbox[2] and det.bbox[1] <= det.bbox[3]


def _bfs_labels(mask: np.ndarray) -> list[frozenset]:
    h, w = mask.shape
    seen = np.zeros_like(mask)
    comps = []
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        q, comp = deque([(y, x)]), set()
        seen[y, x] = True
        while q:
            cy, cx = q.popleft()
            comp.add((cy, cx))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = cy + dy, cx + dx
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        q.append((ny, nx))
        comps.append(frozenset(comp))
    return comps


def test_fallback_labelling_matches_bfs():
    rng = np.random.default_rng(17)
    for density in (0.05, 0.2, 0.45, 0.6):
        for _ in range(5):
            mask = rng.random((64, 64)) < density
            labels, n = sw._label_fallback(mask)
            got = {frozenset(zip(*np.nonzero(labels == k))) for k in range(1, n + 1)}
            assert got == set(_bfs_labels(mask))
            assert ((labels > 0) == mask).all()
            if sw._ndimage is not None:
                ref, m = sw._ndimage.label(mask, structure=np.ones((3, 3)))
                assert m == n


def test_dataset_is_worker_and_rank_aware(monkeypatch):
    torch = pytest.importorskip("torch")

    def first(ds, n=4):
        return [x for _, x in zip(range(n), iter(ds))]

    items = first(sw.ShapesWorldDataset(seed=5))
    x = items[0]["image"]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    assert isinstance(items[0]["caption"], str)
    # Rank 0 / worker 0 reads exactly stream(seed).
    assert [d["caption"] for d in items] == [t for _, (_, t, _) in zip(range(4), stream(5))]
    assert [d["caption"] for d in first(sw.ShapesWorldDataset(seed=5))] == [d["caption"] for d in items]

    class Info:
        def __init__(self, i):
            self.id, self.num_workers = i, 2

    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: Info(1))
    w1 = first(sw.ShapesWorldDataset(seed=5))
    w1_again = first(sw.ShapesWorldDataset(seed=5))
    r1w1 = first(sw.ShapesWorldDataset(seed=5, rank=1))
    assert [d["caption"] for d in w1] == [d["caption"] for d in w1_again]
    assert torch.equal(w1[0]["image"], w1_again[0]["image"])
    assert not torch.equal(w1[0]["image"], items[0]["image"]) or w1[0]["caption"] != items[0]["caption"]
    caps = [[d["caption"] for d in s] for s in (items, w1, r1w1)]
    assert len({tuple(c) for c in caps}) == 3
    monkeypatch.undo()
    # A custom transform replaces the tensor conversion.
    ds = sw.ShapesWorldDataset(seed=1, transform=lambda im: np.asarray(im).shape)
    assert next(iter(ds))["image"] == (64, 64, 3)


def _stated(spec: sw.CaptionSpec) -> dict:
    out = {} if spec.background is None else {("bg",): spec.background}
    for k, obj in enumerate(spec.objects):
        out.update({(k, a): getattr(obj, a) for a in ("color", "shape", "size", "position") if getattr(obj, a) is not None})
    return out


def test_hard_negative_captions_differ_in_exactly_one_stated_attribute():
    rng = np.random.default_rng(3)
    seen = set()
    for image, text, scene in itertools.islice(sw.stream(11), 200):
        truth = _stated(sw.parse_caption(text))
        for neg in sw.hard_negative_captions(text, rng, 4):
            got = _stated(sw.parse_caption(neg))  # still inside the grammar
            assert got.keys() == truth.keys()  # states exactly what the caption states
            changed = [key for key in truth if got[key] != truth[key]]
            assert len(changed) == 1
            seen.add(changed[0][-1])
            assert not sw.judge(image, neg)  # false of the image
    assert seen == {"bg", "color", "shape", "size", "position"}
