"""Linear probe on frozen DREAM encoder features (the paper's Tables 2 and 4).

Features: image -> VAE posterior MEAN -> tokens -> the encoder with no mask, its own learned
buffer embedding in the buffer slots -> final LayerNorm -> mean over buffer + image tokens. This
fixes the official probe's weak spots (spec 6.1-6.3): it filled the buffer with a decayed
`fake_latent`, skipped the encoder norm, sampled the VAE at evaluation, and trained the head with
LARS at blr 1e-4, which barely moves it. Here features are extracted once, written to disk in
chunks of `--chunk-size` rows (safetensors) and streamed back one chunk at a time, so memory is
constant in the number of images (ImageNet's 1.28 M x 1024-d fp32 features are 5 GiB on disk, a
few MB in RAM at the default chunk). The head (BatchNorm1d without affine + Linear, as MoCo v3 /
MAE and the official probe) is trained with one of two protocols:

* `fast` (default): AdamW lr 1e-3, 5 % warm-up then cosine, >= 1000 steps: seconds on cached features;
* `paper`: the official main_linprobe optimiser: LARS (momentum 0.9, trust coefficient 0.001, no
  decay or trust scaling on <= 1-D parameters), weight decay 0.02, lr = blr x batch / 256, 10
  warm-up epochs of 90, cosine to 0, batch 512 (128 x 4 GPUs). Its blr default is 0.1 (MAE's probe),
  not the official 1e-4 (spec 6.4: 1e-4 barely moves the head); pass --blr to change it.

    python -m training.evaluate.linear_probe --model DIR --data ROOT --out OUT      # ROOT/{train,val}/<class>/*
    python -m training.evaluate.linear_probe --model DIR --data ROOT --out OUT --protocol paper
    python -m training.evaluate.linear_probe --model DIR --shapes --out OUT         # shape and colour probes
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from dream_core.pipeline import DreamPipeline

from .cli import add_model_args, load_pipeline, run_cli, run_metadata, write_json
from .plotting import plot_lines
from .scoring import image_tokens
from .sets import EVAL_SEED, STREAM_PROBE_TRAIN, STREAM_PROBE_VAL, image_folder, load_images, rendered_scenes

SHAPES_ATTRIBUTES = ("shape", "color", "size", "position", "background")
PROTOCOLS = {
    # name: optimiser, lr (fast) or blr (paper), epochs, warm-up epochs (None = 5 % of the steps), batch, decay
    "fast": {"optimizer": "adamw", "lr": 1e-3, "epochs": 100, "warmup_epochs": None, "batch_size": 128,
             "weight_decay": 1e-4},
    "paper": {"optimizer": "lars", "blr": 0.1, "epochs": 90, "warmup_epochs": 10, "batch_size": 512,
              "weight_decay": 0.02},
}


POOLING = ("all", "buffer", "image", "concat", "model")


@torch.inference_mode()
def encoder_features(pipe: DreamPipeline, images: Sequence, batch_size: int = 256, pool: str = "all") -> torch.Tensor:
    """Frozen features from the normed encoder output: `all` (default) the mean over buffer + image
    tokens, the feature the contrastive loss and SAD use; `buffer` / `image` the mean over those
    tokens only (the official probe's options); `concat` every image token side by side
    [N, L * width], a diagnostic that keeps where things are; `model` the pooling the model's joint
    space uses (its `clip_pooling`: the attention pooler's output, or the mean), before the projector."""
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
        elif pool == "model":
            with pipe.autocast():
                f = pipe.model.pool_tokens(enc).float()
        else:
            f = hidden[:, nb:].flatten(1)
        feats.append(f.cpu())
    return torch.cat(feats)


class FeatureChunks:
    """Features [N, D] and labels [N] as a list of chunks: safetensors files on disk (read one at a
    time) or, for small sets, tensors in memory. Iterating yields (x float32, y long) per chunk."""

    def __init__(self, chunks: list) -> None:
        self.chunks = chunks
        self.sizes, self.dim = [], None
        for c in chunks:
            x_shape = _chunk_shape(c)
            self.sizes.append(x_shape[0])
            if self.dim is not None and x_shape[1] != self.dim:
                raise ValueError(f"feature chunks differ in width: {self.dim} and {x_shape[1]}")
            self.dim = x_shape[1]

    @classmethod
    def from_tensors(cls, x: torch.Tensor, y: torch.Tensor) -> "FeatureChunks":
        if x.ndim != 2:
            raise ValueError(f"features must be [N, D], got {tuple(x.shape)}")
        if len(x) != len(y):
            raise ValueError("features and labels differ in length")
        return cls([(x.float(), y.long())])

    def __len__(self) -> int:
        return sum(self.sizes)

    def load(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.chunks[i]
        if isinstance(c, tuple):
            return c
        from safetensors.torch import load_file

        t = load_file(str(c))
        return t["x"].float(), t["y"].long()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(len(self.chunks)):
            yield self.load(i)


def _chunk_shape(c) -> tuple[int, int]:
    if isinstance(c, tuple):
        return tuple(c[0].shape)
    from safetensors import safe_open

    with safe_open(str(c), "pt") as f:
        return tuple(f.get_slice("x").get_shape())


def write_feature_chunks(pipe: DreamPipeline, paths: Sequence[Path], labels: Sequence[int], out: Path,
                         pool: str = "all", chunk_size: int = 16384, batch_size: int = 256) -> tuple[FeatureChunks, int]:
    """Read, encode and write features chunk by chunk (never more than one chunk of images or
    features in memory). Unreadable images are skipped; returns (chunks, number skipped)."""
    from safetensors.torch import save_file


    if chunk_size < 1 or batch_size < 1:
        raise ValueError(f"chunk_size and batch_size must be >= 1, got {chunk_size}, {batch_size}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("chunk-*.safetensors"):
        old.unlink()
    files, xs, ys, bad = [], [], [], 0

    def write(x: torch.Tensor, y: list[int]) -> None:
        path = out / f"chunk-{len(files):05d}.safetensors"
        save_file({"x": x.contiguous(), "y": torch.tensor(y, dtype=torch.long)}, str(path))
        files.append(path)

    for i in range(0, len(paths), batch_size):
        images, unreadable = load_images(paths[i:i + batch_size])
        bad += len(unreadable)
        keep = [k for k, im in enumerate(images) if im is not None]
        if keep:
            xs.append(encoder_features(pipe, [images[k] for k in keep], batch_size, pool))
            ys += [int(labels[i + k]) for k in keep]
        while len(ys) >= chunk_size:  # exactly chunk_size rows a file, the rest carried over
            x = torch.cat(xs)
            write(x[:chunk_size], ys[:chunk_size])
            xs, ys = [x[chunk_size:]], ys[chunk_size:]
    if ys:
        write(torch.cat(xs), ys)
    return FeatureChunks(files), bad


class LARS(torch.optim.Optimizer):
    """LARS as in MAE / MoCo v3 (the official probe's optimiser): SGD with momentum whose update of a
    >= 2-D parameter is scaled by trust * ||w|| / ||g + wd w||; <= 1-D parameters get neither
    weight decay nor the trust ratio."""

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001) -> None:
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim > 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    param_norm, update_norm = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(param_norm > 0.0,
                                    torch.where(update_norm > 0, g["trust_coefficient"] * param_norm / update_norm, one),
                                    one)
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])


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
    protocol: str = "fast"

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


def train_probe(train_x: torch.Tensor | FeatureChunks, train_y: torch.Tensor | None,
                val_x: torch.Tensor | FeatureChunks, val_y: torch.Tensor | None,
                num_classes: int | None = None, epochs: int | None = None, lr: float | None = None,
                weight_decay: float | None = None, batch_size: int | None = None, seed: int = 0,
                min_steps: int | None = None, protocol: str = "fast", blr: float | None = None) -> ProbeResult:
    """Train the probe head on cached features and evaluate it. Features are tensors (with their
    labels) or `FeatureChunks` (labels inside, pass None): chunks are streamed one at a time, in a
    seeded random order, shuffled within. `protocol` sets the defaults (see PROTOCOLS); `fast`
    takes at least `min_steps` (1000) steps so the head converges whatever the data size."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {tuple(PROTOCOLS)}, got {protocol!r}")
    cfg = PROTOCOLS[protocol]
    epochs = cfg["epochs"] if epochs is None else epochs
    weight_decay = cfg["weight_decay"] if weight_decay is None else weight_decay
    batch_size = cfg["batch_size"] if batch_size is None else batch_size
    min_steps = (1000 if protocol == "fast" else 0) if min_steps is None else min_steps
    train = train_x if isinstance(train_x, FeatureChunks) else FeatureChunks.from_tensors(train_x, train_y)
    val = val_x if isinstance(val_x, FeatureChunks) else FeatureChunks.from_tensors(val_x, val_y)
    if train.dim != val.dim:
        raise ValueError(f"features must be [N, D] with the same D, got D={train.dim} and D={val.dim}")
    if len(train) < 2 or len(val) < 1:
        raise ValueError("the probe needs at least 2 training and 1 validation samples")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be positive, got {epochs}, {batch_size}")
    if num_classes is None:
        num_classes = int(max(max(int(y.max()) for _, y in train), max(int(y.max()) for _, y in val))) + 1
    batch_size = min(batch_size, *[n for n in train.sizes if n >= 2] or [len(train)])
    if protocol == "paper":
        lr = (cfg["blr"] if blr is None else blr) * batch_size / 256 if lr is None else lr
    else:
        lr = cfg["lr"] if lr is None else lr
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    gen = torch.Generator().manual_seed(seed)
    order_gen = torch.Generator().manual_seed(seed + 1)  # chunk order (only drawn with several chunks)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = ProbeHead(train.dim, num_classes)
    if cfg["optimizer"] == "lars":
        opt = LARS(head.parameters(), lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = sum(max(1, n // batch_size) if n >= 2 else 0 for n in train.sizes)  # BN needs >= 2 rows
    epochs = max(epochs, math.ceil(min_steps / steps_per_epoch)) if min_steps else epochs
    eval_every = max(1, epochs // 20)
    total = epochs * steps_per_epoch
    warm = (max(1, int(0.05 * total)) if cfg["warmup_epochs"] is None
            else min(total, cfg["warmup_epochs"] * steps_per_epoch))
    step, history, history_epochs = 0, [], []

    def evaluate(chunks: FeatureChunks, k: int = 1) -> float:
        head.eval()
        hits = 0.0
        with torch.no_grad():
            for x, y in chunks:
                hits += _accuracy(head(x), y, k) * len(y)
        return hits / len(chunks)

    for epoch in range(epochs):
        head.train()
        chunk_order = torch.randperm(len(train.chunks), generator=order_gen) if len(train.chunks) > 1 else [0]
        for ci in chunk_order:
            x_tr, y_tr = train.load(int(ci))
            n = len(x_tr)
            if n < 2:
                continue
            order = torch.randperm(n, generator=gen)
            for b in range(max(1, n // batch_size)):
                idx = order[b * batch_size:(b + 1) * batch_size]
                if step < warm:
                    scale = (step + 1) / warm
                else:
                    scale = 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
                for g in opt.param_groups:
                    g["lr"] = lr * scale
                loss = nn.functional.cross_entropy(head(x_tr[idx]), y_tr[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
        if (epoch + 1) % eval_every == 0 or epoch == epochs - 1:
            history.append(evaluate(val))
            history_epochs.append(epoch + 1)
            head.train()
    val_acc = evaluate(val)
    return ProbeResult(evaluate(train), val_acc, max(history), evaluate(val, 5), history, history_epochs, epochs, lr,
                       protocol)


def fit_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
              num_classes: int | None = None, l2: float = 1e-4, max_iter: int = 1000) -> ProbeResult:
    """Multinomial logistic regression on standardised features, solved to convergence with
    L-BFGS (full batch, deterministic). A probe that converges measures the features, not its own
    optimiser: the SGD probe above stops far from its optimum on small sets (shape 66.9 % against
    87.4 % on the same features: docs/experiments/training-length.md)."""
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
                 n_val: int = 1000, seed: int = EVAL_SEED, epochs: int | None = None, lr: float | None = None,
                 pool: str = "all", protocol: str = "converged", blr: float | None = None) -> dict[str, ProbeResult]:
    """One probe per attribute on the same cached features (shape, colour, size, position,
    background of the Shapes World). `protocol`:
    "converged" (default: logistic regression solved to convergence by L-BFGS, so the number
    measures the features and not the probe's optimiser) or one of PROTOCOLS (SGD-trained heads)."""
    (tr_images, tr_scenes), (va_images, va_scenes) = shapes_probe_data(n_train, n_val, seed)
    tr_x, va_x = encoder_features(pipe, tr_images, pool=pool), encoder_features(pipe, va_images, pool=pool)
    out = {}
    for attr in attributes:
        tr_y, classes = shapes_labels(tr_scenes, attr)
        va_y, _ = shapes_labels(va_scenes, attr)
        out[attr] = (fit_probe(tr_x, tr_y, va_x, va_y, len(classes)) if protocol == "converged" else
                     train_probe(tr_x, tr_y, va_x, va_y, len(classes), epochs=epochs, lr=lr, protocol=protocol, blr=blr))
    return out


def probe_folder(pipe: DreamPipeline, root: Path, features: Path, epochs: int | None = None,
                 lr: float | None = None, pool: str = "all", protocol: str = "fast", blr: float | None = None,
                 chunk_size: int = 16384) -> tuple[ProbeResult, dict]:
    """ImageFolder probe: features streamed to `features/{train,val}` in chunks, then the head."""
    root = Path(root)
    tr_paths, tr_labels, classes = image_folder(root / "train")
    va_paths, va_labels, _ = image_folder(root / "val", classes)
    tr, tr_bad = write_feature_chunks(pipe, tr_paths, tr_labels, Path(features) / "train", pool, chunk_size)
    va, va_bad = write_feature_chunks(pipe, va_paths, va_labels, Path(features) / "val", pool, chunk_size)
    if len(tr) < 2 or len(va) < 1:
        raise ValueError(f"{root} has too few readable images (train {len(tr)}, val {len(va)})")
    result = train_probe(tr, None, va, None, len(classes), epochs=epochs, lr=lr, protocol=protocol, blr=blr)
    info = {"classes": classes, "train_images": len(tr), "val_images": len(va), "unreadable": tr_bad + va_bad,
            "feature_chunks": len(tr.chunks) + len(va.chunks)}
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
    ap.add_argument("--protocol", default="fast", choices=tuple(PROTOCOLS),
                    help="fast: AdamW 1e-3, 100 epochs (>= 1000 steps); paper: LARS, blr 0.1, 90 epochs (10 warm-up), batch 512")
    ap.add_argument("--epochs", type=int, default=None, help="default from the protocol")
    ap.add_argument("--lr", type=float, default=None, help="absolute lr (default from the protocol)")
    ap.add_argument("--blr", type=float, default=None, help="paper protocol: lr = blr x batch / 256 (default 0.1)")
    ap.add_argument("--chunk-size", type=int, default=16384, help="feature rows per file on disk (--data)")
    ap.add_argument("--pool", default="all", choices=POOLING,
                    help="token pooling: all (buffer + image, default), buffer, image, concat (diagnostic), "
                         "model (the joint space's own pooling)")
    ap.add_argument("--quick", action="store_true", help="200 / 100 images, 20 epochs (smoke runs)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.quick:
        args.n_train, args.n_val = min(args.n_train, 200), min(args.n_val, 100)
        args.epochs = min(args.epochs or PROTOCOLS[args.protocol]["epochs"], 20)
    pipe = load_pipeline(args.model, args.device, args.threads)
    results: dict = {"meta": run_metadata(pipe, args), "pool": args.pool}
    if args.shapes:
        attributes = [a.strip() for a in args.attributes.split(",") if a.strip()]
        for a in attributes:
            if a not in SHAPES_ATTRIBUTES:
                raise ValueError(f"--attributes: unknown attribute {a!r}; choose from {SHAPES_ATTRIBUTES}")
        if args.n_train < 2 or args.n_val < 1:
            raise ValueError("--n-train must be >= 2 and --n-val >= 1")
        probes = probe_shapes(pipe, attributes, args.n_train, args.n_val, args.seed, args.epochs, args.lr, args.pool,
                              args.protocol, args.blr)
        results["probes"] = {a: r.to_dict() for a, r in probes.items()}
        results["data"] = {"source": "shapes", "n_train": args.n_train, "n_val": args.n_val, "seed": args.seed}
    else:
        result, info = probe_folder(pipe, args.data, args.out / "features", args.epochs, args.lr, args.pool,
                                    args.protocol, args.blr, args.chunk_size)
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
