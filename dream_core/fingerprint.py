"""Content fingerprints of weights: what derived data (a latent cache, cached T5 states, a results
table) was computed with, so a trainer can refuse data made by other weights instead of training on it
silently, and a test can tell a results table measured on older weights from the bundled model.

A fingerprint hashes tensors (name, dtype, shape, bytes) read from safetensors files, not the files
themselves: a re-saved copy of the same weights (a model directory's `vae/` and `text/` after
`save_pretrained`) has the same fingerprint, other weights a different one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

import torch

# Bytes hashed per tensor when a cap is asked for: a retrained or different model differs in the
# first MiB of every tensor, and a T5-XXL encoder is read in pieces of 1 MiB, not its ~19 GB.
TENSOR_PREFIX_BYTES = 2**20


# model.safetensors up to this size is hashed whole; a larger one by its path, size and mtime, so
# fingerprinting a paper-size model does not read gigabytes.
WHOLE_FILE_HASH_MAX_BYTES = 512 * 2**20


def model_fingerprint(path: str | Path) -> str:
    """The fingerprint of a model directory (`DreamPipeline.weights_fingerprint()` of the model loaded
    from it), without loading it: sha256 (16 hex digits) of its config.json and model.safetensors.
    The config is hashed as the file holds it, not as `DreamConfig` reads it with today's defaults:
    a config field added later (which loads with the value old models always used) leaves every
    recorded fingerprint valid, while an edit of the file changes it."""
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    weights = path / "model.safetensors"
    st = weights.stat()
    if st.st_size < WHOLE_FILE_HASH_MAX_BYTES:
        h.update(hashlib.sha256(weights.read_bytes()).digest())
    else:
        h.update(f"{weights.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def safetensors_files(directory: str | Path) -> list[Path]:
    """The `*.safetensors` files of a weights directory (sharded checkpoints have several), sorted."""
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{directory} holds no .safetensors weights")
    return files


def tensors_fingerprint(files: Iterable[str | Path], prefixes: tuple[str, ...] = (),
                        max_bytes: int | None = None, extra: str = "") -> str:
    """sha256 (16 hex digits) over the tensors of `files` whose names start with one of `prefixes`
    (all when empty), in name order, each as name, dtype, shape and its first `max_bytes` bytes (all
    when None), then `extra` (what else changes the output, such as a tokenizer's vocabulary)."""
    from safetensors import safe_open

    h = hashlib.sha256()
    pieces: list[tuple[str, bytes]] = []
    for file in files:
        with safe_open(str(file), "pt") as f:
            for name in f.keys():
                if prefixes and not name.startswith(prefixes):
                    continue
                piece = f.get_slice(name)
                shape, dtype = piece.get_shape(), piece.get_dtype()
                tensor = f.get_tensor(name) if max_bytes is None else _prefix(piece, shape, max_bytes)
                data = tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()[:max_bytes]
                pieces.append((name, f"{name}|{dtype}|{list(shape)}|".encode() + data))
    if not pieces:
        raise ValueError(f"no tensor named {' or '.join(p + '*' for p in prefixes)} in {[str(f) for f in files]}")
    for _, piece_bytes in sorted(pieces, key=lambda item: item[0]):
        h.update(piece_bytes)
    h.update(extra.encode())
    return h.hexdigest()[:16]


def _prefix(piece, shape: list[int], max_bytes: int):
    """At least the first `max_bytes` bytes of a tensor, reading whole rows of its first dimension."""
    if not shape:
        return piece[:]
    row = 1
    for d in shape[1:]:
        row *= d
    rows = max(1, -(-max_bytes // max(1, row)))  # an element is >= 1 byte
    return piece[: min(shape[0], rows)]
