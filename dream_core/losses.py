"""DREAM's losses beyond the diffusion head's own: the masked contrastive loss and REPA's alignment.

The contrastive loss is the official *filtered* variant, made per sample: an image whose visible
share is below the threshold is removed as a query and as a negative, its caption stays a
negative. Embeddings are gathered across processes with gradients, so the logits span the global
batch; every rank computes the same global loss and DDP's averaging yields its exact gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x from every process along dim 0, keeping the autograd graph."""
    if world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    if world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def masked_contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, eligible: torch.Tensor,
                            logit_scale: torch.Tensor, hard_text_emb: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, dict[str, float]]:
    """Symmetric InfoNCE over the global batch restricted to eligible images.

    image_emb, text_emb: L2-normalised [B, E] (local); eligible: bool [B]; logit_scale: the
    (already clamped) log scale; hard_text_emb: optional [B, M, E] captions that are wrong for
    their image only (one attribute swapped): extra columns of that image's image-to-text row.
    Returns (loss, stats); loss is 0 with a graph when no sample is eligible anywhere."""
    img = gather_with_grad(image_emb)
    txt = gather_with_grad(text_emb)
    ok = gather_no_grad(eligible.to(torch.uint8)).bool()
    n_ok = int(ok.sum())
    scale = logit_scale.exp()
    if n_ok == 0:
        return (image_emb.sum() + text_emb.sum() + logit_scale) * 0.0, {"clip_global_eligible": 0.0}
    logits = scale * img @ txt.t()  # [N, N], image rows, text columns
    labels = torch.arange(img.shape[0], device=img.device)
    rows = ok.nonzero().squeeze(1)
    i2t = logits
    if hard_text_emb is not None:
        hard = gather_with_grad(hard_text_emb.flatten(1)).view(img.shape[0], hard_text_emb.shape[1], -1)
        i2t = torch.cat([logits, scale * torch.einsum("ne,nme->nm", img, hard)], dim=1)  # [N, N + M]
    loss_i2t = F.cross_entropy(i2t[rows], labels[rows], reduction="none")
    logits_t2i = logits.t().masked_fill(~ok[None, :], float("-inf"))
    loss_t2i = F.cross_entropy(logits_t2i[rows], labels[rows], reduction="none")
    loss = 0.5 * (loss_i2t + loss_t2i).mean()
    with torch.no_grad():
        acc = (i2t[rows].argmax(dim=1) == labels[rows]).float().mean().item()
    return loss, {"clip_global_eligible": n_ok / img.shape[0], "clip_i2t_acc": acc}


def repa_alignment_loss(projected: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """REPA: mean (1 - cosine) between projected encoder tokens and teacher tokens over `valid`."""
    cos = F.cosine_similarity(projected, target, dim=-1)
    w = valid.to(cos.dtype)
    return ((1 - cos) * w).sum() / w.sum().clamp(min=1)
