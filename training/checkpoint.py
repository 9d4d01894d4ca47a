"""Atomic, pickle-free training checkpoints.

A checkpoint is a directory: `model.safetensors`, `ema.safetensors`, `optimizer.safetensors` (every
tensor of the optimizer state, flattened), `state.json` (step, epoch, data position, scalar
optimizer state, recipe and model config) and `rng.safetensors` (generator states). It is written
to `<name>.tmp` and renamed, so a kill leaves either the old or the new checkpoint, never half.

A sharded checkpoint (FSDP) has, instead of the first three files, one folder per rank,
`rank-RRRRR/{model,ema,optimizer}.safetensors` + `optimizer.json`, each written by its own rank
(this rank's shards only: no rank ever holds the full model or optimizer), and
`state.json["sharded_world_size"]`. It resumes on the same number of processes only; a full
safetensors model is exported from it once, at the end (`Trainer.export`). Safetensors rather
than `torch.distributed.checkpoint`, whose metadata file is a pickle. The run directory must be
on a file system every rank sees (as for any multi-node checkpoint).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def _flatten(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace tensors by {"__tensor__": key} references, collecting them in `tensors`."""
    if isinstance(obj, torch.Tensor):
        key = prefix.strip(".") or "value"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[_flatten(k, f"{prefix}.k{i}", tensors), _flatten(v, f"{prefix}.{i}", tensors)]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [_flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)],
                "tuple": isinstance(obj, tuple)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint value of type {type(obj).__name__} at {prefix}")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            items = [_unflatten(v, tensors) for v in obj["__list__"]]
            return tuple(items) if obj.get("tuple") else items
    return obj


def save_state_tree(path: Path, tree: Any) -> dict:
    """Save a nested structure with tensors: tensors to `path` (safetensors), the rest returned."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(tree, "", tensors)
    save_file(tensors, str(path))
    return skeleton


def load_state_tree(path: Path, skeleton: Any) -> Any:
    return _unflatten(skeleton, load_file(str(path)))


def state_dict_to_safetensors(path: Path, state: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path))


def save_checkpoint(directory: Path, *, model_state: dict, ema_state: dict, optimizer_state: dict,
                    rng: dict[str, torch.Tensor], meta: dict) -> None:
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    state_dict_to_safetensors(tmp / "model.safetensors", model_state)
    state_dict_to_safetensors(tmp / "ema.safetensors", ema_state)
    optim_skeleton = save_state_tree(tmp / "optimizer.safetensors", optimizer_state)
    save_file({k: v.cpu().contiguous() for k, v in rng.items()}, str(tmp / "rng.safetensors"))
    (tmp / "state.json").write_text(json.dumps({**meta, "optimizer": optim_skeleton}, indent=1))
    _commit(tmp, directory)


def _commit(tmp: Path, directory: Path) -> None:
    """fsync state.json (the completeness marker), then swap `tmp` in place of `directory`."""
    with open(tmp / "state.json") as f:
        os.fsync(f.fileno())
    old = directory.with_name(directory.name + ".old")
    if directory.exists():
        if old.exists():
            shutil.rmtree(old)
        directory.rename(old)
    tmp.rename(directory)
    if old.exists():
        shutil.rmtree(old)


def rank_dir(directory: Path, rank: int) -> Path:
    return Path(directory) / f"rank-{rank:05d}"


def save_sharded_checkpoint(directory: Path, *, rank: int, world: int, barrier, model_state: dict,
                            ema_state: dict, optimizer_state: dict, rng: dict[str, torch.Tensor] | None,
                            meta: dict | None) -> None:
    """Every rank calls this with its own shards; rank 0 also passes `rng` and `meta` and commits.
    `barrier()` synchronises the ranks (the directory swap waits for every shard)."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    mine = rank_dir(tmp, rank)
    mine.mkdir(parents=True, exist_ok=True)  # the run folder is checked to be shared at start-up
    state_dict_to_safetensors(mine / "model.safetensors", model_state)
    state_dict_to_safetensors(mine / "ema.safetensors", ema_state)
    skeleton = save_state_tree(mine / "optimizer.safetensors", optimizer_state)
    (mine / "optimizer.json").write_text(json.dumps(skeleton))
    barrier()
    if rank == 0:
        save_file({k: v.cpu().contiguous() for k, v in (rng or {}).items()}, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps({**(meta or {}), "sharded_world_size": world}, indent=1))
        _commit(tmp, directory)
    barrier()


def read_checkpoint_meta(directory: Path) -> dict:
    """state.json alone (cheap: the resume guards run before any tensor is read)."""
    try:
        return json.loads((Path(directory) / "state.json").read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"checkpoint {directory}/state.json is corrupt: {err}") from err


def load_sharded_checkpoint(directory: Path, rank: int, world: int) -> dict:
    """This rank's shards (model, EMA, optimizer), the rng states and the meta."""
    directory = Path(directory)
    meta = read_checkpoint_meta(directory)
    saved = meta.get("sharded_world_size")
    if saved is None:
        raise ValueError(f"checkpoint {directory} is not sharded (it was written without FSDP)")
    if saved != world:
        raise ValueError(f"checkpoint {directory} is sharded over {saved} processes but this run has {world}: "
                         f"resume with {saved} processes (or export the model and start a new run)")
    mine = rank_dir(directory, rank)
    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors", "optimizer.json"):
        if not (mine / name).is_file():
            raise ValueError(f"checkpoint {directory} is incomplete: {mine.name}/{name} is missing")
    if not (directory / "rng.safetensors").is_file():
        raise ValueError(f"checkpoint {directory} is incomplete: rng.safetensors is missing")
    return {
        "model": load_file(str(mine / "model.safetensors")),
        "ema": load_file(str(mine / "ema.safetensors")),
        "optimizer": load_state_tree(mine / "optimizer.safetensors", json.loads((mine / "optimizer.json").read_text())),
        "rng": load_file(str(directory / "rng.safetensors")),
        "meta": meta,
    }


def find_checkpoint(run_dir: Path) -> Path | None:
    """The last complete checkpoint of a run (`checkpoint-last`, or `.old` if a kill hit the swap)."""
    for name in ("checkpoint-last", "checkpoint-last.old"):
        cand = Path(run_dir) / name
        if (cand / "state.json").is_file():
            return cand
    return None


def load_checkpoint(directory: Path) -> dict:
    directory = Path(directory)
    if (directory / "state.json").is_file() and "sharded_world_size" in read_checkpoint_meta(directory):
        raise ValueError(f"checkpoint {directory} is sharded (FSDP): load it with load_sharded_checkpoint")
    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"):
        if not (directory / name).is_file():
            raise ValueError(f"checkpoint {directory} is incomplete: {name} is missing")
    try:
        meta = json.loads((directory / "state.json").read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"checkpoint {directory}/state.json is corrupt: {err}") from err
    return {
        "model": load_file(str(directory / "model.safetensors")),
        "ema": load_file(str(directory / "ema.safetensors")),
        "optimizer": load_state_tree(directory / "optimizer.safetensors", meta.pop("optimizer")),
        "rng": load_file(str(directory / "rng.safetensors")),
        "meta": meta,
    }
