"""Shared fixtures: a tiny random DREAM model directory built (and saved) by the tests themselves:
a tiny diffusers AutoencoderKL, a tiny T5 with a SentencePiece vocabulary trained on Shapes World
captions, and a tiny DreamModel. Nothing is downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

TINY_CAPTIONS = [
    "a small red circle at the top left on a white background",
    "a large blue square in the middle on a black background",
    "a big green triangle on the right",
    "a tiny yellow diamond at the bottom",
    "a purple cross",
    "an orange circle in the top right corner on a gray background",
]


def tiny_corpus() -> list[str]:
    from training.data.shapes_world import caption, random_scene

    rng = np.random.default_rng(0)
    return [caption(random_scene(rng), rng) for _ in range(400)] + TINY_CAPTIONS


def build_tiny_vae(path: Path, image_size: int = 32):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        block_out_channels=(8, 8, 8), layers_per_block=1, norm_num_groups=4,
                        sample_size=image_size, scaling_factor=0.5)
    vae.save_pretrained(path, safe_serialization=True)
    return vae


def build_tiny_model_dir(root: Path) -> Path:
    """A complete model directory for the `tiny` preset."""
    from dream_core import DreamConfig, DreamModel, DreamPipeline
    from dream_core.image_tokenizer import ImageTokenizer
    from dream_core.text import ConditioningTextEncoder, build_t5_from_scratch

    config = DreamConfig.preset("tiny").replace(vae_scaling_factor=0.5)
    build_tiny_vae(root / "vae_src", config.image_size)
    build_t5_from_scratch(root / "text_src", tiny_corpus(), d_model=config.t5_dim, num_layers=1,
                          num_heads=2, d_ff=64, vocab_size=96)
    torch.manual_seed(0)
    model = DreamModel(config)
    # Random projector BN statistics would make every score equal; run a few batches in train mode.
    pipe = DreamPipeline(model, ImageTokenizer.from_pretrained(root / "vae_src", config.patch_size),
                         ConditioningTextEncoder.from_pretrained(root / "text_src", config.t5_max_length),
                         captions=TINY_CAPTIONS, text_dir=root / "text_src")
    out = root / "model"
    pipe.save_pretrained(out, model_card="# tiny test model\n")
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_pipe(tiny_model_dir):
    from dream_core import DreamPipeline

    return DreamPipeline.from_pretrained(tiny_model_dir, device="cpu")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (pytestmark = pytest.mark.usefixtures("one_thread")): tiny
    ops are latency-bound, so the module runs faster and is immune to a busy sibling core."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def app_dirs(tmp_path_factory):
    """The app's data, cache and Gradio temp folders live in the test's tmp dir."""
    root = tmp_path_factory.mktemp("app")
    keys = {"XDG_DATA_HOME": root / "data", "XDG_CACHE_HOME": root / "cache", "GRADIO_TEMP_DIR": root / "gradio"}
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: str(v) for k, v in keys.items()})
    yield root
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def client(served, app_dirs):
    """A gradio_client on the module's `served` app (each app test module defines `served`)."""
    from gradio_client import Client

    c = Client(served[0], verbose=False, download_files=str(app_dirs / "downloads"))
    yield c
    c.close()
