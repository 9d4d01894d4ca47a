"""What fine-tuning does, measured on the Shapes World: teach the bundled model a new shape (an "x",
a diagonal cross drawn in the Shapes World style) from 50 captioned images, then measure
(a) the new concept: the share of 16 generations of held-out "x" prompts in which an X is drawn, and
(b) what it already did: Shapes World faithfulness on fixed one-object prompts, before and after.

    python -m bench.finetune_x data --out runs/x-data                 # the 50 images + captions
    python -m bench.finetune_x measure --model assets/dream-shapes --out runs/x-eval/base
    python -m training.finetune --model assets/dream-shapes --data runs/x-data --out runs/x-full max_unknown_share=1
    python -m bench.finetune_x measure --model runs/x-full --out runs/x-eval/full

The X detector: the largest foreground component of the image (pixels farther than 60 from the
border's median colour, the judge's rule), compared by IoU with an ideal X and with the five ideal
Shapes World shapes (circle, square, triangle, diamond, the plus-shaped "cross") of the component's
size, centred on it; an X is present when its IoU is at least 0.4 and beats every other shape's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
from training.data.shapes_world import BACKGROUNDS, COLORS, POSITIONS, SIZES

SCALE = 4
CELL = (16, 32, 48)


def draw_x(draw: ImageDraw.ImageDraw, size: str | int, cx4: float, cy4: float, fill) -> None:
    """A diagonal cross with the Shapes World cross's bar thickness (d / 3), on a 4x canvas."""
    d4 = (SIZES[size] if isinstance(size, str) else size) * SCALE
    h, t = d4 / 2, d4 / 6
    for sx in (1, -1):  # the two diagonal bars, d / 3 thick
        draw.line([(cx4 - h, cy4 - sx * h), (cx4 + h, cy4 + sx * h)], fill=fill, width=int(round(2 * t)))


def render_x(background: str, color: str, size: str, position: str, rng: np.random.Generator) -> Image.Image:
    img = Image.new("RGB", (64 * SCALE, 64 * SCALE), BACKGROUNDS[background])
    col, row = POSITIONS[position]
    cx, cy = CELL[col] + rng.uniform(-2, 2), CELL[row] + rng.uniform(-2, 2)
    draw_x(ImageDraw.Draw(img), size, cx * SCALE, cy * SCALE, COLORS[color])
    return img.resize((64, 64), Image.BOX)


def x_caption(background: str, color: str, size: str, position: str) -> str:
    where = "in the middle" if position == "center" else f"at the {position}"
    return f"a {size} {color} x {where} on a {background} background"


def random_spec(rng: np.random.Generator) -> tuple[str, str, str, str]:
    pick = lambda xs: list(xs)[int(rng.integers(len(xs)))]  # noqa: E731
    return pick(BACKGROUNDS), pick(COLORS), pick(SIZES), pick(POSITIONS)


def make_data(out: Path, n: int = 50, seed: int = 0) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    captions = []
    for i in range(n):
        spec = random_spec(rng)
        render_x(*spec, rng).save(out / f"x{i:03d}.png")
        captions.append(x_caption(*spec))
        (out / f"x{i:03d}.txt").write_text(captions[-1] + "\n")
    return captions


def _x_mask(size: int, cx: float, cy: float) -> np.ndarray:
    img = Image.new("L", (64 * SCALE, 64 * SCALE), 0)
    draw_x(ImageDraw.Draw(img), size, cx * SCALE, cy * SCALE, 255)
    return np.asarray(img.resize((64, 64), Image.BOX)) > 127


def _shape_mask(shape: str, size: str, cx: float, cy: float) -> np.ndarray:
    """An ideal Shapes World shape (rendered at the centre cell, then moved to (cx, cy))."""
    from training.data.shapes_world import Scene, ShapeObject, render

    img = render(Scene(background="black", objects=(ShapeObject("red", shape, size, "center"),)))
    m = (np.asarray(img, dtype=np.float32) - BACKGROUNDS["black"]).__pow__(2).sum(-1) > 60.0 ** 2
    return np.roll(m, (int(round(cy - 32)), int(round(cx - 32))), axis=(0, 1))


def has_x(image: Image.Image) -> tuple[bool, float, float]:
    """(X present, IoU with an ideal X, best IoU with an ideal Shapes World shape) for the largest
    foreground component: an X when its IoU is >= 0.4 and beats every known shape's."""
    from scipy import ndimage

    from training.data.shapes_world import SHAPES

    px = np.asarray(image.convert("RGB"), dtype=np.float32)
    border = np.concatenate([px[0], px[-1], px[:, 0], px[:, -1]])
    bg = np.median(border, axis=0)
    fg = ((px - bg) ** 2).sum(-1) > 60.0 ** 2
    labels, n = ndimage.label(fg, structure=np.ones((3, 3)))
    if n == 0:
        return False, 0.0, 0.0
    sizes = ndimage.sum(fg, labels, range(1, n + 1))
    comp = labels == (1 + int(np.argmax(sizes)))
    ys, xs = np.nonzero(comp)
    cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
    side = max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
    size = "large" if side >= 20 else "small"

    def iou(m: np.ndarray) -> float:
        return float((m & comp).sum() / max(1, (m | comp).sum()))

    ix = iou(_x_mask(SIZES[size], cx, cy))
    other = max(iou(_shape_mask(shape, size, cx, cy)) for shape in SHAPES)
    return ix >= 0.4 and ix > other, ix, other


def measure(model: str, out: Path, n_x: int = 16, n_faith: int = 100, seed: int = 12345) -> dict:
    from dream_core.pipeline import DreamPipeline
    from dream_core.request import SamplerSettings
    from dream_core.semantic_decoding import Setting
    from training.evaluate.cli import run_metadata
    from training.evaluate.plotting import image_grid
    from training.evaluate.sets import prompt_seeds
    from training.evaluate.faithfulness import judge_images, prompt_set

    out.mkdir(parents=True, exist_ok=True)
    pipe = DreamPipeline.from_pretrained(model, device="cpu")
    sampler = SamplerSettings(num_inference_steps=pipe.config.seq_len)
    rng = np.random.default_rng(seed)  # held-out x prompts (not the training captions' seed)
    x_prompts = [x_caption(*random_spec(rng)) for _ in range(n_x)]
    run = pipe.generate_batch(x_prompts, [seed + 64 * i for i in range(n_x)], [Setting(1)], sampler)
    x_images = run.results[Setting(1)].images
    verdicts = [has_x(im) for im in x_images]
    image_grid(x_images, cols=8, marks=[v[0] for v in verdicts]).save(out / "x_samples.png")
    prompts = prompt_set(1, n_faith)
    run = pipe.generate_batch(prompts, prompt_seeds(n_faith), [Setting(1)], sampler)
    report = judge_images(run.results[Setting(1)].images, prompts)
    image_grid(run.results[Setting(1)].images[:32], cols=8, marks=report.verdicts[:32]).save(out / "faithfulness.png")
    result = {"model": str(model), "meta": run_metadata(pipe), "x_present": sum(v[0] for v in verdicts), "x_n": n_x,
              "x_iou_mean": float(np.mean([v[1] for v in verdicts])),
              "faithful_1obj": report.faithful, "faithful_n": report.n, "failures": report.failures,
              "x_prompts": x_prompts}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "x_prompts"}))
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data")
    d.add_argument("--out", type=Path, required=True)
    d.add_argument("--n", type=int, default=50)
    m = sub.add_parser("measure")
    m.add_argument("--model", required=True)
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--n-x", type=int, default=16)
    m.add_argument("--n-faith", type=int, default=100)
    args = ap.parse_args(argv)
    if args.cmd == "data":
        print(f"wrote {len(make_data(args.out, args.n))} images to {args.out}")
    else:
        measure(args.model, args.out, args.n_x, args.n_faith)


if __name__ == "__main__":
    main()
