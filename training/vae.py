"""Train a small diffusers `AutoencoderKL` on any image data the trainer reads (the SD-VAE cannot be
downloaded here): the Shapes World (the default), an image folder, webdataset shards or the emoji set.

The VAE has the SD-VAE's architecture family at toy scale: stride 4 (three resolution levels),
4 latent channels, reconstruction L1 + MSE and a small KL term. After training, the latent
scaling factor is set to 1 / std of the posterior means (the way SD's 0.18215 was chosen) and
saved in the VAE's own config, which `ImageTokenizer` reads.

    python -m training.vae --out runs/shapes/vae --steps 3000
    python -m training.vae --out runs/mine/vae --data folder --data-path my_images/ --object-boost 0

`--channels` sets the encoder's (and decoder's) channels per level: three levels give stride 4
(a 64 x 64 image -> a 16 x 16 latent of 4 channels).

`--decoder-only --decoder-channels 32,64,128` replaces a trained VAE's decoder by a new, wider one
(a diffusers `AsymmetricAutoencoderKL`) trained behind the kept encoder: the latents, and every
model trained on them, stay valid. `--edge-boost 20` adds loss weight on the objects' outlines,
where an L1 + MSE decoder rounds corners. `--object-boost` weights the pixels that differ from the
image's border colour (a Shapes World object on its flat background); 0 is plain L1 + MSE.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from training.data.shapes_world import ShapesWorldDataset
from training.recipes import FILE_DATA_KINDS, TrainRecipe

VAE_DATA = ("shapes", *FILE_DATA_KINDS)  # what the VAE trains on (a latent cache holds no images)


def build_vae(channels: tuple[int, ...] = (16, 32, 64), latent_channels: int = 4, image_size: int = 64):
    from diffusers import AutoencoderKL

    n = len(channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=channels, layers_per_block=1, norm_num_groups=8, sample_size=image_size,
        scaling_factor=1.0,
    )


def batches(seed: int, batch_size: int, data: str = "shapes", data_path: str = "", image_size: int = 64):
    """Endless image batches: the live Shapes World from `seed`, or any file source of the trainer
    (opened and checked as training opens it), in a permutation seeded by `seed`."""
    if data == "shapes":
        it = iter(ShapesWorldDataset(seed=seed))
        while True:
            yield torch.stack([next(it)["image"] for _ in range(batch_size)])
    from training.data.sources import image_batches, open_source

    source = open_source(TrainRecipe(data=data, data_path=data_path, flip=False).validate())
    yield from image_batches(source, image_size, batch_size, seed)


def object_weights(x: torch.Tensor, boost: float, edge_boost: float = 0.0) -> torch.Tensor:
    """Per-pixel loss weights: 1 on the background, 1 + boost on object pixels (farther than
    60/255 from the border median, the judge's rule), so the few object pixels, whose colour and
    outline the judge reads, are not drowned by the flat background; + edge_boost on the object's
    outline, the pixels within one pixel of its boundary on either side. The outline is what an
    L1 + MSE decoder blurs: it rounds a small square's corners (read as a circle) and fills a small
    cross's concave corners, which are background pixels (read as a diamond)."""
    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], dim=2)  # [B, 3, 4W]
    bg = border.median(dim=2).values[:, :, None, None]
    dist = ((x - bg) * 127.5).pow(2).sum(dim=1, keepdim=True).sqrt()
    obj = (dist > 60).float()
    weights = 1.0 + boost * obj
    if edge_boost:
        dilated = torch.nn.functional.max_pool2d(obj, 3, stride=1, padding=1)
        eroded = -torch.nn.functional.max_pool2d(-obj, 3, stride=1, padding=1)
        weights = weights + edge_boost * (dilated - eroded)
    return weights


def with_new_decoder(vae, channels: tuple[int, ...], layers_per_block: int = 1):
    """An `AsymmetricAutoencoderKL` holding `vae`'s encoder, `quant_conv` and scaling factor (bit for
    bit: the same latents) and a new, freshly initialised decoder of `channels` per level. The
    level count must match the encoder's, so the decoder upsamples by the encoder's stride."""
    from diffusers import AsymmetricAutoencoderKL

    from dream_core.image_tokenizer import encoder_levels

    cfg = vae.config
    down = tuple(encoder_levels(cfg)[1])
    if len(channels) != len(down):
        raise ValueError(f"--decoder-channels needs {len(down)} levels (the encoder's {list(down)}), "
                         f"got {list(channels)}")
    if any(c <= 0 or c % cfg.norm_num_groups for c in channels) or layers_per_block < 1:
        raise ValueError(f"--decoder-channels must be multiples of norm_num_groups={cfg.norm_num_groups} "
                         f"and --decoder-layers >= 1, got {list(channels)} and {layers_per_block}")
    new = AsymmetricAutoencoderKL(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, latent_channels=cfg.latent_channels,
        down_block_types=tuple(cfg.down_block_types), down_block_out_channels=down,
        layers_per_down_block=cfg.get("layers_per_down_block", cfg.get("layers_per_block")),
        up_block_types=("UpDecoderBlock2D",) * len(channels), up_block_out_channels=tuple(channels),
        layers_per_up_block=layers_per_block, act_fn=cfg.act_fn, norm_num_groups=cfg.norm_num_groups,
        sample_size=cfg.sample_size, scaling_factor=cfg.scaling_factor)
    new.encoder.load_state_dict(vae.encoder.state_dict())
    new.quant_conv.load_state_dict(vae.quant_conv.state_dict())
    return new


def train_vae(out: Path, steps: int, batch_size: int = 32, lr: float = 1e-3, kl_weight: float = 1e-6,
              seed: int = 0, log_every: int = 50, init: Path | None = None, object_boost: float = 9.0,
              edge_boost: float = 0.0, decoder_only: bool = False, decoder_channels: tuple[int, ...] | None = None,
              decoder_layers: int = 1, data: str = "shapes", data_path: str = "",
              channels: tuple[int, ...] = (16, 32, 64), image_size: int = 64) -> dict:
    """Train (or continue, from `init`) a VAE on `data` (see `batches`). With `decoder_only` the encoder of `init`
    is frozen and its scaling factor kept, so the latent space, and any DREAM model trained on it,
    stays valid while the decoder learns to draw sharper images from the same latents; with
    `decoder_channels` that decoder is a new, wider one (`with_new_decoder`), trained from scratch."""
    from dream_core.image_tokenizer import load_vae, save_vae

    if decoder_only and init is None:
        raise ValueError("--decoder-only needs --init: the VAE whose encoder and latent space are kept")
    if decoder_channels is not None and not decoder_only:
        raise ValueError("--decoder-channels needs --decoder-only (a new decoder for a kept encoder)")
    if object_boost < 0 or edge_boost < 0:
        raise ValueError(f"--object-boost and --edge-boost are extra loss weights (>= 0), got {object_boost} and "
                         f"{edge_boost}")
    if data not in VAE_DATA:
        raise ValueError(f"--data must be one of {', '.join(VAE_DATA)}, got {data!r}")
    if data != "shapes" and not data_path:
        raise ValueError(f"--data {data} needs --data-path")
    if decoder_channels is None and decoder_layers != 1:
        raise ValueError("--decoder-layers needs --decoder-channels (it shapes a new decoder)")
    torch.manual_seed(seed)
    vae = load_vae(init) if init is not None else build_vae(tuple(channels), image_size=image_size)
    if decoder_channels is not None:
        vae = with_new_decoder(vae, tuple(decoder_channels), decoder_layers)
    if decoder_only:
        for m in (vae.encoder, vae.quant_conv):
            m.requires_grad_(False)
        # an asymmetric decoder's inpainting branch is never called (the tokenizer decodes latents alone)
        condition = getattr(vae.decoder, "condition_encoder", None)
        if condition is not None:
            condition.requires_grad_(False)
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    feed = batches(seed, batch_size, data, data_path, image_size)
    t0 = time.time()
    log = []
    vae.train()
    for step in range(steps):
        x = next(feed)
        with torch.set_grad_enabled(not decoder_only):
            post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        w = object_weights(x, object_boost, edge_boost)
        l1 = ((rec - x).abs() * w).mean() / w.mean()
        mse = (((rec - x) ** 2) * w).mean() / w.mean()
        kl = post.kl().mean() / x[0].numel()
        loss = l1 + mse + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps - 1:
            rec_row = {"step": step, "l1": l1.item(), "mse": mse.item(), "kl": kl.item(), "sec": time.time() - t0}
            log.append(rec_row)
            print(json.dumps(rec_row), flush=True)
    vae.eval()
    # Scaling factor: unit variance of the latent means over fresh images.
    with torch.no_grad():
        held = next(batches(seed + 1, 512, data, data_path, image_size))
        means = vae.encode(held).latent_dist.mean
        scale = vae.config.scaling_factor if decoder_only else float(1.0 / means.flatten().std())
        rec = vae.decode(means).sample.clamp(-1, 1)
        held_l1 = float((rec - held).abs().mean())
    vae.register_to_config(scaling_factor=scale)
    out.mkdir(parents=True, exist_ok=True)
    save_vae(vae, out)
    decoder_levels = vae.config.get("up_block_out_channels") or vae.config.block_out_channels
    summary = {"steps": steps, "decoder_only": decoder_only, "decoder_channels": list(decoder_levels),
               "decoder_parameters": sum(p.numel() for n, p in vae.decoder.named_parameters()
                                         if not n.startswith("condition_encoder.")),
               "data": data, "data_path": str(data_path), "batch_size": batch_size, "wall_seconds": time.time() - t0,
               "lr": lr, "object_boost": object_boost, "edge_boost": edge_boost,
               "scaling_factor": scale, "heldout_l1": held_l1}
    (out / "training_log.json").write_text(json.dumps({"summary": summary, "log": log}, indent=1))
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--init", type=Path, default=None, help="continue from a saved VAE directory")
    ap.add_argument("--object-boost", type=float, default=9.0,
                    help="extra loss weight on object pixels (0 = plain L1 + MSE)")
    ap.add_argument("--edge-boost", type=float, default=0.0,
                    help="extra loss weight on the object's outline (pixels within 1 px of its boundary, "
                         "inside and out), where the decoder rounds corners")
    ap.add_argument("--decoder-only", action="store_true",
                    help="with --init: freeze its encoder and scaling factor, train the decoder only "
                         "(models trained on that VAE's latents stay valid)")
    ap.add_argument("--decoder-channels", default=None,
                    help="with --decoder-only: a new decoder of these channels per level, e.g. 32,64,128 "
                         "(saved as a diffusers AsymmetricAutoencoderKL; the encoder and latents are kept)")
    ap.add_argument("--decoder-layers", type=int, default=1, help="resnet layers per level of a new decoder (+1 up)")
    ap.add_argument("--data", default="shapes", choices=VAE_DATA,
                    help="the images: the live Shapes World, or a file source as in training (needs --data-path)")
    ap.add_argument("--data-path", default="", help="the image folder, shard folder or built emoji set")
    ap.add_argument("--channels", default="16,32,64",
                    help="a new VAE's channels per level (comma-separated; three levels = stride 4)")
    ap.add_argument("--image-size", type=int, default=64, help="training image size (square)")
    args = ap.parse_args()

    def channel_list(flag: str, text: str) -> tuple[int, ...]:
        try:
            return tuple(int(c) for c in text.split(","))
        except ValueError:
            ap.error(f"{flag} takes comma-separated integers, got {text!r}")

    channels = channel_list("--channels", args.channels)
    decoder_channels = None if args.decoder_channels is None else channel_list("--decoder-channels",
                                                                              args.decoder_channels)
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    np.seterr(all="ignore")
    try:
        summary = train_vae(args.out, args.steps, args.batch_size, args.lr, seed=args.seed, init=args.init,
                            object_boost=args.object_boost, edge_boost=args.edge_boost,
                            decoder_only=args.decoder_only,
                            decoder_channels=decoder_channels, decoder_layers=args.decoder_layers,
                            data=args.data, data_path=args.data_path, channels=channels, image_size=args.image_size)
    except ValueError as err:  # bad settings are refused before any training
        ap.error(str(err))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
