"""Sampling the per-token diffusion head: respaced ancestral DDPM with learned variance, the
deterministic DDIM (eta = 0) and DPM-Solver++(2M) over the same respaced steps, CFG and temperature
inside the step, and the replay of the whole reverse process from a CUDA graph.

The sampler is kept apart from the network (`dream_core.diffusion`) and its noise schedule
(`dream_core.noise_schedule`), as diffusers keeps schedulers apart from models. It reads the
network only through `PremodulatedNet`: everything that does not depend on x_t (the condition's
embedding, the timestep MLP of every step, all adaLN projections) is computed once per call in a
few large matmuls, and the loop runs only the x-dependent MLPs and a handful of elementwise ops,
which matters because the head runs ~100 sequential steps per generation step. The samplers share
that loop (`GuidedEps`) and differ only in their update.
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from typing import Callable, Iterator, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .noise_schedule import ReverseSchedule


class PremodulatedNet(Protocol):
    """What the sampler needs of the head's network (`dream_core.diffusion.DiffusionMLP`)."""

    token_dim: int
    width: int
    depth: int
    input_proj: nn.Linear

    def embed_cond(self, c: torch.Tensor) -> torch.Tensor: ...

    def embed_time(self, t: torch.Tensor) -> torch.Tensor: ...

    def fused_modulation(self) -> tuple[torch.Tensor, torch.Tensor]: ...

    def modulations(self, silu_y: torch.Tensor, fused: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor: ...

    def premodulated_weights(self) -> tuple: ...

    def trunk_premodulated(self, h: torch.Tensor, mods: Sequence[torch.Tensor], weights: tuple | None = None
                           ) -> torch.Tensor: ...


@contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """Run the block on n intra-op threads (0 = leave as is), restoring the count after."""
    if n <= 0:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class GuidedEps:
    """The network's prediction at every reverse step of `schedule`, guided, through the
    premodulated fast path: what the three samplers share (they differ only in the update).

    Built once per call: the condition's embedding, the timestep MLP of every step, the weights.
    `steps()` yields each reverse step with its adaLN vectors, computed for `modulation_chunk_bytes`
    worth of steps per matmul; on the CPU, up to `loop_threads_max_rows` rows run the loop body
    (the consumer's update included) on `loop_threads` threads (0 = all). Calling it with x_t and
    a step's vectors gives (eps, v) [N, C] each: eps = lerp(eps_u, eps_c, s) when z holds
    [conditional; unconditional] rows, and the conditional half's variance value v.
    """

    def __init__(self, net: PremodulatedNet, schedule: ReverseSchedule, z: torch.Tensor, n: int,
                 guidance_scale: float | torch.Tensor, *, modulation_chunk_bytes: int, loop_threads: int,
                 loop_threads_max_rows: int) -> None:
        self.net, self.n, self.c = net, n, net.token_dim
        self.cfg = z.shape[0] == 2 * n
        self.dtype = dtype = net.input_proj.weight.dtype
        self.device = device = z.device
        if isinstance(guidance_scale, torch.Tensor):
            guidance_scale = guidance_scale.to(device=device, dtype=dtype).reshape(-1, 1)  # [N, 1] or [1, 1]
        else:
            guidance_scale = float(guidance_scale)
        self.guidance_scale = guidance_scale
        self.num_steps = schedule.num_steps
        timesteps = schedule.device_tensors(device, dtype)[0]
        self.cond = net.embed_cond(z.to(dtype))  # [M, W]
        self.t_emb = net.embed_time(timesteps)  # [S, W]
        self.fused = net.fused_modulation()
        m, n_mod = self.cond.shape[0], 3 * net.depth + 2
        per_step_bytes = m * n_mod * net.width * self.cond.element_size()
        self.chunk = max(1, min(self.num_steps, modulation_chunk_bytes // max(per_step_bytes, 1)))
        self.w_in, self.b_in = net.input_proj.weight, net.input_proj.bias
        self.weights = net.premodulated_weights()
        few_rows = device.type == "cpu" and 0 < loop_threads < torch.get_num_threads() and m <= loop_threads_max_rows
        self.loop_threads = loop_threads if few_rows else 0

    def steps(self) -> Iterator[tuple[int, Sequence[torch.Tensor]]]:
        """(reverse step i, its adaLN vectors) in sampling order; respaced t = S - 1 - i."""
        net, steps = self.net, self.num_steps
        for start in range(0, steps, self.chunk):
            stop = min(steps, start + self.chunk)
            y = F.silu(self.cond[None] + self.t_emb[start:stop, None])  # [s, M, W]
            # [s, M, n_mod, W] as the matmul writes it (no transposed copy): each step unbinds
            # into [M, W] vectors with a row stride of n_mod * W, which elementwise ops take as is.
            mods = net.modulations(y, self.fused).unbind(0)
            with intra_op_threads(self.loop_threads):
                for j in range(stop - start):
                    yield start + j, mods[j].unbind(1)

    def __call__(self, x: torch.Tensor, mods: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.linear(x, self.w_in, self.b_in)
        if self.cfg:
            h = torch.cat([h, h])
        out = self.net.trunk_premodulated(h, mods, self.weights)
        eps, v = out.split(self.c, dim=1)  # [M, C] each: predicted noise, variance interpolation
        if self.cfg:
            eps_c, eps_u = eps.split(self.n)
            # A tensor weight must match the (possibly autocast) output dtype; .to is free otherwise.
            g = self.guidance_scale
            eps = torch.lerp(eps_u, eps_c, g if isinstance(g, float) else g.to(out.dtype))
            v = v[:self.n]  # the conditional half's
        return eps, v


def ancestral_sample(net: PremodulatedNet, schedule: ReverseSchedule, z: torch.Tensor, noise: torch.Tensor,
                     guidance_scale: float | torch.Tensor, temperature: float, clip_denoised: float | None, *,
                     modulation_chunk_bytes: int, loop_threads: int, loop_threads_max_rows: int) -> torch.Tensor:
    """Ancestral DDPM over `schedule` with the learned variance; returns x_0 [N, C] (inputs as
    `DiffusionHead.sample`). Temperature scales the noise injected at every step.

    Every tensor made here is made from tensors on z's device, except the schedule's, which
    `schedule.device_tensors` builds once: the function can be captured in a CUDA graph (so can
    the two deterministic samplers below).
    """
    model = GuidedEps(net, schedule, z, noise.shape[1], guidance_scale, modulation_chunk_bytes=modulation_chunk_bytes,
                      loop_threads=loop_threads, loop_threads_max_rows=loop_threads_max_rows)
    steps = schedule.num_steps
    noise = noise.to(device=model.device, dtype=model.dtype)
    x = noise[0].clone()
    injected = noise[1:]
    if temperature != 1.0:
        injected = injected * temperature
    inj = injected.unbind(0)
    _, p_t, q_t = schedule.device_tensors(model.device, model.dtype)  # per-step tensors as tuples of views
    coef = schedule.coefficients
    a_s, b_s = coef["a"], coef["b"]
    c1_s, c2_s, sra_s, srm1_s = coef["c1"], coef["c2"], coef["sra"], coef["srm1"]
    for i, mods in model.steps():
        eps, v = model(x, mods)
        if clip_denoised is None:
            x_next = (x * a_s[i]).sub_(eps, alpha=b_s[i])
        else:
            x0 = (x * sra_s[i]).sub_(eps, alpha=srm1_s[i]).clamp_(-clip_denoised, clip_denoised)
            x_next = (x * c2_s[i]).add_(x0, alpha=c1_s[i])
        if i < steps - 1:  # no noise at t = 0; std = exp(p + q v)
            x_next.addcmul_(torch.addcmul(p_t[i], v, q_t[i]).exp_(), inj[i])
        x = x_next
    return x


def _ode_sample(net: PremodulatedNet, schedule: ReverseSchedule, z: torch.Tensor, noise: torch.Tensor,
                guidance_scale: float | torch.Tensor, temperature: float, clip_denoised: float | None,
                second_order: bool, **loop: int) -> torch.Tensor:
    """DDIM (eta = 0) or DPM-Solver++(2M) over `schedule` (`GaussianDiffusion.ode_coefficients`):
    x_{t-1} = ode_a x_t + ode_b D, D from the data predictions x0_hat, clamped where formed."""
    model = GuidedEps(net, schedule, z, noise.shape[1], guidance_scale, **loop)
    x = noise[0].to(device=model.device, dtype=model.dtype)
    if temperature != 1.0:
        x = x * temperature
    coef = schedule.coefficients
    sra_s, srm1_s, a_s, b_s, w_s = coef["sra"], coef["srm1"], coef["ode_a"], coef["ode_b"], coef["dpm_w"]
    x0_before = None
    for i, mods in model.steps():
        eps, _ = model(x, mods)
        x0 = (x * sra_s[i]).sub_(eps, alpha=srm1_s[i])
        if clip_denoised is not None:
            x0 = x0.clamp_(-clip_denoised, clip_denoised)
        d = x0
        if second_order and w_s[i] != 0.0:  # 0 at the first and the last step: first order there
            d = (x0 * (1.0 + w_s[i])).sub_(x0_before, alpha=w_s[i])
        x = (x * a_s[i]).add_(d, alpha=b_s[i])
        x0_before = x0
    return x


def ddim_sample(net: PremodulatedNet, schedule: ReverseSchedule, z: torch.Tensor, noise: torch.Tensor,
                guidance_scale: float | torch.Tensor, temperature: float, clip_denoised: float | None, *,
                modulation_chunk_bytes: int, loop_threads: int, loop_threads_max_rows: int) -> torch.Tensor:
    """DDIM with eta = 0 (Song et al. 2021) over the respaced steps of `schedule`, the same trained
    network read as a probability-flow ODE; returns x_0 [N, C] (inputs as `DiffusionHead.sample`).

    The learned variance is unused and only noise[0] = x_T is read: given x_T the result is
    deterministic. Temperature scales x_T, the only randomness left (0 gives the sample of x_T = 0,
    1 the trained distribution); that is what a lower temperature does to the ancestral sampler's
    injected noise, moved to the one place a deterministic sampler draws noise.
    """
    return _ode_sample(net, schedule, z, noise, guidance_scale, temperature, clip_denoised, False,
                       modulation_chunk_bytes=modulation_chunk_bytes, loop_threads=loop_threads,
                       loop_threads_max_rows=loop_threads_max_rows)


def dpm_solver_pp_sample(net: PremodulatedNet, schedule: ReverseSchedule, z: torch.Tensor, noise: torch.Tensor,
                         guidance_scale: float | torch.Tensor, temperature: float, clip_denoised: float | None, *,
                         modulation_chunk_bytes: int, loop_threads: int,
                         loop_threads_max_rows: int) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022): the multistep second-order solver in data-prediction
    form, x0_hat formed from the eps output, over the respaced steps of `schedule`; the first
    step and the last are first order (DDIM), as usual. Second order for the price of one network
    evaluation per step, so it needs fewer steps than DDIM for the same error. Noise and
    temperature as `ddim_sample`: only x_T is read, and temperature scales it.
    """
    return _ode_sample(net, schedule, z, noise, guidance_scale, temperature, clip_denoised, True,
                       modulation_chunk_bytes=modulation_chunk_bytes, loop_threads=loop_threads,
                       loop_threads_max_rows=loop_threads_max_rows)


#: The head's samplers by name (the names are `dream_core.request.HEAD_SAMPLERS`); each takes the
#: inputs of `ancestral_sample`.
SAMPLERS = {"ancestral": ancestral_sample, "ddim": ddim_sample, "dpm-solver++": dpm_solver_pp_sample}


SampleFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class CudaGraphs:
    """Captured reverse processes, one per (sampler, shapes, dtypes, temperature, clip, autocast state),
    kept in an LRU: on a GPU the head's ~40 small kernels per reverse step are launch-bound, and
    a graph launches the whole process at once.

    The inputs (z, noise and the guidance scale, held as a tensor so the linear CFG schedule
    reuses the graph) are copied into a graph's static buffers before each replay. Weights are
    read from their storage at every replay, so in-place updates are seen; `clear()` after
    moving or re-assigning parameters.
    """

    def __init__(self) -> None:
        self._graphs: OrderedDict = OrderedDict()

    def __len__(self) -> int:
        return len(self._graphs)

    def clear(self) -> None:
        """Drop the captured graphs (and their memory)."""
        self._graphs.clear()

    def sample(self, sample_fn: SampleFn, prepare: Callable[[], None], z: torch.Tensor, noise: torch.Tensor,
               guidance_scale: float | torch.Tensor, temperature: float, clip_denoised: float | None,
               max_graphs: int, sampler: str) -> torch.Tensor:
        """`sample_fn(z, noise, scale)` replayed from a graph, captured on the first call for
        these inputs and this `sampler` (its name). `prepare()` makes the tensors the capture needs
        that come from the host (a capturing stream cannot wait for a host-to-device copy); it runs
        before capture."""
        device = z.device
        scale = torch.as_tensor(guidance_scale, dtype=torch.float32, device=device).reshape(-1, 1)
        amp, amp_dtype = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
        key = (sampler, tuple(z.shape), z.dtype, tuple(noise.shape), noise.dtype, tuple(scale.shape), str(device),
               float(temperature), clip_denoised, amp, amp_dtype)
        entry = self._graphs.pop(key, None)
        if entry is None:
            static = {"z": z.clone(), "noise": noise.to(device).clone(), "scale": scale.clone()}

            def body() -> torch.Tensor:
                # Autocast's weight cache must be off while capturing.
                with torch.autocast("cuda", dtype=amp_dtype, enabled=amp, cache_enabled=False):
                    return sample_fn(static["z"], static["noise"], static["scale"])

            prepare()
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                body()  # warm-up outside the capture (lazy initialisation, allocator)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static["out"] = body()
            entry = (graph, static)
            while len(self._graphs) >= max(1, max_graphs):
                self._graphs.popitem(last=False)
        self._graphs[key] = entry
        graph, static = entry
        static["z"].copy_(z)
        static["noise"].copy_(noise)
        static["scale"].copy_(scale)
        graph.replay()
        return static["out"].clone()


__all__ = ["CudaGraphs", "GuidedEps", "PremodulatedNet", "SAMPLERS", "ancestral_sample", "ddim_sample",
           "dpm_solver_pp_sample", "intra_op_threads"]
