"""The embedded end-to-end job that ``make demo`` runs on a CPU machine.

1. start a local S3 endpoint (moto) and a local Ray (or use ``RAY_ADDRESS``);
2. write the synthetic DICOM/NIfTI corpus to the bucket and list it into a manifest;
3. decode and preprocess it into Parquet shards on Ray Data CPU workers;
4. train a small hierarchical CLIP with 2 Ray Train workers, DeepSpeed ZeRO-2 and the exact
   gradient cache (checkpoints on S3);
5. evaluate on the held-out studies (``hlip-ray eval``'s report: zero-shot AUC with bootstrap intervals
   beside a mean-intensity baseline, thresholds, a linear probe, retrieval; ROC curves);
6. print a summary; the last line is one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

DEMO_CONFIG = Path(__file__).with_name("demo.yaml")   # package data: found from a wheel too
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
    parser = argparse.ArgumentParser(prog="hlip-ray demo", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEMO_CONFIG),
                        help="the demo's config, overrides applied on top (default: hlip_ray/demo/demo.yaml)")
    parser.add_argument("--studies", type=int, default=600,
                        help="synthetic studies written, a fifth of them held out (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic corpus (default: %(default)s)")
    parser.add_argument("--out", default="demo_out",
                        help="local folder for metrics, TensorBoard, the loss curve, the evaluation report and the "
                             "final checkpoint (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.max_steps=50")
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)   # progress lines show as they come, also through a pipe

    import ray

    from hlip_ray import ray_runtime
    from hlip_ray.demo.local_s3 import moto_server, use_local_credentials

    clock = Clock()
    out = Path(args.out).resolve()
    use_local_credentials()  # dummies for the local endpoint, before Ray starts its workers
    with moto_server() as endpoint:
        config = demo_config(args.config, endpoint, out, args.overrides)
        rows = write_corpus(config, endpoint, args.studies, args.seed, clock)
        connected = ray_runtime.connect(num_cpus=ray_runtime.local_cpus(config.train.num_workers))
        preprocess(rows, config, clock)
        trained = train(config, out, clock)
        report = evaluate(config, trained["checkpoint"], out / "checkpoint", out / "eval")
        if connected:
            ray.shutdown()
    return summarise(report, trained, config, out, clock)


class Clock:
    """Seconds since the demo started, and a step's own seconds."""

    def __init__(self) -> None:
        self.started = self.step_started = time.perf_counter()

    def line(self, text: str) -> None:
        """Print ``[  elapsed s] text (step s)`` and start the next step."""
        now = time.perf_counter()
        print(f"[{now - self.started:5.0f}s] {text} ({now - self.step_started:.0f} s)", flush=True)
        self.step_started = now


def demo_config(path: str, endpoint: str, out: Path, overrides: list[str]):
    """The demo's config, its data, runs and vocabulary in the local bucket, its logs in ``out``."""
    from hlip_ray.config import load_config

    root = f"s3://{BUCKET}"
    return load_config(path, [
        f"storage.endpoint_url={endpoint}", f"data.manifest={root}/manifest.parquet",
        f"data.shards={root}/shards", f"eval.vocabulary={root}/raw/vocabulary.json",
        f"train.storage_path={root}/runs", f"train.log_dir={out}", *overrides,
    ])


def write_corpus(config, endpoint: str, studies: int, seed: int, clock: Clock):
    """The synthetic corpus in a new bucket, listed into the manifest; returns its rows."""
    import boto3

    from hlip_ray.data.manifest import build_manifest, write_manifest
    from hlip_ray.demo.synth import write_corpus as write_synthetic
    from hlip_ray.storage import Storage

    storage = Storage.from_config(config.storage)
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
    raw = f"s3://{BUCKET}/raw"
    with storage.parallel_writer(raw) as write:
        corpus = write_synthetic(write, studies=studies, seed=seed)
    rows = build_manifest(raw, storage, config.data.split_salt, config.data.val_fraction)
    write_manifest(rows, config.data.manifest, storage)
    splits = {split: sum(row.split == split for row in rows) for split in ("train", "val")}
    clock.line(f"corpus: {corpus.studies} studies, {corpus.scans} scans ({corpus.dicom_series} DICOM series, "
               f"{corpus.nifti_scans} NIfTI) -> {raw}; manifest {splits}")
    return rows


def preprocess(rows, config, clock: Clock) -> None:
    """The corpus decoded and preprocessed into shards on Ray Data (Ray Data's own progress log)."""
    from hlip_ray.data.preprocess import write_shards
    from hlip_ray.data.quarantine import create_quarantine_log
    from hlip_ray.storage import Storage

    summary = write_shards(rows, config, Storage.from_config(config.storage), config.data.shards,
                           create_quarantine_log())
    clock.line(f"shards: {summary['studies_written']} studies decoded and preprocessed on Ray Data -> "
               f"{config.data.shards}; skipped: {summary['rejections'] or 'none'}")


def train(config, out: Path, clock: Clock) -> dict:
    """Training from scratch (progress lines as it goes); returns ``fit``'s summary."""
    from hlip_ray.train.run import fit

    # Every demo run trains afresh (the bucket is new): drop the logs of an earlier run, which the
    # run log would otherwise append to (and the loss curve would draw both).
    shutil.rmtree(out / config.train.run_name, ignore_errors=True)
    started = time.perf_counter()
    trained = fit(config)
    trained["train_s"] = time.perf_counter() - started
    train = config.train
    clock.line(f"trained {int(trained['metrics'].get('step', 0))} steps x {train.global_batch_size} studies "
               f"({train.num_workers} workers, ZeRO-{train.zero_stage}, chunks of {train.chunk_size}); "
               f"checkpoint {trained['checkpoint']}")
    return trained


def evaluate(config, checkpoint_uri: str, checkpoint: Path, report_dir: Path) -> dict:
    """``hlip-ray eval`` of the held-out split, from a local copy of the final checkpoint (the bucket lives
    only as long as this job); its report (JSON, Markdown, ROC curves) in ``report_dir``."""
    from hlip_ray.eval.evaluate import evaluate_split
    from hlip_ray.inference.trained_model import load_model
    from hlip_ray.storage import Storage

    storage = Storage.from_config(config.storage)
    for uri in storage.list_files(checkpoint_uri):
        relative = uri[len(checkpoint_uri) + 1:]
        if relative and not relative.endswith("/"):   # not the folder marker object
            storage.write_bytes(str(checkpoint / relative), storage.read_bytes(uri))
    model, _ = load_model(str(checkpoint), Storage())
    return evaluate_split(model, config, split="val", checkpoint=str(checkpoint), out=str(report_dir))


def summarise(report: dict, trained: dict, config, out: Path, clock: Clock) -> dict:
    """The readable summary, then one JSON line of the figures (the last line)."""
    from hlip_ray.eval.report import markdown

    plot = plot_loss(out / config.train.run_name / "metrics.jsonl", out / "loss_curve.png")
    baseline = report["baseline"]
    print(markdown(report))
    logs = out / config.train.run_name
    print(f"metrics: {logs}/metrics.jsonl, TensorBoard: {logs}/tensorboard, loss curve: {plot}, "
          f"evaluation report and ROC curves: {out / 'eval'}")
    steps = int(trained["metrics"].get("step", 0))
    figures = {
        "zeroshot_macro_auc": round(report["macro_auc"], 4),
        "zeroshot_auc_per_label": {label: round(auc, 4) for label, auc in report["per_label"].items()},
        "zeroshot_macro_auc_ci": [round(report["auc_ci"]["macro"][end], 4) for end in ("low", "high")]
        if "auc_ci" in report else None,
        "baseline_auc": round(baseline["macro_auc"], 4),
        "linear_probe_macro_auc": round(report["linear_probe"]["macro_auc"], 4) if "linear_probe" in report else None,
        "few_shot_macro_auc": {k: round(shots["macro"]["mean"], 4) for k, shots in report["few_shot"]["per_k"].items()}
        if "few_shot" in report else None,
        "retrieval_r@1": round(report["retrieval"].get("r@1", float("nan")), 4),
        "val_studies": report["studies"],
        "train_steps": steps,
        "train_studies_per_s": round(steps * config.train.global_batch_size / trained["train_s"], 3),
        "train_s": round(trained["train_s"], 1),
        "wall_s": round(time.perf_counter() - clock.started, 1),
        "checkpoint": str(out / "checkpoint"),
    }
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
