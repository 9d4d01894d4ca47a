"""Measure an emoji model on images it never saw: reverse search, zero-shot labels and generation.

Every figure comes with a 95 % interval (Wilson; paired Newcombe for SAD against K = 1).
- Reverse search of the held-out OpenMoji images (never trained on) over the bank of all 3,786
  names: top-1 / top-5; the same for a sample of seen images (reference); and for OpenMoji's
  monochrome line art (`black/svg`), an emoji style the model never trained on.
- Zero-shot skin tone (the emoji's own names with each tone) and group (the ten CLDR groups) on the
  held-out images.
- Generation for seen (emoji, style) pairs and for the held-out OpenMoji pairs (that emoji was seen
  only in the other two styles), judged independently of the model: the requested emoji must be
  the nearest of all 3,786 images of the requested style by distance on blurred 16 x 16
  thumbnails (rank 1). At K = 1 and with SAD K = 9 (the model's default decision step), paired;
  the VAE round trip of the reference image under the same judge is the ceiling.
- A contact sheet of 64 prompts: reference, K = 1, SAD.
- Each generation verdict is stored per prompt (a string of 0/1 in the prompts' order, beside a
  digest of the prompts and seeds), so two models measured on the same prompts compare paired:
  `--baseline OTHER/eval.json` adds each setting's paired difference from that file's.
  `--paired NEW/eval.json OLD/eval.json` prints the same for two files already measured.
- The paper's Fig. 7 on real images (`masked`): reverse search top-1 over the 3,786 names and the
  zero-shot group when the encoder sees only part of an image's tokens (a random share hidden),
  on the held-out OpenMoji images and on seen images. SAD scores exactly such partial latents.
- The paper's Table 17 on real images (`budget`): K = 1, 2, 4, 9, 16 under a fixed budget of S
  network evaluations (decision step = S // K, `bench.paper_table17`'s rule) on the seen pairs,
  judged as above, with NFE per image. No external reranker: no other emoji model exists here.
- Across styles (`crossstyle`): each held-out OpenMoji image (and as many seen ones) searches the
  3,786 Noto and the 3,786 Twemoji images for the same emoji, by the joint embedding, by the
  encoder's pooled states and by the judge's thumbnails (pixels alone): where reverse search fails,
  whether the model's image side carries the emoji's identity across styles at all.

    python -m bench.emoji_eval --model assets/dream-emoji --data runs/emoji-data --out bench/results/emoji
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.paper_table17 import budget_settings, nfe_per_image
from dream_core.pipeline import DreamPipeline
from dream_core.request import MAX_CANDIDATES, SamplerSettings, default_decision_step
from dream_core.semantic_decoding import Setting
from training.data.emoji import PACKAGE_OF_STYLE, STYLES, EmojiSource, package_dir, render_svg
from training.evaluate.cli import run_metadata, write_json
from training.evaluate.plotting import plot_panels
from training.evaluate.scoring import image_tokens
from training.evaluate.zero_shot_masking import accuracy_vs_mask_ratio
from training.evaluate.stats import format_difference, format_rate, paired_difference, rate_with_interval

THUMB = 16  # the judge's thumbnail side: the art's layout and colours, not its pixels
GROUPS = {  # CLDR group -> the words a person would use
    "smileys-emotion": "smileys and emotion", "people-body": "people and body", "component": "component",
    "animals-nature": "animals and nature", "food-drink": "food and drink", "travel-places": "travel and places",
    "activities": "activities", "objects": "objects", "symbols": "symbols", "flags": "flags",
}
PROMPT = "a {name} emoji in {style} style"  # how a person would ask
SECTIONS = ("search", "generation", "masked", "budget", "crossstyle")
BUDGET_KS = (1, 2, 4, 9, 16)
MASK_RATIOS = (0.0, 0.25, 0.5, 0.75, 0.875, 0.95)  # 0.5 and 0.875: the SAD decision shares in use


def thumbs(images: np.ndarray) -> torch.Tensor:
    """[N, 64, 64, 3] uint8 -> [N, 3 * THUMB * THUMB] float: area-averaged (a box blur) thumbnails."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    return torch.nn.functional.adaptive_avg_pool2d(x, THUMB).flatten(1)


def nearest_ranks(queries: torch.Tensor, gallery: torch.Tensor, targets: np.ndarray, metric: str) -> np.ndarray:
    """Rank (1 = nearest; ties count in the query's favour) of each query's own gallery row
    `targets[i]` among all rows, by cosine similarity ("cosine") or L2 distance ("l2")."""
    if metric == "cosine":
        score = torch.nn.functional.normalize(queries, dim=-1) @ torch.nn.functional.normalize(gallery, dim=-1).T
    elif metric == "l2":
        score = -torch.cdist(queries, gallery)
    else:
        raise ValueError(f"metric must be cosine or l2, got {metric!r}")
    own = score[torch.arange(len(targets)), torch.as_tensor(targets)]
    return (score > own[:, None]).sum(1).numpy() + 1


def judge_ranks(generated: np.ndarray, wanted: np.ndarray, references: torch.Tensor) -> np.ndarray:
    """Rank (1 = nearest) of the wanted emoji among all `references` of one style for each image."""
    return nearest_ranks(thumbs(generated), references, wanted, "l2")


def top_k_hits(pipe: DreamPipeline, images: np.ndarray, targets: np.ndarray, bank_emb: torch.Tensor,
               batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 and top-5 hits of reverse search for images whose right bank entry is `targets`."""
    emb = torch.cat([pipe.embed_images([Image.fromarray(im) for im in images[i:i + batch]]).cpu()
                     for i in range(0, len(images), batch)])
    r = nearest_ranks(emb, bank_emb, targets, "cosine")
    return r <= 1, r <= 5


def unseen_style(data: Path, records: list[dict], picks: np.ndarray) -> np.ndarray:
    """OpenMoji's monochrome line art (`black/svg`) of the picked emoji, normalised like the set."""
    folder = package_dir(data, PACKAGE_OF_STYLE["openmoji"]) / "package" / "black" / "svg"
    return np.stack([render_svg(folder / records[e]["files"]["openmoji"]) for e in picks])


def vae_round_trip(pipe: DreamPipeline, images: np.ndarray, batch: int = 128) -> np.ndarray:
    out = []
    for i in range(0, len(images), batch):
        tokens = torch.cat([pipe.encode_image_tokens(Image.fromarray(im)) for im in images[i:i + batch]])
        out += [np.asarray(im.convert("RGB")) for im in pipe.decode_tokens(tokens)]
    return np.stack(out)


def zero_shot_rates(pipe: DreamPipeline, source: EmojiSource, held: np.ndarray) -> dict:
    """Skin tone: among the names of the same base emoji (each tone and none), is the image's own
    name the most similar? Group: among the ten groups' names."""
    recs = source.records
    by_base: dict[str, list[int]] = {}
    for i, r in enumerate(recs):
        by_base.setdefault(r["base"], []).append(i)
    tone_hits, group_hits = [], []
    group_keys = list(GROUPS)
    group_emb = pipe.embed_texts([f"{GROUPS[g]} emoji" for g in group_keys]).cpu()
    for e in held:
        img = pipe.embed_images([Image.fromarray(source.images[e, STYLES.index("openmoji")])]).cpu()[0]
        family = by_base[recs[e]["base"]]
        if len(family) > 1 and recs[e]["skin_tone"] != "mixed":
            names = pipe.embed_texts([recs[i]["name"] for i in family]).cpu()
            tone_hits.append(family[int((names @ img).argmax())] == e)
        group_hits.append(group_keys[int((group_emb @ img).argmax())] == recs[e]["group"])
    return {"skin_tone": rate_with_interval(sum(tone_hits), len(tone_hits)),
            "group": rate_with_interval(sum(group_hits), len(group_hits)),
            "group_chance": 1 / len(group_keys)}


def contact_sheet(refs: np.ndarray, k1: list, sad: list, path: Path) -> None:
    """Columns of (reference, K = 1, SAD) triples, 8 triples a row."""
    tiles = [np.concatenate([refs[i], np.asarray(k1[i].convert("RGB")), np.asarray(sad[i].convert("RGB"))], 0)
             for i in range(len(refs))]
    rows = [np.concatenate(tiles[i:i + 8] + [np.full_like(tiles[0], 255)] * (8 - len(tiles[i:i + 8])), 1)
            for i in range(0, len(tiles), 8)]
    Image.fromarray(np.concatenate(rows, 0)).save(path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("assets/dream-emoji"))
    ap.add_argument("--data", type=Path, default=Path("runs/emoji-data"))
    ap.add_argument("--out", type=Path, default=Path("bench/results/emoji"))
    ap.add_argument("--n-seen", type=int, default=300, help="seen (emoji, style) pairs generated")
    ap.add_argument("--n-heldout", type=int, default=350, help="held-out OpenMoji pairs generated (all: 350)")
    ap.add_argument("--n-search-seen", type=int, default=1000, help="seen images searched (reference)")
    ap.add_argument("--n-unseen-style", type=int, default=500, help="line-art images searched")
    ap.add_argument("--candidates", type=int, default=9, help="SAD's K (1: K = 1 only)")
    ap.add_argument("--guidance-scale", type=float, default=None, help="CFG (default: the model's)")
    ap.add_argument("--temperature", type=float, default=None, help="head temperature (default: the model's)")
    ap.add_argument("--steps", type=int, default=None,
                    help="decoding steps of the generation and budget sections (default: the app's, one a token up to 64)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}")
    ap.add_argument("--baseline", type=Path, default=None,
                    help="another model's eval.json from the same prompts: paired differences from its verdicts")
    ap.add_argument("--paired", type=Path, nargs=2, metavar=("NEW", "OLD"), default=None,
                    help="measure nothing: print the paired generation differences of two eval.json files "
                         "(NEW minus OLD, on the prompts both measured)")
    args = ap.parse_args(argv)
    if args.paired:
        new, old = args.paired
        differences = compare_to_baseline(read_baseline(new, "--paired")["generation"], read_baseline(old, "--paired"),
                                          old, "--paired")["differences"]
        for key, diff in differences.items():
            print(f"generation {key}, {new} minus {old}: {format_difference(diff)}")
        return
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    if not sections or sections - set(SECTIONS):
        ap.error(f"--sections takes a subset of {', '.join(SECTIONS)}, got {args.sections!r}")
    if not 1 <= args.candidates <= MAX_CANDIDATES:  # the request's bound, so the check below names --steps alone
        ap.error(f"--candidates must be between 1 and {MAX_CANDIDATES}, got {args.candidates}")
    baseline = read_baseline(args.baseline) if args.baseline else None
    if baseline is not None and "generation" not in sections:
        ap.error("--baseline pairs generation verdicts: --sections must include generation")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    pipe = DreamPipeline.from_pretrained(args.model, device="cpu")
    try:  # the request's own check (1 .. the model's tokens), its default resolved
        check = SamplerSettings(num_inference_steps=args.steps).request("a", num_candidates=args.candidates)
        args.steps = check.validate(pipe.config).num_inference_steps
    except ValueError as err:
        ap.error(f"--steps: {err}")
    source = EmojiSource(args.data, "all")
    recs = source.records
    held_pairs = EmojiSource(args.data, "heldout").pairs
    train_pairs = EmojiSource(args.data, "train").pairs
    bank = [r["name"] for r in recs]
    if pipe.captions and pipe.captions != bank:
        raise SystemExit("the model's caption bank is not the emoji set's names in order: was it trained on this set?")
    bank_emb = pipe.embed_texts(bank).cpu()
    meta = run_metadata(pipe, args)
    result: dict = {"model": str(args.model), "weights": meta["weights"], "meta": meta, "bank": len(bank)}

    if "search" in sections:
        search_section(pipe, args, result, source, held_pairs, train_pairs, bank_emb,
                       np.random.default_rng([args.seed, 0]))
    if "generation" in sections:
        generation_section(pipe, args, result, source, held_pairs, train_pairs, np.random.default_rng([args.seed, 1]))
        if baseline is not None:
            result["generation"]["baseline"] = compare_to_baseline(result["generation"], baseline, args.baseline)
    if "budget" in sections:
        budget_section(pipe, args, result, source, train_pairs, np.random.default_rng([args.seed, 1]))
    if "crossstyle" in sections:
        cross_style_section(pipe, args, result, source, held_pairs, train_pairs, np.random.default_rng([args.seed, 3]))
    if "masked" in sections:
        masked_section(pipe, args, result, source, held_pairs, train_pairs, bank_emb, np.random.default_rng([args.seed, 2]))
    result["wall_seconds"] = round(time.time() - t0, 1)
    result["command"] = "python -m bench.emoji_eval " + " ".join(sys.argv[1:])
    write_json(args.out / "eval.json", result)
    for name, entry in result.get("search", {}).items():
        print(f"search {name}: top-1 {format_rate(entry['top1'])}, top-5 {format_rate(entry['top5'])}")
    if "zero_shot_heldout" in result:
        print(f"zero-shot skin tone {format_rate(result['zero_shot_heldout']['skin_tone'])}, "
              f"group {format_rate(result['zero_shot_heldout']['group'])}")
    for split, g in result.get("generation", {}).items():
        if isinstance(g, dict) and "k1" in g:
            sad = (f", SAD {format_rate(g['sad'])}, SAD - K=1 {format_difference(g['sad_minus_k1'])}"
                   if "sad" in g else "")
            print(f"generation {split}: K=1 {format_rate(g['k1'])}{sad}, VAE ceiling {format_rate(g['vae_ceiling'])}")
    for key, diff in result.get("generation", {}).get("baseline", {}).get("differences", {}).items():
        print(f"generation {key} minus baseline: {format_difference(diff)}")
    for row in result.get("budget", {}).get("rows", []):
        print(f"budget {row['setting']}: NFE {row['nfe']}, {format_rate(row['rate'])}, vs K=1 {format_difference(row['vs_k1'])}"
              if "vs_k1" in row else f"budget {row['setting']}: NFE {row['nfe']}, {format_rate(row['rate'])}")
    for name, row in result.get("crossstyle", {}).get("rows", {}).items():
        print(f"cross-style {name}: " + "; ".join(f"{rep} top-1 {format_rate(e['top1'])}, top-5 {format_rate(e['top5'])}"
                                                  for rep, e in row.items()))
    for split, m in result.get("masked", {}).get("splits", {}).items():
        for label, rates in m.items():
            print(f"masked {split} {label}: " + ", ".join(f"r={r:g} {format_rate(e)}"
                                                          for r, e in zip(result["masked"]["ratios"], rates)))


def search_section(pipe: DreamPipeline, args: argparse.Namespace, result: dict, source: EmojiSource,
                   held_pairs: np.ndarray, train_pairs: np.ndarray, bank_emb: torch.Tensor,
                   rng: np.random.Generator) -> None:
    """Reverse search (held-out, seen, unseen style) and the zero-shot labels, into `result`."""
    recs, images, om = source.records, source.images, STYLES.index("openmoji")
    held_e = held_pairs[:, 0]
    t1, t5 = top_k_hits(pipe, images[held_e, om], held_e, bank_emb)
    seen = train_pairs[rng.choice(len(train_pairs), min(args.n_search_seen, len(train_pairs)), replace=False)]
    s1, s5 = top_k_hits(pipe, images[seen[:, 0], seen[:, 1]], seen[:, 0], bank_emb)
    picks = rng.choice(len(recs), min(args.n_unseen_style, len(recs)), replace=False)
    u1, u5 = top_k_hits(pipe, unseen_style(args.data, recs, picks), picks, bank_emb)
    result["search"] = {
        "heldout_openmoji": {"top1": rate_with_interval(t1.sum(), len(t1)), "top5": rate_with_interval(t5.sum(), len(t5))},
        "seen": {"top1": rate_with_interval(s1.sum(), len(s1)), "top5": rate_with_interval(s5.sum(), len(s5))},
        "unseen_style_openmoji_line_art": {"top1": rate_with_interval(u1.sum(), len(u1)),
                                           "top5": rate_with_interval(u5.sum(), len(u5))},
    }
    result["zero_shot_heldout"] = zero_shot_rates(pipe, source, held_e)
    print(json.dumps(result["search"]), flush=True)


def judged(images: np.ndarray, pairs: np.ndarray, refs: torch.Tensor) -> np.ndarray:
    """The judge's verdict per (emoji, style) pair: is the image nearest its own reference?"""
    ok = np.zeros(len(pairs), bool)
    for st in range(refs.shape[1]):
        rows = pairs[:, 1] == st
        if rows.any():
            ok[rows] = judge_ranks(images[rows], pairs[rows, 0], refs[:, st]) == 1
    return ok


def generation_section(pipe: DreamPipeline, args: argparse.Namespace, result: dict, source: EmojiSource,
                       held_pairs: np.ndarray, train_pairs: np.ndarray, rng: np.random.Generator) -> None:
    """K = 1 and SAD on seen and held-out pairs, with the VAE ceiling, into `result`; the sheet."""
    recs, images = source.records, source.images
    steps = args.steps
    decision = default_decision_step(pipe.config, steps)
    settings = {"k1": Setting(1)}
    if args.candidates > 1:
        settings["sad"] = Setting(args.candidates, decision)
    sampler = SamplerSettings(num_inference_steps=steps, guidance_scale=args.guidance_scale,
                              temperature=args.temperature)
    refs = thumbs(images.reshape(-1, 64, 64, 3)).reshape(len(recs), len(STYLES), -1)
    result["generation"] = {"steps": steps, "decision_step": decision, "candidates": args.candidates,
                            "guidance_scale": args.guidance_scale or pipe.config.default_guidance_scale,
                            "temperature": args.temperature or pipe.config.default_temperature, "prompt": PROMPT,
                            "judge": f"rank 1 among the style's {len(recs)} images, L2 on {THUMB}x{THUMB} "
                                     f"area-averaged thumbnails"}
    sheet = []
    for split, pairs in (("seen", train_pairs[rng.choice(len(train_pairs), args.n_seen, replace=False)]),
                         ("heldout", held_pairs[rng.permutation(len(held_pairs))[:args.n_heldout]])):
        if not len(pairs):
            continue
        prompts = [PROMPT.format(name=recs[e]["name"], style=STYLES[s]) for e, s in pairs]
        seeds = [args.seed * 100_003 + i for i in range(len(pairs))]
        start = time.time()
        run = pipe.generate_batch(prompts, seeds, list(settings.values()), sampler=sampler, progress=True)
        entry: dict = {"n": len(pairs), "seconds": round(time.time() - start, 1),
                       "prompts_digest": prompts_digest(prompts, seeds)}
        verdicts, chosen = {}, {}
        for name, s in settings.items():
            chosen[name] = run.results[s].images
            verdicts[name] = judged(np.stack([np.asarray(im.convert("RGB")) for im in chosen[name]]), pairs, refs)
            entry[name] = rate_with_interval(int(verdicts[name].sum()), len(pairs))
        entry["verdicts"] = {name: "".join("1" if v else "0" for v in verdicts[name]) for name in settings}
        if "sad" in settings:
            entry["sad_minus_k1"] = paired_difference(verdicts["sad"].tolist(), verdicts["k1"].tolist())
        entry["vae_ceiling"] = rate_with_interval(
            int(judged(vae_round_trip(pipe, images[pairs[:, 0], pairs[:, 1]]), pairs, refs).sum()), len(pairs))
        result["generation"][split] = entry
        last = chosen.get("sad", chosen["k1"])
        sheet += [(images[e, s], chosen["k1"][i], last[i]) for i, (e, s) in enumerate(pairs[:32])]
        print(split, json.dumps({k: v for k, v in entry.items() if k not in ("n", "verdicts")}), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    contact_sheet(np.stack([r for r, _, _ in sheet]), [k for _, k, _ in sheet], [s for _, _, s in sheet],
                  args.out / "contact_sheet.png")

def prompts_digest(prompts: list[str], seeds: list[int]) -> str:
    """Identifies a generation split's prompts and seeds: verdicts pair only on the same ones."""
    return hashlib.sha256(json.dumps([prompts, seeds]).encode()).hexdigest()[:16]


def read_baseline(path: Path, flag: str = "--baseline") -> dict:
    """Another eval.json; refused with the reason when it cannot pair."""
    if not path.is_file():
        raise SystemExit(f"{flag} {path}: no such file")
    other = json.loads(path.read_text())
    if not any(isinstance(g, dict) and "verdicts" in g for g in other.get("generation", {}).values()):
        raise SystemExit(f"{flag} {path}: it stores no per-prompt verdicts (measured before they were "
                         "recorded): measure the baseline model again with --sections generation")
    return other


def compare_to_baseline(generation: dict, baseline: dict, path: Path, flag: str = "--baseline") -> dict:
    """Paired differences (this model minus the baseline) per split and setting, on the prompts
    and seeds both measured; a split whose prompts differ is refused, not compared unpaired."""
    out: dict = {"path": str(path), "weights": baseline.get("weights"), "differences": {}}
    for split, entry in generation.items():
        if not (isinstance(entry, dict) and "verdicts" in entry) or split not in baseline["generation"]:
            continue
        other = baseline["generation"][split]
        if other.get("prompts_digest") != entry["prompts_digest"]:
            raise SystemExit(f"{flag} {path}: its {split} prompts or seeds differ from these "
                             "(same --seed, --n-seen and --n-heldout needed)")
        for name, mine in entry["verdicts"].items():
            if name in other.get("verdicts", {}):
                out["differences"][f"{split}_{name}"] = paired_difference(
                    [c == "1" for c in mine], [c == "1" for c in other["verdicts"][name]])
    return out


def budget_section(pipe: DreamPipeline, args: argparse.Namespace, result: dict, source: EmojiSource,
                   train_pairs: np.ndarray, rng: np.random.Generator) -> None:
    """Table 17 on emoji: K under the budget S (decision step S // K) on --n-seen seen pairs (the
    generation section's pairs and seeds: rng as there), judged; paired against K = 1."""
    recs, images = source.records, source.images
    steps = args.steps
    settings = budget_settings(list(BUDGET_KS), steps, steps)
    pairs = train_pairs[rng.choice(len(train_pairs), args.n_seen, replace=False)]
    prompts = [PROMPT.format(name=recs[e]["name"], style=STYLES[s]) for e, s in pairs]
    seeds = [args.seed * 100_003 + i for i in range(len(pairs))]
    refs = thumbs(images.reshape(-1, 64, 64, 3)).reshape(len(recs), len(STYLES), -1)
    sampler = SamplerSettings(num_inference_steps=steps, guidance_scale=args.guidance_scale,
                              temperature=args.temperature)
    run = pipe.generate_batch(prompts, seeds, settings, sampler=sampler, progress=True)
    verdicts = {s: judged(np.stack([np.asarray(im.convert("RGB")) for im in run.results[s].images]), pairs, refs)
                for s in settings}
    base = verdicts[settings[0]]
    rows = []
    for s in settings:
        row = {"setting": s.name, "k": s.num_candidates, "decision_step": s.decision_step,
               "nfe": nfe_per_image(s, steps), "rate": rate_with_interval(int(verdicts[s].sum()), len(pairs))}
        if s.num_candidates > 1:
            row["vs_k1"] = paired_difference(verdicts[s].tolist(), base.tolist())
        rows.append(row)
    result["budget"] = {"steps": steps, "budget": steps, "n": len(pairs), "rule": "decision step = budget // K",
                        "rows": rows}


def style_features(pipe: DreamPipeline, images: np.ndarray, batch: int = 256) -> dict[str, torch.Tensor]:
    """Each image's three representations (REPRESENTATIONS): the joint-space embedding, the
    encoder's hidden states mean-pooled over every token (before the heads), the judge's thumbnail."""
    tokens = image_tokens(pipe, [Image.fromarray(im) for im in images], batch)
    joint, pooled = [], []
    with torch.inference_mode(), pipe.autocast():
        for i in range(0, len(tokens), batch):
            t = tokens[i:i + batch]
            out = pipe.model.encoder(t, torch.zeros(t.shape[:2], dtype=torch.bool, device=t.device))
            joint.append(pipe.model.embed_image(out).float().cpu())
            pooled.append(out.pooled("all").float().cpu())
    return {"joint": torch.cat(joint), "encoder": torch.cat(pooled), "thumbnail": thumbs(images)}


# (representation, metric) of the cross-style section: the model's two, and pixels as the floor.
REPRESENTATIONS = {"joint": "cosine", "encoder": "cosine", "thumbnail": "l2"}


def cross_style_section(pipe: DreamPipeline, args: argparse.Namespace, result: dict, source: EmojiSource,
                        held_pairs: np.ndarray, train_pairs: np.ndarray, rng: np.random.Generator) -> None:
    """Does the model carry an emoji's identity across styles? An OpenMoji image (the held-out ones,
    and as many seen ones) searches the 3,786 images of another style for the same emoji, by the
    joint embedding, by the encoder's pooled states and by blurred thumbnails (what pixels alone
    give). Held-out images far below seen ones mean the model learned its pictures, not the emoji."""
    om = STYLES.index("openmoji")
    seen_om = np.unique(train_pairs[train_pairs[:, 1] == om, 0])
    queries = {"heldout_openmoji": held_pairs[:, 0],
               "seen_openmoji": np.sort(rng.choice(seen_om, min(len(held_pairs), len(seen_om)), replace=False))}
    every = np.arange(len(source.records))
    rows: dict = {}
    query_features = {split: style_features(pipe, source.images[e, om]) for split, e in queries.items()}
    for style in (s for s in STYLES if s != "openmoji"):
        gallery = style_features(pipe, source.images[every, STYLES.index(style)])
        for split, emoji in queries.items():
            rows[f"{split} -> {style}"] = {}
            for rep, metric in REPRESENTATIONS.items():
                r = nearest_ranks(query_features[split][rep], gallery[rep], emoji, metric)
                rows[f"{split} -> {style}"][rep] = {"top1": rate_with_interval(int((r <= 1).sum()), len(r)),
                                                    "top5": rate_with_interval(int((r <= 5).sum()), len(r))}
    result["crossstyle"] = {"gallery": len(every), "metrics": REPRESENTATIONS, "rows": rows}


def masked_section(pipe: DreamPipeline, args: argparse.Namespace, result: dict, source: EmojiSource,
                   held_pairs: np.ndarray, train_pairs: np.ndarray, bank_emb: torch.Tensor,
                   rng: np.random.Generator) -> None:
    """Fig. 7 on emoji: name top-1 (among all names) and group (among ten) against the share of an
    image's tokens hidden from the encoder, held-out OpenMoji and seen images; plot in --out."""
    recs, om = source.records, STYLES.index("openmoji")
    group_keys = list(GROUPS)
    class_emb = {"name": bank_emb, "group": pipe.embed_texts([f"{GROUPS[g]} emoji" for g in group_keys]).cpu()}
    seen = train_pairs[rng.choice(len(train_pairs), min(args.n_search_seen, len(train_pairs)), replace=False)]
    out: dict = {"ratios": list(MASK_RATIOS), "chance": {"name": 1 / len(recs), "group": 1 / len(group_keys)},
                 "splits": {}}
    for split, (emoji, styles) in (("heldout_openmoji", (held_pairs[:, 0], np.full(len(held_pairs), om))),
                                   ("seen", (seen[:, 0], seen[:, 1]))):
        tokens = image_tokens(pipe, [Image.fromarray(im) for im in source.images[emoji, styles]]).cpu()
        labels = {"name": torch.from_numpy(emoji).long(),
                  "group": torch.tensor([group_keys.index(recs[e]["group"]) for e in emoji])}
        acc = accuracy_vs_mask_ratio(pipe, tokens, labels, class_emb, MASK_RATIOS, seed=args.seed)
        out["splits"][split] = {k: [rate_with_interval(round(v * len(emoji)), len(emoji)) for v in vals]
                                for k, vals in acc.items()}
    result["masked"] = out
    args.out.mkdir(parents=True, exist_ok=True)
    panels = {f"{split} {k}": {"dream": [e["rate"] for e in rates]} for split, m in out["splits"].items()
              for k, rates in m.items()}
    bands = {f"{split} {k}": {"dream": [e["ci95"] for e in rates]} for split, m in out["splits"].items()
             for k, rates in m.items()}
    plot_panels(args.out / "masked.png", list(MASK_RATIOS), panels, "mask ratio (share of tokens hidden)",
                "top-1", "Reverse search and zero-shot group of partially masked emoji (DREAM Fig. 7)",
                intervals=bands, chance={f"{s} {k}": c for s in out["splits"] for k, c in out["chance"].items()})


if __name__ == "__main__":
    main()
