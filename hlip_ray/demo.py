"""The embedded end-to-end job that ``make demo`` runs on a CPU machine.

What exists so far, end to end: start a local S3 endpoint (moto) and a local Ray (or use
``RAY_ADDRESS``); write the synthetic DICOM/NIfTI corpus to the bucket; build its manifest;
decode and preprocess it into Parquet shards on Ray Data CPU workers; stream training batches
from the shards; encode them with the hierarchical CLIP model (text tower: the packaged,
offline all-MiniLM-L6-v2) and time a training step of the hierarchical layout against a plain
ViT. The last line printed is one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "demo.yaml"
BUCKET = "hlip-demo"


def _train_step_seconds(model, pixels, scan_mask, repeats: int = 2) -> float:
    model.train()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.encode_study(pixels, scan_mask).sum().backward()
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return min(times)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEMO_CONFIG))
    parser.add_argument("--studies", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.depth=3")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    import boto3
    import ray
    import torch

    from hlip_ray import ray_runtime
    from hlip_ray.config import load_config
    from hlip_ray.data.manifest import build_manifest, write_manifest
    from hlip_ray.data.pipeline import collate_study_batch, create_quarantine_log, training_examples
    from hlip_ray.data.shards import read_shards, write_shards
    from hlip_ray.data.storage import Storage
    from hlip_ray.data.synth import write_corpus
    from hlip_ray.local_s3 import moto_server, use_local_credentials
    from hlip_ray.model import build_model

    torch.manual_seed(args.seed)
    use_local_credentials()  # dummies for the local endpoint, before Ray starts its workers
    with moto_server() as endpoint:
        config = load_config(args.config, [*args.overrides, f"storage.endpoint_url={endpoint}"])
        storage = Storage.from_config(config.storage)
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        root = f"s3://{BUCKET}"

        corpus = write_corpus(lambda relative, data: storage.write_bytes(f"{root}/raw/{relative}", data),
                              studies=args.studies, seed=args.seed)
        print(f"synthetic corpus: {corpus.studies} studies, {corpus.scans} scans "
              f"({corpus.dicom_series} DICOM series, {corpus.nifti_scans} NIfTI), {corpus.files} files "
              f"in {root}/raw")
        rows = build_manifest(f"{root}/raw", storage, config.data.split_salt, config.data.val_fraction)
        write_manifest(rows, f"{root}/manifest.parquet", storage)
        splits = {split: sum(row.split == split for row in rows) for split in ("train", "val")}
        print(f"manifest: {root}/manifest.parquet, {splits}")

        connected = ray_runtime.connect()
        shard_start = time.perf_counter()
        summary = write_shards(rows, config, storage, f"{root}/shards", create_quarantine_log())
        shard_s = time.perf_counter() - shard_start
        print(f"shards: {summary['studies_written']} studies decoded and preprocessed on Ray Data in "
              f"{shard_s:.1f} s -> {root}/shards (skipped: {summary['rejections'] or 'none'})")

        examples = training_examples(read_shards(f"{root}/shards", config, storage, split="train"), config,
                                     train=True, batch_size=8)
        batch = next(iter(examples.iter_torch_batches(batch_size=8, collate_fn=collate_study_batch)))
        print(f"batch: pixels {tuple(batch['pixels'].shape)} {batch['pixels'].dtype}, scan_mask "
              f"{tuple(batch['scan_mask'].shape)}, input_ids {tuple(batch['input_ids'].shape)}")

        model = build_model(config).eval()
        with torch.no_grad():
            encode_start = time.perf_counter()
            study_embeddings = model.encode_study(batch["pixels"], batch["scan_mask"])
            encode_s = time.perf_counter() - encode_start
            text_embeddings = model.encode_text(batch["input_ids"], batch["attention_mask"])
        full = load_config(args.config, [*args.overrides, "model.attention_layout=full"])
        plain = build_model(full, text_weights=False)
        plain.visual.load_state_dict(model.visual.state_dict())
        step_hier = _train_step_seconds(model, batch["pixels"], batch["scan_mask"])
        step_full = _train_step_seconds(plain, batch["pixels"], batch["scan_mask"])
        if connected:
            ray.shutdown()

    print(f"model: {config.model.attention_layout} layout, depth {config.model.depth}, width "
          f"{config.model.embed_dim}; study embeddings {tuple(study_embeddings.shape)}, report embeddings "
          f"{tuple(text_embeddings.shape)}")
    print(f"encode one batch: {encode_s:.3f} s; training step {config.model.attention_layout}: {step_hier:.3f} s, "
          f"full attention: {step_full:.3f} s")
    print("training with DeepSpeed and the gradient cache is not built yet (next issue)")
    figures = {
        "studies": corpus.studies,
        "scans": corpus.scans,
        "studies_sharded": summary["studies_written"],
        "rejections": summary["rejections"],
        "shard_s": round(shard_s, 2),
        "batch_pixels_shape": list(batch["pixels"].shape),
        "study_embedding_shape": list(study_embeddings.shape),
        "text_embedding_shape": list(text_embeddings.shape),
        "encode_s": round(encode_s, 4),
        "train_step_s": round(step_hier, 4),
        "train_step_full_attention_s": round(step_full, 4),
        "wall_s": round(time.perf_counter() - started, 2),
    }
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
