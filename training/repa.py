"""REPA's frozen teacher: an open_clip vision tower loaded from LOCAL weights, giving one feature
per image token of the DREAM encoder (the official code uses DINOv2 through torch.hub, which needs
the internet; any open_clip ViT checkpoint on disk works here).

    teacher = RepaTeacher("ViT-B-16", "weights/open_clip_vit_b16.safetensors", tokens_per_side=16, device="cuda")
    target = teacher(images)  # images [B, 3, H, W] in [-1, 1] -> [B, 16 * 16, 768]

The images are mapped to [0, 1], bicubic-resized to the tower's input size and normalised with its
mean/std; the ViT's patch tokens (after its final LayerNorm, before the projection) are resized to
the token grid with area interpolation. `arch` may also be the path of an open_clip model-config
JSON (for architectures open_clip does not ship); its file name (without .json) is the model name.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def _resolve_arch(arch: str) -> str:
    import open_clip

    path = Path(arch)
    if arch.endswith(".json"):
        if not path.is_file():
            raise ValueError(f"REPA teacher config {arch} does not exist")
        open_clip.add_model_config(path)
        return path.stem
    if arch not in open_clip.list_models():
        raise ValueError(f"unknown open_clip architecture {arch!r} for the REPA teacher "
                         f"(pass a model-config .json path for a custom one)")
    return arch


class RepaTeacher(nn.Module):
    def __init__(self, arch: str, weights: str | Path, tokens_per_side: int, device: str | torch.device = "cpu") -> None:
        super().__init__()
        import open_clip

        if not arch:
            raise ValueError("recipe.repa_teacher_arch is empty: name an open_clip vision architecture")
        if not weights or not Path(weights).is_file():
            raise ValueError(f"REPA teacher weights {str(weights)!r} do not exist: put the open_clip checkpoint "
                             f"(.safetensors) there, or set recipe.repa_teacher_weights (nothing is downloaded)")
        if tokens_per_side < 1:
            raise ValueError(f"tokens_per_side must be >= 1, got {tokens_per_side}")
        name = _resolve_arch(arch)
        try:
            model, _, _ = open_clip.create_model_and_transforms(name, pretrained=str(weights), device="cpu")
        except (RuntimeError, KeyError) as err:  # a state dict that does not fit the architecture
            raise ValueError(f"REPA teacher weights {weights} do not match open_clip architecture {name}: {err}") from err
        visual = model.visual
        if not hasattr(visual, "grid_size") or not hasattr(visual, "output_tokens"):
            raise ValueError(f"open_clip architecture {name} has no ViT vision tower (patch tokens are needed)")
        visual.output_tokens = True
        self.visual = visual.eval().requires_grad_(False)
        cfg = open_clip.get_model_preprocess_cfg(model)
        mean = cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)
        std = cfg.get("std", open_clip.OPENAI_DATASET_STD)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.input_size = tuple(visual.image_size)
        self.grid = tuple(visual.grid_size)
        self.tokens_per_side = tokens_per_side
        self.dim = int(visual.transformer.width)
        self.to(device)

    def train(self, mode: bool = True) -> "RepaTeacher":
        return super().train(False)  # always frozen, always in eval mode

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [-1, 1] -> teacher tokens [B, tokens_per_side**2, dim] (float32)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        x = (images.float() + 1) / 2
        if tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode="bicubic", align_corners=False).clamp(0, 1)
        x = (x - self.mean) / self.std
        dtype = next(self.visual.parameters()).dtype
        _, tokens = self.visual(x.to(dtype))
        b, n, d = tokens.shape
        gh, gw = self.grid
        if n != gh * gw:  # towers that keep extra tokens (registers): take the last grid**2
            tokens = tokens[:, -gh * gw:]
        grid = tokens.float().transpose(1, 2).reshape(b, d, gh, gw)
        s = self.tokens_per_side
        grid = F.interpolate(grid, size=(s, s), mode="area")
        return grid.flatten(2).transpose(1, 2).contiguous()
