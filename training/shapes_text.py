"""The Shapes World's conditioning text encoder: a small T5 (2 layers, width 128) with a
SentencePiece vocabulary trained on Shapes World captions, saved in transformers format.

No pretrained T5 can be downloaded here. The encoder stays frozen at its random initialisation
(as a pretrained T5 stays frozen in the paper); the trainable 2-layer aligner learns to read it.

    python -m training.shapes_text --out runs/text
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from dream_core.text import build_t5_from_scratch
from training.data.shapes_world import caption, full_caption_bank, random_scene, two_object_captions


def shapes_corpus(n: int = 20000, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    corpus = [caption(random_scene(rng), rng) for _ in range(n)]
    return corpus + full_caption_bank() + two_object_captions(rng, 2000)


def build_shapes_t5(out: Path, d_model: int = 128, seed: int = 0) -> Path:
    return build_t5_from_scratch(out, shapes_corpus(seed=seed), d_model=d_model, num_layers=2, num_heads=4,
                                 d_ff=256, vocab_size=100, seed=seed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--d-model", type=int, default=128)
    args = ap.parse_args()
    print(build_shapes_t5(args.out, args.d_model))


if __name__ == "__main__":
    main()
