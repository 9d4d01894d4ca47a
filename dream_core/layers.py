"""Transformer blocks shared by the encoder, the decoder and the text aligner (pre-norm, SDPA)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head attention; self-attention when `context` is None, cross-attention otherwise.

    `key_mask` is a bool [B, S_k], True where a key may be attended (padding masked out)."""

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 cross: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.cross = cross
        if cross:
            self.q = nn.Linear(dim, dim)
            self.kv = nn.Linear(dim, 2 * dim)
        else:
            self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, -1).transpose(1, 2)

    def project_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of a cross-attention context (cacheable: the prompt does not change)."""
        k, v = self.kv(context).chunk(2, dim=-1)
        return self._heads(k), self._heads(v)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                source: torch.Tensor | None = None) -> torch.Tensor:
        """`source` (self-attention only): the full sequence that keys and values come from, when
        `x` holds queries for just some of its positions (see `CrossAttentionBlock.forward_at`)."""
        b, n, d = x.shape
        if self.cross:
            q = self._heads(self.q(x))
            k, v = kv if kv is not None else self.project_kv(context)
        elif source is None:
            q, k, v = (self._heads(t) for t in self.qkv(x).chunk(3, dim=-1))
        else:
            w, bias = self.qkv.weight, self.qkv.bias
            q = self._heads(F.linear(x, w[:d], None if bias is None else bias[:d]))
            k, v = (self._heads(t) for t in F.linear(source, w[d:], None if bias is None else bias[d:]).chunk(2, dim=-1))
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, d)))


class Mlp(nn.Sequential):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(drop), nn.Linear(hidden, dim), nn.Dropout(drop))


class Block(nn.Module):
    """ViT block: x + attn(LN(x)), x + mlp(LN(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, attn_drop, proj_drop)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_dim, proj_drop)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), key_mask=key_mask)
        return x + self.mlp(self.norm2(x))


class CrossAttentionBlock(nn.Module):
    """FLUID decoder block: self-attention, cross-attention to the text (with its padding mask), MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        self.norm0 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attn = Attention(dim, num_heads, attn_drop, proj_drop)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.cross_attn = Attention(dim, num_heads, attn_drop, proj_drop, cross=True)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_dim, proj_drop)

    def forward(self, x: torch.Tensor, text: torch.Tensor | None, text_mask: torch.Tensor | None,
                key_mask: torch.Tensor | None = None,
                text_kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.norm0(x), key_mask=key_mask)
        x = x + self.cross_attn(self.norm1(x), context=text, key_mask=text_mask, kv=text_kv)
        return x + self.mlp(self.norm2(x))

    def forward_at(self, x: torch.Tensor, index: torch.Tensor, text: torch.Tensor | None,
                   text_mask: torch.Tensor | None, key_mask: torch.Tensor | None = None,
                   text_kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The block's output at sequence positions `index` [B, m] only, [B, m, D]: keys and values
        still come from every position, everything else runs on the m rows. Every op is row-wise,
        so this equals `forward(...)` gathered at `index` (the last decoder block while sampling,
        where only the tokens being decoded are needed)."""
        h = self.norm0(x)
        idx = index[:, :, None].expand(-1, -1, x.shape[-1])
        x = torch.gather(x, 1, idx) + self.self_attn(torch.gather(h, 1, idx), key_mask=key_mask, source=h)
        x = x + self.cross_attn(self.norm1(x), context=text, key_mask=text_mask, kv=text_kv)
        return x + self.mlp(self.norm2(x))


class AttentionPooler(nn.Module):
    """One learned query cross-attends to the tokens (padding excluded) and returns one vector.

    A mean weighs every token alike, so which tokens hold the object (its position) averages out.
    Here the object's tokens are weighed by their content and, through the pooler's own position
    embedding added to keys and values, still say where they sit. The query starts at zero:
    uniform weights, a mean of the values."""

    def __init__(self, dim: int, num_heads: int, num_positions: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, num_positions, dim) * 0.02)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, cross=True)

    def forward(self, x: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [B, N, D]; valid bool [B, N] (True = a real token); positions long [B, N], each
        token's index into the position embedding -> [B, D]."""
        context = self.norm(x) + self.pos_embed[0][positions]
        # repeat, not expand: a view of a parameter keeps requires_grad even under inference_mode,
        # and torch's module tracker (FlopCounterMode, bench/decode.py) then fails on it.
        return self.attn(self.query.repeat(x.shape[0], 1, 1), context=context, key_mask=valid)[:, 0]


def init_weights(module: nn.Module) -> None:
    """Xavier-uniform linears with zero bias, unit LayerNorms (the official initialisation)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
