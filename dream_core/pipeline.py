"""DreamPipeline: the one object the app and the scripts use (diffusers-style).

    pipe = DreamPipeline.from_pretrained()            # the bundled Shapes World model
    out = pipe("a large red circle in the middle", num_candidates=9, seed=0)
    out.images[0].save("x.png"); out.scores; out.chosen
    for event in pipe.stream(...): ...               # live candidates of one image for a UI
    pipe.stream(request, image_index=i, decode_image=True)   # image i of a request; its last event
                                                     # (an ImageEvent) carries the finished picture
    pipe.search(image, top_k=5)                      # reverse search over the caption bank
    pipe.caption_detail(caption)                     # what the bank shows beside a caption ("" if none)

A model directory holds config.json, model.safetensors (EMA weights), vae/ (diffusers
AutoencoderKL), text/ (the T5 encoder and its tokenizer, transformers format), captions.txt
(one caption a line, or `caption<TAB>detail`: dream_core.retrieval), README.md (the model card)
and optionally preview_vae/ (a diffusers AutoencoderTiny for cheap live previews). Nothing is ever
unpickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from .config import DreamConfig
from .editing import as_rgb_image, paste_back, resize_square
from .image_tokenizer import ImageTokenizer, save_preview_decoder, save_vae
from .model import DreamModel
from .request import MAX_CANDIDATES, MAX_SEED, EditRequest, GenerationRequest, SamplerSettings, check_int
from .retrieval import CaptionBank, check_caption_details, read_caption_bank, write_caption_bank
from .sampling import DecisionExplanation, DecodeState, EditStart, StepEvent, TextCondition, candidate_generators
from .semantic_decoding import (GenerationRun, Generated, Setting, is_reranker, rank_candidates, rows_needed,
                                semantic_decode, setting_outcome)
from .text import ClipTokenizer, ConditioningTextEncoder, validate_prompts

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "dream-shapes"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
PREVIEW_DIR = "preview_vae"  # optional AutoencoderTiny for live previews


@dataclass
class DreamOutput:
    images: list[Image.Image]
    scores: list[list[float | None]] = field(default_factory=list)  # per image, per candidate
    chosen: list[int] = field(default_factory=list)  # per image, the surviving candidate
    seeds: list[int] = field(default_factory=list)  # per image, the seed of candidate 0
    # per image, when asked for (explain=True): why the candidate won, at the (last) decision
    explanations: list[DecisionExplanation | None] = field(default_factory=list)
    regenerated: list[torch.Tensor] = field(default_factory=list)  # edits: per image, bool [L] tokens regenerated


@dataclass
class ImageEvent(StepEvent):
    """The "done" event of `DreamPipeline.stream(..., decode_image=True)`: the last step's event
    with the finished image and what made it (`explanation`: the last decision's, when asked)."""

    image: Image.Image | None = None  # decoded by the VAE; an edit's source pasted back when asked
    seed: int = 0  # the seed of this image's candidate 0 (candidate k used seed + k)
    regenerated: torch.Tensor | None = None  # edits: bool [L], the tokens decoded anew


def default_model_dir() -> Path:
    return Path(os.environ.get("DREAM_MODEL", DEFAULT_MODEL_DIR))


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but CUDA is not available")
    return device


def check_image_tokenizer(config: DreamConfig, tokenizer: ImageTokenizer) -> None:
    """The VAE in vae/ must be the one the weights were trained on: same latent channels and the
    same latent scale (config.vae_scaling_factor, which training copies from the VAE)."""
    if tokenizer.channels != config.vae_channels:
        raise ValueError(f"vae/ has {tokenizer.channels} latent channels but config.vae_channels={config.vae_channels}")
    expected, found = config.vae_scaling_factor, tokenizer.scaling_factor
    if not math.isclose(found, expected, rel_tol=1e-5):
        raise ValueError(f"vae/ scales latents by {found} but the weights were trained with "
                         f"config.vae_scaling_factor={expected}")


def image_to_tensor(image: Image.Image | np.ndarray, size: int) -> torch.Tensor:
    """PIL/array -> [1, 3, size, size] in [-1, 1]: centre crop to a square, area resize
    (`editing.resize_square`, the same for an edit's source image and its mask)."""
    image = resize_square(as_rgb_image(image), size)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    return x[None]


def tensor_to_images(x: torch.Tensor) -> list[Image.Image]:
    arr = ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


class DreamPipeline:
    def __init__(self, model: DreamModel, image_tokenizer: ImageTokenizer, text_encoder: ConditioningTextEncoder,
                 captions: Sequence[str] | None = None, model_card: str = "", path: Path | None = None,
                 vae_dir: Path | None = None, text_dir: Path | None = None,
                 caption_details: Sequence[str] | None = None) -> None:
        self.model = model.eval()
        self.config = model.config
        self.image_tokenizer = image_tokenizer
        self.text_encoder = text_encoder
        self.clip_tokenizer = ClipTokenizer(self.config.clip_context_length)
        self.captions = list(captions or [])
        # Shown beside each caption by reverse search, never embedded: the bank's cache key and
        # ranking are the captions' alone.
        self.caption_details = check_caption_details(self.captions, caption_details)
        self.model_card = model_card
        self.path = path
        self._directory_fingerprint: str | None = None  # weights_fingerprint's, read once
        self._vae_dir, self._text_dir = vae_dir, text_dir
        self._bank: CaptionBank | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> "DreamPipeline":
        device = resolve_device(device)
        self.model.to(device)
        self.image_tokenizer.to(device)
        self.text_encoder.to(device)
        self._bank = None
        return self

    # ----- save / load -----
    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, device: str | torch.device | None = "auto") -> "DreamPipeline":
        path = Path(path) if path is not None else default_model_dir()
        if not path.is_dir():
            raise ValueError(f"model directory {path} does not exist")
        pickles = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ValueError(f"model directory {path} contains pickle files ({', '.join(pickles)}); "
                             "only safetensors are loaded, never pickle")
        for name in ("config.json", "model.safetensors", "vae", "text"):
            if not (path / name).exists():
                raise ValueError(f"model directory {path} is missing {name}")
        config = DreamConfig.load(path / "config.json")
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path / "model.safetensors"))
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"{path / 'model.safetensors'} is not a readable safetensors file: {err}") from err
        model = DreamModel(config)
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        bad_shapes = [k for k in expected if k in state and state[k].shape != expected[k].shape]
        if missing or unexpected or bad_shapes:
            raise ValueError(f"model.safetensors does not match config.json: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}, wrong shapes {bad_shapes[:3]}")
        model.load_state_dict(state)
        preview = path / PREVIEW_DIR
        image_tokenizer = ImageTokenizer.from_pretrained(path / "vae", config.patch_size,
                                                         preview_path=preview if preview.exists() else None)
        check_image_tokenizer(config, image_tokenizer)
        text_encoder = ConditioningTextEncoder.from_pretrained(path / "text", config.t5_max_length)
        if text_encoder.dim != config.t5_dim:
            raise ValueError(f"text/ holds a T5 of width {text_encoder.dim} but config.t5_dim={config.t5_dim}")
        captions_file = path / "captions.txt"
        captions, details = read_caption_bank(captions_file) if captions_file.exists() else ([], [])
        card = (path / "README.md").read_text() if (path / "README.md").exists() else ""
        pipe = cls(model, image_tokenizer, text_encoder, captions, card, path, path / "vae", path / "text",
                   caption_details=details)
        return pipe.to(device)

    def save_pretrained(self, path: str | Path, model_card: str | None = None) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.config.save(path / "config.json")
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, str(path / "model.safetensors"))
        save_vae(self.image_tokenizer.vae, path / "vae")
        if self.image_tokenizer.preview_decoder is not None:
            save_preview_decoder(self.image_tokenizer.preview_decoder, path / PREVIEW_DIR)
        text_dir = path / "text"
        self.text_encoder.model.save_pretrained(text_dir, safe_serialization=True)
        self.text_encoder.tokenizer.save_pretrained(text_dir)
        write_caption_bank(path / "captions.txt", self.captions, self.caption_details)
        card = model_card if model_card is not None else self.model_card
        if card:
            (path / "README.md").write_text(card)

    # ----- generation -----
    def request(self, prompt: str | GenerationRequest, **settings: Any) -> GenerationRequest:
        """The validated request for this model (defaults resolved); ValueError names a bad field."""
        return GenerationRequest.from_settings(prompt, **settings).validate(self.config)

    def _seed(self, seed: int | None, generator: torch.Generator | None) -> int:
        if seed is not None:
            return seed
        if generator is not None:
            if not isinstance(generator, torch.Generator):
                raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
            return int(torch.randint(0, MAX_SEED + 1, (1,), generator=generator))
        return int(torch.randint(0, MAX_SEED + 1, (1,)))

    @torch.inference_mode()
    def _condition(self, prompt: str, negative_prompt: str, cfg: bool) -> tuple[TextCondition, torch.Tensor]:
        texts = [prompt, negative_prompt] if cfg else [prompt]
        hidden, mask = self.text_encoder(texts)
        with self.autocast():
            text = TextCondition.build(self.model, hidden.to(self.device), mask.to(self.device))
            text_emb = self.model.encode_text(self.clip_tokenizer([prompt]).to(self.device)).float()
        return text, text_emb

    def autocast(self):
        """The precision context the model runs under: bf16 autocast on CUDA, plain fp32 on CPU."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    def stream(self, prompt: str | GenerationRequest | EditRequest, generator: torch.Generator | None = None,
               should_stop: Callable[[], bool] | None = None, explain: bool = False, image_index: int = 0,
               decode_image: bool = False, **settings: Any) -> Iterator[StepEvent]:
        """Yield a StepEvent after every decoding step and at every SAD decision, for one image.
        `prompt` is a GenerationRequest, a validated EditRequest (inpainting, variations) or a prompt
        with its settings as keywords (see GenerationRequest: num_candidates, decision_step, seed, ...).

        The request's image `image_index` is decoded: its K candidates use seeds seed + i*K ...
        seed + i*K + K-1 (an edit's variation tokens are drawn with seed + i*K too), so streaming
        images 0 .. num_images-1 of a seeded request gives what `__call__` gives.
        `explain`: decision events carry a DecisionExplanation (see `explain_scores`).
        `decode_image`: the "done" event is an `ImageEvent` carrying the finished image."""
        if isinstance(prompt, EditRequest):
            if settings:
                raise ValueError(f"pass either an EditRequest or settings, not both (got {', '.join(settings)})")
            edit = prompt if prompt.source is not None else prompt.validate(self.config)
            req = edit.generation
        else:
            edit, req = None, self.request(prompt, **settings)
        image_index = check_int("image_index", image_index, 0, req.num_images - 1)
        seed = self._seed(req.seed, generator) + image_index * req.num_candidates
        start = None if edit is None else self.edit_start(edit, seed)
        done, explanation = None, None
        for event in self._stream(req, seed, should_stop, start=start, explain=explain):
            explanation = event.explanation or explanation
            if decode_image and event.kind == "done":
                done = event  # decoded below, once decoding has left its autocast region
                continue
            yield event
        if done is None:
            return
        image = (self.decode_tokens(done.tokens[:1])[0] if edit is None
                 else self.edit_result(edit, done.tokens[:1], start.regenerate))
        fields = {f.name: getattr(done, f.name) for f in dataclasses.fields(StepEvent)}
        fields["explanation"] = explanation
        yield ImageEvent(**fields, image=image, seed=seed, regenerated=None if start is None else start.regenerate)

    def _stream(self, req: GenerationRequest, base_seed: int, should_stop: Callable[[], bool] | None = None,
                start: EditStart | None = None, explain: bool = False) -> Iterator[StepEvent]:
        text, text_emb = self._condition(req.prompt, req.negative_prompt, req.guidance_scale != 1.0)
        gens = candidate_generators(base_seed, req.num_candidates)
        with self.autocast():
            yield from semantic_decode(self.model, text, text_emb, gens, req.num_inference_steps, req.decision_steps,
                                       req.guidance_scale, req.guidance_schedule, req.temperature, req.head_steps,
                                       req.head_sampler, should_stop=should_stop, device=self.device,
                                       shared_order=req.shared_order, start=start, explain=explain,
                                       num_kept=req.num_kept)

    def __call__(self, prompt: str | GenerationRequest, generator: torch.Generator | None = None,
                 explain: bool = False, **settings: Any) -> DreamOutput:
        """Generate `num_images` images; image i uses seeds seed + i*K ... seed + i*K + K-1 for its
        K candidates. `prompt` is a GenerationRequest or a prompt with settings as keywords."""
        req = self.request(prompt, **settings)
        return self._run(req, self._seed(req.seed, generator), explain)

    def _run(self, req: GenerationRequest, base_seed: int, explain: bool, edit: EditRequest | None = None) -> DreamOutput:
        req = dataclasses.replace(req, seed=base_seed)
        target = req if edit is None else dataclasses.replace(edit, generation=req)
        out = DreamOutput(images=[])
        for i in range(req.num_images):
            for last in self.stream(target, explain=explain, image_index=i, decode_image=True):
                pass
            out.images.append(last.image)
            out.scores.append(list(last.scores))
            out.chosen.append(last.candidate_ids[0])
            out.seeds.append(last.seed)
            out.explanations.append(last.explanation)
            if last.regenerated is not None:
                out.regenerated.append(last.regenerated.clone())
        return out

    # ----- editing (masked decoding from kept tokens) -----
    def edit_request(self, image: Image.Image | np.ndarray, prompt: str | GenerationRequest, mask: Any = None,
                     strength: float | None = None, paste_back: bool = True,
                     max_candidates: int = MAX_CANDIDATES, **settings: Any) -> EditRequest:
        """The validated edit for this model (see EditRequest); ValueError names a bad field."""
        generation = GenerationRequest.from_settings(prompt, **settings)
        return EditRequest(image, generation, mask=mask, strength=strength, paste_back=paste_back).validate(
            self.config, max_candidates)

    @torch.inference_mode()
    def encode_image_tokens(self, image: Image.Image | np.ndarray) -> torch.Tensor:
        """An image (centre-cropped and resized to the model's size) -> its VAE tokens [1, L, C],
        float32: the posterior mean, computed outside autocast (the kept tokens of an edit)."""
        x = image_to_tensor(image, self.config.image_size).to(self.device)
        return self.image_tokenizer.encode(x, sample=False).float()

    def edit_start(self, edit: EditRequest, seed: int) -> EditStart:
        """Where decoding of a validated edit starts for candidate seed `seed` (image i: seed + i*K)."""
        return EditStart(self.encode_image_tokens(edit.source)[0], edit.tokens_to_regenerate(seed, self.config))

    def edit_result(self, edit: EditRequest, tokens: torch.Tensor, regenerate: torch.Tensor) -> Image.Image:
        """The finished edit: tokens [1, L, C] decoded, the source pasted back outside the
        regenerated patches when `edit.paste_back`."""
        image = self.decode_tokens(tokens[:1])[0]
        return paste_back(image, edit.source, regenerate) if edit.paste_back else image

    def stream_edit(self, edit: EditRequest, generator: torch.Generator | None = None,
                    should_stop: Callable[[], bool] | None = None, explain: bool = False) -> Iterator[StepEvent]:
        """`stream` for a validated edit (one image): events of the regenerated tokens' decoding,
        the kept ones decided from the start."""
        return self.stream(edit, generator, should_stop, explain)

    def inpaint(self, image: Image.Image | np.ndarray, mask: Any, prompt: str | GenerationRequest,
                paste_back: bool = True, generator: torch.Generator | None = None, explain: bool = False,
                **settings: Any) -> DreamOutput:
        """Regenerate the masked part of `image` for `prompt`, keeping every other token as the VAE
        encodes it (posterior mean), with the same sampler, CFG, K candidates and SAD (scored on the
        whole image) as text-to-image. `mask`: the size of `image`, nonzero = regenerate; any token
        whose patch it touches is regenerated. A mask covering everything is text-to-image (same
        seed, same tokens). An image of another size or shape is centre-cropped and resized to the
        model's (the mask likewise). `paste_back`: pixels outside the regenerated patches are the
        source's (hard paste). Settings as for `__call__`; num_inference_steps <= tokens regenerated."""
        edit = self.edit_request(image, prompt, mask=mask, paste_back=paste_back, **settings)
        return self._run(edit.generation, self._seed(edit.generation.seed, generator), explain, edit)

    def variations(self, image: Image.Image | np.ndarray, prompt: str | GenerationRequest | None = None,
                   strength: float = 0.5, paste_back: bool = False, generator: torch.Generator | None = None,
                   explain: bool = False, **settings: Any) -> DreamOutput:
        """Variations of `image`: ceil(strength * L) tokens, chosen at random by the seed, are
        regenerated, the others kept. `prompt=None`: the best caption of the model's caption bank
        for the image (reverse search). `paste_back` (off by default): keep the source's pixels
        outside the regenerated patches. Otherwise as `inpaint`."""
        if prompt is None:
            if not self.captions:
                raise ValueError("prompt is needed for variations with this model: it has no caption bank to "
                                 "describe the image")
            prompt = self.search(as_rgb_image(image), top_k=1)[0][0]
        edit = self.edit_request(image, prompt, strength=strength, paste_back=paste_back, **settings)
        return self._run(edit.generation, self._seed(edit.generation.seed, generator), explain, edit)

    # ----- batched generation (evaluation) -----
    def generate_batch(self, prompts: Sequence[str], seeds: Sequence[int], settings: Sequence[Setting],
                       sampler: SamplerSettings | None = None, batch_size: int = 0, reranker: Any = None,
                       progress: bool = False) -> GenerationRun:
        """One image per prompt for every setting, the settings sharing the candidates' decoding.

        For prompt i with seed s_i this gives what `pipe(prompt_i, num_candidates=K,
        decision_step=d, num_kept=..., seed=s_i)` gives (up to floating-point batch effects):
        candidate k of prompt i is seeded s_i + k, rows never interact, and SAD keeps the
        best-scored of the first K candidates at step d (in stages: at each of its steps, among
        those it kept before). So one decoding trunk of K_max candidates per prompt serves every
        setting: all rows run together up to the first decision step, and after each decision only
        the rows some setting still needs run on.

        Args:
            seeds: per-prompt seeds.
            sampler: what every prompt shares (steps, CFG, ...); validated as a request would be.
            batch_size: prompts per batch (0 = as many as fit `default_batch_rows`).
            reranker: a `semantic_decoding.Reranker` (`rerankers.ExternalReranker`: open_clip; `DreamReranker`:
                another DREAM model directory), for `Setting(rerank=True)`.
        """
        sampler = sampler or SamplerSettings()
        prompts, req = self._validate_batch(prompts, seeds, settings, sampler, reranker)
        settings = list(dict.fromkeys(settings))
        kmax = max(s.num_candidates for s in settings)
        if batch_size <= 0:
            batch_size = max(1, self.default_batch_rows() // kmax)
        results = {s: Generated() for s in settings}
        row_steps = 0
        start = time.perf_counter()
        chunks = range(0, len(prompts), batch_size)
        if progress:
            from tqdm import tqdm

            chunks = tqdm(chunks, desc="generating", unit="batch", file=sys.stderr)
        for i in chunks:
            part, spent = self._generate_chunk(prompts[i:i + batch_size], seeds[i:i + batch_size], settings,
                                               req, kmax, reranker)
            row_steps += spent
            for s in settings:
                results[s].images += part[s].images
                results[s].chosen += part[s].chosen
                results[s].scores += part[s].scores
        return GenerationRun(results, time.perf_counter() - start, row_steps)

    def default_batch_rows(self) -> int:
        """Candidate rows decoded together: 4096 (GPU) / 256 (CPU) for 16-token models, fewer for
        longer sequences so activations stay about the same size."""
        budget = 65536 if self.device.type == "cuda" else 4096
        return max(1, budget // self.config.seq_len)

    def _validate_batch(self, prompts, seeds, settings, sampler, reranker) -> tuple[list[str], GenerationRequest]:
        prompts = validate_prompts(list(prompts), "prompts")
        if len(seeds) != len(prompts):
            raise ValueError(f"seeds ({len(seeds)}) and prompts ({len(prompts)}) differ in length")
        if not settings:
            raise ValueError("settings must not be empty")
        req = None
        for s in settings:
            if s.rerank and reranker is None:
                raise ValueError(f"setting {s.name} needs an external reranker")
            if s.rerank and not is_reranker(reranker):
                raise ValueError(f"reranker must have a scores(images, prompt) method (a semantic_decoding.Reranker), "
                                 f"got {type(reranker).__name__}")
            if s.num_candidates > 1 and not s.rerank and s.decision_step is None:
                raise ValueError(f"setting {s.name} needs a decision_step")
            # The request's own checks, so a sweep rejects exactly what a single call would.
            req = sampler.request(prompts[0], s.num_candidates, None if s.rerank else s.decision_step,
                                  num_kept=None if s.rerank else s.num_kept).validate(self.config)
        for seed in seeds:
            check_int("seed", seed, 0, MAX_SEED)
        return prompts, req

    @torch.inference_mode()
    def batch_conditions(self, prompts: Sequence[str], negative_prompt: str, cfg: bool,
                         candidates_per_prompt: int) -> tuple[TextCondition, torch.Tensor]:
        """The text side of a batch of prompts, computed once per prompt (T5 outside autocast, the
        aligner and the decoder's cross-attention keys/values inside): the `TextCondition` of the
        candidate rows, prompt-major (`candidates_per_prompt` rows per prompt; with `cfg` the negative
        prompt is the unconditional side), and the prompts' joint-space embeddings [n, E]."""
        model, device, n = self.model, self.device, len(prompts)
        hidden, t5_mask = self.text_encoder(list(prompts) + ([negative_prompt] if cfg else []))
        hidden, t5_mask = hidden.to(device), t5_mask.to(device)
        with self.autocast():
            kv = model.decoder.text_kv(model.align_text(hidden, t5_mask))
            text_emb = model.encode_text(self.clip_tokenizer(list(prompts)).to(device)).float()
        text = TextCondition([(k[:n], v[:n]) for k, v in kv], t5_mask[:n],
                             row_prompt=torch.arange(n).repeat_interleave(candidates_per_prompt))
        if cfg:
            text.kv_uncond = [(k[n:n + 1], v[n:n + 1]) for k, v in kv]
            text.mask_uncond = t5_mask[n:n + 1]
        return text, text_emb

    @torch.inference_mode()
    def _generate_chunk(self, prompts: list[str], seeds: Sequence[int], settings: list[Setting],
                        sp: GenerationRequest, kmax: int, reranker: Any) -> tuple[dict[Setting, Generated], int]:
        n, steps = len(prompts), sp.num_inference_steps
        sad_steps = sorted({d for s in settings if s.num_candidates > 1 for d in s.decision_steps})

        # 1. Text: once per prompt. Candidate rows are prompt-major, candidate k of prompt i seeded seeds[i] + k.
        text, text_emb = self.batch_conditions(prompts, sp.negative_prompt, sp.guidance_scale != 1.0, kmax)
        gens = [g for s in seeds for g in candidate_generators(int(s), kmax)]
        scores: dict[int, torch.Tensor] = {}  # step -> [n, kmax], NaN where a row was pruned before
        alive = [(0, n * kmax)]  # (step, rows decoding from there on)

        def keep(state: DecodeState, step_scores: torch.Tensor) -> Sequence[int]:
            """Only the rows some setting still needs after this decision."""
            full = torch.full((n * kmax,), float("nan"))
            full[torch.tensor(state.candidate_ids)] = step_scores.float()
            scores[state.step] = full.view(n, kmax)
            needed = set(rows_needed(settings, scores, n, kmax, state.step))
            kept = [row for row, cid in enumerate(state.candidate_ids) if cid in needed]
            alive.append((state.step, len(kept)))
            return kept

        # 2. Decode, scoring at every decision step.
        with self.autocast():
            for done in semantic_decode(self.model, text, text_emb[text.row_prompt.to(self.device)], gens, steps,
                                        sad_steps, sp.guidance_scale, sp.guidance_schedule, sp.temperature,
                                        sp.head_steps, sp.head_sampler, device=self.device,
                                        shared_order=sp.shared_order, keep=keep, order_groups=n, step_events=False):
                pass
        bounds = [step for step, _ in alive[1:]] + [steps]
        spent = sum((end - step) * rows for (step, rows), end in zip(alive, bounds))  # decoder forwards x rows

        # 3. Decode the surviving rows to pixels and assemble every setting.
        final: dict[tuple[int, int], Image.Image] = {}
        for i in range(0, len(done.candidate_ids), 256):
            images = self.decode_tokens(done.tokens[i:i + 256])
            for cid, im in zip(done.candidate_ids[i:i + 256], images):
                final[divmod(cid, kmax)] = im
        out = {s: Generated() for s in settings}
        for s in settings:
            res = out[s]
            for p in range(n):
                k = s.num_candidates
                if k == 1:
                    res.chosen.append(0)
                    res.scores.append([])
                elif s.rerank:
                    sc = reranker.scores([final[(p, c)] for c in range(k)], prompts[p])
                    res.chosen.append(rank_candidates(sc)[0])
                    res.scores.append([float(v) for v in sc])
                else:
                    kept, last_scores = setting_outcome(s, scores, p)
                    res.chosen.append(kept[0])
                    res.scores.append(last_scores)
                res.images.append(final[(p, res.chosen[-1])])
        return out, spent

    @torch.inference_mode()
    def decode_tokens(self, tokens: torch.Tensor) -> list[Image.Image]:
        """Latent tokens [R, L, C] -> PIL images."""
        return tensor_to_images(self.image_tokenizer.decode(tokens.to(self.device)))

    def decode_previews(self, tokens: torch.Tensor) -> list[Image.Image]:
        """Latent tokens [R, L, C] -> rough PIL images for live previews: the preview decoder
        (preview_vae/) when the model has one, else the full VAE."""
        return tensor_to_images(self.image_tokenizer.decode_preview(tokens.to(self.device)))

    # ----- understanding -----
    @torch.inference_mode()
    def embed_images(self, images: Sequence[Image.Image | np.ndarray]) -> torch.Tensor:
        if isinstance(images, (Image.Image, np.ndarray)):
            images = [images]
        if not images:
            raise ValueError("image list must not be empty")
        x = torch.cat([image_to_tensor(im, self.config.image_size) for im in images]).to(self.device)
        with self.autocast():
            tokens = self.image_tokenizer.encode(x, sample=False)
            return self.model.encode_image(tokens).float()

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        out = []
        with self.autocast():
            for i in range(0, len(texts), batch_size):
                out.append(self.model.encode_text(self.clip_tokenizer(texts[i:i + batch_size]).to(self.device)).float())
        return torch.cat(out)

    def caption_bank(self, captions: Sequence[str] | None = None) -> CaptionBank:
        """The default bank (embeddings cached on disk, keyed by weights and captions) or a custom one."""
        if captions is None:
            if self._bank is None:
                if not self.captions:
                    raise ValueError("this model has no caption bank; pass captions=[...]")
                self._bank = CaptionBank.build(self.embed_texts, self.weights_fingerprint(), self.captions)
            return self._bank
        captions = validate_prompts(list(captions), "captions")
        return CaptionBank.build(self.embed_texts, self.weights_fingerprint(), captions)

    def search(self, image: Image.Image | np.ndarray, top_k: int = 5,
               captions: Sequence[str] | None = None) -> list[tuple[str, float]]:
        """Reverse search: the top-k captions of the bank for an image, with cosine scores."""
        top_k = check_int("top_k", top_k, 1, 1000)
        return self.caption_bank(captions).search(self.embed_images([image])[0], top_k)

    def caption_detail(self, caption: str) -> str:
        """The detail the model's bank shows beside `caption` (captions.txt's `caption<TAB>detail`,
        e.g. the emoji model's emoji and keywords); "" where it has none or is not in the bank."""
        try:
            return self.caption_details[self.captions.index(caption)]
        except (ValueError, IndexError):
            return ""

    @torch.inference_mode()
    def zero_shot(self, image: Image.Image | np.ndarray, labels: Sequence[str],
                  template: str = "{}") -> list[tuple[str, float]]:
        """Zero-shot classification: softmax over labels (with the model's temperature), best first."""
        labels = validate_prompts(list(labels), "labels")
        if "{}" not in template:
            raise ValueError("template must contain {} where the label goes")
        img = self.embed_images([image])[0]
        txt = self.embed_texts([template.format(lab) for lab in labels])
        logits = self.model.clamped_logit_scale().exp().float().cpu() * (txt.cpu() @ img.cpu())
        probs = logits.softmax(dim=0)
        order = probs.argsort(descending=True).tolist()
        return [(labels[i], float(probs[i])) for i in order]

    def weights_fingerprint(self) -> str:
        """Identifies the weights for on-disk caches and results files (`model_fingerprint` of the
        model directory, hashed once: every search with a custom bank asks for it; a model without a
        directory hashes the first bytes of each of its tensors)."""
        from .fingerprint import model_fingerprint

        if self.path is not None and (self.path / "model.safetensors").exists():
            if self._directory_fingerprint is None:
                self._directory_fingerprint = model_fingerprint(self.path)
            return self._directory_fingerprint
        h = hashlib.sha256(json.dumps(self.config.to_dict(), sort_keys=True).encode())
        for v in self.model.state_dict().values():
            h.update(v.detach().float().cpu().numpy().tobytes()[:4096])
        return h.hexdigest()[:16]
