"""Shapes World prompt faithfulness with the exact judge (`training.data.shapes_world.judge`).

A fixed, seeded set of fully specified prompts (one-object and two-object, see
`sets.EVAL_SEED`) is generated with the given K / decision step / steps / CFG / head steps, and
each image is judged against its prompt. The report gives the rate and a per-attribute breakdown
of the failures, read from the judge's own reasons: a wrong background or object count stops the
judge first; otherwise each named object counts once per wrong attribute (colour = no object of
that colour; shape; size; position).

    python -m training.evaluate.faithfulness --model assets/dream-shapes --out runs/eval/faith \
        --n-prompts 500 --objects 1,2 --k 9 --decision-step 2
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from typing import Sequence

from PIL import Image

from .cli import (add_model_args, add_sampler_args, load_pipeline, parse_int_list, run_cli, run_metadata,
                  sampler_from_args, setting_from_args, write_json)
from .plotting import image_grid, plot_bars
from .sets import EVAL_SEED, one_object_prompts, prompt_seeds, two_object_prompts

FAILURE_KINDS = ("background", "count", "color", "shape", "size", "position")


def classify_failure(reason: str) -> list[str]:
    """The attributes a judge reason blames (see `shapes_world.judge_details`)."""
    if reason.startswith("background is"):
        return ["background"]
    if reason.startswith("caption names"):
        return ["count"]
    kinds = []
    for part in reason.split("; "):
        if part.startswith("no ") and " object" in part:
            kinds.append("color")
        for attr in ("shape", "size", "position"):  # values may hold spaces: "position top left != top"
            if re.search(rf"\b{attr} [^,;]+ != ", part):
                kinds.append(attr)
    return kinds or ["other"]


@dataclass
class FaithfulnessReport:
    n: int = 0
    faithful: int = 0
    failures: dict[str, int] = field(default_factory=lambda: {k: 0 for k in FAILURE_KINDS})
    verdicts: list[bool] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.faithful / self.n if self.n else 0.0

    def summary(self, examples: int = 10, prompts: Sequence[str] | None = None) -> dict:
        failed = [i for i, ok in enumerate(self.verdicts) if not ok][:examples]
        return {
            "n": self.n, "faithful": self.faithful, "rate": self.rate, "failures": dict(self.failures),
            "failure_examples": [{"index": i, "prompt": prompts[i] if prompts else None, "reason": self.reasons[i]}
                                 for i in failed],
        }


def judge_images(images: Sequence[Image.Image], prompts: Sequence[str]) -> FaithfulnessReport:
    """Judge each image against its prompt; any images (generated, rendered) are accepted."""
    from training.data.shapes_world import judge_details

    if len(images) != len(prompts):
        raise ValueError(f"images ({len(images)}) and prompts ({len(prompts)}) differ in length")
    if not images:
        raise ValueError("no images to judge")
    report = FaithfulnessReport()
    for image, prompt in zip(images, prompts):
        ok, reason = judge_details(image, prompt)
        report.n += 1
        report.verdicts.append(ok)
        report.reasons.append(reason)
        if ok:
            report.faithful += 1
        else:
            for kind in classify_failure(reason):
                report.failures[kind] = report.failures.get(kind, 0) + 1
    return report


def prompt_set(objects: int, n: int, seed: int = EVAL_SEED) -> list[str]:
    if objects == 1:
        return one_object_prompts(n, seed)
    if objects == 2:
        return two_object_prompts(n, seed)
    raise ValueError(f"objects must be 1 or 2, got {objects}")


def parse_objects(text: str) -> list[int]:
    """An --objects flag ("1", "2" or "1,2"): the Shapes World prompt sets to evaluate."""
    objects = parse_int_list(text, "--objects")
    if any(o not in (1, 2) for o in objects):
        raise ValueError(f"--objects entries must be 1 or 2, got {objects}")
    return objects


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    add_sampler_args(ap)
    ap.add_argument("--n-prompts", type=int, default=500, help="prompts per object count")
    ap.add_argument("--objects", default="1,2", help="object counts to evaluate: 1, 2 or 1,2")
    ap.add_argument("--k", type=int, default=1, help="SAD candidates K (1 = plain decoding)")
    ap.add_argument("--decision-step", type=int, default=None, help="SAD decision step (default: about 1/8 of the steps)")
    ap.add_argument("--prompt-seed", type=int, default=EVAL_SEED, help="seed of the prompt set")
    ap.add_argument("--quick", action="store_true", help="8 prompts per set (smoke runs)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    objects = parse_objects(args.objects)
    n = 8 if args.quick else args.n_prompts
    if n < 1:
        raise ValueError(f"--n-prompts must be >= 1, got {n}")
    pipe = load_pipeline(args.model, args.device, args.threads)
    sampler = sampler_from_args(args, pipe)
    setting = setting_from_args(args, pipe, sampler)
    results: dict = {"meta": run_metadata(pipe, args), "setting": setting.name, "sets": {}}
    args.out.mkdir(parents=True, exist_ok=True)
    for o in objects:
        prompts = prompt_set(o, n, args.prompt_seed)
        run = pipe.generate_batch(prompts, prompt_seeds(n, args.seed), [setting], sampler, args.batch_size, progress=True)
        images = run.results[setting].images
        report = judge_images(images, prompts)
        key = f"{o}-object"
        results["sets"][key] = {**report.summary(prompts=prompts), "seconds": run.seconds,
                                "images_per_second": n / run.seconds if run.seconds else None}
        image_grid(images[:32], cols=8, marks=report.verdicts[:32]).save(args.out / f"samples_{key}.png")
        print(f"{key} {setting.name}: {report.rate:.1%} ({report.faithful}/{report.n}) failures {report.failures}")
    sets = list(results["sets"])
    plot_bars(args.out / "plot.png", ["faithful"] + list(FAILURE_KINDS),
              {k: [results["sets"][k]["rate"]] + [results["sets"][k]["failures"][f] / n for f in FAILURE_KINDS]
               for k in sets},
              "share of prompts", f"Shapes World faithfulness ({setting.name})", ylim=(0, 1))
    write_json(args.out / "results.json", results)
    return results


if __name__ == "__main__":
    run_cli(main)
