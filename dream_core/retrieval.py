"""Reverse search: image -> best captions of a caption bank, in the model's joint space.

Bank embeddings are computed once per (weights, captions) and cached on disk as safetensors in the
user's cache folder (platformdirs), so the app starts fast the second time.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Sequence

import torch
from platformdirs import user_cache_dir
from safetensors.torch import load_file, save_file

def cache_dir() -> Path:
    return Path(user_cache_dir("dream-studio", appauthor=False)) / "caption-banks"


class CaptionBank:
    def __init__(self, captions: list[str], embeddings: torch.Tensor) -> None:
        if len(captions) != embeddings.shape[0]:
            raise ValueError("captions and embeddings differ in length")
        self.captions = captions
        self.embeddings = embeddings.float()

    @classmethod
    def build(cls, embed_texts: Callable[[list[str]], torch.Tensor], fingerprint: str, captions: Sequence[str],
              use_cache: bool = True) -> "CaptionBank":
        """Embed `captions` with `embed_texts` (normalised [N, E]), or read them from the on-disk
        cache, keyed by `fingerprint` (which identifies the weights) and the captions."""
        captions = list(captions)
        if not captions:
            raise ValueError("the caption bank is empty")
        key = hashlib.sha256((fingerprint + "\n" + "\n".join(captions)).encode()).hexdigest()[:24]
        path = cache_dir() / f"{key}.safetensors"
        if use_cache and path.exists():
            try:
                emb = load_file(str(path))["embeddings"]
                if emb.shape[0] == len(captions):
                    return cls(captions, emb)
            except Exception:  # a damaged cache file is rebuilt, never trusted
                pass
        emb = embed_texts(captions).cpu()
        if use_cache:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                save_file({"embeddings": emb.contiguous()}, str(tmp))
                tmp.replace(path)
            except OSError:
                pass  # a read-only cache folder only costs speed
        return cls(captions, emb)

    def search(self, image_embedding: torch.Tensor, top_k: int = 5) -> list[tuple[str, float]]:
        """Top-k (caption, cosine) for one normalised image embedding [E]."""
        scores = self.embeddings @ image_embedding.float().cpu()
        k = min(top_k, len(self.captions))
        vals, idx = scores.topk(k)
        return [(self.captions[i], float(v)) for v, i in zip(vals.tolist(), idx.tolist())]

    def rank_of(self, image_embedding: torch.Tensor, caption: str) -> int:
        """1-based rank of `caption` for the image (for evaluation)."""
        scores = self.embeddings @ image_embedding.float().cpu()
        i = self.captions.index(caption)
        return int((scores > scores[i]).sum()) + 1
