"""DREAM pretraining: one entry point for every recipe, one process or many.

    python -m training.train --recipe shapes --out runs/shapes [--max-steps N] [key=value ...]
    accelerate launch --multi_gpu --num_processes 8 -m training.train --recipe dream-huge --out runs/h
    torchrun --nnodes 4 --nproc-per-node 8 ... -m training.train --recipe dream-huge --out runs/h
    python -m training.train --list-recipes

DDP by default (FSDP2, sharded per transformer block, for the huge/giant recipes; see
training/distributed.py), bf16 autocast on CUDA (the frozen VAE and T5 too) with TF32 on, fp32 on
CPU, gradient accumulation, AdamW (0.9, 0.95) without decay on norms/biases/embeddings/temperature, LR = blr x
global batch / 256 with linear warm-up, clip 3.0, EMA (warmed up with the step count, so a short
run exports trained weights), Masking Warmup driven by the fractional epoch. Resumes from
`<out>/checkpoint-last` automatically, and refuses to when the world size, accumulation, batch or
data source changed (they position the data stream and set the LR). A non-finite loss on any rank
stops every rank; a non-finite gradient norm on any rank skips that optimizer step on every rank.
Ctrl-C, SIGTERM and SIGUSR1 finish the step, save a checkpoint and exit (code 130). A run folder
that not every rank sees is refused before any work (training/distributed.py).

The epoch is the data's size (recipe.samples_per_epoch=0) or the recipe's. A run cut shorter than
the recipe's epochs by --max-steps follows the recipe's LR warm-up and Masking Warmup scaled to its
own length (printed at the start), so a short run trains instead of logging lr 0; a longer one
stretches its LR schedule to its own end (a cosine ends with the run) and keeps Masking Warmup's
epochs (then its end state). Fine-tuning is a
mode of this loop: `init_from=MODEL_DIR` (weights, config, VAE and T5 from a model directory),
optionally `lora_rank=R` (see training/finetune.py, its CLI).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from dream_core.config import DreamConfig
from dream_core.masking import random_token_mask
from dream_core.model import DreamModel, drop_captions
from dream_core.retrieval import read_caption_bank
from dream_core.text import ClipTokenizer, ConditioningTextEncoder, unknown_words
from dream_core.image_tokenizer import ImageTokenizer, patchify
from training.checkpoint import (find_checkpoint, load_checkpoint, load_sharded_checkpoint, read_checkpoint_meta,
                                 save_checkpoint, save_sharded_checkpoint)
from training.distributed import (EMA, all_ranks_finite, check_resume, check_shared_folder, clip_grad_norm,
                                  configure_cuda, contrastive_negatives_note, end_process_group,
                                  frozen_autocast, load_local_model_state,
                                  local_model_state, local_optimizer_state, run_layout, shard_model,
                                  shard_optimizer_state, stop_if_not_finite, sync_replicated_grads)
from training.data.loaders import build_dataloader
from training.data.sources import CorruptSample, TarSource, describe_source, open_source
from training.init_from import check_resume_settings, init_from_model_dir, plain_state, set_train_mode
from training.plan import check_cpu_memory, memory_note
from training.recipes import FILE_DATA_KINDS, RECIPES, TrainRecipe, get_recipe


# ---------------------------------------------------------------------------------------------
# Optimiser, schedules, EMA
# ---------------------------------------------------------------------------------------------

def build_optimizer(model: DreamModel, recipe: TrainRecipe, lr: float, fused: bool = False) -> torch.optim.AdamW:
    no_decay = model.no_weight_decay_names()
    decay, other = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (other if name in no_decay else decay).append(p)
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": other, "weight_decay": 0.0}]
    kwargs = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, lr=lr, betas=(recipe.beta1, recipe.beta2), **kwargs)


def lr_at(epoch: float, recipe: TrainRecipe, peak: float, step: int | None = None,
          warmup_steps: int | None = None) -> float:
    """Linear warm-up to `peak`, then constant (the recipe) or cosine to min_lr. `epoch` is the
    (schedule) epoch at the end of the step; with recipe.warmup_steps >= 0 the warm-up counts
    optimizer steps instead (`step`, 1-based, over `warmup_steps`, default recipe.warmup_steps)."""
    if recipe.warmup_steps >= 0 and step is not None:
        warm = recipe.warmup_steps if warmup_steps is None else warmup_steps
        if step < warm:
            return peak * step / warm
    elif recipe.warmup_epochs > 0 and epoch < recipe.warmup_epochs:
        return peak * epoch / recipe.warmup_epochs
    if recipe.lr_schedule == "cosine":
        span = max(recipe.epochs - recipe.warmup_epochs, 1e-8)
        p = min(1.0, (epoch - recipe.warmup_epochs) / span)
        return recipe.min_lr + (peak - recipe.min_lr) * 0.5 * (1 + math.cos(math.pi * p))
    return peak


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------

class Trainer:
    def __init__(self, recipe: TrainRecipe, out: Path, accelerator=None) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        recipe = recipe.resolved()  # init_from: the model directory's vae/ and text/ by default
        self.recipe, self.out = recipe, Path(out)
        self.config = recipe.model_config()  # geometry read from the VAE / T5 configs
        self.config = views_config(recipe, self.config)
        cuda = torch.cuda.is_available()
        precision = {"auto": "bf16" if cuda else "no", "bf16": "bf16", "fp32": "no"}[recipe.precision]
        self.precision = precision
        unused = self.config.clip_weight == 0 or self.config.diffusion_weight == 0 or self.config.repa_block > 0
        configure_cuda()
        # cpu=True on a CUDA-less machine, so torchrun / accelerate launch env vars start gloo there
        # (without it accelerate treats every CPU process as a world of one). FSDP is applied here
        # (training/distributed.py: FSDP2 per block), not through accelerate's plugin.
        self.acc = accelerator or Accelerator(
            cpu=not cuda, mixed_precision=precision, gradient_accumulation_steps=recipe.grad_accum,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=unused)],
        )
        self.device = self.acc.device
        self.sharded = bool(recipe.fsdp)
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self._check_paths()
        check_shared_folder(self.out, self.rank, self.world)  # before any work: a node-local --out fails here

        torch.manual_seed(recipe.seed)  # same initial weights on every rank
        self.model = DreamModel(self.config)
        if not cuda:  # before the optimizer and the first batch: a step that cannot fit stops here, said
            self.acc.print(check_cpu_memory(recipe, self.config, sum(p.numel() for p in self.model.parameters())))
        init_from_model_dir(self.model, recipe)  # fine-tuning: base weights, LoRA adapters
        if recipe.grad_checkpointing:
            for part in (self.model.encoder, self.model.decoder, self.model.aligner, self.model.head.net):
                part.grad_checkpointing = True
        # The projector's BatchNorm: synchronised under DDP and FSDP alike (SyncBN is GPU-only; the
        # CPU/gloo runs of the tests keep per-rank statistics).
        if self.world > 1 and self.device.type == "cuda":
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        torch.manual_seed(recipe.seed + self.rank)  # independent noise per rank from here on
        self.tokenizer = ImageTokenizer.from_pretrained(recipe.vae_path, self.config.patch_size).to(self.device)
        self.clip_tok = ClipTokenizer(self.config.clip_context_length)
        if abs(self.tokenizer.scaling_factor - self.config.vae_scaling_factor) > 1e-6 * max(1.0, self.config.vae_scaling_factor):
            self.config.vae_scaling_factor = self.tokenizer.scaling_factor
        # From the cache T5 is never loaded (the cache holds every caption's states and the null
        # caption's); export and sample checks load it on demand (`conditioning_encoder`).
        self.t5 = None if recipe.data == "cache" else self.conditioning_encoder(self.device)
        self.null_hidden, self.null_mask = self._null_caption()

        self.global_batch = recipe.batch_size * recipe.grad_accum * self.world
        self.peak_lr = recipe.peak_lr(self.global_batch)
        # Every state below is built where the (prepared) model lives: move, shard, then optimizer and EMA.
        self.model.to(self.device)
        if self.sharded:  # bf16 all-gathers, fp32 gradient reductions on a bf16 run
            shard_model(self.model, self.device, torch.bfloat16 if precision == "bf16" else None)
        fused = self.device.type == "cuda" and not self.sharded  # foreach AdamW on DTensors
        self.optimizer = build_optimizer(self.model, recipe, self.peak_lr, fused=fused)
        self.schedule = recipe.masking_schedule()
        self.ema = EMA(self.model, recipe.ema_decay, recipe.ema_warmup)
        self.mask_gen = torch.Generator().manual_seed(recipe.seed * 1000 + self.rank)
        self.step = 0
        self.samples_seen = 0
        # Opened (and checked) once, by rank 0 first: tar shards are indexed once and the other
        # ranks read that index, kept with the run when the data's folder is read-only.
        TarSource.fallback_index_cache = self.out / ".index_cache"
        if self.world > 1 and self.rank > 0:
            self.acc.wait_for_everyone()  # for rank 0's opening
        self.source = None if recipe.data == "shapes" else open_source(recipe)
        if self.world > 1 and self.rank == 0:
            self.acc.wait_for_everyone()
        self.acc.print(check_vocabulary(recipe, caption_sample(recipe, self.source)))
        self.samples_per_epoch = recipe.samples_per_epoch or len(self.source)
        self.total_steps = recipe.max_steps or math.ceil(recipe.epochs * self.samples_per_epoch / self.global_batch)
        self.schedule_scale = schedule_scale(recipe, self.total_steps, self.global_batch, self.samples_per_epoch)
        self.lr_scale = schedule_scale(recipe, self.total_steps, self.global_batch, self.samples_per_epoch, stretch=True)
        self.data_skipped = 0
        self.skipped_steps = 0  # optimizer steps skipped for a non-finite gradient norm
        self.stop_requested = self.interrupted = False
        self._resume()
        # Built here (not in fit) so bad data fails before any training, and resumes at the saved step.
        self.loader = build_dataloader(recipe, self.config, rank=self.rank, world=self.world, start_step=self.step,
                                       source=self.source)
        if self.sharded:  # the model is already sharded; accelerate only steps the optimizer on sync
            self.optimizer = self.acc.prepare(self.optimizer, device_placement=[False])
        else:
            self.model, self.optimizer = self.acc.prepare(self.model, self.optimizer)
        self.acc.print(contrastive_negatives_note(recipe, self.world))
        if self.device.type == "cuda" and self.acc.is_main_process:
            self.acc.print(memory_note(recipe, self.world, self.device))
        if recipe.compile:
            self.model = torch.compile(self.model)
        self.teacher = self._build_repa_teacher()

    # ----- setup helpers -----
    def _check_paths(self) -> None:
        r = self.recipe
        for key in ("vae_path", "t5_path"):
            value = getattr(r, key)
            if not value or not Path(value).is_dir():
                raise ValueError(f"recipe.{key}={value!r} must be a local directory (nothing is downloaded)")
        if r.data in FILE_DATA_KINDS and not (r.data_path and Path(r.data_path).exists()):
            raise ValueError(f"recipe.data_path={r.data_path!r} does not exist")
        if r.data == "cache" and not (r.cache_path and Path(r.cache_path).is_dir()):
            raise ValueError(f"recipe.cache_path={r.cache_path!r} does not exist")
        if r.data != "shapes":
            from training.data.sources import check_data

            check_data(r)
        if r.data == "cache" and self.config.repa_block:
            raise ValueError("REPA needs images for its teacher, but a cache holds latents only; use image data")

    def conditioning_encoder(self, device: torch.device | str = "cpu") -> ConditioningTextEncoder:
        """The frozen T5 (bf16 weights on a bf16 CUDA run: T5-XXL is 9.5 GB instead of 19)."""
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" and self.precision == "bf16" else None
        t5 = ConditioningTextEncoder.from_pretrained(self.recipe.t5_path, self.config.t5_max_length,
                                                     torch_dtype=dtype).to(device)
        if t5.dim != self.config.t5_dim:
            raise ValueError(f"T5 at {self.recipe.t5_path} has d_model={t5.dim} but config.t5_dim={self.config.t5_dim}")
        return t5

    def _null_caption(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty caption's T5 states (for caption dropout): from the cache when training from it."""
        if self.t5 is None:
            from safetensors.torch import load_file

            from training.cache import NULL_CAPTION_FILE

            null = load_file(str(Path(self.recipe.cache_path or self.recipe.data_path) / NULL_CAPTION_FILE))
            return null["t5_hidden"].float().to(self.device), null["t5_mask"].bool().to(self.device)
        with frozen_autocast(self.device, self.precision):
            hidden, mask = self.t5([""])
        return hidden.float().to(self.device), mask.to(self.device)

    def _resume(self) -> None:
        ckpt_dir = find_checkpoint(self.out)
        if ckpt_dir is None:
            return
        meta = read_checkpoint_meta(ckpt_dir)
        check_resume_settings(meta, self.recipe, ckpt_dir)  # fine-tuning: same base model, adapters, data
        # Read through today's DreamConfig, so a field added since (loading as the value older
        # models always used) does not make an unchanged run look like another model. Sampling
        # defaults may differ (an init model whose card changed its head steps): the run's own win.
        try:
            saved = DreamConfig.from_dict(meta.get("config") or {}).weights_dict()
        except (TypeError, ValueError):
            saved = None
        if saved != self.config.weights_dict():
            raise ValueError(f"checkpoint {ckpt_dir} was written for another model config; use a new --out")
        check_resume(meta, run_layout(self.recipe, self.world), str(ckpt_dir))
        if self.sharded:  # this rank's shards only
            ckpt = load_sharded_checkpoint(ckpt_dir, self.rank, self.world)
            load_local_model_state(self.model, ckpt["model"], str(ckpt_dir))
            self.optimizer.load_state_dict(shard_optimizer_state(ckpt["optimizer"], self.optimizer))
        else:
            ckpt = load_checkpoint(ckpt_dir)
            missing, unexpected = self.model.load_state_dict(ckpt["model"], strict=False)
            if missing or unexpected:
                raise ValueError(f"checkpoint {ckpt_dir} does not match the model: missing {missing[:5]}, "
                                 f"unexpected {unexpected[:5]}")
            self.optimizer.load_state_dict(ckpt["optimizer"])
        self.ema.load(ckpt["ema"], meta["ema_updates"])
        self.step, self.samples_seen = meta["step"], meta["samples_seen"]
        self.data_skipped = meta.get("data_skipped", 0) if self.rank == 0 else 0  # a total over ranks
        rng = ckpt["rng"]
        self.mask_gen.set_state(rng.get(f"mask_gen_{self.rank}", rng["mask_gen_0"]))
        torch.set_rng_state(rng.get(f"torch_{self.rank}", rng["torch"]))
        if self.device.type == "cuda" and f"cuda_{self.rank}" in rng:
            torch.cuda.set_rng_state(rng[f"cuda_{self.rank}"], self.device)
        self.acc.print(f"resumed from {ckpt_dir} at step {self.step}")

    def _build_repa_teacher(self):
        if not self.config.repa_block:
            return None
        from training.repa import RepaTeacher

        return RepaTeacher(self.recipe.repa_teacher_arch, self.recipe.repa_teacher_weights,
                           self.config.tokens_per_side, self.device)

    @property
    def epoch(self) -> float:
        return self.samples_seen / self.samples_per_epoch

    @property
    def schedule_epoch(self) -> float:
        """The epoch the masking schedule reads (scaled when the run is shorter than the recipe)."""
        return self.epoch * self.schedule_scale

    @property
    def warmup_steps(self) -> int:
        """recipe.warmup_steps, at most a tenth of the run (a 5-step run must train, not warm up)."""
        return min(self.recipe.warmup_steps, self.total_steps // 10)

    def lr_after(self, samples: int) -> float:
        """The LR of the optimizer step that ends at `samples` seen (step self.step + 1)."""
        epoch = samples / self.samples_per_epoch * self.lr_scale
        return lr_at(epoch, self.recipe, self.peak_lr, step=self.step + 1, warmup_steps=self.warmup_steps)

    def start_message(self) -> str:
        """What the run will do, printed once at the start (data, length, schedules, LR)."""
        r = self.recipe
        data = describe_source(self.source) if self.source is not None else "the Shapes World (endless)"
        scope = (f" with LoRA rank {r.lora_rank}" if r.lora_rank else f" (training {r.trainable} only)" if r.trainable
                 else " (every weight)")
        what = f"fine-tuning {r.init_from}{scope}" if r.init_from else f"training {self.config.name} from scratch"
        lines = [f"{what} on {data}",
                 f"{self.total_steps} steps of {self.global_batch} samples = {self.total_steps * self.global_batch / self.samples_per_epoch:.2f} "
                 f"epochs of {self.samples_per_epoch}" + (f", resuming at step {self.step}" if self.step else "")]
        if r.warmup_steps >= 0:
            warm = f"LR warm-up over {self.warmup_steps} steps"
            if self.warmup_steps < r.warmup_steps:
                warm += f" (warmup_steps={r.warmup_steps} is more than a tenth of this {self.total_steps}-step run)"
        else:
            warm = f"LR warm-up over {r.warmup_epochs * self.samples_per_epoch / self.lr_scale / self.global_batch:.0f} steps"
        for what, scale, used in (("LR", self.lr_scale, r.warmup_steps < 0 or r.lr_schedule == "cosine"),
                                  ("masking", self.schedule_scale, r.masking in ("warmup", "cd"))):
            if used and scale != 1.0:
                warm += (f" (the recipe's {r.epochs:g}-epoch {what} schedule scaled x{1 / scale:.3g} "
                         f"to this {self.total_steps}-step run)")
        lines.append(f"peak LR {self.peak_lr:.3g}, {warm}; LR at step {self.step + 1}: "
                     f"{self.lr_after(self.samples_seen + self.global_batch):.3g}; masking {r.masking}, "
                     f"EMA {r.ema_decay}{' warmed up' if r.ema_warmup else ''}")
        return "\n".join(lines)

    # ----- one step -----
    def batch_tensors(self, batch: dict) -> dict:
        """Latent tokens, conditioning and CLIP tokens for a batch from the loader."""
        c = self.config
        captions = batch["caption"]
        with torch.no_grad(), frozen_autocast(self.device, self.precision):  # the frozen VAE and T5
            if "moments" in batch:
                latents = self.tokenizer.latents_from_moments(batch["moments"].to(self.device), sample=True)
                tokens = patchify(latents, c.patch_size)
            else:
                tokens = self.tokenizer.encode(batch["image"].to(self.device), sample=True)
            view_tokens = (self.tokenizer.encode(batch["view"].to(self.device), sample=True).float()
                           if "view" in batch else None)
            if "t5_hidden" in batch:
                t5_hidden, t5_mask = batch["t5_hidden"].to(self.device).float(), batch["t5_mask"].to(self.device)
            else:
                t5_hidden, t5_mask = self.t5(captions)
        tokens, t5_hidden = tokens.float(), t5_hidden.float()
        t5_hidden, t5_mask = drop_captions(t5_hidden, t5_mask, self.null_hidden, self.null_mask,
                                           c.caption_dropout, self.mask_gen)
        ratios = self.schedule.sample(self.schedule_epoch, tokens.shape[0], self.mask_gen, per_sample=self.recipe.per_sample_masking)
        mask = random_token_mask(ratios, c.seq_len, self.mask_gen).to(self.device)
        out = {"tokens": tokens, "mask": mask, "t5_hidden": t5_hidden, "t5_mask": t5_mask,
               "clip_tokens": self.clip_tok(captions).to(self.device), "ratios": ratios}
        if view_tokens is not None:
            out["view_tokens"] = view_tokens
        if "hard_negatives" in batch:  # [B][M] captions -> [B, M, context]
            negs = batch["hard_negatives"]
            flat = self.clip_tok([c for row in negs for c in row])
            out["hard_clip_tokens"] = flat.view(len(negs), len(negs[0]), -1).to(self.device)
        if self.teacher is not None:
            out["repa_target"] = self.teacher(batch["image"].to(self.device))
        return out

    def train_step(self, batch: dict) -> dict:
        t = self.batch_tensors(batch)
        with self.acc.accumulate(self.model), self.acc.autocast():
            lr = self.lr_after(self.samples_seen + t["tokens"].shape[0] * self.world)
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            # Through the (DDP/FSDP) wrapper, so gradient synchronisation hooks fire.
            if self.sharded:  # FSDP2: reduce-scatter gradients on the last micro-batch only
                self.model.set_requires_gradient_sync(self.acc.sync_gradients)
            out = self.model(t["tokens"], t["mask"], t["t5_hidden"], t["t5_mask"], t["clip_tokens"], t.get("repa_target"),
                             t.get("hard_clip_tokens"), t.get("view_tokens"))
            loss = out["loss"]
            stop_if_not_finite(out, self.step, self.device)  # all ranks together, before any backward
            self.acc.backward(loss)
            grad_norm = None
            if self.acc.sync_gradients and self.sharded:
                sync_replicated_grads(self.model)
                grad_norm = clip_grad_norm(self.model.parameters(), self.recipe.grad_clip)
            elif self.acc.sync_gradients:
                grad_norm = self.acc.clip_grad_norm_(self.model.parameters(), self.recipe.grad_clip)
            # An inf/NaN gradient (a finite loss can still overflow in backward) would reach the
            # weights, the EMA and the next checkpoint: every rank skips the step together.
            skip = grad_norm is not None and not all_ranks_finite(float(grad_norm), self.device)
            if skip:
                self.skipped_steps += 1
                self.acc.print(f"step {self.step + 1}: non-finite gradient norm on at least one rank; every rank "
                               f"skips this optimizer step ({self.skipped_steps} skipped so far)", flush=True)
            else:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if self.acc.sync_gradients and not skip:
            self.ema.update(self.acc.unwrap_model(self.model))
        self.samples_seen += t["tokens"].shape[0] * self.world
        out["lr"] = lr
        out["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        out["ratio_std"] = t["ratios"].std().item() if t["ratios"].numel() > 1 else 0.0
        return out

    # ----- checkpoints and export -----
    def save(self) -> None:
        self.acc.wait_for_everyone()
        core = self.acc.unwrap_model(self.model)
        # Every rank's generators (masking, global torch, CUDA), so a resume continues each stream.
        states = {"mask_gen": self.mask_gen.get_state(), "torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            states["cuda"] = torch.cuda.get_rng_state(self.device)
        gathered = {k: [v] for k, v in states.items()}
        if self.world > 1:
            gathered = {k: list(self.acc.gather(v[None].to(self.device)).cpu()) for k, v in states.items()}
        skipped = int(self.acc.reduce(torch.tensor([self.data_skipped], device=self.device), "sum").item()) \
            if self.world > 1 else self.data_skipped
        rng, meta = None, None
        if self.acc.is_main_process:
            rng = {f"{k}_{i}": s for k, v in gathered.items() for i, s in enumerate(v)}
            rng["torch"] = torch.get_rng_state()
            meta = {"step": self.step, "samples_seen": self.samples_seen, "epoch": self.epoch,
                    "ema_updates": self.ema.updates, "recipe": self.recipe.to_dict(),
                    "config": self.config.to_dict(), "world_size": self.world, "data_skipped": skipped,
                    "layout": run_layout(self.recipe, self.world)}
        if self.sharded:  # every rank writes its own shards
            save_sharded_checkpoint(self.out / "checkpoint-last", rank=self.rank, world=self.world,
                                    barrier=self.acc.wait_for_everyone, model_state=local_model_state(core),
                                    ema_state=self.ema.local_state(),
                                    optimizer_state=local_optimizer_state(self.optimizer.state_dict()),
                                    rng=rng, meta=meta)
        elif self.acc.is_main_process:
            save_checkpoint(self.out / "checkpoint-last", model_state=core.state_dict(),
                            ema_state=self.ema.state_dict(core), optimizer_state=self.optimizer.state_dict(),
                            rng=rng, meta=meta)
        self.acc.wait_for_everyone()

    def export_state(self) -> dict[str, torch.Tensor]:
        """The EMA weights as a plain DreamModel state dict (LoRA adapters merged)."""
        return plain_state(self.ema.state_dict(self.acc.unwrap_model(self.model)), self.recipe, self.config)

    def export(self, model_dir: Path, captions: list[str] | None = None, card: str | None = None,
               caption_details: list[str] | None = None) -> None:
        """Write a model directory (EMA weights) that `DreamPipeline.from_pretrained` loads. Every
        rank calls it (under FSDP the EMA shards are gathered once); rank 0 writes. `caption_details`:
        the text reverse search shows beside each caption (captions.txt's `caption<TAB>detail`)."""
        from dream_core.pipeline import DreamPipeline

        state = {k: v.cpu() for k, v in self.export_state().items()}
        if not self.acc.is_main_process:
            return
        if captions is None:
            captions, caption_details = self.default_caption_bank()
        if not captions:
            warnings.warn(f"the export {model_dir} has an empty caption bank: reverse search will refuse until "
                          f"one is given (--captions FILE, one caption per line)", stacklevel=2)
        if card is None:
            card = self.default_card()
        export_model = DreamModel(self.config)
        export_model.load_state_dict(state)
        t5 = self.t5 if self.t5 is not None else self.conditioning_encoder("cpu")
        pipe = DreamPipeline(export_model, self.tokenizer, t5, captions=captions or [],
                             vae_dir=Path(self.recipe.vae_path), text_dir=Path(self.recipe.t5_path),
                             caption_details=caption_details if captions else None)
        pipe.save_pretrained(model_dir, model_card=card)

    def default_caption_bank(self) -> tuple[list[str], list[str] | None]:
        """Reverse search's bank when none is given, (captions, details or None): the data's own (the
        emoji set's names, each with its emoji and keywords; an image folder's distinct captions; the
        Shapes World's full bank), else none. A source offers details by `caption_bank_with_details`."""
        if self.recipe.data == "shapes":
            from training.data.shapes_world import full_caption_bank

            return full_caption_bank(), None
        with_details = getattr(self.source, "caption_bank_with_details", None)
        if with_details is not None:
            detail_of: dict[str, str] = {}
            for caption, detail in with_details():
                detail_of.setdefault(caption, detail)
            return list(detail_of), list(detail_of.values())
        for name in ("caption_bank", "captions"):
            read = getattr(self.source, name, None)
            if read is not None:
                return list(dict.fromkeys(read())), None
        return [], None

    def default_card(self) -> str:
        """A short hub-style model card for an export that was given none: what it is, how it was
        trained, how to load it. Its evaluation section says it is not evaluated."""
        r = self.recipe
        data = describe_source(self.source) if self.source is not None else f"data={r.data}"
        settings = r.to_dict()
        if r.name in RECIPES:  # only what the run changed from its named recipe
            base = get_recipe(r.name).to_dict()
            settings = {k: v for k, v in settings.items() if base[k] != v}
        return "\n".join([
            "---", "license: other", "library_name: dream-studio", "tags: [dream, text-to-image, image-retrieval]",
            "---", f"# {self.config.name} (recipe `{r.name}`)", "",
            f"A DREAM model: a masked image encoder trained with a contrastive loss against a text tower, and a "
            f"text-conditioned decoder with a diffusion head. Trained for {self.step} optimizer steps on {data}.",
            "", "## Use", "", "```python", "from dream_core.pipeline import DreamPipeline",
            "pipe = DreamPipeline.from_pretrained(\"path/to/this/folder\")",
            "image = pipe(\"a caption like the training captions\", seed=0).images[0]", "```", "",
            "## Training", "", f"`python -m training.train --recipe {r.name} ...` with these settings changed from "
            f"the recipe: `{json.dumps(settings, default=str)}`.", "",
            "## Evaluation", "", "Not evaluated: measure it with `python -m training.evaluate` before relying on it.", "",
            "## Licence", "", "The weights follow the licence of the data they were trained on.", ""])

    # ----- the loop -----
    def fit(self) -> dict:
        r = self.recipe
        loader = self.loader
        log_path = self.out / "log.csv"
        writer, log_file = None, None
        tb = None
        if self.acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "recipe.json").write_text(json.dumps(r.to_dict(), indent=1))
            trim_log(log_path, self.step)  # rows past the resumed step were logged before a kill
            log_file = open(log_path, "a", newline="")
            try:
                from torch.utils.tensorboard import SummaryWriter

                tb = SummaryWriter(str(self.out / "tb"))
            except Exception:  # tensorboard is optional; CSV is always written
                tb = None
        set_train_mode(self.model, r)
        from tqdm import tqdm

        self.acc.print(self.start_message(), flush=True)
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.acc.is_main_process,
                   dynamic_ncols=True, mininterval=2.0, unit="step")
        t_last, n_last = time.time(), self.samples_seen
        last = {}
        data_iter = iter(loader)
        restore = self._catch_stop_signals()
        while self.step < self.total_steps:
            if self._stop_now():
                break
            try:
                batch = next(data_iter)
            except Exception:
                if self.stop_requested:  # Ctrl-C also reached the data workers
                    break
                raise
            self.data_skipped += int(batch.get("skipped", 0))
            out = self.train_step(batch)
            if not self.acc.sync_gradients:
                continue
            self.step += 1
            bar.update(1)
            if self.step % r.log_every == 0 or self.step == self.total_steps:
                now = time.time()
                row = {"step": self.step, "epoch": round(self.epoch, 4)}
                for k, v in out.items():
                    if k in ("loss", "diffusion", "clip", "view", "repa"):
                        v = self.acc.reduce(v.detach().reshape(1).to(self.device), "mean").item()
                    if isinstance(v, (int, float)):
                        row[k] = round(float(v), 6)
                row["samples_per_s"] = round((self.samples_seen - n_last) / max(now - t_last, 1e-9), 2)
                row["mask_mean_mu"] = round(self.schedule.mean(self.schedule_epoch), 4)
                row["ema_decay"] = round(self.ema.current_decay(), 6)
                row["data_skipped"] = self.data_skipped  # this rank's unreadable samples (replaced)
                t_last, n_last = now, self.samples_seen
                last = row
                if self.acc.is_main_process:
                    if writer is None:
                        writer = csv.DictWriter(log_file, fieldnames=list(row), extrasaction="ignore")
                        if log_file.tell() == 0:
                            writer.writeheader()
                    writer.writerow(row)
                    log_file.flush()
                    if tb is not None:
                        for k, v in row.items():
                            tb.add_scalar(k, v, self.step)
                    bar.set_postfix(loss=row.get("loss"), lr=f"{row.get('lr', 0):.3g}",
                                    samples_s=row.get("samples_per_s"))
            if r.ckpt_every and self.step % r.ckpt_every == 0:
                self.save()
            if r.sample_every and self.step % r.sample_every == 0:
                self.sample_check()  # every rank: the EMA is gathered under FSDP
        restore()
        self.save()
        bar.close()
        if log_file is not None:
            log_file.close()
        if self.stop_requested:
            self.interrupted = True
            self.acc.print(f"interrupted: saved a checkpoint at step {self.step} in {self.out / 'checkpoint-last'}; "
                           "run the same command again to continue from it", flush=True)
        return last

    # ----- Ctrl-C, preemption -----
    def _catch_stop_signals(self):
        """SIGINT (Ctrl-C), SIGTERM (what Slurm, Kubernetes and torchrun send to stop or preempt a
        job) and SIGUSR1 (Slurm's early warning, `--signal=USR1@SECONDS`) ask the loop to stop after the
        current step and save; every rank stops at the same step (`_stop_now`). A second Ctrl-C
        aborts at once; a repeated SIGTERM/SIGUSR1 is ignored, so it cannot cut the save short.
        Returns the function that puts the previous handlers back."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        names = [name for name in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, name)]
        previous = {name: signal.getsignal(getattr(signal, name)) for name in names}

        def handler(signum, frame):
            if self.stop_requested:
                if signum == signal.SIGINT:
                    raise KeyboardInterrupt
                return
            self.stop_requested = True
            if signum == signal.SIGINT:
                what = "Ctrl-C: stopping after this step and saving a checkpoint (Ctrl-C again to abort)"
            else:
                what = f"{signal.Signals(signum).name}: stopping after this step and saving a checkpoint"
            print(f"\n{what}", file=sys.stderr, flush=True)

        for name in names:
            signal.signal(getattr(signal, name), handler)

        def restore() -> None:
            for name, old in previous.items():
                signal.signal(getattr(signal, name), old)

        return restore

    def _stop_now(self) -> bool:
        """Whether any rank was asked to stop (all ranks stop at the same step)."""
        if self.world == 1:
            return self.stop_requested
        flag = torch.tensor([float(self.stop_requested)], device=self.device)
        self.stop_requested = bool(self.acc.reduce(flag, "sum").item() > 0)
        return self.stop_requested

    @torch.no_grad()
    def sample_check(self) -> None:
        """Decode a few images with the EMA weights: MAR-family models can sample NaN/black early."""
        from dream_core.pipeline import DreamPipeline

        state = self.export_state()
        if not self.acc.is_main_process:
            return
        model = DreamModel(self.config).to(self.device)
        model.load_state_dict(state)
        if self.t5 is None:  # trained from the cache: load T5 for the check only
            self.t5 = self.conditioning_encoder(self.device)
        pipe = DreamPipeline(model, self.tokenizer, self.t5, captions=[])
        prompts = self.recipe_sample_prompts()
        images = []
        for i, p in enumerate(prompts):
            images += pipe(p, num_inference_steps=16, head_steps=25, seed=i).images
        out = self.out / "samples"
        out.mkdir(exist_ok=True)
        from PIL import Image

        grid = Image.new("RGB", (images[0].width * len(images), images[0].height))
        for i, im in enumerate(images):
            grid.paste(im, (i * im.width, 0))
        grid.save(out / f"step{self.step:07d}.png")

    def recipe_sample_prompts(self) -> list[str]:
        if self.recipe.data == "shapes":
            return ["a large red circle in the middle on a white background",
                    "a small blue square at the top left on a black background",
                    "a large green triangle at the bottom right on a gray background",
                    "a yellow cross on the left and a purple diamond on the right"]
        if self.source is not None and len(self.source):  # captions of the data, spread over it
            prompts = caption_sample(self.recipe, self.source, limit=4)
            if prompts:
                return prompts
        return ["a photo of a dog", "a red car parked on a street"]


VOCAB_SAMPLE = 2000  # captions the <unk> check reads from data larger than that (spread over it)
NAMED_UNKNOWN = 12  # unknown words named, most frequent first


def views_config(recipe: TrainRecipe, config: DreamConfig) -> DreamConfig:
    """The config a run trains with, as to the image-to-image loss: the views feed it, so typed
    alone either is an error; a weight inherited from init_from's config (a model trained with
    views, now fine-tuned or given a heads round without them) is turned off for this run."""
    views, weight = recipe.cross_style_views, config.view_weight
    typed = "view_weight" in recipe.model_overrides
    if (views and weight <= 0) or (typed and weight > 0 and not views):
        raise ValueError(f"recipe.cross_style_views={views} with model.view_weight={weight}: the views feed the "
                         "image-to-image loss, so set both (cross_style_views=true model.view_weight=W) or neither")
    if weight > 0 and not views:
        print(f"model.view_weight {weight} (from {recipe.init_from}) is off in this run: it has no cross-style views",
              flush=True)
        return config.replace(view_weight=0.0)
    return config


def caption_sample(recipe: TrainRecipe, source, limit: int = VOCAB_SAMPLE) -> list[str]:
    """Captions of the data for the vocabulary check: all of them up to `limit` samples, else
    `limit` spread over the data. Fine-tuning's preservation images are left out (their captions
    come from the base model's own bank)."""
    if recipe.data == "shapes":
        from training.data.shapes_world import caption, random_scene

        rng = np.random.default_rng(recipe.seed)
        return [caption(random_scene(rng), rng) for _ in range(limit)]
    source = source.sources[0] if hasattr(source, "sources") else source
    if hasattr(source, "captions") and len(source) <= limit:
        return source.captions()
    out = []
    for i in np.linspace(0, len(source) - 1, min(limit, len(source))).astype(int):
        try:
            sample = source.read(int(i))
        except CorruptSample:
            continue
        out.append(sample["caption"] if isinstance(sample, dict) else sample[1])
    return out


def check_vocabulary(recipe: TrainRecipe, captions: list[str]) -> str:
    """One line naming the share of <unk> tokens the conditioning T5 gives the captions and the
    words behind them; raises ValueError above recipe.max_unknown_share, with the way out."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(recipe.t5_path), local_files_only=True)
    unknown, total, words = unknown_words(tokenizer, captions)
    share = unknown / max(total, 1)
    if not unknown:
        return f"vocabulary: every word of {len(captions)} captions is known to the T5 at {recipe.t5_path}"
    named = ", ".join(f"{w!r} ({n})" for w, n in words.most_common(NAMED_UNKNOWN))
    more = f" and {len(words) - NAMED_UNKNOWN} more" if len(words) > NAMED_UNKNOWN else ""
    line = (f"vocabulary: {share:.1%} of the T5 tokens of {len(captions)} captions are <unk> for the T5 at "
            f"{recipe.t5_path}, from {len(words)} unknown word{'s' if len(words) > 1 else ''} (most frequent first): "
            f"{named}{more}")
    if share <= recipe.max_unknown_share:
        return line
    if recipe.init_from:
        how = ("fine-tuning keeps the base model's vocabulary, so the model learns every unknown word as the "
               "same <unk>: any unknown word in a prompt will then draw what it learnt here. Use words the "
               "model knows, or pretrain with a vocabulary of your captions (python -m training.text_vocab, "
               "docs/own-data.md)")
    else:
        how = ("build a vocabulary of your captions (python -m training.text_vocab --out DIR --data "
               f"{recipe.data} --data-path {recipe.data_path or 'PATH'}) and train with t5_path=DIR")
    raise ValueError(f"{line}; that is more than max_unknown_share={recipe.max_unknown_share:g}. The model "
                     f"cannot tell unknown words apart: {how}. To go on anyway, add max_unknown_share=1")


def schedule_scale(recipe: TrainRecipe, total_steps: int, global_batch: int, samples_per_epoch: int,
                   stretch: bool = False) -> float:
    """How much faster than the epoch count a schedule runs in a run of max_steps: recipe epochs /
    run epochs, so its warm-ups take the same share of the run as they take of the recipe (1
    without max_steps). A run longer than the recipe is stretched to only with `stretch`: the LR
    schedule, whose cosine must end with the run, not at the recipe's epoch count (a 1,200-step
    shapes-heads run at batch 256 otherwise spent its last 450 steps at LR 0); Masking Warmup keeps
    its epochs, and a longer run its end state."""
    if not recipe.max_steps or recipe.epochs <= 0:
        return 1.0
    scale = recipe.epochs / (total_steps * global_batch / samples_per_epoch)
    return scale if stretch else max(1.0, scale)


def trim_log(path: Path, step: int) -> None:
    """Keep the rows of log.csv up to `step` (a resumed run logs the later steps again)."""
    if not path.is_file():
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    header, body = rows[0], rows[1:]
    keep = [row for row in body if row and row[0].isdigit() and int(row[0]) <= step]
    if len(keep) == len(body):
        return
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        if step > 0:
            w.writerow(header)
            w.writerows(keep)
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=None, help="recipe name (see --list-recipes)")
    ap.add_argument("--out", type=Path, default=None, help="run directory (checkpoints, logs)")
    ap.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    ap.add_argument("--export", type=Path, default=None, help="write a model directory (EMA weights) at the end")
    ap.add_argument("--captions", type=Path, default=None,
                    help="caption bank for the exported model: one caption per line, or caption<TAB>detail")
    ap.add_argument("--list-recipes", action="store_true")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (default: torch's choice; 1 is fastest beside another busy job)")
    ap.add_argument("overrides", nargs="*", help="recipe overrides key=value (model.KEY=value for the model config)")
    return ap.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> None:
    try:
        run(parse_args(argv))
    finally:
        end_process_group()  # every rank, every exit: the exit code is the one chosen below


def run(args: argparse.Namespace) -> None:
    if args.list_recipes:
        for name, r in RECIPES.items():
            print(f"{name:18s} model={r.model:7s} masking={r.masking:7s} data={r.data}")
        return
    if not args.recipe or not args.out:
        raise SystemExit("error: --recipe and --out are required (or --list-recipes)")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        recipe = get_recipe(args.recipe).overrides(args.overrides)
        if args.max_steps is not None:
            if args.max_steps < 1:
                raise ValueError("--max-steps must be >= 1")
            if recipe.max_steps and any(o.startswith("max_steps=") for o in args.overrides):
                print(f"--max-steps {args.max_steps} replaces the override max_steps={recipe.max_steps}", flush=True)
            recipe = recipe.overrides([f"max_steps={args.max_steps}"])
        captions = caption_details = None
        if args.captions is not None:
            if not args.captions.is_file():
                raise ValueError(f"--captions file {args.captions} does not exist")
            captions, caption_details = read_caption_bank(args.captions)
        trainer = Trainer(recipe, args.out)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2)
    except KeyboardInterrupt:
        print("interrupted before training started; nothing to save", file=sys.stderr)
        raise SystemExit(130)
    try:
        last = trainer.fit()
    except FloatingPointError as err:  # raised on every rank together (training/distributed.py)
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(3)
    if trainer.interrupted:
        raise SystemExit(130)
    if args.export:
        trainer.export(args.export, captions, caption_details=caption_details)
    trainer.acc.print(json.dumps(last))


if __name__ == "__main__":
    main()
