"""Image tokenizer: a diffusers `AutoencoderKL` (or `AsymmetricAutoencoderKL`) plus patchify/unpatchify.

Latents are scaled by the VAE config's `scaling_factor` (0.18215 for SD-VAE). A latent grid
[B, C, H, W] becomes H/p * W/p tokens in raster order, each with C*p*p features in channel-major
order (index = c*p*p + row*p + col), exactly as the official code; `unpatchify` is its inverse.

An optional preview decoder (a diffusers `AutoencoderTiny`, TAESD-style, the same option A1111
offers for live previews) turns the *scaled* latent grid into a rough image at a fraction of the
VAE decoder's cost; the app uses it for the K live candidates. For SD-VAE models the public TAESD
weights fit as they are; the bundled model ships its own, distilled from its VAE
(`training/preview_decoder.py`). Without one, previews use the full VAE.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def patchify(latent: torch.Tensor, patch_size: int) -> torch.Tensor:
    b, c, h, w = latent.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"latent size {h}x{w} is not divisible by patch_size={p}")
    x = latent.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(tokens: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    b, n, d = tokens.shape
    p = patch_size
    side = int(round(n**0.5))
    if side * side != n or d != channels * p * p:
        raise ValueError(f"cannot unpatchify tokens of shape {tuple(tokens.shape)} with p={p}, channels={channels}")
    x = tokens.reshape(b, side, side, channels, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels, side * p, side * p)


class ImageTokenizer(nn.Module):
    def __init__(self, vae, patch_size: int, preview_decoder=None) -> None:
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.patch_size = patch_size
        self.scaling_factor = float(getattr(vae.config, "scaling_factor", 0.18215) or 0.18215)
        self.channels = int(vae.config.latent_channels)
        self.preview_decoder = None
        if preview_decoder is not None:
            self.set_preview_decoder(preview_decoder)

    def set_preview_decoder(self, preview_decoder) -> None:
        """Attach an AutoencoderTiny whose decoder reads this tokenizer's scaled latent grid."""
        channels = int(preview_decoder.config.latent_channels)
        if channels != self.channels:
            raise ValueError(f"preview decoder reads {channels} latent channels but the VAE has {self.channels}")
        # channels-last: measured 2-3x faster for these small convolutions on CPU (oneDNN)
        self.preview_decoder = preview_decoder.eval().requires_grad_(False).to(memory_format=torch.channels_last)

    @classmethod
    def from_pretrained(cls, path: str | Path, patch_size: int, torch_dtype: torch.dtype | None = None,
                        preview_path: str | Path | None = None) -> "ImageTokenizer":
        vae = load_vae(path, torch_dtype)
        preview = None
        if preview_path is not None:
            preview = load_preview_decoder(preview_path, torch_dtype)
        return cls(vae, patch_size, preview)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @torch.no_grad()
    def moments(self, images: torch.Tensor) -> torch.Tensor:
        """Posterior parameters [B, 2C, h, w] (mean then log-variance) of images in [-1, 1]."""
        return self.vae.encode(images.to(self.dtype)).latent_dist.parameters.float()

    def latents_from_moments(self, moments: torch.Tensor, sample: bool = True,
                             generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled latent: a fresh posterior sample (training) or the mean."""
        mean, logvar = moments.float().chunk(2, dim=1)
        if sample:
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            noise = torch.randn(mean.shape, generator=generator, device=mean.device if generator is None else generator.device)
            mean = mean + std * noise.to(mean.device)
        return mean * self.scaling_factor

    @torch.no_grad()
    def encode(self, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> tokens [B, L, C*p*p]."""
        return patchify(self.latents_from_moments(self.moments(images), sample, generator), self.patch_size)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens [B, L, C*p*p] -> images [B, 3, H, W] in [-1, 1] (clamped)."""
        latent = unpatchify(tokens.float(), self.patch_size, self.channels) / self.scaling_factor
        return self.vae.decode(latent.to(self.dtype)).sample.float().clamp(-1, 1)

    @torch.no_grad()
    def decode_preview(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens [B, L, C*p*p] -> rough images [B, 3, H, W] in [-1, 1] from the preview decoder
        (the full VAE decode when there is none)."""
        if self.preview_decoder is None:
            return self.decode(tokens)
        latent = unpatchify(tokens.float(), self.patch_size, self.channels)
        dtype = next(self.preview_decoder.parameters()).dtype
        latent = latent.to(dtype).contiguous(memory_format=torch.channels_last)
        return self.preview_decoder.decode(latent).sample.float().clamp(-1, 1)


VAE_CLASSES = ("AutoencoderKL", "AsymmetricAutoencoderKL")


def encoder_levels(config) -> tuple[str, list[int] | None]:
    """The key of a diffusers VAE config (a dict or a model's config) that holds its encoder's
    channels per level, and their value: `down_block_out_channels` for an AsymmetricAutoencoderKL,
    `block_out_channels` for an AutoencoderKL. The encoder downsamples by 2 ** (levels - 1)."""
    key = "down_block_out_channels" if "down_block_out_channels" in config else "block_out_channels"
    value = config.get(key)
    return key, list(value) if value is not None else None


def load_vae(path: str | Path, torch_dtype: torch.dtype | None = None):
    """The diffusers VAE in a local directory (safetensors only), of the class its config.json names:
    `AutoencoderKL` (SD-VAE; the default when the config names none) or `AsymmetricAutoencoderKL`
    (an encoder with a heavier decoder, as in "Designing a Better Asymmetric VQGAN": a decoder can
    be replaced by a stronger one while the encoder, hence the latent space and every model trained
    on it, stays the same). Its decoder is called without the inpainting mask, as a plain decoder."""
    import json

    import diffusers

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"VAE directory {path} has no config.json (a diffusers AutoencoderKL is expected)")
    name = json.loads((path / "config.json").read_text()).get("_class_name", "AutoencoderKL")
    if name not in VAE_CLASSES:
        raise ValueError(f"VAE directory {path} holds a {name}; expected one of {VAE_CLASSES}")
    return getattr(diffusers, name).from_pretrained(str(path), torch_dtype=torch_dtype, use_safetensors=True)


def encoder_fingerprint(path: str | Path) -> str:
    """Identifies the posterior moments a VAE directory computes: its encoder and `quant_conv`
    weights (`dream_core.fingerprint`). A latent cache records it; a new decoder behind the same
    encoder (an AsymmetricAutoencoderKL) keeps it."""
    from .fingerprint import safetensors_files, tensors_fingerprint

    return tensors_fingerprint(safetensors_files(path), ("encoder.", "quant_conv."))


def _save_without(model, path: str | Path, self_registered: tuple[str, ...]) -> None:
    """`save_pretrained` (safetensors), then drop from config.json the keys the class registers
    itself but does not accept back (diffusers would warn on every load)."""
    import json

    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    if self_registered:
        config = json.loads((path / "config.json").read_text())
        for key in self_registered:
            config.pop(key, None)
        (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_vae(vae, path: str | Path) -> None:
    """Save a VAE (safetensors); an AsymmetricAutoencoderKL's config loses the `block_out_channels`
    and `force_upcast` it registers itself."""
    asymmetric = type(vae).__name__ == "AsymmetricAutoencoderKL"
    _save_without(vae, path, ("block_out_channels", "force_upcast") if asymmetric else ())


def load_preview_decoder(path: str | Path, torch_dtype: torch.dtype | None = None):
    """A diffusers AutoencoderTiny from a local directory (safetensors only)."""
    from diffusers import AutoencoderTiny

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"preview decoder directory {path} has no config.json (a diffusers AutoencoderTiny is expected)")
    return AutoencoderTiny.from_pretrained(str(path), torch_dtype=torch_dtype, use_safetensors=True)


def save_preview_decoder(preview_decoder, path: str | Path) -> None:
    """Save an AutoencoderTiny (safetensors); its config loses the `block_out_channels` it
    registers itself."""
    _save_without(preview_decoder, path, ("block_out_channels",))
