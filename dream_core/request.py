"""GenerationRequest: the one generation request. Every sampling setting with its type, limits
and default lives here; the pipeline, the app's widgets and its API, evaluation and bench read
them from this module, as they do the guidance schedules, the prompt checks and the rule that
picks SAD's default decision step. It imports no model code, so the config can check its own
sampler defaults against these limits.

    request = GenerationRequest("a large red circle", num_candidates=9, seed=0)
    ready = request.validate(pipe.config)   # ValueError naming the field and the allowed range
    ready.num_inference_steps, ready.decision_steps, ready.fraction_decided(pipe.config)

`validate` never clamps or rounds: a value outside its range, a float where an integer is
expected (2.5 or even 4.0 candidates), NaN, a bool where a number is expected, all raise. (The
app turns its widgets' integral floats into integers before it builds a request.)
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Sequence

from .editing import (as_pixel_mask, as_rgb_image, num_regenerated, pixel_mask_to_tokens, resize_square,
                      variation_tokens)
from .masking import fraction_decided as _fraction_decided

# ----- limits (the single source) -----
#: K: candidates decoded together for one image. Evaluation spaces per-prompt seeds by this, so
#: candidate seeds of different prompts never meet (see training.evaluate.prompts.prompt_seeds).
MAX_CANDIDATES = 64
#: The app offers fewer: its live grid of K previews stays readable and cheap to draw up to 16
#: tiles, and a shared server should not let one request decode 64 rows. Its slider and its API
#: both use this limit.
APP_MAX_CANDIDATES = 16
#: The app's default K: enough candidates that SAD visibly chooses, few enough for a CPU.
APP_DEFAULT_CANDIDATES = 4
#: Images per call; image i decodes its own K candidates, so this bounds one call's work.
MAX_IMAGES = 8
#: Seeds are 0 .. 2^32 - 1: exactly representable in a browser (JavaScript numbers stop being
#: exact at 2^53) and in A1111-style parameter texts. Candidate k of image i uses seed + i*K + k.
MAX_SEED = 2**32 - 1
#: Classifier-free guidance scale: 0 = unconditional, 1 = off (one forward), MAR/DREAM use ~3.
MAX_GUIDANCE_SCALE = 10.0
#: Temperature of the diffusion head's sampling (0 = its mean, 1 = the trained distribution).
MAX_TEMPERATURE = 2.0
#: Default decoding steps: 64 as MAR/DREAM, or one step per token for shorter sequences.
DEFAULT_STEPS = 64
#: Diffusion-head denoising steps at every decoding step (MAR's respaced sampler uses 100), for a
#: model without its own `DreamConfig.default_head_steps`.
DEFAULT_HEAD_STEPS = 100
#: The diffusion head's samplers (`dream_core.diffusion_sampler`): MAR's ancestral DDPM with the
#: learned variance, and the deterministic DDIM (eta = 0) and DPM-Solver++(2M) on the same
#: respaced steps, which reach the data in fewer steps.
HEAD_SAMPLERS = ("ancestral", "ddim", "dpm-solver++")
#: The sampler of a model without its own `DreamConfig.default_head_sampler`: the trained one.
DEFAULT_HEAD_SAMPLER = "ancestral"
#: What a model without its own sampler defaults uses (`DreamConfig.default_guidance_scale`,
#: `default_temperature`): the paper's CFG 3 and the trained distribution's temperature.
DEFAULT_GUIDANCE_SCALE = 3.0
DEFAULT_TEMPERATURE = 1.0
#: How the CFG scale moves over the steps: `constant`, or `linear` (Muse/MAR: it grows from 1 to
#: the scale with the share of tokens decided; see `sampling.guidance_at`).
GUIDANCE_SCHEDULES = ("constant", "linear")
DEFAULT_GUIDANCE_SCHEDULE = "constant"
#: Characters in one prompt (after whitespace is collapsed): far beyond what T5's 128 tokens hold.
MAX_PROMPT_CHARS = 1000


#: C0 and C1 control characters (NUL, ESC, ...): read as spaces, so they separate words but never
#: count as text.
_CONTROL_CHARS = re.compile("[\x00-\x1f\x7f-\x9f]")
#: Letters and symbols that draw nothing (Braille blank, Hangul fillers).
_BLANK_CHARS = frozenset("\u2800\u3164\u115f\u1160\uffa0")


def has_visible_text(text: str) -> bool:
    """True when `text` draws something: a prompt of zero-width spaces, joiners, soft hyphens,
    combining marks or blank letters looks empty to the user and gives the model nothing to
    follow. (Such characters stay inside a visible prompt: emoji sequences need their joiners.)"""
    return any(unicodedata.category(c)[0] not in "CZM" and c not in _BLANK_CHARS for c in text)


def validate_prompts(prompts: str | Sequence[str], name: str = "prompt") -> list[str]:
    """Normalise a prompt or list of prompts; raise ValueError naming the argument when invalid."""
    items = [prompts] if isinstance(prompts, str) else list(prompts) if isinstance(prompts, (list, tuple)) else None
    if items is None:
        raise ValueError(f"{name} must be a string or a list of strings, got {type(prompts).__name__}")
    if not items:
        raise ValueError(f"{name} must not be an empty list")
    out = []
    for p in items:
        if not isinstance(p, str):
            raise ValueError(f"{name} must be a string, got {type(p).__name__}")
        p = " ".join(_CONTROL_CHARS.sub(" ", p).split())
        if not p:
            raise ValueError(f"{name} must not be empty")
        if len(p) > MAX_PROMPT_CHARS:
            raise ValueError(f"{name} is too long ({len(p)} characters, at most {MAX_PROMPT_CHARS})")
        try:
            p.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate such as "\ud800" (JSON allows it, tokenizers do not)
            raise ValueError(f"{name} contains invalid characters (unpaired surrogates); "
                             "only valid Unicode text is allowed") from None
        if not has_visible_text(p):
            raise ValueError(f"{name} must not be empty (it holds only invisible characters)")
        out.append(p)
    return out


def sampler_defaults(config) -> dict[str, Any]:
    """What the sampler uses for a setting left None, for the model `config` (a DreamConfig): the
    model's guidance scale, temperature, head sampler and head steps, the request's guidance schedule."""
    return {"guidance_scale": config.default_guidance_scale, "guidance_schedule": DEFAULT_GUIDANCE_SCHEDULE,
            "temperature": config.default_temperature, "head_sampler": config.default_head_sampler,
            "head_steps": config.default_head_steps}


def default_decision_step(config, num_steps: int, num_tokens: int | None = None) -> int:
    """The model's default SAD decision step for `num_steps` steps: the first step at which its
    `sad_decision_share` (at least `min_visible_for_clip`) of the tokens decoded are decided.
    `num_tokens`: the tokens decoded (an edit's regenerated ones; default all of them); an edit's
    kept tokens are visible too, so its candidates are scored with at least that share visible."""
    share = max(config.sad_decision_share, config.min_visible_for_clip)
    return decision_step_for_share(share, num_steps, config.seq_len if num_tokens is None else num_tokens)


def decision_step_for_share(share: float, num_steps: int, seq_len: int) -> int:
    """The first step (1 .. num_steps - 1) before which at least `share` of the tokens are decided:
    the encoder scores a candidate with that much of it visible. The last step when none reaches it."""
    if num_steps < 2:
        raise ValueError("SAD needs num_inference_steps >= 2 (a decision step before the end)")
    for step in range(1, num_steps):
        if _fraction_decided(step, num_steps, seq_len) >= share - 1e-9:
            return step
    return num_steps - 1


def default_steps(seq_len: int) -> int:
    """Default decoding steps for a model of `seq_len` tokens."""
    return min(DEFAULT_STEPS, seq_len)


def check_int(name: str, value: Any, low: int, high: int) -> int:
    """An integer (Python or numpy) in [low, high]; bools and floats (2.5, 4.0) are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value}")
    return value


def check_float(name: str, value: Any, low: float, high: float) -> float:
    """A finite number in [low, high]; bools and strings are not numbers."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not low <= float(value) <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value}")
    return float(value)


@dataclass(frozen=True)
class GenerationRequest:
    """Everything one generation asks for. `None` defaults are resolved by `validate` from the
    model: `num_inference_steps` (min(64, tokens)), `decision_step` (the model's
    `sad_decision_share`, for K > 1), `guidance_scale`, `temperature`, `head_steps` and
    `head_sampler` (the model's `default_guidance_scale`, `default_temperature`,
    `default_head_steps`, `default_head_sampler`); `seed=None` means "draw one". `num_kept=None`
    stays None: successive halving over the decision steps (see `semantic_decoding.keep_plan`)."""

    prompt: str
    negative_prompt: str = ""  # replaces the empty prompt in classifier-free guidance
    num_candidates: int = 1  # K; 1 = plain MAR decoding
    decision_step: int | tuple[int, ...] | None = None  # a step, or increasing steps (SAD in stages)
    # Staged SAD: candidates kept after each decision step, strictly decreasing, ending at 1
    # (e.g. K = 9, steps (3, 6), kept (3, 1)); None = halve at each, keep one after the last.
    num_kept: tuple[int, ...] | None = None
    num_inference_steps: int | None = None  # 1 .. the model's number of tokens
    guidance_scale: float | None = None  # 0 .. MAX_GUIDANCE_SCALE
    guidance_schedule: str = DEFAULT_GUIDANCE_SCHEDULE  # one of GUIDANCE_SCHEDULES
    temperature: float | None = None  # 0 .. MAX_TEMPERATURE
    head_steps: int | None = None  # diffusion-head steps, 1 .. the model's num_train_timesteps
    head_sampler: str | None = None  # one of HEAD_SAMPLERS
    seed: int | None = None  # 0 .. MAX_SEED
    num_images: int = 1  # 1 .. MAX_IMAGES
    shared_order: bool = True  # the K candidates share one generation order (the official SAD)

    def validate(self, config, max_candidates: int = MAX_CANDIDATES,
                 num_tokens: int | None = None) -> "GenerationRequest":
        """A checked copy with the defaults resolved for the model `config` (a DreamConfig).
        Raises ValueError naming the first bad field and its allowed values; never clamps.
        `num_tokens`: the tokens this generation decodes (an edit's regenerated ones; default all
        of the model's): the steps' limit and default, and the default decision step, follow it."""
        seq_len = config.seq_len if num_tokens is None else num_tokens
        prompt = validate_prompts(self.prompt, "prompt")
        if len(prompt) != 1:
            raise ValueError("prompt must be a single string (one request per prompt)")
        neg = self.negative_prompt
        if neg is not None and not isinstance(neg, str):
            raise ValueError(f"negative_prompt must be a string, got {type(neg).__name__}")
        neg = validate_prompts(neg, "negative_prompt")[0] if neg and neg.strip() else ""
        k = check_int("num_candidates", self.num_candidates, 1, max_candidates)
        steps = self.num_inference_steps
        if steps is None:
            steps = default_steps(seq_len)
        else:
            check_int("num_inference_steps", steps, 1, config.seq_len if seq_len < config.seq_len else seq_len)
            if steps > seq_len:
                raise ValueError(f"num_inference_steps must be between 1 and {seq_len} (the number of tokens this "
                                 f"edit regenerates), got {steps}")
            steps = int(steps)
        if k > 1 and steps < 2:
            raise ValueError("with more than one candidate, num_inference_steps must be at least 2 "
                             "(the decision happens before the last step)")
        decision = self._checked_decision(steps)
        kept = self._checked_kept(max_candidates)
        if k == 1:
            decision, kept = None, None  # nothing to decide (an impossible value was still refused above)
        elif decision is None:
            if kept is not None and len(kept) > 1:
                raise ValueError(f"num_kept gives {len(kept)} counts but the model's default is one decision step; "
                                 "name the decision steps with decision_step (one count per step)")
            decision = default_decision_step(config, steps, seq_len)
        if kept is not None:
            count = len(decision) if isinstance(decision, tuple) else 1
            if len(kept) != count:
                raise ValueError(f"num_kept must give one count per decision step: {len(kept)} "
                                 f"count{'s' * (len(kept) > 1)} for {count} decision step{'s' * (count > 1)}")
            if kept[0] >= k:
                raise ValueError(f"num_kept must start below num_candidates={k} (the first decision prunes), "
                                 f"got {list(kept)}")
        schedule = self.guidance_schedule
        if schedule not in GUIDANCE_SCHEDULES:
            raise ValueError(f"guidance_schedule must be one of {', '.join(GUIDANCE_SCHEDULES)}, got {schedule!r}")
        if not isinstance(self.shared_order, bool):
            raise ValueError(f"shared_order must be true or false, got {self.shared_order!r}")
        defaults = sampler_defaults(config)
        head_sampler = defaults["head_sampler"] if self.head_sampler is None else self.head_sampler
        if not isinstance(head_sampler, str) or head_sampler not in HEAD_SAMPLERS:
            raise ValueError(f"head_sampler must be one of {', '.join(HEAD_SAMPLERS)}, got {head_sampler!r}")
        return dataclasses.replace(
            self, prompt=prompt[0], negative_prompt=neg, num_candidates=k, decision_step=decision, num_kept=kept,
            num_inference_steps=steps,
            guidance_scale=(defaults["guidance_scale"] if self.guidance_scale is None
                            else check_float("guidance_scale", self.guidance_scale, 0.0, MAX_GUIDANCE_SCALE)),
            temperature=(defaults["temperature"] if self.temperature is None
                         else check_float("temperature", self.temperature, 0.0, MAX_TEMPERATURE)),
            head_steps=(defaults["head_steps"] if self.head_steps is None
                        else check_int("head_steps", self.head_steps, 1, config.num_train_timesteps)),
            head_sampler=head_sampler,
            seed=None if self.seed is None else check_int("seed", self.seed, 0, MAX_SEED),
            num_images=check_int("num_images", self.num_images, 1, MAX_IMAGES),
        )

    def _checked_decision(self, steps: int) -> int | tuple[int, ...] | None:
        d = self.decision_step
        if d is None:
            return None
        many = isinstance(d, (list, tuple))
        items = list(d) if many else [d]
        if not items:
            raise ValueError("decision_step must name at least one step (or be None for the model's default)")
        if steps < 2:
            raise ValueError("decision_step needs num_inference_steps >= 2 (a decision before the last step), "
                             f"got {steps} step")
        out = [check_int("decision_step", s, 1, steps - 1) for s in items]
        if sorted(set(out)) != out:
            raise ValueError(f"decision_step list must be strictly increasing, got {out}")
        return tuple(out) if many else out[0]

    def _checked_kept(self, max_candidates: int) -> tuple[int, ...] | None:
        """num_kept on its own: counts of candidates, strictly decreasing, ending at 1."""
        kept = self.num_kept
        if kept is None:
            return None
        if not isinstance(kept, (list, tuple)):
            raise ValueError(f"num_kept must be a list of candidate counts (one per decision step), got {kept!r}")
        if not kept:
            raise ValueError("num_kept must give at least one count (or be None for successive halving)")
        out = [check_int("num_kept", v, 1, max_candidates) for v in kept]
        if any(b >= a for a, b in zip(out, out[1:])):
            raise ValueError(f"num_kept must be strictly decreasing (every decision prunes), got {out}")
        if out[-1] != 1:
            raise ValueError(f"num_kept must end at 1 (the last decision picks the image), got {out}")
        return tuple(out)

    # ----- derived (on a validated request) -----
    @property
    def decision_steps(self) -> list[int]:
        """The decision steps as a list ([] for K = 1 or before validation resolved them)."""
        d = self.decision_step
        return [] if d is None else list(d) if isinstance(d, tuple) else [d]

    def fraction_decided(self, config, num_tokens: int | None = None) -> float | None:
        """Share of the tokens decoded (`num_tokens`, default all) that are decided when the
        winner is picked (at the last decision step)."""
        steps = self.decision_steps
        if not steps or self.num_inference_steps is None:
            return None
        return _fraction_decided(steps[-1], self.num_inference_steps, config.seq_len if num_tokens is None else num_tokens)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_settings(cls, prompt: "str | GenerationRequest", **settings: Any) -> "GenerationRequest":
        """`prompt` plus keyword settings, or an existing request (then no settings may be given).
        An unknown setting is a ValueError listing the known ones."""
        if isinstance(prompt, GenerationRequest):
            if settings:
                raise ValueError(f"pass either a GenerationRequest or settings, not both (got {', '.join(settings)})")
            return prompt
        unknown = sorted(set(settings) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"unknown generation setting {', '.join(unknown)}; the settings are "
                             f"{', '.join(cls.field_names()[1:])}")
        for name in ("decision_step", "num_kept"):
            if isinstance(settings.get(name), list):
                settings[name] = tuple(settings[name])
        return cls(prompt, **settings)


def request_defaults() -> dict[str, Any]:
    """The request's defaults by field (for widgets and CLI flags)."""
    return {f.name: f.default for f in dataclasses.fields(GenerationRequest) if f.default is not dataclasses.MISSING}


def sampler_limits(config) -> dict[str, tuple[float, float]]:
    """(low, high) of every bounded setting for a model `config` (what the app's sliders span)."""
    return {
        "num_candidates": (1, MAX_CANDIDATES),
        "num_inference_steps": (1, config.seq_len),
        "guidance_scale": (0.0, MAX_GUIDANCE_SCALE),
        "temperature": (0.0, MAX_TEMPERATURE),
        "head_steps": (1, config.num_train_timesteps),
        "seed": (0, MAX_SEED),
        "num_images": (1, MAX_IMAGES),
    }


__all__ = ["APP_DEFAULT_CANDIDATES", "APP_MAX_CANDIDATES", "DEFAULT_GUIDANCE_SCALE", "DEFAULT_GUIDANCE_SCHEDULE",
           "DEFAULT_HEAD_SAMPLER", "DEFAULT_HEAD_STEPS", "DEFAULT_STEPS", "DEFAULT_TEMPERATURE", "GUIDANCE_SCHEDULES",
           "GenerationRequest", "HEAD_SAMPLERS",
           "MAX_CANDIDATES", "MAX_GUIDANCE_SCALE", "MAX_IMAGES", "MAX_PROMPT_CHARS", "MAX_SEED", "MAX_TEMPERATURE",
           "check_float", "check_int", "decision_step_for_share", "default_decision_step", "default_steps",
           "has_visible_text", "request_defaults", "sampler_defaults", "sampler_limits", "validate_prompts"]


@dataclass(frozen=True)
class SamplerSettings:
    """What a batch of prompts shares (evaluation sweeps): a request without its prompt, K,
    decision step and seed, which come per prompt and per selection. Defaults are the request's."""

    num_inference_steps: int | None = None
    guidance_scale: float | None = GenerationRequest.guidance_scale
    guidance_schedule: str = GenerationRequest.guidance_schedule
    temperature: float | None = GenerationRequest.temperature
    head_steps: int | None = GenerationRequest.head_steps
    head_sampler: str | None = GenerationRequest.head_sampler
    negative_prompt: str = GenerationRequest.negative_prompt
    shared_order: bool = GenerationRequest.shared_order

    def request(self, prompt: str, num_candidates: int = 1, decision_step: int | tuple[int, ...] | None = None,
                seed: int | None = None, num_kept: tuple[int, ...] | None = None) -> GenerationRequest:
        return GenerationRequest(prompt, negative_prompt=self.negative_prompt, num_candidates=num_candidates,
                                 decision_step=decision_step, num_kept=num_kept,
                                 num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale,
                                 guidance_schedule=self.guidance_schedule, temperature=self.temperature,
                                 head_steps=self.head_steps, head_sampler=self.head_sampler, seed=seed,
                                 shared_order=self.shared_order)


__all__ += ["SamplerSettings"]


@dataclass(frozen=True)
class EditRequest:
    """An edit of a source image by masked decoding: inpainting (`mask`, the pixels to regenerate,
    nonzero = regenerate, the size of `image`) or variations (`strength`, the share of the tokens
    regenerated, chosen at random by the seed), with every generation setting of `generation`
    (prompt, K, decision step, CFG, seed, ...), checked by the same `GenerationRequest.validate`
    with its steps counted over the regenerated tokens.

    The image is centre-cropped to a square and resized to the model's size (as every image the
    engine reads; the mask with the same box). A token is regenerated when any pixel of its patch
    is masked. `paste_back`: the pixels outside the regenerated patches are the source's own
    (hard paste, see `editing.paste_back`); otherwise the whole image is the VAE's decode."""

    image: Any  # PIL image or HxW(xC) uint8 array, any size
    generation: GenerationRequest
    mask: Any = None  # inpainting: 2-D array or PIL image the size of `image`
    strength: float | None = None  # variations: (0, 1]
    paste_back: bool = True
    # Resolved by validate():
    regenerate: Any = field(default=None, compare=False)  # inpainting: bool [L] token mask
    source: Any = field(default=None, compare=False)  # the image as the model sees it (cropped, resized)

    def validate(self, config, max_candidates: int = MAX_CANDIDATES) -> "EditRequest":
        """A checked copy: image and mask read, the token mask computed, `generation` validated for
        the number of tokens regenerated. ValueError names the bad field and what is allowed."""
        image = as_rgb_image(self.image)
        if self.mask is None and self.strength is None:
            raise ValueError("an edit needs a mask (inpainting: the pixels to regenerate) or a strength "
                             "(variations: the share of tokens regenerated)")
        if self.mask is not None and self.strength is not None:
            raise ValueError("an edit takes either a mask (inpainting) or a strength (variations), not both")
        regenerate, strength = None, None
        if self.mask is not None:
            pixels = as_pixel_mask(self.mask, image.size)
            if not pixels.any():
                raise ValueError("mask is empty: mark the pixels to regenerate (nonzero), or make variations "
                                 "(strength) to change the whole image")
            regenerate = pixel_mask_to_tokens(pixels, config.image_size, config.tokens_per_side)
            count = int(regenerate.sum())
            if count == 0:
                raise ValueError("mask lies outside the image's centre square (the part the model sees): "
                                 "mark pixels inside it")
        else:
            strength = check_float("strength", self.strength, 0.0, 1.0)
            if strength <= 0.0:
                raise ValueError(f"strength must be greater than 0 and at most 1 (the share of tokens regenerated), "
                                 f"got {strength}")
            count = num_regenerated(strength, config.seq_len)
        if not isinstance(self.paste_back, bool):
            raise ValueError(f"paste_back must be true or false, got {self.paste_back!r}")
        if not isinstance(self.generation, GenerationRequest):
            raise ValueError(f"generation must be a GenerationRequest, got {type(self.generation).__name__}")
        generation = self.generation.validate(config, max_candidates, num_tokens=count)
        return dataclasses.replace(self, image=image, generation=generation, strength=strength,
                                   mask=None if self.mask is None else pixels, regenerate=regenerate,
                                   source=resize_square(image, config.image_size))

    @property
    def kind(self) -> str:
        return "inpaint" if self.mask is not None else "variations"

    def num_regenerated(self, config) -> int:
        """Tokens regenerated (on a validated request)."""
        if self.regenerate is not None:
            return int(self.regenerate.sum())
        return num_regenerated(self.strength, config.seq_len)

    def tokens_to_regenerate(self, seed: int, config) -> "torch.Tensor":
        """bool [L]: the mask's tokens (inpainting) or the `strength` share drawn by `seed` (variations)."""
        if self.regenerate is not None:
            return self.regenerate
        return variation_tokens(seed, self.strength, config.seq_len)


__all__ += ["EditRequest"]
