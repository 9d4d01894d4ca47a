"""Mask-ratio schedules (Masking Warmup and the paper's FX, UNI, CD; MAR/FLUID's) and ratio -> token mask.

A schedule maps the fractional epoch to a distribution over mask ratios. DREAM draws one ratio per
*sample* by default, so light masking (for the contrastive loss) and heavy masking (for the
diffusion loss) coexist in every batch even on one GPU; `per_sample=False` reproduces the official
one-ratio-per-process behaviour. All draws use an explicit torch.Generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def truncated_normal(mean: float, std: float, low: float, high: float, n: int,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw n samples of N(mean, std^2) truncated to [low, high] by inverse-CDF sampling."""
    if std <= 0:
        return torch.full((n,), min(max(mean, low), high), dtype=torch.float64)
    sqrt2 = math.sqrt(2.0)
    cdf = lambda x: 0.5 * (1.0 + math.erf((x - mean) / (std * sqrt2)))  # noqa: E731
    a, b = cdf(low), cdf(high)
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    p = (a + u * (b - a)).clamp(1e-12, 1 - 1e-12)
    x = mean + std * sqrt2 * torch.erfinv(2 * p - 1)
    return x.clamp(low, high)


@dataclass
class MaskSchedule:
    """Truncated Gaussian over [low, high] whose mean moves linearly from mu_start to mu_end
    between epochs ramp_start and ramp_end (constant outside). Covers Masking Warmup (0 -> 1),
    cooldown (1 -> 0), fixed Gaussians (mu_start == mu_end) and, with `uniform`, UNI."""

    mu_start: float = 0.0
    mu_end: float = 1.0
    ramp_start: float = 0.0
    ramp_end: float = 36.0
    std: float = 0.45
    low: float = 0.0
    high: float = 1.0
    uniform: bool = False
    shape: str = "linear"  # or "cosine"

    def __post_init__(self) -> None:
        if not 0.0 <= self.low <= self.high <= 1.0:
            raise ValueError(f"mask ratio bounds must satisfy 0 <= low <= high <= 1, got [{self.low}, {self.high}]")
        if self.std < 0:
            raise ValueError(f"mask ratio std must be >= 0, got {self.std}")
        if self.ramp_end < self.ramp_start:
            raise ValueError(f"ramp_end ({self.ramp_end}) must be >= ramp_start ({self.ramp_start})")
        if self.shape not in ("linear", "cosine"):
            raise ValueError(f"shape must be 'linear' or 'cosine', got {self.shape!r}")

    def mean(self, epoch: float) -> float:
        """The (pre-truncation) mean mu(epoch)."""
        if epoch <= self.ramp_start or self.ramp_end == self.ramp_start:
            p = 0.0 if epoch <= self.ramp_start and self.ramp_end > self.ramp_start else 1.0
        elif epoch >= self.ramp_end:
            p = 1.0
        else:
            p = (epoch - self.ramp_start) / (self.ramp_end - self.ramp_start)
        if self.shape == "cosine":
            p = 0.5 * (1 - math.cos(math.pi * p))
        mu = self.mu_start + (self.mu_end - self.mu_start) * p
        return min(max(mu, self.low), self.high)

    def sample(self, epoch: float, n: int, generator: torch.Generator | None = None,
               per_sample: bool = True) -> torch.Tensor:
        """Mask ratios for a batch of n samples, float32 [n]."""
        k = n if per_sample else 1
        if self.uniform:
            r = self.low + (self.high - self.low) * torch.rand(k, generator=generator, dtype=torch.float64)
        else:
            r = truncated_normal(self.mean(epoch), self.std, self.low, self.high, k, generator)
        return r.float().expand(n).clone() if not per_sample else r.float()


def masking_warmup(std: float = 0.45, warmup_epochs: float = 36.0) -> MaskSchedule:
    """DREAM's Masking Warmup: mean 0 -> 1 over the warm-up, truncated to [0, 1]."""
    return MaskSchedule(mu_start=0.0, mu_end=1.0, ramp_end=warmup_epochs, std=std)


def mar_masking() -> MaskSchedule:
    """MAR / FLUID: N(1, 0.25^2) truncated to [0.7, 1]."""
    return MaskSchedule(mu_start=1.0, mu_end=1.0, std=0.25, low=0.7, high=1.0)


def fixed_masking(std: float = 0.45) -> MaskSchedule:
    """The paper's FX: a fixed truncated Gaussian centred at 1.0 on [0, 1]."""
    return MaskSchedule(mu_start=1.0, mu_end=1.0, std=std)


def uniform_masking() -> MaskSchedule:
    """The paper's UNI: U[0, 1]."""
    return MaskSchedule(uniform=True)


def cooldown_masking(std: float = 0.45, epochs: float = 36.0) -> MaskSchedule:
    """The paper's CD: mean 1 -> 0 over the first `epochs`, then fixed at 0."""
    return MaskSchedule(mu_start=1.0, mu_end=0.0, ramp_end=epochs, std=std)


def no_masking() -> MaskSchedule:
    """CLIP baseline: every token visible."""
    return MaskSchedule(mu_start=0.0, mu_end=0.0, std=0.0, low=0.0, high=0.0)


SCHEDULES = {
    "warmup": masking_warmup,
    "mar": mar_masking,
    "fx": fixed_masking,
    "uni": uniform_masking,
    "cd": cooldown_masking,
    "none": no_masking,
}


def build_schedule(name: str, **kwargs) -> MaskSchedule:
    if name not in SCHEDULES:
        raise ValueError(f"unknown masking schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    return SCHEDULES[name](**kwargs)


def num_masked(ratios: torch.Tensor, seq_len: int) -> torch.Tensor:
    """ceil(seq_len * r) tokens masked per sample (as the official code), as long [B]."""
    return torch.ceil(ratios.double() * seq_len - 1e-9).long().clamp(0, seq_len)


def random_token_mask(ratios: torch.Tensor, seq_len: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Bool mask [B, L], True = masked; each sample masks its own random ceil(L*r) positions."""
    b = ratios.shape[0]
    counts = num_masked(ratios, seq_len)
    noise = torch.rand(b, seq_len, generator=generator)
    ranks = noise.argsort(dim=1).argsort(dim=1)  # a uniform random rank per position
    return ranks < counts[:, None]


def cosine_masked_count(step: int, num_steps: int, seq_len: int) -> int:
    """Tokens still masked after decoding step `step` (0-based) of `num_steps` (MAR's cosine schedule)."""
    return int(math.floor(seq_len * math.cos(math.pi / 2 * (step + 1) / num_steps)))


def decoding_schedule(num_steps: int, seq_len: int) -> list[int]:
    """Number of tokens still masked after each step: strictly decreasing, ending at 0, so at least
    one token is decoded per step. Requires num_steps <= seq_len."""
    if not 1 <= num_steps <= seq_len:
        raise ValueError(f"num_inference_steps must be in [1, {seq_len}] for {seq_len} tokens, got {num_steps}")
    remaining, out = seq_len, []
    for k in range(num_steps):
        if k == num_steps - 1:
            nxt = 0
        else:
            nxt = max(1, min(remaining - 1, cosine_masked_count(k, num_steps, seq_len)))
            nxt = max(nxt, num_steps - k - 1)  # keep at least one token for each step still to come
        out.append(nxt)
        remaining = nxt
    return out


def fraction_decided(step: int, num_steps: int, seq_len: int) -> float:
    """Share of tokens decided *before* decoding step `step` (what the encoder sees at that step)."""
    if step <= 0:
        return 0.0
    return 1.0 - decoding_schedule(num_steps, seq_len)[step - 1] / seq_len
