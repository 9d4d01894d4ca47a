"""Does SAD pick better if its score is normalised by the caption bank? An experiment, rejected on
the bundled model (docs/experiments/sad-critic.md).

SAD ranks a prompt's K candidates by the cosine of each (partial) image embedding with the prompt.
The cosine mixes how typical an image is with which caption it fits; the reverse-search view,
log P(prompt | image) among the bank's captions (softmax at the model's logit scale), separates
the two. All K candidates of each prompt are decoded to the end and judged (the exact Shapes World
judge); both scores are computed on the same candidates at each decision step (from the embeddings
SAD computes there, recorded by wrapping the model's `encode_image`) and on the finished images,
and the table gives how often each score's pick is faithful, beside a random candidate and best of
K by the judge.

    python -m bench.sad_bank_normalised --model assets/dream-shapes --n 200 --json out.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bench.common import command_line, markdown_table, patched, setup_threads
from dream_core.request import SamplerSettings
from dream_core.semantic_decoding import Setting
from training.evaluate.cli import load_pipeline, run_metadata, write_json
from training.evaluate.critic import JudgeReranker
from training.evaluate.faithfulness import prompt_set
from training.evaluate.sets import EVAL_SEED, prompt_seeds
from training.evaluate.stats import format_rate, rate_with_interval


class RecordingJudge(JudgeReranker):
    """The judge as the reranker (so every candidate is decoded to the end), also keeping each
    prompt's verdicts and the joint-space embeddings of its finished candidates."""

    def __init__(self, pipe) -> None:
        self.pipe, self.verdicts, self.finished = pipe, [], []

    def scores(self, images, prompt: str) -> torch.Tensor:
        v = super().scores(images, prompt)
        self.verdicts.append(v)
        self.finished.append(self.pipe.embed_images(list(images)).float().cpu())
        return v


def pick_rates(emb: torch.Tensor, text: torch.Tensor, bank: torch.Tensor, scale: float,
               verdicts: torch.Tensor) -> dict[str, float]:
    """emb [n, K, E] candidate embeddings, text [n, E] prompts, bank [B, E]: the share of prompts
    whose pick is faithful, by raw cosine and by log P(prompt | image) over the bank plus the prompt."""
    cos = torch.einsum("nke,ne->nk", emb, text)
    against = torch.cat([torch.einsum("nke,be->nkb", emb, bank), cos[..., None]], -1)
    normalised = scale * cos - torch.logsumexp(scale * against, -1)
    return {name: float(verdicts.gather(1, sc.argmax(1, keepdim=True)).mean())
            for name, sc in (("cosine", cos), ("bank_normalised", normalised))}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="assets/dream-shapes")
    ap.add_argument("--n", type=int, default=200, help="prompts of the fixed evaluation set")
    ap.add_argument("--objects", type=int, default=1, choices=(1, 2))
    ap.add_argument("--k", type=int, default=9)
    ap.add_argument("--decision-steps", default="6,10,14")
    ap.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.n < 1 or args.k < 2:
        raise SystemExit("--n must be >= 1 and --k must be >= 2")
    setup_threads(args.threads)
    pipe = load_pipeline(args.model, args.device)
    steps = sorted({int(s) for s in args.decision_steps.split(",")})
    bank = pipe.caption_bank().embeddings
    scale = float(pipe.model.clamped_logit_scale().exp().detach())
    prompts, seeds = prompt_set(args.objects, args.n, EVAL_SEED), prompt_seeds(args.n, EVAL_SEED)
    settings = [Setting(args.k, d) for d in steps] + [Setting(args.k, rerank=True)]
    judge = RecordingJudge(pipe)
    partial: dict[int, list[torch.Tensor]] = {d: [] for d in steps}
    recorded: list[torch.Tensor] = []
    encode = pipe.model.encode_image

    def recording_encode(tokens, mask=None):
        out = encode(tokens, mask)
        if mask is not None:  # SAD's partial latents; finished images come through embed_images
            recorded.append(out.float().cpu())
        return out

    t = time.perf_counter()
    with patched(pipe.model, "encode_image", recording_encode):
        for i in range(0, args.n, args.batch_size):
            recorded.clear()  # one masked encode per decision step, in order
            pipe.generate_batch(prompts[i:i + args.batch_size], seeds[i:i + args.batch_size], settings,
                                SamplerSettings(), batch_size=args.batch_size, reranker=judge)
            for d, e in zip(steps, recorded):
                partial[d].append(e.view(-1, args.k, e.shape[-1]))
    verdicts = torch.stack(judge.verdicts)
    text = pipe.embed_texts(prompts).float().cpu()
    rows = {f"decision step {d}": pick_rates(torch.cat(partial[d]), text, bank, scale, verdicts) for d in steps}
    rows["finished images"] = pick_rates(torch.stack(judge.finished), text, bank, scale, verdicts)
    n = args.n
    res = {"command": command_line("bench/sad_bank_normalised.py", argv), "model": args.model,
           "meta": run_metadata(pipe, args), "n": n,
           "objects": args.objects, "k": args.k, "random_candidate": float(verdicts.mean()),
           "best_of_k": float((verdicts.sum(1) > 0).float().mean()), "picks": rows,
           "seconds": time.perf_counter() - t}
    print(f"random candidate {res['random_candidate']:.1%}, best of {args.k} by the judge {res['best_of_k']:.1%}")
    print(markdown_table(["scored", "cosine pick faithful", "bank-normalised pick faithful"],
                         [[k, format_rate(rate_with_interval(round(v["cosine"] * n), n)),
                           format_rate(rate_with_interval(round(v["bank_normalised"] * n), n))]
                          for k, v in rows.items()]))
    if args.json:
        write_json(args.json, res)
    return res


if __name__ == "__main__":
    main()
