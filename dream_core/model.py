"""DreamModel: the trainable parts of DREAM tied together.

MAR encoder (vision only) -> FLUID decoder (cross-attends to T5 + aligner) -> per-token diffusion
head; and, on the encoder's pooled output, a projector into the joint space shared with the
contrastive text tower. The frozen VAE and T5 live outside (see `DreamPipeline`), so
`DreamModel(config).parameters()` are exactly the trainable parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import DreamConfig
from .decoder import TextConditionedDecoder
from .diffusion import DiffusionHead
from .encoder import EncoderOutput, MaskedEncoder
from .layers import AttentionPooler, init_weights
from .losses import masked_contrastive_loss, repa_alignment_loss
from .text import ContrastiveTextTower, ImageProjector, TextAligner


class DreamModel(nn.Module):
    def __init__(self, config: DreamConfig) -> None:
        super().__init__()
        self.config = config.validate()
        c = config
        self.encoder = MaskedEncoder(c)
        self.decoder = TextConditionedDecoder(c)
        self.aligner = TextAligner(c)
        self.pooler = (AttentionPooler(c.width, c.num_heads, c.buffer_size + c.seq_len)
                       if c.clip_pooling == "attention" else None)
        self.projector = ImageProjector(c)
        self.repa_projector = (
            nn.Sequential(nn.Linear(c.width, 2048), nn.SiLU(), nn.Linear(2048, 2048), nn.SiLU(),
                          nn.Linear(2048, c.repa_teacher_dim))
            if c.repa_block else None
        )
        init_weights(self)  # xavier linears, as the official model (before the head and text tower)
        self.encoder.init_embeddings()
        self.decoder.init_embeddings()
        # The head and open_clip's tower keep their own initialisation (built after, as upstream).
        self.head = DiffusionHead(c.token_dim, c.width, c.head_width, c.head_depth,
                                  num_train_steps=c.num_train_timesteps, batch_mul=c.diffusion_batch_mul)
        self.text_tower = ContrastiveTextTower(c)
        self.logit_scale = nn.Parameter(torch.tensor(c.logit_scale_init))

    # ----- understanding -----
    def clamped_logit_scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(0.0, self.config.logit_scale_max)

    def embed_image(self, enc: EncoderOutput) -> torch.Tensor:
        """L2-normalised joint-space embedding of an encoder output (pooling and projection order
        from the config: `clip_pooling`, `clip_projection`)."""
        c = self.config
        if c.clip_projection == "pre":  # project every token (BN over all of them), then pool
            b, n, d = enc.hidden.shape
            per_token = self.projector(enc.hidden.reshape(b * n, d)).view(b, n, -1)
            return F.normalize(enc.pooled(c.clip_pooling, c.buffer_size, per_token), dim=-1)
        return F.normalize(self.projector(self.pool_tokens(enc)), dim=-1)

    def pool_tokens(self, enc: EncoderOutput) -> torch.Tensor:
        """[B, width]: the encoder output pooled over the tokens `clip_pooling` names, by the
        attention pooler or a mean; what the projector reads (with clip_projection="post")."""
        if self.pooler is not None:
            return self.pooler(enc.hidden, enc.valid, enc.positions())
        return enc.pooled(self.config.clip_pooling, self.config.buffer_size)

    def encode_image(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens [B, L, C] (+ mask, True = not yet decoded / hidden) -> normalised embedding [B, E]."""
        if mask is None:
            mask = torch.zeros(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return self.embed_image(self.encoder(tokens, mask))

    def encode_text(self, clip_tokens: torch.Tensor) -> torch.Tensor:
        """CLIP BPE tokens [B, context] -> normalised embedding [B, E]."""
        return F.normalize(self.text_tower(clip_tokens), dim=-1)

    # ----- generation -----
    def align_text(self, t5_hidden: torch.Tensor, t5_mask: torch.Tensor) -> torch.Tensor:
        return self.aligner(t5_hidden, t5_mask)

    def decode(self, enc: EncoderOutput, text: torch.Tensor | None, text_mask: torch.Tensor | None,
               text_kv=None) -> torch.Tensor:
        return self.decoder(enc, text, text_mask, text_kv)

    # ----- training -----
    def forward_train(self, tokens: torch.Tensor, mask: torch.Tensor, t5_hidden: torch.Tensor,
                      t5_mask: torch.Tensor, clip_tokens: torch.Tensor,
                      repa_target: torch.Tensor | None = None,
                      hard_clip_tokens: torch.Tensor | None = None,
                      view_tokens: torch.Tensor | None = None) -> dict[str, torch.Tensor | float]:
        """One training forward. tokens [B, L, C] clean latents; mask bool [B, L] (True = masked);
        t5_hidden/t5_mask: conditioning (caption dropout already applied); clip_tokens [B, ctx]:
        the real captions; hard_clip_tokens [B, M, ctx]: optional per-image hard-negative
        captions (extra image-to-text negatives); view_tokens [B, L, C]: optional clean latents of
        a second picture of each image's subject (for `view_weight`). Returns a dict with `loss`
        and the logged terms."""
        c = self.config
        L = tokens.shape[1]
        masked_frac = mask.float().sum(dim=1) / L
        need_repa = self.repa_projector is not None and repa_target is not None
        enc_out = self.encoder(tokens, mask, return_block=c.repa_block if need_repa else None)
        enc, block_out = enc_out if need_repa else (enc_out, None)
        out: dict[str, torch.Tensor | float] = {}
        total = tokens.new_zeros(())

        # Diffusion loss on masked tokens, for samples with at least `min_masked_for_diffusion` masked.
        diff_ok = (masked_frac >= c.min_masked_for_diffusion) & (masked_frac > 0)
        out["diffusion_share"] = diff_ok.float().mean().item()
        if c.diffusion_weight > 0:
            rows = diff_ok.nonzero().squeeze(1)
            weight = 1.0
            if rows.numel() == 0:  # keep every parameter in the graph (DDP), contribute nothing
                rows, weight = torch.zeros(1, dtype=torch.long, device=tokens.device), 0.0
            sub = EncoderOutput(enc.hidden[rows], enc.valid[rows], enc.visible_index[rows], enc.uniform)
            text = self.aligner(t5_hidden[rows], t5_mask[rows])
            z = self.decoder(sub, text, t5_mask[rows])
            per_sample = self.head.loss(tokens[rows], z, mask[rows].float())
            diffusion = per_sample.mean() * weight
            out["diffusion"] = diffusion.detach()
            total = total + c.diffusion_weight * diffusion

        # Contrastive loss on samples with at least `min_visible_for_clip` of their tokens visible.
        clip_ok = (1 - masked_frac) >= c.min_visible_for_clip
        out["clip_share"] = clip_ok.float().mean().item()
        if c.clip_weight > 0 or c.view_weight > 0:
            image_emb = self.embed_image(enc)
            out["logit_scale"] = self.clamped_logit_scale().exp().item()
        if c.clip_weight > 0:
            text_emb = self.encode_text(clip_tokens)
            hard_emb = None
            if hard_clip_tokens is not None:
                b, m, ctx = hard_clip_tokens.shape
                hard_emb = self.encode_text(hard_clip_tokens.reshape(b * m, ctx)).view(b, m, -1)
            clip, stats = masked_contrastive_loss(image_emb, text_emb, clip_ok, self.clamped_logit_scale(), hard_emb)
            out["clip"] = clip.detach()
            out.update(stats)
            total = total + c.clip_weight * clip
        if c.view_weight > 0:  # the same eligible images against a second picture of each, seen whole
            if view_tokens is None:
                raise ValueError("config.view_weight > 0 needs view_tokens: a second picture of each image's "
                                 "subject (the recipe's cross_style_views)")
            view, view_stats = masked_contrastive_loss(image_emb, self.encode_image(view_tokens), clip_ok,
                                                       self.clamped_logit_scale())
            out["view"] = view.detach()
            out["view_acc"] = view_stats.get("clip_i2t_acc", 0.0)
            total = total + c.view_weight * view

        if need_repa:
            nb = c.buffer_size
            feats = self.repa_projector(block_out[:, nb:])
            tgt = torch.gather(repa_target, 1, enc.visible_index[:, :, None].expand(-1, -1, repa_target.shape[-1]))
            repa = repa_alignment_loss(feats, tgt, enc.valid[:, nb:])
            out["repa"] = repa.detach()
            total = total + c.repa_weight * repa

        out["loss"] = total
        out["mask_ratio_mean"] = masked_frac.mean().item()
        return out

    def forward(self, *args, **kwargs):
        """The training forward (so DDP/FSDP wrappers see it); see `forward_train`."""
        return self.forward_train(*args, **kwargs)

    def num_parameters(self, trainable_only: bool = True) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def no_weight_decay_names(self) -> set[str]:
        """Norms, biases, embeddings, the diffusion head (as official) and the temperature."""
        names = set()
        for name, p in self.named_parameters():
            if (p.ndim <= 1 or name.endswith(".bias") or "pos_embed" in name or "embedding" in name
                    or name.startswith("head.") or name == "logit_scale" or "text_pos" in name
                    or "mask_token" in name or "positional_embedding" in name):
                names.add(name)
        return names


def drop_captions(t5_hidden: torch.Tensor, t5_mask: torch.Tensor, null_hidden: torch.Tensor,
                  null_mask: torch.Tensor, p: float, generator: torch.Generator | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each sample's T5 conditioning by the null caption's with probability p (for CFG).
    The contrastive tower always sees the real caption."""
    if p <= 0:
        return t5_hidden, t5_mask
    drop = torch.rand(t5_hidden.shape[0], generator=generator) < p
    drop = drop.to(t5_hidden.device)
    hidden = torch.where(drop[:, None, None], null_hidden.to(t5_hidden.dtype).expand_as(t5_hidden), t5_hidden)
    mask = torch.where(drop[:, None], null_mask.expand_as(t5_mask), t5_mask)
    return hidden, mask


def param_count_millions(model: nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


__all__ = ["DreamModel", "drop_captions", "param_count_millions"]
