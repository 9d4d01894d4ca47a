"""Semantically Aligned Decoding swept over K and the decision step (the paper's Tables 6 and 17).

For a seeded prompt set, every (K, decision step) is generated and scored: Shapes World
faithfulness with the exact judge (`--shapes`, the default without `--prompts`) and/or CLIP score
(`--clip-arch` + `--clip-weights`, local open_clip). With `--reranker-arch` +
`--reranker-weights` (open_clip) or `--reranker-model DIR` (another DREAM model directory, e.g. the
contrastive-only `shapes-clip` recipe), the paper's external-reranker comparison is added: all K
candidates decoded to the end, the best kept by that model (`dream_core.semantic_decoding`).
`--staged K:share/kept,...` (repeatable) adds SAD in stages: at the first step with each share of
the tokens decided, keep that many candidates, the last count 1.

Quality comes from one shared decoding trunk per prompt (see `DreamPipeline.generate_batch`:
candidate k of a prompt is the same trajectory in every setting, so this equals separate runs). Speed is measured
separately, by decoding `--timing-prompts` prompts once per setting exactly as a user would (a
batch of prompts, SAD pruning at the decision step): seconds per image and images per second on
this device, plus `row_steps_per_image` (decoder forwards x candidate rows), the device-free cost.

    python -m training.evaluate.sad_sweep --model assets/dream-shapes --out runs/eval/sad \
        --k 1,3,9 --decision-steps 1,2,4,8 --n-prompts 200
    python -m training.evaluate.sad_sweep --out runs/eval/sad-staged --k 1,9 --staged 9:0.25/3,0.75/1
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dream_core.masking import fraction_decided
from dream_core.pipeline import DreamPipeline
from dream_core.rerankers import DreamReranker
from dream_core.semantic_decoding import GenerationRun, Reranker, Setting

from .cli import (add_model_args, add_sampler_args, load_pipeline, parse_int_list, parse_staged, run_cli,
                  run_metadata, sampler_from_args, write_json)
from .plotting import plot_lines
from .scoring import clip_scores, load_open_clip
from .sets import EVAL_SEED, prompt_seeds, read_prompts
from .faithfulness import judge_images, parse_objects, prompt_set


def sweep_settings(ks: list[int], decision_steps: list[int], rerank: bool) -> list[Setting]:
    settings = []
    for k in ks:
        if k == 1:
            settings.append(Setting(1))
            continue
        settings += [Setting(k, d) for d in decision_steps]
        if rerank:
            settings.append(Setting(k, rerank=True))
    return list(dict.fromkeys(settings))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    add_sampler_args(ap)
    ap.add_argument("--k", default="1,3,9", help="numbers of candidates, comma-separated")
    ap.add_argument("--decision-steps", default="", help="decision steps, comma-separated (default: the first "
                    "steps with " + ", ".join(f"{100 * f:g}" for f in SWEEP_SHARES) + " %% of the tokens "
                    "decided; never below the contrastive floor)")
    ap.add_argument("--prompts", type=Path, default=None, help="prompt file (CLIP score only)")
    ap.add_argument("--objects", default="1,2", help="Shapes World prompt sets: 1, 2 or 1,2")
    ap.add_argument("--n-prompts", type=int, default=200)
    ap.add_argument("--prompt-seed", type=int, default=EVAL_SEED)
    ap.add_argument("--clip-arch", default="")
    ap.add_argument("--clip-weights", type=Path, default=None)
    add_reranker_args(ap)
    ap.add_argument("--staged", action="append", default=[], metavar="K:SHARE/KEPT,...",
                    help="SAD in stages, e.g. 9:0.25/3,0.75/1 = K = 9, keep 3 at 25 %% decided, the best at 75 %% "
                         "(repeatable)")
    ap.add_argument("--timing-prompts", type=int, default=16, help="prompts decoded per setting for timing (0 = skip)")
    ap.add_argument("--quick", action="store_true", help="8 prompts, 4 timing prompts (smoke runs)")
    return ap.parse_args(argv)


# Shares of decided tokens swept by default: from the contrastive floor (25 % visible, what the
# encoder was trained on) up; the curve is what chooses a model's `sad_decision_share`.
SWEEP_SHARES = (0.25, 0.375, 0.5, 0.625, 0.75)


def setting_fields(s: Setting, num_steps: int, seq_len: int) -> dict:
    """A setting's decision as a results row states it: its decision step(s), the share of tokens
    decided when the winner is picked, and for SAD in stages every stage (step, share, kept)."""
    stages = s.stages()
    out = {"decision_step": s.decision_step if stages else None,
           "fraction_decided": fraction_decided(stages[-1][0], num_steps, seq_len) if stages else None,
           "num_kept": None, "stages": None}
    if isinstance(s.decision_step, tuple) or s.num_kept is not None:
        out["num_kept"] = [kept for _, kept in stages]
        out["stages"] = [{"decision_step": d, "fraction_decided": fraction_decided(d, num_steps, seq_len), "kept": kept}
                         for d, kept in stages]
    return out


def decision_steps_for_shares(num_steps: int, seq_len: int, shares=SWEEP_SHARES) -> list[int]:
    """The distinct decision steps of the shares (the first step with that share decided) that leave
    a decision before the last step, increasing."""
    from dream_core.request import decision_step_for_share

    steps = {decision_step_for_share(f, num_steps, seq_len) for f in shares}
    return sorted(s for s in steps if 1 <= s < num_steps)


def add_reranker_args(ap: argparse.ArgumentParser) -> None:
    """The external reranker of `Setting(k, rerank=True)`: an open_clip model or a DREAM model directory."""
    ap.add_argument("--reranker-arch", default="", help="open_clip architecture of --reranker-weights")
    ap.add_argument("--reranker-weights", type=Path, default=None, help="local open_clip weights file")
    ap.add_argument("--reranker-model", type=Path, default=None,
                    help="a DREAM model directory whose joint space scores the finished candidates (e.g. trained "
                         "with the contrastive-only shapes-clip recipe)")


def measured_models(pipe: DreamPipeline, args: argparse.Namespace) -> list[DreamPipeline | Path]:
    """The models a run measures, for its results' fingerprints: the generator, and the reranker
    when it is a DREAM model directory (an open_clip reranker is named by its weights file)."""
    return [pipe] if args.reranker_model is None else [pipe, args.reranker_model]


def reranker_from_args(args: argparse.Namespace, device) -> Reranker | None:
    """The reranker the flags name (loaded, so a bad path fails before any generation), or None."""
    open_clip_flags = args.reranker_weights is not None or bool(args.reranker_arch)
    if open_clip_flags and args.reranker_model is not None:
        raise ValueError("--reranker-model and --reranker-arch/--reranker-weights name two rerankers; give one")
    if args.reranker_model is not None:
        if not Path(args.reranker_model).is_dir():
            raise ValueError(f"--reranker-model {args.reranker_model} is not a model directory")
        return DreamReranker(args.reranker_model, device)
    if open_clip_flags:
        if args.reranker_weights is None:
            raise ValueError("--reranker-arch needs --reranker-weights (a local open_clip weights file)")
        return load_open_clip(args.reranker_arch, args.reranker_weights, device)
    return None


def reranker_description(args: argparse.Namespace) -> dict | None:
    if args.reranker_model is not None:
        return {"kind": "dream", "model": str(args.reranker_model)}
    if args.reranker_weights is not None:
        return {"kind": "open_clip", "arch": args.reranker_arch, "weights": str(args.reranker_weights)}
    return None


def run_settings(pipe, prompts: list[str], settings: list[Setting], sampler, seed: int, batch_size: int,
                 reranker: Reranker | None, n_timing: int) -> tuple[GenerationRun, dict[Setting, dict]]:
    """Quality from one shared decoding trunk for all settings; speed from decoding the first
    `n_timing` prompts once per setting on its own, as a user would: seconds and images per second,
    and `row_steps_per_image` (decoder forwards x candidate rows actually run)."""
    seeds = prompt_seeds(len(prompts), seed)
    run = pipe.generate_batch(prompts, seeds, settings, sampler, batch_size, reranker, progress=True)
    timing = {}
    m = min(n_timing, len(prompts))
    for s in settings if m else []:
        t = pipe.generate_batch(prompts[:m], seeds[:m], [s], sampler, batch_size, reranker)
        per = t.seconds / m
        timing[s] = {"seconds_per_image": per, "images_per_second": 1.0 / per if per else None,
                     "row_steps_per_image": t.row_steps / m}
    return run, timing


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    ks = parse_int_list(args.k, "--k")
    if any(k < 1 for k in ks):
        raise ValueError(f"--k entries must be >= 1, got {ks}")
    n = 8 if args.quick else args.n_prompts
    n_timing = min(4, args.timing_prompts) if args.quick else args.timing_prompts
    if n < 1 or n_timing < 0:
        raise ValueError("--n-prompts must be >= 1 and --timing-prompts >= 0")
    if args.prompts is not None and args.clip_weights is None:
        raise ValueError("--prompts (outside the Shapes World) needs --clip-arch/--clip-weights to measure anything")
    # Local weights are checked (and loaded) before anything is generated.
    pipe = load_pipeline(args.model, args.device, args.threads)
    scorer = load_open_clip(args.clip_arch, args.clip_weights, pipe.device) if args.clip_weights else None
    reranker = reranker_from_args(args, pipe.device)
    sampler = sampler_from_args(args, pipe)
    steps, seq_len = sampler.num_inference_steps, pipe.config.seq_len
    decision_steps = (parse_int_list(args.decision_steps, "--decision-steps") if args.decision_steps
                      else decision_steps_for_shares(steps, seq_len))
    settings = sweep_settings(ks, decision_steps, reranker is not None)
    settings += [parse_staged(text, steps, seq_len) for text in args.staged]

    if args.prompts is not None:
        sets = {"prompts": read_prompts(args.prompts)[:n]}
    else:
        objects = parse_objects(args.objects)
        sets = {f"{o}-object": prompt_set(o, n, args.prompt_seed) for o in objects}

    results: dict = {"meta": run_metadata(pipe, args, models=measured_models(pipe, args)),
                     "reranker": reranker_description(args),
                     "decision_steps": decision_steps, "ks": ks,
                     "num_inference_steps": steps, "rows": []}
    for set_name, prompts in sets.items():
        run, timing = run_settings(pipe, prompts, settings, sampler, args.seed, args.batch_size, reranker, n_timing)
        for s in settings:
            images = run.results[s].images
            row = {"set": set_name, "setting": s.name, "k": s.num_candidates, **setting_fields(s, steps, seq_len),
                   "external_reranker": s.rerank, "n": len(prompts)}
            if args.prompts is None:
                report = judge_images(images, prompts)
                row.update(faithfulness=report.rate, failures=report.failures)
            if scorer is not None:
                row["clip_score"] = float(clip_scores(scorer, images, prompts).mean())
            row.update(timing.get(s, {}))
            results["rows"].append(row)

    print(markdown_table(results["rows"]))
    metric = "faithfulness" if args.prompts is None else "clip_score"
    series = {}
    for set_name in sets:
        rows = [r for r in results["rows"] if r["set"] == set_name]
        base = next((r[metric] for r in rows if r["k"] == 1), None)
        for d in decision_steps:
            series[f"{set_name} SAD step {d} ({fraction_decided(d, steps, seq_len):.0%} decided)"] = [
                base if k == 1 else next((r[metric] for r in rows if r["k"] == k and r["decision_step"] == d), None)
                for k in ks]
        if reranker is not None:
            series[f"{set_name} external reranker"] = [
                base if k == 1 else next((r[metric] for r in rows if r["k"] == k and r["external_reranker"]), None)
                for k in ks]
    args.out.mkdir(parents=True, exist_ok=True)
    plot_lines(args.out / "plot.png", ks, series, "K (candidates)", metric.replace("_", " "),
               f"SAD sweep ({steps} steps)", ylim=(0, 1) if metric == "faithfulness" else None, xticks=ks)
    write_json(args.out / "results.json", results)
    return results


def markdown_table(rows: list[dict]) -> str:
    cols = [("set", "set"), ("setting", "setting"), ("fraction_decided", "decided at decision"),
            ("faithfulness", "faithfulness"), ("clip_score", "CLIP score"), ("seconds_per_image", "s / image"),
            ("images_per_second", "images / s"), ("row_steps_per_image", "row-steps / image")]
    cols = [(k, h) for k, h in cols if any(r.get(k) is not None for r in rows)]

    def fmt(key: str, value) -> str:
        if value is None:
            return "-"
        if key in ("faithfulness", "fraction_decided"):
            return f"{value:.1%}"
        if isinstance(value, float):
            return f"{value:.3g}"
        return str(value)

    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(k, r.get(k)) for k, _ in cols) + " |" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    run_cli(main)
