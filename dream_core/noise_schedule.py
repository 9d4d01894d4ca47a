"""The IDDPM cosine noise schedule of the diffusion head, kept apart from the network.

The cosine alpha-bar schedule over 1000 training steps, respacing to fewer evenly kept steps
(the network always sees the *original* timestep), the hybrid MSE + VLB training loss (VLB with
the mean detached, in bits, discretised Gaussian NLL at t = 0), and the per-step coefficients of
the samplers in `dream_core.diffusion_sampler` (ancestral, DDIM, DPM-Solver++(2M)). All tables
are float64, like the NumPy originals, so MAR/DiT/IDDPM numbers carry over.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch


def cosine_alpha_bar(t: float) -> float:
    """Nichol & Dhariwal's f(t) for t in [0, 1]; alpha_bar of step i is f((i+1)/T) / f(0)."""
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def cosine_betas(num_steps: int, max_beta: float = 0.999) -> torch.Tensor:
    """beta_i = min(1 - f((i+1)/T) / f(i/T), max_beta), float64."""
    betas = [min(1 - cosine_alpha_bar((i + 1) / num_steps) / cosine_alpha_bar(i / num_steps), max_beta)
             for i in range(num_steps)]
    return torch.tensor(betas, dtype=torch.float64)


def space_timesteps(num_steps: int, count: int) -> list[int]:
    """IDDPM's `space_timesteps(num_steps, str(count))` for one section: start at 0, stride
    (num_steps-1)/(count-1) accumulated in float and rounded with Python's round()."""
    if not 1 <= count <= num_steps:
        raise ValueError(f"cannot keep {count} of {num_steps} steps")
    stride = 1.0 if count == 1 else (num_steps - 1) / (count - 1)
    cur, kept = 0.0, []
    for _ in range(count):
        kept.append(round(cur))
        cur += stride
    return kept


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of Phi used by IDDPM (kept for identical loss values)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """log-likelihood of x under a Gaussian binned at 1/255 (edges open beyond +-0.999).

    An image-space leftover that MAR/DREAM apply to latents at t = 0; replicated for parity.
    """
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


class GaussianDiffusion:
    """The cosine-schedule diffusion, optionally respaced to `sampling_steps` evenly kept steps.

    Respacing keeps the original alpha_bar at the kept steps and recomputes
    beta'_i = 1 - alpha_bar[t_i] / alpha_bar[t_{i-1}]; the network always receives the original
    timestep index `timestep_map[i]` (IDDPM's wrapper with rescale_timesteps=False).
    All tables are float64 (like the NumPy originals) and cast to float32 when gathered.
    """

    def __init__(self, num_train_steps: int = 1000, sampling_steps: int | None = None):
        base_alpha_bar = torch.cumprod(1.0 - cosine_betas(num_train_steps), dim=0)
        kept = list(range(num_train_steps)) if sampling_steps is None else space_timesteps(num_train_steps, sampling_steps)
        self.num_train_steps = num_train_steps
        self.timestep_map = torch.tensor(kept, dtype=torch.long)
        self.num_steps = len(kept)

        ab = base_alpha_bar[self.timestep_map]
        ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
        betas = 1.0 - ab / ab_prev
        self.betas = betas
        self.alphas_cumprod = ab
        self.alphas_cumprod_prev = ab_prev
        self.sqrt_alphas_cumprod = ab.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - ab).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / ab).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / ab - 1.0).sqrt()
        self.posterior_variance = betas * (1.0 - ab_prev) / (1.0 - ab)
        # posterior variance is 0 at t = 0; IDDPM clips its log by reusing the t = 1 value
        self.posterior_log_variance_clipped = torch.log(torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = betas * ab_prev.sqrt() / (1.0 - ab)
        self.posterior_mean_coef2 = (1.0 - ab_prev) * (1.0 - betas).sqrt() / (1.0 - ab)
        self.log_betas = torch.log(betas)
        self._device_tables: dict[tuple[torch.device, torch.dtype], dict[str, torch.Tensor]] = {}

    _TABLES = ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
               "sqrt_recipm1_alphas_cumprod", "posterior_log_variance_clipped", "posterior_mean_coef1",
               "posterior_mean_coef2", "log_betas")

    def tables(self, device: torch.device, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Schedule tables cast once per (device, dtype) and cached, plus the timestep map."""
        key = (torch.device(device), dtype)
        if key not in self._device_tables:
            tabs = {name: getattr(self, name).to(device=device, dtype=dtype) for name in self._TABLES}
            tabs["timestep_map"] = self.timestep_map.to(device)
            self._device_tables[key] = tabs
        return self._device_tables[key]

    def sampler_coefficients(self) -> dict[str, torch.Tensor]:
        """Per-step float64 scalars of one ancestral step, folded for the fewest tensor ops:

        mean = a * x_t - b * eps     (posterior mean of x0_hat = sqrt(1/ab) x_t - sqrt(1/ab - 1) eps)
        std  = exp(p + q * v)         (exp(0.5 * logvar) with the learned-range interpolation)

        plus the unfolded c1, c2, sra, srm1 for the optional clipped-x0 path, and the
        deterministic steps of `ode_coefficients`.
        """
        c1, c2 = self.posterior_mean_coef1, self.posterior_mean_coef2
        lo, hi = self.posterior_log_variance_clipped, self.log_betas
        return {
            "a": c1 * self.sqrt_recip_alphas_cumprod + c2,
            "b": c1 * self.sqrt_recipm1_alphas_cumprod,
            "p": (hi + lo) / 4.0,
            "q": (hi - lo) / 4.0,
            "c1": c1,
            "c2": c2,
            "sra": self.sqrt_recip_alphas_cumprod,
            "srm1": self.sqrt_recipm1_alphas_cumprod,
            **self.ode_coefficients(),
        }

    def ode_coefficients(self) -> dict[str, torch.Tensor]:
        """Per-step float64 scalars of the deterministic samplers, in data-prediction form.

        With alpha = sqrt(ab), sigma = sqrt(1 - ab) and lambda = log(alpha / sigma), the exact
        solution of the probability-flow ODE from t to t-1 with the data prediction D held
        constant is (Lu et al. 2022, DPM-Solver++, eq. 9 with h = lambda_{t-1} - lambda_t):

            x_{t-1} = ode_a * x_t + ode_b * D,   ode_a = sigma_{t-1} / sigma_t,
                                                  ode_b = alpha_{t-1} - alpha_t * ode_a  (= alpha_{t-1} (1 - e^-h))

        D = x0_hat is DDIM with eta = 0 (= DPM-Solver++ of order 1). DPM-Solver++(2M) uses
        D = x0_hat + dpm_w * (x0_hat - x0_hat of the step before), dpm_w = h / (2 h_before)
        (1 / 2r in the paper); dpm_w is 0 at the first step (no step before) and at the last, whose
        target alpha = 1, sigma = 0 has lambda = inf (a first-order step there lands on x0_hat, as
        diffusers' lower_order_final does). Written without lambda where it can be infinite.
        """
        ab, ab_prev = self.alphas_cumprod, self.alphas_cumprod_prev
        sigma, sigma_prev = (1.0 - ab).sqrt(), (1.0 - ab_prev).sqrt()
        ode_a = sigma_prev / sigma
        ode_b = ab_prev.sqrt() - ab.sqrt() * ode_a
        lam = 0.5 * (ab.log() - (1.0 - ab).log())  # increasing as t decreases
        dpm_w = torch.zeros_like(ab)
        if self.num_steps >= 3:  # t = 1 .. S-2: a step before (t + 1) and a finite lambda after (t - 1)
            h = lam[:-2] - lam[1:-1]  # h of step t = 1 .. S-2: lambda_{t-1} - lambda_t
            h_before = lam[1:-1] - lam[2:]  # lambda_t - lambda_{t+1}
            dpm_w[1:-1] = h / (2.0 * h_before)
        return {"ode_a": ode_a, "ode_b": ode_b, "dpm_w": dpm_w}

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        tabs = self.tables(x0.device)
        return tabs["sqrt_alphas_cumprod"][t, None] * x0 + tabs["sqrt_one_minus_alphas_cumprod"][t, None] * noise

    def training_losses(self, model: Callable[..., torch.Tensor], x0: torch.Tensor, cond: torch.Tensor,
                        t: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """IDDPM "hybrid" loss per row [N]: mean-channel eps MSE + VLB (bits) for the variance.

        `t` indexes this process's steps (original steps when not respaced); the VLB sees the
        eps prediction detached, so it only trains the variance channels.
        """
        n, c = x0.shape
        if t is None:
            t = torch.randint(0, self.num_steps, (n,), device=x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        tabs = self.tables(x0.device)
        x_t = self.q_sample(x0, t, noise)
        out = model(x_t, tabs["timestep_map"][t], cond)
        eps, v = out[:, :c], out[:, c:]
        mse = (noise - eps).pow(2).mean(dim=1)

        def gather(name: str) -> torch.Tensor:
            return tabs[name][t, None]

        coef1, coef2 = gather("posterior_mean_coef1"), gather("posterior_mean_coef2")
        min_log = gather("posterior_log_variance_clipped")
        true_mean = coef1 * x0 + coef2 * x_t
        x0_hat = gather("sqrt_recip_alphas_cumprod") * x_t - gather("sqrt_recipm1_alphas_cumprod") * eps.detach()
        model_mean = coef1 * x0_hat + coef2 * x_t
        frac = (v + 1.0) / 2.0
        model_log_var = frac * gather("log_betas") + (1.0 - frac) * min_log
        kl = normal_kl(true_mean, min_log, model_mean, model_log_var).mean(dim=1) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var).mean(dim=1) / math.log(2.0)
        vb = torch.where(t == 0, nll, kl)
        return mse + vb


@dataclass
class ReverseSchedule:
    """A respaced schedule in sampling order (reverse step i is respaced t = S-1-i): the original
    timestep the network sees at each step, and the per-step scalars of one step of each sampler
    (`GaussianDiffusion.sampler_coefficients`) as Python floats, which the sampler hands to
    kernels as scalars. The few per-step tensors it needs are made once per device and dtype
    (`device_tensors`), so a CUDA graph captured after a first call copies nothing from the host.
    """

    timesteps: torch.Tensor  # long [S], on the CPU
    coefficients: dict[str, list[float]]
    _on_device: dict = field(default_factory=dict, repr=False)

    @classmethod
    def respaced(cls, num_train_steps: int, steps: int) -> "ReverseSchedule":
        """The cosine schedule of `num_train_steps` respaced to `steps` evenly kept steps."""
        diff = GaussianDiffusion(num_train_steps, steps)
        coef = diff.sampler_coefficients()
        return cls(diff.timestep_map.flip(0), {k: v.flip(0).tolist() for k, v in coef.items()})

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def device_tensors(self, device: torch.device, dtype: torch.dtype
                       ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """(timesteps [S] long, p per step, q per step) on `device`, p and q in `dtype`; the noise
        std of step i is exp(p[i] + q[i] * v). Built on the first call for a (device, dtype)."""
        key = (torch.device(device), dtype)
        if key not in self._on_device:
            self._on_device[key] = (
                self.timesteps.to(device),
                torch.tensor(self.coefficients["p"], dtype=dtype, device=device).unbind(0),
                torch.tensor(self.coefficients["q"], dtype=dtype, device=device).unbind(0),
            )
        return self._on_device[key]
