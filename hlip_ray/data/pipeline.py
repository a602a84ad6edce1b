"""Studies to training batches on Ray Data, decoded and preprocessed on CPU workers.

::

    manifest rows ──flat_map(StudyLoader)──> study records ──map(ScanSampler)──>
        ──map_batches(ReportTokenizer)──> batches for get_dataset_shard(...).iter_torch_batches

``StudyLoader`` reads a study's scans from storage, decodes them (pydicom / nibabel) and
preprocesses them to uint8 volumes; a bad scan is skipped and recorded in the run's
``QuarantineLog``, a study with nothing usable is dropped. Its output, a *study record*, is
also the row format of the shard cache (``shards.py``), so training can start from either.

Study record: ``study_id``, ``report``, ``modality``, ``split``, ``labels`` (JSON text),
``pixels`` (bytes of uint8 ``[n, C, D, H, W]``), ``shape`` (``[n, C, D, H, W]``).

Training example (one study; batches stack them): ``pixels [K, C, D, H, W]`` uint8,
``scan_mask [K]`` bool, ``input_ids`` / ``attention_mask [L]`` int64, ``study_id``, ``labels``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
from typing import Any

import numpy as np
import ray
from ray.data.collate_fn import NumpyBatchCollateFn

from hlip_ray.config import Config
from hlip_ray.data.manifest import ScanRef, StudyRow
from hlip_ray.data.records import Decoded, Rejection
from hlip_ray.data.storage import Storage

logger = logging.getLogger(__name__)

QUARANTINE_FILE = "quarantine.jsonl"
MAX_BLOCKS = 4096  # manifest blocks fed to the decode tasks


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
def load_scan(scan: ScanRef, modality: str, storage: Storage, nifti_4d: str) -> Decoded:
    """Read and decode one manifest scan; a missing object comes back as a rejection."""
    from hlip_ray.data.decode import decode_dicom_files, decode_nifti

    try:
        if scan.format == "nifti":
            return decode_nifti(scan.uri, storage.read_bytes(scan.uri), four_d=nifti_4d, modality=modality)
        uris = storage.list_files(scan.uri)
        if not uris:
            raise FileNotFoundError(scan.uri)
        return decode_dicom_files([(uri, storage.read_bytes(uri)) for uri in uris], scan.uri)
    except FileNotFoundError:
        return Decoded(rejections=[Rejection(scan.uri, "missing_object", "no such file or prefix")])


class StudyLoader:
    """Manifest row -> zero or one study record (a Ray Data ``flat_map`` callable).

    ``limit``: scans kept per study. With ``shuffle`` (training from raw files) the scans are
    tried in a random order per (seed, epoch, study) until ``limit`` decode; otherwise in
    manifest order.
    """

    def __init__(self, config: dict, storage: Storage, quarantine, limit: int, shuffle: bool,
                 seed: int = 0, epoch: int = 0) -> None:
        self.config = Config.model_validate(config)
        self.storage = storage
        self.quarantine = quarantine
        self.limit = limit
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = epoch

    def _reject(self, rejections: list[Rejection], study_id: str) -> None:
        if not rejections:
            return
        records = [{"uri": r.uri, "study_id": study_id, "reason": r.reason, "detail": r.detail} for r in rejections]
        for record in records:
            logger.warning("skipped %s (study %s): %s", record["uri"], study_id, record["reason"])
        if self.quarantine is not None:
            ray.get(self.quarantine.record.remote(records))

    def __call__(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        from hlip_ray.data.preprocess import preprocess_volume

        study = StudyRow.from_dict(row, f"study {row.get('study_id')}")
        if not study.report.strip():
            self._reject([Rejection(study.study_id, "empty_report", "the study has no report text")], study.study_id)
            return []
        data = self.config.data
        scans = list(study.scans)
        if self.shuffle:
            scans = [scans[i] for i in study_rng(self.seed, self.epoch, study.study_id).permutation(len(scans))]
        volumes = []
        for scan in scans:
            decoded = load_scan(scan, study.modality, self.storage, data.nifti_4d)
            self._reject(decoded.rejections, study.study_id)
            for volume in decoded.volumes:
                if len(volumes) < self.limit:
                    volumes.append(preprocess_volume(
                        volume, tuple(data.grid), [tuple(w) for w in data.windows],
                        tuple(data.mri_percentiles), data.reorient_to_ras,
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
        }]


# -- stage 2: choose K scans ---------------------------------------------------------------
class ScanSampler:
    """Study record -> fixed-K example: ``pixels [K, C, D, H, W]`` uint8 padded, ``scan_mask [K]``.

    Training: a random subset of K stored scans (no repeats) per (seed, epoch, study);
    evaluation: the first K.
    """

    def __init__(self, scans: int, train: bool, seed: int = 0, epoch: int = 0) -> None:
        self.scans = scans
        self.train = train
        self.seed = seed
        self.epoch = epoch

    def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
        shape = [int(s) for s in record["shape"]]
        volumes = np.frombuffer(record["pixels"], dtype=np.uint8).reshape(shape)
        count = min(shape[0], self.scans)
        if self.train:
            chosen = np.sort(study_rng(self.seed, self.epoch, record["study_id"]).permutation(shape[0])[:count])
        else:
            chosen = np.arange(count)
        pixels = np.zeros((self.scans, *shape[1:]), dtype=np.uint8)
        pixels[:count] = volumes[chosen]
        scan_mask = np.zeros(self.scans, dtype=bool)
        scan_mask[:count] = True
        return {"study_id": record["study_id"], "report": record["report"], "labels": record["labels"],
                "pixels": pixels, "scan_mask": scan_mask}


# -- stage 3: tokenize reports -------------------------------------------------------------
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@functools.lru_cache(maxsize=4)
def _tokenizer(name_or_path: str):
    """One tokenizer per worker process and name (Ray reuses worker processes across tasks)."""
    from hlip_ray.model.text import load_tokenizer

    return load_tokenizer(name_or_path)


class ReportTokenizer:
    """Batch of examples -> adds ``input_ids`` / ``attention_mask [B, L]``; drops the report text.

    Sentences are shuffled per (seed, epoch, study) when ``shuffle_sentences`` (HLIP does).
    """

    def __init__(self, name_or_path: str, context_length: int, shuffle_sentences: bool,
                 seed: int = 0, epoch: int = 0) -> None:
        self.name_or_path = name_or_path
        self.context_length = context_length
        self.shuffle_sentences = shuffle_sentences
        self.seed = seed
        self.epoch = epoch

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = []
        for study_id, report in zip(batch["study_id"], batch["report"]):
            sentences = [s for s in _SENTENCE_END.split(str(report).strip()) if s]
            if self.shuffle_sentences and len(sentences) > 1:
                order = study_rng(self.seed, self.epoch, str(study_id)).permutation(len(sentences))
                sentences = [sentences[i] for i in order]
            texts.append(" ".join(sentences))
        tokens = _tokenizer(self.name_or_path)(texts, padding="max_length", truncation=True,
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


def study_records(rows: list[StudyRow], config: Config, storage: Storage, quarantine, *,
                  train: bool, epoch: int = 0):
    """Ray Dataset of study records decoded from raw files (streamed, never materialised).

    Training keeps ``data.scans_per_study`` scans per study, tried in random order;
    evaluation and the shard cache keep up to ``data.max_eval_scans`` in manifest order.
    """
    limit = config.data.scans_per_study if train else config.data.max_eval_scans
    loader = StudyLoader(config.model_dump(mode="json"), storage, quarantine, limit=limit, shuffle=train,
                         seed=config.train.seed, epoch=epoch)
    # Small blocks of manifest rows: each decode task takes a few studies, so the work spreads
    # evenly over the workers however uneven the studies are (1 to many scans).
    manifest = ray.data.from_items([row.to_dict() for row in rows], override_num_blocks=min(len(rows), MAX_BLOCKS))
    return manifest.flat_map(loader, concurrency=config.data.decode_concurrency, **_placement(config))


def training_examples(records, config: Config, *, train: bool, epoch: int = 0, batch_size: int = 8):
    """Study records -> tokenized fixed-K examples (the training batch contract)."""
    scans = config.data.scans_per_study if train else config.data.max_eval_scans
    placement = _placement(config)
    examples = records.map(ScanSampler(scans, train, config.train.seed, epoch), **placement)
    text = config.model.text
    tokenizer = ReportTokenizer(text.name_or_path, text.context_length,
                                shuffle_sentences=config.data.shuffle_sentences and train,
                                seed=config.train.seed, epoch=epoch)
    return examples.map_batches(tokenizer, batch_size=batch_size, **placement)


def study_dataset(rows: list[StudyRow], config: Config, storage: Storage, quarantine, *,
                  train: bool, epoch: int = 0):
    """Manifest rows -> Ray Dataset of training examples, decoding raw files on CPU workers."""
    records = study_records(rows, config, storage, quarantine, train=train, epoch=epoch)
    return training_examples(records, config, train=train, epoch=epoch)


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
