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

    sys.path.insert(0, str(ROOT / "bench"))
    import vae_round_trip

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
