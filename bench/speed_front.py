"""Faithfulness against seconds per image: which head samplers, head steps and SAD settings are
worth their time on a model (the speed front).

Every setting is generated on the fixed Shapes World evaluation set of `bench.shapes_eval`
(`faithfulness.prompt_set`, seed `sets.EVAL_SEED`, prompt i with seed + 64 i) and judged exactly:
one- and two-object faithfulness with 95 % Wilson intervals, and the paired difference against
the baseline (K = 1 with the model's own head sampler and steps) on the same prompts. Speed is
measured in the same run as `training.evaluate.sad_sweep` does it: the first `--timing-prompts`
prompts decoded once per setting on its own (SAD pruning as a user's run prunes), seconds per
image on this device. The settings:

- the head: every `--head-samplers` x `--head-steps` at K = 1 (plus the model's default head);
- plain SAD: K = `--sad-k` deciding at each of `--sad-shares` of the tokens decided (default: the
  model's `sad_decision_share`);
- SAD in stages: each `--staged K:share/kept,...` (e.g. 9:0.25/3,0.75/1: keep 3 at 25 % decided,
  the best one at 75 %);

SAD runs with `--sad-head-sampler` / `--sad-head-steps` (default: the model's). Settings that
share a head share one decoding trunk per prompt (`DreamPipeline.generate_batch`). Writes
results.json (with the run's metadata, the weights' fingerprint among it) and prints the
faithfulness-vs-seconds table, the Pareto front marked (no other setting is both at least as
faithful, on the mean of the sets, and at least as fast). Timings on a shared machine vary: read
the front together with the intervals.

    python -m bench.speed_front                                   # bundled model, 200 prompts per set
    python -m bench.speed_front --quick                           # smoke run
    python -m bench.speed_front --head-samplers ddim,dpm-solver++ --head-steps 10,25 \\
        --sad-shares 0.5,0.875 --staged 9:0.5/3,0.875/1 --sad-head-sampler dpm-solver++ --sad-head-steps 25
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from bench.common import RESULTS, markdown_table
from bench.shapes_eval import SAD_K
from dream_core.request import (HEAD_SAMPLERS, MAX_GUIDANCE_SCALE, MAX_TEMPERATURE, SamplerSettings,
                                decision_step_for_share, sampler_defaults)
from dream_core.semantic_decoding import Setting
from training.evaluate.cli import (add_model_args, load_pipeline, parse_fractions, parse_head_samplers, parse_int_list,
                                   parse_staged, run_cli, run_metadata, write_json)
from training.evaluate.faithfulness import judge_images, parse_objects, prompt_set
from training.evaluate.sad_sweep import run_settings, setting_fields
from training.evaluate.sets import EVAL_SEED
from training.evaluate.stats import format_difference, format_rate, paired_difference, rate_with_interval

#: Head steps tried with every sampler by default, beside the model's own default head.
HEAD_STEPS = (10, 25, 50)


@dataclass(frozen=True)
class Point:
    """One setting of the front: how the image is chosen (`setting`) and the head that samples it."""

    setting: Setting
    head_sampler: str
    head_steps: int


def front_points(args: argparse.Namespace, config, num_steps: int) -> list[Point]:
    """The settings the flags ask for, without repeats: the baseline (K = 1 with the model's head)
    first, and K = 1 with SAD's head when there is SAD (its gain is measured against it)."""
    defaults = sampler_defaults(config)
    model_head = (defaults["head_sampler"], defaults["head_steps"])
    points = [Point(Setting(1), *model_head)]
    points += [Point(Setting(1), sampler, steps) for sampler in args.head_samplers for steps in args.head_steps]
    sad_head = (args.sad_head_sampler or model_head[0], args.sad_head_steps or model_head[1])
    sad = [parse_staged(text, num_steps, config.seq_len) for text in args.staged]
    if args.sad_k > 1:
        shares = (parse_fractions(args.sad_shares, "--sad-shares", allow_zero=False) if args.sad_shares
                  else [config.sad_decision_share])
        steps = sorted({decision_step_for_share(f, num_steps, config.seq_len) for f in shares})
        sad = [Setting(args.sad_k, d) for d in steps] + sad
    if sad:  # SAD's gain is over K = 1 with its head
        points += [Point(s, *sad_head) for s in sad] + [Point(Setting(1), *sad_head)]
    return list(dict.fromkeys(points))


def pareto_front(xs: list[float], ys: list[float]) -> list[bool]:
    """Whether each (seconds, faithfulness) point is on the front: no other point is at least as
    fast and at least as faithful, and better in one of the two."""
    return [not any(xq <= xp and yq >= yp and (xq < xp or yq > yp) for xq, yq in zip(xs, ys))
            for xp, yp in zip(xs, ys)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap, out_default=RESULTS / "speed_front")
    ap.add_argument("--head-samplers", default=",".join(HEAD_SAMPLERS),
                    help=f"head samplers tried at K = 1, comma-separated of {','.join(HEAD_SAMPLERS)}")
    ap.add_argument("--head-steps", default=",".join(map(str, HEAD_STEPS)),
                    help="head steps tried with every head sampler at K = 1, comma-separated")
    ap.add_argument("--sad-k", type=int, default=SAD_K, help="candidates of plain SAD (1 = no plain SAD)")
    ap.add_argument("--sad-shares", default="", help="shares of tokens decided at plain SAD's decision, "
                    "comma-separated (default: the model's sad_decision_share)")
    ap.add_argument("--staged", action="append", default=[], metavar="K:SHARE/KEPT,...",
                    help="SAD in stages, e.g. 9:0.25/3,0.75/1 (repeatable)")
    ap.add_argument("--sad-head-sampler", default=None, choices=HEAD_SAMPLERS,
                    help="the head sampler of the SAD settings (default: the model's)")
    ap.add_argument("--sad-head-steps", type=int, default=None, help="the head steps of the SAD settings "
                    "(default: the model's)")
    ap.add_argument("--steps", type=int, default=None, help="decoding steps (default: one token per step)")
    ap.add_argument("--cfg", type=float, default=None,
                    help=f"CFG scale (0 .. {MAX_GUIDANCE_SCALE}; default: the model's)")
    ap.add_argument("--temperature", type=float, default=None,
                    help=f"0 .. {MAX_TEMPERATURE} (default: the model's default_temperature)")
    ap.add_argument("--objects", default="1,2", help="Shapes World prompt sets: 1, 2 or 1,2")
    ap.add_argument("--n-prompts", type=int, default=200, help="prompts per set")
    ap.add_argument("--eval-seed", type=int, default=EVAL_SEED, help="the fixed evaluation set's seed")
    ap.add_argument("--timing-prompts", type=int, default=16, help="prompts decoded per setting for timing")
    ap.add_argument("--batch-size", type=int, default=0, help="prompts decoded together (0 = automatic)")
    ap.add_argument("--quick", action="store_true", help="8 prompts per set, 2 timing prompts (smoke runs)")
    args = ap.parse_args(argv)
    if args.quick:
        args.n_prompts, args.timing_prompts = min(args.n_prompts, 8), min(args.timing_prompts, 2)
    if args.n_prompts < 1 or args.timing_prompts < 1:
        ap.error("--n-prompts and --timing-prompts must be >= 1")
    try:
        args.head_samplers = parse_head_samplers(args.head_samplers, "--head-samplers")
    except ValueError as err:
        ap.error(str(err))
    args.head_steps = parse_int_list(args.head_steps, "--head-steps")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    pipe = load_pipeline(args.model, args.device, args.threads)
    config = pipe.config
    steps = args.steps if args.steps is not None else config.seq_len
    points = front_points(args, config, steps)
    sets = {f"{o}-object": prompt_set(o, args.n_prompts, args.eval_seed) for o in parse_objects(args.objects)}

    # Points that share a head share a decoding trunk per prompt. Every point is checked as a
    # request first, so a bad flag fails before anything is generated.
    heads: dict[tuple[str, int], list[Point]] = {}
    for p in points:
        heads.setdefault((p.head_sampler, p.head_steps), []).append(p)
        sampler = SamplerSettings(steps, args.cfg, temperature=args.temperature, head_steps=p.head_steps,
                                  head_sampler=p.head_sampler)
        sampler.request("x", p.setting.num_candidates, p.setting.decision_step, num_kept=p.setting.num_kept
                        ).validate(config)
    rows: dict[Point, dict] = {}
    verdicts: dict[tuple[Point, str], list[bool]] = {}
    for (head_sampler, head_steps), group in heads.items():
        sampler = SamplerSettings(steps, args.cfg, temperature=args.temperature, head_steps=head_steps,
                                  head_sampler=head_sampler)
        for p in group:
            rows[p] = {"setting": p.setting.name, "head_sampler": head_sampler, "head_steps": head_steps,
                       "k": p.setting.num_candidates, **setting_fields(p.setting, steps, config.seq_len),
                       "sets": {}}
        for set_name, prompts in sets.items():
            run, timing = run_settings(pipe, prompts, [p.setting for p in group], sampler, args.eval_seed,
                                       args.batch_size, None, args.timing_prompts)
            for p in group:
                report = judge_images(run.results[p.setting].images, prompts)
                verdicts[p, set_name] = report.verdicts
                rows[p]["sets"][set_name] = {**rate_with_interval(report.faithful, report.n), **timing[p.setting]}

    # Paired on the same prompts and seeds: per set and pooled over the sets, against the baseline,
    # and for SAD against K = 1 with the same head (SAD's own gain; K = 1's image is its candidate 0).
    baseline = points[0]

    def paired(p: Point, q: Point) -> tuple[dict, dict]:
        per_set = {name: paired_difference(verdicts[p, name], verdicts[q, name]) for name in sets}
        pooled = paired_difference([v for name in sets for v in verdicts[p, name]],
                                   [v for name in sets for v in verdicts[q, name]])
        return per_set, pooled

    for p, row in rows.items():
        per_set, row["pooled_gain_over_baseline"] = (None, None) if p == baseline else paired(p, baseline)
        for set_name, entry in row["sets"].items():
            entry["gain_over_baseline"] = None if per_set is None else per_set[set_name]
        k1 = Point(Setting(1), p.head_sampler, p.head_steps)
        row["pooled_gain_over_k1"] = paired(p, k1)[1] if p.setting.num_candidates > 1 else None
        measured = row["sets"].values()
        row["faithfulness"] = sum(e["rate"] for e in measured) / len(measured)
        row["seconds_per_image"] = sum(e["seconds_per_image"] for e in measured) / len(measured)
    ordered = [rows[p] for p in points]
    for row, on_front in zip(ordered, pareto_front([r["seconds_per_image"] for r in ordered],
                                                   [r["faithfulness"] for r in ordered])):
        row["pareto"] = on_front

    results = {"meta": run_metadata(pipe, args), "num_inference_steps": steps, "eval_seed": args.eval_seed,
               "n_prompts": args.n_prompts, "timing_prompts": args.timing_prompts,
               "baseline": f"{ordered[0]['setting']}, head {ordered[0]['head_sampler']} x {ordered[0]['head_steps']}",
               "points": ordered}
    print(f"\n## Speed front of {pipe.path} ({steps} decoding steps, {args.n_prompts} prompts per set, "
          f"seed {args.eval_seed}; {args.timing_prompts} prompts timed per setting on {pipe.device})\n")
    print(front_table(results))
    write_json(Path(args.out) / "results.json", results)
    return results


def front_table(results: dict) -> str:
    """Faithfulness (95 % intervals), the paired gain over the baseline per set, SAD's pooled
    gain over K = 1 with its head, seconds per image, and the Pareto front, fastest first."""
    points = sorted(results["points"], key=lambda r: r["seconds_per_image"])
    set_names = list(points[0]["sets"]) if points else []
    headers = ["setting", "head"] + [f"{s} faithful" for s in set_names] + [f"{s} vs baseline" for s in set_names]
    headers += ["SAD gain over K = 1 (pooled)", "s / image", "front"]
    rows = []
    for r in points:
        where = ""
        if r["stages"]:
            kept = (f"{100 * st['fraction_decided']:.0f} % -> {st['kept']}" for st in r["stages"])
            where = " (" + ", ".join(kept) + ")"
        elif r["fraction_decided"] is not None:
            where = f" ({100 * r['fraction_decided']:.0f} % decided)"
        rows.append([r["setting"] + where, f"{r['head_sampler']} x {r['head_steps']}"]
                    + [format_rate(r["sets"][s]) for s in set_names]
                    + [format_difference(r["sets"][s]["gain_over_baseline"]) for s in set_names]
                    + [format_difference(r["pooled_gain_over_k1"]), f"{r['seconds_per_image']:.3f}",
                       "**front**" if r["pareto"] else ""])
    return (f"Baseline: {results['baseline']}; gains are paired (same prompts and seeds), 95 % intervals.\n\n"
            + markdown_table(headers, rows))


if __name__ == "__main__":
    run_cli(main)
