"""The trainer's fine-tuning mode (training/train.py calls these; `python -m training.finetune` is
its command line): start from a model directory's weights (`recipe.init_from`), optionally train
LoRA adapters only (`recipe.lora_rank`, peft) and export plain merged weights."""

from __future__ import annotations

from pathlib import Path

import torch

from training.recipes import part_names

LORA_SCOPES = ("encoder.blocks.", "decoder.blocks.", "aligner.blocks.")


def lora_target_names(model: torch.nn.Module) -> list[str]:
    """Full names of the attention/MLP Linear layers of the encoder, decoder and aligner blocks."""
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(LORA_SCOPES)]


def _inject_lora(model: torch.nn.Module, recipe) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    alpha = recipe.lora_alpha or 2.0 * recipe.lora_rank
    cfg = LoraConfig(r=recipe.lora_rank, lora_alpha=alpha, lora_dropout=0.0,
                     target_modules=lora_target_names(model), bias="none")
    inject_adapter_in_model(cfg, model)  # in place: the module keeps its class and forward


def init_from_model_dir(model: torch.nn.Module, recipe) -> None:
    """Load recipe.init_from's weights into `model` (built from its config.json) and, with
    recipe.lora_rank > 0, add LoRA adapters and train only them; with recipe.trainable, train only
    the named top-level parts, those in recipe.reinit from their initialisation. No-op without init_from."""
    if not recipe.init_from:
        return
    from safetensors.torch import load_file

    path = Path(recipe.init_from) / "model.safetensors"
    try:
        state = load_file(str(path))
    except Exception as err:
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from err
    parts = trainable_parts(model, recipe.trainable) if recipe.trainable else []
    fresh = trainable_parts(model, recipe.reinit) if recipe.reinit else []  # validate(): a subset of parts
    state = {k: v for k, v in state.items() if k.split(".")[0] not in fresh}
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    # A part the source lacks (a model.* override added it, e.g. clip_pooling=attention's pooler)
    # may start from its initialisation, but only if it is trained.
    new_parts = sorted({k.split(".")[0] for k in missing if k.split(".")[0] in parts})
    missing = [k for k in missing if k.split(".")[0] not in parts]
    shapes = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{path} does not match the model config (a model.* override changed the architecture?): "
                         f"missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shapes {shapes[:3]}")
    model.load_state_dict(state, strict=not new_parts)
    if fresh:
        print(f"init_from: {', '.join(fresh)} trained from initialisation (recipe.reinit)")
    if set(new_parts) - set(fresh):
        print(f"init_from: {', '.join(p for p in new_parts if p not in fresh)} not in {path}: trained from initialisation")
    if recipe.lora_rank:
        _inject_lora(model, recipe)
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
    if parts:
        for name, p in model.named_parameters():
            p.requires_grad_(name.split(".")[0] in parts)


def trainable_parts(model: torch.nn.Module, spec: str) -> list[str]:
    """The top-level parts named by recipe.trainable ("projector,text_tower"), checked against the
    model's own children and parameters."""
    known = [n for n, _ in model.named_children()] + [n for n, _ in model.named_parameters(recurse=False)]
    parts = part_names(spec)
    unknown = [p for p in parts if p not in known]
    if unknown or not parts:
        raise ValueError(f"recipe.trainable names {unknown or spec!r}: expected a comma-separated list of "
                         f"{', '.join(known)}")
    return parts


def plain_state(state: dict[str, torch.Tensor], recipe, config) -> dict[str, torch.Tensor]:
    """A state dict of the trained model as a plain DreamModel state (LoRA merged into the weights)."""
    if not recipe.lora_rank:
        return state
    from peft.tuners.lora import LoraLayer

    from dream_core.model import DreamModel

    model = DreamModel(config)
    _inject_lora(model, recipe)
    model.load_state_dict(state)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.merge()
    merged = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if "lora_" not in k}
    return merged


def set_train_mode(model: torch.nn.Module, recipe) -> None:
    """Train mode; a frozen projector (LoRA, or not in recipe.trainable) keeps its BatchNorm
    statistics (eval mode)."""
    model.train()
    core = model
    while hasattr(core, "module"):  # DDP / accelerate wrappers
        core = core.module
    core = getattr(core, "_orig_mod", core)  # torch.compile
    if recipe.lora_rank or (recipe.trainable and "projector" not in trainable_parts(core, recipe.trainable)):
        core.projector.eval()


RESUME_KEYS = ("init_from", "lora_rank", "lora_alpha", "trainable", "data_path", "preserve_path")


def check_resume_settings(meta: dict, recipe, ckpt_dir: Path) -> None:
    """A fine-tuning checkpoint resumes only a run of the same base model, adapters and data."""
    old = meta.get("recipe", {})
    if not (old.get("init_from") or recipe.init_from):
        return

    def norm(key: str, value):
        return str(Path(value).resolve()) if key.endswith(("_from", "_path")) and value else value

    diff = [f"{k}: {old.get(k)!r} -> {getattr(recipe, k)!r}" for k in RESUME_KEYS
            if norm(k, old.get(k)) != norm(k, getattr(recipe, k))]
    if diff:
        raise ValueError(f"checkpoint {ckpt_dir} was written by a fine-tuning run with other settings "
                         f"({'; '.join(diff)}); use another --out, or --overwrite to start over")
