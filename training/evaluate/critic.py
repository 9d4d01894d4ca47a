"""The critic's gap: how far SAD's choice among K candidates falls short of the best a perfect
critic could pick. All K candidates are decoded to the end and judged by the exact Shapes World
judge (`JudgeReranker`, used as the 'external reranker' of `Setting(k, rerank=True)`, so the
decoding is shared with the SAD settings); SAD's choice is compared with best-of-K by the judge,
and SAD's score at the decision with each candidate's final verdict."""

from __future__ import annotations

from typing import Sequence

import torch


class JudgeReranker:
    """The exact judge as an 'external reranker' (1 = faithful, 0 = not): decoding every
    candidate to the end and keeping a faithful one gives best-of-K by the judge, the ceiling a
    perfect critic could reach, and the judge's verdict on every candidate."""

    def scores(self, images, prompt: str) -> torch.Tensor:
        from training.data.shapes_world import judge

        return torch.tensor([float(judge(im, prompt)) for im in images])


def critic_stats(verdicts: Sequence[Sequence[float]], sad_scores: Sequence[Sequence[float]],
                 chosen: Sequence[int]) -> dict:
    """From the judge's verdict on every candidate [n, K], SAD's scores at the decision [n, K] and
    SAD's choice [n]: the share of faithful candidates, of SAD's choices and of prompts with at
    least one faithful candidate (best-of-K), the gap between the last two, and the within-prompt
    correlation of SAD's score with the verdict (mean over prompts whose candidates are mixed)."""
    verdicts = torch.as_tensor(verdicts, dtype=torch.float32)
    sad_scores = torch.as_tensor(sad_scores, dtype=torch.float32)
    chosen = torch.as_tensor(chosen, dtype=torch.long)
    k = verdicts.shape[1]
    picked_ok = verdicts.gather(1, chosen[:, None]).squeeze(1)
    mixed = (verdicts.sum(1) > 0) & (verdicts.sum(1) < k)
    z = (sad_scores - sad_scores.mean(1, keepdim=True)) / sad_scores.std(1, keepdim=True).clamp(min=1e-8)
    v = verdicts - verdicts.mean(1, keepdim=True)
    corr = float(((z * v).sum(1) / (v.norm(dim=1) * z.norm(dim=1)).clamp(min=1e-8))[mixed].mean()) if mixed.any() else None
    best = (verdicts.sum(1) > 0).float()
    return {"n": int(verdicts.shape[0]), "k": k, "candidate_rate": float(verdicts.mean()),
            "sad_rate": float(picked_ok.mean()), "best_of_k_rate": float(best.mean()),
            "gap": float(best.mean() - picked_ok.mean()), "sad_faithful": int(picked_ok.sum()),
            "best_of_k_faithful": int(best.sum()), "prompts_with_mixed_candidates": int(mixed.sum()),
            "score_verdict_correlation": corr}
