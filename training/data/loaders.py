"""Build the training DataLoader for a recipe: Shapes World stream, image folders, webdataset
shards or the latent/T5 cache. Batches are dicts with `caption` (list of str) and either `image`
([B, 3, H, W] in [-1, 1]) or `moments` (cached VAE posterior), optionally `t5_hidden`/`t5_mask`."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from dream_core.config import DreamConfig
from training.data.shapes_world import ShapesWorldDataset


def collate(samples: list[dict]) -> dict:
    """Tensors are stacked; anything else (captions, hard-negative caption lists) stays a list."""
    out: dict = {}
    for key, first in samples[0].items():
        values = [s[key] for s in samples]
        out[key] = torch.stack(values) if isinstance(first, torch.Tensor) else values
    return out


def stream_seed(seed: int, start_step: int) -> int:
    """A resumed run continues on a fresh, deterministic part of an endless stream."""
    return seed * 1_000_003 + start_step


def build_dataloader(recipe, config: DreamConfig, rank: int = 0, world: int = 1, start_step: int = 0,
                     source=None) -> DataLoader:
    """`source`: the recipe's already opened file source (training.data.sources.open_source), if any."""
    from training.data import sources  # image folders, webdataset shards and the latent cache

    if recipe.data == "shapes":
        if config.image_size != 64:
            raise ValueError(f"the Shapes World renders 64 x 64 images, but config.image_size={config.image_size}")
        ds = ShapesWorldDataset(seed=stream_seed(recipe.seed, start_step), rank=rank,
                                hard_negatives=recipe.hard_negatives)
        # An own generator: iter(loader) must not draw from the global RNG (exact resume).
        return DataLoader(ds, batch_size=recipe.batch_size, num_workers=sources.data_workers(recipe.num_workers),
                          collate_fn=collate, generator=torch.Generator().manual_seed(recipe.seed))
    return sources.build_dataloader(recipe, config, rank=rank, world=world, start_step=start_step, source=source)
