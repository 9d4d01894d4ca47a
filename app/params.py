"""Generation settings and the parameter record stored in every PNG the app writes.

One record per image, written twice into the PNG: as JSON under the text key "dream-studio"
(everything, machine-readable) and as an AUTOMATIC1111-style "parameters" string (what other
image browsers read). Reading accepts either, JSON first.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from dream_core.masking import fraction_decided
from dream_core.request import (APP_DEFAULT_CANDIDATES, APP_MAX_CANDIDATES, DEFAULT_GUIDANCE_SCALE,
                                DEFAULT_GUIDANCE_SCHEDULE, DEFAULT_STEPS, DEFAULT_TEMPERATURE, GenerationRequest)

PARAMS_KEY = "dream-studio"
INFOTEXT_KEY = "parameters"
RECORD_VERSION = 1


def _whole(value: Any) -> Any:
    """Gradio sliders and JSON clients send 4.0 for 4: an integral float becomes that integer;
    anything else is passed on unchanged for the request to accept or refuse (2.5 is refused)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


@dataclass
class GenerationSettings:
    """What a user asks for in the app. `seed=None` means "draw a random seed" (the drawn seed is
    recorded); `decision_step=None`, `num_inference_steps=None`, `head_steps=None` and
    `head_sampler=None` mean the model's defaults.
    Checked by dream_core's GenerationRequest (the one source of every limit)."""

    prompt: str
    negative_prompt: str = ""
    num_candidates: int = APP_DEFAULT_CANDIDATES
    decision_step: int | None = None
    num_inference_steps: int | None = None
    head_steps: int | None = GenerationRequest.head_steps  # None: the model's default
    head_sampler: str | None = GenerationRequest.head_sampler  # None: the model's default
    guidance_scale: float | None = GenerationRequest.guidance_scale  # None: the model's default
    guidance_schedule: str = GenerationRequest.guidance_schedule
    temperature: float | None = GenerationRequest.temperature  # None: the model's default
    seed: int | None = None
    num_images: int = GenerationRequest.num_images

    def request(self) -> GenerationRequest:
        """The engine's request for these settings (widget floats such as 4.0 read as integers)."""
        return GenerationRequest(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt if self.negative_prompt is not None else "",
            num_candidates=_whole(self.num_candidates), decision_step=_whole(self.decision_step),
            num_inference_steps=_whole(self.num_inference_steps), guidance_scale=self.guidance_scale,
            guidance_schedule=self.guidance_schedule, temperature=self.temperature,
            head_steps=_whole(self.head_steps), head_sampler=self.head_sampler or None, seed=_whole(self.seed),
            num_images=_whole(self.num_images))

    def validated(self, config) -> "GenerationSettings":
        """Checked against the model `config` by the engine's request (app limit on K: the
        request's APP_MAX_CANDIDATES), defaults resolved; messages name the field."""
        return GenerationSettings.from_request(self.request().validate(config, max_candidates=APP_MAX_CANDIDATES))

    @classmethod
    def from_request(cls, r: GenerationRequest) -> "GenerationSettings":
        """The settings of a validated request (an edit's, whose limits count regenerated tokens)."""
        return GenerationSettings(
            prompt=r.prompt, negative_prompt=r.negative_prompt, num_candidates=r.num_candidates,
            decision_step=r.decision_step, num_inference_steps=r.num_inference_steps, head_steps=r.head_steps,
            head_sampler=r.head_sampler, guidance_scale=r.guidance_scale, guidance_schedule=r.guidance_schedule,
            temperature=r.temperature, seed=r.seed, num_images=r.num_images)


@dataclass
class ImageRecord:
    """Everything needed to understand and reproduce one generated image."""

    prompt: str
    negative_prompt: str
    num_candidates: int
    decision_step: int | None
    fraction_decided: float | None  # share of tokens decided when the candidates were scored
    num_inference_steps: int
    head_steps: int | None  # None: a record without it (another tool's): the model's default
    guidance_scale: float
    guidance_schedule: str
    temperature: float
    seed: int  # seed of candidate 0 of this image; candidate k used seed + k
    chosen_candidate: int
    chosen_seed: int  # decode with num_candidates=1 and this seed to get the same image alone
    candidate_scores: list[float | None]
    model: str
    width: int
    height: int
    image_index: int = 0
    # The diffusion head's sampler; None in records written before there was a choice (and in
    # other tools'), which re-run with the model's default.
    head_sampler: str | None = None
    created: str = ""
    app: str = PARAMS_KEY
    version: int = RECORD_VERSION
    extra: dict = field(default_factory=dict)
    # Edits (absent from text-to-image records and from records written before editing existed):
    edit: str | None = None  # "inpaint" | "variations"
    source_sha256: str | None = None  # of the source image's pixels as uploaded (see app.images.image_sha256)
    strength: float | None = None  # variations: share of tokens regenerated
    regenerated_tokens: list[int] | None = None  # raster indices of the tokens decoded anew
    paste_back: bool | None = None

    @classmethod
    def build(cls, settings: GenerationSettings, seed: int, chosen: int, scores: list[float | None],
              model: str, size: tuple[int, int], seq_len: int, image_index: int = 0, created: str = "") -> "ImageRecord":
        share = None
        if settings.decision_step is not None:
            share = round(fraction_decided(settings.decision_step, settings.num_inference_steps, seq_len), 4)
        return cls(
            prompt=settings.prompt, negative_prompt=settings.negative_prompt,
            num_candidates=settings.num_candidates, decision_step=settings.decision_step, fraction_decided=share,
            num_inference_steps=settings.num_inference_steps, head_steps=settings.head_steps,
            head_sampler=settings.head_sampler, guidance_scale=settings.guidance_scale,
            guidance_schedule=settings.guidance_schedule,
            temperature=settings.temperature, seed=seed, chosen_candidate=chosen, chosen_seed=seed + chosen,
            candidate_scores=[None if s is None else round(float(s), 6) for s in scores], model=model,
            width=size[0], height=size[1], image_index=image_index, created=created,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ImageRecord":
        if not isinstance(data, dict):
            raise ValueError("parameters must be a JSON object")
        known = {f.name for f in fields(cls)}
        missing = [n for n in ("prompt", "seed") if n not in data]
        if missing:
            raise ValueError(f"parameters lack {', '.join(missing)}")
        # A record written by another tool may lack sampler settings: the engine's defaults then
        # (steps: the usual 64, cut to the model's tokens when sent to Generate; the head's steps
        # and sampler: the model's, left None).
        defaults = dict(negative_prompt="", num_candidates=1, decision_step=None, fraction_decided=None,
                        num_inference_steps=DEFAULT_STEPS, head_steps=None,
                        guidance_scale=DEFAULT_GUIDANCE_SCALE, guidance_schedule=DEFAULT_GUIDANCE_SCHEDULE,
                        temperature=DEFAULT_TEMPERATURE, chosen_candidate=0, chosen_seed=None, candidate_scores=[],
                        model="", width=0, height=0)
        values = {**defaults, **{k: v for k, v in data.items() if k in known}}
        if values["chosen_seed"] is None:
            values["chosen_seed"] = int(values["seed"]) + int(values["chosen_candidate"] or 0)
        extra = data.get("extra") if isinstance(data.get("extra"), dict) else {}
        values["extra"] = {**extra, **{k: v for k, v in data.items() if k not in known}}
        return cls(**values)

    def settings(self) -> GenerationSettings:
        """The settings that regenerate this image (image_index folded into the seed)."""
        return GenerationSettings(
            prompt=self.prompt, negative_prompt=self.negative_prompt, num_candidates=self.num_candidates,
            decision_step=self.decision_step, num_inference_steps=self.num_inference_steps,
            head_steps=self.head_steps, head_sampler=self.head_sampler, guidance_scale=self.guidance_scale,
            guidance_schedule=self.guidance_schedule, temperature=self.temperature, seed=self.seed, num_images=1,
        )

    def infotext(self) -> str:
        """AUTOMATIC1111-style 'parameters' text: prompt, negative prompt line, then key: value pairs."""
        pairs = [
            ("Steps", self.num_inference_steps),
            ("Sampler", "DREAM SAD" if self.num_candidates > 1 else "DREAM MAR"),
            ("CFG scale", self.guidance_scale),
            ("CFG schedule", self.guidance_schedule),
            ("Seed", self.seed),
            ("Size", f"{self.width}x{self.height}"),
            ("Model", self.model),
            ("Candidates", self.num_candidates),
        ]
        if self.decision_step is not None:
            share = f" ({100 * self.fraction_decided:.1f}% decided)" if self.fraction_decided is not None else ""
            pairs.append(("Decision step", f"{self.decision_step}{share}"))
        if self.head_steps is not None:
            pairs.append(("Head steps", self.head_steps))
        if self.head_sampler is not None:
            pairs.append(("Head sampler", self.head_sampler))
        pairs += [
            ("Temperature", self.temperature),
            ("Chosen candidate", self.chosen_candidate),
            ("Chosen seed", self.chosen_seed),
        ]
        if any(s is not None for s in self.candidate_scores):
            pairs.append(("Candidate scores", json.dumps(self.candidate_scores)))
        if self.edit:
            pairs += [("Edit", self.edit), ("Source SHA256", self.source_sha256)]
            if self.strength is not None:
                pairs.append(("Strength", self.strength))
            if self.regenerated_tokens is not None:
                pairs.append(("Regenerated tokens", json.dumps(self.regenerated_tokens)))
            pairs.append(("Paste back", self.paste_back))
        body = ", ".join(f"{k}: {_quote(v)}" for k, v in pairs)
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        lines.append(body)
        return "\n".join(lines)


def _quote(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if ("," in text or ":" in text or '"' in text) else text


_PAIR = re.compile(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def parse_infotext(text: str) -> dict[str, Any]:
    """Inverse of ImageRecord.infotext, tolerant of A1111 texts (unknown keys are kept in `extra`)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("empty parameters text")
    lines = text.strip().split("\n")
    last = lines[-1]
    pairs = {m.group(1).strip(): m.group(2) for m in _PAIR.finditer(last)} if "Steps:" in last else {}
    body = lines[:-1] if pairs else lines
    prompt_lines, negative = [], ""
    for i, line in enumerate(body):
        if line.startswith("Negative prompt:"):
            negative = "\n".join([line[len("Negative prompt:"):].strip()] + body[i + 1:])
            break
        prompt_lines.append(line)
    out: dict[str, Any] = {"prompt": "\n".join(prompt_lines).strip(), "negative_prompt": negative.strip()}

    def value(key: str) -> str | None:
        v = pairs.get(key)
        if v is None:
            return None
        return json.loads(v) if v.startswith('"') else v.strip()

    conv = {"Steps": ("num_inference_steps", int), "CFG scale": ("guidance_scale", float),
            "CFG schedule": ("guidance_schedule", str), "Seed": ("seed", int), "Model": ("model", str),
            "Candidates": ("num_candidates", int), "Head steps": ("head_steps", int),
            "Head sampler": ("head_sampler", str),
            "Temperature": ("temperature", float), "Chosen candidate": ("chosen_candidate", int),
            "Chosen seed": ("chosen_seed", int), "Edit": ("edit", str), "Source SHA256": ("source_sha256", str),
            "Strength": ("strength", float)}
    for key, (name, typ) in conv.items():
        v = value(key)
        if v is not None:
            try:
                out[name] = typ(v)
            except ValueError:
                pass
    v = value("Decision step")
    if v:
        m = re.match(r"(\d+)", v)
        out["decision_step"] = int(m.group(1)) if m else None
    v = value("Size")
    if v and re.fullmatch(r"\d+x\d+", v):
        out["width"], out["height"] = (int(x) for x in v.split("x"))
    for key, name in (("Candidate scores", "candidate_scores"), ("Regenerated tokens", "regenerated_tokens")):
        v = value(key)
        if v:
            try:
                out[name] = json.loads(v)
            except json.JSONDecodeError:
                pass
    v = value("Paste back")
    if v in ("True", "False"):
        out["paste_back"] = v == "True"
    known = {"Steps", "Sampler", "CFG scale", "CFG schedule", "Seed", "Size", "Model", "Candidates", "Decision step",
             "Head steps", "Head sampler", "Temperature", "Chosen candidate", "Chosen seed", "Candidate scores", "Edit",
             "Source SHA256", "Strength", "Regenerated tokens", "Paste back"}
    extra = {k: value(k) for k in pairs if k not in known}
    if extra:
        out["extra"] = extra
    return out
