"""The Shapes World VAE trainer (training/vae.py): a full run, and a decoder-only run that keeps the
latent space (encoder and scaling factor) bit for bit; bench/vae_round_trip.py reads both."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def _state(path: Path) -> dict[str, torch.Tensor]:
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(str(path)).state_dict()


@pytest.mark.slow  # the scaling factor is read from 512 encoded renders
def test_decoder_only_keeps_the_latent_space_and_trains_the_decoder(tmp_path, capsys):
    from diffusers import AutoencoderKL

    from training.vae import train_vae

    base = tmp_path / "base"
    summary = train_vae(base, steps=2, batch_size=2, log_every=1)
    assert summary["decoder_only"] is False and (base / "config.json").is_file()
    scale = AutoencoderKL.load_config(str(base))["scaling_factor"]
    assert scale != 1.0  # set from the latents' spread

    dec = tmp_path / "dec"
    summary = train_vae(dec, steps=2, batch_size=2, lr=1e-2, init=base, decoder_only=True, seed=3)
    assert summary["decoder_only"] is True and summary["scaling_factor"] == scale
    assert AutoencoderKL.load_config(str(dec))["scaling_factor"] == scale
    before, after = _state(base), _state(dec)
    assert set(before) == set(after)
    kept = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    moved = [k for k in before if k.startswith("decoder.") and not torch.equal(before[k], after[k])]
    assert kept and all(torch.equal(before[k], after[k]) for k in kept)
    assert moved  # the decoder trained

    with pytest.raises(ValueError, match="--decoder-only needs --init"):
        train_vae(tmp_path / "x", steps=1, batch_size=2, decoder_only=True)

    from bench import vae_round_trip

    capsys.readouterr()
    vae_round_trip.main(["--vae", f"base={base}", f"dec={dec}", "--n", "6", "--threads", "1"])
    out = capsys.readouterr().out
    assert "| renders | n | base | dec |" in out and "| all | 6 |" in out
    with pytest.raises(SystemExit):
        vae_round_trip.main(["--vae", f"nope={tmp_path / 'missing'}", "--n", "2"])
    assert "--vae takes NAME=DIR" in capsys.readouterr().err


def test_decoder_only_needs_init_on_the_command_line(tmp_path, capsys, monkeypatch):
    from training import vae

    monkeypatch.setattr(sys, "argv", ["vae", "--out", str(tmp_path / "v"), "--decoder-only"])
    with pytest.raises(SystemExit) as err:
        vae.main()
    assert err.value.code == 2
    assert "--decoder-only needs --init" in capsys.readouterr().err
    assert not (tmp_path / "v").exists()


def test_a_new_wider_decoder_keeps_the_encoder_and_its_latents(tmp_path):
    """`--decoder-only --decoder-channels`: an AsymmetricAutoencoderKL with the source's encoder,
    quant_conv and scaling factor bit for bit (the same latents, so a DREAM model trained on them
    stays valid) and a new decoder of the asked width, which the tokenizer and the recipe read."""
    from conftest import build_tiny_vae

    from dream_core.image_tokenizer import ImageTokenizer, load_vae
    from training.recipes import weights_geometry
    from training.vae import with_new_decoder

    src = build_tiny_vae(tmp_path / "src", image_size=32)
    wide = with_new_decoder(src, (16, 16, 32), layers_per_block=2)
    assert type(wide).__name__ == "AsymmetricAutoencoderKL"
    assert wide.config.scaling_factor == 0.5 and list(wide.config.up_block_out_channels) == [16, 16, 32]
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(src.encode(x).latent_dist.mean, wide.encode(x).latent_dist.mean)
    wide.save_pretrained(tmp_path / "wide", safe_serialization=True)

    tok = ImageTokenizer.from_pretrained(tmp_path / "wide", patch_size=2)
    old = ImageTokenizer.from_pretrained(tmp_path / "src", patch_size=2)
    assert torch.equal(tok.encode(x), old.encode(x))  # the same tokens
    assert tok.decode(tok.encode(x)).shape == (2, 3, 32, 32)
    assert weights_geometry(str(tmp_path / "wide"), "")["vae_stride"][0] == 4  # the encoder's 3 levels

    with pytest.raises(ValueError, match="needs 3 levels"):
        with_new_decoder(src, (16, 32))
    with pytest.raises(ValueError, match="multiples of norm_num_groups=4"):
        with_new_decoder(src, (16, 16, 30))
    cfg = tmp_path / "wide" / "config.json"
    cfg.write_text(cfg.read_text().replace("AsymmetricAutoencoderKL", "VQModel"))
    with pytest.raises(ValueError, match="holds a VQModel; expected one of"):
        load_vae(tmp_path / "wide")


def test_decoder_only_trains_a_new_decoder_and_continues_it(tmp_path):
    from conftest import build_tiny_vae

    from dream_core.image_tokenizer import load_vae
    from training.vae import train_vae

    build_tiny_vae(tmp_path / "src", image_size=64)
    src = _state(tmp_path / "src")
    summary = train_vae(tmp_path / "wide", steps=2, batch_size=2, lr=1e-2, init=tmp_path / "src",
                        decoder_only=True, decoder_channels=(16, 16, 16))
    assert summary["decoder_channels"] == [16, 16, 16] and summary["scaling_factor"] == 0.5
    wide = load_vae(tmp_path / "wide")
    assert type(wide).__name__ == "AsymmetricAutoencoderKL"
    state = wide.state_dict()
    assert all(torch.equal(src[k], state[k]) for k in src if k.startswith(("encoder.", "quant_conv.")))
    # continuing it (no --decoder-channels) keeps the asymmetric decoder and moves only the decoder
    train_vae(tmp_path / "wide2", steps=2, batch_size=2, lr=1e-2, init=tmp_path / "wide", decoder_only=True, seed=1)
    after = load_vae(tmp_path / "wide2").state_dict()
    trained = [k for k in state if k.startswith("decoder.") and not k.startswith("decoder.condition_encoder.")]
    assert any(not torch.equal(state[k], after[k]) for k in trained)
    assert all(torch.equal(state[k], after[k]) for k in state if k.startswith(("encoder.", "quant_conv."))
               or k.startswith("decoder.condition_encoder."))
    config = (tmp_path / "wide2" / "config.json").read_text()
    assert '"block_out_channels"' not in config and "force_upcast" not in config  # loads without a warning
    with pytest.raises(ValueError, match="--decoder-channels needs --decoder-only"):
        train_vae(tmp_path / "x", steps=1, batch_size=2, init=tmp_path / "src", decoder_channels=(16, 16, 16))
    with pytest.raises(ValueError, match="--decoder-layers needs --decoder-channels"):
        train_vae(tmp_path / "x", steps=1, batch_size=2, init=tmp_path / "src", decoder_only=True, decoder_layers=2)


def test_object_weights_boost_the_object_and_its_outline_on_both_sides():
    from training.vae import object_weights

    x = torch.full((1, 3, 8, 8), -1.0)  # a black image holding a white 3 x 3 square at rows/cols 2-4
    x[:, :, 2:5, 2:5] = 1.0
    plain = object_weights(x, 9.0)
    assert plain[0, 0, 3, 3] == 10.0 and plain[0, 0, 0, 0] == 1.0 and plain.shape == (1, 1, 8, 8)
    assert int((plain == 10.0).sum()) == 9  # the object's pixels, nothing else
    w = object_weights(x, 9.0, edge_boost=4.0)[0, 0]
    assert w[3, 3] == 10.0  # the square's centre is not on its outline
    assert w[2, 2] == 14.0 and w[4, 3] == 14.0  # the object's border pixels
    assert w[1, 1] == 5.0 and w[5, 3] == 5.0  # background pixels touching the object (a cross's concave corners)
    assert w[0, 0] == 1.0 and w[6, 6] == 1.0 and w[3, 7] == 1.0  # background farther away


def test_negative_loss_weights_are_refused_before_training(tmp_path, capsys, monkeypatch):
    from training import vae

    monkeypatch.setattr(sys, "argv", ["vae", "--out", str(tmp_path / "v"), "--edge-boost", "-1"])
    with pytest.raises(SystemExit) as err:
        vae.main()
    assert err.value.code == 2
    assert "--object-boost and --edge-boost are extra loss weights (>= 0)" in capsys.readouterr().err
    assert not (tmp_path / "v").exists()
