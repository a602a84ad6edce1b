"""Relevance maps (``hlip_ray.eval.relevance``) of a tiny random model: their shape and values, their
faithfulness to the zero-shot score, that they follow the input, and the overlay figures.

The pointing-game figure of a trained model is measured by ``benchmarks/bench_relevance.py``, not here.
"""

from __future__ import annotations

import copy

import pytest
import torch

from hlip_ray.demo.synth import VOCABULARY
from hlip_ray.eval.relevance import label_directions, relevance_figures, relevance_maps
from hlip_ray.eval.zeroshot import class_embeddings, zeroshot_scores
from hlip_ray.inference.trained_model import load_model
from hlip_ray.storage import Storage
from hlip_ray.text_source import load_tokenizer
from tests.helpers import tiny_bert_dir, tiny_run_checkpoint

GRID = (16, 32, 32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``(model, classes)``: a tiny random model on a 4x4x4 token grid per scan, and its class embeddings of
    the synthetic corpus' vocabulary."""
    root = tmp_path_factory.mktemp("relevance")
    text = tiny_bert_dir(root)
    folder, config = tiny_run_checkpoint(root / "run", text, "model.patch_size=[4,8,8]")
    model, _ = load_model(str(folder), Storage())
    model.eval()
    classes = class_embeddings(model, load_tokenizer(str(text)), VOCABULARY, config.model.text.context_length)
    return model, classes


def studies(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two studies of up to 3 scans, uint8 ``[2, 3, 1, *GRID]``: 2 real scans, then 1."""
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (2, 3, 1, *GRID), generator=gen, dtype=torch.uint8)
    scan_mask = torch.tensor([[True, True, False], [True, False, False]])
    pixels[~scan_mask] = 0
    return pixels, scan_mask


def test_relevance_has_each_scans_shape_is_non_negative_and_zero_on_padding(tiny):
    model, classes = tiny
    pixels, scan_mask = studies()
    maps, scores = relevance_maps(model, pixels, scan_mask, label_directions(classes))
    assert set(maps) == set(VOCABULARY)
    for label, relevance in maps.items():
        assert relevance.shape == (2, 3, *GRID)
        assert torch.isfinite(relevance).all() and (relevance >= 0).all()
        assert (relevance[~scan_mask] == 0).all(), f"{label}: relevance on a padded scan"
        assert all(relevance[row, scan].max() > 0 for row, scan in scan_mask.nonzero().tolist()), label
        assert scores[label].shape == (2,)


def test_scores_are_the_zero_shot_scores_of_the_model(tiny):
    """The pass that the maps explain is the model's own: its scores are ``zeroshot_scores``'."""
    model, classes = tiny
    pixels, scan_mask = studies(seed=1)
    _, scores = relevance_maps(model, pixels, scan_mask, label_directions(classes))
    with torch.no_grad():
        expected = zeroshot_scores(model.encode_study(pixels, scan_mask), classes)
    for label in VOCABULARY:
        torch.testing.assert_close(scores[label], torch.from_numpy(expected[label]), rtol=1e-4, atol=1e-5)


def signal_model(model):
    """A copy whose scans' background tokens are all alike (no position embedding) and whose last block
    attends uniformly (its query and key projections zero), so the score is, to first order, a fixed
    linear function of each token entering the blocks."""
    toy = copy.deepcopy(model)
    width = toy.visual.embed_dim
    with torch.no_grad():
        toy.visual.spatial_pos_embed.zero_()
        qkv = toy.visual.blocks[-1].attn.qkv
        qkv.weight[: 2 * width] = 0
        qkv.bias[: 2 * width] = 0
    return toy


@pytest.mark.parametrize("box", [(slice(8, 16), slice(16, 32), slice(0, 8)),
                                 (slice(0, 4), slice(0, 8), slice(24, 32)),
                                 (slice(4, 12), slice(8, 16), slice(8, 24))])
def test_peak_relevance_lands_where_the_signal_is(tiny, box):
    """A bright box in a flat scan, scored along the direction the box moves the study embedding: the peak
    of the map lies in the box, wherever the box is (a mixed-up token order or axis would miss it)."""
    model = signal_model(tiny[0])
    plain = torch.full((1, 2, 1, *GRID), 60, dtype=torch.uint8)
    pixels = plain.clone()
    pixels[(0, 0, slice(None), *box)] = 200
    scan_mask = torch.ones(1, 2, dtype=torch.bool)
    with torch.no_grad():
        direction = model.encode_study(pixels, scan_mask)[0] - model.encode_study(plain, scan_mask)[0]
    maps, _ = relevance_maps(model, pixels, scan_mask, {"box": direction})
    relevance = maps["box"][0, 0]
    inside = torch.zeros(GRID, dtype=torch.bool)
    inside[box] = True
    peak = tuple(int(i) for i in torch.nonzero(relevance == relevance.max())[0])
    assert inside[peak], f"peak at {peak}, box {box}"
    assert relevance[inside].mean() > 5 * relevance[~inside].mean()


def test_relevance_figures_write_one_png_per_study_and_label(tiny, tmp_path):
    model, classes = tiny
    pixels, scan_mask = studies(seed=2)
    two_labels = {label: classes[label] for label in ("hemorrhage", "mass")}
    written = relevance_figures(model, pixels, scan_mask, two_labels, tmp_path / "figures", ["site/A 1", "B2"])
    names = sorted(path.name for path in written)
    assert names == ["B2_hemorrhage.png", "B2_mass.png", "site_A_1_hemorrhage.png", "site_A_1_mass.png"]
    for path in written:
        assert path.parent == tmp_path / "figures"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


def test_the_last_block_and_training_mode_are_refused(tiny):
    model, classes = tiny
    pixels, scan_mask = studies()
    directions = label_directions(classes)
    for block in (-1, 2, 3):
        with pytest.raises(ValueError, match="input of a block"):
            relevance_maps(model, pixels, scan_mask, directions, block=block)
    maps, _ = relevance_maps(model, pixels, scan_mask, directions, block=1)
    assert (maps["mass"][~scan_mask] == 0).all()
    model.train()
    try:
        with pytest.raises(ValueError, match="eval mode"):
            relevance_maps(model, pixels, scan_mask, directions)
    finally:
        model.eval()
