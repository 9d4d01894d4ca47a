"""FLUID decoder: mask tokens fill the dropped positions; every block self-attends over the image,
cross-attends to the aligned text (with its padding mask) and applies an MLP. Text enters the
model here and nowhere else. The output is one conditioning vector z per image token for the
diffusion head."""

from __future__ import annotations

import torch
from torch import nn

from .config import DreamConfig
from .encoder import EncoderOutput
from .layers import CrossAttentionBlock

TextKV = list[tuple[torch.Tensor, torch.Tensor]]


class TextConditionedDecoder(nn.Module):
    def __init__(self, config: DreamConfig) -> None:
        super().__init__()
        c = config
        self.buffer_size = c.buffer_size
        self.seq_len = c.seq_len
        self.decoder_embed = nn.Linear(c.width, c.width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, c.buffer_size + c.seq_len, c.width))
        self.proj_ln = nn.LayerNorm(c.width, eps=1e-6)
        self.blocks = nn.ModuleList(
            CrossAttentionBlock(c.width, c.num_heads, c.mlp_dim, c.attn_dropout, c.proj_dropout)
            for _ in range(c.decoder_depth)
        )
        self.norm = nn.LayerNorm(c.width, eps=1e-6)
        self.diffusion_pos_embed = nn.Parameter(torch.zeros(1, c.seq_len, c.width))
        self.grad_checkpointing = False

    def init_embeddings(self) -> None:
        for p in (self.mask_token, self.pos_embed, self.diffusion_pos_embed):
            nn.init.normal_(p, std=0.02)

    def text_kv(self, text: torch.Tensor) -> TextKV:
        """Cross-attention keys/values of every block: computed once per prompt while decoding."""
        return [blk.cross_attn.project_kv(text) for blk in self.blocks]

    def forward(self, enc: EncoderOutput, text: torch.Tensor | None, text_mask: torch.Tensor | None,
                text_kv: TextKV | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """enc: encoder output for B rows; text [B, T, D] (aligned) or its cached `text_kv`;
        text_mask bool [B, T] (True = real token). Returns z [B, L, D], or with `positions`
        (long [B, m], image positions) only z at those positions, [B, m, D]: the same values, but
        the last block then runs its queries, cross-attention and MLP on the m rows alone (while
        sampling only the tokens being decoded are needed: ~1/5 of the decoder's work at 1 token
        per step)."""
        x = self.decoder_embed(enc.hidden)
        b, _, d = x.shape
        L, nb = self.seq_len, self.buffer_size
        # One extra dummy slot absorbs the padding rows of a ragged batch; it is dropped after.
        full = self.mask_token.to(x.dtype).expand(b, nb + L + 1, d).clone()
        full[:, :nb] = x[:, :nb]
        token_valid = enc.valid[:, nb:]
        target = torch.where(token_valid, enc.visible_index, torch.full_like(enc.visible_index, L)) + nb
        full.scatter_(1, target[:, :, None].expand(-1, -1, d), x[:, nb:])
        x = self.proj_ln(full[:, : nb + L] + self.pos_embed)

        last = len(self.blocks) - 1 if positions is not None else -1  # config validation: depth >= 1
        for i, blk in enumerate(self.blocks):
            kv = None if text_kv is None else text_kv[i]
            if i == last:
                x = blk.forward_at(x, positions + nb, text, text_mask, None, kv)
            elif self.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(blk, x, text, text_mask, None, kv, use_reentrant=False)
            else:
                x = blk(x, text, text_mask, None, kv)
        if positions is None:
            return self.norm(x)[:, nb:] + self.diffusion_pos_embed
        return self.norm(x) + self.diffusion_pos_embed[0][positions]  # [B, m, D]
