"""Decoding speed: where a generated image's time goes.

Prints markdown tables:
  1. candidates: per-image wall time of SAD with K = 1, 2, 4, 9, 16 (at the model's default
     decision step, `request.default_decision_step`), its ratio to K = 1, the split between
     transformer (encoder + decoder, SAD scoring included), diffusion head and the rest, FLOPs
     per image (torch's FlopCounterMode: matmuls and attention) and the achieved FLOP/s as a share
     of this machine's measured fp32 matmul peak;
  2. the decoding-steps x head-steps grid at K = 1 (steps capped at the model's token count), for
     each head sampler of `--head-samplers` (default: the model's own);
  3. (models with a VAE) latency of the app path: first candidate preview, final image; and the
     cost of UI previews as a share of decoding time: after every step (pipeline.decode_tokens on
     the K partial states), and in the app itself (app.handlers.generate_stream's own timers);
  4. (models with a VAE) peak memory (RSS) of a fresh process that loads the model and generates.

Every time is the median of --repeats runs after one warm-up. The transformer/head split comes
from timers wrapped around the model's encoder, decoder and head inside the real loop.

    python -m bench.decode                        # the bundled model (assets/dream-shapes), 2 threads
    python -m bench.decode --random-mar-size      # MAR's timed 64-token 4 x 256 model, random weights
    python -m bench.decode --random-mar-size --quick --sections candidates
    python -m bench.decode --model runs/x/export --sections latency,previews,memory
    python -m bench.decode --random-mar-size --device cuda --bf16 --cuda-graphs
    python -m bench.decode --sections grid --head-samplers ancestral,ddim,dpm-solver++ --head-steps 10,25,100
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from bench.common import (CLOCKS, ROOT, Stopwatch, count_flops, fmt_flops, fmt_s, machine_info, mar_size_config,
                          markdown_table, matmul_peak, median, paired_ratio, patched, random_model, random_text,
                          resolve_device, setup_threads, time_interleaved, weights_line)
from dream_core.model import DreamModel
from dream_core.request import (DEFAULT_GUIDANCE_SCALE, DEFAULT_STEPS, HEAD_SAMPLERS,
                                default_decision_step)
from dream_core.sampling import TextCondition, candidate_generators
from dream_core.semantic_decoding import semantic_decode
from training.evaluate.cli import argparse_type, parse_head_samplers, parse_int_list, run_cli

SECTIONS = ("candidates", "grid", "latency", "previews", "memory")
APP_ROW = "the app (generate_stream: preview decoder, 10 % budget)"
PROMPT = "a large red circle in the middle on a white background"
DEFAULT_KS = (1, 2, 4, 9, 16)
GRID_STEPS = (16, 32, 64)
GRID_HEAD_STEPS = (25, 50, 100)


# --------------------------------------------------------------------------- what is decoded


@dataclass
class Target:
    """A model plus a way to run one generation of it (the pipeline's own path when there is one)."""

    name: str
    model: DreamModel
    device: torch.device
    pipe: object | None = None  # DreamPipeline
    cfg: float = DEFAULT_GUIDANCE_SCALE
    bf16: bool = False  # the random model only: a pipeline autocasts to bf16 on CUDA by itself

    def decode(self, k: int, steps: int, head_steps: int, seed: int = 0,
               on_event: Callable | None = None, head_sampler: str | None = None):
        """One generation; returns the last StepEvent. K > 1 uses SAD at the default decision step;
        `head_sampler` None is the model's default."""
        decision = default_decision_step(self.model.config, steps) if k > 1 else None
        if self.pipe is not None:
            events = self.pipe.stream(PROMPT, num_candidates=k, decision_step=decision, num_inference_steps=steps,
                                      guidance_scale=self.cfg, seed=seed, head_steps=head_steps,
                                      head_sampler=head_sampler)
        else:
            events = self._random_stream(k, steps, head_steps, seed, decision, head_sampler)
        last = None
        for last in events:
            if on_event is not None:
                on_event(last)
        return last

    @torch.inference_mode()
    def _random_stream(self, k, steps, head_steps, seed, decision, head_sampler):
        if self.bf16 and self.device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                yield from self._random_events(k, steps, head_steps, seed, decision, head_sampler)
            return
        yield from self._random_events(k, steps, head_steps, seed, decision, head_sampler)

    def _random_events(self, k, steps, head_steps, seed, decision, head_sampler):
        c = self.model.config
        cfg = self.cfg != 1.0
        hidden, mask = random_text(c, cfg=cfg)
        text = TextCondition.build(self.model, hidden.to(self.device), mask.to(self.device))
        clip_tokens = torch.randint(1, 400, (1, c.clip_context_length), generator=torch.Generator().manual_seed(seed))
        text_emb = self.model.encode_text(clip_tokens.to(self.device)).float()
        yield from semantic_decode(self.model, text, text_emb, candidate_generators(seed, k), steps,
                                   [decision] if decision else [], self.cfg, None, None, head_steps, head_sampler,
                                   device=self.device)


def load_target(args: argparse.Namespace, device: torch.device) -> Target:
    if args.random_mar_size:
        model = random_model(mar_size_config()).to(device)
        return Target("random MAR-size model (64 tokens x 16 ch, encoder/decoder 4 x 256, head 3 x 256)",
                      model, device, cfg=args.cfg)
    from dream_core.pipeline import DreamPipeline, default_model_dir

    path = Path(args.model) if args.model else default_model_dir()
    if not path.is_dir():
        raise ValueError(f"model directory {path} does not exist (train it with `make model`, pass --model DIR, "
                         "or use --random-mar-size)")
    pipe = DreamPipeline.from_pretrained(path, device=device)
    c = pipe.config
    name = (f"{path} ({c.seq_len} tokens x {c.token_dim} ch, encoder/decoder {c.encoder_depth}+{c.decoder_depth} "
            f"x {c.width}, head {c.head_depth} x {c.head_width})")
    return Target(name, pipe.model, device, pipe=pipe, cfg=args.cfg)


# --------------------------------------------------------------------------- measurements


@dataclass(frozen=True)
class Setting:
    """One timed decoding: K candidates, decoding steps, head steps and sampler (None: the model's)."""
    k: int
    steps: int
    head_steps: int
    head_sampler: str | None = None


@dataclass
class Timing:
    seconds: float  # median per image
    runs: list[float]
    ratio: float  # to the first setting timed with it: the median of the rounds' ratios
    transformer: float  # of the median run
    head: float
    flops: float | None


def measure(target: Target, settings: list[Setting], args: argparse.Namespace) -> list[Timing]:
    """Median wall time of each setting's generation, the settings interleaved round by round (so
    that the machine's drift cancels in their ratios), with the transformer/head split of the
    median run."""
    model = target.model
    sw = Stopwatch(args.clock, target.device)
    splits: list[list[tuple[float, float]]] = [[] for _ in settings]

    def runner(i: int, s: Setting) -> Callable[[], None]:
        def run() -> None:
            sw.reset()
            target.decode(s.k, s.steps, s.head_steps, seed=args.seed, head_sampler=s.head_sampler)
            splits[i].append((sw.totals["encoder"] + sw.totals["decoder"], sw.totals["head"]))
        return run

    fns = [runner(i, s) for i, s in enumerate(settings)]
    if target.device.type == "cuda":
        # The timers synchronise the GPU, which would distort the headline time: split separately.
        runs = time_interleaved(fns, args.repeats, warmup=1, clock=args.clock, device=target.device)
        with _timers(model, sw):
            for fn in fns:
                fn()
        split_of = [sp[-1] for sp in splits]
    else:
        with _timers(model, sw):
            runs = time_interleaved(fns, args.repeats, warmup=1, clock=args.clock, device=target.device)
        split_of = []
        for times, sp in zip(runs, splits):  # sp[0] is the warm-up's
            med = median(times)
            split_of.append(sp[1:][min(range(len(times)), key=lambda j: abs(times[j] - med))])
    out = []
    for s, times, split in zip(settings, runs, split_of):
        flops = None if args.no_flops else count_flops(
            lambda: target.decode(s.k, s.steps, s.head_steps, seed=args.seed, head_sampler=s.head_sampler))
        out.append(Timing(median(times), times, paired_ratio(times, runs[0]), split[0], split[1], flops))
    return out


class _timers:
    """Wrap the encoder's and decoder's forward and the head's sample with stopwatch regions."""

    def __init__(self, model: DreamModel, sw: Stopwatch) -> None:
        self.items = [(model.encoder, "forward", "encoder"), (model.decoder, "forward", "decoder"),
                      (model.head, "sample", "head")]
        self.sw, self.ctx = sw, []

    def __enter__(self):
        for obj, attr, label in self.items:
            ctx = patched(obj, attr, self.sw.wrap(getattr(obj, attr), label))
            ctx.__enter__()
            self.ctx.append(ctx)
        return self

    def __exit__(self, *exc):
        for ctx in reversed(self.ctx):
            ctx.__exit__(*exc)
        self.ctx.clear()


def timing_row(t: Timing, peak: float) -> list[str]:
    other = max(0.0, t.seconds - t.transformer - t.head)
    share = (lambda x: f"{fmt_s(x)} ({100 * x / t.seconds:.0f} %)")
    row = [fmt_s(t.seconds), f"{t.ratio:.2f}x"]
    row += [share(t.transformer), share(t.head), share(other)]
    if t.flops is None:
        row += ["-", "-", "-"]
    else:
        rate = t.flops / t.seconds
        row += [fmt_flops(t.flops), f"{rate / 1e9:.1f} G", f"{100 * rate / peak:.1f} %"]
    return row


SPLIT_HEADERS = ["transformer", "head", "other"]
FLOP_HEADERS = ["FLOPs / image", "FLOP/s", "of peak"]


def candidates_section(target: Target, args: argparse.Namespace, peak: float) -> str:
    L = target.model.config.seq_len
    steps = min(args.candidate_steps or L, L)
    settings = [Setting(k, steps, args.candidate_head_steps) for k in args.ks]
    rows = []
    for s, t in zip(settings, measure(target, settings, args)):
        decision = f"{default_decision_step(target.model.config, steps)}/{steps}" if s.k > 1 else "-"
        rows.append([str(s.k), decision, str(steps), str(s.head_steps)] + timing_row(t, peak))
        print(f"  K={s.k}: {fmt_s(t.seconds)} (runs {', '.join(f'{r:.3f}' for r in t.runs)})", file=sys.stderr,
              flush=True)
    headers = ["K", "decision", "steps", "head steps", "per image", f"vs K={args.ks[0]}"] + SPLIT_HEADERS + FLOP_HEADERS
    return ("## Candidates (SAD at the model's default decision step)\n\n" + markdown_table(headers, rows)
            + f"\n\n{INTERLEAVED}")


def grid_section(target: Target, args: argparse.Namespace, peak: float) -> str:
    L = target.model.config.seq_len
    steps_list = sorted({min(s, L) for s in args.steps})
    samplers = args.head_samplers or [target.model.config.default_head_sampler]
    settings = [Setting(1, steps, hs, sampler)
                for sampler in samplers for steps in steps_list for hs in args.head_steps]
    rows = []
    for s, t in zip(settings, measure(target, settings, args)):
        rows.append([s.head_sampler, str(s.steps), str(s.head_steps)] + timing_row(t, peak))
        print(f"  {s.head_sampler} steps={s.steps} head={s.head_steps}: {fmt_s(t.seconds)}", file=sys.stderr,
              flush=True)
    headers = ["head sampler", "steps", "head steps", "per image", "vs first row"] + SPLIT_HEADERS + FLOP_HEADERS
    return "## Decoding steps x head steps (K = 1)\n\n" + markdown_table(headers, rows) + f"\n\n{INTERLEAVED}"


INTERLEAVED = ("(The settings are timed round by round, one generation of each per round; a ratio is the "
               "median of the rounds' ratios, so the machine's drift cancels in it.)")


def latency_section(target: Target, args: argparse.Namespace) -> str:
    """The app path: time to the first candidate preview (first event + its VAE decode) and to the
    final image (pipe(...) end to end: T5, decoding, VAE)."""
    pipe = target.pipe
    if pipe is None:
        return "## Latency\n\n(needs a model directory with a VAE; skipped for the random model)"
    steps, hs = min(args.app_steps, pipe.config.seq_len), args.app_head_steps
    decisions = [default_decision_step(pipe.config, steps) if k > 1 else None for k in args.latency_ks]
    firsts: list[list[float]] = [[] for _ in args.latency_ks]
    finals: list[list[float]] = [[] for _ in args.latency_ks]
    for r in range(args.repeats + 1):  # round by round, every K once a round (see INTERLEAVED)
        for i, (k, decision) in enumerate(zip(args.latency_ks, decisions)):
            t0 = time.perf_counter()
            stream = pipe.stream(PROMPT, num_candidates=k, decision_step=decision, num_inference_steps=steps,
                                 guidance_scale=target.cfg, seed=args.seed + r, head_steps=hs)
            first = next(stream)
            pipe.decode_previews(first.tokens)  # as the app: the preview decoder when there is one
            t1 = time.perf_counter()
            for _ in stream:
                pass
            del stream
            t2 = time.perf_counter()
            pipe(PROMPT, num_candidates=k, decision_step=decision, num_inference_steps=steps,
                 guidance_scale=target.cfg, seed=args.seed + r, head_steps=hs)
            t3 = time.perf_counter()
            if r:  # the first round is the warm-up
                firsts[i].append(t1 - t0)
                finals[i].append(t3 - t2)
    rows = [[str(k), f"{decision}/{steps}" if decision else "-", str(steps), str(hs), fmt_s(median(first)),
             fmt_s(median(final)), f"{paired_ratio(final, finals[0]):.2f}x"]
            for k, decision, first, final in zip(args.latency_ks, decisions, firsts, finals)]
    headers = ["K", "decision", "steps", "head steps", "first candidate preview", "final image (pipe(...))",
               f"final vs K={args.latency_ks[0]}"]
    return ("## Latency of the app path (wall clock, T5 + decoding + VAE)\n\n" + markdown_table(headers, rows)
            + f"\n\n{INTERLEAVED}")


def previews_section(target: Target, args: argparse.Namespace) -> str:
    """UI previews. Three rows per K: the raw cost of previewing every step with the full VAE
    (pipeline.decode_tokens on the K partial states) and with the preview decoder
    (pipeline.decode_previews), and the app itself: app.handlers.generate_stream with its default
    policy (progress at most every 0.125 s, candidate previews - preview decode, hatching and the
    tile grid - within a 10 % budget of decoding time, the first step and the decision always
    shown), which reports its own preview and decoding times on each image's final view."""
    pipe = target.pipe
    if pipe is None:
        return "## Previews\n\n(needs a model directory with a VAE; skipped for the random model)"
    import tempfile

    from app import handlers as h
    from app.history import History
    from app.models import ModelManager
    from app.params import GenerationSettings

    steps, hs = min(args.app_steps, pipe.config.seq_len), args.app_head_steps
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        manager = ModelManager(pipe.path, models_dirs=[], device=str(target.device),
                               loader=lambda path, device: pipe).load_initial()
        ctx = h.AppContext(manager, History(Path(tmp) / "outputs"), display_dir=Path(tmp) / "display")
        for k in args.latency_ks:
            decision = default_decision_step(pipe.config, steps) if k > 1 else None
            plain = {"every step, full VAE decode": pipe.decode_tokens,
                     "every step, preview decoder": pipe.decode_previews}
            stats = {label: {"n": [], "prev": [], "dec": []} for label in [*plain, APP_ROW]}
            for r in range(args.repeats + 1):
                for label, decode in plain.items():
                    preview, calls = 0.0, 0

                    def on_event(ev, decode=decode) -> None:
                        nonlocal preview, calls
                        t = time.perf_counter()
                        if ev.kind != "done":  # the final image is decoded anyway
                            decode(ev.tokens)
                            calls += 1
                        preview += time.perf_counter() - t

                    t0 = time.perf_counter()
                    target.decode(k, steps, hs, seed=args.seed + r, on_event=on_event)
                    if r:  # the first round is the warm-up
                        stats[label]["n"].append(calls)
                        stats[label]["prev"].append(preview)
                        stats[label]["dec"].append(time.perf_counter() - t0 - preview)
                settings = GenerationSettings(PROMPT, num_candidates=k, decision_step=decision,
                                              num_inference_steps=steps, head_steps=hs, guidance_scale=target.cfg,
                                              seed=args.seed + r)
                views = list(h.generate_stream(ctx, h.SessionState(), settings))
                if r:
                    stats[APP_ROW]["n"].append(sum(v.grid is not None for v in views[:-1]))
                    stats[APP_ROW]["prev"].append(views[-1].preview_seconds)
                    stats[APP_ROW]["dec"].append(views[-1].decode_seconds)
            for label, m in stats.items():
                shares = [p / d for p, d in zip(m["prev"], m["dec"])]
                rows.append([str(k), str(steps), str(hs), label, fmt_s(median(m["dec"])), str(int(median(m["n"]))),
                             fmt_s(median([p / max(n, 1) for p, n in zip(m["prev"], m["n"])])),
                             f"{100 * median(shares):.1f} %"])
    headers = ["K", "steps", "head steps", "previews", "decoding (without previews)", "previews",
               "one preview (K images)", "previews / decoding"]
    return "## UI previews\n\n" + markdown_table(headers, rows)


# A fresh interpreter that imports only what the app needs, loads the model and generates once.
MEMORY_CHILD = r"""
import json, resource, sys
def peak():  # MB. VmHWM where there is /proc: ru_maxrss of a child carries its parent's peak across fork + exec
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024) / 2**20
model, k, steps, head_steps, threads, device = sys.argv[1], *map(int, sys.argv[2:6]), sys.argv[6]
out = {"start": peak()}
import torch
if threads:
    torch.set_num_threads(threads)
out["import torch"] = peak()
from dream_core.pipeline import DreamPipeline
from dream_core.request import default_decision_step
out["import dream_core.pipeline"] = peak()
try:
    import gradio  # noqa: F401  (the app's UI library: part of the app process)
    out["import gradio"] = peak()
except ImportError:
    pass
pipe = DreamPipeline.from_pretrained(model, device=device)
out["load the model"] = peak()
steps = min(steps, pipe.config.seq_len)
pipe("a large red circle in the middle on a white background", num_candidates=k,
     decision_step=default_decision_step(pipe.config, steps) if k > 1 else None, num_inference_steps=steps,
     head_steps=head_steps, seed=0)
out["generate one image"] = peak()
print(json.dumps(out))
"""


def memory_section(target: Target, args: argparse.Namespace) -> str:
    """Peak RSS of a fresh process that imports the engine, loads the model and generates once at
    the app settings, after each of those stages. Read from /proc/self/status VmHWM (Linux):
    resource.getrusage's ru_maxrss would report this (parent) process's peak, which a child
    inherits across fork + exec; elsewhere ru_maxrss is used."""
    if target.pipe is None:
        return "## Memory\n\n(needs a model directory; skipped for the random model)"
    rows, stages = [], None
    for k in args.latency_ks:
        cmd = [sys.executable, "-c", MEMORY_CHILD, str(target.pipe.path), str(k), str(args.app_steps),
               str(args.app_head_steps), str(args.threads), str(target.device)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
        res = json.loads(out.stdout.strip().splitlines()[-1])
        stages = [s for s in res if s != "start"]
        rows.append([str(k)] + [f"{res[s]:.0f} MB" for s in stages])
    headers = ["K"] + [f"after: {s}" for s in stages]
    return ("## Peak memory (RSS) of a fresh process: import, load the model, generate one image\n\n"
            + markdown_table(headers, rows))


# --------------------------------------------------------------------------- CLI


def _positive_ints(name: str) -> Callable[[str], list[int]]:
    """argparse type: a comma-separated list of positive integers, errors naming the flag."""
    def parse(text: str) -> list[int]:
        values = argparse_type(parse_int_list, name)(text)
        if min(values) < 1:
            raise argparse.ArgumentTypeError(f"{name} takes positive integers, got {text!r}")
        return values

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="model directory (default: the bundled assets/dream-shapes)")
    src.add_argument("--random-mar-size", action="store_true", help="MAR's timed 64-token 4 x 256 model, random weights")
    ap.add_argument("--sections", default=None, help=f"comma-separated subset of {','.join(SECTIONS)} "
                    "(default: all that apply to the model)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (0 = torch's default)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per setting (median), after 1 warm-up")
    ap.add_argument("--clock", default="wall", choices=CLOCKS,
                    help="wall (report this) or process CPU time (rough comparisons on a busy machine, 1 thread)")
    ap.add_argument("--cfg", type=float, default=DEFAULT_GUIDANCE_SCALE, help="CFG scale (constant schedule)")
    ap.add_argument("--ks", type=_positive_ints("--ks"), default=list(DEFAULT_KS), help="candidate counts of section 1")
    ap.add_argument("--candidate-steps", type=int, default=0, help="decoding steps of section 1 (0 = one token per step)")
    ap.add_argument("--candidate-head-steps", type=int, default=None,
                    help="head steps of section 1 (default: the model's default_head_steps)")
    ap.add_argument("--steps", type=_positive_ints("--steps"), default=list(GRID_STEPS),
                    help="decoding steps of the grid")
    ap.add_argument("--head-steps", type=_positive_ints("--head-steps"), default=list(GRID_HEAD_STEPS),
                    help="head steps of the grid")
    ap.add_argument("--head-samplers", type=argparse_type(parse_head_samplers, "--head-samplers"), default=None,
                    help=f"head samplers of the grid, comma-separated of {','.join(HEAD_SAMPLERS)} "
                         "(default: the model's default_head_sampler)")
    ap.add_argument("--app-steps", type=int, default=DEFAULT_STEPS,
                    help="decoding steps of the latency/preview/memory sections (at most one per token, as the app)")
    ap.add_argument("--app-head-steps", type=int, default=None,
                    help="head steps of the latency/preview/memory sections (default: the model's "
                         "default_head_steps, as the app)")
    ap.add_argument("--latency-ks", type=_positive_ints("--latency-ks"), default=[1, 9],
                    help="candidate counts of the latency sections")
    ap.add_argument("--bf16", action="store_true", help="CUDA: bf16 autocast for the random model "
                    "(a model directory's pipeline always uses it on CUDA)")
    ap.add_argument("--cuda-graphs", action="store_true", help="CUDA: replay the head's reverse loop from CUDA graphs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-flops", action="store_true", help="skip the FLOP-counting run")
    ap.add_argument("--quick", action="store_true", help="1 timed run, K in 1 and 9, a 2 x 2 grid")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats = 1
        args.ks = [k for k in args.ks if k in (1, 9)] or args.ks[:2]
        args.steps = sorted({min(args.steps), max(args.steps)})
        args.head_steps = sorted({min(args.head_steps), max(args.head_steps)})
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_threads(args.threads)
    device = resolve_device(args.device)
    target = load_target(args, device)
    target.bf16 = args.bf16
    target.model.head.cuda_graphs = args.cuda_graphs  # a no-op off CUDA
    for name in ("candidate_head_steps", "app_head_steps"):  # what the app would use for this model
        if getattr(args, name) is None:
            setattr(args, name, target.model.config.default_head_steps)
    if args.sections:
        sections = [s.strip() for s in args.sections.split(",") if s.strip()]
        bad = [s for s in sections if s not in SECTIONS]
        if bad:
            raise ValueError(f"unknown --sections {bad}; choose from {', '.join(SECTIONS)}")
    else:
        sections = list(SECTIONS) if target.pipe is not None else ["candidates", "grid"]
    peak = matmul_peak(device)
    c = target.model.config
    print("# DREAM decoding benchmark\n")
    print(f"- model: {target.name}, {sum(p.numel() for p in target.model.parameters()) / 1e6:.2f} M parameters")
    if target.pipe is not None:
        print(weights_line(target.pipe.path))
    print(f"- machine: {machine_info(device)}; measured fp32 matmul peak {peak / 1e9:.1f} GFLOP/s (2048^3)")
    print(f"- CFG {args.cfg} constant, the model's default temperature, median of {args.repeats} after 1 warm-up, clock {args.clock}; "
          f"{c.seq_len} tokens")
    print(f"- command: python -m bench.decode {' '.join(argv if argv is not None else sys.argv[1:])}\n", flush=True)
    for name in sections:
        t = time.perf_counter()
        if name == "candidates":
            text = candidates_section(target, args, peak)
        elif name == "grid":
            text = grid_section(target, args, peak)
        elif name == "latency":
            text = latency_section(target, args)
        elif name == "previews":
            text = previews_section(target, args)
        else:
            text = memory_section(target, args)
        print(text + f"\n\n({name}: {time.perf_counter() - t:.0f} s to measure)\n", flush=True)


if __name__ == "__main__":
    run_cli(main)
