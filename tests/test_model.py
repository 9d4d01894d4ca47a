"""DreamModel: parameter counts at the paper sizes, shapes through encoder/decoder/head, patchify,
the encoder's blindness to masked tokens (also in ragged batches), text entering only through
cross-attention, the per-sample loss filters, and the VAE image tokenizer."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from dream_core import DreamConfig, DreamModel
from dream_core.encoder import EncoderOutput
from dream_core.image_tokenizer import ImageTokenizer, patchify, unpatchify
from dream_core.masking import random_token_mask
from dream_core.model import drop_captions


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for this module


@pytest.fixture(scope="module")
def tiny() -> DreamModel:
    torch.manual_seed(0)
    model = DreamModel(DreamConfig.preset("tiny")).eval()
    # Zero-initialised parts (head adaLN/output, text positions) would hide dependencies: perturb all.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def _inputs(c: DreamConfig, b: int, seed: int = 0, text_len: int | None = None):
    g = torch.Generator().manual_seed(seed)
    t = text_len or c.t5_max_length
    tokens = torch.randn(b, c.seq_len, c.token_dim, generator=g)
    t5_hidden = torch.randn(b, t, c.t5_dim, generator=g)
    t5_mask = torch.ones(b, t, dtype=torch.bool)
    t5_mask[:, t // 2:] = False  # padded captions
    clip_tokens = torch.randint(1, 1000, (b, c.clip_context_length), generator=g)
    clip_tokens[:, -1] = 49407  # EOT
    return tokens, t5_hidden, t5_mask, clip_tokens


def _mask_with_counts(counts: list[int], seq_len: int, seed: int = 0) -> torch.Tensor:
    ratios = torch.tensor(counts, dtype=torch.float64) / seq_len
    mask = random_token_mask(ratios, seq_len, torch.Generator().manual_seed(seed))
    assert mask.sum(dim=1).tolist() == counts
    return mask


# ---------------------------------------------------------------------------------------------
# Parameter counts at the paper sizes
# ---------------------------------------------------------------------------------------------

# Official totals (spec §1.3), trainable parts only: encoder, decoder, aligner, diffusion head,
# CLIP text tower, projector (frozen VAE and T5 excluded).
OFFICIAL_BILLIONS = {"base": 0.33, "large": 0.64, "huge": 1.13, "giant": 2.43}


@pytest.mark.parametrize("name", list(OFFICIAL_BILLIONS))
def test_paper_sizes_match_official_parameter_counts(name):
    # The official figures were computed with the official code's T5-large conditioning
    # (t5_embed_dim=1024, spec §1.5), so the aligner's text projection is 1024 -> D. Our presets
    # default to T5 v1.1 XXL (4096), which adds 3072 * D parameters; compare like with like.
    cfg = DreamConfig.preset(name).replace(t5_dim=1024)
    with torch.device("meta"):
        model = DreamModel(cfg)
    count = model.num_parameters(trainable_only=True)
    assert count == sum(p.numel() for p in model.parameters() if p.requires_grad)
    official = OFFICIAL_BILLIONS[name] * 1e9
    assert abs(count - official) / official < 0.05, f"{name}: {count / 1e9:.3f} B vs ~{OFFICIAL_BILLIONS[name]} B"


def test_component_counts_of_base_match_the_spec_breakdown():
    """Spec §1.3 for B: encoder ~86 M, decoder ~114 M, aligner ~43 M, text tower 63 M."""
    with torch.device("meta"):
        model = DreamModel(DreamConfig.preset("base").replace(t5_dim=1024))

    def millions(m: torch.nn.Module) -> float:
        return sum(p.numel() for p in m.parameters()) / 1e6

    assert millions(model.encoder) == pytest.approx(86, rel=0.03)
    assert millions(model.decoder) == pytest.approx(114, rel=0.03)
    assert millions(model.aligner) == pytest.approx(43, rel=0.03)
    assert millions(model.text_tower) == pytest.approx(63, rel=0.03)


def test_frozen_parts_are_not_in_the_model():
    model = DreamModel(DreamConfig.preset("tiny"))
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.startswith(("vae", "t5", "text_encoder")) for n in names)
    assert all(p.requires_grad for p in model.parameters())
    assert "logit_scale" in model.no_weight_decay_names()


# ---------------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------------


def test_shapes_through_encoder_decoder_and_head(tiny):
    c = tiny.config
    b = 3
    tokens, t5_hidden, t5_mask, clip_tokens = _inputs(c, b, text_len=10)
    mask = _mask_with_counts([6, 6, 6], c.seq_len)
    with torch.no_grad():
        enc = tiny.encoder(tokens, mask)
        assert isinstance(enc, EncoderOutput) and enc.uniform
        assert enc.hidden.shape == (b, c.buffer_size + 10, c.width)
        assert enc.valid.shape == (b, c.buffer_size + 10) and bool(enc.valid.all())
        assert enc.visible_index.shape == (b, 10)
        assert enc.pooled().shape == (b, c.width)
        text = tiny.align_text(t5_hidden, t5_mask)
        assert text.shape == (b, 10, c.width)
        z = tiny.decode(enc, text, t5_mask)
        assert z.shape == (b, c.seq_len, c.width)
        loss = tiny.head.loss(tokens, z, mask.float())
        assert loss.shape == (b,) and bool(torch.isfinite(loss).all())
        n, steps = 5, 4
        x = tiny.head.sample(z[0, :n], torch.randn(steps + 1, n, c.token_dim))
        assert x.shape == (n, c.token_dim)
        x = tiny.head.sample(torch.cat([z[0, :n], z[1, :n]]), torch.randn(steps + 1, n, c.token_dim),
                             guidance_scale=2.0)
        assert x.shape == (n, c.token_dim)
        img = tiny.encode_image(tokens, mask)
        txt = tiny.encode_text(clip_tokens)
        assert img.shape == txt.shape == (b, c.embed_dim)
        torch.testing.assert_close(img.norm(dim=-1), torch.ones(b))
        torch.testing.assert_close(txt.norm(dim=-1), torch.ones(b))
        # No mask means every token is visible.
        assert tiny.encode_image(tokens).shape == (b, c.embed_dim)


def test_visible_index_lists_the_visible_positions_in_raster_order(tiny):
    c = tiny.config
    tokens = _inputs(c, 2)[0]
    mask = _mask_with_counts([5, 5], c.seq_len)
    enc = tiny.encoder(tokens, mask)
    for i in range(2):
        assert enc.visible_index[i].tolist() == (~mask[i]).nonzero().squeeze(1).tolist()


def test_forward_train_returns_the_logged_terms_and_backpropagates():
    torch.manual_seed(0)
    model = DreamModel(DreamConfig.preset("tiny")).train()
    c = model.config
    tokens, t5_hidden, t5_mask, clip_tokens = _inputs(c, 4, text_len=8)
    mask = _mask_with_counts([2, 8, 12, 16], c.seq_len)
    out = model(tokens, mask, t5_hidden, t5_mask, clip_tokens)
    for key in ("loss", "diffusion", "clip", "diffusion_share", "clip_share", "logit_scale", "mask_ratio_mean"):
        assert key in out
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    torch.testing.assert_close(out["loss"].detach(), out["diffusion"] + c.clip_weight * out["clip"])
    out["loss"].backward()
    assert model.encoder.z_proj.weight.grad is not None
    assert model.decoder.blocks[0].cross_attn.proj.weight.grad is not None
    assert model.text_tower.transformer.token_embedding.weight.grad is not None
    assert model.logit_scale.grad is not None


def test_view_loss_pairs_each_image_with_its_second_picture():
    """view_weight: image-to-image InfoNCE on the eligible images against their views seen whole;
    it trains the image side only, and refuses to run without the views."""
    torch.manual_seed(0)
    c = DreamConfig.preset("tiny").replace(diffusion_weight=0.0, clip_weight=0.0, view_weight=1.0)
    model = DreamModel(c).train()
    tokens, t5_hidden, t5_mask, clip_tokens = _inputs(c, 4, text_len=8)
    mask = _mask_with_counts([2, 4, 6, 16], c.seq_len)  # the last is below min_visible_for_clip
    with pytest.raises(ValueError, match="config.view_weight > 0 needs view_tokens"):
        model(tokens, mask, t5_hidden, t5_mask, clip_tokens)
    out = model(tokens, mask, t5_hidden, t5_mask, clip_tokens, view_tokens=tokens + 0.1 * torch.randn_like(tokens))
    assert "clip" not in out and out["clip_share"] == 0.75
    torch.testing.assert_close(out["loss"].detach(), out["view"])
    assert 0.0 <= out["view_acc"] <= 1.0
    out["loss"].backward()
    assert model.encoder.z_proj.weight.grad is not None and model.projector[0].weight.grad is not None
    assert model.text_tower.transformer.token_embedding.weight.grad is None  # no caption in this loss
    both = DreamModel(c.replace(diffusion_weight=1.0, clip_weight=0.005, view_weight=0.5)).train()
    out = both(tokens, mask, t5_hidden, t5_mask, clip_tokens, view_tokens=tokens)
    torch.testing.assert_close(out["loss"].detach(), out["diffusion"] + 0.005 * out["clip"] + 0.5 * out["view"])


def test_repa_branch_aligns_the_requested_block():
    torch.manual_seed(0)
    model = DreamModel(DreamConfig.preset("tiny").replace(repa_block=1, repa_teacher_dim=8)).train()
    c = model.config
    tokens, t5_hidden, t5_mask, clip_tokens = _inputs(c, 2, text_len=8)
    mask = _mask_with_counts([4, 10], c.seq_len)  # ragged
    out = model(tokens, mask, t5_hidden, t5_mask, clip_tokens, repa_target=torch.randn(2, c.seq_len, 8))
    assert 0.0 <= float(out["repa"]) <= 2.0
    out["loss"].backward()
    assert model.repa_projector[0].weight.grad is not None


# ---------------------------------------------------------------------------------------------
# Patchify
# ---------------------------------------------------------------------------------------------


def test_patchify_is_channel_major_in_raster_order():
    b, ch, h, w, p = 2, 3, 6, 6, 2
    latent = torch.arange(b * ch * h * w, dtype=torch.float32).reshape(b, ch, h, w)
    tokens = patchify(latent, p)
    side = h // p
    assert tokens.shape == (b, side * side, ch * p * p)
    for bi in range(b):
        for i in range(side):
            for j in range(side):
                for c in range(ch):
                    for r in range(p):
                        for s in range(p):
                            # token index = row * side + col; feature index = c * p * p + r * p + s
                            assert tokens[bi, i * side + j, c * p * p + r * p + s] == latent[bi, c, i * p + r, j * p + s]


@pytest.mark.parametrize("channels, size, p", [(4, 32, 2), (4, 16, 4), (16, 8, 1), (3, 12, 3)])
def test_patchify_and_unpatchify_are_exact_inverses(channels, size, p):
    latent = torch.randn(2, channels, size, size)
    tokens = patchify(latent, p)
    assert torch.equal(unpatchify(tokens, p, channels), latent)
    assert torch.equal(patchify(unpatchify(tokens, p, channels), p), tokens)


def test_patchify_rejects_bad_shapes():
    with pytest.raises(ValueError, match="patch_size=3"):
        patchify(torch.zeros(1, 4, 8, 8), 3)
    with pytest.raises(ValueError, match="unpatchify"):
        unpatchify(torch.zeros(1, 15, 16), 2, 4)
    with pytest.raises(ValueError, match="unpatchify"):
        unpatchify(torch.zeros(1, 16, 12), 2, 4)


# ---------------------------------------------------------------------------------------------
# Image tokenizer (diffusers AutoencoderKL)
# ---------------------------------------------------------------------------------------------


def _save_tiny_vae(path, scaling_factor: float):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        block_out_channels=(8, 8, 8), layers_per_block=1, norm_num_groups=4,
                        sample_size=32, scaling_factor=scaling_factor)
    vae.save_pretrained(path, safe_serialization=True)
    return vae


def test_image_tokenizer_reads_the_scaling_factor_from_the_vae_config(tmp_path):
    _save_tiny_vae(tmp_path / "vae", 0.37)
    assert json.loads((tmp_path / "vae" / "config.json").read_text())["scaling_factor"] == 0.37
    tok = ImageTokenizer.from_pretrained(tmp_path / "vae", patch_size=2)
    assert tok.scaling_factor == pytest.approx(0.37)
    assert tok.channels == 4
    assert not any(p.requires_grad for p in tok.vae.parameters())
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    tokens = tok.encode(images)
    assert tokens.shape == (2, 16, 16)  # stride 4 -> 8 x 8 latent -> 4 x 4 patches of 4 * 2 * 2
    with torch.no_grad():
        mean = tok.vae.encode(images).latent_dist.mean
        torch.testing.assert_close(tokens, patchify(mean * 0.37, 2))
        decoded = tok.decode(tokens)
        expected = tok.vae.decode(unpatchify(tokens, 2, 4) / 0.37).sample.clamp(-1, 1)
    assert decoded.shape == (2, 3, 32, 32)
    torch.testing.assert_close(decoded, expected)
    # A posterior sample is reproducible from a generator and differs from the mean.
    m = tok.moments(images)
    a = tok.latents_from_moments(m, sample=True, generator=torch.Generator().manual_seed(1))
    b = tok.latents_from_moments(m, sample=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, mean * 0.37)


def test_image_tokenizer_needs_a_diffusers_directory(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        ImageTokenizer.from_pretrained(tmp_path, patch_size=2)


# ---------------------------------------------------------------------------------------------
# The encoder sees only visible tokens
# ---------------------------------------------------------------------------------------------


def test_encoder_output_ignores_masked_tokens(tiny):
    c = tiny.config
    tokens = _inputs(c, 3)[0]
    mask = _mask_with_counts([9, 9, 9], c.seq_len)
    changed = tokens.clone()
    changed[mask] = torch.randn(int(mask.sum()), c.token_dim) * 10
    with torch.no_grad():
        a, b = tiny.encoder(tokens, mask), tiny.encoder(changed, mask)
        torch.testing.assert_close(a.hidden, b.hidden, rtol=0, atol=1e-6)
        torch.testing.assert_close(tiny.encode_image(tokens, mask), tiny.encode_image(changed, mask), rtol=0, atol=1e-6)
        # ...and the check can fail: a visible token does change it.
        changed[~mask] += 1.0
        assert not torch.allclose(a.hidden, tiny.encoder(changed, mask).hidden, atol=1e-3)


def test_ragged_batch_gives_each_sample_its_own_result(tiny):
    """Per-sample mask ratios: padding and the key mask make a batch equal to its samples alone."""
    c = tiny.config
    tokens, t5_hidden, t5_mask, _ = _inputs(c, 4, text_len=8)
    mask = _mask_with_counts([0, 5, 12, 16], c.seq_len)
    with torch.no_grad():
        enc = tiny.encoder(tokens, mask)
        assert not enc.uniform
        assert enc.valid[:, c.buffer_size:].sum(dim=1).tolist() == [16, 11, 4, 0]
        text = tiny.align_text(t5_hidden, t5_mask)
        z = tiny.decode(enc, text, t5_mask)
        emb = tiny.embed_image(enc)
        for i in range(4):
            alone = tiny.encoder(tokens[i:i + 1], mask[i:i + 1])
            assert alone.uniform
            n = int(alone.hidden.shape[1])
            torch.testing.assert_close(enc.hidden[i, :n], alone.hidden[0], rtol=1e-5, atol=1e-5)
            assert not bool(enc.valid[i, n:].any())
            torch.testing.assert_close(enc.pooled()[i], alone.pooled()[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(emb[i], tiny.embed_image(alone)[0], rtol=1e-5, atol=1e-5)
            z_alone = tiny.decode(alone, text[i:i + 1], t5_mask[i:i + 1])
            torch.testing.assert_close(z[i], z_alone[0], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Text enters only through the decoder's cross-attention
# ---------------------------------------------------------------------------------------------


def test_attention_pooling_reads_where_tokens_sit_and_ignores_padding():
    """clip_pooling='attention': a function of the (token, position) pairs; the same tokens at
    other positions pool differently (a mean could not tell); padding changes nothing."""
    from dream_core.layers import AttentionPooler

    torch.manual_seed(0)
    pool = AttentionPooler(8, 2, num_positions=6).eval()
    with torch.no_grad():
        pool.query.normal_()
    x = torch.randn(1, 4, 8)
    pos = torch.tensor([[0, 1, 2, 3]])
    valid = torch.ones(1, 4, dtype=torch.bool)
    out = pool(x, valid, pos)
    perm = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(pool(x[:, perm], valid, pos[:, perm]), out)  # pairs reordered: same
    assert not torch.allclose(pool(x[:, perm], valid, pos), out, atol=1e-3)  # tokens moved: differs
    padded = torch.cat([x, 100 * torch.randn(1, 2, 8)], dim=1)
    out_padded = pool(padded, torch.tensor([[True] * 4 + [False] * 2]), torch.tensor([[0, 1, 2, 3, 4, 5]]))
    torch.testing.assert_close(out_padded, out)


def test_attention_pooled_embedding_of_a_ragged_batch_equals_each_sample_alone():
    torch.manual_seed(0)
    model = DreamModel(DreamConfig.preset("tiny").replace(clip_pooling="attention")).eval()
    c = model.config
    assert model.pooler is not None and DreamModel(DreamConfig.preset("tiny")).pooler is None
    tokens = _inputs(c, 3)[0]
    mask = _mask_with_counts([0, 5, 12], c.seq_len)
    with torch.no_grad():
        emb = model.encode_image(tokens, mask)
        assert emb.shape == (3, c.embed_dim)
        torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
        for i in range(3):
            torch.testing.assert_close(emb[i], model.encode_image(tokens[i:i + 1], mask[i:i + 1])[0],
                                       rtol=1e-5, atol=1e-5)
        enc = model.encoder(tokens, mask)
        positions = enc.positions()
        assert positions[1, :c.buffer_size].tolist() == list(range(c.buffer_size))
        assert positions[1, c.buffer_size:].tolist()[:11] == (c.buffer_size + enc.visible_index[1, :11]).tolist()


def test_decoder_depends_on_the_caption_only_through_cross_attention(tiny):
    import copy

    c = tiny.config
    tokens, t5_a, t5_mask, _ = _inputs(c, 2, seed=1, text_len=8)
    t5_b = torch.randn_like(t5_a)
    mask = _mask_with_counts([10, 10], c.seq_len)
    with torch.no_grad():
        enc = tiny.encoder(tokens, mask)
        za = tiny.decode(enc, tiny.align_text(t5_a, t5_mask), t5_mask)
        zb = tiny.decode(enc, tiny.align_text(t5_b, t5_mask), t5_mask)
        assert (za - zb).abs().max() > 1e-3  # the caption matters

        cut = copy.deepcopy(tiny)
        for blk in cut.decoder.blocks:
            blk.cross_attn.proj.weight.zero_()
            blk.cross_attn.proj.bias.zero_()
        za = cut.decode(enc, cut.align_text(t5_a, t5_mask), t5_mask)
        zb = cut.decode(enc, cut.align_text(t5_b, t5_mask), t5_mask)
        torch.testing.assert_close(za, zb, rtol=0, atol=0)


def test_padded_caption_positions_are_ignored_by_the_decoder(tiny):
    """The key padding mask: what sits in padded text positions cannot change z."""
    c = tiny.config
    tokens, t5_hidden, t5_mask, _ = _inputs(c, 2, seed=2, text_len=8)
    mask = _mask_with_counts([10, 10], c.seq_len)
    noisy = t5_hidden.clone()
    noisy[~t5_mask] = torch.randn(int((~t5_mask).sum()), c.t5_dim) * 5
    with torch.no_grad():
        enc = tiny.encoder(tokens, mask)
        za = tiny.decode(enc, tiny.align_text(t5_hidden, t5_mask), t5_mask)
        zb = tiny.decode(enc, tiny.align_text(noisy, t5_mask), t5_mask)
    torch.testing.assert_close(za, zb, rtol=1e-5, atol=1e-5)


def test_encoder_takes_no_text():
    import inspect

    from dream_core.encoder import MaskedEncoder

    params = inspect.signature(MaskedEncoder.forward).parameters
    assert list(params) == ["self", "tokens", "mask", "return_block"]


# ---------------------------------------------------------------------------------------------
# Per-sample loss filters
# ---------------------------------------------------------------------------------------------


def _train_terms(model, tokens, mask, t5_hidden, t5_mask, clip_tokens, seed=0):
    torch.manual_seed(seed)  # the head's (t, eps) draws
    with torch.no_grad():
        return model.forward_train(tokens, mask, t5_hidden, t5_mask, clip_tokens)


def test_diffusion_loss_uses_only_samples_with_half_or_more_masked(tiny):
    c = tiny.config
    tokens, t5_hidden, t5_mask, clip_tokens = _inputs(c, 4, text_len=8)
    # Masked 0, 7/16 (< 50 %), 8/16 (= 50 %), 16/16: the last two are eligible.
    mask = _mask_with_counts([0, 7, 8, 16], c.seq_len)
    ref = _train_terms(tiny, tokens, mask, t5_hidden, t5_mask, clip_tokens)
    assert ref["diffusion_share"] == 0.5

    # Changing everything about the ineligible samples leaves the diffusion loss unchanged...
    t2, h2 = tokens.clone(), t5_hidden.clone()
    t2[:2] = torch.randn(2, c.seq_len, c.token_dim)
    h2[:2] = torch.randn(2, h2.shape[1], c.t5_dim)
    other = _train_terms(tiny, t2, mask, h2, t5_mask, clip_tokens)
    torch.testing.assert_close(other["diffusion"], ref["diffusion"], rtol=1e-5, atol=1e-6)

    # ...and equals the loss of the eligible samples on their own, with the same head draws.
    alone = _train_terms(tiny, tokens[2:], mask[2:], t5_hidden[2:], t5_mask[2:], clip_tokens[2:])
    assert alone["diffusion_share"] == 1.0
    torch.testing.assert_close(alone["diffusion"], ref["diffusion"], rtol=1e-5, atol=1e-6)

    # The check can fail: a masked target of an eligible sample changes it.
    t3 = tokens.clone()
    t3[2][mask[2]] += 1.0
    changed = _train_terms(tiny, t3, mask, t5_hidden, t5_mask, clip_tokens)
    assert abs(float(changed["diffusion"]) - float(ref["diffusion"])) > 1e-4


def test_contrastive_loss_uses_only_samples_with_a_quarter_or_more_visible(tiny):
    c = tiny.config
    tokens, t5_hidden, t5_mask, clip_tokens = _inputs(c, 5, text_len=8)
    # Visible 16, 12, 4 (= 25 %), 3, 0 of 16: the first three are eligible.
    mask = _mask_with_counts([0, 4, 12, 13, 16], c.seq_len)
    ref = _train_terms(tiny, tokens, mask, t5_hidden, t5_mask, clip_tokens)
    assert ref["clip_share"] == pytest.approx(0.6)
    assert ref["clip_global_eligible"] == pytest.approx(0.6)

    # Ineligible images are neither queries nor negatives: their pixels do not matter...
    t2 = tokens.clone()
    t2[3:] = torch.randn(2, c.seq_len, c.token_dim)
    torch.testing.assert_close(_train_terms(tiny, t2, mask, t5_hidden, t5_mask, clip_tokens)["clip"], ref["clip"],
                               rtol=1e-5, atol=1e-6)
    # ...but their captions stay negatives for the eligible images.
    ct = clip_tokens.clone()
    ct[4, 1:5] = torch.tensor([400, 401, 402, 403])
    assert abs(float(_train_terms(tiny, tokens, mask, t5_hidden, t5_mask, ct)["clip"]) - float(ref["clip"])) > 1e-5

    # Exact value: symmetric InfoNCE over eligible rows, image columns of ineligible samples removed.
    with torch.no_grad():
        img = tiny.embed_image(tiny.encoder(tokens, mask))
        txt = tiny.encode_text(clip_tokens)
        logits = tiny.clamped_logit_scale().exp() * img @ txt.t()
        ok = torch.tensor([True, True, True, False, False])
        rows = ok.nonzero().squeeze(1)
        i2t = torch.nn.functional.cross_entropy(logits[rows], rows, reduction="none")
        t2i = torch.nn.functional.cross_entropy(logits.t()[rows][:, rows], torch.arange(3), reduction="none")
        expected = 0.5 * (i2t + t2i).mean()
    torch.testing.assert_close(ref["clip"], expected, rtol=1e-5, atol=1e-6)


def test_samples_without_masked_tokens_never_produce_nan():
    torch.manual_seed(0)
    model = DreamModel(DreamConfig.preset("tiny").replace(min_masked_for_diffusion=0.0)).train()
    c = model.config
    tokens, t5_hidden, t5_mask, clip_tokens = _inputs(c, 3, text_len=8)
    for counts in ([0, 0, 0], [0, 8, 16], [16, 16, 16]):
        model.zero_grad(set_to_none=True)
        mask = _mask_with_counts(counts, c.seq_len)
        out = model(tokens, mask, t5_hidden, t5_mask, clip_tokens)
        assert torch.isfinite(out["loss"]), counts
        out["loss"].backward()
        for name, p in model.named_parameters():
            assert p.grad is None or bool(torch.isfinite(p.grad).all()), (counts, name)
        if counts == [0, 0, 0]:
            assert out["diffusion_share"] == 0.0 and float(out["diffusion"]) == 0.0
        if counts == [16, 16, 16]:
            assert out["clip_share"] == 0.0 and float(out["clip"]) == 0.0
    # The head's own per-sample mean: a sample with no masked token gets exactly 0.
    z = torch.randn(2, c.seq_len, c.width)
    per_sample = model.head.loss(tokens[:2], z, torch.stack([torch.zeros(c.seq_len), torch.ones(c.seq_len)]))
    assert per_sample[0] == 0 and torch.isfinite(per_sample).all()


def test_caption_dropout_replaces_conditioning_with_the_null_caption():
    b, t, d = 200, 6, 4
    hidden, mask = torch.randn(b, t, d), torch.ones(b, t, dtype=torch.bool)
    null_h, null_m = torch.zeros(1, t, d), torch.zeros(1, t, dtype=torch.bool)
    null_m[0, 0] = True
    h2, m2 = drop_captions(hidden, mask, null_h, null_m, 0.1, torch.Generator().manual_seed(0))
    dropped = (h2 == 0).all(dim=(1, 2))
    assert 5 <= int(dropped.sum()) <= 40
    assert torch.equal(h2[~dropped], hidden[~dropped])
    assert torch.equal(m2[dropped], null_m.expand(int(dropped.sum()), t))
    same_h, same_m = drop_captions(hidden, mask, null_h, null_m, 0.0)
    assert same_h is hidden and same_m is mask


def test_hard_negatives_are_extra_image_to_text_columns():
    """Per-image hard negatives add columns to that image's image-to-text row only: with
    negatives identical to another image's caption the loss rises, with none it is unchanged."""
    from dream_core.losses import masked_contrastive_loss

    torch.manual_seed(0)
    img = F.normalize(torch.randn(4, 8), dim=-1)
    txt = F.normalize(img + 0.3 * torch.randn(4, 8), dim=-1)
    ok = torch.ones(4, dtype=torch.bool)
    scale = torch.tensor(2.0)
    base, _ = masked_contrastive_loss(img, txt, ok, scale)
    far = -img[:, None, :]  # cosine -1 with their image: contributes almost nothing
    with_far, _ = masked_contrastive_loss(img, txt, ok, scale, far)
    near = txt[:, None, :].clone()  # as close as the positive
    with_near, _ = masked_contrastive_loss(img, txt, ok, scale, near)
    assert base < with_far < with_near
    # By hand: image-to-text rows get the extra column, text-to-image rows do not.
    logits = scale.exp() * img @ txt.t()
    i2t = torch.cat([logits, scale.exp() * (img * near[:, 0]).sum(-1, keepdim=True)], dim=1)
    labels = torch.arange(4)
    expected = 0.5 * (F.cross_entropy(i2t, labels) + F.cross_entropy(logits.t(), labels))
    torch.testing.assert_close(with_near, expected)


def test_attention_pooled_embedding_can_be_flop_counted_in_inference_mode():
    """bench/decode.py counts SAD's FLOPs with torch's FlopCounterMode, whose module tracker hooks
    every module input that requires grad; the pooler's query must not reach its attention as a
    view of the parameter (which keeps requires_grad under inference_mode and broke the count)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = DreamModel(DreamConfig.preset("tiny").replace(clip_pooling="attention")).eval()
    tokens = _inputs(model.config, 2)[0]
    mask = _mask_with_counts([3, 7], model.config.seq_len)
    with torch.inference_mode():
        plain = model.encode_image(tokens, mask)
        with FlopCounterMode(display=False) as counter:
            counted = model.encode_image(tokens, mask)
    torch.testing.assert_close(counted, plain)
    assert counter.get_total_flops() > 0
