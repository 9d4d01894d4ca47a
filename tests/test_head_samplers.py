"""The diffusion head's fewer-step samplers (DDIM with eta = 0, DPM-Solver++(2M)) beside the
ancestral one: exact on data whose ideal eps is known in closed form, converging to the
probability-flow map of Gaussian data, equal to textbook loops on a real head, CFG, temperature,
shapes and the CUDA-graph path."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dream_core import diffusion_sampler
from dream_core.diffusion import DiffusionHead
from dream_core.noise_schedule import GaussianDiffusion, ReverseSchedule
from dream_core.request import HEAD_SAMPLERS
from reference import plain_ode_head_sample  # tests/reference.py
from test_diffusion import C, D, _perturbed_head, stand_in_cuda_graphs

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for this module

ODE_SAMPLERS = ("ddim", "dpm-solver++")
# silu(OFFSET + u) == OFFSET + u in float64 for |u| << OFFSET (e^-47 is far below its precision):
# what lets the stand-in network below read the timestep and its condition back from SiLU(y).
OFFSET = 50.0


class IdealGaussianNet(nn.Module):
    """A stand-in for `DiffusionMLP` (the `PremodulatedNet` protocol, float64) whose eps is the
    ideal one for data x0 ~ N(mu, std^2) per channel, mu = its condition z:
    eps*(x_t, t) = sqrt(1 - ab) (x_t - sqrt(ab) mu) / (ab std^2 + 1 - ab). With std = 0 the data
    is the single point mu and eps* = (x_t - sqrt(ab) mu) / sqrt(1 - ab). The timestep and mu
    reach the trunk through the sampler's own path: y = SiLU(embed_cond(z) + embed_time(t))."""

    def __init__(self, token_dim: int, std: float = 0.0, num_train_steps: int = 1000):
        super().__init__()
        self.token_dim, self.width, self.depth, self.std = token_dim, token_dim + 1, 0, std
        self.input_proj = nn.Linear(token_dim, token_dim + 1, dtype=torch.float64)  # h = [0, x]
        with torch.no_grad():
            self.input_proj.weight.zero_()
            self.input_proj.weight[1:] = torch.eye(token_dim, dtype=torch.float64)
            self.input_proj.bias.zero_()
        self.alphas_cumprod = GaussianDiffusion(num_train_steps).alphas_cumprod

    def embed_cond(self, c: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.full_like(c[:, :1], OFFSET), OFFSET + c], dim=1)

    def embed_time(self, t: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(len(t), self.width, dtype=torch.float64, device=t.device)
        out[:, 0] = t.double()
        return out

    def fused_modulation(self) -> tuple:
        return ()

    def modulations(self, silu_y: torch.Tensor, fused: tuple) -> torch.Tensor:
        return silu_y.unsqueeze(-2).expand(*silu_y.shape[:-1], 2, self.width)

    def premodulated_weights(self) -> tuple:
        return ()

    def trunk_premodulated(self, h: torch.Tensor, mods, weights=None) -> torch.Tensor:
        y = mods[0]
        t = (y[:, 0] - OFFSET).round().long()
        mu, x = y[:, 1:] - OFFSET, h[:, 1:]
        ab = self.alphas_cumprod.to(h.device)[t][:, None]
        eps = (1 - ab).sqrt() * (x - ab.sqrt() * mu) / (ab * self.std**2 + 1 - ab)
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)  # v = 0: the mid-range variance


def _ideal_head(std: float = 0.0, token_dim: int = 3) -> DiffusionHead:
    head = DiffusionHead(token_dim, token_dim, 8, 1)
    head.net = IdealGaussianNet(token_dim, std)
    return head


def _inputs(n: int, steps: int, token_dim: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mu = (torch.rand(n, token_dim, generator=g, dtype=torch.float64) * 4 - 2)
    return mu, torch.randn(steps + 1, n, token_dim, generator=g, dtype=torch.float64)


def test_every_sampler_the_request_names_exists():
    assert tuple(diffusion_sampler.SAMPLERS) == HEAD_SAMPLERS


@pytest.mark.parametrize("sampler", HEAD_SAMPLERS)
@pytest.mark.parametrize("steps", [1, 2, 3, 10, 50])
def test_single_point_data_is_returned_exactly(sampler, steps):
    """With the ideal eps of a single point, every x0_hat is that point: each sampler must land
    on it whatever the step count (a wrong timestep or coefficient would not)."""
    head = _ideal_head()
    mu, noise = _inputs(4, steps)
    for clip in (None, 3.0):
        out = head.sample(mu, noise, sampler=sampler, clip_denoised=clip)
        torch.testing.assert_close(out, mu, rtol=0, atol=1e-9)


@pytest.mark.parametrize("sampler", HEAD_SAMPLERS)
def test_cfg_moves_the_point_by_the_scale(sampler):
    """Guidance lerps eps: on single points the guided data is mu_u + s (mu_c - mu_u), exactly,
    for a scalar scale and a per-row [N] scale."""
    head = _ideal_head()
    mu_c, noise = _inputs(4, 12, seed=1)
    mu_u, _ = _inputs(4, 12, seed=2)
    z = torch.cat([mu_c, mu_u])
    for scale in (2.5, torch.tensor([0.0, 1.0, 2.0, 3.5], dtype=torch.float64)):
        s = scale if isinstance(scale, float) else scale[:, None]
        out = head.sample(z, noise, guidance_scale=scale, sampler=sampler)
        torch.testing.assert_close(out, mu_u + s * (mu_c - mu_u), rtol=0, atol=1e-8)


def _flow_map(x_T: torch.Tensor, mu: torch.Tensor, std: float) -> torch.Tensor:
    """The probability-flow ODE's map from t = 999 to the data for x0 ~ N(mu, std^2): the
    monotone (affine) transport between the Gaussians x_999 ~ N(alpha mu, alpha^2 std^2 + sigma^2)
    and the data."""
    ab = float(GaussianDiffusion(1000).alphas_cumprod[-1])
    a = math.sqrt(ab)
    return mu + std * (x_T - a * mu) / math.sqrt(ab * std**2 + 1 - ab)


def test_deterministic_samplers_converge_to_the_flow_map_at_their_orders():
    """On Gaussian data both reach the ODE's exact map; doubling the steps halves DDIM's error
    (first order) and quarters DPM-Solver++(2M)'s (second order). (With IDDPM's time-uniform
    respacing, whose first step spans most of log-SNR, 2M is not yet ahead at 25 steps or fewer.)"""
    std, n = 0.5, 64
    head = _ideal_head(std)
    mu, _ = _inputs(n, 0, seed=3)
    errors = {}
    for steps in (50, 100, 400):
        noise = torch.randn(steps + 1, n, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        exact = _flow_map(noise[0], mu, std)
        for sampler in ODE_SAMPLERS:
            errors[sampler, steps] = float((head.sample(mu, noise, sampler=sampler) - exact).abs().max())
    assert errors["ddim", 400] < 1e-2 and errors["dpm-solver++", 400] < 1e-3, errors
    assert 1.7 < errors["ddim", 50] / errors["ddim", 100] < 2.3, errors
    assert errors["dpm-solver++", 50] / errors["dpm-solver++", 100] > 3.5, errors


def test_all_samplers_draw_the_same_gaussian_at_many_steps():
    """The ancestral sampler (noise injected at every step) and the deterministic ones (x_T
    only) sample the same distribution: on N(mu, 0.5^2) data their samples' mean and spread
    agree with it (2,000 draws: the mean within 4 standard errors, the std within 6 %)."""
    std, n, steps = 0.5, 2000, 250
    head = _ideal_head(std, token_dim=1)
    mu = torch.full((n, 1), 0.7, dtype=torch.float64)
    noise = torch.randn(steps + 1, n, 1, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for sampler in HEAD_SAMPLERS:
        out = head.sample(mu, noise, sampler=sampler)
        assert abs(float(out.mean()) - 0.7) < 4 * std / math.sqrt(n), sampler
        assert abs(float(out.std()) / std - 1) < 0.06, sampler


@pytest.mark.parametrize("sampler", ODE_SAMPLERS)
def test_temperature_scales_x_T_only(sampler):
    """Deterministic given x_T: the injected noise is never read, temperature 0 gives the sample
    of x_T = 0, and on Gaussian data (a linear ODE) the result moves linearly with temperature."""
    head = _ideal_head(0.5)
    mu, noise = _inputs(5, 20, seed=6)
    other = noise.clone()
    other[1:] = torch.randn_like(other[1:])
    base = head.sample(mu, noise, sampler=sampler)
    assert torch.equal(base, head.sample(mu, other, sampler=sampler))
    zero = head.sample(mu, noise, temperature=0.0, sampler=sampler)
    torch.testing.assert_close(zero, head.sample(mu, torch.zeros_like(noise), sampler=sampler))
    half = head.sample(mu, noise, temperature=0.5, sampler=sampler)
    torch.testing.assert_close(half - zero, 0.5 * (base - zero), rtol=0, atol=1e-9)


@pytest.mark.parametrize("sampler,order", [("ddim", 1), ("dpm-solver++", 2)])
def test_fast_paths_match_the_textbook_loops_on_a_real_head(sampler, order):
    head = _perturbed_head(std=0.02)
    n, steps = 3, 25
    g = torch.Generator().manual_seed(7)
    z, noise = torch.randn(2 * n, D, generator=g), torch.randn(steps + 1, n, C, generator=g)
    diff = GaussianDiffusion(1000, steps)
    for zz, s, temp, clip in ((z[:n], 1.0, 1.0, None), (z, 2.5, 0.9, None), (z, 3.0, 1.0, 2.0)):
        fast = head.sample(zz, noise, guidance_scale=s, temperature=temp, clip_denoised=clip, sampler=sampler)
        with torch.no_grad():
            ref = plain_ode_head_sample(head.net, diff, zz, noise, s, temp, clip, order)
        torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.parametrize("sampler", ODE_SAMPLERS)
def test_deterministic_and_batch_independent(sampler):
    head = _perturbed_head(std=0.02)
    n, steps = 4, 8
    g = torch.Generator().manual_seed(8)
    zc, zu = torch.randn(n, D, generator=g), torch.randn(n, D, generator=g)
    noise = torch.randn(steps + 1, n, C, generator=g)
    scales = torch.tensor([1.0, 2.0, 3.0, 0.5])
    z = torch.cat([zc, zu])
    out = head.sample(z, noise, guidance_scale=scales, clip_denoised=3.0, sampler=sampler)
    assert out.shape == (n, C) and out.dtype == torch.float32
    assert torch.equal(out, head.sample(z, noise, guidance_scale=scales, clip_denoised=3.0, sampler=sampler))
    for i in range(n):
        alone = head.sample(torch.stack([zc[i], zu[i]]), noise[:, i:i + 1], guidance_scale=float(scales[i]),
                            clip_denoised=3.0, sampler=sampler)
        torch.testing.assert_close(alone, out[i:i + 1], rtol=0.0, atol=1e-5)


def test_sample_rejects_an_unknown_sampler_and_bad_steps():
    head = _perturbed_head()
    with pytest.raises(ValueError, match="sampler must be one of ancestral, ddim, dpm-solver\\+\\+, got 'euler'"):
        head.sample(torch.randn(2, D), torch.randn(5, 2, C), sampler="euler")
    for sampler in ODE_SAMPLERS:
        with pytest.raises(ValueError, match="S >= 1"):
            head.sample(torch.randn(2, D), torch.randn(1, 2, C), sampler=sampler)


def test_ode_coefficients_are_the_respaced_schedules():
    """The deterministic steps read the alpha_bar that respacing keeps (the original one at each
    kept timestep): ode_a, ode_b from those, dpm_w = 0 at the first and last step only."""
    steps = 10
    diff = GaussianDiffusion(1000, steps)
    full = GaussianDiffusion(1000).alphas_cumprod
    kept = full[diff.timestep_map]
    torch.testing.assert_close(diff.alphas_cumprod, kept)
    coef = ReverseSchedule.respaced(1000, steps).coefficients  # in sampling order: step i is t = S-1-i
    for i in range(steps):
        t = steps - 1 - i
        ab, ab_prev = float(kept[t]), float(kept[t - 1]) if t else 1.0
        ratio = math.sqrt(1 - ab_prev) / math.sqrt(1 - ab)
        assert coef["ode_a"][i] == pytest.approx(ratio, rel=1e-12)
        assert coef["ode_b"][i] == pytest.approx(math.sqrt(ab_prev) - math.sqrt(ab) * ratio, rel=1e-12, abs=1e-15)
        assert (coef["dpm_w"][i] == 0.0) == (i in (0, steps - 1))


@pytest.mark.parametrize("sampler", ODE_SAMPLERS)
def test_cuda_graph_capture_copies_nothing_from_the_host(monkeypatch, sampler):
    """As the ancestral sampler's test in test_diffusion: the graphed path on the meta device with a
    capture that fails on any host-to-device copy; one graph per sampler."""
    captures = stand_in_cuda_graphs(monkeypatch)
    head = _perturbed_head().to("meta")
    z, noise = torch.empty(6, D, device="meta"), torch.empty(11, 3, C, device="meta")
    with torch.inference_mode():
        for scale in (2.5, torch.full((3,), 2.0, device="meta")):
            out = head._sample_graphed(z, noise, scale, 0.9, 2.0, sampler)
            assert out.shape == (3, C) and out.device.type == "meta"
        assert len(captures) == 2
        head._sample_graphed(z, noise, 3.0, 0.9, 2.0, sampler)
        assert len(captures) == 2  # replayed
        head._sample_graphed(z, noise, 3.0, 0.9, 2.0, "ancestral")
        assert len(captures) == 3  # another sampler, another graph
