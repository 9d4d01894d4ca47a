"""The two text paths of DREAM.

* Contrastive tower: open_clip's `TextTransformer` (causal, EOT/argmax pooling, linear projection
  to the joint space) with open_clip's offline BPE tokenizer. Trained from scratch with the model;
  used by the contrastive loss, by Semantically Aligned Decoding and by reverse search.
* Conditioning encoder: a frozen transformers `T5EncoderModel` (any width, v1.0 or v1.1 XXL),
  padded to `t5_max_length` WITH its attention mask, followed by the trainable text aligner.
  Only the decoder sees it.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Iterable, Sequence

import torch
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import TextTransformer
from torch import nn

from .config import DreamConfig
from .layers import Block
from .request import MAX_PROMPT_CHARS, validate_prompts  # noqa: F401  (the prompt checks live with the request)


class ClipTokenizer:
    """open_clip's BPE tokenizer (its vocabulary ships inside the package: no download). Over-long
    captions keep their EOT token, so argmax pooling stays correct.

    The last `memo_size` texts' token rows are kept (`memo`, most recent last): open_clip cleans
    every text with ftfy and a regex before BPE (~0.2 ms a caption), which a trainer reading a cache
    would otherwise pay again for the same captions at every pass (bench/train.py --cache).
    Rows are kept as bytes, not tensors: thousands of small long-lived tensor buffers between the
    text tower's large temporary ones fragment the C heap, and the process then keeps ~25 KB per
    memorised caption (a 5,000-line caption file grew an app by ~125 MB, never returned)."""

    def __init__(self, context_length: int, memo_size: int = 65_536) -> None:
        self.context_length, self.memo_size = context_length, memo_size
        self._tok = SimpleTokenizer(context_length=context_length)
        self.memo: OrderedDict[str, bytes] = OrderedDict()  # text -> its int64 token row
        self._lock = threading.Lock()

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        with self._lock:
            rows = {t: self.memo.get(t) for t in texts}
        new = [t for t, row in rows.items() if row is None]
        if new:
            for t, row in zip(new, self._tok(new, context_length=self.context_length)):
                rows[t] = row.to(torch.long).numpy().tobytes()
        with self._lock:
            for t in texts:
                self.memo[t] = rows[t]
                self.memo.move_to_end(t)
            while len(self.memo) > self.memo_size:
                self.memo.popitem(last=False)
        if not texts:
            return torch.zeros(0, self.context_length, dtype=torch.long)
        joined = bytearray(b"".join(rows[t] for t in texts))
        return torch.frombuffer(joined, dtype=torch.long).view(len(texts), self.context_length)  # [B, context]


class ContrastiveTextTower(nn.Module):
    def __init__(self, config: DreamConfig) -> None:
        super().__init__()
        self.transformer = TextTransformer(
            context_length=config.clip_context_length, vocab_size=config.clip_vocab_size,
            width=config.clip_width, heads=config.clip_heads, layers=config.clip_layers,
            output_dim=config.embed_dim, pool_type="argmax", proj_type="linear",
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, context] -> un-normalised embeddings [B, embed_dim].

        The tower is causal and pools at EOT (the largest token id), so the zero padding after the
        batch's last EOT cannot change any output: it is cut off first. Captions are far shorter
        than the context, so this halves the tower's cost (it dominated a training step) and
        gives exactly open_clip's `TextTransformer.forward`."""
        t = self.transformer
        n = int(tokens.argmax(dim=-1).max()) + 1
        x = t.token_embedding(tokens[:, :n]) + t.positional_embedding[:n]
        x = t.ln_final(t.transformer(x, attn_mask=t.attn_mask[:n, :n]))
        pooled = x[torch.arange(x.shape[0], device=x.device), tokens[:, :n].argmax(dim=-1)]
        return t.text_projection(pooled) if isinstance(t.text_projection, nn.Linear) else pooled @ t.text_projection


class ImageProjector(nn.Sequential):
    """StableRep-style MLP applied after mean pooling: Linear-BN-ReLU, Linear-BN-ReLU, Linear.
    BN becomes SyncBatchNorm under DDP (the trainer converts it); scoring runs in eval mode."""

    def __init__(self, config: DreamConfig) -> None:
        h = config.projector_hidden
        super().__init__(
            nn.Linear(config.width, h), nn.BatchNorm1d(h), nn.ReLU(inplace=True),
            nn.Linear(h, h), nn.BatchNorm1d(h), nn.ReLU(inplace=True),
            nn.Linear(h, config.embed_dim),
        )


class TextAligner(nn.Module):
    """Maps frozen T5 states into the decoder's width: linear + zero-initialised positions + LN +
    ViT blocks (with T5's padding mask, which the official code omits)."""

    def __init__(self, config: DreamConfig) -> None:
        super().__init__()
        c = config
        self.text_proj = nn.Linear(c.t5_dim, c.width)
        self.text_pos = nn.Parameter(torch.zeros(1, c.t5_max_length, c.width))
        self.text_proj_ln = nn.LayerNorm(c.width, eps=1e-6)
        self.blocks = nn.ModuleList(
            Block(c.width, c.num_heads, c.mlp_dim, c.attn_dropout, c.proj_dropout) for _ in range(c.aligner_depth)
        )
        self.grad_checkpointing = False

    def forward(self, t5_hidden: torch.Tensor, t5_mask: torch.Tensor) -> torch.Tensor:
        x = self.text_proj_ln(self.text_proj(t5_hidden) + self.text_pos[:, : t5_hidden.shape[1]])
        for blk in self.blocks:
            if self.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(blk, x, t5_mask, use_reentrant=False)
            else:
                x = blk(x, t5_mask)
        return x


class ConditioningTextEncoder(nn.Module):
    """Frozen T5 encoder + its tokenizer, loaded from a local directory with `from_pretrained`."""

    def __init__(self, model, tokenizer, max_length: int) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = max_length

    @classmethod
    def from_pretrained(cls, path: str | Path, max_length: int, torch_dtype: torch.dtype | None = None) -> "ConditioningTextEncoder":
        from transformers import AutoTokenizer, T5EncoderModel

        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"T5 directory {path} does not exist (no download is attempted)")
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = T5EncoderModel.from_pretrained(str(path), local_files_only=True, torch_dtype=torch_dtype,
                                               use_safetensors=True)
        return cls(model, tokenizer, max_length)

    @property
    def dim(self) -> int:
        return self.model.config.d_model

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length,
                             truncation=True, return_tensors="pt")
        return enc.input_ids, enc.attention_mask.bool()

    @torch.no_grad()
    def forward(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (hidden [B, max_length, d_model] float32, mask bool [B, max_length])."""
        ids, mask = self.tokenize(prompts)
        device = next(self.model.parameters()).device
        ids, mask = ids.to(device), mask.to(device)
        hidden = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return hidden.float() * mask[..., None], mask


def unknown_words(tokenizer, captions: Iterable[str]) -> tuple[int, int, Counter[str]]:
    """(tokens that are <unk>, all tokens, the words that hold them with their counts) of `captions`
    under a T5 `tokenizer`, end-of-sequence tokens not counted. A frozen T5 reads every word its
    vocabulary lacks as the same <unk>, so a model conditioned on it cannot tell those words apart:
    a trainer names them before it learns them as one. SentencePiece never lets a piece cross a
    space, so each distinct word is tokenized once, alone, and counts as it does in its caption."""
    unk_id = tokenizer.unk_token_id
    pieces: dict[str, tuple[int, int]] = {}  # word -> (its tokens, its <unk> tokens)
    unknown, total, words = 0, 0, Counter()
    for caption in captions:
        for word in caption.split():
            if word not in pieces:
                ids = tokenizer(word, add_special_tokens=False)["input_ids"]
                pieces[word] = (len(ids), sum(i == unk_id for i in ids))
            n, unk = pieces[word]
            total += n
            if unk:
                unknown += unk
                words[word] += 1
    return unknown, total, words


def t5_fingerprint(path: str | Path) -> str:
    """Identifies the states a T5 directory computes: its encoder's weights (the first MiB of each
    tensor, `dream_core.fingerprint`) and its tokenizer's vocabulary. A cache of T5 states records
    it; the same T5 re-saved into a model directory's `text/` keeps it."""
    import json

    from transformers import AutoTokenizer

    from .fingerprint import TENSOR_PREFIX_BYTES, safetensors_files, tensors_fingerprint

    vocab = AutoTokenizer.from_pretrained(str(path), local_files_only=True).get_vocab()
    return tensors_fingerprint(safetensors_files(path), ("encoder.", "shared."), max_bytes=TENSOR_PREFIX_BYTES,
                               extra=json.dumps(sorted(vocab.items())))


def build_t5_from_scratch(out_dir: str | Path, corpus: Iterable[str], d_model: int = 128, num_layers: int = 2,
                          num_heads: int = 4, d_ff: int = 256, vocab_size: int = 128, seed: int = 0,
                          model_type: str = "word") -> Path:
    """Create a small T5 encoder with a SentencePiece vocabulary trained on `corpus` and save it in
    transformers format (safetensors). It is used, frozen and randomly initialised, by the toy
    presets and by the tests, through exactly the interface a pretrained T5 uses. `model_type` "word"
    keeps every whitespace-separated word of a small closed world whole (the vocabulary grows to hold
    them all); "unigram" learns `vocab_size` subword pieces, as T5's own vocabulary is built, so a word
    outside the corpus is spelled in pieces instead of becoming <unk>."""
    if model_type not in ("word", "unigram"):
        raise ValueError(f"model_type must be word or unigram, got {model_type!r}")
    import sentencepiece as spm
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sentences = sorted(set(corpus))
    words = {w for sent in sentences for w in sent.split()}
    model_prefix = out / "spiece"
    # T5's ids: pad 0, eos 1, unk 2.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_prefix=str(model_prefix),
        vocab_size=max(vocab_size, len(words) + 3) if model_type == "word" else vocab_size,
        model_type=model_type, pad_id=0, eos_id=1, unk_id=2,
        bos_id=-1, hard_vocab_limit=False, character_coverage=1.0, minloglevel=2, num_threads=1,
    )
    sp = spm.SentencePieceProcessor(model_file=str(model_prefix) + ".model")
    pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.vocab_size())]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0)
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=d_model // num_heads, d_ff=d_ff,
                   num_layers=num_layers, num_heads=num_heads, dropout_rate=0.0,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    model = T5EncoderModel(cfg)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "spiece.vocab").unlink(missing_ok=True)
    (out / "spiece.model").unlink(missing_ok=True)  # the tokenizer.json holds the vocabulary
    return out
