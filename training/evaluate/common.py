"""What the evaluation commands share: model loading, seeded Shapes World prompt sets, batched
generation over many prompts (with SAD and an external reranker), the data-parallel split, and
JSON / PNG writing.

Batched generation (`generate`) gives, for prompt i with seed s_i, exactly what
`DreamPipeline(prompt_i, num_candidates=K, decision_step=d, seed=s_i)` gives (up to floating-point
batch effects): every candidate row owns its generator (candidate k of prompt i is seeded
s_i + k), rows never interact, and SAD keeps the best-scored of the first K candidates at step d.
So one decoding "trunk" of K_max candidates per prompt serves every setting at once: all rows run
together up to the last decision step, then only the rows some setting keeps run to the end.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from dream_core.masking import decoding_schedule, fraction_decided
from dream_core.pipeline import MAX_CANDIDATES, DreamPipeline, image_to_tensor
from dream_core.sampling import TextCondition, candidate_generators, decode_step, init_state
from dream_core.text import validate_prompts

#: The dedicated seed of the fixed Shapes World evaluation sets. Nothing that tunes anything
#: (tests, training, hyper-parameter choices) may draw from it; sub-streams are
#: numpy SeedSequence([EVAL_SEED, k]) with k = 1 one-object prompts, 2 two-object prompts,
#: 3 reverse-search renders, 4 / 5 probe train / val renders, 6 zero-shot renders, 7 masks.
EVAL_SEED = 20261123
STREAM_ONE_OBJECT, STREAM_TWO_OBJECT, STREAM_SEARCH, STREAM_PROBE_TRAIN, STREAM_PROBE_VAL = 1, 2, 3, 4, 5
STREAM_ZERO_SHOT, STREAM_MASKS = 6, 7
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# --------------------------------------------------------------------------- CLI helpers


def add_model_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default=None, help="model directory (default: $DREAM_MODEL or assets/dream-shapes)")
    ap.add_argument("--out", type=Path, required=True, help="output directory (results.json + plot.png)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave as is)")


def add_sampler_args(ap: argparse.ArgumentParser, steps_default: int | None = None) -> None:
    ap.add_argument("--steps", type=int, default=steps_default,
                    help="decoding steps (default: the model's token count, i.e. one token per step)")
    ap.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale")
    ap.add_argument("--cfg-schedule", default="constant", choices=("constant", "linear"))
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--head-steps", type=int, default=100, help="diffusion-head sampling steps")
    ap.add_argument("--batch-size", type=int, default=0, help="prompts decoded together (0 = automatic)")
    ap.add_argument("--seed", type=int, default=EVAL_SEED, help="generation seed base (prompt i: seed + 64 i)")


def run_cli(main: Callable[[list[str] | None], Any]) -> None:
    """Run a command's main(); a ValueError (bad input) becomes a one-line error, exit status 2."""
    try:
        main(None)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2)


def parse_int_list(text: str, name: str) -> list[int]:
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError as err:
        raise ValueError(f"{name} must be a comma-separated list of integers, got {text!r}") from err
    if not values:
        raise ValueError(f"{name} must not be empty")
    return values


def load_pipeline(model: str | Path | None = None, device: str = "auto", threads: int = 0) -> DreamPipeline:
    if threads:
        torch.set_num_threads(threads)
    return DreamPipeline.from_pretrained(model, device=device)


# --------------------------------------------------------------------------- output


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    return obj


def write_json(path: str | Path, data: Any) -> Path:
    """Atomic JSON write (non-finite numbers become null, so the file is always valid JSON)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_jsonable(data), indent=2, allow_nan=False) + "\n")
    tmp.replace(path)
    return path


def run_metadata(pipe: DreamPipeline | None, args: argparse.Namespace | dict | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]) if sys.argv else "",
    }
    if pipe is not None:
        meta.update(model=str(pipe.path) if pipe.path else None, preset=pipe.config.name,
                    image_size=pipe.config.image_size, tokens=pipe.config.seq_len, device=str(pipe.device),
                    weights=pipe.weights_fingerprint())
    if args is not None:
        meta["args"] = {k: v for k, v in (vars(args) if isinstance(args, argparse.Namespace) else args).items()}
    return meta


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_lines(path: str | Path, x: Sequence[float], series: dict[str, Sequence[float | None]], xlabel: str,
               ylabel: str, title: str, ylim: tuple[float, float] | None = (0.0, 1.0),
               xticks: Sequence[float] | None = None, xticklabels: Sequence[str] | None = None) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for name, ys in series.items():
        pts = [(xi, yi) for xi, yi in zip(x, ys) if yi is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if ylim is not None:
        ax.set_ylim(*ylim)
    if xticks is not None:
        ax.set_xticks(list(xticks))
        if xticklabels is not None:
            ax.set_xticklabels(list(xticklabels))
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_bars(path: str | Path, categories: Sequence[str], series: dict[str, Sequence[float]], ylabel: str,
              title: str, ylim: tuple[float, float] | None = None) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.4, 0.55 * len(categories) * max(1, len(series))), 4.2), dpi=110)
    n = max(1, len(series))
    width = 0.8 / n
    xs = np.arange(len(categories))
    for i, (name, values) in enumerate(series.items()):
        ax.bar(xs + (i - (n - 1) / 2) * width, list(values), width, label=name)
    ax.set_xticks(xs)
    ax.set_xticklabels(list(categories), rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3, axis="y")
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def image_grid(images: Sequence[Image.Image], cols: int = 8, marks: Sequence[bool] | None = None,
               scale: int = 2) -> Image.Image:
    """A contact sheet; with `marks`, a green (True) or red (False) frame around each image."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    w, h = images[0].size
    w, h = w * scale, h * scale
    pad = 4
    rows = math.ceil(len(images) / cols)
    sheet = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, im in enumerate(images):
        x, y = pad + (i % cols) * (w + pad), pad + (i // cols) * (h + pad)
        if marks is not None:
            color = (30, 160, 60) if marks[i] else (200, 30, 30)
            draw.rectangle([x - 2, y - 2, x + w + 1, y + h + 1], outline=color, width=2)
        sheet.paste(im.convert("RGB").resize((w, h), Image.NEAREST), (x, y))
    return sheet


# --------------------------------------------------------------------------- seeded Shapes World sets


def _stream_rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(stream)]))


def one_object_prompts(n: int, seed: int = EVAL_SEED) -> list[str]:
    """n fully specified one-object captions (canonical wording), drawn without replacement from
    the 2,160 of the bank while n allows, so the set covers the bank evenly."""
    from training.data.shapes_world import full_caption_bank

    if n < 1:
        raise ValueError(f"the number of prompts must be >= 1, got {n}")
    bank = full_caption_bank()
    rng = _stream_rng(seed, STREAM_ONE_OBJECT)
    idx = np.concatenate([rng.permutation(len(bank)) for _ in range(math.ceil(n / len(bank)))])[:n]
    return [bank[int(i)] for i in idx]


def two_object_prompts(n: int, seed: int = EVAL_SEED) -> list[str]:
    """n fully specified two-object captions of random valid scenes (canonical wording)."""
    from training.data.shapes_world import two_object_captions

    if n < 1:
        raise ValueError(f"the number of prompts must be >= 1, got {n}")
    return two_object_captions(_stream_rng(seed, STREAM_TWO_OBJECT), n)


def rendered_scenes(n: int, seed: int, stream: int, num_objects: int | None = 1) -> tuple[list[Image.Image], list]:
    """n fresh renders (random scenes, jittered) and their scenes, from sub-stream `stream`."""
    from training.data.shapes_world import random_scene, render

    rng = _stream_rng(seed, stream)
    images, scenes = [], []
    for _ in range(n):
        scene = random_scene(rng, num_objects)
        images.append(render(scene, rng))
        scenes.append(scene)
    return images, scenes


def scene_from_caption(text: str):
    """The scene a fully specified caption describes (for renders of the prompts themselves)."""
    from training.data.shapes_world import Scene, ShapeObject, parse_caption

    spec = parse_caption(text)
    if spec.background is None or any(o.size is None or o.position is None for o in spec.objects):
        raise ValueError(f"caption {text!r} is not fully specified")
    return Scene(spec.background, tuple(ShapeObject(o.color, o.shape, o.size, o.position) for o in spec.objects))


def prompt_seeds(n: int, base: int = EVAL_SEED) -> list[int]:
    """Per-prompt seeds: prompt i uses base + 64 i, so its candidates (seed + k, k < 64) never
    share a seed with another prompt's."""
    return [int(base) + MAX_CANDIDATES * i for i in range(n)]


def read_prompts(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prompt file {path} does not exist")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts")
    return validate_prompts(prompts, "prompts")


# --------------------------------------------------------------------------- image folders


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def image_folder(root: str | Path, classes: Sequence[str] | None = None) -> tuple[list[Path], list[int], list[str]]:
    """ImageFolder layout root/<class>/*.png -> (paths, labels, classes). With `classes`, the
    folder must hold exactly those (so train and val agree on the label indices)."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"image folder {root} does not exist")
    found = sorted(d.name for d in root.iterdir() if d.is_dir())
    if classes is None:
        classes = found
    elif sorted(classes) != found:
        raise ValueError(f"{root} holds classes {found}, expected {sorted(classes)}")
    if len(classes) < 2:
        raise ValueError(f"image folder {root} needs at least 2 class sub-folders, found {len(classes)}")
    paths, labels = [], []
    for i, name in enumerate(classes):
        files = list_images(root / name)
        paths += files
        labels += [i] * len(files)
    if not paths:
        raise ValueError(f"image folder {root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return paths, labels, list(classes)


def load_images(paths: Sequence[Path]) -> tuple[list[Image.Image], list[int]]:
    """Read images; unreadable files are skipped and their indices returned, never a crash."""
    images, bad = [], []
    for i, p in enumerate(paths):
        try:
            with Image.open(p) as im:
                images.append(im.convert("RGB"))
        except Exception:  # corrupt or unsupported file: counted, not fatal
            images.append(None)
            bad.append(i)
    return images, bad


# --------------------------------------------------------------------------- features


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


# --------------------------------------------------------------------------- generation


@dataclass(frozen=True)
class Setting:
    """How the final image is chosen among K candidates: K = 1 (plain MAR decoding), SAD at
    `decision_step`, or (`rerank`) all K decoded to the end and the best kept by an external model."""

    num_candidates: int = 1
    decision_step: int | None = None
    rerank: bool = False

    @property
    def name(self) -> str:
        if self.num_candidates == 1:
            return "K=1"
        if self.rerank:
            return f"K={self.num_candidates} external reranker"
        return f"SAD K={self.num_candidates} step={self.decision_step}"


@dataclass
class SamplerSettings:
    num_inference_steps: int = 16
    guidance_scale: float = 3.0
    guidance_schedule: str = "constant"
    temperature: float = 1.0
    head_steps: int = 100
    negative_prompt: str = ""
    shared_order: bool = True  # the K candidates of a prompt share one generation order (official SAD)

    @classmethod
    def from_args(cls, args: argparse.Namespace, pipe: DreamPipeline) -> "SamplerSettings":
        steps = args.steps if args.steps is not None else pipe.config.seq_len
        return cls(steps, args.cfg, args.cfg_schedule, args.temperature, args.head_steps)


@dataclass
class Generated:
    """One setting's outcome for every prompt."""

    images: list[Image.Image] = field(default_factory=list)
    chosen: list[int] = field(default_factory=list)  # candidate id kept, per prompt
    scores: list[list[float]] = field(default_factory=list)  # per prompt, the K candidates' scores


@dataclass
class GenerationRun:
    results: dict[Setting, Generated]
    seconds: float
    row_steps: int  # decoder forwards x rows: the compute actually spent


def validate_generation(pipe: DreamPipeline, prompts: Sequence[str], seeds: Sequence[int],
                        settings: Sequence[Setting], sampler: SamplerSettings, reranker: Any = None) -> list[str]:
    prompts = validate_prompts(list(prompts), "prompts")
    if len(seeds) != len(prompts):
        raise ValueError(f"seeds ({len(seeds)}) and prompts ({len(prompts)}) differ in length")
    if not settings:
        raise ValueError("settings must not be empty")
    for s in settings:
        if s.rerank and reranker is None:
            raise ValueError(f"setting {s.name} needs an external reranker")
        # The pipeline's own checks, so a sweep rejects exactly what a single call would.
        pipe._validate(prompts[0], s.num_candidates, None if s.rerank else s.decision_step,
                       sampler.num_inference_steps, sampler.guidance_scale, sampler.guidance_schedule,
                       sampler.temperature, sampler.negative_prompt or None, sampler.head_steps, 1)
        if s.num_candidates > 1 and not s.rerank and s.decision_step is None:
            raise ValueError(f"setting {s.name} needs a decision_step")
    return prompts


def default_batch_rows(pipe: DreamPipeline) -> int:
    """Candidate rows decoded together: 4096 (GPU) / 256 (CPU) for 16-token models, fewer for
    longer sequences so activations stay about the same size."""
    budget = 65536 if pipe.device.type == "cuda" else 4096
    return max(1, budget // pipe.config.seq_len)


def generate(pipe: DreamPipeline, prompts: Sequence[str], seeds: Sequence[int], settings: Sequence[Setting],
             sampler: SamplerSettings, batch_size: int = 0, reranker: Any = None,
             progress: bool = False) -> GenerationRun:
    """Generate one image per prompt for every setting, sharing the candidates' decoding.

    Args:
        seeds: per-prompt seeds; candidate k of prompt i uses seeds[i] + k (as the pipeline).
        batch_size: prompts per batch (0 = as many as fit `default_batch_rows`).
        reranker: a `dream_core.semantic_decoding.ExternalReranker`, for `Setting(rerank=True)`.
    """
    prompts = validate_generation(pipe, prompts, seeds, settings, sampler, reranker)
    settings = list(dict.fromkeys(settings))
    kmax = max(s.num_candidates for s in settings)
    if batch_size <= 0:
        batch_size = max(1, default_batch_rows(pipe) // kmax)
    results = {s: Generated() for s in settings}
    row_steps = 0
    start = time.perf_counter()
    chunks = range(0, len(prompts), batch_size)
    if progress:
        from tqdm import tqdm

        chunks = tqdm(chunks, desc="generating", unit="batch", file=sys.stderr)
    for i in chunks:
        part, spent = _generate_chunk(pipe, prompts[i:i + batch_size], seeds[i:i + batch_size], settings,
                                      sampler, kmax, reranker)
        row_steps += spent
        for s in settings:
            results[s].images += part[s].images
            results[s].chosen += part[s].chosen
            results[s].scores += part[s].scores
    return GenerationRun(results, time.perf_counter() - start, row_steps)


@torch.inference_mode()
def _generate_chunk(pipe: DreamPipeline, prompts: list[str], seeds: Sequence[int], settings: list[Setting],
                    sp: SamplerSettings, kmax: int, reranker: Any) -> tuple[dict[Setting, Generated], int]:
    model, device, cfg_model = pipe.model, pipe.device, pipe.config
    n = len(prompts)
    steps = sp.num_inference_steps
    use_cfg = sp.guidance_scale != 1.0
    sad_steps = sorted({s.decision_step for s in settings if s.num_candidates > 1 and not s.rerank})
    prune_at = sad_steps[-1] if sad_steps else 0

    # 1. Text: T5 outside autocast (as the pipeline), aligner + cross-attention keys/values once per prompt.
    hidden, t5_mask = pipe.text_encoder(list(prompts) + ([sp.negative_prompt] if use_cfg else []))
    hidden, t5_mask = hidden.to(device), t5_mask.to(device)
    with pipe.autocast():
        kv = model.decoder.text_kv(model.align_text(hidden, t5_mask))
        text_emb = model.encode_text(pipe.clip_tokenizer(prompts).to(device)).float()

    def condition(row_prompt: torch.Tensor) -> TextCondition:
        idx = row_prompt.to(device)
        cond = TextCondition([(k[:n][idx], v[:n][idx]) for k, v in kv], t5_mask[:n][idx])
        if use_cfg:
            cond.kv_uncond = [(k[n:n + 1], v[n:n + 1]) for k, v in kv]
            cond.mask_uncond = t5_mask[n:n + 1]
        return cond

    # 2. Candidate rows: prompt-major, candidate k of prompt i seeded seeds[i] + k.
    gens = [g for s in seeds for g in candidate_generators(int(s), kmax)]
    row_prompt = torch.arange(n).repeat_interleave(kmax)
    row_cand = torch.arange(kmax).repeat(n)
    state = init_state(cfg_model.seq_len, cfg_model.token_dim, gens, device, order_groups=n,
                       shared_order=sp.shared_order)
    schedule = decoding_schedule(steps, cfg_model.seq_len)
    cond = condition(row_prompt)
    scores: dict[int, torch.Tensor] = {}
    spent = 0

    # 3. Decode; score at every decision step; after the last one keep only the rows a setting needs.
    for step in range(steps):
        if step in sad_steps:
            with pipe.autocast():
                img = model.encode_image(state.tokens, state.mask)
                s = torch.bmm(img[:, None, :], text_emb[row_prompt.to(device)][:, :, None].to(img.dtype))
            scores[step] = s.float().view(n, kmax).cpu()
        if step == prune_at:
            keep = _rows_needed(settings, scores, n, kmax)
            state.select(keep)
            keep_t = torch.tensor(keep, dtype=torch.long)
            row_prompt, row_cand = row_prompt[keep_t], row_cand[keep_t]
            cond = condition(row_prompt)
        with pipe.autocast():
            decode_step(model, state, cond, schedule, sp.guidance_scale, sp.guidance_schedule, sp.temperature,
                        sp.head_steps)
        spent += state.tokens.shape[0]

    # 4. Decode the surviving rows to pixels and assemble every setting.
    final: dict[tuple[int, int], Image.Image] = {}
    tokens = state.tokens
    for i in range(0, tokens.shape[0], 256):
        for j, im in enumerate(pipe.decode_tokens(tokens[i:i + 256])):
            r = i + j
            final[(int(row_prompt[r]), int(row_cand[r]))] = im
    out = {s: Generated() for s in settings}
    for s in settings:
        res = out[s]
        for p in range(n):
            k = s.num_candidates
            if k == 1:
                res.chosen.append(0)
                res.scores.append([])
            elif s.rerank:
                ext = reranker.scores([final[(p, c)] for c in range(k)], prompts[p])
                res.chosen.append(_best(ext))
                res.scores.append([float(v) for v in ext])
            else:
                sc = scores[s.decision_step][p, :k]
                res.chosen.append(_best(sc))
                res.scores.append([float(v) for v in sc])
            res.images.append(final[(p, res.chosen[-1])])
    return out, spent


def _best(scores: torch.Tensor) -> int:
    """Highest score; ties go to the lower candidate id (as SAD's stable sort)."""
    return int(torch.argsort(torch.as_tensor(scores).float(), descending=True, stable=True)[0])


def _rows_needed(settings: list[Setting], scores: dict[int, torch.Tensor], n: int, kmax: int) -> list[int]:
    need: set[tuple[int, int]] = set()
    for s in settings:
        for p in range(n):
            if s.num_candidates == 1:
                need.add((p, 0))
            elif s.rerank:
                need.update((p, c) for c in range(s.num_candidates))
            else:
                need.add((p, _best(scores[s.decision_step][p, :s.num_candidates])))
    return sorted(p * kmax + c for p, c in need)


def decision_step_for_fraction(num_steps: int, seq_len: int, fraction: float) -> int:
    """The decision step (1 .. num_steps - 1) whose share of decided tokens is closest to `fraction`
    (ties to the earlier, cheaper step)."""
    if num_steps < 2:
        raise ValueError("SAD needs num_inference_steps >= 2")
    return min(range(1, num_steps), key=lambda d: (abs(fraction_decided(d, num_steps, seq_len) - fraction), d))


# --------------------------------------------------------------------------- CLIP score (local open_clip)


def load_open_clip(arch: str, weights: str | Path, device: str | torch.device = "cpu"):
    """An open_clip model from a local weights file; a missing file is a ValueError naming it."""
    if not arch:
        raise ValueError("an open_clip architecture name is needed with the weights (e.g. ViT-B-32)")
    weights = Path(weights)
    if not weights.is_file():
        raise ValueError(f"open_clip weights file not found: {weights} (nothing is downloaded)")
    from dream_core.semantic_decoding import ExternalReranker

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


# --------------------------------------------------------------------------- data parallel


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0


def dist_info(env: dict[str, str] | None = None) -> DistInfo:
    """Rank and world size from the variables torchrun and accelerate launch set."""
    env = os.environ if env is None else env
    try:
        rank, world = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
        local = int(env.get("LOCAL_RANK", rank))
    except ValueError as err:
        raise ValueError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers: {err}") from err
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"invalid distributed environment: RANK={rank}, WORLD_SIZE={world}")
    return DistInfo(rank, world, local)


def shard_indices(n: int, rank: int, world: int) -> list[int]:
    """The strided share of n items that `rank` of `world` handles: rank, rank + world, ..."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, world={world}), got {rank}")
    return list(range(rank, n, world))


def init_distributed(info: DistInfo) -> bool:
    """Join the process group when launched with several processes; True when one was joined."""
    import torch.distributed as dist

    if info.world <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=2))
    return True


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def chunked(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]
