"""Training recipes: DREAM at the paper's sizes, the paper's baselines as configurations of the same
loop, CPU-sized Shapes World recipes and fine-tuning (full or LoRA, from a model directory). A recipe
is a dataclass; `key=value` overrides on the command line are parsed against its field types (and
`model.KEY=value` against DreamConfig).

The model's geometry is read from the weights it is trained with: `vae_stride` (the VAE config's
2 ** (len(block_out_channels) - 1)), `vae_channels` (latent_channels), `vae_scaling_factor`
(scaling_factor) and `t5_dim` (the T5 config's d_model) come from `vae_path` and `t5_path`; a
`model.KEY=value` override that disagrees with them is refused with one sentence naming both."""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


# What a recipe's `data` may name: file sources (image folders, webdataset shards, the built emoji
# set), the live Shapes World, and the latent/T5 cache written by training.cache.
DATA_KINDS = ("webdataset", "folder", "emoji", "shapes", "cache")
FILE_DATA_KINDS = ("webdataset", "folder", "emoji")
# Above this share of <unk> tokens in the data's captions a run refuses to start: a frozen T5 reads
# every word it does not know as the same token, so the model cannot learn them apart.
MAX_UNKNOWN_SHARE = 0.05
LR_SCHEDULES = ("constant", "cosine")
# A run's precision: auto = bf16 autocast on CUDA, fp32 elsewhere (training.cache reads the same).
PRECISIONS = ("auto", "bf16", "fp32")


def did_you_mean(name: str, known: list[str], prefix: str = "") -> str:
    """The closest known name to a mistyped one, as " (did you mean PREFIX+NAME?)", or "" when none is close."""
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def part_names(spec: str) -> list[str]:
    """The model parts a comma-separated recipe field names (`trainable`, `reinit`): "a, b" -> [a, b]."""
    return [p.strip() for p in spec.split(",") if p.strip()]


@dataclass
class TrainRecipe:
    name: str = "dream-huge"
    model: str = "huge"  # DreamConfig preset
    model_overrides: dict[str, Any] = field(default_factory=dict)

    # data
    data: str = "webdataset"  # one of DATA_KINDS
    data_path: str = ""
    cache_path: str = ""  # latent/T5 cache written by training.cache (read instead of images when set)
    flip: bool = True  # random horizontal flip (off for the Shapes World: captions name left/right)
    # Random crop of each image read from files: its side drawn in [crop_min, 1] of the (centre-
    # cropped) image, placed at random, resized back to the model's size; 1 = the whole image.
    crop_min: float = 1.0
    num_workers: int = 8  # capped by the cores this process may use
    samples_per_epoch: int = 0  # defines the fractional epoch; 0 = the size of the data (file sources)
    vae_path: str = ""  # a diffusers AutoencoderKL directory (default with init_from: <init_from>/vae)
    t5_path: str = ""  # a transformers T5 encoder directory (default with init_from: <init_from>/text)
    # The share of the captions' T5 tokens that may be <unk> before the trainer refuses to start
    # (it names the unknown words either way); 1 = go on whatever the share.
    max_unknown_share: float = MAX_UNKNOWN_SHARE

    # fine-tuning: start from a model directory (config.json + model.safetensors + vae/ + text/)
    init_from: str = ""
    lora_rank: int = 0  # > 0: train LoRA adapters (merged into the weights on export) instead of every weight
    lora_alpha: float = 0.0  # 0 = 2 x rank
    # fine-tuning: comma-separated top-level parts of the model trained, the rest frozen (e.g.
    # "projector,text_tower,logit_scale": the joint space's heads only, generation unchanged); "" = all
    trainable: str = ""
    # with trainable: the parts among them that start from their initialisation instead of init_from's
    # weights (e.g. "text_tower,projector": a joint space rebuilt on a frozen encoder, `shapes-heads`)
    reinit: str = ""
    preserve_path: str = ""  # a second image folder mixed into the data (e.g. samples of the base model)
    # Shapes World only (live, or a cache extracted from it): per image, this many captions that differ
    # from its own in one stated attribute, as extra contrastive negatives (docs/experiments/joint-space.md).
    hard_negatives: int = 0
    # emoji data only: the caption templates trained on, comma-separated indices into
    # training.data.emoji.CAPTION_TEMPLATES (e.g. "0,3": the style-free ones); "" = all of them.
    caption_templates: str = ""
    # emoji data only: each sample also carries its emoji in another trained style, whole, for the
    # model's image-to-image loss (`model.view_weight`, which must then be > 0).
    cross_style_views: bool = False
    # emoji data only: also train on the older Noto art (training.data.emoji.EXTRA_PACKAGES, built
    # with `python -m training.data.emoji --cache DATA --extra-art`), captioned without a style word.
    extra_art: bool = False

    # optimisation
    epochs: float = 49.0
    batch_size: int = 64  # per process
    grad_accum: int = 1
    blr: float = 1e-4  # lr = blr * global batch / 256
    lr: float | None = None
    warmup_epochs: float = 12.0
    warmup_steps: int = -1  # >= 0: LR warm-up in optimizer steps instead of warmup_epochs (fine-tuning)
    lr_schedule: str = "constant"  # one of LR_SCHEDULES
    min_lr: float = 0.0
    weight_decay: float = 0.04
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 3.0
    ema_decay: float = 0.9999
    ema_warmup: bool = True  # decay_t = min(decay, (1 + t) / (10 + t)): short runs export trained weights

    # masking
    masking: str = "warmup"  # a name in dream_core.masking.SCHEDULES
    mask_std: float = 0.55
    masking_warmup_epochs: float = 36.0
    per_sample_masking: bool = True

    # REPA teacher (open_clip, local weights)
    repa_teacher_arch: str = ""
    repa_teacher_weights: str = ""

    # runtime
    seed: int = 1
    precision: str = "auto"  # one of PRECISIONS
    fsdp: bool = False
    grad_checkpointing: bool = False  # on for the paper's sizes (dream-*); see training/plan.py
    compile: bool = False
    log_every: int = 20
    ckpt_every: int = 500
    sample_every: int = 0  # decode a few images during training (MAR-family models can go NaN)
    max_steps: int = 0  # 0 = run the full epochs

    def overrides(self, items: list[str]) -> "TrainRecipe":
        """Apply `key=value` strings; values parse as JSON when they can (numbers, bools, null), except
        a text key's, which stays the text given."""
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
                from dream_core.config import DreamConfig

                name, known = key[len("model."):], sorted(f.name for f in dataclasses.fields(DreamConfig))
                if name not in known:
                    raise ValueError(f"unknown DreamConfig keys: {key}{did_you_mean(name, known, 'model.')}; "
                                     f"the model keys: {', '.join(known)}")
                model_over[name] = value
                continue
            if key not in fields:
                raise ValueError(f"unknown recipe key {key!r}{did_you_mean(key, sorted(fields))}; "
                                 f"known keys: {', '.join(sorted(fields))}")
            default = getattr(self, key)
            if isinstance(default, str):  # a text key keeps its text: data_path=2024, caption_templates=0
                value = raw
            if isinstance(default, bool) and not isinstance(value, bool):
                raise ValueError(f"recipe key {key} expects true/false, got {raw!r}")
            if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if default is not None and not isinstance(value, type(default)) and not (key == "lr"):
                raise ValueError(f"recipe key {key} expects {type(default).__name__}, got {raw!r}")
            updates[key] = value
        return dataclasses.replace(self, model_overrides=model_over, **updates).validate()

    def validate(self) -> "TrainRecipe":
        if self.data not in DATA_KINDS:
            raise ValueError(f"recipe.data must be one of {', '.join(DATA_KINDS)}, got {self.data!r}")
        for key in ("batch_size", "grad_accum"):
            if getattr(self, key) < 1:
                raise ValueError(f"recipe.{key} must be >= 1, got {getattr(self, key)}")
        if self.samples_per_epoch < 0:
            raise ValueError(f"recipe.samples_per_epoch must be >= 0 (0 = the size of the data), got {self.samples_per_epoch}")
        if self.data == "shapes" and self.samples_per_epoch == 0:
            raise ValueError("recipe.samples_per_epoch must be >= 1 for data=shapes (the Shapes World is endless)")
        if self.lora_rank < 0 or self.lora_alpha < 0:
            raise ValueError(f"recipe.lora_rank and recipe.lora_alpha must be >= 0, got {self.lora_rank}, {self.lora_alpha}")
        if self.lora_rank and not self.init_from:
            raise ValueError("recipe.lora_rank > 0 needs recipe.init_from (LoRA adapts a trained model directory)")
        if self.trainable and not self.init_from:
            raise ValueError("recipe.trainable needs recipe.init_from (it freezes parts of a trained model directory)")
        untrained = sorted(set(part_names(self.reinit)) - set(part_names(self.trainable)))
        if untrained:
            raise ValueError(f"recipe.reinit names {untrained}, which recipe.trainable does not train "
                             f"(a part restarted from its initialisation must be trained)")
        if self.trainable and self.lora_rank:
            raise ValueError("recipe.trainable and recipe.lora_rank exclude each other (LoRA already chooses what trains)")
        if self.preserve_path and self.data != "folder":
            raise ValueError(f"recipe.preserve_path mixes a second image folder into data=folder, not data={self.data}")
        if self.epochs == 0 and self.max_steps == 0:
            raise ValueError("recipe.epochs=0 needs recipe.max_steps >= 1 (the run's length in steps)")
        if self.warmup_steps < -1:
            raise ValueError(f"recipe.warmup_steps must be >= 0 (or -1 = use warmup_epochs), got {self.warmup_steps}")
        for key in ("epochs", "blr", "warmup_epochs", "weight_decay", "grad_clip", "masking_warmup_epochs", "mask_std"):
            if getattr(self, key) < 0:
                raise ValueError(f"recipe.{key} must be >= 0, got {getattr(self, key)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"recipe.ema_decay must be in [0, 1), got {self.ema_decay}")
        from dream_core.masking import SCHEDULES

        for key, choices in (("lr_schedule", LR_SCHEDULES), ("precision", PRECISIONS), ("masking", tuple(SCHEDULES))):
            if getattr(self, key) not in choices:
                raise ValueError(f"recipe.{key} must be one of {', '.join(choices)}, got {getattr(self, key)!r}")
        if self.hard_negatives < 0:
            raise ValueError(f"recipe.hard_negatives must be >= 0, got {self.hard_negatives}")
        if self.hard_negatives and self.data not in ("shapes", "cache"):
            raise ValueError("recipe.hard_negatives needs data=shapes or a Shapes World cache (data=cache): "
                             "negatives are made from the Shapes World grammar")
        if not 0.0 < self.crop_min <= 1.0:
            raise ValueError(f"recipe.crop_min must be in (0, 1], got {self.crop_min}")
        if self.crop_min < 1.0 and self.data not in FILE_DATA_KINDS:
            raise ValueError(f"recipe.crop_min crops images read from files ({', '.join(FILE_DATA_KINDS)}), not "
                             f"data={self.data}" + (": a cache holds latents of whole images" if self.data == "cache"
                                                    else ": its captions name positions"))
        if self.caption_templates and self.data != "emoji":
            raise ValueError(f"recipe.caption_templates chooses among the emoji set's captions (data=emoji), "
                             f"not data={self.data}")
        if self.cross_style_views and self.data != "emoji":
            raise ValueError(f"recipe.cross_style_views pairs each emoji with its other styles (data=emoji), "
                             f"not data={self.data}")
        if self.extra_art and self.data != "emoji":
            raise ValueError(f"recipe.extra_art adds older pictures of the emoji set's emoji (data=emoji), "
                             f"not data={self.data}")
        if self.max_steps < 0:
            raise ValueError(f"recipe.max_steps must be >= 0, got {self.max_steps}")
        if not 0.0 <= self.max_unknown_share <= 1.0:
            raise ValueError(f"recipe.max_unknown_share must be in [0, 1], got {self.max_unknown_share}")
        return self

    def peak_lr(self, global_batch: int) -> float:
        """The lr after warm-up: `lr` when set, else `blr` scaled with the global batch (blr * batch / 256)."""
        return self.lr if self.lr is not None else self.blr * global_batch / 256

    def masking_schedule(self):
        from dream_core.masking import build_schedule

        if self.masking in ("warmup", "cd"):
            key = "warmup_epochs" if self.masking == "warmup" else "epochs"
            return build_schedule(self.masking, std=self.mask_std, **{key: self.masking_warmup_epochs})
        if self.masking == "fx":
            return build_schedule("fx", std=self.mask_std)
        return build_schedule(self.masking)

    def resolved(self) -> "TrainRecipe":
        """With init_from, the model directory's own vae/ and text/ unless vae_path/t5_path are given."""
        if not self.init_from:
            return self
        root = Path(self.init_from)
        if not (root / "config.json").is_file():
            raise ValueError(f"recipe.init_from={self.init_from!r} is not a model directory (no config.json)")
        return dataclasses.replace(self, vae_path=self.vae_path or str(root / "vae"),
                                   t5_path=self.t5_path or str(root / "text"))

    def model_config(self):
        """The preset (or init_from's config.json), the geometry read from the VAE and T5 configs at
        vae_path / t5_path, then the `model.KEY` overrides (which must agree with that geometry)."""
        from dream_core.config import DreamConfig

        recipe = self.resolved()
        if recipe.init_from:
            base = DreamConfig.load(Path(recipe.init_from) / "config.json")
        else:
            base = DreamConfig.preset(self.model)
        derived = weights_geometry(recipe.vae_path, recipe.t5_path)
        for key, (value, why) in derived.items():
            if key in self.model_overrides and not _same(self.model_overrides[key], value):
                raise ValueError(f"model.{key}={self.model_overrides[key]} disagrees with the weights: {why}; "
                                 f"drop model.{key} (it is read from the weights) or point at other weights")
        try:
            return base.replace(**{**{k: v for k, (v, _) in derived.items()}, **self.model_overrides})
        except ValueError as err:  # name the key as it was typed: model.KEY, not config.KEY
            message = str(err)
            for key in self.model_overrides:
                message = message.replace(f"config.{key}=", f"model.{key}=").replace(f"config.{key} ", f"model.{key} ")
            raise ValueError(message) from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(float(a) - float(b)) <= 1e-6 * max(1.0, abs(float(b)))
    return a == b


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{what} {path} is not readable JSON: {err}") from err


def weights_geometry(vae_path: str, t5_path: str) -> dict[str, tuple[Any, str]]:
    """Model fields fixed by the VAE and T5 weights, read from their config.json files (nothing is
    loaded): {field: (value, where it comes from)}. Paths that are not set or hold no config give
    nothing (the trainer and the cache refuse such paths before any work)."""
    out: dict[str, tuple[Any, str]] = {}
    from dream_core.image_tokenizer import encoder_levels

    vae_cfg = Path(vae_path) / "config.json" if vae_path else None
    if vae_cfg is not None and vae_cfg.is_file():
        cfg = _read_json(vae_cfg, "VAE config")
        key, blocks = encoder_levels(cfg)
        if not isinstance(blocks, list) or not blocks or "latent_channels" not in cfg:
            raise ValueError(f"VAE config {vae_cfg} has no block_out_channels / latent_channels "
                             "(a diffusers AutoencoderKL config is expected)")
        stride = 2 ** (len(blocks) - 1)
        out["vae_stride"] = (stride, f"the VAE at {vae_path} downsamples by {stride} "
                                     f"(2 ** (len({key}) - 1), {key}={blocks})")
        out["vae_channels"] = (int(cfg["latent_channels"]),
                               f"the VAE at {vae_path} has latent_channels={cfg['latent_channels']}")
        scale = cfg.get("scaling_factor") or 0.18215  # the ImageTokenizer's reading of a missing factor
        out["vae_scaling_factor"] = (float(scale), f"the VAE at {vae_path} has scaling_factor={scale}")
    t5_cfg = Path(t5_path) / "config.json" if t5_path else None
    if t5_cfg is not None and t5_cfg.is_file():
        cfg = _read_json(t5_cfg, "T5 config")
        if "d_model" in cfg:
            out["t5_dim"] = (int(cfg["d_model"]), f"the T5 at {t5_path} has d_model={cfg['d_model']}")
    return out


def _dream(size: str, **kw) -> TrainRecipe:
    # Gradient checkpointing on: at the paper's 256 samples a GPU (global batch 2048 on 8 GPUs) the
    # activations alone are ~100 GiB (base) to ~400 GiB (giant) without it, ~25-55 GiB with it
    # (`python -m training.plan`).
    base = dict(name=f"dream-{size}", model=size, mask_std=0.55, fsdp=size in ("huge", "giant"),
                grad_checkpointing=True, model_overrides={"t5_path": "google/t5-v1_1-xxl"})
    base.update(kw)
    return TrainRecipe(**base)


# Baselines share the loop; only the objective, masking and conditioning differ.
_BASELINE_MODEL = {"t5_path": "google/t5-v1_1-xxl"}  # t5_dim is read from the T5 at t5_path
# The bundled model's budget: 3,000 steps of 64 (19.2 epochs of 10k samples), about an hour on
# 2 CPU cores; Masking Warmup ramps over the first 55 % of training (36 of 49 epochs in the paper).
_SHAPES_COMMON = dict(
    model="shapes", data="shapes", flip=False, num_workers=0, samples_per_epoch=10_000,
    epochs=19.2, batch_size=64, blr=3.2e-3, warmup_epochs=0.5, masking_warmup_epochs=10.56,
    ema_decay=0.999, log_every=10, ckpt_every=100, sample_every=500, seed=1,
)

# The emoji model (`make model-emoji`): the Shapes geometry (16 tokens of 64 channels) on the built
# emoji set, a pass = 11,008 training images x 5 caption templates = 55,040 samples; captions run
# to 34 T5 and 33 CLIP tokens. No flips: emoji face left or right ("facing right", arrows).
EMOJI_DATA = "runs/emoji-data"
# The emoji model's sampler defaults (a request may still set its own), in the recipes' model config
# so that every emoji export, before or after its heads round, decodes as the bundled model does
# (`make model-emoji` writes them too). CFG and temperature from K = 1 on 500 seen development pairs
# (seed 7) of the model before its cooldown stage: 78.4 % judged right at CFG 3.0 / temperature 0.7,
# 74.2 % at 1.5 / 0.7 (paired +4.2 points [+1.9, +6.6]), 77.8 % at 3.0 / 1.0, 79.0 % at 4.5 / 0.7,
# 72.6 % at 1.5 / 1.0; 3.0 is the smallest CFG within noise of the best. On the cooled-down model
# 4.5 and 6.0 draw no better than 3.0 (-1.0 and -15.8 points), and SAD gains nothing measurable over
# K = 1 deciding at 0.5 or at 0.75 of the tokens (+0.8, +0.6 points; docs/experiments/emoji.md), so
# the share stays 0.5, the cheaper. The head: 15 ancestral steps instead of 100, within noise of 100 on
# the evaluation's prompts (paired: seen K = 1 +0.3 points [-3.6, +4.2], held-out -1.4 [-4.1,
# +1.1]) at 2.3x the generation throughput, the Shapes World's head rule (docs/experiments/head-sampler.md).
EMOJI_SAMPLER_DEFAULTS = dict(sad_decision_share=0.5, default_guidance_scale=3.0, default_temperature=0.7,
                              default_head_sampler="ancestral", default_head_steps=15)
_EMOJI_COMMON = dict(
    model="shapes", data="emoji", data_path=EMOJI_DATA, flip=False, num_workers=0, samples_per_epoch=55_040,
    epochs=6.0, batch_size=64, blr=3.2e-3, warmup_epochs=0.1, masking_warmup_epochs=3.6, ema_decay=0.999,
    log_every=10, ckpt_every=100, sample_every=1000, seed=1,
    model_overrides={"name": "emoji", "t5_max_length": 40, "clip_context_length": 40, **EMOJI_SAMPLER_DEFAULTS},
)

FINETUNE_LR = 1e-4
FINETUNE_LORA_LR = 5e-4
FINETUNE_STEPS = 300
_FINETUNE_COMMON = dict(
    name="finetune", data="folder", flip=False, epochs=0.0, num_workers=2, samples_per_epoch=0, batch_size=8, lr=FINETUNE_LR,
    warmup_steps=30, weight_decay=0.04, ema_decay=0.999, masking="fx", mask_std=0.55, max_steps=FINETUNE_STEPS,
    log_every=10, ckpt_every=100, precision="auto",
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
    "shapes-cd": TrainRecipe(name="shapes-cd", masking="cd", mask_std=0.55, **_SHAPES_COMMON),
    # The MAR / FLUID baselines' mask-ratio schedule with DREAM's objective (Table 4's last row).
    "shapes-mar": TrainRecipe(name="shapes-mar", masking="mar", **_SHAPES_COMMON),
    # The `clip` baseline on the Shapes World (contrastive loss only, nothing masked): the small
    # external reranker of Table 17's reranker column (`rerankers.DreamReranker`).
    "shapes-clip": TrainRecipe(name="shapes-clip", masking="none",
                               **{**_SHAPES_COMMON, "sample_every": 0,  # it does not generate
                                  "model_overrides": {"diffusion_weight": 0.0, "clip_weight": 1.0,
                                                      "min_visible_for_clip": 0.0}}),
    # The joint space's heads of a trained Shapes model rebuilt on whole images with hard-negative
    # captions, every weight generation uses frozen (so generation is unchanged): `make model`'s last
    # training stage. An attention pooler reads the frozen encoder's tokens; the projector and the
    # text tower restart from their initialisation (`reinit`): continued from the joint training they
    # embed captions that differ only in position alike (cosine 0.9997), a saddle no contrastive step
    # leaves, since neither tower is pushed to use position while the other ignores it (reverse
    # search's position 11.5 -> 44.6 %, 11.0 % without the restart). Batch 256 over 1,200 steps
    # (twice the images and the in-batch negatives of batch 128): top-1 37.1 -> 92.5 %, position
    # 44.6 -> 97.2 %. Whole images only: masked views (masking=uni) keep it on the saddle (position
    # 15.9 %). `make model` runs it twice, the second round continuing the first's pooler: on the
    # shipped encoder one round reads position 78.9 %, two 99.5 % (docs/experiments/joint-space-heads.md).
    "shapes-heads": TrainRecipe(**{**_SHAPES_COMMON, "name": "shapes-heads", "init_from": "assets/dream-shapes",
                                   "trainable": "pooler,projector,text_tower,logit_scale",
                                   "reinit": "projector,text_tower", "masking": "none", "batch_size": 256,
                                   "lr": 1e-3, "lr_schedule": "cosine", "warmup_steps": 50, "hard_negatives": 4,
                                   "max_steps": 1200, "sample_every": 0,
                                   "model_overrides": {"diffusion_weight": 0.0, "clip_weight": 1.0,
                                                       "clip_pooling": "attention"}}),
    # Fine-tuning a model directory (init_from) on an image folder: the pretraining losses with the
    # mask ratios of the end of Masking Warmup (FX), LR warm-up in steps, no flips (captions may name
    # left/right), EMA warmed up with the step count. Defaults measured on the Shapes World (see
    # docs/experiments/finetuning.md); `python -m training.finetune` is the CLI.
    "emoji": TrainRecipe(name="emoji", masking="warmup", mask_std=0.55, **_EMOJI_COMMON),
    # The emoji model's joint-space heads on whole images, generation frozen (as shapes-heads, without
    # the Shapes World's hard-negative captions); init_from is set by the build.
    "emoji-heads": TrainRecipe(**{**_EMOJI_COMMON, "name": "emoji-heads",
                                  "trainable": "pooler,projector,text_tower,logit_scale",
                                  "reinit": "projector,text_tower", "masking": "none", "batch_size": 256,
                                  "lr": 1e-3, "lr_schedule": "cosine", "warmup_steps": 50, "max_steps": 400,
                                  "sample_every": 0,
                                  "model_overrides": {**_EMOJI_COMMON["model_overrides"], "diffusion_weight": 0.0,
                                                      "clip_weight": 1.0, "clip_pooling": "attention"}}),
    "finetune": TrainRecipe(**_FINETUNE_COMMON),
    "finetune-lora": TrainRecipe(**{**_FINETUNE_COMMON, "name": "finetune-lora", "lora_rank": 8,
                                    "lr": FINETUNE_LORA_LR, "weight_decay": 0.0}),
}


def get_recipe(name: str) -> TrainRecipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; run with --list-recipes to see the names")
    return dataclasses.replace(RECIPES[name])
