"""What a critic can know at SAD's decision step, on the Shapes World.

SAD bets that a candidate's future shows in its partial latent. This measures how much of the
final verdict is knowable at each decision step: K candidates per prompt (shared order) are
decoded to the end and judged, and at every decision step three critics choose among them:
- SAD as the paper: the model's joint space on the partial latent (`alignment_scores`);
- the same joint space on the model's one-step completion of each candidate
  (`sampling.complete_in_one_step`: every undecided token sampled at once);
- the exact judge on that completion's pixels: the best any critic of that guess could do.
Each choice's final faithfulness is reported with its paired gain over K = 1 (SAD's first
candidate) and against a random candidate and best-of-K by the judge. The guesses draw their own
noise, so the decoding is exactly what SAD would decode.

    python -m bench.sad_lookahead --objects 2 --n-prompts 200 --out bench/results/sad_lookahead
"""

from __future__ import annotations

import argparse

import torch

from bench.common import RESULTS, command_line, markdown_table
from bench.paper_sad_curve import setup_sweep
from dream_core.masking import fraction_decided
from dream_core.sampling import candidate_generators, complete_in_one_step
from dream_core.semantic_decoding import alignment_scores, rank_candidates, semantic_decode
from training.evaluate.cli import add_model_args, add_sampler_args, run_cli, run_metadata, write_json
from training.evaluate.faithfulness import judge_images, prompt_set
from training.evaluate.sets import EVAL_SEED, prompt_seeds
from training.evaluate.stats import format_difference, format_rate, paired_difference, rate_with_interval

CRITICS = {"partial": "SAD: joint space on the partial latent",
           "completion": "joint space on the one-step completion",
           "completion_judge": "the judge on the one-step completion"}
GUESS_SEED = 7_777_777  # the guesses' own noise (rows never share it with decoding)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap, out_default=RESULTS / "sad_lookahead")
    add_sampler_args(ap)
    ap.add_argument("--k", type=int, default=9, help="candidates per prompt")
    ap.add_argument("--shares", default="0.375,0.625,0.875", help="shares of tokens decided at the decision")
    ap.add_argument("--objects", default="2", help="Shapes World prompt sets: 1, 2 or 1,2")
    ap.add_argument("--n-prompts", type=int, default=200)
    ap.add_argument("--prompt-seed", type=int, default=EVAL_SEED)
    return ap.parse_args(argv)


@torch.inference_mode()
def decode_and_score(pipe, prompts: list[str], seeds: list[int], k: int, decision_steps: list[int], req) -> dict:
    """One chunk of prompts: every critic's scores [n, K] per decision step and the final verdicts [n, K]."""
    model, n = pipe.model, len(prompts)
    text, text_emb = pipe.batch_conditions(prompts, req.negative_prompt, req.guidance_scale != 1.0, k)
    row_emb = text_emb[text.row_prompt.to(pipe.device)]
    row_text = [p for p in prompts for _ in range(k)]
    scores: dict[int, dict[str, torch.Tensor]] = {}

    def critics(state, partial: torch.Tensor) -> range:
        """Beside SAD's own score, the critics of the one-step completion; every candidate is kept
        (all are decoded to the end and judged)."""
        guess_gens = [torch.Generator().manual_seed(GUESS_SEED + 1000 * state.step + r) for r in range(n * k)]
        guess = complete_in_one_step(model, state, text, guess_gens, req.guidance_scale, req.guidance_schedule,
                                     req.temperature, req.head_steps, req.head_sampler)
        completed = alignment_scores(model, guess, torch.zeros_like(state.mask), row_emb)
        with torch.autocast(pipe.device.type, enabled=False):  # the judge sees full-precision pixels
            judged = judge_images(pipe.decode_tokens(guess), row_text).verdicts
        scores[state.step] = {"partial": partial.view(n, k), "completion": completed.view(n, k).cpu(),
                              "completion_judge": torch.tensor(judged, dtype=torch.float32).view(n, k)}
        return range(n * k)

    gens = [g for s in seeds for g in candidate_generators(int(s), k)]
    with pipe.autocast():
        for done in semantic_decode(model, text, row_emb, gens, req.num_inference_steps, decision_steps,
                                    req.guidance_scale, req.guidance_schedule, req.temperature, req.head_steps,
                                    req.head_sampler, device=pipe.device, shared_order=req.shared_order, keep=critics,
                                    order_groups=n, step_events=False):
            pass
    verdicts = judge_images(pipe.decode_tokens(done.tokens), row_text).verdicts
    return {"scores": scores, "verdicts": torch.tensor(verdicts).view(n, k)}


def summarise(verdicts: torch.Tensor, scores: dict[int, dict[str, torch.Tensor]], steps: int, seq_len: int) -> dict:
    """Per decision step and critic: the chosen candidates' faithfulness and paired gain over K = 1."""
    n = verdicts.shape[0]
    k1 = verdicts[:, 0].tolist()
    out = {"n": n, "k1": rate_with_interval(int(sum(k1)), n),
           "random_candidate": float(verdicts.float().mean()),
           "best_of_k": rate_with_interval(int(verdicts.any(1).sum()), n), "points": []}
    for d in sorted(scores):
        point = {"decision_step": d, "fraction_decided": fraction_decided(d, steps, seq_len)}
        for name, sc in scores[d].items():
            chosen = [rank_candidates(row)[0] for row in sc]
            ok = [bool(verdicts[i, c]) for i, c in enumerate(chosen)]
            point[name] = {"faithfulness": rate_with_interval(sum(ok), n), "gain_over_k1": paired_difference(ok, k1)}
        out["points"].append(point)
    return out


def table(results: dict) -> str:
    rows = []
    for name, sec in results["sets"].items():
        for p in sec["points"]:
            for critic, label in CRITICS.items():
                c = p[critic]
                rows.append([name, f"{p['decision_step']} ({p['fraction_decided']:.1%})", label,
                             format_rate(c["faithfulness"]), format_difference(c["gain_over_k1"]),
                             format_rate(sec["k1"]), f"{100 * sec['random_candidate']:.1f} %",
                             format_rate(sec["best_of_k"])])
    return markdown_table(["set", "decision step (share decided)", "critic", "chosen candidate faithful",
                           "gain over K = 1 (paired 95 % CI)", "K = 1", "random candidate",
                           "best of K by the judge"], rows)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    pipe, sampler, objects, _, decision_steps = setup_sweep(args)
    steps, seq_len = sampler.num_inference_steps, pipe.config.seq_len
    req = sampler.request("a prompt", args.k, decision_steps[0]).validate(pipe.config)
    chunk = max(1, pipe.default_batch_rows() // args.k)
    results: dict = {"command": command_line(__file__, argv), "model": str(pipe.path), "meta": run_metadata(pipe, args),
                     "k": args.k, "num_inference_steps": steps, "decision_steps": decision_steps, "sets": {}}
    for o in objects:
        prompts = prompt_set(o, args.n_prompts, args.prompt_seed)
        seeds = prompt_seeds(len(prompts), args.seed)
        verdicts, scores = [], {d: {c: [] for c in CRITICS} for d in decision_steps}
        for i in range(0, len(prompts), chunk):
            part = decode_and_score(pipe, prompts[i:i + chunk], seeds[i:i + chunk], args.k, decision_steps, req)
            verdicts.append(part["verdicts"])
            for d in decision_steps:
                for c in CRITICS:
                    scores[d][c].append(part["scores"][d][c])
        merged = {d: {c: torch.cat(v) for c, v in by.items()} for d, by in scores.items()}
        results["sets"][f"{o}-object"] = summarise(torch.cat(verdicts), merged, steps, seq_len)
    print(f"\n## What a critic can know at the decision step (K = {args.k}, {steps} steps, "
          f"{args.n_prompts} prompts per set)\n")
    print(table(results))
    write_json(args.out / "results.json", results)
    return results


if __name__ == "__main__":
    run_cli(main)
