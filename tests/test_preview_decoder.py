"""The optional preview decoder (diffusers AutoencoderTiny) for live previews: building it,
decoding with it, loading and saving it with a model directory, and distilling it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from dream_core import DreamPipeline
from dream_core.image_tokenizer import ImageTokenizer
from dream_core.pipeline import PREVIEW_DIR
from training.preview_decoder import build_preview_decoder, distill, main


def test_build_preview_decoder_upsamples_by_the_vae_stride():
    dec = build_preview_decoder(4, 4, channels=8).eval()
    with torch.no_grad():
        out = dec.decode(torch.randn(2, 4, 8, 8)).sample
    assert out.shape == (2, 3, 32, 32)
    assert build_preview_decoder(4, 8, channels=8).decode(torch.randn(1, 4, 4, 4)).sample.shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="power of 2"):
        build_preview_decoder(4, 3)
    with pytest.raises(ValueError, match="needs 3 entries"):
        build_preview_decoder(4, 4, blocks_per_level=(1, 1))


def test_tokenizer_decode_preview(tiny_model_dir):
    tok = ImageTokenizer.from_pretrained(tiny_model_dir / "vae", patch_size=2)
    tokens = torch.randn(3, 16, 16)  # tiny preset: 4 x 4 tokens of 4 channels x 2 x 2
    full = tok.decode(tokens)
    assert torch.equal(tok.decode_preview(tokens), full)  # no preview decoder: the VAE itself
    tok.set_preview_decoder(build_preview_decoder(4, 4, channels=8))
    preview = tok.decode_preview(tokens)
    assert preview.shape == full.shape and preview.abs().max() <= 1 and not torch.equal(preview, full)
    with pytest.raises(ValueError, match="reads 8 latent channels but the VAE has 4"):
        tok.set_preview_decoder(build_preview_decoder(8, 4, channels=8))


def test_pipeline_loads_and_saves_the_preview_decoder(tiny_model_dir, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    torch.manual_seed(0)
    build_preview_decoder(4, 4, channels=8).save_pretrained(model_dir / PREVIEW_DIR, safe_serialization=True)
    pipe = DreamPipeline.from_pretrained(model_dir, device="cpu")
    assert pipe.image_tokenizer.preview_decoder is not None
    tokens = torch.randn(2, pipe.config.seq_len, pipe.config.token_dim)
    previews = pipe.decode_previews(tokens)
    assert [im.size for im in previews] == [(32, 32)] * 2
    assert [im.tobytes() for im in previews] != [im.tobytes() for im in pipe.decode_tokens(tokens)]
    pipe.save_pretrained(tmp_path / "copy")
    assert "block_out_channels" not in json.loads((tmp_path / "copy" / PREVIEW_DIR / "config.json").read_text())
    again = DreamPipeline.from_pretrained(tmp_path / "copy", device="cpu")
    assert [im.tobytes() for im in again.decode_previews(tokens)] == [im.tobytes() for im in previews]
    (model_dir / PREVIEW_DIR / "extra.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="pickle files"):
        DreamPipeline.from_pretrained(model_dir, device="cpu")


def test_distill_learns_to_match_the_vae(tiny_model_dir):
    tok = ImageTokenizer.from_pretrained(tiny_model_dir / "vae", patch_size=2)
    model, report = distill(tok, vae_stride=4, steps=40, batch_size=8, lr=3e-3, pool=32, channels=8, log_every=39)
    first, last = report["log"][0]["loss"], report["log"][-1]["loss"]
    assert last < 0.7 * first
    assert report["summary"]["heldout_l1_vs_vae"] < 1.0 and report["summary"]["decoder_parameters"] > 0
    assert model.decoder.training is False


def test_distill_cli_checks_its_model_directory(tmp_path, tiny_model_dir):
    with pytest.raises(SystemExit, match="not a model directory"):
        main(["--model", str(tmp_path)])
    with pytest.raises(SystemExit, match="must be >= 1"):
        main(["--model", str(tiny_model_dir), "--steps", "0"])
    with pytest.raises(SystemExit, match="64 x 64 Shapes World"):
        main(["--model", str(tiny_model_dir), "--steps", "1"])
