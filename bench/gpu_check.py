"""One-command GPU check of the training and decoding paths (issue 10), sized to stay under 8 minutes on one GPU.

Builds, in a temporary folder, everything a `dream-base` run needs without any download: random
images with captions (an image folder), a random-weight diffusers AutoencoderKL with the SD-VAE
geometry (4 latent channels, stride 8) and a 1-layer random T5 encoder of T5-XXL's width (4096),
then:
  1. trains `dream-base` (DDP path, one process, bf16 autocast) for --steps steps, saves, resumes
     for --resume-steps more (the resumed run must continue at the saved step);
  2. the same on the FSDP path (FSDP2 per transformer block on a world of one, sharded checkpoint);
  3. exports the EMA weights and decodes one image with and without the head's CUDA graphs.
Prints one markdown table (step time, samples/s, peak memory, decode ms) and writes it to --out.

    python bench/gpu_check.py --out bench/results/gpu-check-h100.md
    python bench/gpu_check.py --dry-run        # the same code paths with the tiny preset, fp32 (CPU: ~1 minute)

Without CUDA (and without --dry-run) it exits with code 2 and says so.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table  # noqa: E402  (importing common puts the repository on sys.path)

WORDS = ("red", "green", "blue", "circle", "square", "dog", "cat", "car", "tree", "house", "on", "a", "the",
         "street", "beach", "small", "large", "photo", "of", "near")


def build_assets(root: Path, model: str, n_images: int, seed: int = 0) -> dict[str, str]:
    """Random images + captions, a random VAE and T5 with the recipe model's geometry."""
    from PIL import Image

    from dream_core.config import DreamConfig
    from dream_core.text import build_t5_from_scratch
    from training.vae import build_vae

    config = DreamConfig.preset(model)
    rng = np.random.default_rng(seed)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    captions = []
    for i in range(n_images):
        pixels = rng.integers(0, 256, (config.image_size, config.image_size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{i:05d}.png")
        text = " ".join(rng.choice(WORDS, size=6))
        (images / f"{i:05d}.txt").write_text(text)
        captions.append(text)
    downsamples = int(round(np.log2(config.vae_stride)))
    torch.manual_seed(seed)
    vae = build_vae(channels=(32,) * (downsamples + 1), latent_channels=config.vae_channels,
                    image_size=config.image_size)
    vae.register_to_config(scaling_factor=config.vae_scaling_factor)
    vae.save_pretrained(root / "vae", safe_serialization=True)
    heads = max(1, config.t5_dim // 64)
    build_t5_from_scratch(root / "text", captions + list(WORDS), d_model=config.t5_dim, num_layers=1,
                          num_heads=heads, d_ff=1024, vocab_size=64, seed=seed)
    return {"data_path": str(images), "vae_path": str(root / "vae"), "t5_path": str(root / "text")}


def recipe_for(args: argparse.Namespace, assets: dict[str, str], fsdp: bool, max_steps: int):
    from training.recipes import get_recipe

    paths = {k: assets[k] for k in ("data_path", "vae_path", "t5_path")}
    over = {**paths, "data": "folder", "batch_size": args.batch_size, "num_workers": args.workers,
            "max_steps": max_steps, "ckpt_every": 0, "log_every": 1, "fsdp": fsdp, "warmup_epochs": 0.0,
            "samples_per_epoch": args.images, "precision": "fp32" if args.dry_run else "bf16",
            "model.t5_dim": assets["t5_dim"], "model.vae_scaling_factor": assets["scaling"]}
    if args.dry_run:
        over["model"] = "tiny"
    return get_recipe("dream-base").overrides([f"{k}={json.dumps(v) if not isinstance(v, str) else v}"
                                               for k, v in over.items()])


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def train_path(args: argparse.Namespace, assets: dict, work: Path, fsdp: bool) -> tuple[dict, object]:
    """Train --steps steps, save, resume for --resume-steps more; time the steps after the first."""
    from training.train import Trainer

    out = work / ("fsdp" if fsdp else "ddp")
    trainer = Trainer(recipe_for(args, assets, fsdp, args.steps), out)
    device = trainer.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    trainer.fit()  # saves at the end
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    first_run = time.perf_counter() - t0
    memory = peak_gib(device)
    total = args.steps + args.resume_steps
    resumed = Trainer(recipe_for(args, assets, fsdp, total), out)
    assert resumed.step == args.steps, f"resume started at step {resumed.step}, expected {args.steps}"
    t0 = time.perf_counter()
    resumed.fit()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    resume_run = time.perf_counter() - t0
    assert resumed.step == total
    # Steady-state step time from the log of the resumed run (its first step carries no compile/warm-up).
    with open(out / "log.csv") as f:
        import csv

        rows = [r for r in csv.DictReader(f) if int(r["step"]) > args.steps + 1]
    rates = [float(r["samples_per_s"]) for r in rows if float(r["samples_per_s"]) > 0]
    rate = float(np.median(rates)) if rates else args.batch_size * max(1, args.resume_steps) / resume_run
    ckpt = out / "checkpoint-last"
    size = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file()) / 2**30
    row = {"path": "FSDP2 (sharded ckpt)" if fsdp else "DDP (full ckpt)", "steps": f"{args.steps}+{args.resume_steps}",
           "step_ms": 1000 * args.batch_size / rate, "samples_per_s": rate, "peak_gib": memory,
           "first_run_s": first_run, "ckpt_gib": size}
    return row, resumed


def decode_rows(args: argparse.Namespace, trainer, work: Path) -> list[dict]:
    """Export the EMA weights, then time one generation with and without the head's CUDA graphs."""
    from dream_core.pipeline import DreamPipeline

    export = work / "export"
    trainer.export(export)
    device = trainer.device
    pipe = DreamPipeline.from_pretrained(export, device=device)
    rows = []
    for graphs in (False, True):
        pipe.model.head.cuda_graphs = graphs  # a no-op off CUDA
        pipe.model.head.reset_cuda_graphs()
        times = []
        for i in range(args.decode_repeats + 1):  # the first run warms up (and captures the graphs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            pipe("a photo of a red car", num_inference_steps=args.decode_steps, head_steps=args.head_steps,
                 guidance_scale=3.0, seed=i)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        rows.append({"path": f"decode {args.decode_steps} steps x {args.head_steps} head steps, CUDA graphs "
                             f"{'on' if graphs else 'off'}", "decode_ms": 1000 * float(np.median(times[1:]))})
    return rows


def render(rows: list[dict], header: str) -> str:
    def f(v, fmt):
        return "" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, fmt)

    table = markdown_table(
        ["path", "steps", "step time (ms)", "samples/s", "peak GPU memory (GiB)", "checkpoint (GiB)", "decode (ms)"],
        [[r["path"], r.get("steps", ""), f(r.get("step_ms"), ".1f"), f(r.get("samples_per_s"), ".1f"),
          f(r.get("peak_gib"), ".2f"), f(r.get("ckpt_gib"), ".3f"), f(r.get("decode_ms"), ".1f")] for r in rows])
    return f"{header}\n\n{table}\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="also write the table (markdown) to this file")
    ap.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    ap.add_argument("--dry-run", action="store_true", help="every path with the tiny preset in fp32 (runs on CPU)")
    ap.add_argument("--steps", type=int, default=None, help="steps before the save (default 20, dry run 2)")
    ap.add_argument("--resume-steps", type=int, default=None, help="steps after the resume (default 10, dry run 2)")
    ap.add_argument("--batch-size", type=int, default=None, help="per step (default 64, dry run 4)")
    ap.add_argument("--images", type=int, default=None, help="random training images (default 256, dry run 16)")
    ap.add_argument("--workers", type=int, default=4, help="data loader workers (dry run 0)")
    ap.add_argument("--decode-steps", type=int, default=None, help="decoding steps (default 64, dry run 4)")
    ap.add_argument("--head-steps", type=int, default=None, help="head steps (default 100, dry run 5)")
    ap.add_argument("--decode-repeats", type=int, default=3)
    args = ap.parse_args(argv)
    small = args.dry_run
    defaults = {"steps": (20, 2), "resume_steps": (10, 2), "batch_size": (64, 4), "images": (256, 16),
                "decode_steps": (64, 4), "head_steps": (100, 5)}
    for key, (gpu, cpu) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, cpu if small else gpu)
        if getattr(args, key) < 1:
            raise SystemExit(f"error: --{key.replace('_', '-')} must be >= 1")
    if small:
        args.workers, args.decode_repeats = 0, 1
    return args


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("error: bench/gpu_check.py needs a CUDA GPU (torch.cuda.is_available() is False here); "
              "use --dry-run to run the same code paths on CPU", file=sys.stderr)
        raise SystemExit(2)
    from dream_core.config import DreamConfig

    model = "tiny" if args.dry_run else "base"
    config = DreamConfig.preset(model)
    with tempfile.TemporaryDirectory(prefix="dream-gpu-check-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        assets = build_assets(work / "assets", model, args.images)
        assets |= {"t5_dim": config.t5_dim, "scaling": config.vae_scaling_factor}
        rows = []
        ddp, trainer = train_path(args, assets, work, fsdp=False)
        rows.append(ddp)
        fsdp, fsdp_trainer = train_path(args, assets, work, fsdp=True)
        rows.append(fsdp)
        rows += decode_rows(args, fsdp_trainer, work)
        elapsed = time.perf_counter() - t0
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    header = (f"## bench/gpu_check.py: `dream-{model}` on {device}\n\n"
              f"torch {torch.__version__}; random data, random-weight VAE (the preset's latent geometry) and 1-layer T5 of width "
              f"{config.t5_dim}; batch {args.batch_size} per step, {'fp32' if args.dry_run else 'bf16 autocast'}; "
              f"step time and samples/s are medians over the resumed run's steps; total {elapsed:.0f} s.")
    text = render(rows, header)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return text


if __name__ == "__main__":
    main()
