"""Behaviour of the hierarchical study encoder."""

import pytest
import torch

from hlip_ray.model import StudyEncoder
from hlip_ray.model.pos_embed import resample_spatial, sincos_1d, sincos_3d
from tests.helpers import tiny_encoder


def _study(batch=1, scans=3, grid=(16, 32, 32), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, scans, 1, *grid, generator=gen)


def _all_real(pixels):
    return torch.ones(pixels.shape[:2], dtype=torch.bool)


@torch.no_grad()
def test_scan_blocks_keep_scans_apart_until_a_study_block():
    encoder = tiny_encoder("h2", depth=3)  # scan, scan, study
    pixels = _study(scans=3)
    perturbed = pixels.clone()
    perturbed[0, 1] += torch.randn_like(perturbed[0, 1])
    mask = _all_real(pixels)

    before = encoder.forward_tokens(pixels, mask, num_blocks=2).scan_tokens()
    after = encoder.forward_tokens(perturbed, mask, num_blocks=2).scan_tokens()
    assert torch.equal(before[0], after[0]) and torch.equal(before[2], after[2])
    assert not torch.allclose(before[1], after[1])

    before = encoder.forward_tokens(pixels, mask, num_blocks=3).scan_tokens()
    after = encoder.forward_tokens(perturbed, mask, num_blocks=3).scan_tokens()
    assert not torch.allclose(before[0], after[0], atol=1e-6)
    assert not torch.allclose(before[2], after[2], atol=1e-6)


@torch.no_grad()
def test_slice_blocks_keep_slice_groups_apart():
    encoder = tiny_encoder("h3", depth=3)  # slice, scan, study; 2 slice groups of 8 slices
    pixels = _study(scans=1)
    perturbed = pixels.clone()
    perturbed[0, 0, :, 8:] += 1.0  # second slice group only
    mask = _all_real(pixels)
    before = encoder.forward_tokens(pixels, mask, num_blocks=1).scan_tokens()[0]
    after = encoder.forward_tokens(perturbed, mask, num_blocks=1).scan_tokens()[0]
    per_slice = before.shape[0] // 2
    assert torch.equal(before[:per_slice], after[:per_slice])
    assert not torch.allclose(before[per_slice:], after[per_slice:])
    before = encoder.forward_tokens(pixels, mask, num_blocks=2).scan_tokens()[0]
    after = encoder.forward_tokens(perturbed, mask, num_blocks=2).scan_tokens()[0]
    assert not torch.allclose(before[:per_slice], after[:per_slice], atol=1e-6)


@pytest.mark.parametrize("layout", ["h2", "h3", "chest", "full", "slice,study,scan"])
@torch.no_grad()
def test_padded_scans_change_nothing(layout):
    encoder = tiny_encoder(layout, depth=3)
    real = _study(batch=1, scans=2)
    alone = encoder(real, _all_real(real))

    for padded_slots, fill in [(1, 0.0), (4, 7.0)]:
        padded = torch.cat([real, torch.full((1, padded_slots, *real.shape[2:]), fill)], dim=1)
        mask = torch.tensor([[True, True] + [False] * padded_slots])
        torch.testing.assert_close(encoder(padded, mask), alone, atol=1e-5, rtol=1e-5)

    # padding between real scans, holding noise
    interleaved = torch.stack([real[0, 0], torch.randn_like(real[0, 0]), real[0, 1]])[None]
    mask = torch.tensor([[True, False, True]])
    torch.testing.assert_close(encoder(interleaved, mask), alone, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_studies_of_different_scan_counts_batch_like_alone():
    encoder = tiny_encoder("h2", depth=3)
    pixels = _study(batch=3, scans=3, seed=1)
    mask = torch.tensor([[True, False, False], [True, True, True], [True, True, False]])
    batched = encoder(pixels, mask)
    for row in range(3):
        count = int(mask[row].sum())
        alone = encoder(pixels[row : row + 1, :count], mask[row : row + 1, :count])
        torch.testing.assert_close(batched[row : row + 1], alone, atol=1e-5, rtol=1e-5)


def _count_work(encoder, pixels, mask):
    """Scans through patch embedding and tokens through attention (qkv) in one forward."""
    counts = {"scans": 0, "attention_tokens": 0}

    def count_scans(module, inputs, output):
        counts["scans"] += inputs[0].shape[0]

    def count_tokens(module, inputs, output):
        counts["attention_tokens"] += inputs[0].numel() // inputs[0].shape[-1]

    hooks = [encoder.patch_embed.register_forward_hook(count_scans)]
    hooks += [block.attn.qkv.register_forward_hook(count_tokens) for block in encoder.blocks]
    with torch.no_grad():
        encoder(pixels, mask)
    for hook in hooks:
        hook.remove()
    return counts


@pytest.mark.parametrize("layout", ["h2", "h3", "full"])
def test_work_scales_with_real_scans_not_slots(layout):
    encoder = tiny_encoder(layout, depth=3)
    two_real = _study(batch=2, scans=2)
    small = _count_work(encoder, two_real, _all_real(two_real))

    wide = torch.cat([two_real, torch.randn(2, 6, *two_real.shape[2:])], dim=1)  # K = 8
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[:, :2] = True
    assert _count_work(encoder, wide, mask) == small

    mask[:, :4] = True  # four more real scans: four more scans' tokens in every block
    doubled = _count_work(encoder, wide, mask)
    assert doubled["scans"] == 2 * small["scans"] == 8
    tokens_per_scan, slice_groups = 2 * 2 * 2, 2
    cls_per_scan = {"slice": slice_groups, "scan": 1, "study": 0}
    added = sum(4 * (tokens_per_scan + cls_per_scan[level]) for level in encoder.attention_levels)
    assert doubled["attention_tokens"] - small["attention_tokens"] == added


def test_study_without_real_scan_is_an_error():
    encoder = tiny_encoder()
    pixels = _study(batch=2, scans=2)
    with pytest.raises(ValueError, match=r"batch rows \[1\]"):
        encoder(pixels, torch.tensor([[True, False], [False, False]]))


def test_position_embeddings_follow_hlip_layout():
    table = sincos_3d(6, (2, 3, 4))
    # channels: [w sin, w cos, h sin, h cos, d sin, d cos] with one frequency each (width 6)
    d, h, w = 1, 2, 3
    expected = torch.tensor([0.0 + w, w, h, h, d, d]).clone()
    expected[[0, 2, 4]] = expected[[0, 2, 4]].sin()
    expected[[1, 3, 5]] = expected[[1, 3, 5]].cos()
    torch.testing.assert_close(table[0, d, h, w], expected)
    slots = sincos_1d(4, torch.arange(3))
    torch.testing.assert_close(slots[2], torch.tensor([2.0, 2e-2, 2.0, 2e-2]).sin().where(
        torch.tensor([True, True, False, False]), torch.tensor([2.0, 2e-2, 2.0, 2e-2]).cos()))


def test_spatial_position_embedding_resamples_trilinearly_to_a_new_grid():
    table = sincos_3d(24, (2, 2, 2))
    torch.testing.assert_close(resample_spatial(table, (2, 2, 2)), table)
    larger = resample_spatial(table, (4, 3, 3))
    assert larger.shape == (1, 4, 3, 3, 24)
    # a constant field stays constant; the centre of a 2->3 resampling is the mean of its neighbours
    torch.testing.assert_close(resample_spatial(torch.ones(1, 2, 2, 2, 3), (5, 4, 3)), torch.ones(1, 5, 4, 3, 3))
    centre = larger[0, :, 1, 1]
    torch.testing.assert_close(centre[0], table[0, 0, :, :].mean(dim=(0, 1)))

    encoder = tiny_encoder("h2", depth=3)  # built for 16x32x32
    pixels = _study(grid=(32, 48, 48))
    with torch.no_grad():
        assert encoder(pixels, _all_real(pixels)).shape == (1, 24)


def test_position_embeddings_equal_hlip_released_tables(hlip_reference):
    state = torch.load(hlip_reference / "multiscan_h2.pt", weights_only=True)["state_dict"]
    spatial = state["module.visual.trunk.spatial_posemb"]
    torch.testing.assert_close(sincos_3d(spatial.shape[-1], tuple(spatial.shape[1:4])), spatial)
    slots = state["module.visual.trunk.sequential_posemb"]
    torch.testing.assert_close(sincos_1d(slots.shape[-1], torch.arange(slots.shape[1]))[None], slots)


@torch.no_grad()
def test_training_draws_follow_study_seeds_not_batch_composition():
    encoder = tiny_encoder("h3", depth=3, patch_dropout=0.5, drop_path=0.5).train()
    pixels = _study(batch=3, scans=2, seed=3)
    mask = torch.tensor([[True, True], [True, False], [True, True]])
    seeds = torch.tensor([11, 12, 13])
    together = encoder(pixels, mask, seeds)
    for row in range(3):
        alone = encoder(pixels[row : row + 1], mask[row : row + 1], seeds[row : row + 1])
        torch.testing.assert_close(together[row : row + 1], alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(encoder(pixels, mask, seeds + 100), together)
    # in eval mode nothing is random and nothing is dropped
    encoder.eval()
    torch.testing.assert_close(encoder(pixels, mask, seeds), encoder(pixels, mask, seeds + 1))


def test_patch_dropout_keeps_the_configured_fraction_per_slice_group():
    encoder = tiny_encoder("h3", depth=3, patch_dropout=0.5).train()
    pixels = _study(scans=2)
    tokens = encoder.forward_tokens(pixels, _all_real(pixels), [5], num_blocks=1)
    # 2 slice groups x 2x2 tokens per scan, half kept
    assert tokens.scan_tokens().shape == (2, 4, 24)


def test_gradient_checkpointing_gives_the_same_gradients():
    pixels = _study(batch=2, scans=2)
    mask = torch.tensor([[True, True], [True, False]])
    grads = []
    for checkpointing in (False, True):
        encoder = tiny_encoder("h2", depth=3, drop_path=0.3, patch_dropout=0.25, grad_checkpointing=checkpointing)
        encoder.train()
        encoder(pixels, mask, [1, 2]).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in encoder.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1])


def _reference_varlen_kernel(q, k, v, cu_seqlens, max_seqlen, softmax_scale):
    """Plain-torch varlen attention, to exercise the packed path without flash-attn."""
    bounds = cu_seqlens.tolist()
    outputs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, scale=softmax_scale)
        outputs.append(out.transpose(0, 1))
    return torch.cat(outputs)


@torch.no_grad()
def test_varlen_backend_packs_sequences_like_the_dense_path(monkeypatch):
    import hlip_ray.model.study_encoder as study_encoder

    monkeypatch.setattr(study_encoder, "flash_varlen_kernel", _reference_varlen_kernel)
    dense = tiny_encoder("h3", depth=3)
    varlen = tiny_encoder("h3", depth=3, attention_backend="flash_varlen")
    varlen.load_state_dict(dense.state_dict())
    pixels = _study(batch=3, scans=3)
    mask = torch.tensor([[True, False, False], [True, True, True], [True, True, False]])
    torch.testing.assert_close(varlen(pixels, mask), dense(pixels, mask), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_uint8_pixels_are_normalised_by_the_model():
    encoder = tiny_encoder(pixel_mean=[0.25], pixel_std=[0.5])
    raw = torch.randint(0, 256, (1, 2, 1, 16, 32, 32), dtype=torch.uint8)
    as_float = raw.float() / 255.0
    mask = _all_real(raw)
    torch.testing.assert_close(encoder(raw, mask), encoder(as_float, mask))
    normalised = encoder.normalize_pixels(raw[0])
    torch.testing.assert_close(normalised, (as_float[0] - 0.25) / 0.5)


@torch.no_grad()
def test_more_scans_than_slots_interpolates_at_eval_and_fails_in_training():
    encoder = tiny_encoder(max_scan_slots=2)
    pixels = _study(scans=3)
    assert encoder(pixels, _all_real(pixels)).shape == (1, 24)
    with pytest.raises(ValueError, match="3 scans; the model has 2 scan slots"):
        encoder.train()(pixels, _all_real(pixels), [0])


def test_multichannel_input():
    encoder = tiny_encoder(in_channels=2)
    pixels = torch.randint(0, 256, (1, 1, 2, 16, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        assert encoder(pixels, _all_real(pixels)).shape == (1, 24)
    assert isinstance(encoder, StudyEncoder)


@pytest.mark.parametrize("layout", ["h2", "h3", "chest"])
@torch.no_grad()
def test_cls_patch_mean_pooling_is_the_cls_token_beside_the_mean_of_the_studys_patch_tokens(layout):
    """DINO.txt's pooling, computed here from the tokens the blocks leave: per study, the CLS token and
    the mean of every real scan's patch tokens after the final norm, side by side, then fc_norm."""
    encoder = tiny_encoder(layout, depth=3, pooling="cls_patch_mean")
    torch.nn.init.normal_(encoder.fc_norm.weight)          # not the identity, so it is really applied
    pixels = _study(batch=2, scans=3, seed=4)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    features = encoder(pixels, mask)
    assert encoder.feature_dim == 48 and features.shape == (2, 48)
    tokens = encoder.forward_tokens(pixels, mask)
    study_level = tokens.groups.regroup(tokens.packed, tokens.level, "study")
    prefix, _ = tokens.groups.unpack(study_level, "study")
    scans = tokens.scan_tokens()                           # [S, N, E], studies' scans in batch order
    first = 0
    for row, count in enumerate(mask.sum(1).tolist()):
        patch_mean = encoder.norm(scans[first : first + count].reshape(-1, 24)).mean(0)
        first += count
        expected = encoder.fc_norm(torch.cat([encoder.norm(prefix[row, 0]), patch_mean]))
        torch.testing.assert_close(features[row], expected, atol=1e-5, rtol=1e-5)
    # padding changes nothing here either, and the CLS half alone is today's pooling
    padded = torch.cat([pixels[:1, :2], torch.full((1, 2, *pixels.shape[2:]), 3.0)], dim=1)
    torch.testing.assert_close(encoder(padded, torch.tensor([[True, True, False, False]])), features[:1],
                               atol=1e-5, rtol=1e-5)
    cls_only = tiny_encoder(layout, depth=3)
    assert cls_only.fc_norm is None and cls_only(pixels, mask).shape == (2, 24)


def test_an_unknown_pooling_is_refused():
    with pytest.raises(ValueError, match="pooling must be one of cls, cls_patch_mean"):
        tiny_encoder("h2", pooling="mean")


def test_hlip_2026_geometry_patch_6x16x16_with_8_scans_runs_forward_and_backward():
    """HLIP's brain geometry since the paper: 48 x 224 x 224 in patches of 6 x 16 x 16 (8 slice groups of 6
    slices), 8 scans per study; at test size, 12 x 32 x 32."""
    encoder = tiny_encoder("h3", depth=3, grid=(12, 32, 32), patch=(6, 16, 16), pooling="cls_patch_mean").train()
    pixels = torch.randint(0, 256, (2, 8, 1, 12, 32, 32), dtype=torch.uint8)
    features = encoder(pixels, torch.ones(2, 8, dtype=torch.bool), torch.tensor([1, 2]))
    (features * torch.randn_like(features)).sum().backward()   # (a plain sum of LayerNorm outputs is flat)
    assert features.shape == (2, 48) and encoder.patch_embed.weight.grad.abs().sum() > 0
    assert encoder.token_grid == (2, 2, 2)
