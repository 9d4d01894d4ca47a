"""Content fingerprints of weight files (dream_core.fingerprint)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from dream_core.fingerprint import safetensors_files, tensors_fingerprint


def test_a_fingerprint_follows_the_tensors_not_the_file(tmp_path):
    a = {"encoder.w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "decoder.w": torch.ones(2)}
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(dict(reversed(list(a.items()))), str(tmp_path / "b.safetensors"), metadata={"other": "header"})
    fp = tensors_fingerprint([tmp_path / "a.safetensors"])
    assert len(fp) == 16 and fp == tensors_fingerprint([tmp_path / "b.safetensors"])  # same tensors, other bytes
    # Only the named tensors count; the extra settings do.
    only_encoder = tensors_fingerprint([tmp_path / "a.safetensors"], ("encoder.",))
    save_file({**a, "decoder.w": torch.zeros(2)}, str(tmp_path / "c.safetensors"))
    assert tensors_fingerprint([tmp_path / "c.safetensors"], ("encoder.",)) == only_encoder
    assert tensors_fingerprint([tmp_path / "c.safetensors"]) != fp
    assert tensors_fingerprint([tmp_path / "a.safetensors"], extra="x") != fp
    # dtype and shape are part of it.
    save_file({**a, "encoder.w": a["encoder.w"].reshape(4, 3)}, str(tmp_path / "d.safetensors"))
    save_file({**a, "encoder.w": a["encoder.w"].double()}, str(tmp_path / "e.safetensors"))
    assert len({only_encoder, *(tensors_fingerprint([tmp_path / f"{n}.safetensors"], ("encoder.",)) for n in "de")}) == 3


def test_a_capped_fingerprint_reads_each_tensors_first_bytes(tmp_path):
    w = torch.zeros(64, 8)  # rows of 32 bytes
    save_file({"w": w}, str(tmp_path / "a.safetensors"))
    w2 = w.clone()
    w2[-1, -1] = 1.0  # beyond the first 64 bytes (two rows)
    save_file({"w": w2}, str(tmp_path / "b.safetensors"))
    w3 = w.clone()
    w3[1, 7] = 1.0  # the 64th byte
    save_file({"w": w3}, str(tmp_path / "c.safetensors"))
    capped = [tensors_fingerprint([tmp_path / f"{n}.safetensors"], max_bytes=64) for n in "abc"]
    assert capped[0] == capped[1] != capped[2]
    assert tensors_fingerprint([tmp_path / "a.safetensors"]) != tensors_fingerprint([tmp_path / "b.safetensors"])


def test_missing_weights_and_names_are_refused(tmp_path):
    with pytest.raises(ValueError, match="holds no .safetensors weights"):
        safetensors_files(tmp_path)
    save_file({"decoder.w": torch.ones(2)}, str(tmp_path / "a.safetensors"))
    with pytest.raises(ValueError, match=r"no tensor named encoder\.\* or quant_conv\.\* in"):
        tensors_fingerprint(safetensors_files(tmp_path), ("encoder.", "quant_conv."))
