"""The decision-step curve: SAD with K = 9 against the share of tokens decided at the decision,
faithfulness AND the critic's gap, on the Shapes World (the curve that chooses a model's
`sad_decision_share`).

For each share (default 12.5 % .. 87.5 % in steps of 12.5 %: `sad_sweep.SWEEP_SHARES` and one step
beyond each end) the decision step is the first with that share decided (cosine schedule). One
decoding trunk per prompt serves every setting: K = 1, SAD at every decision step, and all K
candidates decoded to the end and judged (`critic.JudgeReranker`), so every point is measured on
the very same K candidates. Per point: SAD's faithfulness (95 % Wilson interval), best-of-K by the
judge, the gap between them, and the within-prompt correlation of SAD's score with the final
verdict (`critic.critic_stats`, as `bench/shapes_eval.py` sections 6 and 7).

    python -m bench.paper_sad_curve --model assets/dream-shapes --n-prompts 300 --out bench/results/sad_curve
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.common import RESULTS, command_line, markdown_table
from dream_core.masking import fraction_decided
from dream_core.semantic_decoding import Setting
from training.evaluate.cli import (add_model_args, add_sampler_args, load_pipeline, parse_fractions,
                                   run_cli, run_metadata, sampler_from_args, write_json)
from training.evaluate.critic import JudgeReranker, critic_stats
from training.evaluate.faithfulness import judge_images, parse_objects, prompt_set
from training.evaluate.plotting import plot_lines
from training.evaluate.sad_sweep import SWEEP_SHARES, decision_steps_for_shares
from training.evaluate.sets import EVAL_SEED, prompt_seeds
from training.evaluate.stats import (compare, compare_paired, format_difference, format_rate,
                                    paired_difference, rate_with_interval)

CURVE_SHARES = (0.125, *SWEEP_SHARES, 0.875)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap, out_default=RESULTS / "sad_curve")
    add_sampler_args(ap)
    ap.add_argument("--k", type=int, default=9, help="SAD candidates")
    ap.add_argument("--shares", default=",".join(f"{f:g}" for f in CURVE_SHARES),
                    help="shares of tokens decided at the decision, comma-separated")
    ap.add_argument("--objects", default="1,2", help="Shapes World prompt sets: 1, 2 or 1,2")
    ap.add_argument("--n-prompts", type=int, default=200)
    ap.add_argument("--prompt-seed", type=int, default=EVAL_SEED)
    return ap.parse_args(argv)


def setup_sweep(args: argparse.Namespace) -> tuple:
    """A decision-step sweep's checked flags (--shares, --objects, --k, --n-prompts) and its model:
    (pipe, sampler, prompt sets, shares, decision steps). Shared with `bench/sad_lookahead.py`."""
    shares = parse_fractions(args.shares, "--shares", allow_zero=False)
    objects = parse_objects(args.objects)
    if args.k < 2:
        raise ValueError(f"--k must be >= 2 (SAD chooses among candidates), got {args.k}")
    if args.n_prompts < 1:
        raise ValueError(f"--n-prompts must be >= 1, got {args.n_prompts}")
    pipe = load_pipeline(args.model, args.device, args.threads)
    sampler = sampler_from_args(args, pipe)
    steps, seq_len = sampler.num_inference_steps, pipe.config.seq_len
    decision_steps = decision_steps_for_shares(steps, seq_len, shares)
    if not decision_steps:
        raise ValueError(f"no decision step in 1..{steps - 1} for --shares {args.shares} with {steps} steps")
    return pipe, sampler, objects, shares, decision_steps


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    pipe, sampler, objects, shares, decision_steps = setup_sweep(args)
    steps, seq_len = sampler.num_inference_steps, pipe.config.seq_len
    sad = {d: Setting(args.k, d) for d in decision_steps}
    base, oracle = Setting(1), Setting(args.k, rerank=True)

    results: dict = {"command": command_line(__file__, argv), "model": str(pipe.path), "meta": run_metadata(pipe, args),
                     "k": args.k, "num_inference_steps": steps, "shares": shares, "decision_steps": decision_steps,
                     "model_sad_decision_share": pipe.config.sad_decision_share,
                     "min_visible_for_clip": pipe.config.min_visible_for_clip, "sets": {}}
    for o in objects:
        prompts = prompt_set(o, args.n_prompts, args.prompt_seed)
        run = pipe.generate_batch(prompts, prompt_seeds(len(prompts), args.seed), [base, *sad.values(), oracle],
                                  sampler, args.batch_size, reranker=JudgeReranker(), progress=True)
        k1 = judge_images(run.results[base].images, prompts)
        verdicts = run.results[oracle].scores
        points = []
        for d, s in sad.items():
            report = judge_images(run.results[s].images, prompts)
            stats = critic_stats(verdicts, run.results[s].scores, run.results[s].chosen)
            points.append({"decision_step": d, "fraction_decided": fraction_decided(d, steps, seq_len),
                           "faithfulness": rate_with_interval(report.faithful, report.n),
                           "gain_over_k1": paired_difference(report.verdicts, k1.verdicts), **stats})
        best = points[0]  # best-of-K and the candidates do not depend on the decision step
        results["sets"][f"{o}-object"] = {
            "n": len(prompts), "k1": rate_with_interval(k1.faithful, k1.n),
            "best_of_k": rate_with_interval(best["best_of_k_faithful"], len(prompts)),
            "candidate_rate": best["candidate_rate"], "points": points}

    print(f"\n## SAD K = {args.k} against the share of tokens decided ({steps} steps, {args.n_prompts} prompts per "
          f"set; the model's default share {pipe.config.sad_decision_share:g})\n")
    print(table(results))
    results["findings"] = findings(results)
    print("\n" + "\n".join(f"- {f}" for f in results["findings"]))
    write_plots(args.out, results)
    write_json(args.out / "results.json", results)
    return results


def findings(results: dict) -> list[str]:
    """Per set: the best decision share against K = 1, and SAD there against best-of-K by the judge."""
    out = []
    for name, sec in results["sets"].items():
        best = max(sec["points"], key=lambda p: p["faithfulness"]["rate"])
        label = f"SAD at {best['fraction_decided']:.1%} decided"
        out.append(f"{name}: " + compare_paired(label, "K=1", best["gain_over_k1"]) + "; "
                   + compare("best of K by the judge", sec["best_of_k"], label, best["faithfulness"]))
    return out


def table(results: dict) -> str:
    rows = []
    for name, sec in results["sets"].items():
        for p in sec["points"]:
            corr = p["score_verdict_correlation"]
            rows.append([name, f"{p['decision_step']} ({p['fraction_decided']:.1%})", format_rate(p["faithfulness"]),
                         format_rate(sec["k1"]), format_difference(p["gain_over_k1"]), format_rate(sec["best_of_k"]),
                         f"{100 * p['gap']:+.1f} pts",
                         "-" if corr is None else f"{corr:+.2f}", p["prompts_with_mixed_candidates"]])
    return markdown_table(["set", "decision step (share decided)", "SAD faithfulness [95 % CI]", "K = 1",
                           "SAD - K = 1 (paired 95 % CI)",
                           "best of K by the judge", "critic gap (best - SAD)", "score/verdict correlation",
                           "prompts with mixed candidates"], rows)


def write_plots(out: Path, results: dict) -> None:
    series, bands, critic = {}, {}, {}
    sets = results["sets"]
    x = sorted({p["fraction_decided"] for sec in sets.values() for p in sec["points"]})
    for name, sec in sets.items():
        by_x = {p["fraction_decided"]: p for p in sec["points"]}
        series[f"{name} SAD"] = [by_x[f]["faithfulness"]["rate"] if f in by_x else None for f in x]
        bands[f"{name} SAD"] = [by_x[f]["faithfulness"]["ci95"] if f in by_x else None for f in x]
        for key, label in (("k1", "K = 1"), ("best_of_k", "best of K by the judge")):
            series[f"{name} {label}"] = [sec[key]["rate"]] * len(x)  # references: their intervals are in the table
        critic[f"{name} critic gap"] = [by_x[f]["gap"] if f in by_x else None for f in x]
        critic[f"{name} score/verdict correlation"] = [by_x[f]["score_verdict_correlation"] if f in by_x else None
                                                       for f in x]
    k = results["k"]
    plot_lines(out / "plot.png", x, series, "share of tokens decided at the decision", "faithfulness (95 % interval)",
               f"SAD K = {k}: faithfulness against the decision step", intervals=bands)
    plot_lines(out / "plot_critic.png", x, critic, "share of tokens decided at the decision", "gap / correlation",
               f"SAD K = {k}: the critic's gap and score/verdict correlation", ylim=(-1.0, 1.0))


if __name__ == "__main__":
    run_cli(main)
