"""Editing by masked decoding: which tokens an edit regenerates, and how its result is put back.

A MAR-family model decodes masked tokens given visible ones, so inpainting and variations need no
new network: the source image's VAE tokens (posterior mean) start out *decided*, the tokens to
regenerate start out masked, and the same sampler, CFG and SAD decode only those (see
`sampling.EditStart`). This module holds the pixel-side pieces:

- `square_crop`: the centre crop every image goes through (`pipeline.image_to_tensor` uses it), so
  an image of any size is centre-cropped to a square and resized to the model's size, and its mask
  with exactly the same box;
- `pixel_mask_to_tokens`: a pixel mask -> the token mask. A token is regenerated when *any* pixel
  of its patch is masked (max pooling over the patch, so a one-pixel stroke still counts);
- `variation_tokens`: the tokens a variation regenerates, a random `strength` share drawn from
  the seed (its own numpy stream, independent of the candidates' noise);
- `paste_back`: the blend of the result with the source (hard paste, no feathering).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from PIL import Image

#: numpy SeedSequence([seed, VARIATION_STREAM]) draws a variation's tokens (never the candidates' noise).
VARIATION_STREAM = 14


def as_rgb_image(image: Any, name: str = "image") -> Image.Image:
    """A PIL image or an HxW / HxWxC uint8-like array -> an RGB PIL image; anything else is refused."""
    if isinstance(image, np.ndarray):
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            raise ValueError(f"{name} array must be HxW or HxWxC (C = 1, 3 or 4), got shape {image.shape}")
        arr = image if image.dtype == np.uint8 else np.clip(image, 0, 255).astype(np.uint8)
        image = Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr)
    if not isinstance(image, Image.Image):
        raise ValueError(f"{name} must be a PIL image or a numpy array, got {type(image).__name__}")
    if image.width < 1 or image.height < 1:
        raise ValueError(f"{name} is empty ({image.width}x{image.height} pixels)")
    return image.convert("RGB")


def square_crop(size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The centre square (left, top, right, bottom) of an image of `size` = (width, height)."""
    w, h = size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return left, top, left + s, top + s


def resize_square(image: Image.Image, size: int) -> Image.Image:
    """Centre crop to a square, then area-resize down (BOX) or bicubic up to `size` x `size`."""
    box = square_crop(image.size)
    image = image.crop(box)
    s = box[2] - box[0]
    if s != size:
        image = image.resize((size, size), Image.BOX if s > size else Image.BICUBIC)
    return image


def as_pixel_mask(mask: Any, image_size: tuple[int, int]) -> np.ndarray:
    """A mask the size of the image -> bool [H, W], True = regenerate. Accepted: a 2-D array (bool
    or numbers, nonzero = masked), or a PIL image (nonzero grey level = masked, e.g. white on black;
    with an alpha channel, only where it is also not transparent). A mask of another size than the
    image is refused."""
    if isinstance(mask, Image.Image):
        arr = np.asarray(mask.convert("L")) > 0
        if mask.mode in ("RGBA", "LA", "PA") or "transparency" in mask.info:
            arr &= np.asarray(mask.convert("RGBA").getchannel("A")) > 0
    elif isinstance(mask, (np.ndarray, torch.Tensor)):
        arr = np.asarray(mask.detach().cpu() if isinstance(mask, torch.Tensor) else mask)
        if arr.ndim != 2:
            raise ValueError(f"mask must be a 2-D array (height x width), got shape {tuple(arr.shape)}")
        if not (arr.dtype == bool or np.issubdtype(arr.dtype, np.number)):
            raise ValueError(f"mask must hold booleans or numbers, got dtype {arr.dtype}")
    else:
        raise ValueError(f"mask must be a PIL image or a 2-D array, got {type(mask).__name__}")
    w, h = image_size
    if arr.shape != (h, w):
        raise ValueError(f"mask must be the size of the image ({w}x{h} pixels), got {arr.shape[1]}x{arr.shape[0]}")
    out = arr != 0
    if arr.dtype.kind == "f":
        out &= ~np.isnan(arr)
    return out


def pixel_mask_to_tokens(mask: np.ndarray, image_size: int, tokens_per_side: int) -> torch.Tensor:
    """bool [H, W] pixel mask (of the source image, any size) -> bool [L] token mask in raster
    order, True = regenerate. The mask is cropped like the image (`square_crop`); a token is
    regenerated when any pixel of its patch is masked (adaptive max pooling; when the square's side
    is not a multiple of the token grid, neighbouring patches share their border pixels, which
    errs on the side of regenerating)."""
    left, top, right, bottom = square_crop((mask.shape[1], mask.shape[0]))
    crop = torch.from_numpy(np.ascontiguousarray(mask[top:bottom, left:right])).float()[None, None]
    grid = torch.nn.functional.adaptive_max_pool2d(crop, tokens_per_side)
    return grid.reshape(-1) > 0


def num_regenerated(strength: float, seq_len: int) -> int:
    """Tokens a variation of `strength` regenerates: ceil(strength * L) (at least one)."""
    return max(1, min(seq_len, math.ceil(strength * seq_len - 1e-9)))


def variation_tokens(seed: int, strength: float, seq_len: int) -> torch.Tensor:
    """bool [L]: the ceil(strength * L) tokens a variation regenerates, chosen at random by `seed`."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), VARIATION_STREAM]))
    chosen = rng.permutation(seq_len)[:num_regenerated(strength, seq_len)]
    out = torch.zeros(seq_len, dtype=torch.bool)
    out[torch.from_numpy(chosen)] = True
    return out


def token_pixels(regenerate: torch.Tensor, image_size: int) -> np.ndarray:
    """bool [L] token mask -> bool [S, S] pixel mask of the regenerated patches."""
    side = int(round(regenerate.numel() ** 0.5))
    grid = regenerate.reshape(side, side).cpu().numpy()
    patch = image_size // side
    return np.kron(grid, np.ones((patch, patch), dtype=bool)).astype(bool)


def paste_back(result: Image.Image, source: Image.Image, regenerate: torch.Tensor) -> Image.Image:
    """Hard paste (no feathering): every pixel outside the regenerated tokens' patches is the source
    image's own pixel (after its centre crop and resize); inside them, the decoded result. The
    border is the token grid, where the decoder's output already meets the kept tokens."""
    keep = ~token_pixels(regenerate, result.width)
    out = np.asarray(result.convert("RGB")).copy()
    out[keep] = np.asarray(source.convert("RGB"))[keep]
    return Image.fromarray(out)


__all__ = ["VARIATION_STREAM", "as_pixel_mask", "as_rgb_image", "num_regenerated", "paste_back",
           "pixel_mask_to_tokens", "resize_square", "square_crop", "token_pixels", "variation_tokens"]
