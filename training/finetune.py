"""Local fine-tuning of a DREAM model directory on an image folder with captions, on one GPU (or a
CPU for small models): full fine-tuning or LoRA (peft), with the pretraining losses.

    python -m training.finetune --model assets/dream-shapes --data my_images/ --out runs/ft --steps 500
    python -m training.finetune --model DIR --data FOLDER --out runs/ft-lora --lora --rank 8 --steps 1000

The folder holds images with a .txt caption beside each (or captions.csv / captions.jsonl at its
root; see training/data/sources.py). The losses are the model's own (`forward_train`: diffusion on
masked tokens + the masked contrastive loss), with mask ratios from the end-of-warm-up distribution
(a truncated N(1, sigma^2) on [0, 1]): fine-tuning continues where Masking Warmup left off.

LoRA adapters go on every attention and MLP Linear of the encoder, decoder and text aligner; they
are merged into the weights before export, so `--out/model` is a plain model directory that
`DreamPipeline.from_pretrained` (and the app) loads. A run resumes from `--out/checkpoint-last`
(atomic, safetensors); an existing `--out/model` or a checkpoint of different settings is never
overwritten without `--overwrite`.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from pathlib import Path

import torch

from training.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint

LORA_SCOPES = ("encoder.blocks.", "decoder.blocks.", "aligner.blocks.")


def lora_target_names(model: torch.nn.Module) -> list[str]:
    """Full names of the attention/MLP Linear layers of the encoder, decoder and aligner blocks."""
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(LORA_SCOPES)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="model directory to start from")
    ap.add_argument("--data", type=Path, required=True, help="image folder with captions")
    ap.add_argument("--out", type=Path, required=True, help="run directory; the model is written to OUT/model")
    ap.add_argument("--lora", action="store_true", help="train LoRA adapters instead of every weight")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank")
    ap.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2 x rank)")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--lr", type=float, default=None, help="default 1e-4 (full) or 1e-3 (LoRA)")
    ap.add_argument("--weight-decay", type=float, default=None, help="default 0.04 (full) or 0 (LoRA)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--warmup-steps", type=int, default=None, help="linear LR warm-up (default steps // 10, at most 100)")
    ap.add_argument("--mask-std", type=float, default=0.55, help="sigma of the end-of-warm-up mask-ratio distribution")
    ap.add_argument("--flip", action="store_true", help="random horizontal flips (off: captions may name left/right)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--ckpt-every", type=int, default=100)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true", help="replace an existing OUT/model or a mismatched checkpoint")
    return ap.parse_args(argv)


class FineTuner:
    """One fine-tuning run. Everything is validated in __init__, before any training."""

    def __init__(self, args: argparse.Namespace) -> None:
        from dream_core.masking import fixed_masking
        from dream_core.pipeline import DreamPipeline, resolve_device
        from dream_core.text import ClipTokenizer
        from training.data.sources import FolderSource
        from training.recipes import TrainRecipe

        self.args = a = args
        self._validate_numbers()
        if not a.model.is_dir() or not (a.model / "config.json").is_file():
            raise ValueError(f"--model {a.model} is not a model directory (no config.json)")
        if not a.data.exists():
            raise ValueError(f"--data {a.data} does not exist")
        self.source_size = len(FolderSource(a.data))  # raises on an empty folder / no captions
        if a.out.exists() and not a.out.is_dir():
            raise ValueError(f"--out {a.out} exists and is not a directory")
        self.model_out = a.out / "model"
        if self.model_out.exists() and not a.overwrite:
            raise ValueError(f"{self.model_out} already exists; pass --overwrite to replace it (nothing was written)")
        self.lr = a.lr if a.lr is not None else (1e-3 if a.lora else 1e-4)
        self.settings = {
            "model": str(a.model.resolve()), "data": str(a.data.resolve()), "lora": a.lora,
            "rank": a.rank if a.lora else None, "alpha": self._alpha() if a.lora else None,
            "batch_size": a.batch_size, "grad_accum": a.grad_accum, "seed": a.seed, "mask_std": a.mask_std,
            "flip": a.flip,
        }
        ckpt_dir = find_checkpoint(a.out)
        self.ckpt = None
        if ckpt_dir is not None:
            ckpt = load_checkpoint(ckpt_dir)
            if ckpt["meta"].get("finetune") != self.settings:
                if not a.overwrite:
                    raise ValueError(f"{ckpt_dir} was written by a fine-tuning run with other settings; "
                                     "use another --out or pass --overwrite to start over (nothing was written)")
            else:
                self.ckpt = ckpt

        self.device = resolve_device(a.device)
        self.pipe = DreamPipeline.from_pretrained(a.model, device=self.device)
        self.config = self.pipe.config
        if self.ckpt is not None and self.ckpt["meta"].get("config") != self.config.to_dict():
            raise ValueError(f"the checkpoint in {a.out} was written for another model config; use another --out")
        self.model = self.pipe.model
        self.recipe = TrainRecipe(
            name="finetune", model=self.config.name, data="folder", data_path=str(a.data), flip=a.flip,
            num_workers=a.num_workers, samples_per_epoch=self.source_size, batch_size=a.batch_size,
            grad_accum=a.grad_accum, seed=a.seed, weight_decay=self._weight_decay(), lr=self.lr,
            masking="fx", mask_std=a.mask_std,
        ).validate()
        self.schedule = fixed_masking(a.mask_std)  # = Masking Warmup's distribution at its end
        self.clip_tok = ClipTokenizer(self.config.clip_context_length)
        self.peft_model = None
        if a.lora:
            self._add_lora()
        else:
            self.model.requires_grad_(True)
        from training.train import build_optimizer

        self.optimizer = build_optimizer(self.model, self.recipe, self.lr)
        self.mask_gen = torch.Generator().manual_seed(a.seed * 1000 + 7)
        torch.manual_seed(a.seed)
        self.step = 0
        if self.ckpt is not None:
            self._resume(self.ckpt)
        null_hidden, null_mask = self.pipe.text_encoder([""])
        self.null_hidden, self.null_mask = null_hidden.to(self.device), null_mask.to(self.device)
        from training.data.sources import build_dataloader

        self.loader = build_dataloader(self.recipe, self.config, start_step=self.step)

    def _validate_numbers(self) -> None:
        a = self.args
        checks = [("--steps", a.steps, 1), ("--batch-size", a.batch_size, 2), ("--grad-accum", a.grad_accum, 1),
                  ("--rank", a.rank, 1), ("--ckpt-every", a.ckpt_every, 0), ("--log-every", a.log_every, 1),
                  ("--num-workers", a.num_workers, 0)]
        for name, value, low in checks:
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        if a.lr is not None and not a.lr > 0:
            raise ValueError(f"--lr must be > 0, got {a.lr}")
        if a.weight_decay is not None and a.weight_decay < 0:
            raise ValueError(f"--weight-decay must be >= 0, got {a.weight_decay}")
        if a.alpha is not None and not a.alpha > 0:
            raise ValueError(f"--alpha must be > 0, got {a.alpha}")
        if a.warmup_steps is not None and a.warmup_steps < 0:
            raise ValueError(f"--warmup-steps must be >= 0, got {a.warmup_steps}")
        if not 0 <= a.mask_std <= 10:
            raise ValueError(f"--mask-std must be in [0, 10], got {a.mask_std}")

    def _alpha(self) -> float:
        return float(self.args.alpha if self.args.alpha is not None else 2 * self.args.rank)

    def _weight_decay(self) -> float:
        if self.args.weight_decay is not None:
            return self.args.weight_decay
        return 0.0 if self.args.lora else 0.04

    def _add_lora(self) -> None:
        from peft import LoraConfig, get_peft_model

        targets = lora_target_names(self.model)
        cfg = LoraConfig(r=self.args.rank, lora_alpha=self._alpha(), lora_dropout=0.0, target_modules=targets,
                         bias="none")
        # Adapters are injected in place: self.model keeps its forward_train, only they train.
        self.peft_model = get_peft_model(self.model, cfg)
        for name, p in self.model.named_parameters():
            p.requires_grad_("lora_" in name)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        if self.args.lora:
            return {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}
        return self.model.state_dict()

    def _resume(self, ckpt: dict) -> None:
        state = ckpt["model"]
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        wanted = set(self.trainable_state())
        if (wanted - set(state)) or unexpected:
            raise ValueError(f"the checkpoint in {self.args.out} does not match the model "
                             f"(missing {sorted(wanted - set(state))[:3]}, unexpected {list(unexpected)[:3]})")
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.step = int(ckpt["meta"]["step"])
        self.mask_gen.set_state(ckpt["rng"]["mask_gen"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        print(f"resumed from {self.args.out / 'checkpoint-last'} at step {self.step}")

    def lr_at(self, step: int) -> float:
        a = self.args
        warm = a.warmup_steps if a.warmup_steps is not None else min(100, a.steps // 10)
        return self.lr * min(1.0, (step + 1) / warm) if warm > 0 else self.lr

    # ----- one step -----
    def train_step(self, batch: dict) -> dict:
        from dream_core.masking import random_token_mask
        from dream_core.model import drop_captions

        c = self.config
        images = batch["image"].to(self.device)
        tokens = self.pipe.image_tokenizer.encode(images, sample=True)
        hidden, mask_t5 = self.pipe.text_encoder(batch["caption"])
        hidden, mask_t5 = drop_captions(hidden.to(self.device), mask_t5.to(self.device), self.null_hidden,
                                        self.null_mask, c.caption_dropout, self.mask_gen)
        ratios = self.schedule.sample(0.0, tokens.shape[0], self.mask_gen, per_sample=True)
        mask = random_token_mask(ratios, c.seq_len, self.mask_gen).to(self.device)
        clip_tokens = self.clip_tok(batch["caption"]).to(self.device)
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                    else torch.autocast("cpu", enabled=False))
        with autocast:
            out = self.model.forward_train(tokens, mask, hidden, mask_t5, clip_tokens)
        loss = out["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at step {self.step}")
        (loss / self.args.grad_accum).backward()
        return out

    def save(self) -> None:
        meta = {"step": self.step, "finetune": self.settings, "config": self.config.to_dict()}
        save_checkpoint(self.args.out / "checkpoint-last", model_state=self.trainable_state(), ema_state={},
                        optimizer_state=self.optimizer.state_dict(),
                        rng={"mask_gen": self.mask_gen.get_state(), "torch": torch.get_rng_state()}, meta=meta)

    def fit(self) -> dict:
        a = self.args
        a.out.mkdir(parents=True, exist_ok=True)
        if a.overwrite and self.ckpt is None:  # a mismatched checkpoint is replaced only now, when training starts
            for name in ("checkpoint-last", "checkpoint-last.old"):
                shutil.rmtree(a.out / name, ignore_errors=True)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.model.train()
        if a.lora:  # frozen projector: keep its BatchNorm statistics as they were
            self.model.projector.eval()
        log_file = open(a.out / "log.csv", "a", newline="")
        writer = None
        last: dict = {}
        data = iter(self.loader)
        try:
            while self.step < a.steps:
                lr = self.lr_at(self.step)
                for g in self.optimizer.param_groups:
                    g["lr"] = lr
                for _ in range(a.grad_accum):
                    out = self.train_step(next(data))
                grad_norm = torch.nn.utils.clip_grad_norm_(params, 3.0)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                if self.step % a.log_every == 0 or self.step == a.steps:
                    row = {"step": self.step, "lr": lr, "grad_norm": round(float(grad_norm), 6)}
                    for k in ("loss", "diffusion", "clip", "mask_ratio_mean", "diffusion_share", "clip_share"):
                        if k in out:
                            v = out[k]
                            row[k] = round(float(v.item() if torch.is_tensor(v) else v), 6)
                    if writer is None:
                        writer = csv.DictWriter(log_file, fieldnames=list(row), extrasaction="ignore")
                        if log_file.tell() == 0:
                            writer.writeheader()
                    writer.writerow(row)
                    log_file.flush()
                    print(json.dumps(row), flush=True)
                    last = row
                if a.ckpt_every and self.step % a.ckpt_every == 0:
                    self.save()
        finally:
            log_file.close()
        self.save()
        return last

    def export(self) -> Path:
        """Merge LoRA (if any) and write OUT/model atomically (a temporary directory, then rename)."""
        from dream_core.model import DreamModel
        from dream_core.pipeline import DreamPipeline

        model = self.peft_model.merge_and_unload() if self.peft_model is not None else self.model
        clean = DreamModel(self.config)
        clean.load_state_dict(model.state_dict())  # plain module tree, exactly the original keys
        card = (self.pipe.model_card or "").rstrip() + (
            f"\n\n## Fine-tuned\n\n{'LoRA (rank ' + str(self.args.rank) + ', merged)' if self.args.lora else 'Full fine-tuning'}"
            f" for {self.step} steps on `{self.args.data}` with `python -m training.finetune`.\n")
        source = self.recipe_captions()
        captions = list(dict.fromkeys(self.pipe.captions + source))
        pipe = DreamPipeline(clean.eval(), self.pipe.image_tokenizer, self.pipe.text_encoder, captions=captions)
        tmp = self.model_out.with_name(self.model_out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        pipe.save_pretrained(tmp, model_card=card)
        if self.model_out.exists():
            shutil.rmtree(self.model_out)
        tmp.rename(self.model_out)
        return self.model_out

    def recipe_captions(self) -> list[str]:
        """The fine-tuning captions (added to the caption bank of the exported model)."""
        from training.data.sources import FolderSource

        src = FolderSource(self.args.data)
        out = []
        for rel, text in src.items[:100_000]:
            if text is None:
                try:
                    text = (src.root / rel).with_suffix(".txt").read_text(encoding="utf-8", errors="replace")
                except OSError:
                    continue
            text = " ".join(text.split())
            if text:
                out.append(text)
        return out


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        tuner = FineTuner(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2)
    tuner.fit()
    out = tuner.export()
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
