"""Benchmark of the study data plane, on a synthetic DICOM/NIfTI corpus in a local moto S3.

Prints ONE JSON line on stdout (progress to stderr):

- ``ray_vs_dataloader_ratio``: studies/s of the Ray Data pipeline (decode + preprocess as Ray
  tasks, each reading its next study while it decodes the current) over a
  ``torch.utils.data.DataLoader`` running the same functions with the same number of worker
  processes (each reading and decoding its studies in turn). Goal >= 1.0.
- ``shard_vs_raw_ratio``: studies/s streaming the shard cache over decoding the raw files,
  both through Ray Data. Goal >= 10.
- ``studies_per_s_per_core``: decode + preprocess rate of one process.
- ``studies_per_s.stream``: the evaluation stream on the raw files, as training and evaluation
  read them (decode, scan sampling and tokenizing fused in Ray Data), for the same passes.

Each rate is the median of ``--repeats`` passes over the corpus, Ray and DataLoader passes
interleaved, after one untimed pass of each Ray pipeline (worker start-up, first imports); every
pass delivers each study to this process. S3 is a moto server on 127.0.0.1, so storage latency
is a loopback's. A pass over the shard cache of 64 studies takes about 1.2 s, a quarter of it
Ray Data's start-up (measured with a pass that reads the shards and moves nothing), so the corpus
must be large enough for a rate: 128 studies by default, where the start-up is about a seventh (a
training epoch reads thousands). At 64 the shard rate measured 48-54 studies/s, at 128 59-62.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

GOALS = {"ray_vs_dataloader": 1.0, "shard_vs_raw": 10.0}


def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def timed_rate(run) -> float:
    """Studies per second of one full pass: ``run()`` returns the number of studies seen."""
    start = time.perf_counter()
    studies = run()
    return studies / (time.perf_counter() - start)


def load_study(source, row: dict) -> list[dict]:
    """One manifest row through the pipeline's raw source (read, then decode and preprocess)."""
    return source.build(row, 0, source.read(row, 0))


class _StudyDataset:
    """The manifest rows as a map-style torch dataset calling the pipeline's own raw source."""

    def __init__(self, rows, loader) -> None:
        self.rows = [row.to_dict() for row in rows]
        self.loader = loader

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        return load_study(self.loader, self.rows[index])


def read_shards(shards_dir: str, storage):
    """Every study record of a shard cache as one Ray Dataset of its Parquet files.

    Ray 2.60's default (V2) Parquet reader spends 7-15 s idle in its ListFiles task on every
    execution here (measured: 71 ms of CPU); the V1 reader streams the same shards in 0.15 s.
    """
    import ray

    from hlip_ray.data.shards import SHARDS_DIR

    filesystem, path = storage.resolve(f"{shards_dir}/{SHARDS_DIR}")
    ray.data.DataContext.get_current().use_datasource_v2 = False
    return ray.data.read_parquet(path, filesystem=filesystem, num_cpus=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=128)
    parser.add_argument("--size", choices=["small", "medium"], default="medium")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--grid", type=int, nargs=3, default=[48, 224, 224])
    args = parser.parse_args()

    import boto3
    import ray
    import torch

    from hlip_ray.config import load_config
    from hlip_ray.data.manifest import build_manifest
    from hlip_ray.data.preprocess import write_shards
    from hlip_ray.data.quarantine import create_quarantine_log
    from hlip_ray.data.sources import RawStudies
    from hlip_ray.data.streams import evaluation_stream, study_records
    from hlip_ray.demo.local_s3 import moto_server, use_local_credentials
    from hlip_ray.demo.synth import write_corpus
    from hlip_ray.storage import Storage

    use_local_credentials()
    started = time.perf_counter()
    with moto_server() as endpoint, tempfile.TemporaryDirectory() as scratch:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
        storage = Storage(endpoint_url=endpoint)
        with storage.parallel_writer("s3://bench/raw") as write:
            summary = write_corpus(write, studies=args.studies, seed=0, size=args.size)
        rows = build_manifest("s3://bench/raw", storage, salt="bench", val_fraction=0.0)
        config = load_config(None, [f"data.grid={args.grid}", "data.windows=[[0,80]]", "data.max_eval_scans=8",
                                    f"data.decode_concurrency={args.processes}", f"storage.endpoint_url={endpoint}"])
        loader = RawStudies.of_config(config, storage, None, train=False)
        log(f"corpus: {summary.studies} studies, {summary.scans} scans, {summary.files} files "
            f"({summary.bytes / 2**20:.1f} MiB) on {endpoint}")

        single = timed_rate(lambda: sum(len(load_study(loader, row.to_dict())) for row in rows))
        log(f"one process: {single:.2f} studies/s")

        ray.init(num_cpus=args.processes, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False

        def ray_pass() -> int:
            # Every study reaches this process, as every item of the DataLoader pass does (a
            # ``count()`` would not fetch them, and measured slower: 2.9 vs 3.9 studies/s).
            records = study_records(rows, config, storage, None, train=False)
            return sum(len(batch["study_id"]) for batch in records.iter_batches(batch_size=1))

        def stream_pass() -> int:
            source = RawStudies.of_config(config, storage, None, train=False)
            examples = evaluation_stream([row.to_item() for row in rows], source, config)
            return sum(len(batch["study_id"]) for batch in examples.iter_batches(batch_size=1))

        def dataloader_pass() -> int:
            data = torch.utils.data.DataLoader(_StudyDataset(rows, loader), batch_size=None,
                                               num_workers=args.processes, collate_fn=lambda item: item)
            return sum(len(item) for item in data)

        ray_pass()  # start Ray's worker processes once, as a running cluster has them
        stream_pass()
        rates: dict[str, list[float]] = {"ray": [], "dataloader": [], "stream": [], "shards": []}
        passes = (("ray", ray_pass), ("dataloader", dataloader_pass), ("stream", stream_pass))
        for repeat in range(args.repeats):
            for name, run in passes[:: 1 if repeat % 2 == 0 else -1]:
                rates[name].append(timed_rate(run))
                log(f"{name}: {rates[name][-1]:.2f} studies/s")

        shards_dir = f"{scratch}/shards"
        write_shards(rows, config, storage, shards_dir, create_quarantine_log())

        def shard_pass() -> int:
            seen = 0
            for batch in read_shards(shards_dir, storage).iter_batches(batch_size=8):
                seen += sum(len(pixels) > 0 for pixels in batch["pixels"])
            return seen

        shard_pass()  # the first read of Parquet in this cluster, as the first Ray pass above
        for _ in range(args.repeats):
            rates["shards"].append(timed_rate(shard_pass))
            log(f"shards: {rates['shards'][-1]:.2f} studies/s")
        ray.shutdown()

    median = {name: statistics.median(values) for name, values in rates.items()}
    figures = {
        "studies": summary.studies,
        "scans": summary.scans,
        "corpus_mib": round(summary.bytes / 2**20, 2),
        "grid": args.grid,
        "processes": args.processes,
        "studies_per_s": {name: round(value, 3) for name, value in median.items()},
        "ray_vs_dataloader_ratio": round(median["ray"] / median["dataloader"], 3),
        "shard_vs_raw_ratio": round(median["shards"] / median["ray"], 3),
        "studies_per_s_per_core": round(single, 3),
        "goal_ray_vs_dataloader_met": median["ray"] / median["dataloader"] >= GOALS["ray_vs_dataloader"],
        "goal_shard_vs_raw_met": median["shards"] / median["ray"] >= GOALS["shard_vs_raw"],
        "wall_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
