"""Distil a preview decoder for the app's live previews from a model's VAE.

The app shows the K candidates while they are decoded. Decoding them with the full VAE after
every step costs about a third of the generation on CPU; a TAESD-style decoder (diffusers
`AutoencoderTiny`, the option A1111 offers for live previews) does it for a fraction of that.
This script trains one to reproduce the VAE decoder's output from the model's *scaled* latent
grid (the DREAM token space), on the images the VAE was trained on (the Shapes World by default,
or any file source with --data, as `training.vae` reads them), and writes it as `preview_vae/`
into the model directory, where `DreamPipeline.from_pretrained` picks it up.

    python -m training.preview_decoder --model assets/dream-shapes            # ~3 min on 2 cores
    python -m training.preview_decoder --model runs/x/export --steps 300 --out /tmp/preview

For SD-VAE models (the paper's presets), the public TAESD weights read the same scaled latents:
put them in `preview_vae/` instead of training one.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dream_core.image_tokenizer import ImageTokenizer, save_preview_decoder
from dream_core.pipeline import PREVIEW_DIR
from training.vae import VAE_DATA, batches


def build_preview_decoder(latent_channels: int, vae_stride: int, channels: int = 32,
                          blocks_per_level: tuple[int, ...] | None = None):
    """AutoencoderTiny whose decoder upsamples by `vae_stride` (one level per factor 2). By
    default all residual blocks work at the latent resolution and each finer level has only its
    conv: a 3 x 3 conv costs 4x more per level up, and on CPU (measured, 9 previews of 64 x 64,
    channels-last) 32 channels with blocks (3, 0, 0) take ~10 ms where the VAE decoder takes ~45."""
    from diffusers import AutoencoderTiny

    levels = int(round(math.log2(vae_stride))) + 1
    if 2 ** (levels - 1) != vae_stride:
        raise ValueError(f"vae_stride must be a power of 2, got {vae_stride}")
    blocks = tuple(blocks_per_level) if blocks_per_level is not None else (3,) + (0,) * (levels - 1)
    if len(blocks) != levels:
        raise ValueError(f"blocks_per_level needs {levels} entries for stride {vae_stride}, got {blocks}")
    return AutoencoderTiny(
        latent_channels=latent_channels,
        encoder_block_out_channels=(8,) * levels, num_encoder_blocks=(1,) * levels,  # unused: decoding only
        decoder_block_out_channels=(channels,) * levels, num_decoder_blocks=blocks,
        scaling_factor=1.0,
    )


@torch.no_grad()
def make_pairs(tok: ImageTokenizer, n: int, seed: int, batch_size: int = 64, data: str = "shapes",
               data_path: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """(scaled latent grid, the VAE's decode of it) for `n` images of `data` (see training.vae.batches)."""
    latents, targets = [], []
    feed = batches(seed, batch_size, data, data_path)
    for _ in range(math.ceil(n / batch_size)):
        x = next(feed)
        z = tok.latents_from_moments(tok.moments(x), sample=False)
        latents.append(z)
        targets.append(tok.vae.decode((z / tok.scaling_factor).to(tok.dtype)).sample.float().clamp(-1, 1))
    return torch.cat(latents)[:n], torch.cat(targets)[:n]


def distill(tok: ImageTokenizer, vae_stride: int, steps: int = 1500, batch_size: int = 32, lr: float = 2e-3,
            pool: int = 4096, channels: int = 32, seed: int = 0, log_every: int = 100, data: str = "shapes",
            data_path: str = "") -> tuple[object, dict]:
    """Train a preview decoder to match `tok`'s VAE decoder; returns it and a summary with the
    held-out L1 (images in [-1, 1]) against the VAE's decode."""
    torch.manual_seed(seed)
    t0 = time.time()
    z, y = make_pairs(tok, pool, seed, data=data, data_path=data_path)
    z_val, y_val = make_pairs(tok, 256, seed + 10_000, data=data, data_path=data_path)
    model = build_preview_decoder(tok.channels, vae_stride, channels)
    params = list(model.decoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    gen = torch.Generator().manual_seed(seed)
    log = []
    model.train()
    for step in range(steps):
        idx = torch.randint(0, z.shape[0], (batch_size,), generator=gen)
        out = model.decode(z[idx]).sample
        loss = F.l1_loss(out, y[idx]) + F.mse_loss(out, y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps - 1:
            row = {"step": step, "loss": round(loss.item(), 5), "sec": round(time.time() - t0, 1)}
            log.append(row)
            print(json.dumps(row), flush=True)
    model.eval()
    with torch.no_grad():
        val_l1 = float((model.decode(z_val).sample.clamp(-1, 1) - y_val).abs().mean())
    summary = {"steps": steps, "batch_size": batch_size, "lr": lr, "pool": pool, "channels": channels,
               "decoder_parameters": sum(p.numel() for p in params), "heldout_l1_vs_vae": val_l1,
               "wall_seconds": time.time() - t0}
    return model, {"summary": summary, "log": log}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="model directory (its vae/ and config.json)")
    ap.add_argument("--out", type=Path, default=None, help=f"where to write (default: MODEL/{PREVIEW_DIR})")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--pool", type=int, default=4096, help="distinct renders to distil on")
    ap.add_argument("--channels", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--data", default="shapes", choices=VAE_DATA, help="the images to distil on (as training.vae)")
    ap.add_argument("--data-path", default="", help="with a file source: the folder, shards or emoji set")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from dream_core.config import DreamConfig

    for name in ("config.json", "vae"):
        if not (args.model / name).exists():
            raise SystemExit(f"error: {args.model} is not a model directory (no {name})")
    if min(args.steps, args.batch_size, args.pool, args.channels) < 1:
        raise SystemExit("error: --steps, --batch-size, --pool and --channels must be >= 1")
    config = DreamConfig.load(args.model / "config.json")
    if args.data != "shapes" and not args.data_path:
        raise SystemExit(f"error: --data {args.data} needs --data-path")
    if args.data == "shapes" and config.image_size != 64:
        raise SystemExit(f"error: the default distillation data is the 64 x 64 Shapes World; {args.model} is "
                         f"{config.image_size} px (distil on its own data with --data, or for SD-VAE models use "
                         f"the public TAESD weights)")
    tok = ImageTokenizer.from_pretrained(args.model / "vae", config.patch_size)
    model, report = distill(tok, config.vae_stride, args.steps, args.batch_size, args.lr, args.pool,
                            args.channels, args.seed, data=args.data, data_path=args.data_path)
    out = args.out or args.model / PREVIEW_DIR
    out.mkdir(parents=True, exist_ok=True)
    save_preview_decoder(model, out)
    (out / "training_log.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report["summary"]))


if __name__ == "__main__":
    main()
