"""Time DiffusionHead.sample, the loop that dominates generation on CPU.

One `sample` call is one reverse diffusion (S steps) for N tokens; generation makes one such call
per autoregressive step. Compared against a plain per-step loop (net.forward every step, schedule
looked up from tensors each step), i.e. what MAR's p_sample_loop does, to show what the
precomputation buys. Random weights (perturbed so nothing is zero); timings only.

    python -m bench.bench_diffusion_head                 # 2 threads, median of 5, S = 100
    python -m bench.bench_diffusion_head --threads 1 --no-naive
"""

from __future__ import annotations

import argparse

import torch

from bench.common import median, time_interleaved
from dream_core.diffusion import DiffusionHead, DiffusionMLP
from dream_core.noise_schedule import GaussianDiffusion


@torch.inference_mode()
def naive_sample(net: DiffusionMLP, diff: GaussianDiffusion, z: torch.Tensor, noise: torch.Tensor,
                 scale: float) -> torch.Tensor:
    """Baseline: full net.forward per step on [x; x], per-step table gathers, no precomputation."""
    n, c = noise.shape[1:]
    cfg = z.shape[0] == 2 * n
    tabs = diff.tables(z.device)
    x = noise[0].clone()
    for k, i in enumerate(range(diff.num_steps - 1, -1, -1)):
        t = torch.full((z.shape[0],), i, dtype=torch.long)
        out = net(torch.cat([x, x]) if cfg else x, tabs["timestep_map"][t], z)
        eps, v = out[:, :c], out[:, c:]
        if cfg:
            eps, v = eps[n:] + scale * (eps[:n] - eps[n:]), v[:n]
        t = t[:n]
        x0 = tabs["sqrt_recip_alphas_cumprod"][t, None] * x - tabs["sqrt_recipm1_alphas_cumprod"][t, None] * eps
        mean = tabs["posterior_mean_coef1"][t, None] * x0 + tabs["posterior_mean_coef2"][t, None] * x
        frac = (v + 1) / 2
        log_var = frac * tabs["log_betas"][t, None] + (1 - frac) * tabs["posterior_log_variance_clipped"][t, None]
        x = mean + (t != 0).float()[:, None] * torch.exp(0.5 * log_var) * noise[k + 1]
    return x


def median_ms(fns: list, repeats: int) -> list[float]:
    """Median wall time of each callable in ms, interleaved per round (`time_interleaved`)."""
    return [1e3 * median(times) for times in time_interleaved(fns, repeats)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--token-dim", type=int, default=16)
    ap.add_argument("--cond-dim", type=int, default=768)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--widths", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 9, 64])
    ap.add_argument("--no-naive", action="store_true", help="skip the per-step baseline")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, S = {args.steps}, "
          f"token {args.token_dim}, cond {args.cond_dim}, depth {args.depth}, median of {args.repeats} (after 1 warm-up)")
    header = "| width | N | CFG | net rows | sample (ms) | per step (ms) | naive (ms) | speed-up |"
    print(header)
    print("| --- " * 8 + "|")
    diff = GaussianDiffusion(1000, args.steps)
    for width in args.widths:
        head = DiffusionHead(args.token_dim, args.cond_dim, width, args.depth).eval()
        with torch.no_grad():
            for p in head.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        for n in args.batch:
            for cfg in (False, True):
                z = torch.randn(2 * n if cfg else n, args.cond_dim)
                noise = torch.randn(args.steps + 1, n, args.token_dim)
                scale = 3.0 if cfg else 1.0
                fns = [lambda: head.sample(z, noise, guidance_scale=scale)]
                if not args.no_naive:
                    fns.append(lambda: naive_sample(head.net, diff, z, noise, scale))
                fast, *naive = median_ms(fns, args.repeats)
                naive_txt = f"{naive[0]:.1f}" if naive else "-"
                speed_txt = f"{naive[0] / fast:.2f}x" if naive else "-"
                print(f"| {width} | {n} | {'yes' if cfg else 'no'} | {z.shape[0]} | {fast:.1f} | "
                      f"{fast / args.steps:.3f} | {naive_txt} | {speed_txt} |", flush=True)


if __name__ == "__main__":
    main()
