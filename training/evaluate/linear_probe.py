"""Linear probe on frozen DREAM encoder features (the paper's Tables 2 and 4).

Features: image -> VAE posterior MEAN -> tokens -> the encoder with no mask, its own learned
buffer embedding in the buffer slots -> final LayerNorm -> mean over buffer + image tokens. This
fixes the official probe's weak spots (spec 6.1-6.3): it filled the buffer with a decayed
`fake_latent`, skipped the encoder norm, sampled the VAE at evaluation, and trained the head with
LARS at blr 1e-4, which barely moves it. Here features are extracted once and cached, and the
head (BatchNorm1d without affine + Linear, as MoCo v3 / MAE) is trained with AdamW (lr 1e-3,
cosine) for many epochs on the cached features, which takes seconds.

    python -m training.evaluate.linear_probe --model DIR --data ROOT --out OUT      # ROOT/{train,val}/<class>/*
    python -m training.evaluate.linear_probe --model DIR --shapes --out OUT         # shape and colour probes
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from dream_core.pipeline import DreamPipeline

from .common import (EVAL_SEED, STREAM_PROBE_TRAIN, STREAM_PROBE_VAL, add_model_args, image_folder, image_tokens,
                     load_images, load_pipeline, plot_lines, rendered_scenes, run_cli, run_metadata, write_json)

SHAPES_ATTRIBUTES = ("shape", "color", "size", "position", "background")


POOLING = ("all", "buffer", "image", "concat")


@torch.inference_mode()
def encoder_features(pipe: DreamPipeline, images: Sequence, batch_size: int = 256, pool: str = "all") -> torch.Tensor:
    """Frozen features from the normed encoder output: `all` (default) the mean over buffer + image
    tokens, the feature the contrastive loss and SAD use; `buffer` / `image` the mean over those
    tokens only (the official probe's options); `concat` every image token side by side
    [N, L * width], a diagnostic that keeps where things are."""
    if pool not in POOLING:
        raise ValueError(f"pool must be one of {POOLING}, got {pool!r}")
    feats = []
    nb = pipe.config.buffer_size
    for i in range(0, len(images), batch_size):
        tokens = image_tokens(pipe, images[i:i + batch_size], batch_size)
        mask = torch.zeros(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        with pipe.autocast():
            enc = pipe.model.encoder(tokens, mask)
        hidden = enc.hidden.float()  # [B, buffer + L, width], no padding (nothing is masked)
        if pool == "all":
            f = enc.pooled().float()
        elif pool == "buffer":
            f = hidden[:, :nb].mean(1)
        elif pool == "image":
            f = hidden[:, nb:].mean(1)
        else:
            f = hidden[:, nb:].flatten(1)
        feats.append(f.cpu())
    return torch.cat(feats)


@dataclass
class ProbeResult:
    train_acc: float
    val_acc: float  # after the last epoch: the number to report (no selection on val)
    best_val_acc: float  # best over epochs (what the official probe logs), for reference only
    val_top5: float
    history: list[float] = field(default_factory=list)  # val accuracy at history_epochs
    history_epochs: list[int] = field(default_factory=list)
    epochs: int = 0
    lr: float = 0.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class ProbeHead(nn.Sequential):
    """BatchNorm1d (no affine) + Linear: a linear classifier on standardised features."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
        nn.init.trunc_normal_(self[1].weight, std=0.01)
        nn.init.zeros_(self[1].bias)


def _accuracy(logits: torch.Tensor, y: torch.Tensor, k: int = 1) -> float:
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return float((top == y[:, None]).any(dim=1).float().mean())


def train_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                num_classes: int | None = None, epochs: int = 100, lr: float = 1e-3, weight_decay: float = 1e-4,
                batch_size: int = 128, seed: int = 0, min_steps: int = 1000) -> ProbeResult:
    """Train the probe head on cached features (AdamW, 5 % warm-up then cosine) and evaluate it.

    At least `min_steps` optimiser steps are taken (more epochs on small sets), so the head
    converges whatever the data size: steps on cached features cost microseconds."""
    if train_x.ndim != 2 or val_x.ndim != 2 or train_x.shape[1] != val_x.shape[1]:
        raise ValueError(f"features must be [N, D] with the same D, got {tuple(train_x.shape)} and {tuple(val_x.shape)}")
    if len(train_x) != len(train_y) or len(val_x) != len(val_y):
        raise ValueError("features and labels differ in length")
    if len(train_x) < 2 or len(val_x) < 1:
        raise ValueError("the probe needs at least 2 training and 1 validation samples")
    if epochs < 1 or lr <= 0 or batch_size < 1:
        raise ValueError(f"epochs, lr and batch_size must be positive, got {epochs}, {lr}, {batch_size}")
    train_y, val_y = train_y.long(), val_y.long()
    num_classes = num_classes or int(max(train_y.max(), val_y.max())) + 1
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = ProbeHead(train_x.shape[1], num_classes)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    n = len(train_x)
    batch_size = min(batch_size, n)
    steps_per_epoch = max(1, n // batch_size)  # drop the last partial batch: BatchNorm needs >= 2 rows
    epochs = max(epochs, math.ceil(min_steps / steps_per_epoch))
    eval_every = max(1, epochs // 20)
    total, warm = epochs * steps_per_epoch, max(1, int(0.05 * epochs * steps_per_epoch))
    step, history, history_epochs = 0, [], []
    x_tr, x_va = train_x.float(), val_x.float()
    for epoch in range(epochs):
        head.train()
        order = torch.randperm(n, generator=gen)
        for b in range(steps_per_epoch):
            idx = order[b * batch_size:(b + 1) * batch_size]
            if step < warm:
                scale = (step + 1) / warm
            else:
                scale = 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
            for g in opt.param_groups:
                g["lr"] = lr * scale
            loss = nn.functional.cross_entropy(head(x_tr[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        if (epoch + 1) % eval_every == 0 or epoch == epochs - 1:
            head.eval()
            with torch.no_grad():
                history.append(_accuracy(head(x_va), val_y))
                history_epochs.append(epoch + 1)
    head.eval()
    with torch.no_grad():
        val_logits = head(x_va)
        train_acc = _accuracy(head(x_tr), train_y)
    return ProbeResult(train_acc, _accuracy(val_logits, val_y), max(history), _accuracy(val_logits, val_y, 5),
                       history, history_epochs, epochs, lr)


def fit_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
              num_classes: int | None = None, l2: float = 1e-4, max_iter: int = 1000) -> ProbeResult:
    """Multinomial logistic regression on standardised features, solved to convergence with
    L-BFGS (full batch, deterministic). A probe that converges measures the features, not its own
    optimiser: the SGD probe above stops far from its optimum on small sets (issue 9)."""
    if train_x.ndim != 2 or val_x.ndim != 2 or train_x.shape[1] != val_x.shape[1]:
        raise ValueError(f"features must be [N, D] with the same D, got {tuple(train_x.shape)} and {tuple(val_x.shape)}")
    if len(train_x) != len(train_y) or len(val_x) != len(val_y):
        raise ValueError("features and labels differ in length")
    train_y, val_y = train_y.long(), val_y.long()
    num_classes = num_classes or int(max(train_y.max(), val_y.max())) + 1
    mean, std = train_x.double().mean(0), train_x.double().std(0).clamp(min=1e-6)
    x_tr, x_va = (train_x.double() - mean) / std, (val_x.double() - mean) / std
    linear = nn.Linear(x_tr.shape[1], num_classes).double()
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    opt = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=max_iter, tolerance_grad=1e-9,
                            tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(linear(x_tr), train_y) + l2 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        val_logits, train_acc = linear(x_va), _accuracy(linear(x_tr), train_y)
    val_acc = _accuracy(val_logits, val_y)
    return ProbeResult(train_acc, val_acc, val_acc, _accuracy(val_logits, val_y, 5), [val_acc], [1], 1, 0.0)


# --------------------------------------------------------------------------- data


def shapes_probe_data(n_train: int, n_val: int, seed: int = EVAL_SEED):
    """Labelled single-object Shapes World renders (jittered), from two disjoint seeded streams."""
    train = rendered_scenes(n_train, seed, STREAM_PROBE_TRAIN, num_objects=1)
    val = rendered_scenes(n_val, seed, STREAM_PROBE_VAL, num_objects=1)
    return train, val


def shapes_labels(scenes: Sequence, attribute: str) -> tuple[torch.Tensor, list[str]]:
    from training.data import shapes_world as sw

    names = {"shape": list(sw.SHAPES), "color": list(sw.COLORS), "size": list(sw.SIZES),
             "position": list(sw.POSITIONS), "background": list(sw.BACKGROUNDS)}
    if attribute not in names:
        raise ValueError(f"unknown Shapes World attribute {attribute!r}; choose from {SHAPES_ATTRIBUTES}")
    classes = names[attribute]
    values = [s.background if attribute == "background" else getattr(s.objects[0], attribute) for s in scenes]
    return torch.tensor([classes.index(v) for v in values]), classes


def probe_shapes(pipe: DreamPipeline, attributes: Sequence[str] = ("shape", "color"), n_train: int = 2000,
                 n_val: int = 1000, seed: int = EVAL_SEED, epochs: int = 100, lr: float = 1e-3,
                 pool: str = "all", solver: str = "lbfgs") -> dict[str, ProbeResult]:
    """One probe per attribute on the same cached features (issue 4, metric 4). `solver`:
    "lbfgs" (default: logistic regression solved to convergence) or "sgd" (the BN + linear head
    trained with AdamW, as the ImageNet protocol)."""
    if solver not in ("lbfgs", "sgd"):
        raise ValueError(f"solver must be lbfgs or sgd, got {solver!r}")
    (tr_images, tr_scenes), (va_images, va_scenes) = shapes_probe_data(n_train, n_val, seed)
    tr_x, va_x = encoder_features(pipe, tr_images, pool=pool), encoder_features(pipe, va_images, pool=pool)
    out = {}
    for attr in attributes:
        tr_y, classes = shapes_labels(tr_scenes, attr)
        va_y, _ = shapes_labels(va_scenes, attr)
        out[attr] = (fit_probe(tr_x, tr_y, va_x, va_y, len(classes)) if solver == "lbfgs"
                     else train_probe(tr_x, tr_y, va_x, va_y, len(classes), epochs=epochs, lr=lr))
    return out


def probe_folder(pipe: DreamPipeline, root: Path, epochs: int = 100, lr: float = 1e-3,
                 pool: str = "all") -> tuple[ProbeResult, dict]:
    root = Path(root)
    tr_paths, tr_labels, classes = image_folder(root / "train")
    va_paths, va_labels, _ = image_folder(root / "val", classes)
    tr_images, tr_bad = load_images(tr_paths)
    va_images, va_bad = load_images(va_paths)
    tr_keep = [i for i in range(len(tr_images)) if tr_images[i] is not None]
    va_keep = [i for i in range(len(va_images)) if va_images[i] is not None]
    if len(tr_keep) < 2 or not va_keep:
        raise ValueError(f"{root} has too few readable images (train {len(tr_keep)}, val {len(va_keep)})")
    tr_x = encoder_features(pipe, [tr_images[i] for i in tr_keep], pool=pool)
    va_x = encoder_features(pipe, [va_images[i] for i in va_keep], pool=pool)
    result = train_probe(tr_x, torch.tensor([tr_labels[i] for i in tr_keep]), va_x,
                         torch.tensor([va_labels[i] for i in va_keep]), len(classes), epochs=epochs, lr=lr)
    info = {"classes": classes, "train_images": len(tr_keep), "val_images": len(va_keep),
            "unreadable": len(tr_bad) + len(va_bad)}
    return result, info


# --------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, help="ImageFolder root with train/<class>/* and val/<class>/*")
    src.add_argument("--shapes", action="store_true", help="rendered Shapes World objects, one probe per attribute")
    ap.add_argument("--attributes", default="shape,color", help=f"Shapes World attributes, from {SHAPES_ATTRIBUTES}")
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-val", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=EVAL_SEED, help="seed of the rendered probe sets")
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--pool", default="all", choices=POOLING,
                    help="token pooling: all (buffer + image, default), buffer, image, concat (diagnostic)")
    ap.add_argument("--quick", action="store_true", help="200 / 100 images, 20 epochs (smoke runs)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.quick:
        args.n_train, args.n_val, args.epochs = min(args.n_train, 200), min(args.n_val, 100), min(args.epochs, 20)
    pipe = load_pipeline(args.model, args.device, args.threads)
    results: dict = {"meta": run_metadata(pipe, args), "pool": args.pool}
    if args.shapes:
        attributes = [a.strip() for a in args.attributes.split(",") if a.strip()]
        for a in attributes:
            if a not in SHAPES_ATTRIBUTES:
                raise ValueError(f"--attributes: unknown attribute {a!r}; choose from {SHAPES_ATTRIBUTES}")
        if args.n_train < 2 or args.n_val < 1:
            raise ValueError("--n-train must be >= 2 and --n-val >= 1")
        probes = probe_shapes(pipe, attributes, args.n_train, args.n_val, args.seed, args.epochs, args.lr, args.pool)
        results["probes"] = {a: r.to_dict() for a, r in probes.items()}
        results["data"] = {"source": "shapes", "n_train": args.n_train, "n_val": args.n_val, "seed": args.seed}
    else:
        result, info = probe_folder(pipe, args.data, args.epochs, args.lr, args.pool)
        probes = {"label": result}
        results["probes"] = {"label": result.to_dict()}
        results["data"] = {"source": str(args.data), **info}
    for name, r in probes.items():
        print(f"linear probe {name}: val top-1 {r.val_acc:.1%} (train {r.train_acc:.1%}, best {r.best_val_acc:.1%})")
    args.out.mkdir(parents=True, exist_ok=True)
    plot_lines(args.out / "plot.png", next(iter(probes.values())).history_epochs,
               {n: r.history for n, r in probes.items()}, "epoch", "validation top-1",
               "Linear probe on frozen DREAM encoder features")
    write_json(args.out / "results.json", results)
    return results


if __name__ == "__main__":
    run_cli(main)
