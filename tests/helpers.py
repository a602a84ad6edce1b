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
    from hlip_ray.demo.synth import write_tiny_text_tower

    return write_tiny_text_tower(tmp_path / f"tiny-bert-{dropout}", dropout)


def raw_training_examples(rows, config, storage, quarantine_log=None):
    """Manifest rows -> a Ray Dataset of training examples decoded from raw files, in manifest order
    (a training stream's examples without the data order)."""
    from hlip_ray.data.streams import study_records, training_examples

    return training_examples(study_records(rows, config, storage, quarantine_log, train=True), config, train=True)


def shard_records(shards_dir: str, storage) -> dict[str, dict]:
    """Study ID -> the study record stored in a shard cache, read through its index."""
    from hlip_ray.data.shards import read_index, read_study

    return {item["study_id"]: read_study(shards_dir, item["file"], item["row_group"], storage)
            for item in read_index(shards_dir, storage)}


def synthetic_corpus(root, studies: int, seed: int, val_fraction: float):
    """A synthetic corpus in ``root/raw`` listed into ``root/manifest.parquet`` (local files); returns ``root``."""
    from hlip_ray.data.manifest import build_manifest, write_manifest
    from hlip_ray.data.storage import Storage
    from hlip_ray.demo.synth import folder_writer, write_corpus

    write_corpus(folder_writer(str(root / "raw")), studies=studies, seed=seed)
    rows = build_manifest(str(root / "raw"), Storage(), salt="hlip-ray", val_fraction=val_fraction)
    write_manifest(rows, str(root / "manifest.parquet"), Storage())
    return root
