"""``hlip-ray embed``: every study of a manifest (all splits) through a trained model's study encoder,
into Parquet files of embeddings.

::

    manifest rows ──map_batches(ReadAhead(RawStudies))──> study records      (CPU tasks, ``resources.data``)
        ──map_batches(StudyEmbedder, actor pool)──> study_id, embedding       (``embed.concurrency`` actors,
                                                                               placed as trainers: ``placement.py``)
        ──> this process: OUT/embeddings/part-<run>-<n>.parquet, written as the embeddings come

Studies are decoded from their raw files at the test-time size (``eval.grid``, else ``data.grid``) by
the data plane's own decode stage (a study without a report is embedded too: an image embedding needs no
text); each actor loads the model once and encodes batches of
``embed.batch_size`` studies. An actor asks for what a training worker does (one CPU, ``resources.trainer``)
and, where ``eval.device`` resolves to CUDA, ``embed.num_gpus`` of a GPU (one where that is 0). A part
file's rows: ``study_id``, ``embedding`` (list<float32>, the L2-normalised ``[P]`` of ``encode_study``),
``model_id`` (``<run>/step-<n>`` of a run checkpoint, the file name of an HLIP model file) and
``checkpoint_sha256`` (of the model weights' bytes).

Parts are written whole, one every ``PART_STUDIES`` studies or ``PART_SECONDS`` seconds, so an
interrupted run keeps what it wrote. A rerun into the same OUT reads the study IDs written there and
decodes only the others; embeddings of another checkpoint there are refused before any decoding. Studies
that cannot be read go to OUT/quarantine.jsonl with their reason, as in ``hlip-ray preprocess``; the
run's summary goes to OUT/embed.json.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
import uuid
from collections import defaultdict
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hlip_ray.config import Config, ConfigError
from hlip_ray.data.manifest import read_manifest
from hlip_ray.data.quarantine import QUARANTINE_FILE, create_quarantine_log, run_records
from hlip_ray.inference.trained_model import inference_config
from hlip_ray.progress import Progress
from hlip_ray.run_checkpoint import model_weights, read_state
from hlip_ray.storage import Storage, join

logger = logging.getLogger(__name__)

EMBEDDINGS_DIR = "embeddings"
SUMMARY_FILE = "embed.json"
PART_STUDIES = 1000     # studies per part file at most (about 2 KiB each at P = 512)
PART_SECONDS = 60.0     # a part is written at least this often while embeddings come
EXAMPLES = 3            # study ids shown per reason in the summary

SCHEMA = pa.schema([("study_id", pa.string()), ("embedding", pa.list_(pa.float32())),
                    ("model_id", pa.string()), ("checkpoint_sha256", pa.string())])


def checkpoint_identity(checkpoint: str, storage: Storage) -> tuple[str, str]:
    """``(model_id, sha256 of the model weights' bytes)`` of a run checkpoint or an HLIP model file."""
    path = PurePosixPath(checkpoint.rstrip("/"))
    weights, from_run = model_weights(checkpoint, storage)
    model_id = f"{path.parent.name}/step-{read_state(checkpoint, storage).step}" if from_run else path.name
    return model_id, hashlib.sha256(storage.read_bytes(weights)).hexdigest()


class StudyEmbedder:
    """Ray Data actor: batches of study records (``sources.py``) -> ``study_id`` and ``embedding [B, P]``
    float32. Loads the model once, on ``device`` (``placement.actor_placement``'s); a study keeps its first
    ``data.max_eval_scans`` scans, as at evaluation."""

    def __init__(self, checkpoint: str, config: dict, storage: Storage, device: str) -> None:
        import torch

        from hlip_ray.data.streams import ScanSampler
        from hlip_ray.inference.trained_model import load_model

        config = Config.model_validate(config)
        model, _ = load_model(checkpoint, storage, config)
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.sampler = ScanSampler(config.data.max_eval_scans, train=False)

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        import torch

        examples = [self.sampler(record) for record in batch.to_pylist()]
        pixels = torch.from_numpy(np.stack([example["pixels"] for example in examples])).to(self.device)
        scan_mask = torch.from_numpy(np.stack([example["scan_mask"] for example in examples])).to(self.device)
        with torch.no_grad():
            embedding = self.model.encode_study(pixels, scan_mask).float().cpu().numpy()
        return {"study_id": np.array([example["study_id"] for example in examples], dtype=object),
                "embedding": embedding}


class PartWriter:
    """Embeddings -> whole Parquet part files under ``OUT/embeddings``, one every ``PART_STUDIES`` studies
    or ``PART_SECONDS`` seconds, and the rest at ``close``."""

    def __init__(self, out: str, storage: Storage, model_id: str, checkpoint_sha256: str) -> None:
        self.folder = join(out, EMBEDDINGS_DIR)
        self.storage = storage
        self.model_id = model_id
        self.checkpoint_sha256 = checkpoint_sha256
        self.run = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self.parts = 0
        self.written = 0
        self.study_ids: list[str] = []
        self.embeddings: list[np.ndarray] = []
        self.since = time.monotonic()

    def add(self, study_ids, embeddings: np.ndarray) -> None:
        self.study_ids += [str(study_id) for study_id in study_ids]
        self.embeddings += list(np.asarray(embeddings, dtype=np.float32))
        if len(self.study_ids) >= PART_STUDIES or time.monotonic() - self.since >= PART_SECONDS:
            self.flush()

    def flush(self) -> None:
        if not self.study_ids:
            return
        count = len(self.study_ids)
        table = pa.table({"study_id": self.study_ids, "embedding": self.embeddings,
                          "model_id": [self.model_id] * count,
                          "checkpoint_sha256": [self.checkpoint_sha256] * count}, schema=SCHEMA)
        sink = io.BytesIO()
        pq.write_table(table, sink)
        self.storage.write_bytes(join(self.folder, f"part-{self.run}-{self.parts:05d}.parquet"), sink.getvalue())
        self.parts += 1
        self.written += count
        self.study_ids, self.embeddings = [], []
        self.since = time.monotonic()

    close = flush


def written_studies(out: str, storage: Storage, checkpoint_sha256: str) -> tuple[set[str], list[str]]:
    """The study IDs embedded in ``out`` already, and the part files that do not read (cut short by an
    interrupted run), which are removed. Embeddings of another checkpoint there are an error."""
    try:
        parts = [uri for uri in storage.list_files(join(out, EMBEDDINGS_DIR)) if uri.endswith(".parquet")]
    except FileNotFoundError:
        parts = []
    done: set[str] = set()
    damaged = []
    for uri in parts:
        try:
            data = storage.read_bytes(uri)
        except FileNotFoundError:   # removed while listed
            continue
        try:
            part = pq.ParquetFile(io.BytesIO(data))
        except pa.ArrowException as error:
            logger.warning("removing %s, left damaged by an interrupted run: %s", uri, error)
            storage.delete(uri)
            damaged.append(uri)
            continue
        columns = ["study_id", "model_id", "checkpoint_sha256"]
        if not set(columns) <= set(part.schema_arrow.names):
            raise ConfigError(f"{uri}: not a part file of hlip-ray embed (no {', '.join(columns)} columns); "
                              f"--out {out} must be a folder of its own")
        table = part.read(columns=columns)
        model_ids, hashes = (table.column(name).to_pylist() for name in ("model_id", "checkpoint_sha256"))
        for model_id, sha256 in zip(model_ids, hashes):
            if sha256 != checkpoint_sha256:
                raise ConfigError(f"--out {out} holds embeddings of another checkpoint ({model_id}, sha256 "
                                  f"{sha256[:12]}... in {uri}; this one's is {checkpoint_sha256[:12]}...): embed "
                                  "into a new folder, or add to this one with the checkpoint it was made with")
        done.update(table.column("study_id").to_pylist())
    return done, damaged


def embed_archive(manifest: str, checkpoint: str, config: Config, storage: Storage, out: str, *,
                  data_root: str | None = None) -> dict:
    """Embed the studies of ``manifest`` not yet in ``out`` with the model of ``checkpoint``; returns the
    summary (also ``out/embed.json``). Ray must be initialised.

    ``config``: the model's config (a run checkpoint's own, with the command's overrides; for an HLIP
    file, the text tower and attention layout) and the ``embed``, ``data`` and ``storage`` settings.
    """
    import ray

    from hlip_ray.data.streams import study_records
    from hlip_ray.eval.placement import announce_wait
    from hlip_ray.inference.trained_model import load_model

    started = time.perf_counter()
    placement = embed_placement(config)
    config = inference_config(config.model_copy(update={"data": config.data.model_copy(update={"manifest": manifest})}))
    rows = read_manifest(manifest, storage, data_root=data_root)
    model_id, checkpoint_sha256 = checkpoint_identity(checkpoint, storage)
    done, damaged = written_studies(out, storage, checkpoint_sha256)
    _check_output(out, storage, model_id, checkpoint_sha256)
    quarantine_log = create_quarantine_log()
    todo = [row for row in rows if row.study_id not in done]
    writer = PartWriter(out, storage, model_id, checkpoint_sha256)
    print(f"embed: {len(rows)} studies in the manifest, {len(rows) - len(todo)} embedded already, "
          f"{len(todo)} to embed with {model_id}", flush=True)
    embedded: set[str] = set()
    if todo:
        load_model(checkpoint, storage, config)   # a checkpoint that does not load fails here, not in an actor
        announce_wait(placement, "embed: the embedding actors")
        records = study_records(todo, config, storage, quarantine_log, train=False, needs_report=False)
        embed = config.embed
        embeddings = records.map_batches(
            StudyEmbedder, batch_size=embed.batch_size, batch_format="pyarrow",
            fn_constructor_kwargs={"checkpoint": checkpoint, "config": config.model_dump(mode="json"),
                                   "storage": storage, "device": placement.device},
            compute=ray.data.ActorPoolStrategy(size=embed.concurrency), **placement.options())
        embeddings.context.enable_progress_bars = False   # one progress of its own instead
        progress = Progress("embed: studies embedded", len(todo), unit="studies")
        for batch in embeddings.iter_batches(batch_size=None, batch_format="numpy"):
            writer.add(batch["study_id"], batch["embedding"])
            embedded.update(str(study_id) for study_id in batch["study_id"])
            progress.update(len(embedded), f"{writer.written} written")
        progress.close()
    writer.close()
    records = run_records(out, storage, quarantine_log, keep=done)
    storage.write_bytes(join(out, QUARANTINE_FILE), "".join(json.dumps(r) + "\n" for r in records).encode())
    quarantine_log.close.remote()
    quarantined = {row.study_id for row in todo} - embedded
    summary = {
        "studies_in_manifest": len(rows),
        "embedded_now": len(embedded),
        "already_written": len(rows) - len(todo),
        "quarantined": len(quarantined),
        "quarantined_by_reason": _by_reason(records, quarantined),
        "damaged_parts_removed": damaged,
        "model_id": model_id,
        "checkpoint_sha256": checkpoint_sha256,
        "grid": list(config.data.grid),
        "embeddings": join(out, EMBEDDINGS_DIR),
        "quarantine": join(out, QUARANTINE_FILE),
        "seconds": round(time.perf_counter() - started, 2),
    }
    storage.write_bytes(join(out, SUMMARY_FILE), json.dumps(summary, indent=2).encode())
    return summary


def embed_placement(config: Config, *, cluster: dict[str, float] | None = None, local: bool | None = None):
    """Where the embedding actors go (``placement.actor_placement``, whose ``cluster`` and ``local`` these are):
    ``embed.num_gpus`` of a GPU each (one where that is 0) when ``eval.device`` resolves to CUDA;
    ``embed.num_gpus`` > 0 says the cluster has GPUs, as ``train.use_gpu`` does."""
    from hlip_ray.eval.placement import actor_placement

    embed = config.embed
    if config.eval.device == "cpu" and embed.num_gpus > 0:
        raise ConfigError(f"eval.device=cpu, but embed.num_gpus={embed.num_gpus:g} asks for GPUs: set one of them "
                          "(eval.device=auto, or embed.num_gpus=0)")
    return actor_placement(config, gpus=embed.num_gpus or 1.0, gpus_asked=embed.num_gpus > 0, cluster=cluster,
                           local=local)


def _check_output(out: str, storage: Storage, model_id: str, checkpoint_sha256: str) -> None:
    """Before any decoding: ``out`` can be written (the run's summary file, marked in progress)."""
    status = {"status": "in progress", "model_id": model_id, "checkpoint_sha256": checkpoint_sha256}
    try:
        storage.write_bytes(join(out, SUMMARY_FILE), json.dumps(status, indent=2).encode())
    except OSError as error:
        raise ConfigError(f"--out {out}: cannot be written ({error})") from None


def _by_reason(records: list[dict], studies: set[str]) -> dict[str, dict[str, Any]]:
    """``{reason: {"studies": n, "examples": [study ids]}}`` over the records of ``studies``, most studies first."""
    found: dict[str, set[str]] = defaultdict(set)
    for record in records:
        if record.get("study_id") in studies:
            found[record["reason"]].add(record["study_id"])
    return {reason: {"studies": len(ids), "examples": sorted(ids)[:EXAMPLES]}
            for reason, ids in sorted(found.items(), key=lambda item: -len(item[1]))}


def summary_lines(summary: dict) -> list[str]:
    """The summary as a person reads it: embedded, skipped as already written, quarantined by reason, time."""
    lines = [f"embed: {summary['studies_in_manifest']} studies in the manifest -> {summary['embeddings']} "
             f"({summary['model_id']}, sha256 {summary['checkpoint_sha256'][:12]}...)"]
    rows = [("embedded now", summary["embedded_now"], ""),
            ("already written", summary["already_written"], "skipped"),
            ("quarantined", summary["quarantined"], "")]
    for reason, entry in summary["quarantined_by_reason"].items():
        rows.append((f"  {reason}", entry["studies"], "e.g. " + ", ".join(entry["examples"])))
    width = max(len(name) for name, _, _ in rows)
    lines += [f"  {name.ljust(width)}  {str(count).rjust(6)}  {note}".rstrip() for name, count, note in rows]
    if summary["damaged_parts_removed"]:
        lines.append(f"  {len(summary['damaged_parts_removed'])} part files an interrupted run left damaged were "
                     "removed (their studies embedded again)")
    lines.append(f"  {summary['seconds']} s")
    lines.append(f"quarantine (every refusal and skipped part, with its reason): {summary['quarantine']}")
    return lines
