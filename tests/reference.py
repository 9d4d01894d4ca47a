"""Straightforward reference loops that the optimised code is tested against (shared by
test_diffusion.py and test_decode_equivalence.py)."""

from __future__ import annotations

import math

import torch

from dream_core.noise_schedule import GaussianDiffusion


def plain_head_sample(net, diff: GaussianDiffusion, z: torch.Tensor, noise: torch.Tensor, scale: float,
                      temperature: float, clip: float | None) -> torch.Tensor:
    """IDDPM's p_sample_loop with learned-range variance and CFG on eps, one net(x, t, z) per step."""
    steps = noise.shape[0] - 1
    n, c = noise.shape[1:]
    cfg = z.shape[0] == 2 * n
    x = noise[0].clone()
    for k, i in enumerate(range(steps - 1, -1, -1)):
        def g(table: torch.Tensor) -> float:
            return float(table[i])

        t = torch.full((z.shape[0],), int(diff.timestep_map[i]))
        out = net(torch.cat([x, x]) if cfg else x, t, z)
        eps, v = out[:, :c], out[:, c:]
        if cfg:
            eps, v = eps[n:] + scale * (eps[:n] - eps[n:]), v[:n]
        x0 = g(diff.sqrt_recip_alphas_cumprod) * x - g(diff.sqrt_recipm1_alphas_cumprod) * eps
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
        mean = g(diff.posterior_mean_coef1) * x0 + g(diff.posterior_mean_coef2) * x
        frac = (v + 1) / 2
        log_var = frac * g(diff.log_betas) + (1 - frac) * g(diff.posterior_log_variance_clipped)
        x = mean + (i > 0) * torch.exp(0.5 * log_var) * noise[k + 1] * temperature
    return x


def plain_ode_head_sample(net, diff: GaussianDiffusion, z: torch.Tensor, noise: torch.Tensor, scale: float,
                          temperature: float, clip: float | None, order: int) -> torch.Tensor:
    """Order 1: IDDPM's ddim_sample_loop with eta = 0 (eps recomputed from the clipped x0).
    Order 2: DPM-Solver++(2M) as Lu et al. 2022 write it (Algorithm 2, in lambda = log(alpha /
    sigma), r = h_before / h), first order at the first step and at the last (to alpha = 1).
    CFG on eps, temperature on x_T, one net(x, t, z) per step."""
    steps = noise.shape[0] - 1
    n, c = noise.shape[1:]
    cfg = z.shape[0] == 2 * n
    x = noise[0].clone() * temperature
    x0_before, h_before = None, None
    for k, i in enumerate(range(steps - 1, -1, -1)):
        t = torch.full((z.shape[0],), int(diff.timestep_map[i]))
        out = net(torch.cat([x, x]) if cfg else x, t, z)
        eps = out[:, :c]
        if cfg:
            eps = eps[n:] + scale * (eps[:n] - eps[n:])
        a_t, a_s = float(diff.alphas_cumprod[i]), float(diff.alphas_cumprod_prev[i])
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
        h = 0.5 * math.log(a_s / (1 - a_s)) - 0.5 * math.log(a_t / (1 - a_t)) if i > 0 else None
        if order == 1 or k == 0 or i == 0:
            eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
            x = math.sqrt(a_s) * x0 + math.sqrt(1 - a_s) * eps
        else:
            r = h_before / h
            d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_before
            x = math.sqrt(1 - a_s) / math.sqrt(1 - a_t) * x - math.sqrt(a_s) * (math.exp(-h) - 1) * d
        x0_before, h_before = x0, h
    return x
