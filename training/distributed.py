"""The multi-process side of the trainer, kept apart from the loop: CUDA settings, FSDP2 sharding
per transformer block (bf16 parameters, fp32 reductions on a bf16 run), the EMA (on plain or
sharded parameters), resume guards, the all-ranks non-finite checks and the shared-folder check.

FSDP here is torch's FSDP2 (`fully_shard`): every encoder, decoder, text-aligner and text-tower
block is its own unit, the rest (embeddings, projector, diffusion head) is the root unit.
Parameters become DTensors sharded on dim 0, except scalars (the temperature `logit_scale`:
FSDP2 cannot shard a 0-d tensor), which stay replicated with their gradient averaged by
`sync_replicated_grads`; the EMA clones them, so each rank keeps the
EMA of its own shards and the update is a local `lerp_`. It runs on CUDA (NCCL) and on CPU
(gloo), which is how the tests exercise it.
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import socket
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import nn

try:  # torch >= 2.5
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = ()  # type: ignore[assignment]


# ---------------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------------

def configure_cuda() -> None:
    """TF32 matmuls and convolutions (Ampere and later): ~free speed for the fp32 parts (VAE
    weights, optimizer math); bf16 autocast covers the transformer."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def frozen_autocast(device: torch.device, precision: str):
    """Autocast for the frozen VAE and T5: bf16 on CUDA when the run is bf16, a no-op otherwise."""
    if device.type == "cuda" and precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------
# FSDP2
# ---------------------------------------------------------------------------------------------

def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks that become FSDP units: encoder, decoder, text aligner and contrastive text tower."""
    blocks: list[nn.Module] = []
    blocks += list(model.encoder.blocks)
    blocks += list(model.decoder.blocks)
    blocks += list(model.aligner.blocks)
    blocks += list(model.text_tower.transformer.transformer.resblocks)  # open_clip TextTransformer
    return blocks


def ensure_process_group(device: torch.device) -> None:
    """FSDP needs a process group; a single process (one GPU, `bench/gpu_check.py`) gets a world of one."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def end_process_group() -> None:
    """Tear the process group down before the interpreter exits, on success and on error alike.
    Left to interpreter shutdown, gloo's worker threads can outlive the group and the process
    aborts ("terminate called without an active exception", exit -6) after its own clear error,
    so a launcher sees a crash instead of the exit code the command chose."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def mixed_precision_policy(param_dtype: torch.dtype | None):
    """FSDP2's policy for a bf16 run: parameters all-gathered and computed in `param_dtype`
    (half the traffic of fp32 all-gathers), gradients reduce-scattered and accumulated in fp32
    (a bf16 sum over many ranks loses the small gradients). Inputs are left as given, so the
    ops run exactly as under DDP with autocast. None: the parameters' own dtype everywhere."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if param_dtype is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)


def shard_model(model: nn.Module, device: torch.device, param_dtype: torch.dtype | None = None) -> nn.Module:
    """Shard `model` in place with FSDP2: one unit per transformer block, one per BatchNorm (fp32),
    then the root, with `mixed_precision_policy(param_dtype)` (bf16 for a bf16 run, fp32 reductions)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    ensure_process_group(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = mixed_precision_policy(param_dtype)
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    # BatchNorm keeps fp32 parameters: batch_norm wants its weights in the dtype of its fp32
    # running statistics (a few kilobytes of all-gather).
    for norm in [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]:
        fully_shard(norm, mesh=mesh, mp_policy=mixed_precision_policy(None))
    scalars = {p for p in model.parameters() if p.ndim == 0}
    fully_shard(model, mesh=mesh, ignored_params=scalars or None, mp_policy=policy)
    return model


def sync_replicated_grads(model: nn.Module) -> None:
    """Average the gradients of the parameters FSDP left replicated (scalars) over the ranks."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    for p in model.parameters():
        if not isinstance(p, DTensor) and p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(dist.get_world_size())


def is_sharded(model: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (possibly sharded) tensor."""
    return t.to_local() if isinstance(t, DTensor) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (an all-gather for a sharded one: every rank must call it)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def all_ranks_finite(value: float, device: torch.device) -> bool:
    """Whether `value` is finite on every rank (one all-reduce of a flag; every rank gets the same
    answer, so all of them take the same branch after it)."""
    bad = torch.tensor([0.0 if math.isfinite(value) else 1.0], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad.item() == 0.0


def clip_grad_norm(parameters: Iterable[nn.Parameter], max_norm: float) -> float:
    """Clip the global gradient norm over sharded and replicated parameters alike and return it
    (the same float on every rank)."""
    params = [p for p in parameters if p.grad is not None]
    groups = [[p for p in params if isinstance(p, DTensor)], [p for p in params if not isinstance(p, DTensor)]]
    squares = [full(torch.nn.utils.get_total_norm([p.grad for p in g])).float() ** 2 for g in groups if g]
    if not squares:
        return 0.0
    total = torch.stack([s.to(squares[0].device) for s in squares]).sum().sqrt()
    for g in groups:
        if g:
            torch.nn.utils.clip_grads_with_norm_(g, max_norm, total.to(g[0].device))
    return float(total)


# ---------------------------------------------------------------------------------------------
# EMA
# ---------------------------------------------------------------------------------------------

class EMA:
    """Exponential moving average of the parameters (fp32), built from the PREPARED model so every
    shadow lives where its parameter lives (same device, same shards under FSDP). With warm-up the
    decay at update t is min(decay, (1 + t) / (10 + t)); without it, the fixed decay (official)."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool) -> None:
        self.decay, self.warmup = decay, warmup
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters()}
        self.updates = 0

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        for n, p in model.named_parameters():
            local(self.shadow[n]).lerp_(local(p.detach()).float(), 1 - d)
        self.updates += 1

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Full EMA parameters plus the model's persistent buffers (BN running statistics are not
        averaged). Gathers sharded shadows: under FSDP every rank must call it."""
        state = {n: full(t).clone() for n, t in self.shadow.items()}
        persistent = model.state_dict().keys()  # not e.g. open_clip's non-persistent attn_mask
        for n, b in model.named_buffers():
            if n in persistent:
                state[n] = b.detach().clone()
        return state

    def local_state(self) -> dict[str, torch.Tensor]:
        """This rank's shards of the shadow (the sharded checkpoint)."""
        return {n: local(t) for n, t in self.shadow.items()}

    @torch.no_grad()
    def load(self, state: dict[str, torch.Tensor], updates: int) -> None:
        """Load full (or, for a sharded shadow, this rank's local) tensors."""
        for n in self.shadow:
            local(self.shadow[n]).copy_(state[n])
        self.updates = updates


# ---------------------------------------------------------------------------------------------
# Sharded state (per-rank tensors) for the checkpoint
# ---------------------------------------------------------------------------------------------

def local_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """This rank's shards of the parameters and its persistent buffers."""
    persistent = model.state_dict().keys()
    state = {n: local(p.detach()) for n, p in model.named_parameters()}
    state.update({n: b.detach() for n, b in model.named_buffers() if n in persistent})
    return state


@torch.no_grad()
def load_local_model_state(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    names = dict(model.named_parameters()) | dict(model.named_buffers())
    persistent = model.state_dict().keys()
    wanted = {n for n in names if n in persistent or n in dict(model.named_parameters())}
    missing, unexpected = sorted(wanted - set(state)), sorted(set(state) - wanted)
    if missing or unexpected:
        raise ValueError(f"checkpoint {where} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for n in wanted:
        target = local(names[n])
        if target.shape != state[n].shape:
            raise ValueError(f"checkpoint {where}: {n} has shape {tuple(state[n].shape)}, this rank's shard "
                             f"is {tuple(target.shape)}")
        target.copy_(state[n])


def local_optimizer_state(state: Any) -> Any:
    """An optimizer state dict with every DTensor replaced by its local shard."""
    if isinstance(state, dict):
        return {k: local_optimizer_state(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(local_optimizer_state(v) for v in state)
    return local(state) if isinstance(state, torch.Tensor) else state


def shard_optimizer_state(state: dict, optimizer: torch.optim.Optimizer) -> dict:
    """The inverse of `local_optimizer_state` for this optimizer: per-parameter tensors shaped like
    the local shard become DTensors placed like their parameter (scalars such as `step` stay)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    out = dict(state)
    out["state"] = {}
    for idx, per_param in state["state"].items():
        p = params[int(idx)]
        entry = {}
        for k, v in per_param.items():
            if isinstance(p, DTensor) and isinstance(v, torch.Tensor) and v.shape == p.to_local().shape and v.ndim:
                v = DTensor.from_local(v.to(p.device), p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
            entry[k] = v
        out["state"][idx] = entry
    return out


# ---------------------------------------------------------------------------------------------
# Resume guards
# ---------------------------------------------------------------------------------------------

# Settings that position the data stream, choose its captions and views, or scale the LR: a resume
# must use the same ones.
RESUME_KEYS = ("world_size", "grad_accum", "batch_size", "global_batch", "data", "data_path", "cache_path",
               "caption_templates", "crop_min", "cross_style_views", "extra_art", "seed", "fsdp")


def run_layout(recipe, world: int) -> dict[str, Any]:
    """What a checkpoint records (and a resume checks) about how the run consumes data."""
    return {"world_size": world, "grad_accum": recipe.grad_accum, "batch_size": recipe.batch_size,
            "global_batch": recipe.batch_size * recipe.grad_accum * world, "data": recipe.data,
            "data_path": recipe.data_path, "cache_path": recipe.cache_path,
            "caption_templates": recipe.caption_templates, "crop_min": recipe.crop_min,
            "cross_style_views": recipe.cross_style_views, "extra_art": recipe.extra_art, "seed": recipe.seed,
            "fsdp": bool(recipe.fsdp)}


def check_resume(meta: dict, current: dict[str, Any], where: str) -> None:
    """Refuse to resume with another world size, accumulation, batch, data source, caption set, crop,
    views, extra art or sharding: each would silently shift the data stream (positions are a function of them),
    change what the captions say or the images show, or change the LR."""
    saved = dict(meta.get("layout") or {})
    if not saved:  # checkpoints written before the layout was recorded
        r = meta.get("recipe", {})
        world = meta.get("world_size", 1)
        saved = {"world_size": world, "grad_accum": r.get("grad_accum"), "batch_size": r.get("batch_size"),
                 "data": r.get("data"), "data_path": r.get("data_path"), "cache_path": r.get("cache_path"),
                 "seed": r.get("seed"), "fsdp": bool(r.get("fsdp"))}
        if r.get("batch_size") and r.get("grad_accum"):
            saved["global_batch"] = r["batch_size"] * r["grad_accum"] * world
    # Layouts recorded before these keys existed trained on every template (""), whole images (1.0),
    # no views and no extra art (False), unless the recipe saved beside them names a choice.
    for key, before in (("caption_templates", ""), ("crop_min", 1.0), ("cross_style_views", False),
                        ("extra_art", False)):
        saved.setdefault(key, meta.get("recipe", {}).get(key, before))
    diff = [k for k in RESUME_KEYS if k in saved and saved[k] != current[k]]
    if diff:
        detail = ", ".join(f"{k}: checkpoint {saved[k]!r} vs now {current[k]!r}" for k in diff)
        raise ValueError(f"cannot resume from {where}: it was written with other settings ({detail}); these set "
                         f"the data stream position and the learning rate, so resume with the same ones "
                         f"(e.g. the same number of processes) or start a new --out")


# ---------------------------------------------------------------------------------------------
# Non-finite stop
# ---------------------------------------------------------------------------------------------

LOSS_TERMS = ("loss", "diffusion", "clip", "repa")


def stop_if_not_finite(out: dict, step: int, device: torch.device) -> None:
    """Every rank calls this before backward: one small all-gather of (finite?, loss terms). If any
    rank's loss is not finite, every rank raises the same FloatingPointError (none is left waiting
    in a collective)."""
    values = [float(out[k].detach()) if isinstance(out.get(k), torch.Tensor) else float(out.get(k, 0.0))
              for k in LOSS_TERMS]
    bad = 0.0 if torch.isfinite(out["loss"].detach()).all() else 1.0
    row = torch.tensor([bad, *values], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        rows = [torch.empty_like(row) for _ in range(dist.get_world_size())]
        dist.all_gather(rows, row)
    else:
        rows = [row]
    if not any(r[0].item() for r in rows):
        return
    parts = []
    for rank, r in enumerate(rows):
        if r[0].item():
            terms = ", ".join(f"{k}={r[i + 1].item():.6g}" for i, k in enumerate(LOSS_TERMS) if k in out)
            parts.append(f"rank {rank} ({terms})")
    raise FloatingPointError(f"non-finite loss at step {step + 1} on {'; '.join(parts)}: every rank stops; "
                             f"resume from the last checkpoint with a lower lr or check the data")


# ---------------------------------------------------------------------------------------------
# The shared run folder
# ---------------------------------------------------------------------------------------------

def check_shared_folder(out: Path, rank: int, world: int) -> None:
    """Refuse, on every rank together, a run folder that not every rank sees: rank 0 writes a
    probe file into `out` and every other rank looks for it. Checkpoints (each FSDP rank writes its
    own shards into rank 0's folder) and resume need one folder at the same path on every node; a
    node-local `--out` would otherwise first fail at the first checkpoint, with the other ranks
    waiting in a collective until the NCCL timeout. Ranks other than 0 write nothing."""
    if world <= 1:
        return
    out = Path(out)
    token = [secrets.token_hex(8) if rank == 0 else ""]
    dist.broadcast_object_list(token, src=0)
    probe = out / f".shared-folder-check-{token[0]}"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_text(token[0])
    dist.barrier()
    try:
        seen = probe.read_text() == token[0]
    except OSError:
        seen = False
    views: list[Any] = [None] * world
    dist.all_gather_object(views, (seen, socket.gethostname()))
    dist.barrier()
    if rank == 0:
        probe.unlink()
    blind = [(r, host) for r, (ok, host) in enumerate(views) if not ok]
    if blind:
        where = ", ".join(f"rank {r} on {host}" for r, host in blind)
        raise ValueError(f"--out {os.path.abspath(out)} is not one folder shared by every process: {where} cannot "
                         f"see the file rank 0 (on {views[0][1]}) wrote there. Checkpoints and resume need "
                         f"the run folder on a file system every node mounts at the same path (NFS, Lustre, "
                         f"a shared volume); nothing was trained")


def contrastive_negatives_note(recipe, world: int) -> str:
    """How many negatives each contrastive query really sees (gradient accumulation does not add any)."""
    n = recipe.batch_size * world
    note = f"contrastive loss: each query sees {n} captions (batch_size {recipe.batch_size} x {world} processes)"
    if recipe.grad_accum > 1:
        note += (f", NOT the global batch of {n * recipe.grad_accum}: gradient accumulation ({recipe.grad_accum} "
                 f"micro-batches) averages {recipe.grad_accum} separate {n}-way losses")
    return note


__all__ = [
    "EMA", "RESUME_KEYS", "all_ranks_finite", "check_resume", "check_shared_folder", "clip_grad_norm",
    "configure_cuda", "contrastive_negatives_note", "end_process_group", "ensure_process_group", "frozen_autocast",
    "full", "is_sharded",
    "load_local_model_state", "local", "local_model_state", "local_optimizer_state", "mixed_precision_policy",
    "run_layout", "shard_model", "shard_optimizer_state", "stop_if_not_finite", "sync_replicated_grads",
    "transformer_blocks",
]
