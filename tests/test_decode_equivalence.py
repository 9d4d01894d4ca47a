"""The fast decoding path gives the straightforward MAR loop's tokens for the same seeds.

The reference below is what MAR's `sample_tokens` does, written plainly: at every step the encoder
runs on the CFG-doubled batch, the decoder recomputes the text's keys/values and returns z at every
position, and each row's tokens are sampled by a textbook ancestral DDPM loop calling the head
network's plain forward (timestep MLP, cond embedding and adaLN projections every step). The fast
path (encoder once on K rows, cached text keys/values, the decoder's last block on the decoded
positions only, precomputed head modulations, folded step maths, batched rows) must agree with it
up to float rounding.
"""

from __future__ import annotations

import pytest
import torch

from dream_core.config import DreamConfig
from dream_core.encoder import EncoderOutput
from dream_core.masking import decoding_schedule
from dream_core.model import DreamModel
from dream_core.noise_schedule import GaussianDiffusion
from dream_core.sampling import TextCondition, candidate_generators, guidance_at, mar_decode
from dream_core.semantic_decoding import semantic_decode
from reference import plain_head_sample  # tests/reference.py

PROMPT = "a large blue square in the middle on a black background"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for this module


def small_config(**kw) -> DreamConfig:
    """16 tokens of 16 channels, encoder/decoder 2 x 64, head 2 x 64, tiny text side."""
    base = dict(image_size=32, vae_channels=4, vae_stride=4, patch_size=2, width=64, encoder_depth=2,
                decoder_depth=2, num_heads=4, mlp_dim=128, buffer_size=4, head_depth=2, head_width=64,
                t5_dim=32, t5_max_length=8, aligner_depth=1)
    base.update(kw)
    return DreamConfig.preset("tiny").replace(**base)


def mar_size_config(**kw) -> DreamConfig:
    """The MAR-size benchmark geometry: 64 tokens of 16 channels, 4 + 4 blocks of 256, head 3 x 256."""
    base = dict(image_size=64, vae_channels=16, vae_stride=8, patch_size=1, width=256, encoder_depth=4,
                decoder_depth=4, num_heads=4, mlp_dim=1024, buffer_size=16, head_depth=3, head_width=256,
                t5_dim=32, t5_max_length=8, aligner_depth=1)
    base.update(kw)
    return DreamConfig.preset("tiny").replace(**base)


def random_model(config: DreamConfig, seed: int = 0, std: float = 0.02) -> DreamModel:
    """Random weights with the zero-initialised layers perturbed, so every path does real work."""
    torch.manual_seed(seed)
    model = DreamModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)
    return model.eval()


def random_text(config: DreamConfig, cfg: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2 if cfg else 1, config.t5_max_length, config.t5_dim, generator=g)
    mask = torch.ones(2 if cfg else 1, config.t5_max_length, dtype=torch.bool)
    mask[0, 6:] = False
    if cfg:
        mask[1, 2:] = False
    return hidden, mask


# ---------------------------------------------------------------------------------------------
# The straightforward loop
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def plain_decode(model: DreamModel, t5_hidden: torch.Tensor, t5_mask: torch.Tensor, seeds: list[int],
                 num_steps: int, guidance_scale: float, guidance_schedule: str = "constant",
                 temperature: float = 1.0, head_steps: int = 100, shared_order: bool = True) -> torch.Tensor:
    """MAR decoding of one row per seed, as MAR writes it; returns the final tokens [R, L, C].
    Each row's order is its generator's first draw; with `shared_order` every row then decides
    in the first row's order (the official SAD), as the pipeline's default."""
    c = model.config
    L, C, R = c.seq_len, c.token_dim, len(seeds)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    orders = [torch.randperm(L, generator=g) for g in gens]
    if shared_order:
        orders = [orders[0]] * R
    tokens = torch.zeros(R, L, C)
    mask = torch.ones(R, L, dtype=torch.bool)
    cfg = guidance_scale != 1.0
    text = model.align_text(t5_hidden, t5_mask)
    if cfg:
        text_in = torch.cat([text[:1].expand(R, -1, -1), text[1:2].expand(R, -1, -1)])
        text_mask = torch.cat([t5_mask[:1].expand(R, -1), t5_mask[1:2].expand(R, -1)])
    else:
        text_in, text_mask = text.expand(R, -1, -1), t5_mask.expand(R, -1)
    diff = GaussianDiffusion(c.num_train_timesteps, head_steps)
    clip = c.clip_denoised or None
    schedule = decoding_schedule(num_steps, L)
    for step in range(num_steps):
        tok_in, mask_in = (torch.cat([tokens, tokens]), torch.cat([mask, mask])) if cfg else (tokens, mask)
        z = model.decoder(model.encoder(tok_in, mask_in), text_in, text_mask)  # [R or 2R, L, D]
        masked_after = schedule[step]
        scale = guidance_at(guidance_scale, guidance_schedule, masked_after, L)
        new_mask = torch.zeros_like(mask)
        for r in range(R):
            new_mask[r, orders[r][:masked_after]] = True
            pos = (mask[r] & ~new_mask[r]).nonzero()[:, 0]
            noise = torch.randn(head_steps + 1, len(pos), C, generator=gens[r])
            zr = torch.cat([z[r, pos], z[R + r, pos]]) if cfg else z[r, pos]
            tokens[r, pos] = plain_head_sample(model.head.net, diff, zr, noise, scale, temperature, clip)
        mask = new_mask
    return tokens


def fast_decode(model: DreamModel, t5_hidden: torch.Tensor, t5_mask: torch.Tensor, seeds: list[int],
                num_steps: int, guidance_scale: float, guidance_schedule: str = "constant",
                temperature: float = 1.0, head_steps: int = 100) -> torch.Tensor:
    """What the pipeline runs (mar_decode, all rows batched), with row r seeded seeds[r]."""
    with torch.inference_mode():
        text = TextCondition.build(model, t5_hidden, t5_mask)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    events = list(mar_decode(model, text, gens, num_steps, guidance_scale, guidance_schedule, temperature,
                             head_steps))
    assert events[-1].kind == "done" and not events[-1].mask.any()
    return events[-1].tokens


def assert_same_tokens(fast: torch.Tensor, ref: torch.Tensor) -> None:
    assert fast.shape == ref.shape
    assert bool(torch.isfinite(ref).all())
    scale = max(1.0, float(ref.abs().max()))
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4 * scale)


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seeds, steps, head_steps, scale, schedule, temperature, clip", [
    ([3], 8, 10, 3.0, "constant", 1.0, 5.0),        # the app's setting: CFG, clipped x0
    ([5, 6, 7], 5, 7, 4.0, "linear", 0.9, 0.0),     # several rows, several tokens per step, official sampler
    ([11, 12], 16, 6, 1.0, "constant", 1.0, 5.0),   # no CFG: the batch is not doubled
])
def test_fast_decoding_matches_the_plain_loop(seeds, steps, head_steps, scale, schedule, temperature, clip):
    model = random_model(small_config(clip_denoised=clip))
    hidden, mask = random_text(model.config, cfg=scale != 1.0)
    args = (seeds, steps, scale, schedule, temperature, head_steps)
    ref = plain_decode(model, hidden, mask, *args)
    fast = fast_decode(model, hidden, mask, *args)
    assert_same_tokens(fast, ref)
    # The rows really differ, and the tokens are not trivially zero.
    assert float(ref.abs().mean()) > 1e-3
    if len(seeds) > 1:
        assert not torch.allclose(ref[0], ref[1])


def test_fast_decoding_matches_the_plain_loop_at_mar_size():
    """The MAR-size geometry (64 tokens, 4 + 4 blocks of 256, head 3 x 256, CFG 3) on fewer steps."""
    model = random_model(mar_size_config(clip_denoised=5.0))
    hidden, mask = random_text(model.config)
    args = ([0, 1], 8, 3.0, "constant", 1.0, 8)
    assert_same_tokens(fast_decode(model, hidden, mask, *args), plain_decode(model, hidden, mask, *args))


@pytest.mark.slow
def test_fast_decoding_matches_the_plain_loop_at_the_issue_settings():
    """64 tokens, 64 decoding steps (one token each), 100 head steps, CFG 3 constant, batch 1."""
    model = random_model(mar_size_config(clip_denoised=5.0))
    hidden, mask = random_text(model.config)
    args = ([2026], 64, 3.0, "constant", 1.0, 100)
    assert_same_tokens(fast_decode(model, hidden, mask, *args), plain_decode(model, hidden, mask, *args))


def test_sad_survivor_matches_the_plain_loop_of_its_seed():
    """SAD decodes K rows together and prunes; the survivor is exactly its solo plain decoding."""
    model = random_model(small_config(clip_denoised=5.0))
    hidden, mask = random_text(model.config)
    with torch.inference_mode():
        text = TextCondition.build(model, hidden, mask)
        text_emb = torch.nn.functional.normalize(torch.randn(1, model.config.embed_dim), dim=-1)
    events = list(semantic_decode(model, text, text_emb, candidate_generators(40, 4), 8, [2], 3.0,
                                  head_steps=6))
    last = events[-1]
    assert last.kind == "done" and last.chosen is not None and last.candidate_ids == [last.chosen]
    # The survivor keeps its own noise (seed 40 + k) and the order the candidates share (seed 40's).
    ref = plain_decode(model, hidden, mask, [40, 40 + last.chosen], 8, 3.0, head_steps=6)
    assert_same_tokens(last.tokens, ref[-1:])


def test_pipeline_stream_matches_the_plain_loop(tiny_pipe):
    """End to end through DreamPipeline.stream (T5, aligner, CFG with the empty prompt)."""
    hidden, mask = tiny_pipe.text_encoder([PROMPT, ""])
    events = list(tiny_pipe.stream(PROMPT, seed=9, num_inference_steps=6, head_steps=5, guidance_scale=2.5))
    ref = plain_decode(tiny_pipe.model, hidden, mask, [9], 6, 2.5, head_steps=5)
    assert_same_tokens(events[-1].tokens, ref)


@torch.no_grad()
def test_decoder_positions_equal_the_full_output_gathered():
    model = random_model(small_config())
    c = model.config
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(3, c.seq_len, c.token_dim, generator=g)
    mask = torch.zeros(3, c.seq_len, dtype=torch.bool)
    mask[:, :9] = True
    mask = torch.stack([m[torch.randperm(c.seq_len, generator=g)] for m in mask])
    hidden, t5_mask = random_text(c)
    text = model.align_text(hidden[:1].expand(3, -1, -1), t5_mask[:1].expand(3, -1))
    enc = model.encoder(tokens, mask)
    full = model.decoder(enc, text, t5_mask[:1].expand(3, -1))
    positions = torch.stack([torch.randperm(c.seq_len, generator=g)[:4].sort().values for _ in range(3)])
    part = model.decoder(enc, text, t5_mask[:1].expand(3, -1), positions=positions)
    assert part.shape == (3, 4, c.width)
    expected = torch.gather(full, 1, positions[:, :, None].expand(-1, -1, c.width))
    torch.testing.assert_close(part, expected, rtol=1e-5, atol=1e-5)
    # Cached keys/values and positions together (the sampling path).
    kv = [(k.expand(3, -1, -1, -1), v.expand(3, -1, -1, -1)) for k, v in model.decoder.text_kv(text[:1])]
    cached = model.decoder(enc, None, t5_mask[:1].expand(3, -1), text_kv=kv, positions=positions)
    torch.testing.assert_close(cached, expected, rtol=1e-5, atol=1e-5)
    # A ragged (padded) encoder output still decodes the right positions.
    ragged = model.encoder(tokens, torch.stack([mask[0], mask[1], torch.zeros_like(mask[2])]))
    assert not ragged.uniform
    full = model.decoder(ragged, text, t5_mask[:1].expand(3, -1))
    part = model.decoder(ragged, text, t5_mask[:1].expand(3, -1), positions=positions)
    torch.testing.assert_close(part, torch.gather(full, 1, positions[:, :, None].expand(-1, -1, c.width)),
                               rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_text_condition_expand_is_reused_and_follows_field_changes():
    model = random_model(small_config())
    hidden, mask = random_text(model.config)
    text = TextCondition.build(model, hidden, mask)
    kv, m = text.expand(3, True)
    assert text.expand(3, True)[0] is kv  # reused while the row count stays
    assert [k.shape[0] for k, _ in kv] == [6] * model.config.decoder_depth and m.shape == (6, mask.shape[1])
    for (k, v), (kc, vc), (ku, vu) in zip(kv, text.kv_cond, text.kv_uncond):
        assert torch.equal(k[:3], kc.expand(3, -1, -1, -1)) and torch.equal(k[3:], ku.expand(3, -1, -1, -1))
        assert torch.equal(v[:3], vc.expand(3, -1, -1, -1)) and torch.equal(v[3:], vu.expand(3, -1, -1, -1))
    assert torch.equal(m, torch.cat([mask[:1].expand(3, -1), mask[1:2].expand(3, -1)]))
    kv1, m1 = text.expand(1, True)
    assert kv1[0][0].shape[0] == 2 and m1.shape[0] == 2
    kv_plain, _ = text.expand(2, False)
    assert kv_plain[0][0].shape[0] == 2 and torch.equal(kv_plain[0][0][1], text.kv_cond[0][0][0])
    # Replacing a field (as the evaluation code does when it builds conditions) is seen.
    text.kv_uncond = [(k * 0, v * 0) for k, v in text.kv_uncond]
    kv2, _ = text.expand(3, True)
    assert not kv2[0][0][3:].any() and torch.equal(kv2[0][0][:3], kv[0][0][:3])


def test_encoder_output_for_cfg_is_shared():
    """decode_step runs the encoder once on K rows and reuses it for both CFG halves (the encoder
    never sees text), which the plain loop's doubled encoder call confirms."""
    model = random_model(small_config())
    c = model.config
    g = torch.Generator().manual_seed(3)
    tokens = torch.randn(2, c.seq_len, c.token_dim, generator=g)
    mask = torch.zeros(2, c.seq_len, dtype=torch.bool)
    mask[:, 5:] = True
    with torch.no_grad():
        once: EncoderOutput = model.encoder(tokens, mask)
        doubled: EncoderOutput = model.encoder(torch.cat([tokens, tokens]), torch.cat([mask, mask]))
    torch.testing.assert_close(doubled.hidden, torch.cat([once.hidden, once.hidden]), rtol=1e-6, atol=1e-6)


def test_cuda_graph_flag_is_a_no_op_on_cpu_and_tensor_guidance_matches():
    """The CUDA-graph path feeds the sampler the guidance scale as a tensor; on the CPU the flag
    changes nothing. (The capture itself needs a GPU.)"""
    model = random_model(small_config())
    head = model.head
    g = torch.Generator().manual_seed(5)
    z = torch.randn(6, model.config.width, generator=g)
    noise = torch.randn(11, 3, model.config.token_dim, generator=g)
    ref = head.sample(z, noise, guidance_scale=2.5, temperature=0.8)
    head.cuda_graphs = True
    try:
        assert torch.equal(head.sample(z, noise, guidance_scale=2.5, temperature=0.8), ref)
    finally:
        head.cuda_graphs = False
    as_tensor = head.sample(z, noise, guidance_scale=torch.tensor([[2.5]]), temperature=0.8)
    torch.testing.assert_close(as_tensor, ref, rtol=1e-6, atol=1e-6)


def test_single_thread_reverse_loop_gives_the_same_tokens_and_restores_threads():
    model = random_model(small_config())
    head = model.head
    g = torch.Generator().manual_seed(8)
    z = torch.randn(4, model.config.width, generator=g)
    noise = torch.randn(9, 2, model.config.token_dim, generator=g)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        head.loop_threads = 0
        ref = head.sample(z, noise, guidance_scale=3.0)
        head.loop_threads = 1
        out = head.sample(z, noise, guidance_scale=3.0)
        assert torch.get_num_threads() == 2
    finally:
        head.loop_threads = type(head).loop_threads
        torch.set_num_threads(old)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
