"""What a Shapes World VAE keeps: fresh one-object renders through the VAE and back (posterior
mean), read by the exact judge against their full captions, overall and per shape and size, for
one or more VAE directories on the same renders. The generator can do no better than this
(bench/shapes_eval.py's "ceiling" row is the same measurement on the evaluation prompts).

    python -m bench.vae_round_trip --vae old=assets/dream-shapes/vae new=runs/vae/dec1 --n 500
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from bench.common import command_line, markdown_table, setup_threads
from dream_core.image_tokenizer import ImageTokenizer
from dream_core.pipeline import image_to_tensor, tensor_to_images
from training.data.shapes_world import IMAGE_SIZE, SHAPES, SIZES, caption, judge, random_scene, render
from training.evaluate.stats import format_rate, rate_with_interval

SEED = 20261202  # the renders' own seed (not the fixed evaluation set's)


@torch.inference_mode()
def round_trip(vae_dir: Path, images: list, batch_size: int = 100) -> list:
    """Reconstructions of `images` through the VAE at `vae_dir` (posterior mean), by the engine's
    own tokenizer path (`ImageTokenizer.encode` / `decode`, as a model's pipeline does)."""
    tokenizer = ImageTokenizer.from_pretrained(vae_dir, patch_size=1).eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.cat([image_to_tensor(im, IMAGE_SIZE) for im in images[i:i + batch_size]])
        out += tensor_to_images(tokenizer.decode(tokenizer.encode(x, sample=False)))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vae", nargs="+", required=True, metavar="NAME=DIR", help="VAE directories to compare")
    ap.add_argument("--n", type=int, default=500, help="fresh one-object renders")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.n < 1:
        ap.error(f"--n must be >= 1, got {args.n}")
    vaes = []
    for item in args.vae:
        name, sep, path = item.partition("=")
        if not sep or not name or not (Path(path) / "config.json").is_file():
            ap.error(f"--vae takes NAME=DIR with a diffusers VAE directory, got {item!r}")
        vaes.append((name, Path(path)))
    setup_threads(args.threads)
    np.seterr(all="ignore")
    rng = np.random.default_rng(SEED)
    scenes = [random_scene(rng, 1) for _ in range(args.n)]
    images = [render(s, rng) for s in scenes]
    captions = [caption(s, full=True) for s in scenes]
    groups = {"all": [True] * args.n}
    groups.update({f"size {z}": [s.objects[0].size == z for s in scenes] for z in SIZES})
    groups.update({f"{z} {h}": [s.objects[0].size == z and s.objects[0].shape == h for s in scenes]
                   for z in SIZES for h in SHAPES})
    verdicts = {name: [judge(im, c) for im, c in zip(round_trip(path, images), captions)] for name, path in vaes}
    rows = []
    for group, member in groups.items():
        row = [group, sum(member)]
        for name, _ in vaes:
            ok = sum(v for v, m in zip(verdicts[name], member) if m)
            row.append(format_rate(rate_with_interval(ok, sum(member))) if sum(member) else "-")
        rows.append(row)
    print(f"`{command_line('bench/vae_round_trip.py', argv)}`: {args.n} fresh one-object renders (seed {SEED}), "
          "read back by the judge against their full captions\n")
    print(markdown_table(["renders", "n", *[name for name, _ in vaes]], rows))


if __name__ == "__main__":
    main()
