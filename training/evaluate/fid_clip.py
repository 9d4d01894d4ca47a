"""FID and CLIP score of generated images, from LOCAL weights only (nothing is downloaded).

- FID: torchmetrics' FrechetInceptionDistance (torch-fidelity's `inception-v3-compat`, 2048-d
  pool features, as the official evaluation) with the Inception weights read from
  `--inception-weights` (torch-fidelity's `weights-inception-2015-12-05-6726825d.pth`, or the same
  state dict as .safetensors). The .pth is read with torch.load(weights_only=True): tensors only,
  never arbitrary pickled objects. Reference: a folder of real images (`--reference`), centre
  cropped and resized to the model's resolution like the generated ones, or, with `--shapes`,
  fresh renders of the very scenes the prompts describe.
- CLIP score: 100 * max(cos, 0) between each image and its prompt (Hessel et al., 2021) with an
  open_clip model from `--clip-arch` + `--clip-weights` (the official repository has none).

A missing file is a ValueError naming it, raised before any generation. Generation is data
parallel: under `torchrun --nproc-per-node G` or `accelerate launch`, rank r generates prompts
r, r + world, ... (prompt i always with seed `--seed` + 64 i, so the set is the same for any
number of processes), writes samples/{i:06d}.png (existing files are kept: a killed run resumes),
and rank 0 scores everything once all ranks are done. 50,000 images on one 8-GPU node take minutes.

    torchrun --nproc-per-node 8 -m training.evaluate.fid_clip --model DIR --prompts captions.txt \
        --num-images 50000 --reference real_val/ --inception-weights pt_inception.pth \
        --clip-arch ViT-B-32 --clip-weights open_clip_vit_b32.safetensors --out runs/fid
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from dream_core.pipeline import DreamPipeline, image_to_tensor

from dream_core.request import SamplerSettings
from dream_core.semantic_decoding import Setting

from .cli import (add_model_args, add_sampler_args, load_pipeline, run_cli, run_metadata, sampler_from_args,
                  setting_from_args, write_json)
from .distributed import barrier, chunked, dist_info, init_distributed, shard_indices
from .plotting import plot_bars
from .scoring import clip_scores, load_open_clip
from .sets import EVAL_SEED, list_images, prompt_seeds, read_prompts, rendered_scenes

STREAM_FID_SCENES = 8


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A plain state dict from .safetensors, or from .pth/.pt with the tensors-only unpickler."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Inception weights file not found: {path} (nothing is downloaded; get "
                         "torch-fidelity's weights-inception-2015-12-05-6726825d.pth onto this machine)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # not a tensors-only checkpoint: refuse rather than unpickle objects
        raise ValueError(f"{path} is not a tensors-only state dict: {err}") from err
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return state


@contextlib.contextmanager
def _torch_load_returns(state: dict[str, torch.Tensor]):
    """torch-fidelity reads its weights with torch.load(weights_only=False); hand it the state dict
    we already read safely instead, so no pickled object is ever executed."""
    original = torch.load
    torch.load = lambda *args, **kwargs: state  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.load = original  # type: ignore[assignment]


def build_fid(weights: str | Path, device: str | torch.device = "cpu"):
    from torchmetrics.image.fid import FrechetInceptionDistance

    state = load_state_dict_file(weights)
    with _torch_load_returns(state):
        try:
            fid = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(weights))
        except RuntimeError as err:
            raise ValueError(f"{weights} does not hold torch-fidelity's Inception-v3 weights: {err}") from err
    return fid.to(device)


def _uint8(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    x = torch.cat([image_to_tensor(im, size) for im in images])
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


# --------------------------------------------------------------------------- data-parallel generation


def sample_path(folder: Path, index: int) -> Path:
    return folder / f"{index:06d}.png"


def generate_shard(pipe: DreamPipeline, prompts: Sequence[str], seeds: Sequence[int], indices: Sequence[int],
                   folder: Path, setting: Setting, sampler: SamplerSettings, batch_size: int = 0,
                   progress: bool = False) -> int:
    """Generate the prompts at `indices` (this rank's share) into folder/{i:06d}.png; files that
    already exist are kept (resume). Returns the number of images written now."""
    folder.mkdir(parents=True, exist_ok=True)
    todo = [i for i in indices if not sample_path(folder, i).exists()]
    step = batch_size if batch_size > 0 else max(1, pipe.default_batch_rows() // setting.num_candidates)
    written = 0
    for part in chunked(todo, step):
        run = pipe.generate_batch([prompts[i] for i in part], [seeds[i] for i in part], [setting], sampler,
                       batch_size, progress=False)
        for i, im in zip(part, run.results[setting].images):
            tmp = sample_path(folder, i).with_suffix(".tmp.png")
            im.save(tmp)
            tmp.replace(sample_path(folder, i))  # atomic: a killed run never leaves half a PNG
            written += 1
        if progress:
            print(f"generated {written}/{len(todo)}", flush=True)
    return written


# --------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    add_sampler_args(ap)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", type=Path, help="prompt file, one per line (cycled up to --num-images)")
    src.add_argument("--shapes", action="store_true", help="Shapes World scenes: captions as prompts, renders as reference")
    ap.add_argument("--num-images", type=int, default=50_000)
    ap.add_argument("--reference", type=Path, default=None, help="folder of real images for FID")
    ap.add_argument("--inception-weights", type=Path, default=None, help="local Inception-v3 weights (FID)")
    ap.add_argument("--clip-arch", default="", help="open_clip architecture of --clip-weights (e.g. ViT-B-32)")
    ap.add_argument("--clip-weights", type=Path, default=None, help="local open_clip weights (CLIP score)")
    ap.add_argument("--k", type=int, default=1, help="SAD candidates K")
    ap.add_argument("--decision-step", type=int, default=None)
    ap.add_argument("--metric-batch-size", type=int, default=128)
    return ap.parse_args(argv)


def check_inputs(args: argparse.Namespace) -> None:
    """Every file the run needs, checked before anything is generated."""
    if args.inception_weights is None and args.clip_weights is None:
        raise ValueError("nothing to measure: give --inception-weights (FID) and/or --clip-weights (CLIP score)")
    if args.inception_weights is not None:
        if not args.inception_weights.is_file():
            raise ValueError(f"Inception weights file not found: {args.inception_weights} (nothing is downloaded)")
        if args.reference is None and not args.shapes:
            raise ValueError("FID needs --reference (a folder of real images) or --shapes")
    if args.reference is not None and not args.reference.is_dir():
        raise ValueError(f"--reference folder not found: {args.reference}")
    if args.clip_weights is not None:
        if not args.clip_weights.is_file():
            raise ValueError(f"open_clip weights file not found: {args.clip_weights} (nothing is downloaded)")
        if not args.clip_arch:
            raise ValueError("--clip-weights needs --clip-arch (the open_clip architecture name)")
    if args.prompts is not None and not args.prompts.is_file():
        raise ValueError(f"prompt file not found: {args.prompts}")
    if args.num_images < 2:
        raise ValueError(f"--num-images must be >= 2 (FID needs a covariance), got {args.num_images}")
    if args.k < 1:
        raise ValueError(f"--k must be >= 1, got {args.k}")


def main(argv: list[str] | None = None) -> dict | None:
    from training.distributed import end_process_group

    try:
        return run(parse_args(argv))
    finally:
        end_process_group()  # every rank, every exit


def run(args: argparse.Namespace) -> dict | None:
    check_inputs(args)
    info = dist_info()
    distributed = init_distributed(info)
    device = args.device
    if distributed and torch.cuda.is_available() and device in ("auto", "cuda"):
        device = f"cuda:{info.local_rank}"
    pipe = load_pipeline(args.model, device, args.threads)
    # Load the metric models on rank 0 before generating, so a bad weights file fails in seconds.
    fid = build_fid(args.inception_weights, pipe.device) if args.inception_weights and info.rank == 0 else None
    scorer = load_open_clip(args.clip_arch, args.clip_weights, pipe.device) if args.clip_weights and info.rank == 0 else None

    n = args.num_images
    references = None
    if args.shapes:
        from training.data.shapes_world import caption

        references, scenes = rendered_scenes(n, EVAL_SEED, STREAM_FID_SCENES, num_objects=None)
        prompts = [caption(s) for s in scenes]
    else:
        base = read_prompts(args.prompts)
        prompts = [base[i % len(base)] for i in range(n)]
    seeds = prompt_seeds(n, args.seed)
    sampler = sampler_from_args(args, pipe)
    setting = setting_from_args(args, pipe, sampler)
    samples = args.out / "samples"
    mine = shard_indices(n, info.rank, info.world)
    generate_shard(pipe, prompts, seeds, mine, samples, setting, sampler, args.batch_size, progress=info.rank == 0)
    barrier()
    if info.rank != 0:
        barrier()  # wait for rank 0's scoring
        return None
    try:
        return _score(args, pipe, fid, scorer, prompts, references if args.shapes else None, setting, info.world)
    finally:
        barrier()


def _score(args: argparse.Namespace, pipe: DreamPipeline, fid: Any, scorer: Any, prompts: list[str],
           references: list[Image.Image] | None, setting: Setting, world: int) -> dict:
    """Rank 0: FID and CLIP score over all N samples."""
    n = args.num_images
    samples = args.out / "samples"
    missing = [i for i in range(n) if not sample_path(samples, i).exists()]
    if missing:
        raise ValueError(f"{len(missing)} samples are missing from {samples} (e.g. {missing[:3]}); rerun to resume")
    size = pipe.config.image_size
    results: dict[str, Any] = {"meta": run_metadata(pipe, args), "setting": setting.name, "num_images": n,
                               "world_size": world}
    clip_values = []
    for part in chunked(list(range(n)), args.metric_batch_size):
        images = [Image.open(sample_path(samples, i)).convert("RGB") for i in part]
        if fid is not None:
            fid.update(_uint8(images, size).to(pipe.device), real=False)
        if scorer is not None:
            clip_values.append(clip_scores(scorer, images, [prompts[i] for i in part]))
    if fid is not None:
        if references is not None:
            ref_iter = chunked(references, args.metric_batch_size)
            n_ref = len(references)
        else:
            ref_paths = list_images(args.reference)
            if len(ref_paths) < 2:
                raise ValueError(f"--reference {args.reference} holds fewer than 2 images")
            ref_iter = ([Image.open(p).convert("RGB") for p in part] for part in chunked(ref_paths, args.metric_batch_size))
            n_ref = len(ref_paths)
        for images in ref_iter:
            fid.update(_uint8(images, size).to(pipe.device), real=True)
        results["fid"] = float(fid.compute())
        results["fid_reference_images"] = n_ref
    if scorer is not None:
        values = torch.cat(clip_values)
        results["clip_score"] = float(values.mean())
        results["clip_score_std"] = float(values.std()) if len(values) > 1 else 0.0
        results["clip_model"] = f"{args.clip_arch} ({args.clip_weights.name})"
    names = [k for k in ("fid", "clip_score") if k in results]
    plot_bars(args.out / "plot.png", names, {"value": [results[k] for k in names]}, "value",
              f"FID / CLIP score ({setting.name}, {n} images)")
    write_json(args.out / "results.json", results)
    print({k: results[k] for k in names})
    return results


if __name__ == "__main__":
    run_cli(main)
