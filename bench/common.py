"""What the benchmarks share: thread setup, clocks, medians, a named stopwatch, the machine's
measured matmul peak, FLOP counting, the random MAR-size model and markdown tables.

Timing rules kept by every benchmark here: one warm-up run, then the median of several runs; on a
GPU every timed region ends with a synchronisation. `--clock process` (CPU time of this process)
is for a shared machine where other jobs steal the cores: with one thread it approximates the
wall time the same code would take on an idle machine; it is never what a table should report.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from dream_core.config import DreamConfig
from dream_core.model import DreamModel

ROOT = Path(__file__).resolve().parents[1]

CLOCKS = ("wall", "process")
RESULTS = ROOT / "bench" / "results"  # where the paper tables write by default (--out)


def command_line(script: str, argv: Sequence[str] | None = None) -> str:
    """The exact command that produced a result (stored in its JSON so it can be rerun)."""
    import shlex

    return shlex.join(["python", "-m", f"bench.{Path(script).stem}", *(sys.argv[1:] if argv is None else argv)])


# --------------------------------------------------------------------------- setup


def setup_threads(threads: int) -> int:
    """Use `threads` intra-op threads (0 = leave torch's default); returns the count in use."""
    if threads < 0:
        raise ValueError(f"--threads must be >= 0, got {threads}")
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but CUDA is not available")
    return device


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def machine_info(device: torch.device | str = "cpu") -> str:
    device = torch.device(device)
    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        what = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    what = f"{line.split(':', 1)[1].strip()}, {torch.get_num_threads()} threads"
                    break
        except OSError:
            pass
    load = ""
    if hasattr(os, "getloadavg"):
        load = ", load average %.2f / %.2f / %.2f (1 / 5 / 15 min)" % os.getloadavg()
    return f"torch {torch.__version__}, {device.type}: {what}{load}"


def weights_line(path: str | Path) -> str:
    """The markdown header line naming the weights a benchmark measured, `- weights: FINGERPRINT
    (PATH)` (`training.evaluate.cli.model_record`): how tests/test_results_fresh.py tells a table
    measured on older weights from the bundled model."""
    from training.evaluate.cli import model_record

    record = model_record(path)
    return f"- weights: {record['fingerprint']} ({record['path']})"


# --------------------------------------------------------------------------- clocks and timing


def clock_fn(clock: str) -> Callable[[], float]:
    if clock == "wall":
        return time.perf_counter
    if clock == "process":
        return time.process_time
    raise ValueError(f"--clock must be one of {CLOCKS}, got {clock!r}")


def time_runs(fn: Callable[[], object], repeats: int, warmup: int = 1, clock: str = "wall",
              device: torch.device | str = "cpu") -> list[float]:
    """Seconds of each of `repeats` calls of fn, after `warmup` untimed calls."""
    return time_interleaved([fn], repeats, warmup, clock, device)[0]


def time_interleaved(fns: Sequence[Callable[[], object]], repeats: int, warmup: int = 1, clock: str = "wall",
                     device: torch.device | str = "cpu") -> list[list[float]]:
    """Seconds of `repeats` calls of every fn, one call of each per round (after `warmup` untimed
    rounds). A shared machine's speed drifts within minutes (the measured matmul peak here moves
    by a third); timed round by round, the drift falls on every fn alike, so their ratios hold."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    now = clock_fn(clock)
    for _ in range(warmup):
        for fn in fns:
            fn()
    synchronize(device)
    out: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, times in zip(fns, out):
            t0 = now()
            fn()
            synchronize(device)
            times.append(now() - t0)
    return out


def paired_ratio(runs: Sequence[float], base: Sequence[float]) -> float:
    """Median over rounds of runs[r] / base[r]: the ratio of two interleaved timings, each round's
    drift cancelled in its own quotient."""
    if len(runs) != len(base) or not runs:
        raise ValueError(f"paired_ratio needs two equally long, non-empty timings, got {len(runs)} and {len(base)}")
    return median([r / b for r, b in zip(runs, base)])


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


class Stopwatch:
    """Accumulates time per label: `with sw("head"): ...`. Synchronises the GPU at both ends of
    every region when `device` is CUDA (so only use it for breakdown runs, not headline timings)."""

    def __init__(self, clock: str = "wall", device: torch.device | str = "cpu") -> None:
        self.now = clock_fn(clock)
        self.device = torch.device(device)
        self.totals: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self._depth = 0

    @contextmanager
    def __call__(self, label: str) -> Iterator[None]:
        # Nested regions count only in the outermost one (e.g. the encoder inside SAD scoring).
        if self._depth:
            yield
            return
        synchronize(self.device)
        self._depth += 1
        t0 = self.now()
        try:
            yield
        finally:
            synchronize(self.device)
            self.totals[label] += self.now() - t0
            self.counts[label] += 1
            self._depth -= 1

    def wrap(self, fn: Callable, label: str) -> Callable:
        def timed(*args, **kwargs):
            with self(label):
                return fn(*args, **kwargs)
        timed.__wrapped__ = fn
        return timed

    def reset(self) -> None:
        self.totals.clear()
        self.counts.clear()


@contextmanager
def patched(obj: object, name: str, value: object) -> Iterator[None]:
    """Temporarily set an instance attribute (e.g. wrap `model.head.sample` with a timer)."""
    had = name in vars(obj)
    old = vars(obj).get(name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if had:
            setattr(obj, name, old)
        else:
            delattr(obj, name)


# --------------------------------------------------------------------------- FLOPs and peak


def matmul_peak(device: torch.device | str = "cpu", size: int = 2048, repeats: int = 5,
                dtype: torch.dtype = torch.float32) -> float:
    """The machine's practical ceiling: best FLOP/s of a large square matmul (2 n^3 FLOPs)."""
    device = torch.device(device)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = min(time_runs(lambda: torch.mm(a, b), repeats, warmup=1, device=device))
    return 2.0 * size**3 / best


def count_flops(fn: Callable[[], object]) -> float:
    """FLOPs of one call of fn as counted by torch's FlopCounterMode (matmuls, convolutions and
    attention; elementwise work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


# --------------------------------------------------------------------------- models


def mar_size_config() -> DreamConfig:
    """The MAR-size benchmark geometry: 64 tokens of 16 channels (8 x 8 latent, patch 1), encoder and
    decoder of 4 blocks of width 256 (4 heads, MLP 1024), 16 buffer tokens, head 3 x 256 — MAR's
    timed configuration (mar-spec section 3). The text side is tiny (it runs once per prompt)."""
    return DreamConfig.preset("tiny").replace(
        name="mar-bench", image_size=64, vae_channels=16, vae_stride=8, patch_size=1,
        width=256, encoder_depth=4, decoder_depth=4, num_heads=4, mlp_dim=1024, buffer_size=16,
        head_depth=3, head_width=256, diffusion_batch_mul=4,
        clip_context_length=16, clip_width=32, clip_layers=1, clip_heads=2,
        projector_hidden=64, embed_dim=32, t5_dim=32, t5_max_length=16, aligner_depth=1,
    )


def random_model(config: DreamConfig, seed: int = 0, std: float = 0.02) -> DreamModel:
    """A random-weight model in eval mode whose zero-initialised layers (adaLN outputs, the head's
    last layer, positions) are perturbed, so every path computes something non-trivial."""
    torch.manual_seed(seed)
    model = DreamModel(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dtype.is_floating_point:
                p.add_(torch.randn_like(p) * std)
    return model.eval()


def random_text(config: DreamConfig, length: int = 8, seed: int = 0, cfg: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stand-in T5 states [1 or 2, T, t5_dim] and mask for [prompt; empty prompt]."""
    g = torch.Generator().manual_seed(seed)
    t = min(length, config.t5_max_length)
    hidden = torch.randn(2 if cfg else 1, t, config.t5_dim, generator=g)
    mask = torch.ones(2 if cfg else 1, t, dtype=torch.bool)
    if cfg:
        mask[1, 2:] = False  # the empty prompt is short (EOS only) and padded
    return hidden, mask


# --------------------------------------------------------------------------- output


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_s(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1.0:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def fmt_flops(flops: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if flops >= scale:
            return f"{flops / scale:.2f} {unit}"
    return f"{flops:.0f} "
