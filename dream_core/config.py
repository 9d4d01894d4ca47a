"""DreamConfig: every architectural hyper-parameter of a DREAM model, saved as JSON beside the weights.

The paper presets (base, large, huge, giant) follow the official training scripts: SD-VAE latents
(4 channels, stride 8) cut into 2 x 2 patches, 64 buffer tokens, a 3 x 1024 diffusion head with
4 noise draws per token, a 512-wide 12-layer CLIP text tower, a StableRep projector 1024 -> 256 and
a 6-layer text aligner over a frozen T5. The `shapes` preset is the same machine at toy scale.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .request import (DEFAULT_GUIDANCE_SCALE, DEFAULT_HEAD_SAMPLER, DEFAULT_HEAD_STEPS, DEFAULT_TEMPERATURE,
                      HEAD_SAMPLERS, MAX_GUIDANCE_SCALE, MAX_TEMPERATURE)

CLIP_POOLINGS = ("all", "image", "buffer", "attention")
CLIP_PROJECTIONS = ("post", "pre")
# The sampling defaults section of DreamConfig: what a request falls back on, not what the weights
# are, so a training run resumes across a change of them (training.train) and takes the new values.
SAMPLING_FIELDS = ("clip_denoised", "sad_decision_share", "default_guidance_scale", "default_temperature",
                   "default_head_sampler", "default_head_steps")


@dataclass
class DreamConfig:
    name: str = "base"

    # ----- architecture -----
    # Image tokenizer: a diffusers AutoencoderKL, its latent cut into patch x patch tokens.
    # `vae_scaling_factor` is the latent scale the weights were trained with; the pipeline checks
    # it against the VAE's own config.scaling_factor at load (the one the tokenizer applies).
    image_size: int = 256
    vae_channels: int = 4
    vae_stride: int = 8
    patch_size: int = 2
    vae_scaling_factor: float = 0.18215

    # MAR encoder / FLUID decoder (same width, depth and heads, as in the paper).
    width: int = 768
    encoder_depth: int = 12
    decoder_depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    buffer_size: int = 64
    attn_dropout: float = 0.1
    proj_dropout: float = 0.1

    # Per-token diffusion MLP head.
    head_depth: int = 3
    head_width: int = 1024
    diffusion_batch_mul: int = 4
    num_train_timesteps: int = 1000

    # Contrastive text tower (open_clip TextTransformer + BPE tokenizer) and image projector.
    clip_context_length: int = 77
    clip_vocab_size: int = 49408
    clip_width: int = 512
    clip_layers: int = 12
    clip_heads: int = 8
    projector_hidden: int = 1024
    embed_dim: int = 256
    # Which encoder tokens form the image's contrastive feature (official `--clip_loss_on`):
    # "all" = buffer + visible image tokens (official default), "image" = visible image tokens,
    # "buffer" = buffer tokens only; "attention" (not in the official code, a toy-scale choice) = a
    # learned query attends over buffer + visible tokens (the model's `pooler`, post projection
    # only). `clip_projection`: "post" = mean, then the projector (the DREAM script's
    # post_mlp_stablerep), "pre" = the projector on every token, then the mean.
    clip_pooling: str = "all"
    clip_projection: str = "post"
    logit_scale_init: float = math.log(1 / 0.07)
    logit_scale_max: float = math.log(100.0)

    # Conditioning: frozen T5 encoder (any width) + text aligner, used only by the decoder.
    # `t5_path` records where the T5 came from (a hub id for training; "text" = the model
    # directory's text/ folder once exported); the pipeline loads text/ and checks `t5_dim`.
    t5_path: str = "google/t5-v1_1-xxl"
    t5_dim: int = 4096
    t5_max_length: int = 128
    aligner_depth: int = 6

    # ----- sampling defaults (read by dream_core.sampling; a request may not override them) -----
    # Clip the head's x0 prediction to [-v, v] while sampling (0 = off, the official sampler).
    # Briefly trained heads amplify their eps error ~300x at t = 999; toy models need it.
    clip_denoised: float = 0.0
    # Semantically Aligned Decoding: the share of tokens decided when the K candidates are scored,
    # by default. Never below `min_visible_for_clip` (the encoder was not trained on fewer visible
    # tokens, so a score there is noise); measured per model by training.evaluate.sad_sweep.
    sad_decision_share: float = 0.25
    # The sampler's guidance scale and temperature when a request names none (a request may set
    # its own): the paper's (dream_core.request) for the paper's sizes; a model measured more
    # faithful elsewhere (the bundled toy model: model card) carries its own.
    default_guidance_scale: float = DEFAULT_GUIDANCE_SCALE
    default_temperature: float = DEFAULT_TEMPERATURE
    # The diffusion head's sampler (one of request.HEAD_SAMPLERS) and steps when a request names
    # none: MAR's ancestral sampler over 100 respaced steps unless a model was measured faster at
    # equal faithfulness with a fewer-step sampler (bench.speed_front). Files written before these
    # fields existed load with these values, so they sample as they always did.
    default_head_sampler: str = DEFAULT_HEAD_SAMPLER
    default_head_steps: int = DEFAULT_HEAD_STEPS

    # ----- training losses (read by dream_core.losses / model.forward_train and training/) -----
    # Loss weights and filters (per sample).
    diffusion_weight: float = 1.0
    clip_weight: float = 0.005
    # Image-to-image InfoNCE between each image's joint-space embedding (its masked encoder pass,
    # as the contrastive loss sees it) and a second picture of the same subject seen whole (the
    # recipe's `cross_style_views`: the emoji in another style); 0 = off. It asks the encoder for
    # what stays the same across pictures of one thing (measured: docs/experiments/emoji.md).
    view_weight: float = 0.0
    min_visible_for_clip: float = 0.25
    min_masked_for_diffusion: float = 0.5
    caption_dropout: float = 0.1

    # REPA baseline: align encoder block `repa_block` (1-based; 0 = off) to a frozen teacher.
    repa_block: int = 0
    repa_teacher_dim: int = 768
    repa_weight: float = 0.5

    # ----- derived geometry -----
    @property
    def latent_size(self) -> int:
        return self.image_size // self.vae_stride

    @property
    def tokens_per_side(self) -> int:
        return self.latent_size // self.patch_size

    @property
    def seq_len(self) -> int:
        return self.tokens_per_side**2

    @property
    def token_dim(self) -> int:
        return self.vae_channels * self.patch_size**2

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    def validate(self) -> "DreamConfig":
        """Raise ValueError naming the first impossible value (checked at every load boundary)."""
        positive = [
            "image_size", "vae_channels", "vae_stride", "patch_size", "width", "encoder_depth",
            "decoder_depth", "num_heads", "mlp_dim", "buffer_size", "head_depth", "head_width",
            "diffusion_batch_mul", "num_train_timesteps", "clip_context_length", "clip_vocab_size",
            "clip_width", "clip_layers", "clip_heads", "projector_hidden", "embed_dim", "t5_dim",
            "t5_max_length",
        ]
        for key in positive:
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"config.{key} must be a positive integer, got {value!r}")
        if not 0 <= self.repa_block <= self.encoder_depth:
            raise ValueError(f"config.repa_block must be in [0, encoder_depth={self.encoder_depth}], got {self.repa_block}")
        if self.aligner_depth < 0:
            raise ValueError(f"config.aligner_depth must be >= 0, got {self.aligner_depth}")
        if self.image_size % (self.vae_stride * self.patch_size):
            step = self.vae_stride * self.patch_size
            below = self.image_size // step * step
            near = " or ".join(str(s) for s in (below, below + step) if s > 0)
            raise ValueError(
                f"config.image_size={self.image_size} must be divisible by vae_stride*patch_size="
                f"{self.vae_stride}*{self.patch_size}={step}: the nearest valid sizes are {near}"
            )
        if self.width % self.num_heads:
            raise ValueError(f"config.width={self.width} must be divisible by num_heads={self.num_heads}")
        if self.clip_width % self.clip_heads:
            raise ValueError(f"config.clip_width={self.clip_width} must be divisible by clip_heads={self.clip_heads}")
        for key in ("attn_dropout", "proj_dropout", "caption_dropout", "min_visible_for_clip", "min_masked_for_diffusion"):
            value = getattr(self, key)
            if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ValueError(f"config.{key} must be in [0, 1], got {value!r}")
        if self.clip_pooling not in CLIP_POOLINGS:
            raise ValueError(f"config.clip_pooling must be one of {CLIP_POOLINGS}, got {self.clip_pooling!r}")
        if self.clip_projection not in CLIP_PROJECTIONS:
            raise ValueError(f"config.clip_projection must be one of {CLIP_PROJECTIONS}, got {self.clip_projection!r}")
        if self.clip_pooling == "attention" and self.clip_projection != "post":
            raise ValueError("config.clip_pooling='attention' pools the encoder's tokens before the projector: "
                             "it needs clip_projection='post'")
        if not (isinstance(self.sad_decision_share, (int, float))
                and self.min_visible_for_clip <= self.sad_decision_share < 1.0):
            raise ValueError(f"config.sad_decision_share must be in [min_visible_for_clip={self.min_visible_for_clip}, 1), "
                             f"got {self.sad_decision_share!r}")
        for key, high in (("default_guidance_scale", MAX_GUIDANCE_SCALE), ("default_temperature", MAX_TEMPERATURE)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= high:
                raise ValueError(f"config.{key} must be in [0, {high}], got {value!r}")
        if self.default_head_sampler not in HEAD_SAMPLERS:
            raise ValueError(f"config.default_head_sampler must be one of {', '.join(HEAD_SAMPLERS)}, "
                             f"got {self.default_head_sampler!r}")
        value = self.default_head_steps
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= self.num_train_timesteps:
            raise ValueError(f"config.default_head_steps must be an integer in [1, num_train_timesteps="
                             f"{self.num_train_timesteps}], got {value!r}")
        for key in ("diffusion_weight", "clip_weight", "view_weight", "repa_weight", "vae_scaling_factor",
                    "clip_denoised"):
            value = getattr(self, key)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"config.{key} must be a finite number >= 0, got {value!r}")
        return self

    # ----- JSON round trip -----
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def weights_dict(self) -> dict[str, Any]:
        """The fields that shape or train the weights: every field but the SAMPLING_FIELDS."""
        return {k: v for k, v in self.to_dict().items() if k not in SAMPLING_FIELDS}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DreamConfig":
        data = dict(data)
        # Files written before the `extra` catch-all was removed hold "extra": {} (never read).
        legacy_extra = data.pop("extra", {})
        if legacy_extra:
            raise ValueError(f"config.extra is no longer supported and holds {sorted(legacy_extra)}; "
                             "move those notes to the model card (README.md)")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown DreamConfig keys: {', '.join(unknown)}")
        return cls(**data).validate()

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "DreamConfig":
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"config file {path} is not valid JSON: {err}") from err
        if not isinstance(data, dict):
            raise ValueError(f"config file {path} must hold a JSON object")
        return cls.from_dict(data)

    def replace(self, **overrides: Any) -> "DreamConfig":
        return self.from_dict({**self.to_dict(), **overrides})

    # ----- presets -----
    @classmethod
    def preset(cls, name: str) -> "DreamConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(name=name, **PRESETS[name]).validate()

    @staticmethod
    def preset_names() -> list[str]:
        return list(PRESETS)


# Widths/depths/heads from the official size factories; giant's MLP is 8192 (ratio ~4.92).
PRESETS: dict[str, dict[str, Any]] = {
    "base": dict(width=768, encoder_depth=12, decoder_depth=12, num_heads=12, mlp_dim=3072),
    "large": dict(width=1024, encoder_depth=16, decoder_depth=16, num_heads=16, mlp_dim=4096),
    "huge": dict(width=1280, encoder_depth=20, decoder_depth=20, num_heads=16, mlp_dim=5120),
    "giant": dict(width=1664, encoder_depth=24, decoder_depth=24, num_heads=16, mlp_dim=8192),
    # The bundled Shapes World model: 64 x 64 images through a stride-4 VAE with 4 channels
    # (16 x 16 latent) cut into 4 x 4 patches: 16 tokens of 64 channels. (The paper's 2 x 2 patches
    # would give 64 tokens; at 2 CPU cores and a 2-hour budget that costs 4x the compute per sample.)
    "shapes": dict(
        image_size=64, vae_channels=4, vae_stride=4, patch_size=4, vae_scaling_factor=1.0,
        width=192, encoder_depth=4, decoder_depth=4, num_heads=3, mlp_dim=768, buffer_size=8,
        attn_dropout=0.0, proj_dropout=0.0, head_depth=3, head_width=256, clip_denoised=5.0,
        clip_context_length=32, clip_width=128, clip_layers=4, clip_heads=4,
        projector_hidden=256, embed_dim=128, t5_path="text", t5_dim=128, t5_max_length=24,
        aligner_depth=2, clip_weight=0.005,
    ),
    # A tiny random model for fast tests.
    "tiny": dict(
        image_size=32, vae_channels=4, vae_stride=4, patch_size=2, vae_scaling_factor=1.0,
        width=32, encoder_depth=2, decoder_depth=2, num_heads=2, mlp_dim=64, buffer_size=4,
        attn_dropout=0.0, proj_dropout=0.0, head_depth=2, head_width=32, diffusion_batch_mul=2,
        clip_context_length=16, clip_width=32, clip_layers=1, clip_heads=2, clip_vocab_size=49408,
        projector_hidden=32, embed_dim=16, t5_path="text", t5_dim=32, t5_max_length=16, aligner_depth=1,
    ),
}
