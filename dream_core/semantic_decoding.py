"""Semantically Aligned Decoding (SAD).

K candidate trajectories are decoded together (one batched forward per step) up to a decision
step; there the model's own encoder embeds each candidate's partially decoded latent (visible =
decided tokens) and the contrastive text tower embeds the prompt; the candidates are ranked by
cosine similarity and only the best continues. Beyond the paper: several decision steps
(successive halving: keep half at each, one after the last), and an external-reranker mode that
scores finished candidates with another model (the paper's comparison): an open_clip model from local
weights (`ExternalReranker`) or another DREAM model directory's joint space (`DreamReranker`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol, Sequence

import torch

from .model import DreamModel
from .sampling import DecisionExplanation, DecodeState, EditStart, StepEvent, TextCondition, make_event, mar_decode


def halving_plan(num_candidates: int, decision_steps: Sequence[int]) -> list[int]:
    """How many candidates survive each decision: halve, and keep exactly one after the last."""
    keep, plan = num_candidates, []
    for i in range(len(decision_steps)):
        keep = 1 if i == len(decision_steps) - 1 else max(1, math.ceil(keep / 2))
        plan.append(keep)
    return plan


@torch.inference_mode()
def alignment_scores(model: DreamModel, tokens: torch.Tensor, mask: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """The SAD score: cosine between each candidate's partial-latent embedding (visible = decided
    tokens) and its prompt's embedding; `text_emb` is [1, E] (one prompt) or [R, E] (one per row)."""
    img = model.encode_image(tokens, mask).float()
    return (img * text_emb.float().to(img.device)).sum(-1)


@torch.inference_mode()
def explain_scores(model: DreamModel, tokens: torch.Tensor, mask: torch.Tensor, text_emb: torch.Tensor,
                   batch_rows: int = 256) -> torch.Tensor:
    """Why a candidate scores what it scores: for each row and each visible token j, the score
    minus the score with token j hidden as well (leave-one-token-out, exact: one extra encoder
    pass per visible token, R x V rows, batched). Positive = the token pulls the image towards the
    prompt. Hidden positions are NaN. Leave-one-out rather than a linear share because the
    projector after mean pooling is nonlinear (Linear-BN-ReLU), so shares of the pooled cosine
    would be approximations; these deltas are not additive (they need not sum to the score).
    Returns float32 [R, L] on the CPU."""
    rows, seq_len = mask.shape
    out = torch.full((rows, seq_len), float("nan"))
    base = alignment_scores(model, tokens, mask, text_emb).float().cpu()
    text_emb = text_emb.float()
    for r in range(rows):
        visible = (~mask[r]).nonzero().squeeze(1)
        if visible.numel() <= 1:
            continue
        emb = text_emb[r:r + 1] if text_emb.shape[0] > 1 else text_emb[:1]
        loo_mask = mask[r].expand(visible.numel(), -1).clone()
        loo_mask[torch.arange(visible.numel()), visible] = True
        loo = torch.cat([alignment_scores(model, tokens[r:r + 1].expand(len(chunk), -1, -1), chunk, emb).float().cpu()
                         for chunk in loo_mask.split(batch_rows)])
        out[r, visible.cpu()] = base[r] - loo
    return out


def rank_candidates(scores: torch.Tensor | Sequence[float]) -> list[int]:
    """Indices best first; ties go to the lower index (a stable sort), so a rerun picks the same."""
    return torch.argsort(torch.as_tensor(scores).float().cpu(), descending=True, stable=True).tolist()


@dataclass(frozen=True)
class Setting:
    """How the final image is chosen among K candidates in batched generation: K = 1 (plain MAR
    decoding), SAD at `decision_step`, or (`rerank`) all K decoded to the end and the best kept by
    an external model."""

    num_candidates: int = 1
    decision_step: int | None = None
    rerank: bool = False

    @property
    def name(self) -> str:
        if self.num_candidates == 1:
            return "K=1"
        if self.rerank:
            return f"K={self.num_candidates} external reranker"
        return f"SAD K={self.num_candidates} step={self.decision_step}"


@dataclass
class Generated:
    """One setting's outcome for every prompt."""

    images: list = field(default_factory=list)  # PIL images, one per prompt
    chosen: list[int] = field(default_factory=list)  # candidate id kept, per prompt
    scores: list[list[float]] = field(default_factory=list)  # per prompt, the K candidates' scores


@dataclass
class GenerationRun:
    results: dict[Setting, Generated]
    seconds: float
    row_steps: int  # decoder forwards x rows: the compute actually spent


def rows_needed(settings: Sequence[Setting], scores: dict[int, torch.Tensor], n: int, kmax: int) -> list[int]:
    """Rows (prompt-major, kmax per prompt) some setting still needs after the last decision."""
    need: set[tuple[int, int]] = set()
    for s in settings:
        for p in range(n):
            if s.num_candidates == 1:
                need.add((p, 0))
            elif s.rerank:
                need.update((p, c) for c in range(s.num_candidates))
            else:
                need.add((p, rank_candidates(scores[s.decision_step][p, :s.num_candidates])[0]))
    return sorted(p * kmax + c for p, c in need)


def semantic_decode(model: DreamModel, text: TextCondition, text_emb: torch.Tensor,
                    generators: list[torch.Generator], num_steps: int, decision_steps: Sequence[int],
                    guidance_scale: float = 1.0, guidance_schedule: str = "constant", temperature: float = 1.0,
                    head_steps: int = 100, should_stop: Callable[[], bool] | None = None,
                    device: torch.device | str = "cpu", shared_order: bool = True, start: EditStart | None = None,
                    explain: bool = False) -> Iterator[StepEvent]:
    """Decode len(generators) candidates, pruning at each decision step. Yields every step's event
    and a "decision" event carrying every candidate's score, rank and pruned flag (and, with
    `explain`, a DecisionExplanation of the scores). `start`: an edit's kept tokens (see
    `sampling.EditStart`); the score reads the whole image, kept and decided tokens."""
    k_total = len(generators)
    plan = dict(zip(decision_steps, halving_plan(k_total, decision_steps))) if k_total > 1 else {}
    scores: list[float | None] = [None] * k_total
    ranks: list[int | None] = [None] * k_total
    pruned = [False] * k_total

    def before_step(state: DecodeState) -> list[StepEvent]:
        keep = plan.get(state.step)
        if keep is None or len(state.candidate_ids) <= keep:
            return []
        s = alignment_scores(model, state.tokens, state.mask, text_emb).cpu()
        order = rank_candidates(s)
        for rank, row in enumerate(order):
            cid = state.candidate_ids[row]
            scores[cid], ranks[cid] = float(s[row]), rank + 1
            if rank >= keep:
                pruned[cid] = True
        event = make_event("decision", state, num_steps, k_total, scores=list(scores), ranks=list(ranks),
                           pruned=list(pruned), chosen=state.candidate_ids[order[0]] if keep == 1 else None)
        if explain:
            event.explanation = DecisionExplanation(state.step, list(state.candidate_ids), s.float().clone(),
                                                    explain_scores(model, state.tokens, state.mask, text_emb))
        state.select(sorted(order[:keep]))
        return [event]

    for event in mar_decode(model, text, generators, num_steps, guidance_scale, guidance_schedule, temperature,
                            head_steps, before_step=before_step, should_stop=should_stop, device=device,
                            shared_order=shared_order, start=start):
        event.scores, event.ranks, event.pruned = list(scores), list(ranks), list(pruned)
        if event.kind == "done" and len(event.candidate_ids) == 1:
            event.chosen = event.candidate_ids[0]
        yield event


class Reranker(Protocol):
    """What `Setting(k, rerank=True)` needs: a score per finished candidate image for the prompt,
    higher = better (`DreamPipeline.generate_batch` keeps the best)."""

    def scores(self, images: list, prompt: str) -> torch.Tensor: ...


def is_reranker(obj: object) -> bool:
    return callable(getattr(obj, "scores", None))


class DreamReranker:
    """Scores finished images with another DREAM model directory's joint space (e.g. one trained
    with the contrastive-only `shapes-clip` recipe): its own VAE encodes each image, its encoder
    embeds the latent with nothing masked, its text tower embeds the prompt; score = cosine."""

    def __init__(self, model_dir: str | Path, device: str | torch.device = "cpu") -> None:
        from .pipeline import DreamPipeline  # the pipeline module imports this one

        self.pipe = DreamPipeline.from_pretrained(model_dir, device=device)

    @torch.inference_mode()
    def scores(self, images: list, prompt: str) -> torch.Tensor:
        img = self.pipe.embed_images(list(images))
        txt = self.pipe.embed_texts([prompt])
        return (img @ txt.t()).squeeze(-1).float().cpu()


class ExternalReranker:
    """Scores finished images against the prompt with an open_clip model loaded from local weights."""

    def __init__(self, arch: str, weights: str | Path, device: str = "cpu") -> None:
        import open_clip

        weights = Path(weights)
        if not weights.is_file():
            raise ValueError(f"external reranker weights not found: {weights} (no download is attempted)")
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=str(weights), device=device)
        self.model, self.preprocess = model.eval(), preprocess
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.device = device

    @torch.inference_mode()
    def scores(self, images: list, prompt: str) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(im) for im in images]).to(self.device)
        img = torch.nn.functional.normalize(self.model.encode_image(pixels), dim=-1)
        txt = torch.nn.functional.normalize(self.model.encode_text(self.tokenizer([prompt]).to(self.device)), dim=-1)
        return (img @ txt.t()).squeeze(-1).float().cpu()
