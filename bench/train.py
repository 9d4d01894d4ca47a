"""Training throughput: samples/s of a DREAM training step, and where the step's time goes.

For each model size (the Shapes recipe's `shapes` model, and the paper's `base`) it times full
optimiser steps exactly as the trainer runs them (forward_train, backward, gradient clipping,
AdamW) on random inputs of the right shapes: latent tokens, a Masking Warmup mask drawn at
--epoch, T5 states, CLIP tokens. Then it splits the step into its towers by timing forward +
backward of each part alone on the very inputs forward_train gives it: the encoder, the decoder
with the text aligner, the diffusion head's loss (4 noise draws per masked token), and the
contrastive side (text tower, projector, loss). FLOPs of a step come from torch's FlopCounterMode
(matmuls and attention, forward and backward).

With --trainer, also times `training.train.Trainer.train_step` of the Shapes recipe end to end on
the live feed (Shapes World rendering, VAE encoding, T5, the step); with --cache DIR, on a Shapes
cache (moments and T5 states read from DIR, a fresh posterior sample, the step), extracting
--cache-samples scenes into DIR first when it holds no cache. Both need the VAE and T5 directories
(default: those of the bundled model). The feeds and the pure step run in interleaved rounds (one
step of each per round), so the load of a shared machine hits all of them alike, and one table
gives each feed's samples/s as a share of the pure step's (the cache feed's target: >= 90 %).

GPU paths, each switchable (they run on CPU too where torch supports them, except flash SDPA):
  --bf16 (autocast), --fused-adamw, --sdpa {default,math,flash,efficient,cudnn}, --compile,
  --grad-checkpointing.

    python -m bench.train                                  # shapes (batch 64) and base (batch 2), 2 threads
    python -m bench.train --sizes shapes --repeats 5
    python -m bench.train --sizes base --batch-base 4 --repeats 1
    python -m bench.train --device cuda --bf16 --fused-adamw --sdpa flash --compile
    python -m bench.train --sizes shapes --trainer
    python -m bench.train --sizes shapes --no-flops --no-split --trainer --cache /tmp/shapes-cache-2000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from bench.common import (CLOCKS, ROOT, clock_fn, count_flops, fmt_flops, fmt_s, machine_info, markdown_table,
                          matmul_peak, median, resolve_device, setup_threads, synchronize, time_runs)
from dream_core.config import DreamConfig
from dream_core.encoder import EncoderOutput
from dream_core.losses import masked_contrastive_loss
from dream_core.masking import random_token_mask
from dream_core.model import DreamModel
from training.recipes import get_recipe
from training.train import build_optimizer

SIZES = {"shapes": "shapes", "base": "dream-base"}  # model size -> the recipe it is trained with
SDPA_BACKENDS = ("default", "math", "flash", "efficient", "cudnn")


# --------------------------------------------------------------------------- switches


def sdpa_context(name: str):
    if name == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[name]
    return sdpa_kernel([backend])


def autocast_context(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def set_grad_checkpointing(model: DreamModel, on: bool) -> None:
    """The model's own flags, as the trainer sets them (recipe.grad_checkpointing)."""
    for part in (model.encoder, model.decoder, model.aligner, model.head.net):
        part.grad_checkpointing = on


# --------------------------------------------------------------------------- inputs


@dataclass
class Batch:
    tokens: torch.Tensor
    mask: torch.Tensor
    t5_hidden: torch.Tensor
    t5_mask: torch.Tensor
    clip_tokens: torch.Tensor


def random_batch(config: DreamConfig, recipe, batch: int, epoch: float, device: torch.device, seed: int = 0) -> Batch:
    """Random inputs shaped like the trainer's: the mask ratio of each sample is drawn from the
    recipe's masking schedule at `epoch` (Masking Warmup: mostly visible early, mostly masked late)."""
    g = torch.Generator().manual_seed(seed)
    c = config
    tokens = torch.randn(batch, c.seq_len, c.token_dim, generator=g)
    ratios = recipe.masking_schedule().sample(epoch, batch, g, per_sample=recipe.per_sample_masking)
    mask = random_token_mask(ratios, c.seq_len, g)
    t5_hidden = torch.randn(batch, c.t5_max_length, c.t5_dim, generator=g)
    lengths = torch.randint(3, c.t5_max_length + 1, (batch,), generator=g)
    t5_mask = torch.arange(c.t5_max_length)[None] < lengths[:, None]
    clip_tokens = torch.randint(1, 49000, (batch, c.clip_context_length), generator=g)
    clip_tokens[:, -1] = 0
    return Batch(*(t.to(device) for t in (tokens, mask, t5_hidden, t5_mask, clip_tokens)))


# --------------------------------------------------------------------------- the step and its parts


def make_step(model, optimizer, b: Batch, device: torch.device, args, recipe,
              optimizer_times: list[float]) -> Callable[[], float]:
    """One trainer step; appends the time of its clipping + AdamW part to `optimizer_times`."""
    forward = torch.compile(model) if args.compile else model
    now = clock_fn(args.clock)

    def step() -> float:
        with autocast_context(device, args.bf16), sdpa_context(args.sdpa):
            out = forward(b.tokens, b.mask, b.t5_hidden, b.t5_mask, b.clip_tokens)
        out["loss"].backward()
        synchronize(device)
        t0 = now()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        optimizer_times.append(now() - t0)
        return float(out["loss"].detach())
    return step


def fresh_batch_steps(model, optimizer, config: DreamConfig, recipe, batch: int, epoch: float, device: torch.device,
                      args, seed: int, count: int) -> list[Callable[[], float]]:
    """`count` trainer steps, each on its own random batch (seeds seed, seed + 1, ...), as the
    trainers draw fresh masks: a step's work depends on its masks (which rows enter the diffusion
    and contrastive losses), so one fixed draw would bias the step's time by as much as the
    difference being measured."""
    return [make_step(model, optimizer, random_batch(config, recipe, batch, epoch, device, seed + r), device, args,
                      recipe, []) for r in range(count)]


def part_fns(model: DreamModel, b: Batch, device: torch.device, args) -> dict[str, Callable[[], None]]:
    """Forward + backward of each tower alone, on the inputs forward_train hands it."""
    c = model.config
    L = b.tokens.shape[1]
    masked_frac = b.mask.float().sum(dim=1) / L
    rows = ((masked_frac >= c.min_masked_for_diffusion) & (masked_frac > 0)).nonzero().squeeze(1)
    if rows.numel() == 0:
        rows = torch.zeros(1, dtype=torch.long, device=device)
    clip_ok = (1 - masked_frac) >= c.min_visible_for_clip
    with torch.no_grad(), autocast_context(device, args.bf16):
        enc = model.encoder(b.tokens, b.mask)
        sub = EncoderOutput(enc.hidden[rows], enc.valid[rows], enc.visible_index[rows], enc.uniform)
        z = model.decoder(sub, model.aligner(b.t5_hidden[rows], b.t5_mask[rows]), b.t5_mask[rows])
    g = torch.Generator(device="cpu").manual_seed(1)
    cot_enc = torch.randn(enc.hidden.shape, generator=g).to(device)
    cot_z = torch.randn(z.shape, generator=g).to(device)

    def run(fn: Callable[[], torch.Tensor]) -> None:
        with autocast_context(device, args.bf16), sdpa_context(args.sdpa):
            loss = fn()
        loss.backward()
        model.zero_grad(set_to_none=True)

    def encoder() -> torch.Tensor:
        return (model.encoder(b.tokens, b.mask).hidden.float() * cot_enc).sum()

    def decoder() -> torch.Tensor:
        leaf = EncoderOutput(sub.hidden.detach().requires_grad_(), sub.valid, sub.visible_index, sub.uniform)
        text = model.aligner(b.t5_hidden[rows], b.t5_mask[rows])
        return (model.decoder(leaf, text, b.t5_mask[rows]).float() * cot_z).sum()

    def head() -> torch.Tensor:
        return model.head.loss(b.tokens[rows], z.detach().float().requires_grad_(), b.mask[rows].float()).mean()

    def contrastive() -> torch.Tensor:
        leaf = EncoderOutput(enc.hidden.detach().requires_grad_(), enc.valid, enc.visible_index, enc.uniform)
        loss, _ = masked_contrastive_loss(model.embed_image(leaf), model.encode_text(b.clip_tokens), clip_ok,
                                          model.clamped_logit_scale())
        return loss

    return {"encoder": lambda: run(encoder), "decoder + text aligner": lambda: run(decoder),
            "diffusion head": lambda: run(head), "text tower + projector + contrastive loss": lambda: run(contrastive)}


@dataclass
class SizeResult:
    name: str
    params: float
    batch: int
    step: float
    runs: list[float]
    flops: float | None
    parts: dict[str, float]
    masked_mean: float


def measure_size(size: str, args, device: torch.device) -> SizeResult:
    recipe = get_recipe(SIZES[size])
    config = recipe.model_config().replace(attn_dropout=0.0, proj_dropout=0.0) if args.no_dropout else recipe.model_config()
    batch = args.batch_shapes if size == "shapes" else args.batch_base
    repeats = args.repeats if size == "shapes" else args.repeats_base
    epoch = args.epoch if args.epoch is not None else recipe.epochs / 2
    torch.manual_seed(0)
    model = DreamModel(config).to(device).train()
    set_grad_checkpointing(model, args.grad_checkpointing)
    lr = recipe.peak_lr(batch)
    optimizer = build_optimizer(model, recipe, lr, fused=args.fused_adamw)
    b = random_batch(config, recipe, batch, epoch, device, seed=args.seed)
    opt_times: list[float] = []
    step = make_step(model, optimizer, b, device, args, recipe, opt_times)
    flops = None
    if not args.no_flops:
        flops = count_flops(step)  # doubles as the warm-up
        warmup = 0
    else:
        warmup = 1
    runs = time_runs(step, repeats, warmup=warmup, clock=args.clock, device=device)
    parts = {}
    if not args.no_split:
        for name, fn in part_fns(model, b, device, args).items():
            parts[name] = median(time_runs(fn, repeats, warmup=1, clock=args.clock, device=device))
        parts["gradient clipping + AdamW"] = median(opt_times[-repeats:])
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    return SizeResult(f"{size} (recipe {recipe.name})", n_params, batch, median(runs), runs, flops, parts,
                      float(b.mask.float().mean()))


def shapes_trainer(args, out: Path, vae: Path, t5: Path, cache: Path | None = None):
    """A Trainer of the Shapes recipe as the bench's flags ask (live feed, or the cache at `cache`),
    placed at the pure step's epoch so both draw their masks from the same point of Masking Warmup."""
    from training.train import Trainer

    over = [f"vae_path={vae}", f"t5_path={t5}", f"batch_size={args.batch_shapes}", "sample_every=0", "ckpt_every=0",
            f"grad_checkpointing={str(args.grad_checkpointing).lower()}", f"compile={str(args.compile).lower()}"]
    if cache is not None:
        over += ["data=cache", f"cache_path={cache}"]
    trainer = Trainer(get_recipe("shapes").overrides(over), out)
    epoch = args.epoch if args.epoch is not None else trainer.recipe.epochs / 2
    trainer.samples_seen = round(epoch * trainer.samples_per_epoch)
    trainer.model.train()
    return trainer


def ensure_cache(path: Path, samples: int, vae: Path, t5: Path) -> str:
    """The Shapes cache at `path`, extracted (`samples` scenes) when it has no index.json yet."""
    if (path / "index.json").is_file():
        n = json.loads((path / "index.json").read_text())["num_samples"]
        return f"cache {path}: {n} samples (existing)"
    from training.cache import extract

    recipe = get_recipe("shapes").overrides([f"vae_path={vae}", f"t5_path={t5}"])
    t0 = time.perf_counter()
    extract(recipe, path, max_samples=samples, num_workers=0, progress=False)
    threads = torch.get_num_threads()
    return (f"cache {path}: {samples} samples extracted in {time.perf_counter() - t0:.0f} s "
            f"({threads} thread{'s' if threads > 1 else ''})")


def trainer_throughput(args, device: torch.device) -> str:
    """Trainer.train_step of the Shapes recipe end to end, on the live feed (rendering, VAE, T5,
    the step) and/or on a cache (moments and T5 states read from disk, the step), interleaved
    round by round with the pure step on random inputs, so a shared machine's load hits all alike."""
    model_dir = ROOT / "assets" / "dream-shapes"
    vae = Path(args.vae) if args.vae else model_dir / "vae"
    t5 = Path(args.t5) if args.t5 else model_dir / "text"
    title = "## The trainer's feeds against the pure step (Shapes recipe, batch %d)\n\n" % args.batch_shapes
    if not vae.is_dir() or not t5.is_dir():
        return title + f"(skipped: needs --vae and --t5 directories; {vae} / {t5} not found)"
    notes = []
    if args.cache is not None:
        notes.append(ensure_cache(Path(args.cache), args.cache_samples, vae, t5))
    # The pure step, as measure_size times it, on its own model.
    recipe = get_recipe("shapes").overrides([f"vae_path={vae}", f"t5_path={t5}"])
    config = recipe.model_config()  # the geometry the trainers read from the same VAE and T5
    if args.no_dropout:
        config = config.replace(attn_dropout=0.0, proj_dropout=0.0)
    epoch = args.epoch if args.epoch is not None else recipe.epochs / 2
    torch.manual_seed(0)
    model = DreamModel(config).to(device).train()
    set_grad_checkpointing(model, args.grad_checkpointing)
    optimizer = build_optimizer(model, recipe, recipe.peak_lr(args.batch_shapes), fused=args.fused_adamw)
    pure_steps = fresh_batch_steps(model, optimizer, config, recipe, args.batch_shapes, epoch, device, args,
                                   args.seed, args.rounds + 1)
    feeds: dict[str, Callable[[], tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        now = clock_fn(args.clock)

        def feed(trainer) -> Callable[[], tuple[float, float]]:
            it = iter(trainer.loader)

            def run() -> tuple[float, float]:
                t0 = now()
                batch = next(it)
                t1 = now()
                trainer.train_step(batch)
                synchronize(device)
                return t1 - t0, now() - t1
            return run

        if not args.no_live:
            live = shapes_trainer(args, Path(tmp) / "live", vae, t5)
            feeds["live Shapes feed (render + VAE + T5 + step)"] = feed(live)
        if args.cache is not None:
            feeds[f"cache feed ({Path(args.cache).name}: read + posterior sample + step)"] = feed(
                shapes_trainer(args, Path(tmp) / "cache", vae, t5, Path(args.cache)))
        pure_t: list[float] = []
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in feeds}
        loads = []
        for r in range(args.rounds + 1):  # round 0 warms every path up
            t0 = now()
            pure_steps[r]()
            synchronize(device)
            dt = now() - t0
            results = {k: fn() for k, fn in feeds.items()}
            if r:
                pure_t.append(dt)
                for k, v in results.items():
                    times[k].append(v)
                loads.append(os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"))
    b = args.batch_shapes
    ref = b / median(pure_t)
    rows = [["pure step (random inputs)", "-", fmt_s(median(pure_t)), f"{ref:.1f}", "100 %"]]
    for k, v in times.items():
        total = median([d + s for d, s in v])
        rows.append([k, fmt_s(median([d for d, _ in v])), fmt_s(median([s for _, s in v])), f"{b / total:.1f}",
                     f"{100 * b / total / ref:.0f} %"])
    notes.append(f"{args.rounds} interleaved rounds after a warm-up round, medians; masks drawn at epoch {epoch:g}; "
                 f"1-min load average during the rounds {min(loads):.2f} to {max(loads):.2f}")
    return (title + "".join(f"- {n}\n" for n in notes) + "\n"
            + markdown_table(["path", "data", "step", "samples/s", "of the pure step"], rows))


# --------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="shapes,base", help=f"comma-separated subset of {','.join(SIZES)}")
    ap.add_argument("--batch-shapes", type=int, default=64, help="batch of the shapes step (the recipe's 64)")
    ap.add_argument("--batch-base", type=int, default=2, help="batch of the base-size step")
    ap.add_argument("--repeats", type=int, default=3, help="timed steps of the shapes size (median), after a warm-up")
    ap.add_argument("--repeats-base", type=int, default=1, help="timed steps of the base size")
    ap.add_argument("--epoch", type=float, default=None, help="training epoch the masks are drawn at (default: mid-training)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (0 = torch's default)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    ap.add_argument("--clock", default="wall", choices=CLOCKS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (the trainer's default on CUDA)")
    ap.add_argument("--fused-adamw", action="store_true", help="AdamW(fused=True) (the trainer's default on CUDA)")
    ap.add_argument("--sdpa", default="default", choices=SDPA_BACKENDS, help="force one SDPA backend")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model's training forward")
    ap.add_argument("--grad-checkpointing", action="store_true", help="the model's gradient checkpointing flags")
    ap.add_argument("--no-dropout", action="store_true", help="attention/projection dropout off (the shapes preset has none)")
    ap.add_argument("--no-flops", action="store_true")
    ap.add_argument("--no-split", action="store_true", help="skip the per-tower split")
    ap.add_argument("--trainer", action="store_true",
                    help="also time Trainer.train_step of the Shapes recipe end to end on the live feed")
    ap.add_argument("--cache", default=None,
                    help="also time Trainer.train_step on this Shapes cache (extracted first when it has no index.json)")
    ap.add_argument("--cache-samples", type=int, default=2000, help="scenes to extract when --cache does not exist yet")
    ap.add_argument("--no-live", action="store_true", help="with --trainer/--cache: skip the live feed")
    ap.add_argument("--rounds", type=int, default=10,
                    help="with --trainer/--cache: timed rounds of one step of each path (median), after a warm-up round")
    ap.add_argument("--vae", default=None, help="VAE directory for --trainer (default: the bundled model's)")
    ap.add_argument("--t5", default=None, help="T5 directory for --trainer (default: the bundled model's)")
    ap.add_argument("--quick", action="store_true", help="shapes only, 1 timed step, batch 16")
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats, args.rounds, args.batch_shapes = "shapes", 1, 1, min(args.batch_shapes, 16)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    bad = [s for s in sizes if s not in SIZES]
    if bad or not sizes:
        ap.error(f"--sizes must name some of {', '.join(SIZES)}, got {args.sizes!r}")
    args.size_list = sizes
    for key in ("batch_shapes", "batch_base", "repeats", "repeats_base", "rounds", "cache_samples"):
        if getattr(args, key) < 1:
            ap.error(f"--{key.replace('_', '-')} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_threads(args.threads)
    device = resolve_device(args.device)
    peak = matmul_peak(device, dtype=torch.bfloat16 if args.bf16 and device.type == "cuda" else torch.float32)
    flags = [f for f, on in (("bf16", args.bf16), ("fused AdamW", args.fused_adamw), ("compile", args.compile),
                             ("grad checkpointing", args.grad_checkpointing), (f"SDPA {args.sdpa}", args.sdpa != "default"))
             if on] or ["fp32, plain AdamW, default SDPA, eager"]
    print("# DREAM training throughput\n")
    print(f"- machine: {machine_info(device)}; measured matmul peak {peak / 1e9:.1f} GFLOP/s")
    print(f"- paths: {', '.join(flags)}; random inputs, masks from each recipe's schedule; clock {args.clock}")
    print(f"- command: python -m bench.train {' '.join(argv if argv is not None else sys.argv[1:])}\n", flush=True)
    results = []
    for size in args.size_list:
        t = time.perf_counter()
        results.append(measure_size(size, args, device))
        print(f"  {size}: {fmt_s(results[-1].step)} per step ({time.perf_counter() - t:.0f} s to measure)",
              file=sys.stderr, flush=True)
    rows = []
    for r in results:
        rate = None if r.flops is None else r.flops / r.step
        rows.append([r.name, f"{r.params:.1f} M", str(r.batch), f"{100 * r.masked_mean:.0f} %", fmt_s(r.step),
                     f"{r.batch / r.step:.2f}", "-" if r.flops is None else fmt_flops(r.flops),
                     "-" if rate is None else f"{rate / 1e9:.1f} G", "-" if rate is None else f"{100 * rate / peak:.1f} %"])
    print("## Optimiser steps (forward_train + backward + clip + AdamW)\n")
    print(markdown_table(["model", "params", "batch", "masked", "step", "samples/s", "FLOPs / step", "FLOP/s",
                          "of peak"], rows) + "\n")
    for r in results:
        if not r.parts:
            continue
        total = sum(r.parts.values())
        rows = [[name, fmt_s(t), f"{100 * t / r.step:.0f} %"] for name, t in r.parts.items()]
        rows.append(["rest (forward_train's glue: row selection, losses, logging .item() calls)", fmt_s(max(0.0, r.step - total)),
                     f"{100 * max(0.0, r.step - total) / r.step:.0f} %"])
        print(f"## Where a {r.name} step goes (forward + backward of each part alone)\n")
        print(markdown_table(["part", "time", "share of the step"], rows) + "\n")
    if args.trainer or args.cache is not None:
        print(trainer_throughput(args, device) + "\n", flush=True)


if __name__ == "__main__":
    main()
