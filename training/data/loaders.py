"""Build the training DataLoader for a recipe: the Shapes World, image folders, webdataset
shards or the latent/T5 cache. Batches are dicts with `caption` (list of str) and either `image`
([B, 3, H, W] in [-1, 1]) or `moments` (cached VAE posterior), optionally `t5_hidden`/`t5_mask`."""

from __future__ import annotations

from torch.utils.data import DataLoader

from dream_core.config import DreamConfig


def build_dataloader(recipe, config: DreamConfig, rank: int = 0, world: int = 1, start_step: int = 0,
                     source=None) -> DataLoader:
    """`source`: the recipe's already opened file source (training.data.sources.open_source), if any.
    The Shapes World is read like a file source (training.data.sources.ShapesSource, endless, in
    order), so a resumed run continues at exactly the scene where it stopped."""
    from training.data import sources  # image folders, webdataset shards and the latent cache

    if recipe.data == "shapes":
        if config.image_size != 64:
            raise ValueError(f"the Shapes World renders 64 x 64 images, but config.image_size={config.image_size}")
        source = sources.ShapesSource(recipe.seed)
    return sources.build_dataloader(recipe, config, rank=rank, world=world, start_step=start_step, source=source)
