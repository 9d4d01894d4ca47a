"""The MAR decoding loop, batched over candidates, as a generator of step events.

Each row (candidate) owns a `torch.Generator`: its random generation order and all the noise its
diffusion-head sampling injects come from it, drawn in a fixed order. By default the K candidates
of one image share one generation order (the first row's, as the official SAD): at a decision
they then differ only in the *content* of the same decided positions, so the critic compares
like with like instead of ranking how much of the object each happened to decide. Row 0 is
therefore the K = 1 image of the same seed. `shared_order=False` gives each row its own order.
All rows share the cosine schedule, so they always have the same number of visible
tokens and the encoder runs without padding. The encoder never sees text, so with CFG it runs
once on the K rows and only the decoder and head see the doubled [cond; uncond] batch. The text
aligner and the decoder's cross-attention keys/values are computed once per call.
"""

from __future__ import annotations


from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from .encoder import EncoderOutput
from .masking import decoding_schedule
from .model import DreamModel
from .request import GUIDANCE_SCHEDULES, sampler_defaults


def guidance_at(scale: float, schedule: str, masked_after: int, seq_len: int) -> float:
    """CFG scale of a step. `linear` (Muse/MAR): 1 + (s - 1) * decided share after the step."""
    if schedule == "constant":
        return scale
    if schedule == "linear":
        return 1.0 + (scale - 1.0) * (seq_len - masked_after) / seq_len
    raise ValueError(f"guidance_schedule must be one of {GUIDANCE_SCHEDULES}, got {schedule!r}")


@dataclass
class TextCondition:
    """Aligned prompt (and unconditional/negative prompt) with cached cross-attention keys/values.
    One prompt (batch 1, shared by every row) or, with `row_prompt`, a batch of prompts: candidate
    c then reads prompt `row_prompt[c]`, so the rows follow their candidates when SAD prunes."""

    kv_cond: list  # per decoder block (k, v), batch 1 or one row per prompt
    mask_cond: torch.Tensor  # bool [1 or P, T]
    kv_uncond: list | None = None  # batch 1: the empty (or negative) prompt every row shares
    mask_uncond: torch.Tensor | None = None
    row_prompt: torch.Tensor | None = None  # long [R], candidate -> its prompt; None = one prompt
    # The last expand() result (the rows only change at SAD decisions).
    _expanded: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def build(cls, model: DreamModel, t5_hidden: torch.Tensor, t5_mask: torch.Tensor) -> "TextCondition":
        """t5_hidden [1 or 2, T, d] = [prompt; uncond] (second row only when CFG is used)."""
        text = model.align_text(t5_hidden, t5_mask)
        kv = model.decoder.text_kv(text)
        cond = cls([(k[:1], v[:1]) for k, v in kv], t5_mask[:1])
        if t5_hidden.shape[0] > 1:
            cond.kv_uncond = [(k[1:2], v[1:2]) for k, v in kv]
            cond.mask_uncond = t5_mask[1:2]
        return cond

    def expand(self, rows: int | list[int], cfg: bool) -> tuple[list, torch.Tensor]:
        """Keys/values and mask for a batch of rows (doubled as [cond; uncond] with CFG): `rows` is
        their number, or their candidate ids (needed with `row_prompt`). Computed once per set of
        rows and reused while the fields stay the same objects."""
        if self.row_prompt is None:
            rows = rows if isinstance(rows, int) else len(rows)
        elif isinstance(rows, int):
            raise ValueError("a TextCondition of several prompts expands for candidate ids, not a row count")
        key = (rows if isinstance(rows, int) else tuple(rows), cfg, id(self.kv_cond), id(self.kv_uncond),
               id(self.mask_cond), id(self.mask_uncond))
        if key not in self._expanded:
            self._expanded.clear()
            self._expanded[key] = self._expand(rows, cfg)
        return self._expanded[key]

    def _expand(self, rows: int | list[int], cfg: bool) -> tuple[list, torch.Tensor]:
        def rep(t: torch.Tensor, n: int) -> torch.Tensor:
            return t.expand(n, *t.shape[1:])

        if isinstance(rows, int):
            kv_cond = [(rep(k, rows), rep(v, rows)) for k, v in self.kv_cond]
            mask_cond = rep(self.mask_cond, rows)
        else:
            idx = self.row_prompt[torch.tensor(rows, dtype=torch.long)].to(self.mask_cond.device)
            rows = len(rows)
            kv_cond = [(k[idx], v[idx]) for k, v in self.kv_cond]
            mask_cond = self.mask_cond[idx]
        if not cfg:
            return kv_cond, mask_cond
        kv = [(torch.cat([kc, rep(ku, rows)]), torch.cat([vc, rep(vu, rows)]))
              for (kc, vc), (ku, vu) in zip(kv_cond, self.kv_uncond)]
        return kv, torch.cat([mask_cond, rep(self.mask_uncond, rows)])


@dataclass
class DecodeState:
    """The live state of the active candidates (rows)."""

    tokens: torch.Tensor  # [R, L, C]; undecided positions hold 0
    mask: torch.Tensor  # bool [R, L], True = not yet decided
    orders: torch.Tensor  # long [R, L], each row's random generation order
    generators: list[torch.Generator]
    candidate_ids: list[int]  # original candidate index of each row
    step: int = 0  # steps completed

    def select(self, rows: list[int]) -> None:
        idx = torch.tensor(rows, device=self.tokens.device, dtype=torch.long)
        self.tokens, self.mask, self.orders = self.tokens[idx], self.mask[idx], self.orders[idx]
        self.generators = [self.generators[r] for r in rows]
        self.candidate_ids = [self.candidate_ids[r] for r in rows]


@dataclass(frozen=True)
class EditStart:
    """Where masked decoding (inpainting, variations) starts: the source image's tokens, decided,
    except the `regenerate` ones. The rows' generation orders put the regenerated positions first
    (in each row's own random order) and the cosine schedule runs over their number only, so the
    sampler, CFG and SAD decode exactly those; every other token stays the source's, bit for bit.
    With every token regenerated this is text-to-image: same orders, same noise, same tokens."""

    tokens: torch.Tensor  # [L, C] the source's VAE tokens (posterior mean)
    regenerate: torch.Tensor  # bool [L], True = decoded anew

    @property
    def num_regenerated(self) -> int:
        return int(self.regenerate.sum())


@dataclass
class DecisionExplanation:
    """Why a candidate won: per candidate, each visible token's leave-one-out contribution to its
    SAD score (see `semantic_decoding.explain_scores`). Tensors live on the CPU."""

    step: int
    candidate_ids: list[int]  # the rows scored, by original candidate index
    scores: torch.Tensor  # [R] the SAD scores
    contributions: torch.Tensor  # [R, L]; score - score without that token; NaN where not visible

    def for_candidate(self, cid: int) -> torch.Tensor:
        return self.contributions[self.candidate_ids.index(cid)]


@dataclass
class StepEvent:
    """Emitted after every decoding step (and by SAD at each decision). Tensors live on the CPU."""

    kind: str  # "step" | "decision" | "done"
    step: int  # steps completed
    num_steps: int
    fraction_decided: float
    tokens: torch.Tensor  # [R, L, C] of the active rows
    mask: torch.Tensor  # bool [R, L], True = undecided
    candidate_ids: list[int]
    num_candidates: int
    scores: list[float | None] = field(default_factory=list)  # per original candidate
    ranks: list[int | None] = field(default_factory=list)  # 1 = best, per original candidate
    pruned: list[bool] = field(default_factory=list)  # per original candidate
    chosen: int | None = None
    explanation: DecisionExplanation | None = None  # on "decision" events, when asked for


def init_state(seq_len: int, token_dim: int, generators: list[torch.Generator], device: torch.device,
               dtype: torch.dtype = torch.float32, order_groups: int = 1, shared_order: bool = True,
               start: EditStart | None = None) -> DecodeState:
    """Every row draws a generation order first from its own generator (so its noise stream is the
    same either way). With `shared_order` the rows, taken as `order_groups` consecutive groups of
    equal size (one group per image), all use the first row's order of their group. With `start`
    (an edit), every row starts from its tokens, the kept ones decided, and each order lists the
    regenerated positions first, in the order's own sequence."""
    r = len(generators)
    if r % order_groups:
        raise ValueError(f"{r} rows cannot be split into {order_groups} equal order groups")
    orders = torch.stack([torch.randperm(seq_len, generator=g) for g in generators])
    if shared_order:
        per = r // order_groups
        orders = orders[::per].repeat_interleave(per, dim=0)
    tokens = torch.zeros(r, seq_len, token_dim, dtype=dtype)
    mask = torch.ones(r, seq_len, dtype=torch.bool)
    if start is not None:
        regen = start.regenerate.cpu().bool()
        if start.tokens.shape != (seq_len, token_dim) or regen.shape != (seq_len,):
            raise ValueError(f"an edit's start must hold [{seq_len}, {token_dim}] tokens and a [{seq_len}] mask, "
                             f"got {tuple(start.tokens.shape)} and {tuple(regen.shape)}")
        if not regen.any():
            raise ValueError("an edit must regenerate at least one token")
        kept_last = (~regen)[orders].to(torch.int8)  # per row: 0 = regenerated, 1 = kept
        orders = torch.gather(orders, 1, torch.argsort(kept_last, dim=1, stable=True))
        tokens[:] = torch.where(regen[:, None], 0.0, start.tokens.detach().cpu().to(dtype))
        mask[:] = regen
    return DecodeState(tokens=tokens.to(device), mask=mask.to(device), orders=orders.to(device),
                       generators=list(generators), candidate_ids=list(range(r)))


@torch.inference_mode()
def decode_step(model: DreamModel, state: DecodeState, text: TextCondition, schedule: list[int],
                guidance_scale: float, guidance_schedule: str, temperature: float, head_steps: int,
                head_sampler: str | None = None) -> None:
    """Advance every row by one MAR step: encode visible tokens, decode with the text, sample the
    tokens of this step with the diffusion head (`head_sampler`, None = the model's default),
    write them in."""
    k = state.step
    rows, seq_len, c = state.tokens.shape
    device = state.tokens.device
    masked_after = schedule[k]
    cfg = guidance_scale != 1.0

    # The first `masked_after` positions of each order stay masked; the rest of the masked ones are decoded now.
    next_mask = torch.zeros_like(state.mask)
    next_mask.scatter_(1, state.orders[:, :masked_after], True)
    to_pred = state.mask & ~next_mask
    m = int(to_pred[0].sum())
    pos = to_pred.nonzero()[:, 1].view(rows, m)  # sorted positions per row

    enc = model.encoder(state.tokens, state.mask)
    if cfg:
        enc = EncoderOutput(torch.cat([enc.hidden, enc.hidden]), torch.cat([enc.valid, enc.valid]),
                            torch.cat([enc.visible_index, enc.visible_index]), True)
    kv, text_mask = text.expand(state.candidate_ids, cfg)
    # z only where tokens are decoded now: the decoder's last block then runs on those rows alone.
    zz = model.decoder(enc, None, text_mask, text_kv=kv, positions=torch.cat([pos, pos]) if cfg else pos)
    zz = zz.reshape(-1, zz.shape[-1])  # [(R or 2R) * m, D]
    noise = torch.cat([torch.randn(head_steps + 1, m, c, generator=g) for g in state.generators], dim=1)
    scale = guidance_at(guidance_scale, guidance_schedule, masked_after, seq_len)
    clip = model.config.clip_denoised or None
    sampler = sampler_defaults(model.config)["head_sampler"] if head_sampler is None else head_sampler
    x = model.head.sample(zz, noise.to(device), guidance_scale=scale, temperature=temperature, clip_denoised=clip,
                          sampler=sampler)
    state.tokens.scatter_(1, pos[:, :, None].expand(-1, -1, c), x.view(rows, m, c).to(state.tokens.dtype))
    state.mask = next_mask
    state.step = k + 1


@torch.inference_mode()
def complete_in_one_step(model: DreamModel, state: DecodeState, text: TextCondition, generators: list[torch.Generator],
                         guidance_scale: float, guidance_schedule: str, temperature: float,
                         head_steps: int, head_sampler: str | None = None) -> torch.Tensor:
    """Every row's undecided tokens sampled at once, as if the next step were the last: the
    model's one-shot guess of each candidate's finished latent (what a critic could read of a
    candidate's future at this step). `state` is left untouched and the guess draws its noise
    from `generators` (one per row), not the rows' own, so decoding goes on exactly as without it.
    Returns the completed tokens [R, L, C]."""
    if len(generators) != state.tokens.shape[0]:
        raise ValueError(f"one generator per row: {state.tokens.shape[0]} rows, {len(generators)} generators")
    if not bool(state.mask.any()):
        return state.tokens.clone()
    guess = DecodeState(state.tokens.clone(), state.mask.clone(), state.orders, list(generators),
                        list(state.candidate_ids))
    decode_step(model, guess, text, [0], guidance_scale, guidance_schedule, temperature, head_steps, head_sampler)
    return guess.tokens


def make_event(kind: str, state: DecodeState, num_steps: int, num_candidates: int, **extra) -> StepEvent:
    seq_len = state.mask.shape[1]
    decided = 1.0 - float(state.mask[0].sum()) / seq_len
    # Snapshots (copy=True): on a CPU float32 state, .float().cpu() would alias the live tensor,
    # which later steps overwrite in place, so kept events would change after the fact.
    return StepEvent(kind, state.step, num_steps, decided,
                     state.tokens.detach().to("cpu", torch.float32, copy=True),
                     state.mask.detach().to("cpu", copy=True), list(state.candidate_ids), num_candidates, **extra)


def mar_decode(model: DreamModel, text: TextCondition, generators: list[torch.Generator], num_steps: int,
               guidance_scale: float | None = None, guidance_schedule: str | None = None,
               temperature: float | None = None, head_steps: int | None = None, head_sampler: str | None = None,
               before_step: Callable[[DecodeState], list[StepEvent]] | None = None,
               should_stop: Callable[[], bool] | None = None, device: torch.device | str = "cpu",
               shared_order: bool = True, start: EditStart | None = None, order_groups: int = 1,
               step_events: bool = True) -> Iterator[StepEvent]:
    """Plain MAR decoding of len(generators) rows; `before_step` may prune rows (SAD) and return
    events to emit. Stops between steps when `should_stop()` is true (no "done" event then).
    With `start` (an edit) only its regenerated tokens are decoded: the cosine schedule runs over
    their number (num_steps <= that number). Sampler settings left None are the model's defaults
    (`request.sampler_defaults`). `order_groups`: consecutive groups of rows that share an order
    (one per prompt of a batch, see `init_state`). `step_events=False` yields only the "done" event
    (and `before_step`'s): no per-step snapshot of every row for a caller that does not look."""
    c = model.config
    defaults = sampler_defaults(c)
    guidance_scale = defaults["guidance_scale"] if guidance_scale is None else guidance_scale
    guidance_schedule = defaults["guidance_schedule"] if guidance_schedule is None else guidance_schedule
    temperature = defaults["temperature"] if temperature is None else temperature
    head_steps = defaults["head_steps"] if head_steps is None else head_steps
    head_sampler = defaults["head_sampler"] if head_sampler is None else head_sampler
    schedule = decoding_schedule(num_steps, c.seq_len if start is None else start.num_regenerated)
    state = init_state(c.seq_len, c.token_dim, generators, torch.device(device), order_groups=order_groups,
                       shared_order=shared_order, start=start)
    k_total = len(generators)
    while state.step < num_steps:
        if should_stop is not None and should_stop():
            return
        if before_step is not None:
            yield from before_step(state)
        decode_step(model, state, text, schedule, guidance_scale, guidance_schedule, temperature, head_steps,
                    head_sampler)
        if step_events or state.step == num_steps:
            yield make_event("step" if state.step < num_steps else "done", state, num_steps, k_total)


def candidate_generators(seed: int, num_candidates: int, device: str = "cpu") -> list[torch.Generator]:
    """Candidate k uses seed + k for its noise (and, with independent orders, its order)."""
    return [torch.Generator(device).manual_seed((seed + k) % (2**63)) for k in range(num_candidates)]


__all__ = ["DecisionExplanation", "DecodeState", "EditStart", "StepEvent", "TextCondition", "candidate_generators",
           "complete_in_one_step", "decode_step", "guidance_at", "init_state", "mar_decode", "make_event"]
