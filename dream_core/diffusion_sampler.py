"""Sampling the per-token diffusion head: respaced ancestral DDPM with learned variance, CFG and
temperature inside the step, and the replay of the whole reverse process from a CUDA graph.

The sampler is kept apart from the network (`dream_core.diffusion`) and its noise schedule
(`dream_core.noise_schedule`), as diffusers keeps schedulers apart from models. It reads the
network only through `PremodulatedNet`: everything that does not depend on x_t (the condition's
embedding, the timestep MLP of every step, all adaLN projections) is computed once per call in a
few large matmuls, and the loop runs only the x-dependent MLPs and a handful of elementwise ops,
which matters because the head runs ~100 sequential steps per generation step.
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


def ancestral_sample(net: PremodulatedNet, schedule: ReverseSchedule, z: torch.Tensor, noise: torch.Tensor,
                     guidance_scale: float | torch.Tensor, temperature: float, clip_denoised: float | None, *,
                     modulation_chunk_bytes: int, loop_threads: int, loop_threads_max_rows: int) -> torch.Tensor:
    """Ancestral DDPM over `schedule`; returns x_0 [N, C] (inputs as `DiffusionHead.sample`).

    The adaLN vectors of `modulation_chunk_bytes` worth of steps are computed per matmul; on
    the CPU, up to `loop_threads_max_rows` rows run the loop on `loop_threads` threads (0 = all).
    Every tensor made here is made from tensors on z's device, except the schedule's, which
    `schedule.device_tensors` builds once: the function can be captured in a CUDA graph.
    """
    steps = noise.shape[0] - 1
    n, c = noise.shape[1], noise.shape[2]
    cfg = z.shape[0] == 2 * n
    dtype = net.input_proj.weight.dtype
    device = z.device

    noise = noise.to(device=device, dtype=dtype)
    x = noise[0].clone()
    injected = noise[1:]
    if temperature != 1.0:
        injected = injected * temperature
    if isinstance(guidance_scale, torch.Tensor):
        guidance_scale = guidance_scale.to(device=device, dtype=dtype).reshape(-1, 1)  # [N, 1] or [1, 1]
    else:
        guidance_scale = float(guidance_scale)

    timesteps, p_t, q_t = schedule.device_tensors(device, dtype)  # per-step tensors as tuples of views
    cond = net.embed_cond(z.to(dtype))  # [M, W]
    t_emb = net.embed_time(timesteps)  # [S, W]
    fused = net.fused_modulation()
    m, n_mod = cond.shape[0], 3 * net.depth + 2
    per_step_bytes = m * n_mod * net.width * cond.element_size()
    chunk = max(1, min(steps, modulation_chunk_bytes // max(per_step_bytes, 1)))
    w_in, b_in = net.input_proj.weight, net.input_proj.bias
    weights = net.premodulated_weights()
    inj = injected.unbind(0)
    few_rows = device.type == "cpu" and 0 < loop_threads < torch.get_num_threads() and m <= loop_threads_max_rows
    coef = schedule.coefficients
    a_s, b_s = coef["a"], coef["b"]
    c1_s, c2_s, sra_s, srm1_s = coef["c1"], coef["c2"], coef["sra"], coef["srm1"]

    for start in range(0, steps, chunk):
        stop = min(steps, start + chunk)
        y = F.silu(cond[None] + t_emb[start:stop, None])  # [s, M, W]
        # [s, M, n_mod, W] as the matmul writes it (no transposed copy): each step unbinds
        # into [M, W] vectors with a row stride of n_mod * W, which elementwise ops take as is.
        mods = net.modulations(y, fused).unbind(0)
        with intra_op_threads(loop_threads if few_rows else 0):
            for j in range(stop - start):
                i = start + j  # reverse step index; respaced t = steps - 1 - i
                h = F.linear(x, w_in, b_in)
                if cfg:
                    h = torch.cat([h, h])
                out = net.trunk_premodulated(h, mods[j].unbind(1), weights)
                eps, v = out.split(c, dim=1)  # [M, C] each: predicted noise, variance interpolation
                if cfg:
                    eps_c, eps_u = eps.split(n)
                    # A tensor weight must match the (possibly autocast) output dtype; .to is free otherwise.
                    g = guidance_scale if isinstance(guidance_scale, float) else guidance_scale.to(out.dtype)
                    eps = torch.lerp(eps_u, eps_c, g)
                    v = v[:n]  # the conditional half's
                if clip_denoised is None:
                    x_next = (x * a_s[i]).sub_(eps, alpha=b_s[i])
                else:
                    x0 = (x * sra_s[i]).sub_(eps, alpha=srm1_s[i]).clamp_(-clip_denoised, clip_denoised)
                    x_next = (x * c2_s[i]).add_(x0, alpha=c1_s[i])
                if i < steps - 1:  # no noise at t = 0; std = exp(p + q v)
                    x_next.addcmul_(torch.addcmul(p_t[i], v, q_t[i]).exp_(), inj[i])
                x = x_next
    return x


SampleFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class CudaGraphs:
    """Captured reverse processes, one per (shapes, dtypes, temperature, clip, autocast state),
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
               max_graphs: int) -> torch.Tensor:
        """`sample_fn(z, noise, scale)` replayed from a graph, captured on the first call for
        these inputs. `prepare()` makes the tensors the capture needs that come from the host
        (a capturing stream cannot wait for a host-to-device copy); it runs before capture."""
        device = z.device
        scale = torch.as_tensor(guidance_scale, dtype=torch.float32, device=device).reshape(-1, 1)
        amp, amp_dtype = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
        key = (tuple(z.shape), z.dtype, tuple(noise.shape), noise.dtype, tuple(scale.shape), str(device),
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


__all__ = ["CudaGraphs", "PremodulatedNet", "ancestral_sample", "intra_op_threads"]
