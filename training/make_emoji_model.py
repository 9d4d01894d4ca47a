"""Build the bundled emoji model from nothing, on CPU: `make model-emoji`.

Every stage is a general command a user runs on their own data too (README, "Your own data"):

1. fetch the three emoji packages with npm and build the 64 x 64 set (training.data.emoji);
2. train a VAE on it (training.vae --data emoji);
3. build the frozen T5 with a vocabulary of its captions (training.text_vocab --data emoji);
4. train DREAM with the `emoji` recipe (Masking Warmup over MASKING_WARMUP_SHARE of the run) and
   export the EMA weights; the caption bank is the set's 3,786 names;
5. rebuild the joint space's heads on whole images, generation frozen (recipe `emoji-heads`), into
   the model directory, whose config carries the sampler defaults;
6. continue DREAM's pretraining from that model with a fresh optimizer (`init_from`) at the end of
   Masking Warmup's ratios, then rebuild the heads once more; again from that model for each
   further stage of CONTINUE_STAGES, the last one cooling the lr down to 0;
7. distil the preview decoder for the app's live candidates (training.preview_decoder).

Each stage is skipped when its output exists, so a killed build resumes (training resumes from its
last checkpoint; on Ctrl-C the build lets it save one first). WORK/build_timings.json holds each
stage's wall time summed over every run of the build. bench/emoji_eval.py measures the result.

    python -m training.make_emoji_model --work runs/emoji --out assets/dream-emoji
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from dream_core.pipeline import PREVIEW_DIR
from training.evaluate.cli import argparse_type, parse_int_list
from training.make_shapes_model import bundled_config, dream_schedule, run, timed, timed_build
from training.recipes import EMOJI_DATA, EMOJI_SAMPLER_DEFAULTS, get_recipe

# The VAE: the Shapes World's architecture (16/32/64 channels, stride 4, 4 latent channels), plain
# L1 + MSE (an emoji fills its box: no object weighting).
VAE_ARGS = ["--steps", "1200", "--batch-size", "32", "--lr", "2e-3", "--channels", "16,32,64", "--object-boost", "0"]
# DREAM: 12,000 steps of 64 (14 passes over the 55,040 samples), Masking Warmup's mean reaching 1
# at step 3,000 and held there for the remaining 9,000: generation kept improving with steps at
# that mean (seen pairs judged right at K = 1: 8.0 % at 4,000 steps, 18.3 % at 6,000, 28.7 % at
# 8,000, 38.7 % at 12,000; docs/experiments/emoji.md).
DREAM_STEPS = 12000
MASKING_WARMUP_SHARE = 0.25
HEADS_ROUNDS = 1
# Continued pretraining, in stages of CONTINUE_STAGES steps of 64: the model after its heads round
# trained on with a fresh optimizer (the first run's schedule: the same constant lr after the same
# 86 warm-up steps), masking `fx` at sigma 0.55 (the truncated Gaussian at mean 1 that steps
# 3,000-12,000 trained at; Masking Warmup's ramp does not apply to it), a new data order (seed 2),
# then one more heads round: seen pairs judged right at K = 1 39.0 -> 61.3 % after 8,000 steps,
# 66.7 % after 12,000 and 70.7 % after 15,000 (each paired interval above 0), held-out 12.3 -> 15.7
# -> 16.6 -> 18.6 % (docs/experiments/emoji.md, "and continued?"); 73.3 % after 18,000. Each further
# stage restarts the same way from the model the last heads round wrote, with the next data order
# (seed 3, ...): 2,500 restarted steps took seen pairs 70.7 -> 75.7 % against the 15,000-step model
# (paired +5.0 points [+1.7, +8.3]), held-out +2.9 [+0.2, +5.6] ("does a second restart pay?").
# The last stage cools the lr down to 0 on a cosine over its steps (COOLDOWN_ARGS): 2,500 such steps
# took seen pairs 80.7 -> 85.0 % (+4.3 points [+1.2, +7.7]), and against the same 2,500 steps at
# the constant lr +5.3 [+2.4, +8.5] seen, +3.1 [+0.4, +5.9] held out ("does an lr cooldown pay?").
CONTINUE_STAGES = (18000, 2500, 2500)
CONTINUE_ARGS = ["masking=fx", "mask_std=0.55"]
COOLDOWN_ARGS = ["lr_schedule=cosine"]
CONTINUE_FIRST_SEED = 2
# The last heads round trains on the emoji's name alone (the reverse-search bank's form, no style
# word): seen images' search top-1 51.4 -> 64.4 %, held-out art within noise (docs/experiments/emoji.md).
LAST_HEADS_ARGS = ["caption_templates=0"]
# The app's example prompts (examples.txt), worded as a person would ask.
EXAMPLES = (
    "a red heart emoji in twemoji style",
    "grinning face, noto style",
    "a cat face emoji in openmoji style",
    "thumbs up: dark skin tone",
    "rocket, twemoji style",
    "a pizza emoji in noto style",
    "face with tears of joy",
    "rainbow, openmoji style",
    "a ghost emoji in twemoji style",
    "sunflower",
    "birthday cake, noto style",
    "flag: Japan",
)


def build(args: argparse.Namespace, timings: dict[str, float], timings_path: Path) -> None:
    """The stages, each skipped when its output exists; their wall times summed into `timings`."""
    work, py, data = args.work, sys.executable, str(args.data)
    vae_dir, text_dir, run_dir = work / "vae", work / "text", work / "dream"
    with timed(timings, "data_seconds", timings_path):
        run([py, "-m", "training.data.emoji", "--cache", data])  # idempotent: skips a built set
    if not (vae_dir / "config.json").exists():
        with timed(timings, "vae_seconds", timings_path):
            run([py, "-m", "training.vae", "--out", str(vae_dir), "--data", "emoji", "--data-path", data, *VAE_ARGS])
    if not (text_dir / "config.json").exists():
        run([py, "-m", "training.text_vocab", "--out", str(text_dir), "--data", "emoji", "--data-path", data])
    recipe = get_recipe("emoji")
    dream_export = work / "dream-export"
    common = [f"vae_path={vae_dir}", f"t5_path={text_dir}", f"data_path={data}"]
    with timed(timings, "dream_seconds", timings_path):  # resumes from its checkpoint-last
        run([py, "-m", "training.train", "--recipe", "emoji", "--out", str(run_dir), "--max-steps", str(args.steps),
             "--export", str(dream_export), *common, *dream_schedule(recipe, args.steps, MASKING_WARMUP_SHARE), *args.overrides])
    with timed(timings, "heads_seconds", timings_path):
        # VAE, T5, bank (each round replaces the weights); a model card already in --out is kept
        keep_card = shutil.ignore_patterns("README.md") if (args.out / "README.md").exists() else None
        shutil.copytree(dream_export, args.out, dirs_exist_ok=True, ignore=keep_card)
        (args.out / "examples.txt").write_text("\n".join(EXAMPLES) + "\n")
        init = dream_export
        for r in range(1, HEADS_ROUNDS + 1):
            last = r == HEADS_ROUNDS and not args.continue_steps
            overrides = LAST_HEADS_ARGS if last else []
            heads_round(args, py, data, init, dream_export, work / "heads" / f"round{r}", overrides)
            init = args.out
    for i, steps in enumerate(args.continue_steps):
        name = "continued" if i == 0 else f"continued{i + 1}"  # the first stage's folders keep their names
        continued, continued_export = work / f"dream-{name}", work / f"dream-{name}-export"
        with timed(timings, "continued_seconds", timings_path):  # resumes from its checkpoint-last
            run([py, "-m", "training.train", "--recipe", "emoji", "--out", str(continued), "--max-steps",
                 str(steps), "--export", str(continued_export), f"init_from={args.out}", f"data_path={data}",
                 *dream_schedule(recipe, args.steps, MASKING_WARMUP_SHARE), *CONTINUE_ARGS,
                 *(COOLDOWN_ARGS if i == len(args.continue_steps) - 1 else []), f"seed={CONTINUE_FIRST_SEED + i}"])
        with timed(timings, "heads_seconds", timings_path):
            heads_round(args, py, data, continued_export, continued_export, work / "heads" / name, LAST_HEADS_ARGS)
    preview = work / "preview_vae"
    with timed(timings, "preview_decoder_seconds", timings_path):
        if not (preview / "config.json").exists():
            run([py, "-m", "training.preview_decoder", "--model", str(args.out), "--out", str(preview), "--data", "emoji",
                 "--data-path", data])
        shutil.copytree(preview, args.out / PREVIEW_DIR, dirs_exist_ok=True)


def heads_round(args: argparse.Namespace, py: str, data: str, init: Path, pretrained: Path, run_dir: Path,
                overrides: list[str]) -> None:
    """One `emoji-heads` round from `init` (skipped when its export exists; `overrides` are recipe
    key=value), its weights copied into the model directory with a config that carries the
    pretraining's loss weights and the sampler defaults."""
    if not (run_dir / "export" / "model.safetensors").exists():
        run([py, "-m", "training.train", "--recipe", "emoji-heads", "--out", str(run_dir), "--export",
             str(run_dir / "export"), f"init_from={init}", f"data_path={data}", f"max_steps={args.heads_steps}",
             *overrides])
    shutil.copy2(run_dir / "export" / "model.safetensors", args.out / "model.safetensors")
    bundled_config(pretrained, run_dir / "export", EMOJI_SAMPLER_DEFAULTS).save(args.out / "config.json")


def stage_steps(text: str) -> list[int]:
    """--continue-steps: '18000,2500' -> [18000, 2500]; '0' -> no continued stage."""
    steps = argparse_type(parse_int_list, "--continue-steps")(text)
    if steps == [0]:
        return []
    if min(steps) < 1:
        raise argparse.ArgumentTypeError(f"each stage needs >= 1 step (or 0 alone for none), got {text!r}")
    return steps


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("runs/emoji"))
    ap.add_argument("--out", type=Path, default=Path("assets/dream-emoji"))
    ap.add_argument("--data", type=Path, default=Path(EMOJI_DATA), help="where the emoji set is fetched and built")
    ap.add_argument("--steps", type=int, default=DREAM_STEPS, help="DREAM optimizer steps")
    ap.add_argument("--heads-steps", type=int, default=400, help="optimizer steps of each heads round")
    ap.add_argument("--continue-steps", type=stage_steps, default=list(CONTINUE_STAGES),
                    help="steps of each stage of continued pretraining after the first heads round, "
                         f"comma-separated (default {','.join(map(str, CONTINUE_STAGES))}; 0 = none)")
    ap.add_argument("overrides", nargs="*", help="recipe overrides key=value for the DREAM stage")
    args = ap.parse_intermixed_args(argv)
    if args.steps < 1 or args.heads_steps < 1:
        ap.error("--steps and --heads-steps must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    timed_build(parse_args(argv), build)


if __name__ == "__main__":
    main()
