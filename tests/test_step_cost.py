"""bench.step_cost on the tiny model's VAE and T5: every arm is timed with its own overrides, the
first is the reference, and a malformed arm or bad override is one clear error."""

from __future__ import annotations

import argparse

import pytest

from bench import step_cost
from dream_core.config import DreamConfig


def test_step_cost_times_each_arm_against_the_first(tiny_model_dir, monkeypatch):
    shared = ["model=tiny", f"vae_path={tiny_model_dir / 'vae'}", f"t5_path={tiny_model_dir / 'text'}",
              "model.vae_scaling_factor=0.5", "model.t5_path=text"]
    built = []
    real = step_cost.arm_step
    monkeypatch.setattr(step_cost, "arm_step", lambda recipe, *a: built.append(recipe) or real(recipe, *a))
    report = step_cost.main(["--recipe", "shapes", "--arm", "base=", "--arm", "wide=model.width=64 model.mlp_dim=128",
                             "--batch", "4", "--repeats", "2", "--threads", "1", *shared])
    rows = [line for line in report.splitlines() if line.startswith("| base") or line.startswith("| wide")]
    assert [r.split("|")[1].strip() for r in rows] == ["base", "wide"]
    assert rows[0].split("|")[-2].strip() == "1.00x"  # the first arm against itself, round by round
    assert float(rows[1].split("|")[-2].strip().rstrip("x")) > 0
    assert [r.model_config().width for r in built] == [DreamConfig.preset("tiny").width, 64]
    assert built[1].model_config().mlp_dim == 128 and built[0].t5_path == built[1].t5_path


def test_step_cost_refuses_a_malformed_arm_and_a_bad_override(capsys):
    with pytest.raises(argparse.ArgumentTypeError, match="--arm must look like NAME=key=value"):
        step_cost.parse_arm("width256")
    assert step_cost.parse_arm("W=model.width=256 model.num_heads=4") == ("W", ["model.width=256", "model.num_heads=4"])
    with pytest.raises(SystemExit):
        step_cost.parse_args(["--recipe", "shapes", "--arm", "a=", "--arm", "a=seed=2"])
    assert "--arm names must differ" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        step_cost.main(["--recipe", "shapes", "--arm", "a=masking=sideways"])
    assert err.value.code == 2 and "recipe.masking must be one of" in capsys.readouterr().err
