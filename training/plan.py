"""Memory plan of a training run, per GPU, before anyone rents the GPUs.

    python -m training.plan --recipe dream-giant --gpus 8 --gpu-memory 80
    python -m training.plan --recipe dream-huge --gpus 32 --gpu-memory 80 --global-batch 2048
    python -m training.plan --recipe dream-giant --gpus 8 --gpu-memory 80 grad_checkpointing=false

States, for one GPU: the trainable parameters, their gradients, AdamW's two moments and the EMA
(sharded over the GPUs under FSDP, whole under DDP), the frozen VAE and T5, and the activations
kept for backward at the per-GPU batch; exits with code 1 when they do not fit in --gpu-memory.

Nothing is allocated: the model is built under torch's FakeTensorMode (meta storage, real shapes
and dtypes), and the activations are the bytes autograd saves for backward in one forward of each
part (encoder and decoder block, text aligner, text tower, diffusion head) under bf16 autocast,
measured at two batch sizes so that batch-independent tensors (weight casts) drop out. Attention
is counted as the CUDA memory-efficient kernel keeps it (q, k, v, output, log-sum-exp), not as the
CPU's reference kernel. The token counts are the worst of the run: the encoder pads every sample
to the most visible one (all tokens visible), and the decoder and head see the share of samples
with at least `min_masked_for_diffusion` masked at the point of the masking schedule where it is
largest (Masking Warmup moves it from ~32 % to ~68 %), with a three-sigma batch margin.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator
from unittest import mock

import torch
from torch import nn

GIB = 2**30
# CUDA context, NCCL buffers and allocator fragmentation: memory a run cannot plan on.
RESERVED_GIB = 3.0
# What the per-part measurement leaves out (embeddings, gathers, losses, backward's transient
# gradient buffers), as a share of the measured activations.
ACTIVATION_MARGIN = 0.15
# T5 v1.1 XXL's encoder (the paper's conditioning encoder), used when the recipe names no local T5.
T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
              feed_forward_proj="gated-gelu")
# The SD-VAE (AutoencoderKL, 4 latent channels) when the recipe names no local VAE.
SD_VAE_PARAMS = 83_653_863


@dataclass
class MemoryPlan:
    """Bytes per GPU of one run layout; `fits` compares them with the GPU's memory."""

    recipe: str
    model: str
    gpus: int
    gpu_memory_gib: float
    batch_per_gpu: int
    grad_accum: int
    fsdp: bool
    grad_checkpointing: bool
    trainable_params: int
    parts: dict[str, float]  # name -> bytes per GPU
    decoder_share: float
    head_rows: int

    @property
    def total_bytes(self) -> float:
        return sum(self.parts.values())

    @property
    def usable_bytes(self) -> float:
        return (self.gpu_memory_gib - RESERVED_GIB) * GIB

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.usable_bytes

    @property
    def global_batch(self) -> int:
        return self.batch_per_gpu * self.grad_accum * self.gpus

    def render(self) -> str:
        """The plan as a few lines of text (what the command prints)."""
        how = "FSDP (sharded over the GPUs)" if self.fsdp else "DDP (every GPU holds everything)"
        lines = [f"{self.recipe} ({self.model}, {self.trainable_params / 1e9:.2f} B trainable parameters) on "
                 f"{self.gpus} GPUs of {self.gpu_memory_gib:g} GiB, {how}, gradient checkpointing "
                 f"{'on' if self.grad_checkpointing else 'off'}",
                 f"batch {self.batch_per_gpu} per GPU x {self.grad_accum} accumulation x {self.gpus} GPUs = "
                 f"global batch {self.global_batch}; decoder on {self.decoder_share:.0%} of the samples, "
                 f"head on {self.head_rows} token rows per GPU (worst point of the masking schedule)",
                 "per GPU:"]
        width = max(len(k) for k in self.parts)
        for name, value in self.parts.items():
            lines.append(f"  {name:<{width}}  {value / GIB:8.2f} GiB")
        lines.append(f"  {'total':<{width}}  {self.total_bytes / GIB:8.2f} GiB of {self.usable_bytes / GIB:.1f} GiB "
                     f"usable ({self.gpu_memory_gib:g} GiB less {RESERVED_GIB:g} GiB for the CUDA context, "
                     f"NCCL and fragmentation)")
        lines.append("fits" if self.fits else "DOES NOT FIT")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Measuring on fake tensors
# ---------------------------------------------------------------------------------------------

class _EfficientAttention(torch.autograd.Function):
    """Stands in for SDPA while measuring: saves what the CUDA memory-efficient kernel saves."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out


def _efficient_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Any = None, dropout_p: float = 0.0,
                    is_causal: bool = False, scale: float | None = None, **_: Any) -> torch.Tensor:
    return _EfficientAttention.apply(q, k, v)


@contextmanager
def _measuring(fake_mode: Any, bf16: bool) -> Iterator[None]:
    """The fake tensor mode the model was built in, CPU autocast standing in for CUDA autocast,
    attention as on CUDA."""
    with fake_mode, mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", _efficient_sdpa), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        yield


def saved_bytes(fn: Callable[[], Any]) -> int:
    """Bytes of the distinct storages autograd saves for backward while `fn` runs."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage._cdata] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def per_unit(fn: Callable[[int], Any], n: int = 1) -> float:
    """Saved bytes per batch unit of `fn(batch)`: measured at n and 2n, so that tensors that do
    not grow with the batch (weights and their bf16 casts) drop out."""
    return (saved_bytes(lambda: fn(2 * n)) - saved_bytes(lambda: fn(n))) / n


def _leaf(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, requires_grad=dtype.is_floating_point)


def _fp32_bytes(*shape: int) -> int:
    """A block's input: the residual stream stays fp32 under autocast."""
    return 4 * math.prod(shape)


@dataclass(frozen=True)
class Stack:
    """Saved bytes per batch unit of a stack of `depth` equal blocks after a stem. With
    checkpointing a block keeps only its input and one block at a time is recomputed."""

    stem: float
    block: float
    block_input: float
    depth: int

    def total(self, checkpointing: bool) -> float:
        if checkpointing:
            return self.stem + self.depth * self.block_input + self.block
        return self.stem + self.depth * self.block


def measure_activations(model: nn.Module) -> dict[str, Stack]:
    """Per sample (encoder, text tower), per decoder row (aligner, decoder) and per head row
    (head): the saved bytes of each part, for a model built under `_measuring`'s fake mode."""
    c = model.config
    t_img, t_txt, w = c.buffer_size + c.seq_len, c.t5_max_length, c.width
    enc, dec, aligner, head = model.encoder, model.decoder, model.aligner, model.head.net
    tower = model.text_tower.transformer

    def mask(b: int, t: int) -> torch.Tensor:  # a padding mask: the masked attention path
        return torch.ones(b, t, dtype=torch.bool)

    head_block = per_unit(lambda n: head.res_blocks[0](_leaf(n, head.width), _leaf(n, head.width)), 64)
    # The head's whole training loss (timestep MLP, trunk, VLB terms) less its blocks, which
    # checkpointing puts back one at a time.
    head_whole = per_unit(lambda n: model.head.train_diffusion.training_losses(
        head, torch.empty(n, c.token_dim), _leaf(n, w)), 64)
    aligner_block = (per_unit(lambda b: aligner.blocks[0](_leaf(b, t_txt, w), mask(b, t_txt)))
                     if len(aligner.blocks) else 0.0)
    return {
        "encoder": Stack(
            stem=per_unit(lambda b: enc.norm(enc.z_proj_ln(enc.z_proj(_leaf(b, t_img, c.token_dim))))),
            block=per_unit(lambda b: enc.blocks[0](_leaf(b, t_img, w), mask(b, t_img))),
            block_input=_fp32_bytes(t_img, w), depth=len(enc.blocks)),
        "text aligner": Stack(
            stem=per_unit(lambda b: aligner.text_proj_ln(aligner.text_proj(torch.empty(b, t_txt, c.t5_dim)))),
            block=aligner_block, block_input=_fp32_bytes(t_txt, w), depth=len(aligner.blocks)),
        "decoder": Stack(
            stem=per_unit(lambda b: dec.norm(dec.proj_ln(dec.decoder_embed(_leaf(b, t_img, w))))),
            block=per_unit(lambda b: dec.blocks[0](_leaf(b, t_img, w), _leaf(b, t_txt, w), mask(b, t_txt))),
            block_input=_fp32_bytes(t_img, w), depth=len(dec.blocks)),
        # Never checkpointed: the whole tower counts as its stem.
        "contrastive text tower": Stack(
            stem=per_unit(lambda b: tower.transformer(_leaf(b, c.clip_context_length, c.clip_width),
                                                      attn_mask=tower.attn_mask)),
            block=0.0, block_input=0.0, depth=0),
        "diffusion head": Stack(stem=head_whole - head.depth * head_block, block=head_block,
                                block_input=_fp32_bytes(head.width), depth=head.depth),
    }


# ---------------------------------------------------------------------------------------------
# Token counts at the worst point of the run
# ---------------------------------------------------------------------------------------------

def decoder_load(recipe, config, batch: int, points: int = 41, draws: int = 20_000) -> tuple[float, int, int]:
    """(share, decoder rows, head rows) per GPU at the point of the masking schedule where the
    decoder's share of the batch is largest: rows get a three-sigma margin over the batch mean;
    each decoder row sends its masked tokens x `diffusion_batch_mul` to the head."""
    from dream_core.masking import num_masked

    schedule = recipe.masking_schedule()
    end = max(recipe.epochs, getattr(schedule, "ramp_end", 0.0), 1e-9)
    gen = torch.Generator().manual_seed(0)
    share, per_row = 0.0, 0.0
    for k in range(points):
        ratios = schedule.sample(end * k / (points - 1), draws, gen)
        masked = num_masked(ratios, config.seq_len)
        ok = (masked.double() / config.seq_len >= config.min_masked_for_diffusion) & (masked > 0)
        if ok.any():
            share = max(share, ok.double().mean().item())
            per_row = max(per_row, masked[ok].double().mean().item())  # masked tokens of a decoder row
    if config.diffusion_weight == 0 or share == 0:
        return 0.0, 0, 0
    rows = min(batch, math.ceil(share * batch + 3 * math.sqrt(batch * share * (1 - share))))
    return share, rows, math.ceil(per_row * rows) * config.diffusion_batch_mul


# ---------------------------------------------------------------------------------------------
# Frozen models
# ---------------------------------------------------------------------------------------------

def t5_params(t5_path: str) -> int:
    """Parameters of the T5 encoder at t5_path (its config.json; T5-XXL's when there is none),
    counted on the meta device."""
    from transformers import T5Config, T5EncoderModel

    cfg_file = Path(t5_path) / "config.json" if t5_path else None
    fields = json.loads(cfg_file.read_text()) if cfg_file is not None and cfg_file.is_file() else T5_XXL
    config = T5Config(**fields)
    with torch.device("meta"):
        return sum(p.numel() for p in T5EncoderModel(config).parameters())


def vae_params(vae_path: str) -> int:
    """Parameters of the AutoencoderKL at vae_path (the SD-VAE's when there is none)."""
    cfg_file = Path(vae_path) / "config.json" if vae_path else None
    if cfg_file is None or not cfg_file.is_file():
        return SD_VAE_PARAMS
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        return sum(p.numel() for p in AutoencoderKL.from_config(json.loads(cfg_file.read_text())).parameters())


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def model_stats(config_json: str, bf16: bool) -> tuple[int, int, int, dict[str, Stack]]:
    """(trainable parameters, parameters outside the FSDP blocks, parameters of the largest
    block, per-part activations) of a model config, built under FakeTensorMode."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from dream_core.config import DreamConfig
    from dream_core.model import DreamModel
    from training.distributed import transformer_blocks

    fake_mode = FakeTensorMode()
    with fake_mode:
        model = DreamModel(DreamConfig.from_dict(json.loads(config_json)))
    model.train()
    trainable = sum(p.numel() for p in model.parameters())
    blocks = transformer_blocks(model)
    in_blocks = {id(p) for blk in blocks for p in blk.parameters()}
    root = sum(p.numel() for p in model.parameters() if id(p) not in in_blocks)
    largest_block = max(sum(p.numel() for p in blk.parameters()) for blk in blocks)
    with _measuring(fake_mode, bf16):
        acts = measure_activations(model)
    return trainable, root, largest_block, acts


def plan_memory(recipe, gpus: int, gpu_memory_gib: float, bf16: bool = True) -> MemoryPlan:
    """The memory plan of `recipe` on `gpus` GPUs of `gpu_memory_gib` GiB (bf16 autocast unless
    the recipe says fp32); the per-GPU batch is recipe.batch_size, as in the trainer."""
    if gpus < 1 or gpu_memory_gib <= 0:
        raise ValueError(f"--gpus must be >= 1 and --gpu-memory > 0, got {gpus} and {gpu_memory_gib}")
    bf16 = bf16 and recipe.precision != "fp32"
    config = recipe.model_config()
    trainable, root, largest_block, acts = model_stats(json.dumps(config.to_dict(), sort_keys=True), bf16)

    batch = recipe.batch_size
    share, rows, head_rows = decoder_load(recipe, config, batch)
    ckpt = recipe.grad_checkpointing
    activations = (batch * (acts["encoder"].total(ckpt) + acts["contrastive text tower"].total(False))
                   + rows * (acts["text aligner"].total(ckpt) + acts["decoder"].total(ckpt))
                   + head_rows * acts["diffusion head"].total(ckpt))
    if config.clip_weight == 0:
        activations -= batch * acts["contrastive text tower"].total(False)

    shards = gpus if recipe.fsdp else 1
    half = 2 if bf16 else 4
    parts: dict[str, float] = {
        "parameters (fp32)": 4 * trainable / shards,
        "gradients (fp32)": 4 * trainable / shards,
        "AdamW moments (fp32)": 8 * trainable / shards,
        "EMA (fp32)": 4 * trainable / shards,
    }
    if recipe.fsdp:  # the root unit stays gathered through the forward; two blocks in flight
        parts["FSDP gathered parameters"] = half * (root + 2 * largest_block)
    else:  # DDP's bucketed copy of the gradients; autocast's bf16 copy of every weight
        parts["DDP gradient buckets"] = 4 * trainable
        if bf16:
            parts["autocast weight copies (bf16)"] = 2 * trainable
    frozen_t5 = 0 if recipe.data == "cache" else t5_params(recipe.t5_path) * half
    parts["frozen VAE (fp32) and T5" + (" (bf16)" if bf16 else "")] = 4 * vae_params(recipe.vae_path) + frozen_t5
    parts[f"activations (+{ACTIVATION_MARGIN:.0%} margin)"] = activations * (1 + ACTIVATION_MARGIN)
    return MemoryPlan(recipe=recipe.name, model=config.name, gpus=gpus, gpu_memory_gib=gpu_memory_gib,
                      batch_per_gpu=batch, grad_accum=recipe.grad_accum, fsdp=bool(recipe.fsdp),
                      grad_checkpointing=bool(ckpt), trainable_params=trainable, parts=parts,
                      decoder_share=rows / batch if batch else 0.0, head_rows=head_rows)


def memory_note(recipe, gpus: int, device: torch.device) -> str:
    """One line for the trainer's start on CUDA: the plan's total against this GPU's memory. An
    estimate never stops a run: a plan that cannot be made is named, not raised."""
    total = torch.cuda.get_device_properties(device).total_memory / GIB
    try:
        plan = plan_memory(recipe, gpus, total)
    except Exception as err:  # noqa: BLE001  (a note, not a check)
        return f"memory plan: not available ({type(err).__name__}: {err})"
    note = f"memory plan: {plan.total_bytes / GIB:.1f} GiB a GPU of {total:.1f} GiB"
    if not plan.fits:
        note += (" -- more than this GPU can hold: expect an out-of-memory error (python -m training.plan "
                 "for the parts and a way out)")
    return note


def smallest_fitting_accumulation(recipe, gpus: int, gpu_memory_gib: float) -> int | None:
    """The smallest gradient accumulation (a power of two) that keeps the global batch and fits."""
    while recipe.batch_size % 2 == 0:
        recipe = dataclasses.replace(recipe, batch_size=recipe.batch_size // 2, grad_accum=recipe.grad_accum * 2)
        if plan_memory(recipe, gpus, gpu_memory_gib).fits:
            return recipe.grad_accum
    return None


# Floats autograd keeps per token and unit of width in one transformer block (its norms, q/k/v, the
# attention output, the MLP's 4x hidden twice, the residuals), and per row and unit of width in one
# block of the diffusion head: the closed-form count of Korthikanti et al. (2022), in fp32.
BLOCK_FLOATS = 16
HEAD_FLOATS = 12


def available_memory() -> int | None:
    """Bytes of RAM this process can still take (psutil's `available`; the free pages without it)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None


def cpu_step_bytes(recipe, config, trainable: int) -> float:
    """A rough size of one fp32 training step on the CPU, without measuring anything (the GPU plan
    above takes minutes on a CPU): five copies of the trainable parameters (weights, gradients,
    AdamW's two moments, the EMA), the frozen VAE and T5 as stored, and the activations kept for
    backward at the recipe's batch: every transformer block's BLOCK_FLOATS per token and width plus
    the attention probabilities of CPU's reference kernel (with gradient checkpointing, a block's
    input only and one block whole), the diffusion head's rows (every token x diffusion_batch_mul)."""
    c, batch = config, recipe.batch_size

    def blocks(tokens: int, width: int, heads: int, depth: int) -> float:
        whole = tokens * width * BLOCK_FLOATS + 2 * heads * tokens * tokens
        kept = tokens * width * depth + whole if recipe.grad_checkpointing else whole * depth
        return 4.0 * kept

    tokens = c.seq_len + c.buffer_size
    per_sample = (blocks(tokens, c.width, c.num_heads, c.encoder_depth + c.decoder_depth)
                  + blocks(c.t5_max_length, c.width, c.num_heads, c.aligner_depth)
                  + blocks(c.clip_context_length, c.clip_width, c.clip_heads, c.clip_layers)
                  + 4.0 * c.seq_len * c.diffusion_batch_mul * c.head_width * HEAD_FLOATS * c.head_depth)
    frozen = sum(f.stat().st_size for key in ("vae_path", "t5_path") if getattr(recipe, key)
                 for f in Path(getattr(recipe, key)).glob("*.safetensors"))
    return 5 * 4.0 * trainable + frozen + batch * per_sample


def check_cpu_memory(recipe, config, trainable: int) -> str:
    """One line for a CPU run's start; raises ValueError when the step's estimate is more than the
    RAM still available, so the run stops with a reason instead of being killed by the OS."""
    need, free = cpu_step_bytes(recipe, config, trainable), available_memory()
    if free is None:
        return f"memory: about {need / GIB:.2f} GiB a step (the available RAM is unknown here)"
    if need > free:
        raise ValueError(f"this run needs about {need / GIB:.1f} GiB of RAM a step (weights, gradients, AdamW, "
                         f"EMA and the activations of batch_size={recipe.batch_size}; a rough estimate) but "
                         f"{free / GIB:.1f} GiB are available: lower batch_size (grad_accum=N keeps the global "
                         f"batch), set grad_checkpointing=true, or choose a smaller model")
    return f"memory: about {need / GIB:.2f} GiB a step of {free / GIB:.1f} GiB available"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", required=True, help="recipe name (python -m training.train --list-recipes)")
    ap.add_argument("--gpus", type=int, required=True, help="GPUs in the run, over every node")
    ap.add_argument("--gpu-memory", type=float, required=True, help="memory of one GPU, GiB (80 for an H100)")
    ap.add_argument("--global-batch", type=int, default=None,
                    help="set batch_size to this over --gpus and grad_accum (default: the recipe's batch_size)")
    ap.add_argument("overrides", nargs="*", help="recipe overrides key=value, as for training.train")
    return ap.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    from training.recipes import get_recipe

    args = parse_args(argv)
    try:
        recipe = get_recipe(args.recipe).overrides(args.overrides)
        if args.global_batch is not None:
            per_gpu, rest = divmod(args.global_batch, args.gpus * recipe.grad_accum)
            if rest or per_gpu < 1:
                raise ValueError(f"--global-batch {args.global_batch} is not a multiple of --gpus {args.gpus} x "
                                 f"grad_accum {recipe.grad_accum}")
            recipe = recipe.overrides([f"batch_size={per_gpu}"])
        plan = plan_memory(recipe, args.gpus, args.gpu_memory)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(plan.render())
    if plan.fits:
        return 0
    hints = []
    if not plan.grad_checkpointing:
        hints.append("grad_checkpointing=true")
    accum = smallest_fitting_accumulation(recipe, args.gpus, args.gpu_memory)
    if accum is not None:
        hints.append(f"batch_size={recipe.batch_size * recipe.grad_accum // accum} grad_accum={accum} "
                     f"(the same global batch; fewer contrastive negatives per query)")
    if not recipe.fsdp:
        hints.append("fsdp=true")
    print("refused: this plan does not fit; try " + " or ".join(hints) if hints else
          "refused: this plan does not fit on these GPUs", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
