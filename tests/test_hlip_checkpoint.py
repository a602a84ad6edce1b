"""Loading HLIP's released models and inflating 2D ViTs."""

import json

import pytest
import timm
import torch

from hlip_ray.model import HLIP_MODELS, from_hlip_checkpoint, init_from_2d_vit
from hlip_ray.model.pos_embed import spatial_from_2d
from tests.helpers import tiny_bert_dir, tiny_encoder

LAYOUT_OF_CASE = {"multiscan_h2": "h2", "multiscan_h3": "h3", "singlescan_chest": "chest",
                  "multiscan_h2_eval_resolution": "h2"}


def test_reproduces_hlip_golden_embeddings(hlip_reference):
    cases = json.loads((hlip_reference / "cases.json").read_text())
    assert set(cases) == set(LAYOUT_OF_CASE)
    for name, case in cases.items():
        model = from_hlip_checkpoint(
            hlip_reference / f"{name}.pt", attention_layout=LAYOUT_OF_CASE[name], num_heads=case["num_heads"]
        ).eval()
        assert model.visual.attention_levels == tuple(case["attention_levels"])
        golden = torch.load(hlip_reference / f"{name}_io.pt", weights_only=True)
        for pixels, cls_features, embedding in zip(golden["pixels"], golden["cls_features"], golden["study_embedding"]):
            mask = torch.ones(pixels.shape[:2], dtype=torch.bool)
            with torch.no_grad():
                features = model.visual(pixels, mask)
                study = model.encode_study(pixels, mask)
            torch.testing.assert_close(features, cls_features, atol=1e-5, rtol=0)
            torch.testing.assert_close(study, embedding, atol=1e-5, rtol=0)


def _hlip_release(tmp_path, text_dir, name="vit_base_multiscan_h2_token1176", width=48):
    """A state dict in HLIP's released layout (open_clip CustomTextCLIP), tiny sizes."""
    from transformers import BertModel

    spec = HLIP_MODELS[name]
    patch = spec["patch_size"]
    token_grid = [g // p for g, p in zip(spec["grid"], patch)]
    reference = tiny_encoder(spec["attention_layout"], depth=3, grid=spec["grid"], patch=patch,
                             embed_dim=width, num_heads=1, max_scan_slots=40, seed=1)
    state = {}
    for key, value in reference.state_dict().items():
        key = (key.replace("patch_embed.", "patch_embed.proj.")
                  .replace("spatial_pos_embed", "spatial_posemb").replace("slot_pos_embed", "sequential_posemb"))
        state[f"module.visual.trunk.{key}"] = value
    assert state["module.visual.trunk.spatial_posemb"].shape[1:4] == tuple(token_grid)
    state["module.visual.head.proj.weight"] = torch.randn(16, width)
    bert = BertModel.from_pretrained(text_dir, add_pooling_layer=False)
    for key, value in bert.state_dict().items():
        state[f"module.text.transformer.{key}"] = value
    state["module.text.proj.weight"] = torch.randn(16, bert.config.hidden_size)
    state["module.logit_scale"] = torch.tensor(4.0)
    path = tmp_path / "release.pt"
    torch.save({"epoch": 10, "state_dict": state}, path)
    return path, reference, state


def test_release_layout_loads_by_name_with_text_tower(tmp_path):
    text_dir = tiny_bert_dir(tmp_path)
    path, reference, state = _hlip_release(tmp_path, text_dir)
    model = from_hlip_checkpoint(path, name="vit_base_multiscan_h2_token1176", num_heads=1,
                                 text_name_or_path=str(text_dir)).eval()
    assert model.visual.attention_levels == ("scan", "scan", "study")
    assert model.visual.patch_size == (8, 16, 16)
    assert model.logit_scale.item() == 4.0
    pixels = torch.rand(1, 2, 1, 48, 224, 224)
    mask = torch.ones(1, 2, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(model.visual(pixels, mask), reference(pixels, mask))
        ids = torch.tensor([[101, 7592, 102]])
        text = model.encode_text(ids, torch.ones_like(ids))
    assert text.shape == (1, 16)
    torch.testing.assert_close(model.text.proj.weight, state["module.text.proj.weight"])
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(1))


def test_wrong_name_or_missing_layout_is_a_clear_error(tmp_path):
    text_dir = tiny_bert_dir(tmp_path)
    path, _, _ = _hlip_release(tmp_path, text_dir)
    with pytest.raises(ValueError, match="attention layout"):
        from_hlip_checkpoint(path, text_name_or_path=str(text_dir))
    with pytest.raises(ValueError, match="vit_base_multiscan_h2_token588 is patch"):
        from_hlip_checkpoint(path, name="vit_base_multiscan_h2_token588", text_name_or_path=str(text_dir))
    with pytest.raises(ValueError, match="unknown HLIP model"):
        from_hlip_checkpoint(path, name="vit_huge")
    with pytest.raises(FileNotFoundError):
        from_hlip_checkpoint(tmp_path / "missing.pt", name="vit_base_multiscan_h2_token588")


def test_2d_vit_inflates_into_the_study_encoder(tmp_path):
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, embed_dim=24,
                            depth=3, num_heads=2, num_classes=0)
    path = tmp_path / "mae.pth"
    torch.save({"model": vit.state_dict()}, path)
    encoder = tiny_encoder("h2", depth=3, grid=(16, 32, 32), patch=(8, 16, 16))
    init_from_2d_vit(encoder, path)

    kernel_2d = vit.patch_embed.proj.weight.detach()  # [24, 3, 16, 16]
    torch.testing.assert_close(encoder.patch_embed.weight[:, 0, 3], kernel_2d.sum(dim=1) / 8)
    torch.testing.assert_close(encoder.blocks[2].mlp.fc2.weight, vit.blocks[2].mlp.fc2.weight)
    torch.testing.assert_close(encoder.cls_token, vit.cls_token + vit.pos_embed[:, :1])
    # a grey volume gives the response the 2D kernel gives to the same grey image in RGB
    grey_rgb_image = torch.rand(1, 1, 16, 16).expand(1, 3, 16, 16)
    grey_volume = grey_rgb_image[:, :1, None].expand(1, 1, 8, 16, 16)
    torch.testing.assert_close(
        torch.nn.functional.conv3d(grey_volume, encoder.patch_embed.weight).flatten(),
        torch.nn.functional.conv2d(grey_rgb_image, kernel_2d).flatten(),
        atol=1e-5, rtol=1e-4,
    )
    expected_pos = spatial_from_2d(vit.pos_embed[:, 1:].detach(), encoder.token_grid)
    torch.testing.assert_close(encoder.spatial_pos_embed, expected_pos)
    assert expected_pos.shape == (1, 2, 2, 2, 24)


def test_a_cls_patch_mean_model_exports_to_hlips_layout_and_loads_back(tmp_path):
    """The pooling's LayerNorm travels as visual.trunk.fc_norm; from_hlip_checkpoint sees it and builds the
    same model (same study and text embeddings)."""
    from hlip_ray.config import load_config
    from hlip_ray.model import build_model
    from hlip_ray.model.hlip_export import hlip_state_dict

    text_dir = tiny_bert_dir(tmp_path)
    config = load_config(None, ["data.grid=[12,32,32]", "model.patch_size=[6,16,16]", "model.embed_dim=24",
                                "model.num_heads=2", "model.depth=3", "model.attention_layout=h3",
                                "model.projection_dim=16", "model.max_scan_slots=8", "model.pooling=cls_patch_mean",
                                f"model.text.name_or_path={text_dir}", "model.pixel_mean=[0]", "model.pixel_std=[1]"])
    torch.manual_seed(0)
    model = build_model(config).eval()
    torch.nn.init.normal_(model.visual.fc_norm.weight)
    state = hlip_state_dict(model)
    assert state["visual.trunk.fc_norm.weight"].shape == (48,) and state["visual.head.proj.weight"].shape == (16, 48)
    torch.save({"state_dict": state}, tmp_path / "export.pt")
    loaded = from_hlip_checkpoint(tmp_path / "export.pt", attention_layout="h3", num_heads=2,
                                  text_name_or_path=str(text_dir)).eval()
    assert loaded.visual.pooling == "cls_patch_mean"
    pixels = torch.randint(0, 256, (2, 3, 1, 12, 32, 32), dtype=torch.uint8)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    ids = torch.tensor([[101, 7592, 102]])
    mask_ids = torch.ones_like(ids)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_study(pixels, mask), model.encode_study(pixels, mask))
        torch.testing.assert_close(loaded.encode_text(ids, mask_ids), model.encode_text(ids, mask_ids))
