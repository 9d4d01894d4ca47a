"""MAR encoder: buffer tokens + visible image tokens only; it never sees text.

Samples in one batch may have different numbers of visible tokens (per-sample mask ratios): the
visible tokens are packed to the front, padded to the longest, and padding is excluded from
attention with a key mask. When every sample has the same count (always true while decoding) no
mask is used, which is exactly the official computation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import DreamConfig
from .layers import Block


@dataclass
class EncoderOutput:
    hidden: torch.Tensor  # [B, buffer + V, D], after the final LayerNorm
    valid: torch.Tensor  # bool [B, buffer + V], False on padding
    visible_index: torch.Tensor  # long [B, V], the image position of each kept token
    uniform: bool  # True when no padding was needed

    def positions(self) -> torch.Tensor:
        """long [B, buffer + V]: each row's index in the encoder's sequence (buffer slots first,
        then buffer_size + the image position of each kept token)."""
        b, v = self.visible_index.shape
        nb = self.hidden.shape[1] - v
        buffer = torch.arange(nb, device=self.visible_index.device).expand(b, -1)
        return torch.cat([buffer, nb + self.visible_index], dim=1)

    def pooled(self, which: str = "all", buffer_size: int = 0, features: torch.Tensor | None = None) -> torch.Tensor:
        """Mean of `features` (default: the hidden states) over the tokens the image's contrastive
        feature reads: "all" = buffer + visible (the official default), "image" = visible image
        tokens, "buffer" = the first `buffer_size` tokens. Padding is always excluded."""
        x = self.hidden if features is None else features
        w = self.valid.to(x.dtype)
        if which == "image":
            w = torch.cat([torch.zeros_like(w[:, :buffer_size]), w[:, buffer_size:]], dim=1)
        elif which == "buffer":
            w = torch.cat([w[:, :buffer_size], torch.zeros_like(w[:, buffer_size:])], dim=1)
        elif which != "all":
            raise ValueError(f"pooling must be all, image or buffer, got {which!r}")
        if which == "all" and self.uniform:
            return x.mean(dim=1)
        w = w.unsqueeze(-1)
        return (x * w).sum(dim=1) / w.sum(dim=1).clamp(min=1)


class MaskedEncoder(nn.Module):
    def __init__(self, config: DreamConfig) -> None:
        super().__init__()
        c = config
        self.buffer_size = c.buffer_size
        self.z_proj = nn.Linear(c.token_dim, c.width)
        # The official model fills every buffer slot with class_emb[0] (all labels are 0): one learned vector.
        self.buffer_embedding = nn.Parameter(torch.zeros(1, 1, c.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, c.buffer_size + c.seq_len, c.width))
        self.z_proj_ln = nn.LayerNorm(c.width, eps=1e-6)
        self.blocks = nn.ModuleList(
            Block(c.width, c.num_heads, c.mlp_dim, c.attn_dropout, c.proj_dropout) for _ in range(c.encoder_depth)
        )
        self.norm = nn.LayerNorm(c.width, eps=1e-6)
        self.grad_checkpointing = False

    def init_embeddings(self) -> None:
        for p in (self.buffer_embedding, self.pos_embed):
            nn.init.normal_(p, std=0.02)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor, return_block: int | None = None):
        """tokens [B, L, C]; mask bool [B, L] (True = masked, dropped). Returns EncoderOutput, and
        also the (un-normed) output of block `return_block` (1-based) when asked (for REPA)."""
        b, L, _ = tokens.shape
        x = self.z_proj(tokens)
        buf = self.buffer_embedding.expand(b, self.buffer_size, -1)
        x = torch.cat([buf, x], dim=1) + self.pos_embed
        x = self.z_proj_ln(x)

        visible_count = (~mask).sum(dim=1)
        v_max = int(visible_count.max())
        uniform = bool((visible_count == v_max).all())
        # Stable sort puts visible positions first, in raster order.
        visible_index = torch.argsort(mask.to(torch.int8), dim=1, stable=True)[:, :v_max]
        img = torch.gather(x[:, self.buffer_size:], 1, visible_index[:, :, None].expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, : self.buffer_size], img], dim=1)
        token_valid = torch.arange(v_max, device=mask.device)[None, :] < visible_count[:, None]
        valid = torch.cat([torch.ones(b, self.buffer_size, dtype=torch.bool, device=mask.device), token_valid], dim=1)
        key_mask = None if uniform else valid

        block_out = None
        for i, blk in enumerate(self.blocks):
            if self.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(blk, x, key_mask, use_reentrant=False)
            else:
                x = blk(x, key_mask)
            if return_block is not None and i + 1 == return_block:
                block_out = x
        out = EncoderOutput(self.norm(x), valid, visible_index, uniform)
        return (out, block_out) if return_block is not None else out
