"""Zero-shot accuracy against the mask ratio (the paper's Fig. 7).

Each image is embedded by the encoder from only a random subset of its tokens (ceil(L * r)
masked, seeded per image), then classified by cosine against the label prompts' embeddings from
the contrastive text tower. A model trained with Masking Warmup should degrade gracefully as r
grows, because SAD scores exactly such partial latents.

Labels: for an image folder (root/<class>/*), the class names through `--template`. In
`--shapes` mode, shape, colour and position of rendered one-object scenes. The Shapes World grammar
always names a colour with a shape ("a red circle"), so each class embedding is the normalised mean
over the grammatical prompts "a {color} {shape}" holding that class (CLIP-style prompt ensembling);
for position, over "a {color} {shape} at the {position}" (the grammar's canonical phrase and names).

    python -m training.evaluate.zero_shot_masking --model DIR --shapes --out OUT
    python -m training.evaluate.zero_shot_masking --model DIR --data ROOT/val --template "a photo of a {}" --out OUT
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from dream_core.masking import random_token_mask
from dream_core.pipeline import DreamPipeline

from .cli import add_model_args, load_pipeline, parse_fractions, run_cli, run_metadata, write_json
from .plotting import plot_lines
from .scoring import image_tokens
from .sets import EVAL_SEED, STREAM_MASKS, STREAM_ZERO_SHOT, image_folder, load_images, rendered_scenes

DEFAULT_RATIOS = tuple(round(0.1 * i, 1) for i in range(10))


def class_embeddings(pipe: DreamPipeline, prompts_per_class: Sequence[Sequence[str]]) -> torch.Tensor:
    """[num_classes, E]: the normalised mean text embedding of each class's prompts."""
    flat = [p for group in prompts_per_class for p in group]
    emb = pipe.embed_texts(flat).cpu()
    out, i = [], 0
    for group in prompts_per_class:
        out.append(F.normalize(emb[i:i + len(group)].mean(0), dim=0))
        i += len(group)
    return torch.stack(out)


SHAPES_ZERO_SHOT = ("shape", "color", "position")


def shapes_class_prompts(attribute: str) -> tuple[list[str], list[list[str]]]:
    """(class names, prompts per class): every grammatical one-object prompt naming the class, a
    colour with a shape always, and for position the grammar's canonical "at the P" phrase."""
    from training.data import shapes_world as sw

    if attribute == "shape":
        return list(sw.SHAPES), [[f"a {c} {s}" for c in sw.COLORS] for s in sw.SHAPES]
    if attribute == "color":
        return list(sw.COLORS), [[f"a {c} {s}" for s in sw.SHAPES] for c in sw.COLORS]
    if attribute == "position":
        def phrase(c: str, s: str, p: str) -> str:
            return sw.spec_to_caption(sw.CaptionSpec(None, [sw.ObjectSpec(c, s, None, p)]))

        return list(sw.POSITIONS), [[phrase(c, s, p) for c in sw.COLORS for s in sw.SHAPES] for p in sw.POSITIONS]
    raise ValueError(f"zero-shot attributes are {', '.join(SHAPES_ZERO_SHOT)}, got {attribute!r}")


def shapes_labels(pipe: DreamPipeline, scenes: Sequence, attributes: Sequence[str] = SHAPES_ZERO_SHOT
                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, list[str]]]:
    """For one-object scenes: the true class index per attribute, the class embeddings (prompt
    ensembles, see `shapes_class_prompts`) and the class names."""
    labels, class_emb, classes = {}, {}, {}
    for attr in attributes:
        names, prompts = shapes_class_prompts(attr)
        labels[attr] = torch.tensor([names.index(getattr(s.objects[0], attr)) for s in scenes])
        class_emb[attr] = class_embeddings(pipe, prompts)
        classes[attr] = names
    return labels, class_emb, classes


@torch.inference_mode()
def accuracy_vs_mask_ratio(pipe: DreamPipeline, tokens: torch.Tensor, labels: dict[str, torch.Tensor],
                           class_emb: dict[str, torch.Tensor], ratios: Sequence[float], seed: int = EVAL_SEED,
                           draws: int = 1, batch_size: int = 256) -> dict[str, list[float]]:
    """Accuracy per label set at each mask ratio; `draws` random masks per image are averaged."""
    for r in ratios:
        if not 0.0 <= r < 1.0:
            raise ValueError(f"mask ratios must be in [0, 1), got {r}")
    n, seq_len = tokens.shape[:2]
    acc = {name: [] for name in labels}
    for ri, r in enumerate(ratios):
        correct = {name: 0 for name in labels}
        gen = torch.Generator().manual_seed(int(seed) * 1000 + STREAM_MASKS * 100 + ri)
        for _ in range(draws):
            mask = random_token_mask(torch.full((n,), float(r)), seq_len, gen).to(tokens.device)
            embs = []
            for i in range(0, n, batch_size):
                with pipe.autocast():
                    embs.append(pipe.model.encode_image(tokens[i:i + batch_size], mask[i:i + batch_size]).float().cpu())
            emb = torch.cat(embs)
            for name, y in labels.items():
                pred = (emb @ class_emb[name].t()).argmax(dim=1)
                correct[name] += int((pred == y).sum())
        for name in labels:
            acc[name].append(correct[name] / (n * draws))
    return acc


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, help="labelled image folder root/<class>/* (e.g. a val split)")
    src.add_argument("--shapes", action="store_true", help="rendered Shapes World objects: shape, colour and position")
    ap.add_argument("--template", default="{}", help="label prompt template for --data, with {} for the class name")
    ap.add_argument("--n-images", type=int, default=1000, help="rendered images in --shapes mode")
    ap.add_argument("--ratios", default=",".join(str(r) for r in DEFAULT_RATIOS), help="mask ratios, comma-separated")
    ap.add_argument("--draws", type=int, default=1, help="random masks per image and ratio")
    ap.add_argument("--seed", type=int, default=EVAL_SEED)
    ap.add_argument("--quick", action="store_true", help="64 images (smoke runs)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    ratios = parse_fractions(args.ratios, "--ratios", allow_zero=True)
    if args.draws < 1:
        raise ValueError(f"--draws must be >= 1, got {args.draws}")
    if "{}" not in args.template:
        raise ValueError("--template must contain {} where the class name goes")
    pipe = load_pipeline(args.model, args.device, args.threads)
    results: dict = {"meta": run_metadata(pipe, args), "ratios": ratios}
    if args.shapes:
        n = 64 if args.quick else args.n_images
        if n < 1:
            raise ValueError(f"--n-images must be >= 1, got {n}")
        images, scenes = rendered_scenes(n, args.seed, STREAM_ZERO_SHOT, num_objects=1)
        labels, class_emb, classes = shapes_labels(pipe, scenes)
        results["data"] = {"source": "shapes", "n_images": n, "seed": args.seed,
                           "prompts": "ensemble of 'a {color} {shape}' per class ('a {color} {shape} at the "
                                      "{position}' for position)"}
    else:
        paths, y, names = image_folder(args.data)
        loaded, bad = load_images(paths)
        keep = [i for i, im in enumerate(loaded) if im is not None]
        if not keep:
            raise ValueError(f"{args.data} holds no readable images")
        images = [loaded[i] for i in keep]
        labels = {"label": torch.tensor([y[i] for i in keep])}
        class_emb = {"label": class_embeddings(pipe, [[args.template.format(c)] for c in names])}
        classes = {"label": names}
        results["data"] = {"source": str(args.data), "n_images": len(images), "unreadable": len(bad),
                           "template": args.template}
    tokens = image_tokens(pipe, images)
    acc = accuracy_vs_mask_ratio(pipe, tokens, labels, class_emb, ratios, args.seed, args.draws)
    results["classes"] = classes
    results["chance"] = {k: 1.0 / len(v) for k, v in classes.items()}
    results["accuracy"] = acc
    for name, values in acc.items():
        print(f"zero-shot {name}: " + ", ".join(f"r={r:.1f}: {a:.1%}" for r, a in zip(ratios, values)))
    args.out.mkdir(parents=True, exist_ok=True)
    plot_lines(args.out / "plot.png", ratios, acc, "mask ratio (share of tokens hidden from the encoder)",
               "zero-shot top-1", "Zero-shot accuracy under masking (DREAM Fig. 7)")
    write_json(args.out / "results.json", results)
    return results


if __name__ == "__main__":
    run_cli(main)
