"""Fine-tuning: a mode of the one trainer (training/train.py), and its command line.

    python -m training.finetune --model assets/dream-shapes --data my_images/ --out runs/my-shapes
    python -m training.finetune --model DIR --data FOLDER --out runs/my-lora --lora [--rank 8]
    python launch.py --model runs/my-shapes          # the app shows it as "my-shapes"

`--out DIR` becomes the model directory (config.json, model.safetensors with the EMA weights, vae/,
text/, captions.txt, README.md): `DreamPipeline.from_pretrained(DIR)` and the app load it. The
training state lives beside the model files in `DIR/training/` (checkpoint-last, log.csv,
recipe.json, the preservation samples); loading ignores it, and it can be deleted once the run is
done. Run the same command again to continue an interrupted run (Ctrl-C saves a checkpoint) or to
extend a finished one with a larger --steps; `--overwrite` starts over.

The data: a folder of images with a .txt caption beside each (`cat.png` + `cat.txt`), or a
`captions.csv` (columns file,caption) or `captions.jsonl` ({"file": ..., "caption": ...}) at its
root. Unreadable images are named once and left out.

What it trains: the pretraining losses (`DreamModel.forward_train`: diffusion on masked tokens + the
masked contrastive loss) with the mask ratios of the end of Masking Warmup (FX), through the same
loop as pretraining (accelerate, EMA, clip, checkpoints, log.csv, tqdm). The recipes `finetune` and
`finetune-lora` (training/recipes.py) hold the defaults, measured on the Shapes World
(docs/experiments/finetuning.md). `--preserve N` mixes N images that the
base model generates from its own caption bank into the data (prior preservation): the new concept
is learnt with less damage to what the model already does. LoRA adapters go on every attention and
MLP Linear of the encoder, decoder and text aligner (peft) and are merged into the weights on export.

What it teaches: generation only. Reverse search (the joint space) does not learn the new captions:
a fine-tuned model searches its new images among what it already knew. And the conditioning T5 stays
the base model's: the run names the caption words it does not know, which the model can only learn
as one shared <unk> (so every unknown word in a prompt then draws the new concept), and refuses when
more than 5 % of the caption tokens are unknown; `max_unknown_share=1` goes on anyway. How long a
run takes is measured in docs/own-data.md (2a).

The same mode from the generic entry point:
    python -m training.train --recipe finetune --out runs/x init_from=DIR data_path=FOLDER --export runs/x-model
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from dream_core.retrieval import read_caption_bank
from training.init_from import lora_target_names  # noqa: F401  (re-exported: the CLI's LoRA targets)

PRESERVE_DEFAULT = 100  # keeps 89-91 of 100 prompts where none keeps 29-33: docs/experiments/finetuning.md
STATE_DIR = "training"  # inside --out: checkpoints, log.csv, preservation samples
# Said in every fine-tuned model card.
TEACHES = ("Fine-tuning teaches generation only: reverse search (the joint space) does not learn the new captions, "
           "and words the base model's vocabulary lacks are learnt as one shared <unk>.")
# Files and folders a model directory consists of (what an export writes into --out).
MODEL_ENTRIES = ("config.json", "model.safetensors", "vae", "text", "captions.txt", "README.md", "preview_vae")


# ---------------------------------------------------------------------------------------------
# Preservation samples (what the base model makes of its own captions)
# ---------------------------------------------------------------------------------------------

def has_caption_bank(model_dir: Path) -> bool:
    path = Path(model_dir) / "captions.txt"
    return path.is_file() and bool(read_caption_bank(path)[0])


def write_preservation_set(model_dir: Path, folder: Path, n: int, seed: int) -> Path:
    """Generate n images with the base model from captions of its caption bank (seeded), saved as
    PNG + .txt in `folder`. Reused when a complete set of the same settings is there."""
    manifest = {"model": str(Path(model_dir).resolve()), "n": n, "seed": seed}
    done = folder / "manifest.json"
    if done.is_file() and json.loads(done.read_text()) == manifest:
        return folder
    import numpy as np
    from tqdm import tqdm

    from dream_core.pipeline import DreamPipeline

    pipe = DreamPipeline.from_pretrained(model_dir)
    if not pipe.captions:
        raise ValueError(f"--preserve needs the base model's caption bank, but {model_dir}/captions.txt is empty")
    rng = np.random.default_rng(seed)
    captions = [pipe.captions[int(i)] for i in rng.integers(len(pipe.captions), size=n)]
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for i, text in enumerate(tqdm(captions, desc="preservation samples", dynamic_ncols=True)):
        image = pipe(text, seed=seed * 100_003 + i).images[0]
        image.save(folder / f"{i:05d}.png")
        (folder / f"{i:05d}.txt").write_text(text + "\n")
    done.write_text(json.dumps(manifest))
    return folder


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from training.recipes import FINETUNE_LORA_LR, FINETUNE_LR, FINETUNE_STEPS, get_recipe

    full = get_recipe("finetune")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="model directory to start from")
    ap.add_argument("--data", type=Path, required=True, help="image folder with captions")
    ap.add_argument("--out", type=Path, required=True, help="the fine-tuned model directory (named after it in the app)")
    ap.add_argument("--lora", action="store_true", help="train LoRA adapters (merged on export) instead of every weight")
    ap.add_argument("--rank", type=int, default=None, help="LoRA rank (default 8)")
    ap.add_argument("--steps", type=int, default=None, help=f"optimizer steps (default {FINETUNE_STEPS})")
    ap.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default {FINETUNE_LR:g}, LoRA {FINETUNE_LORA_LR:g})")
    ap.add_argument("--batch-size", type=int, default=None, help=f"default {full.batch_size}")
    ap.add_argument("--grad-accum", type=int, default=None)
    ap.add_argument("--warmup-steps", type=int, default=None, help=f"linear LR warm-up (default {full.warmup_steps})")
    ap.add_argument("--ema-decay", type=float, default=None, help=f"default {full.ema_decay} (warmed up with the steps)")
    ap.add_argument("--preserve", type=int, default=PRESERVE_DEFAULT,
                    help="mix N images the base model generates from its caption bank into the data (0 = off; "
                         f"default {PRESERVE_DEFAULT}, measured to halve the damage to what the model did before)")
    ap.add_argument("--flip", action="store_true", help="random horizontal flips (off: captions may name left/right)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--num-workers", type=int, default=None)
    ap.add_argument("--ckpt-every", type=int, default=None)
    ap.add_argument("--log-every", type=int, default=None)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (default: torch's choice; 1 is fastest beside another busy job)")
    ap.add_argument("--overwrite", action="store_true", help="start over in an --out that holds another run or model")
    ap.add_argument("overrides", nargs="*", help="further recipe overrides key=value (see training/recipes.py)")
    return ap.parse_intermixed_args(argv)


def build_recipe(args: argparse.Namespace, preserve_path: str = ""):
    from training.recipes import get_recipe

    items = [f"init_from={args.model}", f"data_path={args.data}", f"flip={json.dumps(bool(args.flip))}"]
    optional = {"lora_rank": args.rank, "max_steps": args.steps, "lr": args.lr, "batch_size": args.batch_size,
                "grad_accum": args.grad_accum, "warmup_steps": args.warmup_steps, "ema_decay": args.ema_decay,
                "seed": args.seed, "num_workers": args.num_workers, "ckpt_every": args.ckpt_every,
                "log_every": args.log_every}
    if args.rank is not None and not args.lora:
        raise ValueError("--rank is the LoRA rank: pass --lora with it")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    for key, value in optional.items():
        if value is not None:
            items.append(f"{key}={value}")
    if preserve_path:
        items.append(f"preserve_path={preserve_path}")
    if not preserve_path and args.steps is not None and any(o.startswith("max_steps=") for o in args.overrides):
        print(f"the override {next(o for o in args.overrides if o.startswith('max_steps='))} replaces --steps {args.steps}",
              flush=True)
    recipe = get_recipe("finetune-lora" if args.lora else "finetune").overrides(items + list(args.overrides))
    if args.lora and recipe.lora_rank < 1:
        raise ValueError(f"--rank must be >= 1, got {recipe.lora_rank}")
    if args.preserve < 0:
        raise ValueError(f"--preserve must be >= 0, got {args.preserve}")
    return recipe.resolved()


def check_out(args: argparse.Namespace) -> None:
    """--out is a new directory, a run of this command (resumed), or replaced with --overwrite."""
    out, model = args.out, args.model
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    if model.is_dir() and out.resolve() == model.resolve():
        raise ValueError("--out must differ from --model (the base model is never overwritten)")
    if not out.is_dir() or args.overwrite:
        return
    own = {STATE_DIR, *MODEL_ENTRIES, ".export.tmp"}
    if (out / STATE_DIR).is_dir():
        return  # a run of this command: the trainer resumes it (or names the setting that differs)
    foreign = sorted(p.name for p in out.iterdir())
    if foreign:
        what = "a model directory" if (out / "config.json").is_file() else "files"
        extra = [f for f in foreign if f not in own]
        raise ValueError(f"--out {out} already holds {what} that no fine-tuning run wrote ({', '.join((extra or foreign)[:5])}); "
                         "use a new --out, or --overwrite to replace it (nothing was written)")


def fine_tuned_card(base_card: str, base: Path, about: str) -> str:
    """The fine-tuned model's card: one metadata header at the top (the base card's, with
    `base_model:` added, as a model hub reads it), this run's section, then the base card's text."""
    header, body = [], base_card
    if base_card.startswith("---\n") and "\n---" in base_card[3:]:
        end = base_card.index("\n---", 3)
        header, body = base_card[4:end].splitlines(), base_card[end + 4:].lstrip("\n")
    header = [line for line in header if not line.startswith("base_model:")] + [f"base_model: {json.dumps(str(base))}"]
    return "---\n" + "\n".join(header) + "\n---\n\n" + about.rstrip() + "\n\n## The base model\n\n" + body


def export_into(trainer, out: Path, recipe, steps: int) -> Path:
    """Write the model files into --out (through a temporary folder, each entry replaced whole),
    beside the training state; the model card is named after the run."""
    base = Path(recipe.init_from)
    base_card = (base / "README.md").read_text() if (base / "README.md").is_file() else ""
    base_captions, base_details = (read_caption_bank(base / "captions.txt") if (base / "captions.txt").is_file()
                                   else ([], []))
    detail_of = dict(zip(base_captions, base_details))  # the base bank's details stay with its captions
    source = trainer.source.sources[0] if hasattr(trainer.source, "sources") else trainer.source
    captions = list(dict.fromkeys(base_captions + source.captions()))
    how = f"LoRA (rank {recipe.lora_rank}, merged)" if recipe.lora_rank else "Full fine-tuning"
    about = (f"# {out.resolve().name}\n\nFine-tuned from `{base}` with `python -m training.finetune`: {how}, "
             f"{steps} steps of {trainer.global_batch} on {len(source)} images in `{recipe.data_path}`, "
             f"peak LR {trainer.peak_lr:g}, EMA {recipe.ema_decay}"
             + (f", {len(trainer.source) - len(source)} preservation samples of the base model mixed in" if recipe.preserve_path else "")
             + f". Training state: `{STATE_DIR}/`. {TEACHES}")
    card = fine_tuned_card(base_card, base, about)
    tmp = out / ".export.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.export(tmp, captions, card, caption_details=[detail_of.get(c, "") for c in captions])
    if (base / "preview_vae").is_dir():
        shutil.copytree(base / "preview_vae", tmp / "preview_vae")
    for entry in sorted(tmp.iterdir()):
        dst = out / entry.name
        if dst.is_dir():
            shutil.rmtree(dst)
        os.replace(entry, dst)
    tmp.rmdir()
    return out


def main(argv: list[str] | None = None) -> Path | None:
    from training.distributed import end_process_group

    try:
        return run(parse_args(argv))
    finally:
        end_process_group()  # every rank, every exit: the exit code is the one chosen below


def run(args: argparse.Namespace) -> Path | None:
    from training.data.sources import FolderSource
    from training.train import Trainer, caption_sample, check_vocabulary

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        recipe = build_recipe(args)  # every field checked, and --model is a model directory
        source = FolderSource(args.data)  # the data exists and has captions (before anything is written)
        check_vocabulary(recipe, caption_sample(recipe, source))  # before the preservation samples are made
        check_out(args)
        if args.overwrite and (args.out / STATE_DIR).is_dir():
            shutil.rmtree(args.out / STATE_DIR)
        state = args.out / STATE_DIR
        if args.preserve and not has_caption_bank(args.model):
            print(f"no preservation samples: {args.model} has no captions.txt to generate them from", flush=True)
        elif args.preserve:
            folder = write_preservation_set(args.model, state / "preserve", args.preserve, recipe.seed)
            recipe = build_recipe(args, preserve_path=str(folder))
        trainer = Trainer(recipe, state)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2)
    except KeyboardInterrupt:
        print("interrupted before training started; nothing to save", file=sys.stderr)
        raise SystemExit(130)
    trainer.fit()
    if trainer.interrupted:
        raise SystemExit(130)
    out = export_into(trainer, args.out, recipe, trainer.step)
    trainer.acc.print(f"wrote the model directory {out} (load it with DreamPipeline.from_pretrained or "
                      f"python launch.py --model {out})")
    return out


if __name__ == "__main__":
    main()
