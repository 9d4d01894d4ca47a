"""Tests for the per-token diffusion head: network (dream_core/diffusion.py), noise schedule
(dream_core/noise_schedule.py) and sampler (dream_core/diffusion_sampler.py)."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from dream_core.diffusion import DiffusionHead, DiffusionMLP
from dream_core.noise_schedule import GaussianDiffusion, space_timesteps
from reference import plain_head_sample  # tests/reference.py

C, D, W = 4, 12, 32  # token dim, condition dim, head width for the small cases


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for this module


def _perturbed_head(seed: int = 0, std: float = 0.05, **kw) -> DiffusionHead:
    """A head whose zero-initialised layers are made non-zero, so every path is exercised."""
    torch.manual_seed(seed)
    head = DiffusionHead(kw.pop("token_dim", C), kw.pop("cond_dim", D), kw.pop("width", W), kw.pop("depth", 2), **kw)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * std)
    return head.eval()


def _naive_sample(net: DiffusionMLP, z: torch.Tensor, noise: torch.Tensor, scale: float = 1.0,
                  temperature: float = 1.0) -> torch.Tensor:
    """Textbook ancestral DDPM (IDDPM p_sample with learned range), one plain net call per step."""
    with torch.no_grad():
        return plain_head_sample(net, GaussianDiffusion(1000, noise.shape[0] - 1), z, noise, scale, temperature, None)


# ---- network -----------------------------------------------------------------------------------


def test_mlp_shape_and_zero_output_at_init():
    net = DiffusionMLP(C, D, W, depth=3)
    x, c = torch.randn(5, C), torch.randn(5, D)
    for t in (torch.randint(0, 1000, (5,)), torch.rand(5) * 999):
        out = net(x, t, c)
        assert out.shape == (5, 2 * C)
        assert torch.equal(out, torch.zeros_like(out))


def test_fast_trunk_matches_forward():
    net = _perturbed_head().net
    x, c, t = torch.randn(7, C), torch.randn(7, D), torch.randint(0, 1000, (7,))
    with torch.no_grad():
        ref = net(x, t, c)
        y = net.embed_time(t) + net.embed_cond(c)
        mods = net.modulations(F.silu(y), net.fused_modulation())
        fast = net.trunk_premodulated(net.input_proj(x), mods.unbind(1))
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)


def test_grad_checkpointing_same_gradients():
    head = _perturbed_head()
    net = head.net.train()
    x, c, t = torch.randn(6, C), torch.randn(6, D), torch.randint(0, 1000, (6,))
    grads = []
    for flag in (False, True):
        net.grad_checkpointing = flag
        net.zero_grad()
        net(x, t, c).square().sum().backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


# ---- process -----------------------------------------------------------------------------------


def test_cosine_alpha_bar_closed_form():
    d = GaussianDiffusion()

    def f(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    for i in (0, 1, 250, 500, 900, 990):
        assert float(d.alphas_cumprod[i]) == pytest.approx(f((i + 1) / 1000) / f(0.0), rel=1e-10)
    assert float(d.betas.max()) == pytest.approx(0.999) and float(d.betas[-1]) == pytest.approx(0.999)
    assert d.alphas_cumprod.dtype == torch.float64


def test_respacing_full_is_identity():
    base, full = GaussianDiffusion(), GaussianDiffusion(1000, 1000)
    assert torch.equal(full.timestep_map, torch.arange(1000))
    torch.testing.assert_close(full.betas, base.betas, rtol=1e-10, atol=1e-12)


def test_respacing_100_follows_iddpm():
    kept = space_timesteps(1000, 100)
    # IDDPM: stride (size-1)/(count-1) accumulated in float, Python round()
    stride, cur, expected = 999 / 99, 0.0, []
    for _ in range(100):
        expected.append(round(cur))
        cur += stride
    assert kept == expected
    assert kept[:7] == [0, 10, 20, 30, 40, 50, 61] and kept[-1] == 999 and len(set(kept)) == 100

    base, d = GaussianDiffusion(), GaussianDiffusion(1000, 100)
    assert d.timestep_map.tolist() == kept
    torch.testing.assert_close(d.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-10, atol=0.0)
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), base.alphas_cumprod[kept][:-1]])
    torch.testing.assert_close(d.betas, 1 - base.alphas_cumprod[kept] / ab_prev)


def test_respaced_training_feeds_original_timesteps():
    d, seen = GaussianDiffusion(1000, 10), []

    def spy(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        seen.append(t.clone())
        return torch.zeros(x.shape[0], 2 * x.shape[1])

    d.training_losses(spy, torch.randn(10, C), torch.randn(10, D), t=torch.arange(10))
    assert seen[0].tolist() == space_timesteps(1000, 10)


def test_hybrid_loss_values_with_oracle_model():
    """Perfect eps and the true posterior variance (v = -1) give zero loss for t > 0; at t = 0
    the VLB is the binned Gaussian NLL of x0 under sigma^2 = posterior variance of step 1."""
    d = GaussianDiffusion()
    n = 6
    x0, noise = torch.rand(n, C) * 1.6 - 0.8, torch.randn(n, C)  # inside (-0.999, 0.999): middle bins
    t = torch.tensor([0, 1, 10, 500, 998, 999])

    def oracle(x: torch.Tensor, tt: torch.Tensor, c: torch.Tensor, shift: float = 0.0) -> torch.Tensor:
        return torch.cat([noise + shift, -torch.ones_like(noise)], dim=1)

    loss = d.training_losses(oracle, x0, torch.zeros(n, D), t=t, noise=noise)
    assert torch.all(loss[1:].abs() < 1e-4)
    sigma = math.sqrt(float(d.posterior_variance[1]))
    half_bin = 1 / 255 / sigma
    p_bin = math.erf(half_bin / math.sqrt(2))  # Phi(h) - Phi(-h)
    assert float(loss[0]) == pytest.approx(-math.log(p_bin) / math.log(2), rel=2e-3)

    shifted = d.training_losses(lambda *a: oracle(*a, shift=0.5), x0, torch.zeros(n, D), t=t, noise=noise)
    # eps off by 0.5 everywhere: MSE 0.25 plus a VLB that is a KL (>= 0) for t > 0
    assert float(shifted[1:].min()) >= 0.25 - 1e-4


# ---- head: loss ----------------------------------------------------------------------------------


def test_head_loss_per_sample_masked_mean_and_grad():
    torch.manual_seed(0)
    head = _perturbed_head(batch_mul=3).train()
    b, l = 4, 10
    target = torch.randn(b, l, C)
    z = torch.randn(b, l, D, requires_grad=True)
    mask = (torch.rand(b, l) < 0.6).float()
    mask[0, :3] = 1.0
    mask[2] = 0.0  # a sample with nothing to predict
    loss = head.loss(target, z, mask)
    assert loss.shape == (b,)
    assert torch.isfinite(loss).all()
    assert loss[2] == 0.0
    assert (loss[[0, 1, 3]] > 0).all()
    loss.sum().backward()
    assert torch.isfinite(z.grad).all()
    assert z.grad[mask.bool()].abs().sum(-1).min() > 0  # every masked token gets gradient
    assert torch.all(z.grad[~mask.bool()] == 0)  # unmasked tokens get none


def test_head_loss_all_unmasked_batch_is_zero_not_nan():
    head = _perturbed_head()
    loss = head.loss(torch.randn(2, 5, C), torch.randn(2, 5, D), torch.zeros(2, 5))
    assert torch.equal(loss, torch.zeros(2))


# ---- head: sampler ---------------------------------------------------------------------------------


def test_sample_matches_naive_reference():
    head = _perturbed_head(std=0.02)
    n, steps = 3, 25
    g = torch.Generator().manual_seed(1)
    z, noise = torch.randn(2 * n, D, generator=g), torch.randn(steps + 1, n, C, generator=g)
    for zz, s, temp in ((z[:n], 1.0, 1.0), (z, 2.5, 0.9)):
        fast = head.sample(zz, noise, guidance_scale=s, temperature=temp)
        ref = _naive_sample(head.net, zz, noise, scale=s, temperature=temp)
        torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)


def test_sample_chunked_modulations_match():
    head = _perturbed_head(std=0.02)
    g = torch.Generator().manual_seed(2)
    z, noise = torch.randn(4, D, generator=g), torch.randn(21, 2, C, generator=g)
    whole = head.sample(z, noise, 3.0)
    head.modulation_chunk_bytes = 1  # one step per chunk
    torch.testing.assert_close(head.sample(z, noise, 3.0), whole)


def test_sample_deterministic_and_batch_independent():
    """Row i of a batch equals row i decoded alone (what SAD candidates rely on).

    A random head predicts eps ~ 0 at t = 999, so the first unclipped step multiplies x by ~316
    and values reach 1e4: there float32 kernels that differ by batch size are compared relative to
    the magnitude. With clip_denoised the values stay O(1) and the absolute 1e-5 bound applies.
    """
    head = _perturbed_head(std=0.02)
    n, steps = 5, 20
    g = torch.Generator().manual_seed(3)
    zc, zu = torch.randn(n, D, generator=g), torch.randn(n, D, generator=g)
    noise = torch.randn(steps + 1, n, C, generator=g)
    scales = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.5])
    for clip in (None, 3.0):
        a = head.sample(zc, noise, clip_denoised=clip)
        assert torch.equal(a, head.sample(zc, noise, clip_denoised=clip))
        guided = head.sample(torch.cat([zc, zu]), noise, guidance_scale=scales, clip_denoised=clip)
        assert torch.equal(guided, head.sample(torch.cat([zc, zu]), noise, guidance_scale=scales, clip_denoised=clip))
        for i in range(n):
            alone = head.sample(zc[i:i + 1], noise[:, i:i + 1], clip_denoised=clip)
            alone_cfg = head.sample(torch.stack([zc[i], zu[i]]), noise[:, i:i + 1],
                                    guidance_scale=float(scales[i]), clip_denoised=clip)
            for x, ref in ((alone, a[i:i + 1]), (alone_cfg, guided[i:i + 1])):
                atol = 1e-5 if clip else 1e-5 * float(ref.abs().max())
                torch.testing.assert_close(x, ref, rtol=0.0, atol=atol)


def test_cfg_scale_one_equals_conditional_and_scale_matters():
    head = _perturbed_head(std=0.02)
    g = torch.Generator().manual_seed(4)
    zc, zu, noise = torch.randn(3, D, generator=g), torch.randn(3, D, generator=g), torch.randn(21, 3, C, generator=g)
    cond_only = head.sample(zc, noise)
    torch.testing.assert_close(head.sample(torch.cat([zc, zu]), noise, guidance_scale=1.0), cond_only,
                               rtol=1e-5, atol=1e-5)
    guided = head.sample(torch.cat([zc, zu]), noise, guidance_scale=3)
    assert not torch.allclose(guided, cond_only, atol=1e-3)
    per_row = head.sample(torch.cat([zc, zu]), noise, guidance_scale=torch.full((3,), 3.0))
    torch.testing.assert_close(per_row, guided)


def test_temperature_zero_ignores_injected_noise():
    head = _perturbed_head(std=0.02)
    g = torch.Generator().manual_seed(5)
    z, noise = torch.randn(2, D, generator=g), torch.randn(21, 2, C, generator=g)
    other = noise.clone()
    other[1:] = torch.randn(20, 2, C, generator=g)
    assert torch.equal(head.sample(z, noise, temperature=0.0), head.sample(z, other, temperature=0.0))
    assert not torch.allclose(head.sample(z, noise), head.sample(z, other))


def test_sample_rejects_bad_shapes():
    head = _perturbed_head()
    with pytest.raises(ValueError):
        head.sample(torch.randn(3, D), torch.randn(11, 2, C))
    with pytest.raises(ValueError):
        head.sample(torch.randn(2, D), torch.randn(1, 2, C))


# ---- learning --------------------------------------------------------------------------------------


def _toy_batch(b: int, l: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """cond one-hot picks cluster +2 (class 1) or -2 (class 0) in 2-D, cluster std 0.1."""
    label = torch.randint(0, 2, (b, l), generator=g)
    x0 = (label.float() * 4 - 2)[..., None].expand(b, l, 2) + 0.1 * torch.randn(b, l, 2, generator=g)
    return x0, F.one_hot(label, 2).float()


def test_tiny_head_learns_two_cluster_conditional():
    """~150 AdamW steps on the real loss, then sampling puts each condition on its own cluster.

    Sampling uses clip_denoised=3: without it, the first reverse step (t = 999, where
    alpha_bar = 2.4e-9) multiplies the eps error by ~316, and a head trained this briefly
    (eps MSE ~1e-3 at t = 999) is thrown far out of distribution. Fully trained heads do not need
    it; the official sampler does not clip.
    """
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    head = DiffusionHead(token_dim=2, cond_dim=2, width=32, depth=2, batch_mul=4)
    untrained = DiffusionHead(token_dim=2, cond_dim=2, width=32, depth=2)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / 150)
    first = None
    for _ in range(150):
        x0, cond = _toy_batch(4, 32, g)
        loss = head.loss(x0, cond, torch.ones(4, 32)).mean()
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    assert loss.item() < 0.5 * first

    n = 200
    cond = torch.cat([F.one_hot(torch.ones(n, dtype=torch.long), 2), F.one_hot(torch.zeros(n, dtype=torch.long), 2)]).float()
    noise = torch.randn(51, 2 * n, 2, generator=g)
    target = torch.cat([torch.full((n, 2), 2.0), torch.full((n, 2), -2.0)])

    def check(h: DiffusionHead) -> None:
        x = h.eval().sample(cond, noise, clip_denoised=3.0)
        assert (x[:n].mean(0) - 2.0).abs().max() < 0.2 and (x[n:].mean(0) + 2.0).abs().max() < 0.2
        assert ((x - target).norm(dim=1) < 1.0).float().mean() > 0.9
        assert x.std(0).max() > 1.0 and x[:n].std(0).max() < 0.3 and x[n:].std(0).max() < 0.3

    check(head)
    with pytest.raises(AssertionError):
        check(untrained)


# ---- CUDA-graph capture ------------------------------------------------------------------------


class _NoHostCopies(TorchFunctionMode):
    """Fails on a tensor made from host data on another device (torch.tensor / as_tensor)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if func in (torch.tensor, torch.as_tensor) and device is not None and torch.device(device).type != "cpu":
            raise AssertionError(f"host-to-device copy inside the capture: {func.__name__}(..., device={device})")
        return func(*args, **kwargs)


class _NoHostToDeviceCopies(TorchDispatchMode):
    """Fails on a copy from a CPU tensor into a tensor on another device."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            src = args[0] if func is torch.ops.aten._to_copy.default else args[1]
            dst = kwargs.get("device") if func is torch.ops.aten._to_copy.default else args[0].device
            if src.device.type == "cpu" and dst is not None and torch.device(dst).type != "cpu":
                raise AssertionError(f"host-to-device copy inside the capture: {func}")
        return func(*args, **kwargs)


def stand_in_cuda_graphs(monkeypatch) -> list:
    """Replace torch.cuda's stream and graph API by stand-ins whose capture region fails on any
    host-to-device copy; returns the list every capture appends its graph to."""
    captures = []

    class Stream:
        def __init__(self, *args):
            pass

        def wait_stream(self, other):
            pass

    class Graph:
        def replay(self):
            pass

    @contextlib.contextmanager
    def capture(graph):
        captures.append(graph)
        with _NoHostCopies(), _NoHostToDeviceCopies():
            yield

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", capture)
    return captures


def test_cuda_graph_capture_copies_nothing_from_the_host(monkeypatch):
    """A capturing CUDA stream cannot wait for a host-to-device copy (the capture fails), so every
    tensor the reverse process needs from the host must exist before `torch.cuda.graph`. The
    graphed sampler runs here on the meta device (a device that is not the host), with
    torch.cuda's stream and graph API replaced by stand-ins whose capture region fails on any
    host-to-device copy; a second call replays without capturing again."""
    captures = stand_in_cuda_graphs(monkeypatch)
    head = _perturbed_head().to("meta")
    z, noise = torch.empty(6, D, device="meta"), torch.empty(11, 3, C, device="meta")
    with torch.inference_mode():
        for scale in (2.5, torch.full((3,), 2.0, device="meta")):
            out = head._sample_graphed(z, noise, scale, 0.9, None, "ancestral")
            assert out.shape == (3, C) and out.device.type == "meta"
    assert len(captures) == 2  # a float and a per-row scale: two shapes of the scale buffer
    with torch.inference_mode():
        head._sample_graphed(z, noise, 3.0, 0.9, None, "ancestral")
    assert len(captures) == 2  # replayed
