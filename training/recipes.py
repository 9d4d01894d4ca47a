"""Training recipes: DREAM at the paper's sizes, the paper's baselines as configurations of the same
loop, and CPU-sized Shapes World recipes. A recipe is a dataclass; `key=value` overrides on the
command line are parsed against its field types (and `model.KEY=value` against DreamConfig)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainRecipe:
    name: str = "dream-huge"
    model: str = "huge"  # DreamConfig preset
    model_overrides: dict[str, Any] = field(default_factory=dict)

    # data
    data: str = "webdataset"  # webdataset | folder | shapes | cache
    data_path: str = ""
    cache_path: str = ""  # latent/T5 cache written by training.cache (read instead of images when set)
    flip: bool = True  # random horizontal flip (off for the Shapes World: captions name left/right)
    num_workers: int = 8
    samples_per_epoch: int = 10_000_000  # CC12M size; defines the fractional epoch for streams
    vae_path: str = ""
    t5_path: str = ""
    # Start from a model directory's weights (its config.json is the architecture, `model.*`
    # overrides apply on top; its vae/ and text/ are used unless vae_path / t5_path are set).
    init_from: str = ""
    # Shapes World only: per image, this many captions that differ from its own in one stated
    # attribute, as extra contrastive negatives (issue 9's joint-space ablation).
    hard_negatives: int = 0

    # optimisation
    epochs: float = 49.0
    batch_size: int = 64  # per process
    grad_accum: int = 1
    blr: float = 1e-4  # lr = blr * global batch / 256
    lr: float | None = None
    warmup_epochs: float = 12.0
    lr_schedule: str = "constant"  # constant | cosine
    min_lr: float = 0.0
    weight_decay: float = 0.04
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 3.0
    ema_decay: float = 0.9999
    ema_warmup: bool = True  # decay_t = min(decay, (1 + t) / (10 + t)): short runs export trained weights

    # masking
    masking: str = "warmup"  # warmup | mar | fx | uni | cd | none
    mask_std: float = 0.55
    masking_warmup_epochs: float = 36.0
    per_sample_masking: bool = True

    # REPA teacher (open_clip, local weights)
    repa_teacher_arch: str = ""
    repa_teacher_weights: str = ""

    # runtime
    seed: int = 1
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    fsdp: bool = False
    grad_checkpointing: bool = False
    compile: bool = False
    log_every: int = 20
    ckpt_every: int = 500
    sample_every: int = 0  # decode a few images during training (MAR-family models can go NaN)
    max_steps: int = 0  # 0 = run the full epochs

    def overrides(self, items: list[str]) -> "TrainRecipe":
        """Apply `key=value` strings; values parse as JSON when they can (numbers, bools, null)."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        model_over = dict(self.model_overrides)
        updates: dict[str, Any] = {}
        for item in items:
            if "=" not in item:
                raise ValueError(f"override {item!r} must look like key=value")
            key, raw = item.split("=", 1)
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw
            if key.startswith("model."):
                model_over[key[len("model."):]] = value
                continue
            if key not in fields:
                raise ValueError(f"unknown recipe key {key!r}; known keys: {', '.join(sorted(fields))}")
            default = getattr(self, key)
            if isinstance(default, bool) and not isinstance(value, bool):
                raise ValueError(f"recipe key {key} expects true/false, got {raw!r}")
            if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if default is not None and not isinstance(value, type(default)) and not (key == "lr"):
                raise ValueError(f"recipe key {key} expects {type(default).__name__}, got {raw!r}")
            updates[key] = value
        return dataclasses.replace(self, model_overrides=model_over, **updates).validate()

    def validate(self) -> "TrainRecipe":
        if self.data not in ("webdataset", "folder", "shapes", "cache"):
            raise ValueError(f"recipe.data must be webdataset, folder, shapes or cache, got {self.data!r}")
        for key in ("batch_size", "grad_accum", "samples_per_epoch"):
            if getattr(self, key) < 1:
                raise ValueError(f"recipe.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("epochs", "blr", "warmup_epochs", "weight_decay", "grad_clip", "masking_warmup_epochs", "mask_std"):
            if getattr(self, key) < 0:
                raise ValueError(f"recipe.{key} must be >= 0, got {getattr(self, key)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"recipe.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"recipe.lr_schedule must be constant or cosine, got {self.lr_schedule!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"recipe.precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.masking not in ("warmup", "mar", "fx", "uni", "cd", "none"):
            raise ValueError(f"recipe.masking must be warmup, mar, fx, uni, cd or none, got {self.masking!r}")
        if self.init_from:  # the model directory's own VAE and T5 unless others are named
            self.vae_path = self.vae_path or f"{self.init_from}/vae"
            self.t5_path = self.t5_path or f"{self.init_from}/text"
        if self.hard_negatives < 0:
            raise ValueError(f"recipe.hard_negatives must be >= 0, got {self.hard_negatives}")
        if self.hard_negatives and self.data != "shapes":
            raise ValueError("recipe.hard_negatives needs data=shapes (negatives are made from the Shapes World grammar)")
        if self.max_steps < 0:
            raise ValueError(f"recipe.max_steps must be >= 0, got {self.max_steps}")
        return self

    def masking_schedule(self):
        from dream_core.masking import build_schedule

        if self.masking in ("warmup", "cd"):
            key = "warmup_epochs" if self.masking == "warmup" else "epochs"
            return build_schedule(self.masking, std=self.mask_std, **{key: self.masking_warmup_epochs})
        if self.masking == "fx":
            return build_schedule("fx", std=self.mask_std)
        return build_schedule(self.masking)

    def model_config(self):
        from dream_core.config import DreamConfig

        base = DreamConfig.load(f"{self.init_from}/config.json") if self.init_from else DreamConfig.preset(self.model)
        return base.replace(**self.model_overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _dream(size: str, **kw) -> TrainRecipe:
    base = dict(name=f"dream-{size}", model=size, mask_std=0.55, fsdp=size in ("huge", "giant"),
                model_overrides={"t5_path": "google/t5-v1_1-xxl", "t5_dim": 4096})
    base.update(kw)
    return TrainRecipe(**base)


# Baselines share the loop; only the objective, masking and conditioning differ.
_BASELINE_MODEL = {"t5_path": "google/t5-v1_1-xxl", "t5_dim": 4096}
# The bundled model's budget: 3,000 steps of 64 (19.2 epochs of 10k samples), about an hour on
# 2 CPU cores; Masking Warmup ramps over the first 55 % of training (36 of 49 epochs in the paper).
_SHAPES_COMMON = dict(
    model="shapes", data="shapes", flip=False, num_workers=0, samples_per_epoch=10_000,
    epochs=19.2, batch_size=64, blr=3.2e-3, warmup_epochs=0.5, masking_warmup_epochs=10.56,
    ema_decay=0.999, log_every=10, ckpt_every=100, sample_every=500, seed=1,
)

RECIPES: dict[str, TrainRecipe] = {
    "dream-base": _dream("base"),
    "dream-large": _dream("large"),
    "dream-huge": _dream("huge"),
    "dream-giant": _dream("giant"),
    # the official scripts' sigma (the paper's main table uses 0.55)
    "dream-huge-s045": _dream("huge", name="dream-huge-s045", mask_std=0.45),
    "clip": TrainRecipe(name="clip", model="huge", masking="none",
                        model_overrides={**_BASELINE_MODEL, "diffusion_weight": 0.0, "clip_weight": 1.0,
                                         "min_visible_for_clip": 0.0}),
    "mar": TrainRecipe(name="mar", model="huge", masking="mar", weight_decay=0.02,
                       model_overrides={**_BASELINE_MODEL, "clip_weight": 0.0, "caption_dropout": 1.0}),
    "fluid": TrainRecipe(name="fluid", model="huge", masking="mar", weight_decay=0.02,
                         model_overrides={**_BASELINE_MODEL, "clip_weight": 0.0}),
    "repa": TrainRecipe(name="repa", model="large", masking="mar", weight_decay=0.02,
                        repa_teacher_arch="ViT-B-16", repa_teacher_weights="weights/open_clip_vit_b16.safetensors",
                        model_overrides={**_BASELINE_MODEL, "clip_weight": 0.0, "repa_block": 6,
                                         "repa_teacher_dim": 768, "repa_weight": 0.5}),
    # CPU recipes on the Shapes World (the bundled model and the toy Table 4).
    "shapes": TrainRecipe(name="shapes", masking="warmup", mask_std=0.55, **_SHAPES_COMMON),
    "shapes-fx": TrainRecipe(name="shapes-fx", masking="fx", mask_std=0.45, **_SHAPES_COMMON),
    "shapes-uni": TrainRecipe(name="shapes-uni", masking="uni", **_SHAPES_COMMON),
    "shapes-wm": TrainRecipe(name="shapes-wm", masking="warmup", mask_std=0.45, **_SHAPES_COMMON),
}


def get_recipe(name: str) -> TrainRecipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; run with --list-recipes to see the names")
    return dataclasses.replace(RECIPES[name])
