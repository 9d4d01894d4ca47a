"""The time a training step of recipe variants costs, timed round by round on one machine.

An ablation at equal training time gives each arm the steps the control's time buys, so it needs
the ratio of their steps; the times logged by runs days apart drift with a shared machine's speed.
Each arm is the recipe with its own `key=value` overrides on top of the shared ones. Its step is
the trainer's, on random inputs of the arm's shapes (bench.train: forward_train, backward,
clipping, AdamW; masks drawn from the arm's schedule at --epoch), plus the frozen conditioning T5
on a batch of captions, which the trainer runs each step. The arms are timed interleaved (one
step of each per round), and each ratio to the first arm is the median of the rounds' ratios.

    python -m bench.step_cost --recipe emoji --arm G16= --arm T256=t5_path=runs/emoji/text-d256 \\
        --arm "W256=model.width=256 model.mlp_dim=1024 model.num_heads=4" \\
        vae_path=assets/dream-emoji/vae t5_path=assets/dream-emoji/text data_path=runs/emoji-data
"""

from __future__ import annotations

import argparse
import sys
from types import SimpleNamespace
from typing import Callable

import torch

from bench.common import (command_line, fmt_s, machine_info, markdown_table, median, paired_ratio, setup_threads,
                          time_interleaved)
from bench.train import fresh_batch_steps
from dream_core.model import DreamModel
from dream_core.text import ConditioningTextEncoder
from training.recipes import TrainRecipe, get_recipe
from training.train import build_optimizer

CAPTION = "a grinning face with big eyes emoji in twemoji style"  # the T5 pads every caption to its length


def parse_arm(text: str) -> tuple[str, list[str]]:
    """'NAME=key=value key=value' -> (NAME, [key=value, ...]); 'NAME=' is the recipe unchanged."""
    name, sep, overrides = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"--arm must look like NAME=key=value ... (NAME= for no change), got {text!r}")
    return name.strip(), overrides.split()


def arm_step(recipe: TrainRecipe, batch: int, epoch: float, seed: int, calls: int) -> tuple[Callable[[], None], float]:
    """A training step of `recipe` (the T5 on the batch's captions, then the model's step) on a
    fresh random batch each of its `calls` calls (the same seeds for every arm), and the model's
    parameter count in millions."""
    config = recipe.model_config()
    torch.manual_seed(seed)
    model = DreamModel(config).train()
    optimizer = build_optimizer(model, recipe, recipe.peak_lr(batch))
    switches = SimpleNamespace(compile=False, bf16=False, sdpa="default", clock="wall")
    steps = iter(fresh_batch_steps(model, optimizer, config, recipe, batch, epoch, torch.device("cpu"), switches,
                                   seed, calls))
    t5 = ConditioningTextEncoder.from_pretrained(recipe.resolved().t5_path, config.t5_max_length)
    captions = [CAPTION] * batch

    def run() -> None:
        with torch.no_grad():
            t5(captions)
        next(steps)()
    return run, sum(p.numel() for p in model.parameters()) / 1e6


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", required=True, help="the recipe every arm starts from")
    ap.add_argument("--arm", dest="arms", type=parse_arm, action="append", required=True,
                    help="NAME=key=value ... (repeat; the first arm is the one the others are compared to)")
    ap.add_argument("--batch", type=int, default=0, help="samples a step (default: the recipe's batch_size)")
    ap.add_argument("--epoch", type=float, default=None, help="the epoch masks are drawn at (default: mid-run)")
    ap.add_argument("--repeats", type=int, default=12, help="timed rounds, after one warm-up round")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (0 = torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("overrides", nargs="*", help="recipe overrides key=value shared by every arm")
    args = ap.parse_intermixed_args(argv)
    names = [name for name, _ in args.arms]
    if len(set(names)) != len(names):
        ap.error(f"--arm names must differ, got {', '.join(names)}")
    if args.repeats < 1 or args.batch < 0:
        ap.error("--repeats must be >= 1 and --batch >= 0")
    return args


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    setup_threads(args.threads)
    steps, params = [], []
    try:
        for _, overrides in args.arms:
            recipe = get_recipe(args.recipe).overrides([*args.overrides, *overrides])
            epoch = recipe.epochs / 2 if args.epoch is None else args.epoch
            run, n = arm_step(recipe, args.batch or recipe.batch_size, epoch, args.seed, args.repeats + 1)
            steps.append(run)
            params.append(n)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2)
    times = time_interleaved(steps, args.repeats)
    rows = [[name, f"{n:.2f} M", fmt_s(median(t)), f"{paired_ratio(t, times[0]):.2f}x"]
            for (name, _), n, t in zip(args.arms, params, times)]
    report = "\n".join([
        f"# The training step of `{args.recipe}`'s arms, interleaved\n",
        f"- machine: {machine_info()}; {args.repeats} rounds after one warm-up",
        f"- command: {command_line(__file__, argv)}\n",
        markdown_table(["arm", "parameters", "step (median)", f"to {args.arms[0][0]} (median of rounds)"], rows)])
    print(report)
    return report


if __name__ == "__main__":
    main()
