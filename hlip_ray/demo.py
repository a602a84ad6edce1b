"""The embedded end-to-end job that ``make demo`` runs on a CPU machine.

1. start a local S3 endpoint (moto) and a local Ray (or use ``RAY_ADDRESS``);
2. write the synthetic DICOM/NIfTI corpus to the bucket and list it into a manifest;
3. decode and preprocess it into Parquet shards on Ray Data CPU workers;
4. train a small hierarchical CLIP with 2 Ray Train workers, DeepSpeed ZeRO-2 and the exact
   gradient cache (checkpoints on S3);
5. evaluate zero-shot on the held-out studies beside a mean-intensity baseline;
6. print a summary; the last line is one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "demo.yaml"
BUCKET = "hlip-demo"


def plot_loss(metrics_file: Path, out: Path) -> Path | None:
    """A PNG of the training loss (and validation AUC at checkpoints) from ``metrics.jsonl``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    if not lines:
        return None
    figure, loss_axis = plt.subplots(figsize=(7, 4))
    loss_axis.plot([line["step"] for line in lines], [line["loss"] for line in lines], color="tab:blue", lw=1)
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("contrastive loss", color="tab:blue")
    validated = [line for line in lines if line.get("checkpoint") and "val/zeroshot_auc" in line]
    if validated:
        auc_axis = loss_axis.twinx()
        auc_axis.plot([line["step"] for line in validated], [line["val/zeroshot_auc"] for line in validated],
                      "o-", color="tab:red")
        auc_axis.set_ylabel("val zero-shot macro AUC", color="tab:red")
        auc_axis.set_ylim(0.4, 1.0)
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEMO_CONFIG))
    parser.add_argument("--studies", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="demo_out", help="local folder for metrics, TensorBoard and the plot")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.max_steps=50")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")   # Ray workers inherit it: a readable log
    sys.stdout.reconfigure(line_buffering=True)   # progress lines show as they come, also through a pipe

    import boto3
    import ray

    from hlip_ray import ray_runtime
    from hlip_ray.checkpoints import load_model
    from hlip_ray.config import load_config
    from hlip_ray.data.manifest import build_manifest, write_manifest
    from hlip_ray.data.pipeline import create_quarantine_log
    from hlip_ray.data.shards import write_shards
    from hlip_ray.data.storage import Storage
    from hlip_ray.data.synth import write_corpus
    from hlip_ray.eval.run import evaluate_zeroshot
    from hlip_ray.local_s3 import moto_server, use_local_credentials
    from hlip_ray.train.run import fit

    out = Path(args.out).resolve()
    use_local_credentials()  # dummies for the local endpoint, before Ray starts its workers
    with moto_server() as endpoint:
        root = f"s3://{BUCKET}"
        config = load_config(args.config, [
            f"storage.endpoint_url={endpoint}", f"data.manifest={root}/manifest.parquet",
            f"data.shards={root}/shards", f"eval.vocabulary={root}/raw/vocabulary.json",
            f"train.storage_path={root}/runs", f"train.log_dir={out}", *args.overrides,
        ])
        storage = Storage.from_config(config.storage)
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)

        step_start = time.perf_counter()
        with storage.parallel_writer(f"{root}/raw") as write:
            corpus = write_corpus(write, studies=args.studies, seed=args.seed)
        rows = build_manifest(f"{root}/raw", storage, config.data.split_salt, config.data.val_fraction)
        write_manifest(rows, config.data.manifest, storage)
        splits = {split: sum(row.split == split for row in rows) for split in ("train", "val")}
        print(f"[{time.perf_counter() - started:5.0f}s] corpus: {corpus.studies} studies, {corpus.scans} scans "
              f"({corpus.dicom_series} DICOM series, {corpus.nifti_scans} NIfTI) -> {root}/raw; "
              f"manifest {splits} ({time.perf_counter() - step_start:.0f} s)", flush=True)

        connected = ray_runtime.connect(num_cpus=ray_runtime.local_cpus(config.train.num_workers))
        step_start = time.perf_counter()
        summary = write_shards(rows, config, storage, config.data.shards, create_quarantine_log())
        print(f"[{time.perf_counter() - started:5.0f}s] shards: {summary['studies_written']} studies decoded and "
              f"preprocessed on Ray Data -> {config.data.shards} ({time.perf_counter() - step_start:.0f} s; "
              f"skipped: {summary['rejections'] or 'none'})", flush=True)

        # Every demo run trains afresh (the bucket is new): drop the logs of an earlier run, which the
        # metrics logger would otherwise append to (and the loss curve would draw both).
        shutil.rmtree(out / config.train.run_name, ignore_errors=True)
        step_start = time.perf_counter()
        trained = fit(config)
        train_s = time.perf_counter() - step_start
        metrics = trained["metrics"]
        steps = int(metrics.get("step", 0))
        studies_per_s = steps * config.train.global_batch_size / train_s
        print(f"[{time.perf_counter() - started:5.0f}s] trained {steps} steps x {config.train.global_batch_size} "
              f"studies ({config.train.num_workers} workers, ZeRO-{config.train.zero_stage}, chunks of "
              f"{config.train.chunk_size}) in {train_s:.0f} s; checkpoint {trained['checkpoint']}", flush=True)

        # The bucket lives only as long as this job: keep the final checkpoint in the output folder.
        checkpoint = out / "checkpoint"
        for uri in storage.list_files(trained["checkpoint"]):
            relative = uri[len(trained["checkpoint"]) + 1:]
            if relative and not relative.endswith("/"):   # not the folder marker object
                storage.write_bytes(str(checkpoint / relative), storage.read_bytes(uri))
        model, _ = load_model(str(checkpoint), Storage())
        report = evaluate_zeroshot(model, config, split="val")
        if connected:
            ray.shutdown()

    plot = plot_loss(out / config.train.run_name / "metrics.jsonl", out / "loss_curve.png")
    per_label = ", ".join(f"{label} {auc:.3f}" for label, auc in report["per_label"].items())
    baseline = report["baseline"]
    print(f"zero-shot on {report['studies']} held-out studies: macro AUC {report['macro_auc']:.3f} ({per_label})")
    print(f"mean-intensity baseline: macro AUC {baseline['macro_auc']:.3f} ("
          + ", ".join(f"{label} {auc:.3f}" for label, auc in baseline["per_label"].items()) + ")")
    logs = out / config.train.run_name
    print(f"metrics: {logs}/metrics.jsonl, TensorBoard: {logs}/tensorboard, loss curve: {plot}")
    figures = {
        "zeroshot_macro_auc": round(report["macro_auc"], 4),
        "zeroshot_auc_per_label": {label: round(auc, 4) for label, auc in report["per_label"].items()},
        "baseline_auc": round(baseline["macro_auc"], 4),
        "val_studies": report["studies"],
        "train_steps": steps,
        "train_studies_per_s": round(studies_per_s, 3),
        "train_s": round(train_s, 1),
        "wall_s": round(time.perf_counter() - started, 1),
        "checkpoint": str(checkpoint),
    }
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
