"""Tests for the memory plan (training/plan.py): per-GPU parameters, optimizer, EMA and activations
from fake tensors, and the refusal of a plan that does not fit."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from training.plan import GIB, main, plan_memory
from training.recipes import RECIPES, get_recipe

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for this module


def test_the_paper_recipes_checkpoint_gradients_by_default():
    dream = [name for name in RECIPES if name.startswith("dream-")]
    assert dream and all(RECIPES[name].grad_checkpointing for name in dream)


def test_parameters_optimizer_and_ema_per_gpu_come_from_the_model_itself():
    """The counts are the model's own (built on fake tensors), sharded over the GPUs under FSDP."""
    from dream_core.config import DreamConfig
    from dream_core.model import DreamModel

    recipe = dataclasses.replace(get_recipe("dream-base"), model="tiny", model_overrides={}, t5_path="")
    real = DreamModel(DreamConfig.preset("tiny")).num_parameters()
    ddp = plan_memory(recipe, gpus=4, gpu_memory_gib=80)
    fsdp = plan_memory(dataclasses.replace(recipe, fsdp=True), gpus=4, gpu_memory_gib=80)
    assert ddp.trainable_params == fsdp.trainable_params == real
    assert ddp.parts["AdamW moments (fp32)"] == 8 * real and ddp.parts["EMA (fp32)"] == 4 * real
    assert fsdp.parts["AdamW moments (fp32)"] == 8 * real / 4 and fsdp.parts["parameters (fp32)"] == real
    # Activations grow with the batch and shrink with checkpointing.
    act = "activations (+15% margin)"
    bigger = plan_memory(dataclasses.replace(recipe, batch_size=2 * recipe.batch_size), gpus=4, gpu_memory_gib=80)
    assert bigger.parts[act] > 1.5 * ddp.parts[act]
    plain = plan_memory(dataclasses.replace(recipe, grad_checkpointing=False), gpus=4, gpu_memory_gib=80)
    assert plain.parts[act] > ddp.parts[act]


def test_an_activation_measurement_matches_what_autograd_saves_on_the_cpu():
    """The fake-tensor count of a block's saved bytes equals the real one on the CPU (with the
    same stand-in for the attention kernel), so the plan measures what a run would keep."""
    from unittest import mock

    from torch._subclasses.fake_tensor import FakeTensorMode

    from dream_core.layers import Block
    from training.plan import _efficient_sdpa, _measuring, per_unit

    def block_bytes(block: Block):
        return per_unit(lambda b: block(torch.randn(b, 24, 32, requires_grad=True), torch.ones(b, 24, dtype=torch.bool)))

    torch.manual_seed(0)
    real_block = Block(32, 2, 64).train()
    with mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", _efficient_sdpa), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        real = block_bytes(real_block)
    mode = FakeTensorMode()
    with mode:
        fake_block = Block(32, 2, 64).train()
    with _measuring(mode, bf16=True):
        fake = block_bytes(fake_block)
    assert fake == real > 0


def test_the_plan_refuses_giant_at_the_papers_batch_without_checkpointing(capsys):
    """dream-giant at the paper's global batch 2048 on one node of 8 x 80 GiB (256 a GPU): fits with
    gradient checkpointing (the recipe's default), refused with exit code 1 and a way out without."""
    argv = ["--recipe", "dream-giant", "--gpus", "8", "--gpu-memory", "80", "--global-batch", "2048"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "batch 256 per GPU x 1 accumulation x 8 GPUs = global batch 2048" in out
    for part in ("parameters (fp32)", "AdamW moments (fp32)", "EMA (fp32)", "activations", "fits"):
        assert part in out
    assert main(argv + ["grad_checkpointing=false"]) == 1
    captured = capsys.readouterr()
    assert "DOES NOT FIT" in captured.out and "try grad_checkpointing=true" in captured.err
    plan = plan_memory(get_recipe("dream-giant").overrides(["batch_size=256", "grad_checkpointing=false"]), 8, 80)
    assert plan.parts["activations (+15% margin)"] > 200 * GIB and not plan.fits
