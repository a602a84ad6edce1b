"""The quarantine: every scan or study a run skipped, with its reason, collected from every worker, and
every file left out of a scan that was kept (a stray file, a duplicate slice: ``records.Note``, its
reason one of ``records.NOTE_REASONS``).

Decode tasks report what they reject to one ``QuarantineLog`` actor per run; at the end the driver
writes it as ``quarantine.jsonl`` (uri, study_id, reason, detail) beside the run's output.
Details never hold patient fields or report text (``records.Rejection``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import uuid
from collections.abc import Sequence

import ray

from hlip_ray.data.records import Note, Rejection
from hlip_ray.storage import Storage, join

logger = logging.getLogger(__name__)

QUARANTINE_FILE = "quarantine.jsonl"


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class QuarantineLog:
    """Collects the rejections of every decoding worker of one run. It lives on the driver's node, so a
    worker node's loss does not take it; each record is also appended to ``spool`` (a local file), from
    which the actor, restarted by Ray after a crash, takes up what it had."""

    def __init__(self, spool: str) -> None:
        self.spool = spool
        self.records: list[dict[str, str]] = []
        if os.path.exists(spool):
            with open(spool) as handle:
                self.records = [json.loads(line) for line in handle if line.endswith("\n")]

    def record(self, rejections: list[dict[str, str]]) -> None:
        with open(self.spool, "a") as handle:
            handle.write("".join(json.dumps(record) + "\n" for record in rejections))
        self.records.extend(rejections)

    def records_list(self) -> list[dict[str, str]]:
        return list(self.records)

    def close(self) -> None:
        """The records are written out: the spool goes."""
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.spool)


def create_quarantine_log():
    """A ``QuarantineLog`` actor for one run on this (the driver's) node (Ray must be initialised)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    spool = os.path.join(tempfile.gettempdir(), f"hlip-quarantine-{uuid.uuid4().hex}.jsonl")
    return QuarantineLog.options(scheduling_strategy=here).remote(spool)


def quarantine(log, rejections: Sequence[Rejection | Note], study_id: str) -> None:
    """Log each rejection (uri and reason only) and the notes as one count per reason, and record them all
    in ``log`` (None: log only)."""
    if not rejections:
        return
    records = [{"uri": r.uri, "study_id": study_id, "reason": r.reason, "detail": r.detail} for r in rejections]
    notes: dict[str, int] = {}
    for rejection, record in zip(rejections, records):
        if isinstance(rejection, Note):
            notes[record["reason"]] = notes.get(record["reason"], 0) + 1
        else:
            logger.warning("skipped %s (study %s): %s", record["uri"], study_id, record["reason"])
    if notes:
        logger.info("study %s: files left out: %s", study_id,
                    ", ".join(f"{count} {reason}" for reason, count in sorted(notes.items())))
    if log is not None:
        ray.get(log.record.remote(records))


def write_quarantine(log, out_dir: str, storage: Storage) -> dict[str, int]:
    """Write ``out_dir/quarantine.jsonl``; return the counts by reason."""
    records = ray.get(log.records_list.remote())
    lines = "".join(json.dumps(record) + "\n" for record in records)
    storage.write_bytes(join(out_dir, QUARANTINE_FILE), lines.encode())
    ray.get(log.close.remote())
    counts: dict[str, int] = {}
    for record in records:
        counts[record["reason"]] = counts.get(record["reason"], 0) + 1
    return counts


def run_records(out: str, storage: Storage, log, keep: set[str]) -> list[dict]:
    """The records of ``out/quarantine.jsonl`` to write after a run that resumed into ``out``: the earlier
    runs' records of the studies in ``keep`` (written before and not decoded again, e.g. files left out of
    their scans), then this run's from ``log`` (a ``QuarantineLog``)."""
    earlier = []
    try:
        lines = storage.read_bytes(join(out, QUARANTINE_FILE)).decode().splitlines()
        earlier = [record for record in map(json.loads, filter(None, lines)) if record.get("study_id") in keep]
    except FileNotFoundError:
        pass
    return earlier + ray.get(log.records_list.remote())
