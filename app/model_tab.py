"""The Model tab: switch the loaded model, show its card, and the Generate controls' ranges
and defaults for it (read from the engine's request)."""

from __future__ import annotations

from typing import Any

from dream_core.config import DreamConfig
from dream_core.request import default_decision_step, default_steps, sampler_defaults

from .models import card_body
from .session import AppContext, fail


def model_card(ctx: AppContext) -> str:
    pipe = ctx.manager.pipe
    if pipe is None:
        return "_No model loaded._"
    return card_body(pipe.model_card) or "_This model directory has no README.md model card._"


def switch_model(ctx: AppContext, name: Any) -> None:
    if not isinstance(name, str) or not name:
        raise fail("pick a model from the list")
    try:
        ctx.manager.switch(name)
    except ValueError as err:
        raise fail(str(err)) from None


def default_controls(ctx: AppContext) -> dict[str, Any]:
    """Slider ranges and defaults for the loaded model, from the engine's request: steps <= its
    number of tokens, the default steps, the model's default decision step, guidance, temperature,
    head sampler and head steps."""
    pipe = ctx.manager.pipe
    config = pipe.config if pipe is not None else DreamConfig.preset("shapes")
    steps = default_steps(config.seq_len)
    decision = default_decision_step(config, steps) if steps > 1 else 1
    defaults = sampler_defaults(config)
    return dict(seq_len=config.seq_len, steps=steps, decision=decision, head_steps_max=config.num_train_timesteps,
                guidance_scale=defaults["guidance_scale"], temperature=defaults["temperature"],
                head_steps=defaults["head_steps"], head_sampler=defaults["head_sampler"])
