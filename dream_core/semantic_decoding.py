"""Semantically Aligned Decoding (SAD).

K candidate trajectories are decoded together (one batched forward per step) up to a decision
step; there the model's own encoder embeds each candidate's partially decoded latent (visible =
decided tokens) and the contrastive text tower embeds the prompt; the candidates are ranked by
cosine similarity and only the best continues. Beyond the paper: several decision steps (SAD in
stages: keep a given number of candidates at each, by default half, one after the last), a batch
of prompts decoded together (evaluation: `DreamPipeline.generate_batch` keeps the rows its
settings need), and an external-reranker mode that scores finished candidates with another model
(the paper's comparison; the rerankers are in `dream_core.rerankers`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol, Sequence

import torch

from .model import DreamModel
from .sampling import DecisionExplanation, DecodeState, EditStart, StepEvent, TextCondition, make_event, mar_decode


def keep_plan(num_candidates: int, decision_steps: Sequence[int], num_kept: Sequence[int] | None = None) -> list[int]:
    """How many candidates survive each decision: `num_kept`, one count per decision step (as
    `GenerationRequest.num_kept`, which checks them), or by default successive halving: half at
    each decision, exactly one after the last."""
    if num_kept is not None:
        if len(num_kept) != len(decision_steps):
            raise ValueError(f"num_kept must give one count per decision step, got {len(num_kept)} for "
                             f"{len(decision_steps)}")
        return [int(v) for v in num_kept]
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
    decoding), SAD at `decision_step` (a step, or increasing steps: SAD in stages keeping
    `num_kept` candidates after each, by default half, one after the last), or (`rerank`) all K
    decoded to the end and the best kept by an external model."""

    num_candidates: int = 1
    decision_step: int | tuple[int, ...] | None = None
    rerank: bool = False
    num_kept: tuple[int, ...] | None = None

    @property
    def decision_steps(self) -> list[int]:
        d = self.decision_step
        return [] if d is None or self.rerank else list(d) if isinstance(d, tuple) else [d]

    def stages(self) -> list[tuple[int, int]]:
        """(decision step, candidates kept after it) of a SAD setting, in order ([] otherwise)."""
        steps = self.decision_steps if self.num_candidates > 1 else []
        return list(zip(steps, keep_plan(self.num_candidates, steps, self.num_kept))) if steps else []

    @property
    def name(self) -> str:
        if self.num_candidates == 1:
            return "K=1"
        if self.rerank:
            return f"K={self.num_candidates} external reranker"
        if not isinstance(self.decision_step, tuple) and self.num_kept is None:
            return f"SAD K={self.num_candidates} step={self.decision_step}"
        steps, kept = zip(*self.stages())
        return f"SAD K={self.num_candidates} steps={','.join(map(str, steps))} kept={','.join(map(str, kept))}"


@dataclass
class Generated:
    """One setting's outcome for every prompt."""

    images: list = field(default_factory=list)  # PIL images, one per prompt
    chosen: list[int] = field(default_factory=list)  # candidate id kept, per prompt
    # per prompt, the K candidates' scores (in stages: each one's at the last decision it took part in)
    scores: list[list[float]] = field(default_factory=list)


@dataclass
class GenerationRun:
    results: dict[Setting, Generated]
    seconds: float
    row_steps: int  # decoder forwards x rows: the compute actually spent


def setting_outcome(setting: Setting, scores: dict[int, torch.Tensor], prompt: int,
                    step: int | None = None) -> tuple[list[int], list[float | None]]:
    """A setting's candidates of `prompt` still alive after its decisions up to `step` (all of
    them by default), increasing, and each candidate's score at the last of those decisions it
    was part of (None before any): K = 1 keeps candidate 0, a reranker all K (it chooses at the
    end), SAD the best-scored `keep_plan` count at each decision among those alive, as
    `semantic_decode` prunes. `scores[d]`: [prompts, kmax] SAD scores at decision step d."""
    k = setting.num_candidates
    alive = [0] if k == 1 else list(range(k))
    last: list[float | None] = [None] * k
    for d, count in setting.stages():
        if step is not None and d > step:
            break
        sc = scores[d][prompt]
        for c in alive:
            last[c] = float(sc[c])
        order = rank_candidates(sc[alive])
        alive = sorted(alive[i] for i in order[:count])
    return alive, last


def rows_needed(settings: Sequence[Setting], scores: dict[int, torch.Tensor], n: int, kmax: int,
                step: int | None = None) -> list[int]:
    """Rows (prompt-major, kmax per prompt) some setting still needs after the decision at
    `step` (default: after every decision)."""
    need = {p * kmax + c for s in settings for p in range(n) for c in setting_outcome(s, scores, p, step)[0]}
    return sorted(need)


#: Which rows continue after a decision: (the state at the decision step, the active rows'
#: scores on the CPU) -> indices of the rows to keep, into the active rows. It is also the hook
#: for another critic: it may read the state (bench.sad_lookahead scores one-step completions)
#: and keep every row.
KeepRule = Callable[[DecodeState, torch.Tensor], Sequence[int]]


def keep_best(num_candidates: int, decision_steps: Sequence[int], num_kept: Sequence[int] | None = None) -> KeepRule:
    """The default rule: the best-scored `keep_plan` count at each decision step (by default half,
    the best one at the last)."""
    plan = dict(zip(decision_steps, keep_plan(num_candidates, decision_steps, num_kept)))

    def keep(state: DecodeState, scores: torch.Tensor) -> list[int]:
        return rank_candidates(scores)[:plan[state.step]]

    return keep


def semantic_decode(model: DreamModel, text: TextCondition, text_emb: torch.Tensor | None,
                    generators: list[torch.Generator], num_steps: int, decision_steps: Sequence[int],
                    guidance_scale: float | None = None, guidance_schedule: str | None = None,
                    temperature: float | None = None, head_steps: int | None = None, head_sampler: str | None = None,
                    should_stop: Callable[[], bool] | None = None, device: torch.device | str = "cpu",
                    shared_order: bool = True, start: EditStart | None = None, explain: bool = False,
                    keep: KeepRule | None = None, num_kept: Sequence[int] | None = None, order_groups: int = 1,
                    step_events: bool = True) -> Iterator[StepEvent]:
    """Decode len(generators) candidates, scoring them at each decision step (while more than one
    is left) and keeping those `keep` picks (default: `keep_best` with `num_kept`, one count per
    decision step; None = successive halving). Yields every step's event and a
    "decision" event carrying every candidate's score, rank and pruned flag (and, with `explain`, a
    DecisionExplanation of the scores). `text_emb`: the prompt's joint-space embedding [1, E], or one
    per candidate [R, E] (a batch of prompts, with `text.row_prompt` and `order_groups`); None only
    without decisions. `start`: an edit's kept tokens (see `sampling.EditStart`); the score reads
    the whole image, kept and decided tokens. Sampler settings left None are the model's defaults.
    `step_events=False`: only the decision and "done" events."""
    k_total = len(generators)
    decisions = set(decision_steps) if k_total > 1 else set()
    if decisions and text_emb is None:
        raise ValueError("semantic_decode needs the prompt's embedding (text_emb) to score candidates")
    if keep is None and decisions:
        keep = keep_best(k_total, sorted(decisions), num_kept)
    scores: list[float | None] = [None] * k_total
    ranks: list[int | None] = [None] * k_total
    pruned = [False] * k_total

    def decide(state: DecodeState) -> list[StepEvent]:
        if state.step not in decisions or len(state.candidate_ids) <= 1:
            return []
        ids = state.candidate_ids
        emb = text_emb if text_emb.shape[0] == 1 else text_emb[torch.tensor(ids, device=text_emb.device)]
        s = alignment_scores(model, state.tokens, state.mask, emb).cpu()
        kept = sorted(keep(state, s))
        alive = set(kept)
        for rank, row in enumerate(rank_candidates(s)):
            cid = ids[row]
            scores[cid], ranks[cid] = float(s[row]), rank + 1
            pruned[cid] = row not in alive
        event = make_event("decision", state, num_steps, k_total, scores=list(scores), ranks=list(ranks),
                           pruned=list(pruned), chosen=ids[kept[0]] if len(kept) == 1 else None)
        if explain:
            event.explanation = DecisionExplanation(state.step, list(ids), s.float().clone(),
                                                    explain_scores(model, state.tokens, state.mask, emb))
        state.select(kept)
        return [event]

    for event in mar_decode(model, text, generators, num_steps, guidance_scale, guidance_schedule, temperature,
                            head_steps, head_sampler, before_step=decide, should_stop=should_stop, device=device,
                            shared_order=shared_order, start=start, order_groups=order_groups,
                            step_events=step_events):
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
