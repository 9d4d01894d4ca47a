"""Pre-extract the training cache once: VAE posterior moments (mean and log-variance, float32) of the
ADM centre crop AND of its horizontal flip, the T5 last hidden states (float16) with their mask,
and the caption, for every sample of a recipe's data. Training then reads the cache
(`data=cache cache_path=DIR`) and never runs the VAE or T5 on images.

    python -m training.cache --recipe dream-huge --out /data/cc12m-cache data_path=/data/cc12m vae_path=... t5_path=...
    torchrun --nproc-per-node 8 -m training.cache --recipe dream-huge --out /data/cc12m-cache ...   # 8 workers
    python -m training.cache --recipe shapes --out runs/shapes-cache --max-samples 50000 vae_path=... t5_path=...

Layout of --out: `meta.json` (settings, with content fingerprints of the VAE encoder and the T5, which
the trainer checks against its own; a rerun with other settings is refused), `shard-NNNNNN.safetensors`
(moments [n, 2C, h, w] f32, moments_flip, t5_hidden [n, T, d] f16, t5_mask [n, T] bool) with
`shard-NNNNNN.json` (captions, source ids, skipped samples) written after it, `null_caption.safetensors`
(the empty caption's T5 states) and `index.json` (written once every shard is complete).

Shard s holds samples [s*S, (s+1)*S) of the source's fixed order, so the work splits by shard:
process r of W (RANK/WORLD_SIZE from torchrun or accelerate launch) writes shards r, r + W, ...
Every file is written to a temporary name and renamed, and a shard counts as done only when its
JSON exists, so a killed run resumes by skipping finished shards (with any number of processes).
Unreadable samples are skipped and counted in the shard's JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from training.data.sources import (CorruptSample, FolderSource, ShapesSource, TarSource, adm_center_crop, open_source,
                                   to_tensor)
from training.distributed import configure_cuda
from training.recipes import PRECISIONS, TrainRecipe, get_recipe

CACHE_VERSION = 1
NULL_CAPTION_FILE = "null_caption.safetensors"


# ---------------------------------------------------------------------------------------------
# Sources to extract from
# ---------------------------------------------------------------------------------------------

def extraction_source(recipe: TrainRecipe, max_samples: int | None):
    if recipe.data == "folder":
        return FolderSource(recipe.data_path)
    if recipe.data == "webdataset":
        return TarSource(recipe.data_path)
    if recipe.data == "emoji":
        return open_source(recipe)
    if recipe.data == "shapes":
        if not max_samples:
            raise ValueError("the Shapes World is endless: pass --max-samples N to cache N samples of it")
        return ShapesSource(recipe.seed, max_samples)  # the first N scenes of the live feed
    raise ValueError(f"cannot cache recipe.data={recipe.data!r} (use webdataset, folder, emoji or shapes)")


class _Crops(Dataset):
    """Sample i -> centre crop and its flip as [-1, 1] tensors, or a skip record (decoded in workers)."""

    def __init__(self, source, indices: list[int], size: int) -> None:
        self.source, self.indices, self.size = source, indices, size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict[str, Any]:
        i = self.indices[k]
        try:
            image, text = self.source.read(i)
        except CorruptSample as err:
            return {"skip": self.source.describe(i), "reason": str(err)}
        crop = adm_center_crop(image, self.size)
        return {"image": to_tensor(crop), "image_flip": to_tensor(crop.transpose(Image.FLIP_LEFT_RIGHT)),
                "caption": text, "source": self.source.describe(i)}


def _collate(items: list[dict]) -> list[dict]:
    return items


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------

def shard_names(s: int) -> tuple[str, str]:
    return f"shard-{s:06d}.safetensors", f"shard-{s:06d}.json"


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _atomic_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def shard_done(out: Path, s: int) -> bool:
    data, caps = shard_names(s)
    return (out / data).is_file() and (out / caps).is_file()


def write_index(out: Path, meta: dict) -> bool:
    """Write index.json when every shard is complete (idempotent; any process may do it)."""
    shards = []
    skipped = 0
    for s in range(meta["num_shards"]):
        if not shard_done(out, s):
            return False
        data, caps = shard_names(s)
        info = json.loads((out / caps).read_text())
        shards.append({"name": data, "captions": caps, "n": len(info["captions"])})
        skipped += len(info.get("skipped", []))
    if not (out / NULL_CAPTION_FILE).is_file():
        return False
    _atomic_json(out / "index.json", {"version": CACHE_VERSION, "meta": meta, "shards": shards,
                                      "num_samples": sum(s["n"] for s in shards), "skipped": skipped,
                                      "null_caption": NULL_CAPTION_FILE})
    return True


def holds_work(out: Path) -> bool:
    """Whether a cache directory holds anything beyond its meta.json (a shard, the null caption)."""
    return any(p.name != "meta.json" and not p.name.startswith("meta.json.tmp") for p in out.iterdir())


def dist_env() -> tuple[int, int, int]:
    """(rank, world, local_rank) from torchrun / accelerate launch variables (1 process otherwise)."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", rank))
    return rank, world, local


# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------

def extract(recipe: TrainRecipe, out: str | Path, max_samples: int | None = None, shard_size: int = 1024,
            batch_size: int = 64, num_workers: int = 4, rank: int | None = None, world: int | None = None,
            device: str = "auto", precision: str = "auto", progress: bool = True) -> dict:
    """Write (or finish) this process's shards of the cache; returns a summary dict. precision
    "auto" is bf16 on CUDA (T5 weights in bf16 too: T5-XXL takes 9.5 GB instead of 19, as in the
    trainer) and fp32 on the CPU."""
    from dream_core.image_tokenizer import ImageTokenizer, encoder_fingerprint
    from dream_core.text import ConditioningTextEncoder, t5_fingerprint

    recipe = recipe.resolved()  # init_from: the model directory's vae/ and text/ by default, as the trainer
    env_rank, env_world, local_rank = dist_env()
    rank = env_rank if rank is None else rank
    world = env_world if world is None else world
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, world) with world >= 1, got rank={rank}, world={world}")
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size and batch_size must be >= 1, got {shard_size}, {batch_size}")
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"--max-samples must be >= 1, got {max_samples}")
    on_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if precision == "auto":
        precision = "bf16" if on_cuda else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    for key in ("vae_path", "t5_path"):
        value = getattr(recipe, key)
        if not value or not Path(value).is_dir():
            raise ValueError(f"recipe.{key}={value!r} must be a local directory (nothing is downloaded)")
    config = recipe.model_config()  # vae_stride, vae_channels, scaling factor, t5_dim: from the weights' configs
    source = extraction_source(recipe, max_samples)
    n = len(source) if max_samples is None else min(len(source), max_samples)
    num_shards = math.ceil(n / shard_size)
    meta = {
        "version": CACHE_VERSION, "recipe": recipe.name, "data": recipe.data,
        "data_path": str(Path(recipe.data_path).resolve()) if recipe.data_path else "",
        "seed": recipe.seed if recipe.data == "shapes" else None,
        "num_source_samples": len(source), "num_samples_requested": n, "shard_size": shard_size,
        "num_shards": num_shards, "image_size": config.image_size, "latent_channels": config.vae_channels,
        "latent_size": config.latent_size, "t5_dim": config.t5_dim, "t5_max_length": config.t5_max_length,
        "vae_path": str(Path(recipe.vae_path).resolve()), "t5_path": str(Path(recipe.t5_path).resolve()),
        # what the cached moments and T5 states were computed with (the trainer checks its own against them)
        "vae_encoder_fingerprint": encoder_fingerprint(recipe.vae_path), "t5_fingerprint": t5_fingerprint(recipe.t5_path),
        "moments_dtype": "float32", "t5_dtype": "float16", "precision": precision,
    }
    meta_file = out / "meta.json"
    if meta_file.is_file():
        try:
            old = json.loads(meta_file.read_text())
        except json.JSONDecodeError:
            old = {}
        diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
        if diff and holds_work(out):
            raise ValueError(f"cache {out} was written with other settings ({', '.join(diff)}); "
                             "use a new --out (nothing was overwritten)")
        if diff:  # only the settings of a run that wrote nothing: not worth keeping
            meta_file.unlink()

    todo = [s for s in range(rank, num_shards, world) if not shard_done(out, s)]
    need_null = rank == 0 and not (out / NULL_CAPTION_FILE).is_file()
    summary = {"rank": rank, "world": world, "num_shards": num_shards, "written": [], "skipped": 0}
    if todo or need_null:
        if device == "auto":
            device = f"cuda:{local_rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"
        dev = torch.device(device)
        tokenizer = ImageTokenizer.from_pretrained(recipe.vae_path, config.patch_size).to(dev)
        if tokenizer.channels != config.vae_channels:
            raise ValueError(f"the VAE at {recipe.vae_path} has {tokenizer.channels} latent channels but "
                             f"config.vae_channels={config.vae_channels}")
        if dev.type == "cuda":
            configure_cuda()  # TF32 for what autocast leaves in fp32
        t5_dtype = torch.bfloat16 if precision == "bf16" else None
        t5 = ConditioningTextEncoder.from_pretrained(recipe.t5_path, config.t5_max_length, torch_dtype=t5_dtype).to(dev)
        if t5.dim != config.t5_dim:
            raise ValueError(f"T5 at {recipe.t5_path} has d_model={t5.dim} but config.t5_dim={config.t5_dim}")
    # Written once the weights passed their checks: a failed first run leaves nothing that blocks
    # the same command (or a corrected one).
    out.mkdir(parents=True, exist_ok=True)
    if not meta_file.is_file():
        _atomic_json(meta_file, meta)
    if todo or need_null:
        autocast = (torch.autocast(dev.type, dtype=torch.bfloat16) if precision == "bf16"
                    else torch.autocast(dev.type, enabled=False))
        if need_null:
            hidden, mask = t5([""])
            _atomic_tensors(out / NULL_CAPTION_FILE, {"t5_hidden": hidden.half().cpu(), "t5_mask": mask.cpu()})
        bar = None
        if progress and rank == 0 and todo:
            from tqdm import tqdm

            bar = tqdm(total=len(todo), desc="cache shards", dynamic_ncols=True)
        for s in todo:
            for stale in out.glob(f"shard-{s:06d}.*.tmp*"):  # left by a killed process
                stale.unlink(missing_ok=True)
            indices = list(range(s * shard_size, min(n, (s + 1) * shard_size)))
            loader = DataLoader(_Crops(source, indices, config.image_size), batch_size=batch_size,
                                num_workers=num_workers, collate_fn=_collate)
            parts: dict[str, list[torch.Tensor]] = {"moments": [], "moments_flip": [], "t5_hidden": [], "t5_mask": []}
            captions, sources, skipped = [], [], []
            for items in loader:
                good = [it for it in items if "skip" not in it]
                skipped += [{"source": it["skip"], "reason": it["reason"]} for it in items if "skip" in it]
                if not good:
                    continue
                with torch.no_grad(), autocast:
                    images = torch.stack([it["image"] for it in good]).to(dev)
                    flips = torch.stack([it["image_flip"] for it in good]).to(dev)
                    parts["moments"].append(tokenizer.moments(images).float().cpu())
                    parts["moments_flip"].append(tokenizer.moments(flips).float().cpu())
                    hidden, mask = t5([it["caption"] for it in good])
                parts["t5_hidden"].append(hidden.half().cpu())
                parts["t5_mask"].append(mask.cpu())
                captions += [it["caption"] for it in good]
                sources += [it["source"] for it in good]
            data_name, caps_name = shard_names(s)
            if captions:
                tensors = {k: torch.cat(v) for k, v in parts.items()}
            else:  # every sample of the shard was unreadable: an empty shard keeps the numbering
                c, hw = 2 * config.vae_channels, config.latent_size
                tensors = {"moments": torch.zeros(0, c, hw, hw), "moments_flip": torch.zeros(0, c, hw, hw),
                           "t5_hidden": torch.zeros(0, config.t5_max_length, config.t5_dim, dtype=torch.float16),
                           "t5_mask": torch.zeros(0, config.t5_max_length, dtype=torch.bool)}
            _atomic_tensors(out / data_name, tensors, metadata={"n": str(len(captions))})
            _atomic_json(out / caps_name, {"captions": captions, "sources": sources, "skipped": skipped})
            summary["written"].append(s)
            summary["skipped"] += len(skipped)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
    summary["index"] = write_index(out, meta)
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", required=True, help="recipe whose data, VAE, T5 and model geometry are cached")
    ap.add_argument("--out", type=Path, required=True, help="cache directory (resumed when it exists)")
    ap.add_argument("--max-samples", type=int, default=None, help="cache only the first N samples")
    ap.add_argument("--shard-size", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--num-workers", type=int, default=4, help="image decoding workers per process")
    ap.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK when available), cpu, cuda:N")
    ap.add_argument("--precision", default="auto", choices=PRECISIONS,
                    help="the VAE and T5 under bf16 autocast (T5 weights in bf16) or in fp32; auto: bf16 on CUDA")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("overrides", nargs="*", help="recipe overrides key=value (model.KEY=value for the model config)")
    return ap.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        recipe = get_recipe(args.recipe).overrides(args.overrides)
        summary = extract(recipe, args.out, max_samples=args.max_samples, shard_size=args.shard_size,
                          batch_size=args.batch_size, num_workers=args.num_workers, device=args.device,
                          precision=args.precision)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2)
    print(json.dumps({k: v for k, v in summary.items() if k != "written"} | {"shards_written": len(summary["written"])}))
    return summary


if __name__ == "__main__":
    main()
