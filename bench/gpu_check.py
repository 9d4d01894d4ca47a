"""One-command GPU check of the training and decoding paths, sized to stay under 8 minutes on one GPU.

Builds, in a temporary folder, everything a `dream-base` run needs without any download: random
images with captions (an image folder), a random-weight diffusers AutoencoderKL with the SD-VAE
geometry (4 latent channels, stride 8) and a 1-layer random T5 encoder of T5-XXL's width (4096),
then:
  1. trains `dream-base` (DDP path, one process, bf16 autocast) for --steps steps, saves, resumes
     for --resume-steps more (the resumed run must continue at the saved step);
  2. the same on the FSDP path (FSDP2 per transformer block on a world of one, sharded checkpoint);
  3. 3 steps at the paper's per-GPU batch (--peak-batch, 256 = 2048 over 8 GPUs, gradient
     checkpointing on): the peak memory beside `training.plan`'s estimate;
  4. with --nproc N > 1 (a machine with N GPUs): DDP and FSDP on N processes through torchrun,
     each with a resume;
  5. exports the EMA weights and decodes one image with and without the head's CUDA graphs.
Prints each row as its stage ends (a failed stage is a row; the later stages still run), then the
whole markdown table, and writes it to --out. The working folder (logs, checkpoints, tracebacks)
is kept when a stage fails, and always with --work.

    python -m bench.gpu_check --out bench/results/gpu-check-h100.md
    python -m bench.gpu_check --nproc 8 --out bench/results/gpu-check-8xh100.md
    python -m bench.gpu_check --dry-run        # the same code paths with the tiny preset, fp32 (CPU: a few minutes)

Without CUDA (and without --dry-run) it exits with code 2 and says so.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import ROOT, markdown_table
from dream_core.request import DEFAULT_GUIDANCE_SCALE, DEFAULT_HEAD_STEPS, DEFAULT_STEPS

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


def overrides_for(args: argparse.Namespace, assets: dict, fsdp: bool, max_steps: int,
                  batch_size: int | None = None) -> list[str]:
    """`dream-base` on the built assets, as key=value overrides (the trainer's command line)."""
    paths = {k: assets[k] for k in ("data_path", "vae_path", "t5_path")}
    over = {**paths, "data": "folder", "batch_size": batch_size or args.batch_size, "num_workers": args.workers,
            "max_steps": max_steps, "ckpt_every": 0, "log_every": 1, "fsdp": fsdp, "warmup_epochs": 0.0,
            "samples_per_epoch": args.images, "precision": "fp32" if args.dry_run else "bf16",
            "model.t5_dim": assets["t5_dim"], "model.vae_scaling_factor": assets["scaling"]}
    if args.dry_run:
        over["model"] = "tiny"
    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in over.items()]


def recipe_for(args: argparse.Namespace, assets: dict, fsdp: bool, max_steps: int, batch_size: int | None = None):
    from training.recipes import get_recipe

    return get_recipe("dream-base").overrides(overrides_for(args, assets, fsdp, max_steps, batch_size))


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


def peak_memory_row(args: argparse.Namespace, assets: dict, work: Path) -> dict:
    """3 steps at the paper's per-GPU batch (2048 over 8 GPUs = 256; gradient checkpointing on, as
    the dream-* recipes): the measured peak beside training.plan's estimate for the same run."""
    from training.plan import plan_memory
    from training.train import Trainer

    recipe = recipe_for(args, assets, False, 3, args.peak_batch)
    trainer = Trainer(recipe, work / "peak")
    device = trainer.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    trainer.fit()
    total_gib = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else 80.0
    planned = plan_memory(recipe, gpus=1, gpu_memory_gib=total_gib, bf16=not args.dry_run)
    return {"path": f"peak memory, batch {args.peak_batch} per GPU, checkpointing on", "steps": "3",
            "peak_gib": peak_gib(device), "planned_gib": planned.total_bytes / 2**30,
            "first_run_s": time.perf_counter() - t0}


def multi_gpu_rows(args: argparse.Namespace, assets: dict, work: Path) -> list[dict]:
    """DDP and FSDP on --nproc processes of one machine (torchrun): --steps steps, then a resume
    for --resume-steps more that must continue at the saved step. Each run's output is kept in
    <work>/nproc-*.log."""
    import csv
    import subprocess

    rows = []
    for fsdp in (False, True):
        name = "fsdp" if fsdp else "ddp"
        out = work / f"nproc-{name}"
        walls = []
        for stage, steps in (("first", args.steps), ("resume", args.steps + args.resume_steps)):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
                   "-m", "training.train", "--recipe", "dream-base", "--out", str(out), "--max-steps", str(steps),
                   *overrides_for(args, assets, fsdp, steps)]
            log = work / f"nproc-{name}-{stage}.log"
            t0 = time.perf_counter()
            with open(log, "w") as f:
                done = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
            walls.append(time.perf_counter() - t0)
            if done.returncode != 0:
                raise RuntimeError(f"{args.nproc}-process {name} ({stage} run) exited with {done.returncode}; see {log}")
            if stage == "resume" and f"at step {args.steps}" not in log.read_text():
                raise RuntimeError(f"the {args.nproc}-process {name} resume did not continue at step {args.steps}; "
                                   f"see {log}")
        with open(out / "log.csv") as f:
            rates = [float(r["samples_per_s"]) for r in csv.DictReader(f)
                     if int(r["step"]) > args.steps + 1 and float(r["samples_per_s"]) > 0]
        rate = float(np.median(rates)) if rates else float("nan")
        size = sum(p.stat().st_size for p in (out / "checkpoint-last").rglob("*") if p.is_file()) / 2**30
        rows.append({"path": f"{'FSDP2' if fsdp else 'DDP'} on {args.nproc} processes (torchrun)",
                     "steps": f"{args.steps}+{args.resume_steps}", "samples_per_s": rate,
                     "step_ms": 1000 * args.batch_size * args.nproc / rate if rates else None,
                     "first_run_s": walls[0], "ckpt_gib": size})
    return rows


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
                 guidance_scale=DEFAULT_GUIDANCE_SCALE, seed=i)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        rows.append({"path": f"decode {args.decode_steps} steps x {args.head_steps} head steps, CUDA graphs "
                             f"{'on' if graphs else 'off'}", "decode_ms": 1000 * float(np.median(times[1:]))})
    return rows


COLUMNS = ["path", "steps", "step time (ms)", "samples/s", "peak GPU memory (GiB)", "planned (GiB)",
           "checkpoint (GiB)", "decode (ms)"]


def cells(r: dict) -> list[str]:
    def f(v, fmt):
        return "" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, fmt)

    return [r["path"], r.get("steps", ""), f(r.get("step_ms"), ".1f"), f(r.get("samples_per_s"), ".1f"),
            f(r.get("peak_gib"), ".2f"), f(r.get("planned_gib"), ".2f"), f(r.get("ckpt_gib"), ".3f"),
            f(r.get("decode_ms"), ".1f")]


def render(rows: list[dict], header: str) -> str:
    return f"{header}\n\n{markdown_table(COLUMNS, [cells(r) for r in rows])}\n"


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
    ap.add_argument("--peak-batch", type=int, default=None,
                    help="per-GPU batch of the peak-memory stage (default 256, the paper's 2048 over 8 GPUs; dry run 8)")
    ap.add_argument("--nproc", type=int, default=1,
                    help="also run DDP and FSDP on this many processes with torchrun (one GPU each; > 1 to run)")
    args = ap.parse_args(argv)
    small = args.dry_run
    defaults = {"steps": (20, 2), "resume_steps": (10, 2), "batch_size": (64, 4), "images": (256, 16),
                "decode_steps": (DEFAULT_STEPS, 4), "head_steps": (DEFAULT_HEAD_STEPS, 5), "peak_batch": (256, 8)}
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
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="dream-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows: list[dict] = []
    failed: list[str] = []
    print(f"working in {work}\n\n" + "\n".join(markdown_table(COLUMNS, []).splitlines()[:2]), flush=True)

    def stage(name: str, run) -> None:
        """Run one stage (it returns its rows); print them as soon as it ends. A failure is a row
        too: the stages after it still run and the working folder (logs, checkpoints) is kept."""
        try:
            result = run()
        except Exception as err:  # noqa: BLE001  (any failure is reported, not raised)
            failed.append(name)
            result = [{"path": f"{name}: FAILED ({type(err).__name__}: {str(err)[:200]})"}]
            import traceback

            (work / f"failed-{len(failed)}.txt").write_text(traceback.format_exc())
        for r in result:
            rows.append(r)
            print("\n".join(markdown_table(COLUMNS, [cells(r)]).splitlines()[2:]), flush=True)

    assets = build_assets(work / "assets", model, args.images)
    assets |= {"t5_dim": config.t5_dim, "scaling": config.vae_scaling_factor}
    trainers = []

    def train(fsdp: bool) -> list[dict]:
        row, trainer = train_path(args, assets, work, fsdp=fsdp)
        trainers.append(trainer)
        return [row]

    for fsdp in (False, True):
        stage("FSDP2" if fsdp else "DDP", lambda: train(fsdp))
    stage("peak memory", lambda: [peak_memory_row(args, assets, work)])
    if args.nproc > 1:
        stage(f"{args.nproc} processes", lambda: multi_gpu_rows(args, assets, work))
    if trainers:  # CUDA-graph capture last: a failure there leaves every row above printed
        stage("decode", lambda: decode_rows(args, trainers[-1], work))
    elapsed = time.perf_counter() - t0
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    header = (f"## bench/gpu_check.py: `dream-{model}` on {device}\n\n"
              f"torch {torch.__version__}; random data, random-weight VAE (the preset's latent geometry) and 1-layer T5 of width "
              f"{config.t5_dim}; batch {args.batch_size} per step, {'fp32' if args.dry_run else 'bf16 autocast'}; "
              f"step time and samples/s are medians over the resumed run's steps; planned = "
              f"`training.plan`'s estimate for the same run; total {elapsed:.0f} s.")
    text = render(rows, header)
    print("\n" + text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    if failed:
        print(f"failed: {', '.join(failed)}; logs, checkpoints and tracebacks kept in {work}", file=sys.stderr)
        raise SystemExit(1)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return text


if __name__ == "__main__":
    main()
