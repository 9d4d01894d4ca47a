"""The paper's Table 4 at toy scale: the masking schedule (Masking Warmup, FX, UNI, CD, and the MAR
baseline's schedule), each trained with the Shapes World recipe at the same budget and 2 seeds,
then evaluated on the fixed evaluation set.

Per (schedule, seed): `training.train.Trainer` with the schedule's recipe (`SCHEDULES`), `seed=S` and
`max_steps=--steps`, plus any `key=value` overrides given to this command (the same for every run),
in `<out>/runs/<schedule>-s<S>/`; exported with EMA weights to `<run>/model/`; evaluated with
`bench/shapes_eval.py`'s sections (linear probe per attribute, reverse-search top-1, one- and
two-object faithfulness at K = 1 and SAD K = 9 at the model's default decision step) into
`<run>/eval.json`. Aggregate: per schedule the mean over seeds, with a 95 % Wilson interval of the
rate pooled over seeds (renders or prompts x seeds: the evaluation set's sampling noise, not the
seed-to-seed training variance, so the seeds' own values are printed beside it), the ordering
per metric and whether it matches the paper's.

Chunked and resumable: rerunning the same command skips finished runs (exported and evaluated)
and continues an unfinished one from its `checkpoint-last`. `--chunk-minutes M` stops training
(saving a checkpoint) once M minutes have passed since the command started and starts nothing new
after that; an evaluation that has started runs to its end, so leave it room.

    python -m bench.paper_table4 --steps 3000 --out bench/results/table4 --chunk-minutes 50
    python -m bench.paper_table4 --steps 3000 --out bench/results/table4 --chunk-minutes 50   # continues
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

from bench.common import RESULTS, command_line, markdown_table
from bench.shapes_eval import (SAD_K, faithfulness_section, probe_section, reverse_search_section)
from dream_core.request import GenerationRequest, SamplerSettings
from training.evaluate.cli import load_pipeline, parse_int_list, run_cli, run_metadata, write_json
from training.evaluate.linear_probe import SHAPES_ATTRIBUTES
from training.evaluate.plotting import plot_bars
from training.evaluate.sets import EVAL_SEED
from training.evaluate.stats import compare, differ, format_rate, rate_with_interval

# schedule -> recipe (training/recipes.py): the same _SHAPES_COMMON, only the masking differs.
SCHEDULES = {"warmup": "shapes", "fx": "shapes-fx", "uni": "shapes-uni", "cd": "shapes-cd", "mar": "shapes-mar"}
# DREAM Table 4 (ImageNet): linear probe UNI 73.1 = CD 73.1 > WM 72.5 > FX 4.6; FID WM 4.57 < UNI 4.88
# < CD 5.80, FX N/A (unstable). Best first; a tuple is a tie. MAR is not in the paper's table.
PAPER_ORDER = {"understanding": [("uni", "cd"), "warmup", "fx"], "generation": ["warmup", "uni", "cd", "fx"]}
BUNDLED = Path(__file__).resolve().parents[1] / "assets" / "dream-shapes"
METRICS = ([f"probe {a}" for a in SHAPES_ATTRIBUTES] + ["search top-1"] + [f"search {a}" for a in SHAPES_ATTRIBUTES]
           + ["1-object K=1", f"1-object SAD K={SAD_K}", "2-object K=1", f"2-object SAD K={SAD_K}"])
# Printed beside the metrics, never ranked: every run shares the bundled VAE and the same renders.
CEILINGS = ["1-object VAE ceiling", "2-object VAE ceiling"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, required=True, help="training steps of every run (the same budget)")
    ap.add_argument("--out", type=Path, default=RESULTS / "table4", help="runs, models and results.json + plot.png")
    ap.add_argument("--schedules", default=",".join(SCHEDULES), help=f"comma-separated, of {', '.join(SCHEDULES)}")
    ap.add_argument("--seeds", default="1,2", help="training seeds, comma-separated")
    ap.add_argument("--chunk-minutes", type=float, default=0.0, help="stop training after this many minutes (0 = none)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave as is)")
    ap.add_argument("--device", default="auto", help="evaluation device")
    ap.add_argument("--n-prompts", type=int, default=200, help="prompts per faithfulness set")
    ap.add_argument("--search-n", type=int, default=500, help="fresh renders for reverse search")
    ap.add_argument("--probe-train", type=int, default=2000)
    ap.add_argument("--probe-val", type=int, default=1000)
    ap.add_argument("--eval-steps", type=int, default=None, help="decoding steps (default: one per token)")
    # The sampler's defaults are the request's (--steps here is the training budget, so these are
    # declared beside add_sampler_args's rather than through it).
    ap.add_argument("--head-steps", type=int, default=GenerationRequest.head_steps, help="diffusion-head sampling steps")
    ap.add_argument("--cfg", type=float, default=GenerationRequest.guidance_scale, help="classifier-free guidance scale")
    ap.add_argument("--temperature", type=float, default=GenerationRequest.temperature)
    ap.add_argument("--batch-size", type=int, default=0, help="prompts decoded together (0 = automatic)")
    ap.add_argument("--eval-seed", type=int, default=EVAL_SEED)
    ap.add_argument("overrides", nargs="*", help="recipe overrides key=value for every run (default vae_path and "
                                                 "t5_path: the bundled model's vae/ and text/)")
    return ap.parse_intermixed_args(argv)


def check_args(args: argparse.Namespace) -> tuple[list[str], list[int]]:
    schedules = [s.strip() for s in args.schedules.split(",") if s.strip()]
    unknown = [s for s in schedules if s not in SCHEDULES]
    if not schedules or unknown:
        raise ValueError(f"--schedules must list some of {', '.join(SCHEDULES)}, got {args.schedules!r}")
    seeds = parse_int_list(args.seeds, "--seeds")
    if len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        raise ValueError(f"--seeds must be distinct non-negative integers, got {args.seeds!r}")
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.chunk_minutes < 0:
        raise ValueError(f"--chunk-minutes must be >= 0 (0 = no limit), got {args.chunk_minutes}")
    if min(args.n_prompts, args.search_n, args.probe_val) < 1 or args.probe_train < 2:
        raise ValueError("--n-prompts, --search-n, --probe-val must be >= 1 and --probe-train >= 2")
    for item in args.overrides:
        key = item.split("=", 1)[0]
        if key in ("seed", "max_steps"):
            raise ValueError(f"override {key} is set by this command (--seeds, --steps); drop {item!r}")
    return schedules, seeds


def run_recipe(schedule: str, seed: int, steps: int, overrides: list[str]):
    from training.recipes import get_recipe

    keys = {item.split("=", 1)[0] for item in overrides}
    defaults = [f"{k}={BUNDLED / sub}" for k, sub in (("vae_path", "vae"), ("t5_path", "text")) if k not in keys]
    return get_recipe(SCHEDULES[schedule]).overrides([*defaults, *overrides, f"seed={seed}", f"max_steps={steps}"])


def train_run(recipe, run_dir: Path, deadline: float | None) -> bool:
    """Train (or continue from checkpoint-last) and export; False if the chunk ran out first."""
    from training.train import Trainer

    trainer = Trainer(recipe, run_dir)
    timer = None
    if deadline is not None:
        def stop() -> None:
            trainer.stop_requested = True  # the loop saves a checkpoint and returns after this step

        timer = threading.Timer(max(0.0, deadline - time.time()), stop)
        timer.daemon = True
        timer.start()
    try:
        trainer.fit()
    finally:
        if timer is not None:
            timer.cancel()
    if trainer.interrupted or trainer.step < trainer.total_steps:
        return False
    trainer.export(run_dir / "model")
    return True


def evaluate_model(model_dir: Path, args: argparse.Namespace) -> dict:
    pipe = load_pipeline(model_dir, args.device, args.threads)
    steps = args.eval_steps if args.eval_steps is not None else pipe.config.seq_len
    sampler = SamplerSettings(steps, args.cfg, "constant", args.temperature, args.head_steps)
    out = {"model": str(model_dir), "meta": run_metadata(pipe),
           "probe": probe_section(pipe, args.probe_train, args.probe_val, args.eval_seed),
           "search": reverse_search_section(pipe, args.search_n, args.eval_seed)}
    for objects in (1, 2):
        out[f"{objects}-object"] = faithfulness_section(pipe, objects, args.n_prompts, sampler, args.eval_seed,
                                                        args.batch_size, which=("sad",))
    return out


def counts(ev: dict) -> dict[str, tuple[int, int]]:
    """(successes, n) of every metric of one model's evaluation."""
    p, s = ev["probe"], ev["search"]
    out = {f"probe {a}": (round(p[a]["val_acc"] * p["n_val"]), p["n_val"]) for a in SHAPES_ATTRIBUTES}
    out["search top-1"] = (round(s["top1"] * s["n"]), s["n"])
    out.update({f"search {a}": (round(s["per_attribute"][a] * s["n"]), s["n"]) for a in SHAPES_ATTRIBUTES})
    for o in (1, 2):
        c = ev[f"{o}-object"]["vae_ceiling"]
        out[f"{o}-object VAE ceiling"] = (c["faithful"], c["n"])
        for name, label in (("K=1", "K=1"), ("sad", f"SAD K={SAD_K}")):
            e = ev[f"{o}-object"]["settings"][name]
            out[f"{o}-object {label}"] = (e["faithful"], e["n"])
    return out


def aggregate(evals: dict[str, dict[int, dict]]) -> dict:
    """Per schedule and metric: rate pooled over seeds (= the mean, same n per seed) with a Wilson
    interval, and each seed's rate; per metric the ordering of schedules (best first)."""
    table: dict[str, dict] = {}
    for sched, per_seed in evals.items():
        table[sched] = {}
        seed_counts = {seed: counts(ev) for seed, ev in per_seed.items()}
        for m in METRICS + CEILINGS:
            k = sum(c[m][0] for c in seed_counts.values())
            n = sum(c[m][1] for c in seed_counts.values())
            table[sched][m] = {**rate_with_interval(k, n),
                               "per_seed": {str(seed): c[m][0] / c[m][1] for seed, c in seed_counts.items()}}
    order = {m: sorted(table, key=lambda s: -table[s][m]["rate"]) for m in METRICS}
    # The mean probe accuracy as one rate: the probes' validation verdicts pooled over attributes.
    understanding = {s: rate_with_interval(sum(table[s][f"probe {a}"]["successes"] for a in SHAPES_ATTRIBUTES),
                                           sum(table[s][f"probe {a}"]["n"] for a in SHAPES_ATTRIBUTES))
                     for s in table}
    return {"metrics": table, "ordering": order,
            "paper_comparison": {
                "understanding (mean probe accuracy)": compare_order(understanding, PAPER_ORDER["understanding"]),
                "generation (1-object K=1 faithfulness)": compare_order(
                    {s: table[s]["1-object K=1"] for s in table}, PAPER_ORDER["generation"])}}


def compare_order(values: dict[str, dict], paper: list) -> dict:
    """The measured order (`rate_with_interval` entries, best first) of the paper's schedules present
    here, whether it is the paper's (a tie in the paper accepts either order), and whether any two
    neighbours in it differ beyond noise (if none does, the order is noise, whichever it is)."""
    groups = [g if isinstance(g, tuple) else (g,) for g in paper]
    present = [tuple(s for s in g if s in values) for g in groups]
    present = [g for g in present if g]
    measured = sorted((s for g in present for s in g), key=lambda s: -values[s]["rate"])
    i, matches = 0, True
    for g in present:
        if set(measured[i:i + len(g)]) != set(g):
            matches = False
        i += len(g)
    separated = [[a, b] for a, b in zip(measured, measured[1:]) if differ(values[a], values[b])]
    return {"measured": measured, "paper": [list(g) if len(g) > 1 else g[0] for g in present], "matches": matches,
            "rates": {s: values[s]["rate"] for s in measured}, "beyond_noise": separated}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    schedules, seeds = check_args(args)
    recipes = {(s, seed): run_recipe(s, seed, args.steps, args.overrides) for s in schedules for seed in seeds}
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    start = time.time()
    deadline = start + 60 * args.chunk_minutes if args.chunk_minutes else None
    status: dict[str, str] = {}
    evals: dict[str, dict[int, dict]] = {s: {} for s in schedules}
    for (sched, seed), recipe in recipes.items():
        name = f"{sched}-s{seed}"
        run_dir = args.out / "runs" / name
        eval_path = run_dir / "eval.json"
        if eval_path.is_file():
            ev = json.loads(eval_path.read_text())
            if ev.get("steps") != args.steps:
                raise ValueError(f"run {name} in {run_dir} was trained for {ev.get('steps')} steps, not --steps "
                                 f"{args.steps}; use another --out")
            evals[sched][seed] = ev
            status[name] = "done (skipped)"
            continue
        if deadline is not None and time.time() >= deadline:
            status[name] = "not finished (chunk time is up)"
            continue
        if not (run_dir / "model" / "model.safetensors").is_file():
            print(f"\n== {name}: recipe {recipe.name}, seed {seed}, {args.steps} steps ==", flush=True)
            if not train_run(recipe, run_dir, deadline):
                status[name] = "not finished (chunk time is up; checkpoint saved)"
                continue
        print(f"\n== {name}: evaluating {run_dir / 'model'} ==", flush=True)
        ev = {"steps": args.steps, "recipe": recipe.name, "seed": seed, **evaluate_model(run_dir / "model", args)}
        write_json(eval_path, ev)
        evals[sched][seed] = ev
        status[name] = "done"

    model_dirs = {f"{s}-s{seed}": args.out / "runs" / f"{s}-s{seed}" / "model" for s in schedules for seed in seeds}
    trained = [d for d in model_dirs.values() if (d / "model.safetensors").is_file()]
    results: dict = {"command": command_line(__file__, argv), "meta": run_metadata(None, args, models=trained),
                     "steps": args.steps, "seeds": seeds,
                     "schedules": {s: SCHEDULES[s] for s in schedules}, "overrides": args.overrides,
                     "models": {name: str(d) for name, d in model_dirs.items()},
                     "status": status, "complete": all(v.startswith("done") for v in status.values()),
                     "minutes": (time.time() - start) / 60}
    done = {s: per for s, per in evals.items() if len(per) == len(seeds)}
    if not results["complete"]:
        left = [n for n, v in status.items() if not v.startswith("done")]
        print(f"\nnot finished: {', '.join(left)}; run the same command again to continue", flush=True)
    if done:
        results.update(aggregate(done))
        print(f"\n## Table 4 at toy scale: masking schedules, {args.steps} steps, seeds {args.seeds}; mean over seeds "
              f"[95 % Wilson interval of the pooled rate] (each seed)\n")
        print(table(results))
        cats = METRICS
        title = f"Masking schedules at {args.steps} steps (mean of {len(seeds)} seed{'s' * (len(seeds) > 1)})"
        plot_bars(args.out / "plot.png", cats, {s: [results["metrics"][s][m]["rate"] for m in cats] for s in done},
                  "accuracy / faithfulness", title,
                  ylim=(0, 1), intervals={s: [results["metrics"][s][m]["ci95"] for m in cats] for s in done})
    write_json(args.out / "results.json", results)
    return results


def table(results: dict) -> str:
    metrics = results["metrics"]
    rows = [[m] + [f"{format_rate(metrics[s][m])} ({', '.join(f'{100 * v:.1f}' for v in metrics[s][m]['per_seed'].values())})"
                   for s in metrics] for m in METRICS + CEILINGS]
    lines = [markdown_table(["metric"] + list(metrics), rows), ""]
    for m in METRICS:
        order = results["ordering"][m]
        said = "" if len(order) < 2 else "; " + compare(order[0], metrics[order[0]][m], order[1], metrics[order[1]][m])
        lines.append(f"- {m}: " + " > ".join(order) + said)
    for what, c in results["paper_comparison"].items():
        noise = ("; beyond noise: " + ", ".join(f"{a} > {b}" for a, b in c["beyond_noise"]) if c["beyond_noise"]
                 else "; no two neighbours differ beyond noise")
        lines.append(f"- paper's order for {what}: measured {' > '.join(c['measured'])}; paper {c['paper']}; "
                     f"{'matches' if c['matches'] else 'does not match'}{noise}")
    return "\n".join(lines)


if __name__ == "__main__":
    run_cli(main)
