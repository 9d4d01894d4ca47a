"""The two text paths: the CLIP BPE tokenizer and contrastive tower (EOT pooling), and the frozen T5
conditioning encoder loaded with from_pretrained from a local directory, at several widths."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_CAPTIONS  # the captions the tiny text models are built on

from dream_core import DreamConfig, DreamModel
from dream_core.text import (
    MAX_PROMPT_CHARS,
    ClipTokenizer,
    ConditioningTextEncoder,
    ContrastiveTextTower,
    build_t5_from_scratch,
    unknown_words,
    validate_prompts,
)

SOT, EOT = 49406, 49407

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for this module


# ---------------------------------------------------------------------------------------------
# Prompt validation
# ---------------------------------------------------------------------------------------------


def test_validate_prompts_normalises_whitespace():
    assert validate_prompts("  a  red\n circle ") == ["a red circle"]
    assert validate_prompts(["a", "b  c"], "captions") == ["a", "b c"]
    assert validate_prompts("x" * MAX_PROMPT_CHARS) == ["x" * MAX_PROMPT_CHARS]


@pytest.mark.parametrize("value, match", [
    ("", "labels must not be empty"),
    ("  \t ", "labels must not be empty"),
    ([], "labels must not be an empty list"),
    (["ok", ""], "labels must not be empty"),
    (["ok", 3], "labels must be a string"),
    (None, "labels must be a string or a list"),
    (b"bytes", "labels must be a string or a list"),
    ("x" * (MAX_PROMPT_CHARS + 1), "labels is too long"),
])
def test_validate_prompts_errors_name_the_argument(value, match):
    with pytest.raises(ValueError, match=match):
        validate_prompts(value, "labels")


# ---------------------------------------------------------------------------------------------
# CLIP tokenizer and contrastive tower
# ---------------------------------------------------------------------------------------------


def test_clip_tokenizer_pads_to_the_context_length():
    tok = ClipTokenizer(16)
    ids = tok(["a red circle", "a purple cross on a white background"])
    assert ids.shape == (2, 16) and ids.dtype == torch.long
    for row in ids:
        assert row[0] == SOT
        end = int((row == EOT).nonzero()[0])
        assert bool((row[end + 1:] == 0).all())
        assert int(row.argmax()) == end  # EOT has the largest id: argmax pooling finds it
    assert tok("a red circle").shape == (1, 16)


def test_clip_tokenizer_keeps_eot_for_over_long_captions():
    tok = ClipTokenizer(8)
    ids = tok(["a very long caption " * 10, "short"])
    assert ids[0, 0] == SOT and ids[0, -1] == EOT
    assert int((ids[0] == EOT).sum()) == 1
    assert int(ids[0].argmax()) == 7
    assert bool((ids[0] != 0).all())


def test_clip_tokenizer_memo_gives_open_clips_rows_and_stays_bounded():
    from open_clip.tokenizer import SimpleTokenizer

    texts = ["a red circle", "a purple cross on a white background", "a red circle", "a very long caption " * 10]
    ref = SimpleTokenizer(context_length=16)(texts, context_length=16)
    tok = ClipTokenizer(16, memo_size=2)
    assert torch.equal(tok(texts), ref)  # a repeated text within one call too
    assert list(tok.memo) == [texts[0], texts[3]]  # the 2 most recently used
    assert torch.equal(tok(texts[::-1]), ref.flip(0))  # memo hits and misses mixed, order kept
    assert len(tok.memo) == 2


def test_text_tower_pools_at_eot():
    torch.manual_seed(0)
    cfg = DreamConfig.preset("tiny")
    tower = ContrastiveTextTower(cfg).eval()
    ids = ClipTokenizer(cfg.clip_context_length)(["a red circle", "a blue square"])
    with torch.no_grad():
        out = tower(ids)
        assert out.shape == (2, cfg.embed_dim)
        # Causal attention + EOT pooling: whatever follows EOT cannot matter...
        junk = ids.clone()
        end = int((ids[0] == EOT).nonzero()[0])
        junk[0, end + 1:] = 320
        torch.testing.assert_close(tower(junk), out, rtol=1e-5, atol=1e-6)
        # ...while a word before it does.
        junk[0, 1] = 321
        assert not torch.allclose(tower(junk)[0], out[0], atol=1e-4)


# ---------------------------------------------------------------------------------------------
# T5 conditioning encoder
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[64, 96])
def t5_dir(request, tmp_path_factory):
    """A tiny T5 trained from scratch and saved by the test itself, at width 64 and at width 96."""
    d_model = request.param
    out = build_t5_from_scratch(tmp_path_factory.mktemp(f"t5_{d_model}"), TINY_CAPTIONS, d_model=d_model, num_layers=1,
                                num_heads=4, d_ff=64, vocab_size=48)
    return out, d_model


def test_t5_directory_holds_safetensors_only(t5_dir):
    path, _ = t5_dir
    assert (path / "model.safetensors").is_file() and (path / "config.json").is_file()
    assert not [p for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]


def test_t5_encoder_loads_from_a_local_directory_and_pads_with_a_mask(t5_dir):
    path, d_model = t5_dir
    enc = ConditioningTextEncoder.from_pretrained(path, max_length=16)
    assert enc.dim == d_model and enc.max_length == 16
    assert not enc.model.training and not any(p.requires_grad for p in enc.model.parameters())

    prompts = ["a red circle", "a large blue square in the middle on a black background"]
    hidden, mask = enc(prompts)
    assert hidden.shape == (2, 16, d_model) and hidden.dtype == torch.float32
    assert mask.shape == (2, 16) and mask.dtype == torch.bool
    n_short, n_long = mask.sum(dim=1).tolist()
    assert 2 <= n_short < n_long <= 16
    for row in range(2):  # real tokens first, then padding
        n = int(mask[row].sum())
        assert bool(mask[row, :n].all()) and not bool(mask[row, n:].any())
    assert bool((hidden[~mask] == 0).all())
    assert bool((hidden[mask].abs().sum(dim=-1) > 0).all())

    # The attention mask is passed to T5: padding length does not change the real positions.
    longer, mask24 = ConditioningTextEncoder.from_pretrained(path, max_length=24)(prompts)
    assert longer.shape == (2, 24, d_model)
    assert torch.equal(mask24[:, :16], mask)
    torch.testing.assert_close(longer[:, :16], hidden, rtol=1e-5, atol=1e-5)

    # Over-long prompts are truncated to max_length (every position is then real).
    h, m = ConditioningTextEncoder.from_pretrained(path, max_length=4)(["a small red circle at the top left"])
    assert h.shape == (1, 4, d_model) and bool(m.all())


def test_t5_of_any_width_conditions_the_decoder(t5_dir):
    path, d_model = t5_dir
    enc = ConditioningTextEncoder.from_pretrained(path, max_length=16)
    torch.manual_seed(0)
    cfg = DreamConfig.preset("tiny").replace(t5_dim=d_model)
    model = DreamModel(cfg).eval()
    hidden, mask = enc(["a red circle", "a purple cross"])
    with torch.no_grad():
        text = model.align_text(hidden, mask)
        assert text.shape == (2, 16, cfg.width)
        tokens = torch.randn(2, cfg.seq_len, cfg.token_dim)
        visible = torch.zeros(2, cfg.seq_len, dtype=torch.bool)
        visible[:, 6:] = True
        z = model.decode(model.encoder(tokens, visible), text, mask)
    assert z.shape == (2, cfg.seq_len, cfg.width) and bool(torch.isfinite(z).all())


def test_t5_encoder_needs_an_existing_directory(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        ConditioningTextEncoder.from_pretrained(tmp_path / "no-t5", max_length=16)


def test_text_tower_cut_after_the_last_eot_equals_open_clip_forward():
    """The tower drops the padding after the batch's last EOT (it is causal and pools at EOT):
    the embeddings must be exactly open_clip's full-context forward."""
    torch.manual_seed(0)
    config = DreamConfig.preset("tiny")
    tower = ContrastiveTextTower(config).eval()
    tokens = ClipTokenizer(config.clip_context_length)(["a red circle", "a big blue square at the top left", "x"])
    assert int(tokens.argmax(dim=-1).max()) + 1 < config.clip_context_length  # something is cut
    with torch.no_grad():
        torch.testing.assert_close(tower(tokens), tower.transformer(tokens), rtol=1e-5, atol=1e-6)


def test_unknown_words_counts_unk_tokens_as_in_the_caption_and_names_the_words(t5_dir):
    from transformers import AutoTokenizer

    path, _ = t5_dir
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    captions = ["a small red star at the top left", "a red heart, banana on the right", "a purple cross",
                "A Red star"]
    unknown, total, words = unknown_words(tok, captions)
    assert words.most_common() == [("star", 2), ("heart,", 1), ("banana", 1), ("A", 1), ("Red", 1)]
    # The same counts as the whole captions' tokens (end-of-sequence tokens left out).
    ids = [i for row in tok(captions)["input_ids"] for i in row if i != tok.eos_token_id]
    assert (unknown, total) == (sum(i == tok.unk_token_id for i in ids), len(ids))
    assert unknown_words(tok, TINY_CAPTIONS)[0] == 0 and unknown_words(tok, [])[:2] == (0, 0)
