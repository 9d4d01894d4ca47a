"""Rerankers: score finished candidate images against the prompt with another model, the paper's
comparison for SAD (`Setting(k, rerank=True)` in `DreamPipeline.generate_batch` keeps the best).
Each has `scores(images, prompt)` (a `semantic_decoding.Reranker`)."""

from __future__ import annotations

from pathlib import Path

import torch

from .pipeline import DreamPipeline


class DreamReranker:
    """Scores finished images with another DREAM model directory's joint space (e.g. one trained
    with the contrastive-only `shapes-clip` recipe): its own VAE encodes each image, its encoder
    embeds the latent with nothing masked, its text tower embeds the prompt; score = cosine."""

    def __init__(self, model_dir: str | Path, device: str | torch.device = "cpu") -> None:
        self.pipe = DreamPipeline.from_pretrained(model_dir, device=device)

    @torch.inference_mode()
    def scores(self, images: list, prompt: str) -> torch.Tensor:
        img = self.pipe.embed_images(list(images))
        txt = self.pipe.embed_texts([prompt])
        return (img @ txt.t()).squeeze(-1).float().cpu()


class ExternalReranker:
    """Scores finished images against the prompt with an open_clip model loaded from local weights."""

    def __init__(self, arch: str, weights: str | Path, device: str = "cpu") -> None:
        import open_clip

        weights = Path(weights)
        if not weights.is_file():
            raise ValueError(f"external reranker weights not found: {weights} (no download is attempted)")
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=str(weights), device=device)
        self.model, self.preprocess = model.eval(), preprocess
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.device = device

    @torch.inference_mode()
    def scores(self, images: list, prompt: str) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(im) for im in images]).to(self.device)
        img = torch.nn.functional.normalize(self.model.encode_image(pixels), dim=-1)
        txt = torch.nn.functional.normalize(self.model.encode_text(self.tokenizer([prompt]).to(self.device)), dim=-1)
        return (img @ txt.t()).squeeze(-1).float().cpu()
