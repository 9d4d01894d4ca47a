"""The paper's Table 17 / Table 6 at toy scale: SAD with K = 1, 2, 4, 9, 16 candidates under a fixed
budget of network evaluations, beside an external reranker, on the Shapes World.

Decision step = budget // K (the K candidates share the budget up to the decision; `--decision-rule
total-nfe` instead keeps the image's whole cost within the budget, see `DECISION_RULES`).
NFE, counted exactly as `GenerationRun.row_steps` counts the work (decoder forwards x candidate
rows; a CFG step's conditional and unconditional halves count once, the diffusion head's inner
steps are inside each forward):
- K = 1: S (one row, every step);
- SAD K, decision step d: K x d (all K rows up to the decision) + (S - d) (the winner to the end);
- external reranker K: K x S (every candidate to the end), then the reranker scores the K images.
The measured `row_steps_per_image` of the timing runs is printed beside the formula.

The external-reranker column scores the K finished images with `--reranker-model DIR`: a DREAM
model directory trained with the contrastive-only `shapes-clip` recipe (its own VAE, encoder with
nothing masked and text tower; `rerankers.DreamReranker`), or an open_clip model
(`--reranker-arch` + `--reranker-weights`). Faithfulness is the exact Shapes World judge with a 95 %
Wilson interval; images/s is measured by decoding `--timing-prompts` prompts once per setting.

    python -m bench.paper_table17 --model assets/dream-shapes --reranker-model runs/t17/clip-model \\
        --n-prompts 500 --out bench/results/table17
"""

from __future__ import annotations

import argparse

from bench.common import RESULTS, command_line, markdown_table
from dream_core.masking import fraction_decided
from dream_core.semantic_decoding import Setting
from training.evaluate.cli import (add_model_args, add_sampler_args, load_pipeline, parse_int_list,
                                   run_cli, run_metadata, sampler_from_args, write_json)
from training.evaluate.faithfulness import judge_images, parse_objects, prompt_set
from training.evaluate.plotting import plot_lines
from training.evaluate.sad_sweep import (add_reranker_args, measured_models, reranker_description,
                                         reranker_from_args, run_settings)
from training.evaluate.sets import EVAL_SEED
from training.evaluate.stats import compare, format_rate, rate_with_interval

DEFAULT_KS = "1,2,4,9,16"


# How the budget sets the decision step d for K candidates and S steps:
# - "budget-over-k" (default): d = budget // K, the K rows share `budget` evaluations up to the decision;
# - "total-nfe": d = (budget - S) // (K - 1), so that the image's whole cost K x d + (S - d) stays within
#   `budget` (the reading of the paper's Tables 6 and 17 that fits their numbers: 128 NFE with 64 steps
#   gives K = 9 the decision at step 8, and K = 2 with the external reranker exactly 2 x 64).
DECISION_RULES = ("budget-over-k", "total-nfe")


def decision_step(k: int, budget: int, steps: int, rule: str = DECISION_RULES[0]) -> int:
    if rule == "budget-over-k":
        return budget // k
    if rule == "total-nfe":
        return (budget - steps) // (k - 1)
    raise ValueError(f"--decision-rule must be one of {', '.join(DECISION_RULES)}, got {rule!r}")


def default_budget(steps: int, rule: str) -> int:
    return steps if rule == "budget-over-k" else 2 * steps


def budget_settings(ks: list[int], budget: int, steps: int, rule: str = DECISION_RULES[0]) -> list[Setting]:
    """K = 1 plain decoding; every other K is SAD at the rule's decision step, which must leave a
    decision before the last step (1 .. steps - 1)."""
    settings = []
    for k in ks:
        if k < 1:
            raise ValueError(f"--k entries must be >= 1, got {k}")
        if k == 1:
            settings.append(Setting(1))
            continue
        d = decision_step(k, budget, steps, rule)
        if not 1 <= d <= steps - 1:
            lo, hi = ((k, k * (steps - 1)) if rule == "budget-over-k"
                      else (steps + (k - 1), steps + (k - 1) * (steps - 1)))
            formula = "budget // K" if rule == "budget-over-k" else "(budget - S) // (K - 1)"
            raise ValueError(f"--budget {budget} gives K={k} the decision step {d} ({formula}), but it must be in "
                             f"1..{steps - 1} for {steps} decoding steps; use a budget in {lo}..{hi}")
        settings.append(Setting(k, d))
    return list(dict.fromkeys(settings))


def nfe_per_image(setting: Setting, steps: int) -> int:
    """Decoder forwards x candidate rows spent on one image (see the module docstring)."""
    k = setting.num_candidates
    if k == 1:
        return steps
    if setting.rerank:
        return k * steps
    return k * setting.decision_step + (steps - setting.decision_step)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap, out_default=RESULTS / "table17")
    add_sampler_args(ap)
    ap.add_argument("--k", default=DEFAULT_KS, help="numbers of candidates, comma-separated")
    ap.add_argument("--budget", type=int, default=0,
                    help="network evaluations: with budget-over-k, shared by the K candidates before the decision "
                         "(decision step = budget // K; default S); with total-nfe, the image's whole cost "
                         "(decision step = (budget - S) // (K - 1); default 2 S)")
    ap.add_argument("--decision-rule", default=DECISION_RULES[0], choices=DECISION_RULES)
    ap.add_argument("--objects", default="1,2", help="Shapes World prompt sets: 1, 2 or 1,2")
    ap.add_argument("--n-prompts", type=int, default=200)
    ap.add_argument("--prompt-seed", type=int, default=EVAL_SEED)
    ap.add_argument("--timing-prompts", type=int, default=16, help="prompts decoded per setting for images/s (0 = skip)")
    add_reranker_args(ap)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    ks = parse_int_list(args.k, "--k")
    objects = parse_objects(args.objects)
    if args.n_prompts < 1 or args.timing_prompts < 0:
        raise ValueError("--n-prompts must be >= 1 and --timing-prompts >= 0")
    if args.budget < 0:
        raise ValueError(f"--budget must be >= 1 (or 0 = the number of decoding steps), got {args.budget}")
    pipe = load_pipeline(args.model, args.device, args.threads)
    sampler = sampler_from_args(args, pipe)
    steps, seq_len = sampler.num_inference_steps, pipe.config.seq_len
    budget = args.budget or default_budget(steps, args.decision_rule)
    settings = budget_settings(ks, budget, steps, args.decision_rule)  # checked before the reranker loads
    reranker = reranker_from_args(args, pipe.device)
    if reranker is not None:
        settings += [Setting(k, rerank=True) for k in ks if k > 1]

    results: dict = {"command": command_line(__file__, argv), "model": str(pipe.path),
                     "reranker": reranker_description(args), "meta": run_metadata(pipe, args, models=measured_models(pipe, args)),
                     "num_inference_steps": steps, "budget": budget, "decision_rule": args.decision_rule, "ks": ks,
                     "nfe": "decoder forwards x candidate rows per image: K = 1: S; SAD: K x d + (S - d); "
                            "reranker: K x S", "rows": []}
    for o in objects:
        prompts = prompt_set(o, args.n_prompts, args.prompt_seed)
        run, timing = run_settings(pipe, prompts, settings, sampler, args.seed, args.batch_size, reranker,
                                   args.timing_prompts)
        for s in settings:
            report = judge_images(run.results[s].images, prompts)
            sad = s.num_candidates > 1 and not s.rerank
            results["rows"].append({
                "set": f"{o}-object", "setting": s.name, "k": s.num_candidates,
                "selection": "none" if s.num_candidates == 1 else ("external reranker" if s.rerank else "SAD"),
                "decision_step": s.decision_step if sad else None,
                "fraction_decided": fraction_decided(s.decision_step, steps, seq_len) if sad else None,
                "nfe_per_image": nfe_per_image(s, steps), "faithfulness": rate_with_interval(report.faithful, report.n),
                **timing.get(s, {})})

    rule = "budget // K" if args.decision_rule == "budget-over-k" else "(budget - S) // (K - 1)"
    print(f"\n## Table 17 at toy scale: SAD under a budget of {budget} evaluations (decision step = {rule}), "
          f"{steps} steps, {args.n_prompts} prompts per set\n")
    print(table(results["rows"]))
    results["findings"] = findings(results["rows"])
    print("\n" + "\n".join(f"- {f}" for f in results["findings"]))
    series, bands = {}, {}
    for o in objects:
        for sel in ("SAD", "external reranker"):
            rows = {r["k"]: r for r in results["rows"] if r["set"] == f"{o}-object" and r["selection"] in (sel, "none")}
            if not any(r["selection"] == sel for r in rows.values()):
                continue
            name = f"{o}-object, {sel}"
            series[name] = [rows[k]["faithfulness"]["rate"] if k in rows else None for k in ks]
            bands[name] = [rows[k]["faithfulness"]["ci95"] if k in rows else None for k in ks]
    plot_lines(args.out / "plot.png", ks, series, "K (candidates)", "faithfulness (95 % interval)",
               f"SAD under a fixed budget ({budget} evaluations, decision step = {rule})", xticks=ks,
               intervals=bands)
    write_json(args.out / "results.json", results)
    return results


def findings(rows: list[dict]) -> list[str]:
    """Per set: the best SAD and the best reranker setting against K = 1, in one sentence each."""
    out = []
    for name in dict.fromkeys(r["set"] for r in rows):
        base = next(r for r in rows if r["set"] == name and r["k"] == 1)
        for sel in ("SAD", "external reranker"):
            cands = [r for r in rows if r["set"] == name and r["selection"] == sel]
            if cands:
                best = max(cands, key=lambda r: r["faithfulness"]["rate"])
                out.append(f"{name}: " + compare(f"{sel} K={best['k']}", best["faithfulness"], "K=1",
                                                 base["faithfulness"]))
    return out


def table(rows: list[dict]) -> str:
    def opt(v, f):
        return "-" if v is None else f(v)

    return markdown_table(
        ["set", "K", "selection", "decision step (share decided)", "NFE / image (measured)", "faithfulness [95 % CI]",
         "images / s"],
        [[r["set"], r["k"], r["selection"],
          "-" if r["decision_step"] is None else f"{r['decision_step']} ({r['fraction_decided']:.1%})",
          f"{r['nfe_per_image']} ({opt(r.get('row_steps_per_image'), lambda v: f'{v:g}')})",
          format_rate(r["faithfulness"]), opt(r.get("images_per_second"), lambda v: f"{v:.3g}")] for r in rows])


if __name__ == "__main__":
    run_cli(main)
