"""Measuring images: VAE tokens and round trips (the ceiling a perfect DREAM could reach),
CLIPScore with a local open_clip model, and the decision step for a share of decided tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from dream_core.pipeline import DreamPipeline, image_to_tensor


@torch.inference_mode()
def image_tokens(pipe: DreamPipeline, images: Sequence[Image.Image], batch_size: int = 256) -> torch.Tensor:
    """Deterministic VAE tokens (posterior mean) [N, L, C] on the pipeline's device."""
    out = []
    size = pipe.config.image_size
    for i in range(0, len(images), batch_size):
        x = torch.cat([image_to_tensor(im, size) for im in images[i:i + batch_size]]).to(pipe.device)
        with pipe.autocast():
            out.append(pipe.image_tokenizer.encode(x, sample=False).float())
    return torch.cat(out)


@torch.inference_mode()
def vae_round_trip(pipe: DreamPipeline, images: Sequence[Image.Image], batch_size: int = 256) -> list[Image.Image]:
    """Images through the VAE and back (posterior mean): what a perfect DREAM could at best produce."""
    out = []
    for i in range(0, len(images), batch_size):
        out += pipe.decode_tokens(image_tokens(pipe, images[i:i + batch_size], batch_size))
    return out


def load_open_clip(arch: str, weights: str | Path, device: str | torch.device = "cpu"):
    """An open_clip model from a local weights file; a missing file is a ValueError naming it."""
    if not arch:
        raise ValueError("an open_clip architecture name is needed with the weights (e.g. ViT-B-32)")
    weights = Path(weights)
    if not weights.is_file():
        raise ValueError(f"open_clip weights file not found: {weights} (nothing is downloaded)")
    from dream_core.rerankers import ExternalReranker

    return ExternalReranker(arch, weights, device=str(device))


@torch.inference_mode()
def clip_scores(scorer: Any, images: Sequence[Image.Image], prompts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """CLIPScore per (image, prompt) pair: 100 * max(cosine, 0) (Hessel et al., 2021), [N]."""
    if len(images) != len(prompts):
        raise ValueError(f"images ({len(images)}) and prompts ({len(prompts)}) differ in length")
    out = []
    for i in range(0, len(images), batch_size):
        pixels = torch.stack([scorer.preprocess(im) for im in images[i:i + batch_size]]).to(scorer.device)
        img = torch.nn.functional.normalize(scorer.model.encode_image(pixels).float(), dim=-1)
        tok = scorer.tokenizer(list(prompts[i:i + batch_size])).to(scorer.device)
        txt = torch.nn.functional.normalize(scorer.model.encode_text(tok).float(), dim=-1)
        out.append(100.0 * (img * txt).sum(-1).clamp(min=0).cpu())
    return torch.cat(out)
