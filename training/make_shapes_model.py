"""Build the bundled default model from nothing, on CPU: `make model`.

1. train the Shapes World VAE (training.vae): three stages of the whole VAE, then a new, wider
   decoder alone (the encoder, hence the latent space, kept) to draw small shapes sharply, then
   that decoder continued with extra loss weight on the objects' outlines (sharp corners);
2. build the frozen T5 with a Shapes World vocabulary (training.shapes_text);
3. train DREAM with the `shapes` recipe (Masking Warmup, both losses; the mask mean ramps over
   MASKING_WARMUP_SHARE of the run's steps) through training.train, on the live feed (scenes
   rendered, VAE-encoded and T5-encoded at every step: the default) or, with --cache-scenes N, on
   a cache of the feed's first N scenes extracted first (training.cache), and export the EMA
   weights with the 2,160-caption bank;
4. rebuild the joint space's heads (an attention pooler, the projector and the text tower from
   their initialisation, the temperature) on whole images with hard-negative captions, generation's
   weights frozen (recipe `shapes-heads`, on a cache of 16,384 scenes extracted first), in
   HEADS_ROUNDS rounds (each continues the pooler and restarts the rest), into the model
   directory, whose config carries the sampler defaults measured on the shipped model;
5. distil the preview decoder for the app's live candidates (training.preview_decoder).

Each stage is skipped when its output exists, so a killed build resumes (training resumes from
its last checkpoint; on Ctrl-C the build lets it save one first). WORK/build_timings.json holds each
stage's wall time, summed over every run of the build, stopped or not. The model card's evaluation
table is measured by bench/shapes_eval.py.

    python -m training.make_shapes_model --work runs/shapes --out assets/dream-shapes
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from dream_core.config import DreamConfig
from dream_core.pipeline import PREVIEW_DIR
from training.data.shapes_world import full_caption_bank
from training.recipes import TrainRecipe, get_recipe
from training.train import schedule_scale


# The heads stage trains on a cache of the feed's first scenes (VAE moments extracted once): its step
# is bound by the text tower's captions, not by rendering (docs/experiments/joint-space-heads.md).
HEADS_CACHE_SCENES = 16_384
# Masking Warmup's mean reaches 1 after this share of the DREAM run's steps: step 6,000 of 10,000,
# as the shipped weights were trained (LW10: the ramp over 6,000 of 8,000 steps, resumed for 2,000
# more at the end state). The `shapes` recipe's own 10.56 of 19.2 epochs ends at step 1,650, and the
# contrastive loss then almost never sees a lightly masked image: the encoder's mean token reads
# shape at 87.5 % after it, 98.9 % after LW10 (docs/experiments/masking-warmup.md).
MASKING_WARMUP_SHARE = 0.6
# Heads rounds: the pooler continues from the round before, projector and text tower restart
# (recipe.reinit). The second round takes reverse search's position 86.4 -> 99.8 % on LW
# (docs/experiments/joint-space-heads.md).
HEADS_ROUNDS = 2
# The bundled model's sampler defaults, measured on it (docs/experiments/sad-decision-share.md and
# sampler-defaults.md); a request may still set its own. SAD decides at 87.5 %: on
# three prompt sets (2,500 two-object prompts) its gain over K = 1 is +1.5 points, paired interval
# [+0.2, +2.9], where 37.5 % gains +0.1 [-1.2, +1.5]; K = 9 then costs about 2.8x K = 1 against
# 1.6x at 37.5 % (docs/experiments/sad-decision-share.md).
# The head: ancestral over 15 steps, the fastest as faithful as 100 on the fixed set (-0.2 / -0.8
# points, intervals holding 0: docs/experiments/head-sampler.md, bench.speed_front).
SAMPLER_DEFAULTS = dict(sad_decision_share=0.875, default_guidance_scale=1.5, default_temperature=0.5,
                        default_head_sampler="ancestral", default_head_steps=15)


def bundled_config(pretrained: Path, heads: Path, sampler_defaults: dict | None = None) -> DreamConfig:
    """The model directory's config: the heads stage's architecture (a model.* override there, such
    as clip_pooling=attention, carries over), the pretraining's loss weights (the heads stage trains
    the contrastive loss alone), the measured sampler defaults (dream-shapes' unless given)."""
    pre = DreamConfig.load(pretrained / "config.json")
    return DreamConfig.load(heads / "config.json").replace(
        diffusion_weight=pre.diffusion_weight, clip_weight=pre.clip_weight,
        **(SAMPLER_DEFAULTS if sampler_defaults is None else sampler_defaults))


def dream_schedule(recipe: TrainRecipe, steps: int, share: float = MASKING_WARMUP_SHARE) -> list[str]:
    """The DREAM stage's schedule overrides for a run of `steps` optimizer steps (0 = the recipe's
    length), as the shipped weights were trained: Masking Warmup's mean reaches 1 at `share` of
    the run, and the LR warms up over the recipe's warmup_epochs at its own
    epoch count (78 steps for `shapes`) instead of the trainer's stretch to a longer run. The ramp
    is set in the epochs the masking schedule reads, which the trainer scales up in a run shorter
    than the recipe (`train.schedule_scale`)."""
    per_step = recipe.batch_size * recipe.grad_accum
    total = steps or math.ceil(recipe.epochs * recipe.samples_per_epoch / per_step)
    run = recipe.overrides([f"max_steps={steps}"]) if steps else recipe
    end_epoch = total * per_step / recipe.samples_per_epoch * schedule_scale(run, total, per_step,
                                                                             recipe.samples_per_epoch)
    warmup_steps = round(recipe.warmup_epochs * recipe.samples_per_epoch / per_step)
    return [f"masking_warmup_epochs={round(share * end_epoch, 6):g}", f"warmup_steps={warmup_steps}"]


def run(cmd: list[str]) -> None:
    """Run one stage. On Ctrl-C the stage got the same signal: wait for it to finish its step and
    save its checkpoint (training.train does), where subprocess.run would kill it 0.25 s later and
    lose every step since the last periodic checkpoint."""
    print("+", " ".join(cmd), flush=True)
    with subprocess.Popen(cmd) as proc:
        try:
            code = proc.wait()
        except KeyboardInterrupt:
            proc.wait()
            raise
    if code:
        raise subprocess.CalledProcessError(code, cmd)


@contextlib.contextmanager
def timed(timings: dict[str, float], key: str, path: Path) -> Iterator[None]:
    """Add the block's wall time to timings[key] and save them to `path`, also when the block is
    interrupted: a build stopped (Ctrl-C) and resumed states the sum of all its runs."""
    t = time.time()
    try:
        yield
    finally:
        timings[key] = round(timings.get(key, 0.0) + time.time() - t, 1)
        path.write_text(json.dumps(timings, indent=1))


def timed_build(args: argparse.Namespace, build: Callable[[argparse.Namespace, dict, Path], None]) -> None:
    """Run a model build in args.work, each stage's wall time (and the total) summed over every run
    of the build in WORK/build_timings.json, which is printed at the end."""
    args.work.mkdir(parents=True, exist_ok=True)
    timings_path = args.work / "build_timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    with timed(timings, "total_seconds", timings_path):
        build(args, timings, timings_path)
    print(json.dumps(timings))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("runs/shapes"))
    ap.add_argument("--out", type=Path, default=Path("assets/dream-shapes"))
    ap.add_argument("--steps", type=int, default=10_000,
                    help="DREAM optimizer steps (the shipped model: 10,000, trained as 8,000 then resumed to 10,000)")
    ap.add_argument("--recipe", default="shapes")
    ap.add_argument("--cache-scenes", type=int, default=0,
                    help="train on a cache of the Shapes feed's first N scenes (extracted first into "
                         "WORK/cache-N) instead of the live feed (0, the default; see docs/training.md)")
    ap.add_argument("overrides", nargs="*", help="recipe overrides key=value")
    args = ap.parse_intermixed_args(argv)
    if args.cache_scenes < 0:
        ap.error(f"--cache-scenes must be >= 0 (0 = the live feed), got {args.cache_scenes}")
    return args


def main(argv: list[str] | None = None) -> None:
    timed_build(parse_args(argv), build)


def build(args: argparse.Namespace, timings: dict[str, float], timings_path: Path) -> None:
    """The stages, each skipped when its output exists; their wall times summed into `timings`."""
    work, py = args.work, sys.executable
    vae_dir, text_dir, run_dir = work / "vae", work / "text", work / "dream"
    if not (vae_dir / "config.json").exists():
        # As the shipped VAE was built: three stages (plain L1 + MSE, then object-weighted twice),
        # then two of a wider decoder behind the kept encoder.
        with timed(timings, "vae_seconds", timings_path):
            stage1 = work / "vae-stage1"
            if not (stage1 / "config.json").exists():
                run([py, "-m", "training.vae", "--out", str(stage1), "--steps", "1000", "--batch-size", "16",
                     "--lr", "2e-3", "--object-boost", "0"])
            stage2 = work / "vae-stage2"
            if not (stage2 / "config.json").exists():
                run([py, "-m", "training.vae", "--out", str(stage2), "--steps", "1500", "--batch-size", "24",
                     "--lr", "1e-3", "--init", str(stage1), "--seed", "1"])
            stage3 = work / "vae-stage3"
            if not (stage3 / "config.json").exists():
                run([py, "-m", "training.vae", "--out", str(stage3), "--steps", "1200", "--batch-size", "24",
                     "--lr", "6e-4", "--init", str(stage2), "--seed", "2"])
            # A new, wider decoder (32/64/128 channels: an AsymmetricAutoencoderKL) on stage 3's
            # latents, the encoder kept: small crosses and diamonds keep their shape (round trip read
            # back by the judge 88.8 % with the retrained 16/32/64 decoder -> 98.2 %: the latents carry
            # every small shape, the narrow decoder cannot draw them; docs/experiments/vae-decoder.md).
            wide = work / "vae-wide"
            if not (wide / "config.json").exists():
                run([py, "-m", "training.vae", "--out", str(wide), "--steps", "2800", "--batch-size", "32",
                     "--lr", "1e-3", "--init", str(stage3), "--decoder-only", "--decoder-channels", "32,64,128",
                     "--seed", "11"])
            # That decoder continued with extra loss weight on the objects' outlines, where it rounded
            # small squares' corners and filled small crosses' concave ones: the VAE ceilings on the
            # evaluation prompts 98.2 / 95.6 % -> 100.0 / 99.0 % (docs/experiments/vae-decoder.md).
            run([py, "-m", "training.vae", "--out", str(vae_dir), "--steps", "1500", "--batch-size", "32",
                 "--lr", "3e-4", "--init", str(wide), "--decoder-only", "--edge-boost", "20", "--seed", "12"])
    if not (text_dir / "config.json").exists():
        run([py, "-m", "training.shapes_text", "--out", str(text_dir)])
    bank = work / "captions.txt"
    bank.write_text("\n".join(full_caption_bank()) + "\n")
    feed = []
    if args.cache_scenes:
        cache = work / f"cache-{args.cache_scenes}"
        if not (cache / "index.json").exists():  # resumes a killed extraction shard by shard
            with timed(timings, "cache_seconds", timings_path):
                run([py, "-m", "training.cache", "--recipe", args.recipe, "--out", str(cache), "--max-samples",
                     str(args.cache_scenes), "--num-workers", "0", f"vae_path={vae_dir}", f"t5_path={text_dir}",
                     *args.overrides])
        feed = ["data=cache", f"cache_path={cache}"]
    steps = ["--max-steps", str(args.steps)] if args.steps else []
    dream_export = work / "dream-export"
    recipe = get_recipe(args.recipe)
    schedule = dream_schedule(recipe, args.steps) if recipe.masking == "warmup" else []
    with timed(timings, "dream_seconds", timings_path):  # resumes from its checkpoint-last
        run([py, "-m", "training.train", "--recipe", args.recipe, "--out", str(run_dir), *steps,
             "--export", str(dream_export), "--captions", str(bank), f"vae_path={vae_dir}", f"t5_path={text_dir}",
             *feed, *schedule, *args.overrides])
    # The joint space's heads on whole images, generation frozen. The weights and the architecture
    # are the stage's; the config keeps the pretraining's loss weights (the stage trains the
    # contrastive loss alone).
    with timed(timings, "heads_seconds", timings_path):
        heads, heads_cache = work / "heads", work / f"heads-cache-{HEADS_CACHE_SCENES}"
        if not (heads_cache / "index.json").exists():  # the frozen VAE's moments: the stage is then text-tower bound
            run([py, "-m", "training.cache", "--recipe", "shapes-heads", "--out", str(heads_cache), "--max-samples",
                 str(HEADS_CACHE_SCENES), "--num-workers", "0", f"init_from={dream_export}"])
        init = dream_export
        shutil.copytree(dream_export, args.out, dirs_exist_ok=True)  # VAE, T5, bank; each round replaces the weights
        for r in range(1, HEADS_ROUNDS + 1):
            heads_run = heads / f"round{r}"
            if not (heads_run / "export" / "model.safetensors").exists():
                run([py, "-m", "training.train", "--recipe", "shapes-heads", "--out", str(heads_run), "--export",
                     str(heads_run / "export"), "--captions", str(bank), f"init_from={init}", "data=cache",
                     f"cache_path={heads_cache}"])
            shutil.copy2(heads_run / "export" / "model.safetensors", args.out / "model.safetensors")
            bundled_config(dream_export, heads_run / "export").save(args.out / "config.json")
            init = args.out  # the next round continues this round's pooler
    # The preview decoder for the app's live candidates, distilled from the VAE: it draws them for a
    # tenth of the decoding time where the full VAE would cost half or more (docs/performance.md).
    preview = work / "preview_vae"
    with timed(timings, "preview_decoder_seconds", timings_path):
        if not (preview / "config.json").exists():
            run([py, "-m", "training.preview_decoder", "--model", str(args.out), "--out", str(preview)])
        shutil.copytree(preview, args.out / PREVIEW_DIR, dirs_exist_ok=True)

if __name__ == "__main__":
    main()
