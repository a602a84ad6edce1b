"""Studies to training batches on Ray Data, decoded and preprocessed on CPU workers.

::

    positions ──map_batches(ReadAhead(StudiesAtPositions: StudyLoader | ShardStudies))──> study records
        ──map(ScanSampler)──> ──map_batches(ReportTokenizer)──> batches for
        get_dataset_shard(...).iter_torch_batches

A study *source* turns one item into zero or one study record, in two halves: ``read`` (storage
I/O) and ``build``; ``ReadAhead`` runs them over a block of items, reading the next item while
the current one builds. ``StudyLoader`` reads a manifest row's scans from storage, decodes them
(pydicom / nibabel) and preprocesses them to uint8 volumes, skipping bad scans into the run's
``QuarantineLog`` (a study with nothing usable is dropped); ``ShardStudies`` reads one study back
from the shard cache (``shards.py``).

Training reads studies in a fixed order: epoch ``e`` visits the studies in a permutation drawn
from ``(seed, e)``, and the *position* ``p = e * N + i`` of the ``i``-th study of epoch ``e`` is
the number of studies consumed before it, over all workers (``DataOrder``). A run resumes at a
position, whatever its number of workers (``training_stream``).

Study record: ``study_id``, ``report``, ``modality``, ``split``, ``labels`` (JSON text),
``pixels`` (bytes of uint8 ``[n, C, D, H, W]``), ``shape`` (``[n, C, D, H, W]``); in a training
stream also ``position`` and ``epoch``.

Training example (one study; batches stack them): ``pixels [K, C, D, H, W]`` uint8,
``scan_mask [K]`` bool, ``input_ids`` / ``attention_mask [L]`` int64, ``study_id``, ``labels``,
``position``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from ray.data.collate_fn import NumpyBatchCollateFn

from hlip_ray.config import Config
from hlip_ray.data.manifest import ScanRef, StudyRow
from hlip_ray.data.records import Decoded, Rejection
from hlip_ray.data.storage import Storage

logger = logging.getLogger(__name__)

QUARANTINE_FILE = "quarantine.jsonl"
MAX_BLOCKS = 4096  # manifest blocks fed to the decode tasks
# Studies per decode task. A task reads the next study's files while it decodes the current one
# (``ReadAhead``), so only its first read is waited for; and Ray Data's executor notices a finished
# task up to 0.1 s late (it polls), so a worker idles between tasks. Four per task measured 1.16x
# the studies/s of two without reading ahead (64 studies, 2 processes; ``benchmarks/bench_data.py``).
STUDIES_PER_TASK = 4


def _decode_blocks(studies: int) -> int:
    """Blocks of a stream of ``studies`` manifest or index rows: ``STUDIES_PER_TASK`` per decode task."""
    return max(1, min(-(-studies // STUDIES_PER_TASK), MAX_BLOCKS))


def study_rng(seed: int, epoch: int, study_id: str) -> np.random.Generator:
    """A generator for one study's draws in one epoch (scan sampling, sentence order)."""
    key = int.from_bytes(hashlib.sha256(study_id.encode("utf-8")).digest()[:8], "big")
    return np.random.default_rng([seed, epoch, key])


# -- quarantine ----------------------------------------------------------------------------
@ray.remote(num_cpus=0)
class QuarantineLog:
    """Collects the rejections of every decoding worker of one run."""

    def __init__(self) -> None:
        self.records: list[dict[str, str]] = []

    def record(self, rejections: list[dict[str, str]]) -> None:
        self.records.extend(rejections)

    def records_list(self) -> list[dict[str, str]]:
        return list(self.records)


def create_quarantine_log():
    """A ``QuarantineLog`` actor for one run (pass it to ``study_dataset``)."""
    return QuarantineLog.remote()


def write_quarantine(quarantine, out_dir: str, storage: Storage) -> dict[str, int]:
    """Write ``out_dir/quarantine.jsonl`` (uri, study_id, reason, detail); return counts by reason."""
    records = ray.get(quarantine.records_list.remote())
    lines = "".join(json.dumps(record) + "\n" for record in records)
    storage.write_bytes(f"{out_dir.rstrip('/')}/{QUARANTINE_FILE}", lines.encode())
    counts: dict[str, int] = {}
    for record in records:
        counts[record["reason"]] = counts.get(record["reason"], 0) + 1
    return counts


# -- stage 1: decode and preprocess --------------------------------------------------------
@dataclass
class ScanFiles:
    """The stored bytes of one manifest scan: ``files`` ``(uri, bytes)``; None for a missing object."""

    scan: ScanRef
    files: list[tuple[str, bytes]] | None


def read_scan(scan: ScanRef, storage: Storage) -> ScanFiles:
    """Read one manifest scan's files (a NIfTI object, or every object under a DICOM prefix)."""
    try:
        if scan.format == "nifti":
            return ScanFiles(scan, [(scan.uri, storage.read_bytes(scan.uri))])
        uris = storage.list_files(scan.uri)
        if not uris:
            raise FileNotFoundError(scan.uri)
        return ScanFiles(scan, list(zip(uris, storage.read_many(uris))))
    except FileNotFoundError:
        return ScanFiles(scan, None)


def decode_scan(read: ScanFiles, modality: str, nifti_4d: str) -> Decoded:
    """Decode one read scan; a missing object comes back as a rejection."""
    from hlip_ray.data.decode import decode_dicom_files, decode_nifti

    scan = read.scan
    if read.files is None:
        return Decoded(rejections=[Rejection(scan.uri, "missing_object", "no such file or prefix")])
    if scan.format == "nifti":
        return decode_nifti(scan.uri, read.files[0][1], four_d=nifti_4d, modality=modality)
    return decode_dicom_files(read.files, scan.uri)


class StudyLoader:
    """Raw study source: manifest row -> zero or one study record (decoded on the calling worker).

    ``limit``: scans kept per study. With ``shuffle`` (training from raw files) the scans are
    tried in a random order per (seed, epoch, study) until ``limit`` decode; otherwise in
    manifest order.
    """

    drops_studies = True  # a study whose scans are all bad gives no record

    def __init__(self, config: dict, storage: Storage, quarantine, limit: int, shuffle: bool, seed: int = 0) -> None:
        self.config = Config.model_validate(config)
        self.storage = storage
        self.quarantine = quarantine
        self.limit = limit
        self.shuffle = shuffle
        self.seed = seed

    def _reject(self, rejections: list[Rejection], study_id: str) -> None:
        if not rejections:
            return
        records = [{"uri": r.uri, "study_id": study_id, "reason": r.reason, "detail": r.detail} for r in rejections]
        for record in records:
            logger.warning("skipped %s (study %s): %s", record["uri"], study_id, record["reason"])
        if self.quarantine is not None:
            ray.get(self.quarantine.record.remote(records))

    def _scans(self, study: StudyRow, epoch: int) -> list[ScanRef]:
        """The study's scans in the order they are tried."""
        scans = list(study.scans)
        if self.shuffle:
            scans = [scans[i] for i in study_rng(self.seed, epoch, study.study_id).permutation(len(scans))]
        return scans

    def read(self, row: dict[str, Any], epoch: int = 0) -> list[ScanFiles]:
        """Storage reads only: the files of the first ``limit`` scans tried (more are read by
        ``build`` only where some of these are rejected)."""
        study = StudyRow.from_dict(row, f"study {row.get('study_id')}")
        if not study.report.strip():
            return []
        return [read_scan(scan, self.storage) for scan in self._scans(study, epoch)[:self.limit]]

    def build(self, row: dict[str, Any], epoch: int, read: list[ScanFiles]) -> list[dict[str, Any]]:
        """Decode and preprocess what ``read`` gave: zero or one study record."""
        from hlip_ray.data.preprocess import preprocess_volume

        study = StudyRow.from_dict(row, f"study {row.get('study_id')}")
        if not study.report.strip():
            self._reject([Rejection(study.study_id, "empty_report", "the study has no report text")], study.study_id)
            return []
        data = self.config.data
        volumes = []
        for index, scan in enumerate(self._scans(study, epoch)):
            files = read[index] if index < len(read) else read_scan(scan, self.storage)
            decoded = decode_scan(files, study.modality, data.nifti_4d)
            self._reject(decoded.rejections, study.study_id)
            for volume in decoded.volumes:
                if len(volumes) < self.limit:
                    volumes.append(preprocess_volume(
                        volume, tuple(data.grid), [tuple(w) for w in data.windows],
                        tuple(data.mri_percentiles), data.reorient_to_ras, data.crop_foreground,
                    ))
            if len(volumes) >= self.limit:
                break
        if not volumes:
            self._reject([Rejection(study.study_id, "no_usable_scan", "every scan was rejected")], study.study_id)
            return []
        pixels = np.stack(volumes)
        return [{
            "study_id": study.study_id,
            "report": study.report,
            "modality": study.modality,
            "split": study.split,
            "labels": json.dumps(study.labels, sort_keys=True),
            "pixels": pixels.tobytes(),
            "shape": list(pixels.shape),
            "epoch": epoch,
        }]

    def __call__(self, row: dict[str, Any], epoch: int = 0) -> list[dict[str, Any]]:
        return self.build(row, epoch, self.read(row, epoch))


class ReadAhead:
    """Ray Data block function: a block of items -> their study records, by a *source*.

    A source reads an item's stored files (``read(item, epoch)``, storage I/O only) and builds its
    records from them (``build(item, epoch, read)``: decode, preprocess); ``source(item, epoch)``
    does both in turn. Here the next item is read in a thread while the current one builds, so of
    a task's reads only the first is waited for.
    """

    def __init__(self, source, epoch: int = 0) -> None:
        self.source = source
        self.epoch = epoch

    def __call__(self, block: pa.Table) -> Iterator[pa.Table]:
        items = block.to_pylist()
        if not items:
            return
        with ThreadPoolExecutor(1, thread_name_prefix="read-ahead") as reader:
            pending = reader.submit(self.source.read, items[0], self.epoch)
            for index, item in enumerate(items):
                read = pending.result()
                if index + 1 < len(items):
                    pending = reader.submit(self.source.read, items[index + 1], self.epoch)
                records = self.source.build(item, self.epoch, read)
                if records:
                    yield pa.Table.from_pylist(records)


class ShardStudies:
    """Shard-cache source: shard index row (``shards.py``) -> the stored study record.

    Each study is one Parquet row group, read with one ranged request; open files are kept per
    worker process.
    """

    drops_studies = False  # bad scans were left out when the shards were written

    def __init__(self, shards_dir: str, storage: Storage) -> None:
        self.shards_dir = shards_dir
        self.storage = storage

    def read(self, item: dict[str, Any], epoch: int = 0) -> dict[str, Any]:
        from hlip_ray.data.shards import read_study

        return read_study(self.shards_dir, item["file"], item["row_group"], self.storage)

    def build(self, item: dict[str, Any], epoch: int, read: dict[str, Any]) -> list[dict[str, Any]]:
        return [{**read, "epoch": epoch}]

    def __call__(self, item: dict[str, Any], epoch: int = 0) -> list[dict[str, Any]]:
        return self.build(item, epoch, self.read(item, epoch))


class DataOrder:
    """Which study sits at each global position: epoch ``e`` is a permutation drawn from (seed, e).

    ``position = epoch * num_studies + offset``; the study is ``permutation(seed, epoch)[offset]``.
    """

    def __init__(self, num_studies: int, seed: int) -> None:
        if num_studies <= 0:
            raise ValueError("the training split has no studies")
        self.num_studies = num_studies
        self.seed = seed
        self._epoch, self._permutation = -1, np.empty(0, dtype=np.int64)

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch = epoch
            self._permutation = np.random.default_rng([self.seed, epoch, 0x0D17A]).permutation(self.num_studies)
        return self._permutation

    def locate(self, position: int) -> tuple[int, int]:
        """``(epoch, index of the study in the item list)`` at a global position."""
        epoch, offset = divmod(int(position), self.num_studies)
        return epoch, int(self.permutation(epoch)[offset])


class StudiesAtPositions:
    """``{"id": k}`` -> the study record at position ``start + k`` of the data order, tagged with it."""

    def __init__(self, items: list[dict[str, Any]], source, seed: int, start: int) -> None:
        self.items = items
        self.source = source
        self.order = DataOrder(len(items), seed)
        self.start = start

    def read(self, row: dict[str, Any], epoch: int = 0) -> tuple[int, int, int, Any]:
        """The row's position, the epoch and item it falls on, and the source's read of that study
        (the epoch is the position's, not the argument)."""
        position = self.start + int(row["id"])
        epoch, index = self.order.locate(position)
        return position, epoch, index, self.source.read(self.items[index], epoch)

    def build(self, row: dict[str, Any], epoch: int, read: tuple[int, int, int, Any]) -> list[dict[str, Any]]:
        position, epoch, index, files = read
        return [{**record, "position": position} for record in self.source.build(self.items[index], epoch, files)]


# -- stage 2: choose K scans ---------------------------------------------------------------
class ScanSampler:
    """Study record -> fixed-K example: ``pixels [K, C, D, H, W]`` uint8 padded, ``scan_mask [K]``.

    Training: a random subset of K stored scans (no repeats) per (seed, epoch, study), the
    epoch read from the record; evaluation: the first K.
    """

    def __init__(self, scans: int, train: bool, seed: int = 0) -> None:
        self.scans = scans
        self.train = train
        self.seed = seed

    def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
        shape = [int(s) for s in record["shape"]]
        volumes = np.frombuffer(record["pixels"], dtype=np.uint8).reshape(shape)
        count = min(shape[0], self.scans)
        if self.train:
            rng = study_rng(self.seed, int(record.get("epoch", 0)), record["study_id"])
            chosen = np.sort(rng.permutation(shape[0])[:count])
        else:
            chosen = np.arange(count)
        pixels = np.zeros((self.scans, *shape[1:]), dtype=np.uint8)
        pixels[:count] = volumes[chosen]
        scan_mask = np.zeros(self.scans, dtype=bool)
        scan_mask[:count] = True
        example = {"study_id": record["study_id"], "report": record["report"], "labels": record["labels"],
                   "epoch": int(record.get("epoch", 0)), "pixels": pixels, "scan_mask": scan_mask}
        if "position" in record:
            example["position"] = int(record["position"])
        return example


# -- stage 3: tokenize reports -------------------------------------------------------------
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@functools.cache
def worker_tokenizer(name_or_path: str):
    """The tokenizer of ``name_or_path``, loaded once per worker process (Ray reuses task workers)."""
    from hlip_ray.model.tokenizer import load_tokenizer

    return load_tokenizer(name_or_path)


class ReportTokenizer:
    """Batch of examples -> adds ``input_ids`` / ``attention_mask [B, L]``; drops the report text.

    Sentences are shuffled per (seed, epoch, study) when ``shuffle_sentences`` (HLIP does). It
    pickles as its settings; the tokenizer comes from ``worker_tokenizer`` where it runs.
    """

    def __init__(self, name_or_path: str, context_length: int, shuffle_sentences: bool, seed: int = 0) -> None:
        self.name_or_path = name_or_path
        self.context_length = context_length
        self.shuffle_sentences = shuffle_sentences
        self.seed = seed

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = []
        for study_id, report, epoch in zip(batch["study_id"], batch["report"], batch["epoch"]):
            sentences = [s for s in _SENTENCE_END.split(str(report).strip()) if s]
            if self.shuffle_sentences and len(sentences) > 1:
                order = study_rng(self.seed, int(epoch), str(study_id)).permutation(len(sentences))
                sentences = [sentences[i] for i in order]
            texts.append(" ".join(sentences))
        tokens = worker_tokenizer(self.name_or_path)(texts, padding="max_length", truncation=True,
                                                     max_length=self.context_length, return_tensors="np")
        out = {key: value for key, value in batch.items() if key != "report"}
        out["input_ids"] = tokens["input_ids"].astype(np.int64)
        out["attention_mask"] = tokens["attention_mask"].astype(np.int64)
        return out


# -- datasets ------------------------------------------------------------------------------
def _placement(config: Config) -> dict[str, Any]:
    """Ray resources that keep data work on CPU nodes (``resources.data``), never on GPUs."""
    resources = {config.resources.data: 1} if config.resources.data else None
    return {"num_cpus": 1, "num_gpus": 0, **({"resources": resources} if resources else {})}


def _per_study(config: Config) -> dict[str, Any]:
    """Ray Data arguments of a per-study step: up to ``data.decode_concurrency`` tasks at a time on
    CPU nodes. Every step of a stream gets the same ones, so Ray Data fuses them into one task."""
    return {"compute": ray.data.TaskPoolStrategy(size=config.data.decode_concurrency), **_placement(config)}


def _read_studies(items, source, config: Config, epoch: int = 0):
    """A dataset of items -> the study records a source gives them, reading ahead in each task."""
    return items.map_batches(ReadAhead(source, epoch), batch_size=None, batch_format="pyarrow",
                             **_per_study(config))


def study_records(rows: list[StudyRow], config: Config, storage: Storage, quarantine, *,
                  train: bool, epoch: int = 0):
    """Ray Dataset of study records decoded from raw files, in manifest order (streamed).

    Training keeps ``data.scans_per_study`` scans per study, tried in random order;
    evaluation and the shard cache keep up to ``data.max_eval_scans`` in manifest order.
    """
    loader = raw_source(config, storage, quarantine, train=train)
    # Small blocks of manifest rows: each decode task takes ``STUDIES_PER_TASK``, so the work spreads
    # evenly over the workers however uneven the studies are (1 to many scans).
    manifest = ray.data.from_items([row.to_item() for row in rows], override_num_blocks=_decode_blocks(len(rows)))
    return _read_studies(manifest, loader, config, epoch)


def training_examples(records, config: Config, *, train: bool, batch_size: int | None = 8):
    """Study records -> tokenized fixed-K examples (the training batch contract).

    Ray Data fuses decoding, scan sampling and tokenizing into one task per block, up to
    ``data.decode_concurrency`` at a time; each task worker loads the tokenizer once
    (``worker_tokenizer``). Tasks, not an actor pool: run in Ray Data's actors the same fused
    steps on raw DICOM from S3 gave 2.3-2.5 studies/s against 4.0-4.3 as tasks (64 studies,
    2 CPUs, moto; ``benchmarks/bench_data.py``'s corpus).
    """
    scans = config.data.scans_per_study if train else config.data.max_eval_scans
    examples = records.map(ScanSampler(scans, train, config.train.seed), **_per_study(config))
    text = config.model.text
    tokenizer = ReportTokenizer(text.name_or_path, text.context_length,
                                config.data.shuffle_sentences and train, config.train.seed)
    return examples.map_batches(tokenizer, batch_size=batch_size, **_per_study(config))


def study_dataset(rows: list[StudyRow], config: Config, storage: Storage, quarantine, *,
                  train: bool, epoch: int = 0):
    """Manifest rows -> Ray Dataset of training examples, decoding raw files on CPU workers."""
    records = study_records(rows, config, storage, quarantine, train=train, epoch=epoch)
    return training_examples(records, config, train=train)


def raw_source(config: Config, storage: Storage, quarantine, *, train: bool) -> StudyLoader:
    """The raw-file source of a config: ``data.scans_per_study`` scans (training) or ``data.max_eval_scans``."""
    limit = config.data.scans_per_study if train else config.data.max_eval_scans
    return StudyLoader(config.model_dump(mode="json"), storage, quarantine, limit=limit, shuffle=train,
                       seed=config.train.seed)


def study_items(config: Config, storage: Storage, quarantine, split: str, *, train: bool):
    """``(items, source)`` of one split: shard index rows when ``data.shards`` is set, else manifest rows.

    Either way ``source(item, epoch)`` gives the item's study record. Items come in study ID order,
    the order the data order permutes: the shard index lists studies in the order the shard files
    happened to be written (it differs between two preprocessings of the same manifest).
    """
    if config.data.shards:
        from hlip_ray.data.shards import read_index

        items = [item for item in read_index(config.data.shards, storage) if item["split"] == split]
        source = ShardStudies(config.data.shards, storage)
    elif config.data.manifest:
        from hlip_ray.data.manifest import read_manifest

        items = [row.to_item() for row in read_manifest(config.data.manifest, storage) if row.split == split]
        source = raw_source(config, storage, quarantine, train=train)
    else:
        raise ValueError("data.manifest or data.shards must be set to read studies")
    return sorted(items, key=lambda item: item["study_id"]), source


def training_stream(items: list[dict], source, config: Config, *, start: int, stop: int):
    """Training examples at global positions ``[start, stop)`` of the data order, in order
    (``stop`` rounded up to fill the last chunk).

    Blocks hold exactly ``train.chunk_size`` examples, so Ray Train's equal split hands them to
    the workers in turn and every global step takes positions ``[s * G, (s + 1) * G)`` (G the
    global batch), however many workers there are. Needs ``preserve_order`` in the ingest options.
    The positions come in blocks of ``chunk_size``, and a source that never drops a study (the
    shard cache) keeps them so; after one that may (raw files with bad scans), the examples are
    re-blocked.
    """
    count = stop - start
    if count <= 0:
        raise ValueError(f"no positions to stream: start {start}, stop {stop}")
    chunk = config.train.chunk_size
    chunks = -(-count // chunk)
    positions = ray.data.from_items([{"id": k} for k in range(chunks * chunk)],
                                    override_num_blocks=min(chunks, MAX_BLOCKS))
    records = _read_studies(positions, StudiesAtPositions(items, source, config.train.seed, start), config)
    examples = training_examples(records, config, train=True, batch_size=None)
    if getattr(source, "drops_studies", True) or chunks > MAX_BLOCKS:   # blocks not exactly one chunk
        examples = examples.repartition(target_num_rows_per_block=chunk, strict=True)
    # A block is never split for size: 4 examples of a full-size study are over Ray's 128 MiB default.
    examples.context.target_max_block_size = None
    examples.context.execution_options.preserve_order = True
    return examples


def evaluation_stream(items: list[dict], source, config: Config):
    """Evaluation examples of ``items``, in order: up to ``data.max_eval_scans`` scans, no randomness."""
    listed = ray.data.from_items(items, override_num_blocks=_decode_blocks(len(items)))
    records = _read_studies(listed, source, config)
    examples = training_examples(records, config, train=False, batch_size=None)
    examples.context.execution_options.preserve_order = True
    return examples


class StudyBatchCollate(NumpyBatchCollateFn):
    """``iter_torch_batches`` collate_fn: tensors for arrays, lists for ``study_id`` / ``labels``."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        out: dict[str, Any] = {}
        for key, value in batch.items():
            if key == "study_id":
                out[key] = [str(v) for v in value]
            elif key == "labels":
                out[key] = [json.loads(v) for v in value]
            else:
                out[key] = torch.from_numpy(np.array(value, copy=True))
        return out


collate_study_batch = StudyBatchCollate()
