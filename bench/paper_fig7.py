"""The paper's Fig. 7 at toy scale: zero-shot accuracy (colour, shape, position) of partially masked
images against the mask ratio, for several models in one plot (e.g. Masking Warmup against FX):
does Masking Warmup keep partial images retrievable, the premise of SAD?

The same fresh one-object renders (the fixed evaluation seed's zero-shot sub-stream) and the same
random token masks (one per image and ratio) are given to every model; each model's encoder sees
only the visible tokens of its own VAE's latents, and each class is the prompt ensemble of
`training.evaluate.zero_shot_masking` ("a {color} {shape}", "... at the {position}"). Intervals are
95 % Wilson intervals over the images.

    python -m bench.paper_fig7 --models warmup=runs/t4/warmup-s1/model fx=runs/t4/fx-s1/model \\
        --n-images 1000 --out bench/results/fig7
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.common import RESULTS, command_line, markdown_table
from training.evaluate.cli import load_pipeline, parse_fractions, run_cli, run_metadata, write_json
from training.evaluate.plotting import plot_panels
from training.evaluate.scoring import image_tokens
from training.evaluate.sets import EVAL_SEED, STREAM_ZERO_SHOT, rendered_scenes
from training.evaluate.stats import compare, differ, format_rate, rate_with_interval
from training.evaluate.zero_shot_masking import SHAPES_ZERO_SHOT, accuracy_vs_mask_ratio, shapes_labels

DEFAULT_RATIOS = "0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,0.95"


def parse_models(items: list[str]) -> dict[str, Path]:
    models: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--models entries look like NAME=DIR, got {item!r}")
        if name in models:
            raise ValueError(f"--models names must be distinct, {name!r} is given twice")
        if not Path(path).is_dir():
            raise ValueError(f"--models {name}: model directory {path} does not exist")
        models[name] = Path(path)
    if not models:
        raise ValueError("--models needs at least one NAME=DIR")
    return models


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", required=True, metavar="NAME=DIR", help="the models to compare")
    ap.add_argument("--out", type=Path, default=RESULTS / "fig7", help="output folder (results.json, plot.png)")
    ap.add_argument("--ratios", default=DEFAULT_RATIOS, help="mask ratios, comma-separated, in [0, 1)")
    ap.add_argument("--n-images", type=int, default=1000, help="fresh one-object renders")
    ap.add_argument("--seed", type=int, default=EVAL_SEED, help="seed of the renders and the masks")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    models = parse_models(args.models)
    ratios = parse_fractions(args.ratios, "--ratios", allow_zero=True)
    if args.n_images < 1:
        raise ValueError(f"--n-images must be >= 1, got {args.n_images}")
    images, scenes = rendered_scenes(args.n_images, args.seed, STREAM_ZERO_SHOT, num_objects=1)
    results: dict = {"command": command_line(__file__, argv), "models": {k: str(v) for k, v in models.items()},
                     "meta": run_metadata(None, args, models=list(models.values())),
                     "ratios": ratios, "n_images": args.n_images, "seed": args.seed, "accuracy": {}}
    for name, path in models.items():
        pipe = load_pipeline(path, args.device, args.threads)
        labels, class_emb, classes = shapes_labels(pipe, scenes)
        acc = accuracy_vs_mask_ratio(pipe, image_tokens(pipe, images), labels, class_emb, ratios, args.seed)
        results["chance"] = {a: 1.0 / len(c) for a, c in classes.items()}
        results["accuracy"][name] = {a: [rate_with_interval(round(v * args.n_images), args.n_images) for v in vals]
                                     for a, vals in acc.items()}

    print(f"\n## Fig. 7 at toy scale: zero-shot accuracy against the mask ratio ({args.n_images} renders)\n")
    print(table(results))
    results["findings"] = findings(results)
    print("\n" + "\n".join(f"- {f}" for f in results["findings"]))
    panels = {a: {m: [e["rate"] for e in results["accuracy"][m][a]] for m in models} for a in SHAPES_ZERO_SHOT}
    bands = {a: {m: [e["ci95"] for e in results["accuracy"][m][a]] for m in models} for a in SHAPES_ZERO_SHOT}
    plot_panels(args.out / "plot.png", ratios, panels, "mask ratio (share of tokens hidden)", "zero-shot top-1",
                "Zero-shot accuracy of partially masked images (DREAM Fig. 7, Shapes World)", intervals=bands,
                chance=results["chance"])
    write_json(args.out / "results.json", results)
    return results


def findings(results: dict) -> list[str]:
    """Per attribute: where accuracy stays above chance (the interval's low end), and for the first
    two models, the mask ratios where they differ beyond noise."""
    out, ratios = [], results["ratios"]
    models = list(results["accuracy"])
    for attr, chance in results["chance"].items():
        for m in models:
            above = [r for r, e in zip(ratios, results["accuracy"][m][attr]) if e["ci95"][0] > chance]
            out.append(f"{attr}, {m}: above chance ({chance:.1%}) up to mask ratio {max(above):g}" if above
                       else f"{attr}, {m}: never above chance ({chance:.1%}) beyond noise")
        if len(models) >= 2:
            a, b = models[:2]
            beyond = [f"r = {r:g}: {compare(a, ea, b, eb)}" for r, ea, eb in
                      zip(ratios, results["accuracy"][a][attr], results["accuracy"][b][attr]) if differ(ea, eb)]
            out.append(f"{attr}, {a} vs {b}: " + ("; ".join(beyond) if beyond
                                                   else "no difference within noise at any mask ratio"))
    return out


def table(results: dict) -> str:
    ratios = results["ratios"]
    rows = [[m, a] + [format_rate(e) for e in per[a]] for m, per in results["accuracy"].items() for a in per]
    return markdown_table(["model", "attribute"] + [f"r = {r:g}" for r in ratios], rows)


if __name__ == "__main__":
    run_cli(main)
