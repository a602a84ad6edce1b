"""Study sources: where a stream's studies come from.

A source turns one *item* into zero or one study record, in two halves: ``read`` (storage I/O
only) and ``build`` (decode, preprocess). ``ReadAhead`` runs them over a block of items, reading
the next item while the current one builds. Two sources:

- ``RawStudies``: a manifest row -> its scans read from storage, decoded (pydicom / nibabel) and
  preprocessed to uint8 volumes; bad scans are skipped into the run's quarantine, as are (told apart
  by their reasons, ``records.NOTE_REASONS``) the files left out of scans that were kept, and a study
  with nothing usable gives no record.
- ``ShardStudies``: a shard index row -> the study record stored in the shard cache (``shards.py``).

Study record: ``study_id``, ``report``, ``modality``, ``split``, ``labels`` (JSON text), ``pixels``
(bytes of uint8 ``[n, C, D, H, W]``), ``shape`` (``[n, C, D, H, W]``), ``epoch``, and from raw files
``source`` (``study_source``: where its files are, which tells apart two studies of one id).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from hlip_ray.config import Config, ConfigError
from hlip_ray.data.manifest import ScanRef, StudyRow, is_scan_member, read_manifest
from hlip_ray.data.order import study_rng
from hlip_ray.data.quarantine import quarantine
from hlip_ray.data.records import Decoded, Note, Rejection
from hlip_ray.data.shards import read_index, read_study
from hlip_ray.storage import Storage


class StudySource(Protocol):
    """One item -> zero or one study record, read then built (module docstring)."""

    # Whether ``build`` may give no record for an item (then a stream cannot count on one per item).
    drops_studies: bool

    def read(self, item: dict[str, Any], epoch: int) -> Any:
        """The item's stored bytes (storage I/O only), for ``build``."""

    def build(self, item: dict[str, Any], epoch: int, read: Any) -> list[dict[str, Any]]:
        """The item's study records (zero or one) from what ``read`` gave."""


class ReadAhead:
    """Ray Data block function: a block of items -> their study records, by a ``StudySource``.

    The next item is read in a thread while the current one builds, so of a task's reads only
    the first is waited for.
    """

    def __init__(self, source: StudySource, epoch: int = 0) -> None:
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


# -- raw files -----------------------------------------------------------------------------
def study_source(study: StudyRow) -> str:
    """Where a study's files are: the deepest folder or key prefix holding every scan of it (a one-scan
    study's scan itself). Two studies of one id from two sites (``site1/ST001``, ``site2/ST001``) differ here."""
    common = os.path.commonprefix([scan.uri.rstrip("/") + "/" for scan in study.scans])
    return common[: common.rfind("/")] or "/"


@dataclass
class ScanFiles:
    """The stored bytes of one manifest scan: ``files`` ``(uri, bytes)``; None when it could not be read,
    ``error`` then saying why (``missing_object`` or ``unreadable``, and the error's kind). ``heads``: the
    files of ``files`` read as their head only, with their size (``decode.decode_dicom_files``)."""

    scan: ScanRef
    files: list[tuple[str, bytes]] | None
    error: tuple[str, str] | None = None
    heads: dict[str, int] = field(default_factory=dict)


def read_scan(scan: ScanRef, storage: Storage) -> ScanFiles:
    """Read one manifest scan's files: a NIfTI object, or every object under a DICOM prefix but NIfTI files
    and a study's own files (``manifest.is_scan_member``: a DICOM scan may be its study's folder).

    A DICOM file up to ``decode.HEADER_BYTES`` (a slice, the common case) is read whole in one request. A
    larger one is read as its head first, and whole only when it is DICOM and no larger than
    ``decode.MAX_DICOM_FILE_BYTES`` (``decode.needs_whole_file``); else its head is all that is kept
    (``heads``), so that a huge stray file (a 2 GiB sparse ``x.dcm``) costs what its head does."""
    from hlip_ray.data.decode import HEADER_BYTES, needs_whole_file

    try:
        if scan.format == "nifti":
            return ScanFiles(scan, [(scan.uri, storage.read_bytes(scan.uri))])
        prefix = scan.uri.rstrip("/")
        sizes = {uri: size for uri, size in sorted(storage.file_sizes(scan.uri).items())
                 if is_scan_member(uri[len(prefix) + 1 :])}
        if not sizes:
            raise FileNotFoundError(scan.uri)
        whole = [uri for uri, size in sizes.items() if size <= HEADER_BYTES]
        heads: dict[str, bytes] = {}  # the large files not read whole
        for uri, size in sizes.items():
            if size > HEADER_BYTES:
                head = storage.read_head(uri, HEADER_BYTES)
                if needs_whole_file(head, size):
                    whole.append(uri)
                else:
                    heads[uri] = head
        data = {**heads, **dict(zip(whole, storage.read_many(whole)))}
        return ScanFiles(scan, [(uri, data[uri]) for uri in sizes], heads={uri: sizes[uri] for uri in heads})
    except FileNotFoundError:
        return ScanFiles(scan, None, ("missing_object", "no such file or prefix"))
    except OSError as error:   # permission, a link loop, an S3 failure after the retries: this scan only
        kind = type(error.__cause__ or error).__name__
        code = getattr(error.__cause__ or error, "response", {}).get("Error", {}).get("Code") or (
            os.strerror(error.errno) if error.errno else "")
        return ScanFiles(scan, None, ("unreadable", f"{kind}{': ' + code if code else ''}"))


def decode_scan(read: ScanFiles, modality: str, nifti_4d: str, min_slices: int) -> Decoded:
    """Decode one read scan; a missing object comes back as a rejection. ``min_slices``: the fewest slices
    a DICOM volume may have (``data.min_slices``)."""
    from hlip_ray.data.decode import decode_dicom_files, decode_nifti

    scan = read.scan
    if read.files is None:
        reason, detail = read.error or ("missing_object", "no such file or prefix")
        return Decoded(rejections=[Rejection(scan.uri, reason, detail)])
    if scan.format == "nifti":
        return decode_nifti(scan.uri, read.files[0][1], four_d=nifti_4d, modality=modality)
    return decode_dicom_files(read.files, scan.uri, min_slices=min_slices, heads=read.heads)


class RawStudies:
    """Raw-file source: manifest row -> zero or one study record (decoded on the calling worker).

    ``limit``: scans kept per study. With ``shuffle`` (training from raw files) the scans are
    tried in a random order per (seed, epoch, study) until ``limit`` decode; otherwise in
    manifest order. Rejections, and the notes of files left out of kept scans, go to the ``quarantine``
    log (a ``QuarantineLog`` actor or None). A study without report text is refused (``empty_report``)
    unless ``needs_report`` is off (image embeddings need no text).
    """

    drops_studies = True  # a study whose scans are all bad gives no record

    def __init__(self, config: dict, storage: Storage, quarantine_log, limit: int, shuffle: bool,
                 seed: int = 0, needs_report: bool = True) -> None:
        self.config = Config.model_validate(config)
        self.storage = storage
        self.quarantine_log = quarantine_log
        self.limit = limit
        self.shuffle = shuffle
        self.seed = seed
        self.needs_report = needs_report

    @classmethod
    def of_config(cls, config: Config, storage: Storage, quarantine_log, *, train: bool,
                  needs_report: bool = True) -> RawStudies:
        """``data.scans_per_study`` scans in random order (training) or ``data.max_eval_scans`` in order."""
        limit = config.data.scans_per_study if train else config.data.max_eval_scans
        return cls(config.model_dump(mode="json"), storage, quarantine_log, limit=limit, shuffle=train,
                   seed=config.train.seed, needs_report=needs_report)

    def _scans(self, study: StudyRow, epoch: int) -> list[ScanRef]:
        """The study's scans in the order they are tried."""
        scans = list(study.scans)
        if self.shuffle:
            scans = [scans[i] for i in study_rng(self.seed, epoch, study.study_id).permutation(len(scans))]
        return scans

    def read(self, item: dict[str, Any], epoch: int = 0) -> list[ScanFiles]:
        """The files of the first ``limit`` scans tried (``build`` reads more only where some of these
        are rejected)."""
        study = StudyRow.from_dict(item, f"study {item.get('study_id')}")
        if self.needs_report and not study.report.strip():
            return []
        return [read_scan(scan, self.storage) for scan in self._scans(study, epoch)[:self.limit]]

    def build(self, item: dict[str, Any], epoch: int, read: list[ScanFiles]) -> list[dict[str, Any]]:
        from hlip_ray.data.volume import preprocess_volume, recipe

        study = StudyRow.from_dict(item, f"study {item.get('study_id')}")
        if self.needs_report and not study.report.strip():
            self._reject([Rejection(study.study_id, "empty_report", "the study has no report text")], study.study_id)
            return []
        data = self.config.data
        volumes = []
        for index, scan in enumerate(self._scans(study, epoch)):
            files = read[index] if index < len(read) else read_scan(scan, self.storage)
            decoded = decode_scan(files, study.modality, data.nifti_4d, data.min_slices)
            self._reject([*decoded.rejections, *decoded.notes], study.study_id)
            for volume in decoded.volumes:
                if len(volumes) < self.limit:
                    volumes.append(preprocess_volume(volume, tuple(data.grid), **recipe(data)))
            if len(volumes) >= self.limit:
                break
        if not volumes:
            self._reject([Rejection(study.study_id, "no_usable_scan", "every scan was rejected")], study.study_id)
            return []
        pixels = np.stack(volumes)
        return [{
            "study_id": study.study_id,
            "source": study_source(study),
            "report": study.report,
            "modality": study.modality,
            "split": study.split,
            "labels": json.dumps(study.labels, sort_keys=True),
            "pixels": pixels.tobytes(),
            "shape": list(pixels.shape),
            "epoch": epoch,
        }]

    def _reject(self, records: list[Rejection | Note], study_id: str) -> None:
        quarantine(self.quarantine_log, records, study_id)


# -- shard cache ---------------------------------------------------------------------------
class ShardStudies:
    """Shard-cache source: shard index row -> the stored study record.

    Each study is one Parquet row group, read with one ranged request; open files are kept per
    worker process.
    """

    drops_studies = False  # bad scans were left out when the shards were written

    def __init__(self, shards_dir: str, storage: Storage) -> None:
        self.shards_dir = shards_dir
        self.storage = storage

    def read(self, item: dict[str, Any], epoch: int = 0) -> dict[str, Any]:
        return read_study(self.shards_dir, item["file"], item["row_group"], self.storage)

    def build(self, item: dict[str, Any], epoch: int, read: dict[str, Any]) -> list[dict[str, Any]]:
        return [{**read, "epoch": epoch}]


def study_items(config: Config, storage: Storage, quarantine_log, split: str, *,
                train: bool) -> tuple[list[dict[str, Any]], StudySource]:
    """``(items, source)`` of one split: shard index rows when ``data.shards`` is set, else manifest rows.

    Items come in study ID order, the order the data order permutes: the shard index lists studies
    in the order the shard files happened to be written (it differs between two preprocessings of
    the same manifest).
    """
    if config.data.shards:
        items = [item for item in read_index(config.data.shards, storage) if item["split"] == split]
        source: StudySource = ShardStudies(config.data.shards, storage)
    elif config.data.manifest:
        items = [row.to_item() for row in read_manifest(config.data.manifest, storage) if row.split == split]
        source = RawStudies.of_config(config, storage, quarantine_log, train=train)
    else:
        raise ValueError("data.manifest or data.shards must be set to read studies")
    return sorted(items, key=lambda item: item["study_id"]), source


def check_studies(config: Config, storage: Storage, split: str) -> int:
    """Before any work (no Ray needed): the studies ``config`` names (``data.shards``, else ``data.manifest``)
    can be listed, and ``split`` has some; returns how many it has. An empty or broken manifest, a missing
    shard index or an empty split fails here, naming the file."""
    if config.data.shards:
        source = config.data.shards
        splits = [item["split"] for item in read_index(source, storage)]
    elif config.data.manifest:
        source = config.data.manifest
        splits = [row.split for row in read_manifest(source, storage)]
    else:
        raise ConfigError("data.manifest or data.shards must be set to read studies")
    count = splits.count(split)
    if not count:
        found = {name: splits.count(name) for name in sorted(set(splits))}
        raise ConfigError(f"{source}: no study has split {split!r} (its splits: {found})")
    return count
