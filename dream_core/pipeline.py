"""DreamPipeline: the one object the app and the scripts use (diffusers-style).

    pipe = DreamPipeline.from_pretrained()            # the bundled Shapes World model
    out = pipe("a large red circle in the middle", num_candidates=9, seed=0)
    out.images[0].save("x.png"); out.scores; out.chosen
    for event in pipe.stream(...): ...               # live candidates for a UI
    pipe.search(image, top_k=5)                      # reverse search over the caption bank

A model directory holds config.json, model.safetensors (EMA weights), vae/ (diffusers
AutoencoderKL), text/ (the T5 encoder and its tokenizer, transformers format), captions.txt,
README.md (the model card) and optionally preview_vae/ (a diffusers AutoencoderTiny for cheap
live previews). Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from .config import DreamConfig
from .image_tokenizer import ImageTokenizer, save_preview_decoder
from .model import DreamModel
from .retrieval import CaptionBank
from .sampling import GUIDANCE_SCHEDULES, StepEvent, TextCondition, candidate_generators
from .semantic_decoding import semantic_decode, validate_decision_steps
from .text import ClipTokenizer, ConditioningTextEncoder, validate_prompts

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "dream-shapes"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
PREVIEW_DIR = "preview_vae"  # optional AutoencoderTiny for live previews
MAX_CANDIDATES = 64


@dataclass
class DreamOutput:
    images: list[Image.Image]
    scores: list[list[float | None]] = field(default_factory=list)  # per image, per candidate
    chosen: list[int] = field(default_factory=list)  # per image, the surviving candidate
    seeds: list[int] = field(default_factory=list)  # per image, the seed of candidate 0


def default_model_dir() -> Path:
    return Path(os.environ.get("DREAM_MODEL", DEFAULT_MODEL_DIR))


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but CUDA is not available")
    return device


def _check_int(name: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be in [{low}, {high if high is not None else 'inf'}], got {value}")
    return int(value)


def _check_float(name: str, value, low: float, high: float | None = None, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if value < low or (low_open and value == low) or (high is not None and value > high):
        raise ValueError(f"{name} must be in {'(' if low_open else '['}{low}, {high if high is not None else 'inf'}], got {value}")
    return value


def image_to_tensor(image: Image.Image | np.ndarray, size: int) -> torch.Tensor:
    """PIL/array -> [1, 3, size, size] in [-1, 1]: centre crop to a square, area resize."""
    if isinstance(image, np.ndarray):
        if image.ndim not in (2, 3):
            raise ValueError(f"image array must be HxW or HxWxC, got shape {image.shape}")
        image = Image.fromarray(image.astype(np.uint8) if image.dtype != np.uint8 else image)
    if not isinstance(image, Image.Image):
        raise ValueError(f"image must be a PIL image or a numpy array, got {type(image).__name__}")
    image = image.convert("RGB")
    w, h = image.size
    s = min(w, h)
    image = image.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    if s != size:
        image = image.resize((size, size), Image.BOX if s > size else Image.BICUBIC)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    return x[None]


def tensor_to_images(x: torch.Tensor) -> list[Image.Image]:
    arr = ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


class DreamPipeline:
    def __init__(self, model: DreamModel, image_tokenizer: ImageTokenizer, text_encoder: ConditioningTextEncoder,
                 captions: Sequence[str] | None = None, model_card: str = "", path: Path | None = None,
                 vae_dir: Path | None = None, text_dir: Path | None = None) -> None:
        self.model = model.eval()
        self.config = model.config
        self.image_tokenizer = image_tokenizer
        self.text_encoder = text_encoder
        self.clip_tokenizer = ClipTokenizer(self.config.clip_context_length)
        self.captions = list(captions or [])
        self.model_card = model_card
        self.path = path
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
        text_encoder = ConditioningTextEncoder.from_pretrained(path / "text", config.t5_max_length)
        if text_encoder.dim != config.t5_dim:
            raise ValueError(f"text/ holds a T5 of width {text_encoder.dim} but config.t5_dim={config.t5_dim}")
        captions_file = path / "captions.txt"
        captions = [c.strip() for c in captions_file.read_text().splitlines() if c.strip()] if captions_file.exists() else []
        card = (path / "README.md").read_text() if (path / "README.md").exists() else ""
        pipe = cls(model, image_tokenizer, text_encoder, captions, card, path, path / "vae", path / "text")
        return pipe.to(device)

    def save_pretrained(self, path: str | Path, model_card: str | None = None) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.config.save(path / "config.json")
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, str(path / "model.safetensors"))
        self.image_tokenizer.vae.save_pretrained(path / "vae", safe_serialization=True)
        if self.image_tokenizer.preview_decoder is not None:
            save_preview_decoder(self.image_tokenizer.preview_decoder, path / PREVIEW_DIR)
        text_dir = path / "text"
        self.text_encoder.model.save_pretrained(text_dir, safe_serialization=True)
        self.text_encoder.tokenizer.save_pretrained(text_dir)
        (path / "captions.txt").write_text("\n".join(self.captions) + ("\n" if self.captions else ""))
        card = model_card if model_card is not None else self.model_card
        if card:
            (path / "README.md").write_text(card)

    # ----- generation -----
    def _validate(self, prompt, num_candidates, decision_step, num_inference_steps, guidance_scale,
                  guidance_schedule, temperature, negative_prompt, head_steps, num_images):
        prompt = validate_prompts(prompt, "prompt")
        if len(prompt) != 1:
            raise ValueError("prompt must be a single string (call once per prompt)")
        num_candidates = _check_int("num_candidates", num_candidates, 1, MAX_CANDIDATES)
        if num_inference_steps is None:  # 64 as MAR/DREAM, or one step per token for short sequences
            num_inference_steps = min(64, self.config.seq_len)
        num_inference_steps = _check_int("num_inference_steps", num_inference_steps, 1, self.config.seq_len)
        if decision_step is None and num_candidates > 1:
            from .sampling import default_decision_step

            if num_inference_steps < 2:
                raise ValueError("num_candidates > 1 needs num_inference_steps >= 2 (a decision step before the end)")
            decision_step = default_decision_step(self.config, num_inference_steps)
        # Checked even for K = 1 (where it is a no-op), so an impossible value never passes silently.
        decisions = validate_decision_steps(decision_step, num_inference_steps)
        if num_candidates == 1:
            decisions = []
        guidance_scale = _check_float("guidance_scale", guidance_scale, 0.0, 100.0)
        if guidance_schedule not in GUIDANCE_SCHEDULES:
            raise ValueError(f"guidance_schedule must be one of {GUIDANCE_SCHEDULES}, got {guidance_schedule!r}")
        temperature = _check_float("temperature", temperature, 0.0, 10.0)
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise ValueError(f"negative_prompt must be a string or None, got {type(negative_prompt).__name__}")
        if negative_prompt is not None and negative_prompt.strip():
            negative_prompt = validate_prompts(negative_prompt, "negative_prompt")[0]
        else:
            negative_prompt = ""
        head_steps = _check_int("head_steps", head_steps, 1, self.config.num_train_timesteps)
        num_images = _check_int("num_images", num_images, 1, 64)
        return (prompt[0], num_candidates, decisions, num_inference_steps, guidance_scale, guidance_schedule,
                temperature, negative_prompt, head_steps, num_images)

    def _seed(self, seed: int | None, generator: torch.Generator | None) -> int:
        if seed is not None:
            return _check_int("seed", seed, 0, 2**63 - 1)
        if generator is not None:
            if not isinstance(generator, torch.Generator):
                raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
            return int(torch.randint(0, 2**62, (1,), generator=generator))
        return int(torch.randint(0, 2**62, (1,)))

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

    def stream(self, prompt: str, num_candidates: int = 1, decision_step: int | Sequence[int] | None = None,
               num_inference_steps: int | None = None, guidance_scale: float = 3.0, guidance_schedule: str = "constant",
               temperature: float = 1.0, negative_prompt: str | None = None, generator: torch.Generator | None = None,
               seed: int | None = None, head_steps: int = 100, should_stop: Callable[[], bool] | None = None,
               shared_order: bool = True) -> Iterator[StepEvent]:
        """Yield a StepEvent after every decoding step and at every SAD decision. `shared_order`:
        the K candidates share one generation order (the official SAD; False = one order each)."""
        (prompt, k, decisions, steps, cfg_scale, cfg_sched, temp, neg, head_steps, _) = self._validate(
            prompt, num_candidates, decision_step, num_inference_steps, guidance_scale, guidance_schedule,
            temperature, negative_prompt, head_steps, 1)
        base_seed = self._seed(seed, generator)
        yield from self._stream(prompt, k, decisions, steps, cfg_scale, cfg_sched, temp, neg, head_steps,
                                base_seed, should_stop, bool(shared_order))

    def _stream(self, prompt, k, decisions, steps, cfg_scale, cfg_sched, temp, neg, head_steps, base_seed,
                should_stop=None, shared_order=True) -> Iterator[StepEvent]:
        text, text_emb = self._condition(prompt, neg, cfg_scale != 1.0)
        gens = candidate_generators(base_seed, k)
        with self.autocast():
            yield from semantic_decode(self.model, text, text_emb, gens, steps, decisions, cfg_scale, cfg_sched,
                                       temp, head_steps, should_stop=should_stop, device=self.device,
                                       shared_order=shared_order)

    def __call__(self, prompt: str, num_candidates: int = 1, decision_step: int | Sequence[int] | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float = 3.0, guidance_schedule: str = "constant",
                 temperature: float = 1.0, negative_prompt: str | None = None,
                 generator: torch.Generator | None = None, seed: int | None = None, head_steps: int = 100,
                 num_images: int = 1, shared_order: bool = True) -> DreamOutput:
        """Generate `num_images` images; image i uses seeds seed + i*K ... seed + i*K + K-1 for its K candidates."""
        args = self._validate(prompt, num_candidates, decision_step, num_inference_steps, guidance_scale,
                              guidance_schedule, temperature, negative_prompt, head_steps, num_images)
        (prompt, k, decisions, steps, cfg_scale, cfg_sched, temp, neg, head_steps, n_images) = args
        base_seed = self._seed(seed, generator)
        out = DreamOutput(images=[])
        for i in range(n_images):
            s = base_seed + i * k
            last = None
            for event in self._stream(prompt, k, decisions, steps, cfg_scale, cfg_sched, temp, neg, head_steps, s,
                                      shared_order=bool(shared_order)):
                last = event
            out.images += self.decode_tokens(last.tokens[:1])
            out.scores.append(list(last.scores))
            out.chosen.append(last.candidate_ids[0])
            out.seeds.append(s)
        return out

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
                self._bank = CaptionBank.build(self, self.captions)
            return self._bank
        captions = validate_prompts(list(captions), "captions")
        return CaptionBank.build(self, captions)

    def search(self, image: Image.Image | np.ndarray, top_k: int = 5,
               captions: Sequence[str] | None = None) -> list[tuple[str, float]]:
        """Reverse search: the top-k captions of the bank for an image, with cosine scores."""
        top_k = _check_int("top_k", top_k, 1, 1000)
        return self.caption_bank(captions).search(self.embed_images([image])[0], top_k)

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
        """Identifies the weights for on-disk caches (content hash of model.safetensors when small)."""
        h = hashlib.sha256(json.dumps(self.config.to_dict(), sort_keys=True).encode())
        weights = self.path / "model.safetensors" if self.path else None
        if weights is not None and weights.exists():
            st = weights.stat()
            if st.st_size < 512 * 2**20:
                h.update(hashlib.sha256(weights.read_bytes()).digest())
            else:
                h.update(f"{weights.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
        else:
            for v in self.model.state_dict().values():
                h.update(v.detach().float().cpu().numpy().tobytes()[:4096])
        return h.hexdigest()[:16]
