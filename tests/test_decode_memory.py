"""Decode tasks ask Ray for the memory they need (``data.decode_memory_mb``): a node starts only as many as
its memory holds, and the others wait for a slot instead of running it out of memory."""

from __future__ import annotations

import json
import os
import time

import pytest

from hlip_ray.config import ConfigError, load_config
from hlip_ray.data import streams
from hlip_ray.data.manifest import StudyRow, read_manifest
from hlip_ray.data.quarantine import create_quarantine_log
from hlip_ray.data.sources import RawStudies, ShardStudies
from hlip_ray.storage import Storage
from tests.helpers import synthetic_corpus

TINY = ["data.grid=[8,16,16]", "data.scans_per_study=2", "data.max_eval_scans=2", "data.windows=[[0,80]]",
        "model.text.context_length=16", "train.chunk_size=2", "train.num_workers=1",
        "train.global_batch_size=2", "resources.data=data_pool"]


def map_steps(dataset) -> dict[str, dict]:
    """The Ray remote arguments of each per-study step (read and decode, sample scans, tokenize) in a
    dataset's logical plan, by step name."""
    steps, op = {}, dataset._logical_plan.dag
    while op is not None:
        if any(udf in op.name for udf in ("ReadAhead", "ScanSampler", "ReportTokenizer")):
            steps[op.name] = op.ray_remote_args
        op = op.input_dependencies[0] if op.input_dependencies else None
    return steps


def test_decode_memory_must_be_positive():
    assert load_config(None, []).data.decode_memory_mb == 2048
    with pytest.raises(ConfigError, match=r"data\.decode_memory_mb"):
        load_config(None, ["data.decode_memory_mb=0"])


def test_every_step_of_a_raw_stream_asks_for_the_decode_memory_and_a_shard_stream_for_none(ray_session):
    config = load_config(None, [*TINY, "data.decode_memory_mb=300"])
    row = StudyRow.from_dict({"study_id": "s0", "report": "No acute finding.", "modality": "CT",
                              "scans": [{"name": "a", "uri": "/nowhere/a.nii.gz", "format": "nifti"}]}, "test")
    raw = RawStudies.of_config(config, Storage(), None, train=True)
    datasets = {
        "study_records": streams.study_records([row], config, Storage(), None, train=False),   # preprocess, embed
        "training_stream": streams.training_stream([row.to_item()], raw, config, start=0, stop=2),
        "evaluation_stream": streams.evaluation_stream([row.to_item()], raw, config),
    }
    for name, dataset in datasets.items():
        steps = map_steps(dataset)
        assert len(steps) == (1 if name == "study_records" else 3), (name, list(steps))
        # the same arguments on every step, so that Ray Data fuses them and the task holds the memory
        memory = {step: args.get("memory") for step, args in steps.items()}
        assert memory == dict.fromkeys(steps, 300 * 2**20), (name, steps)
    shard_stream = streams.evaluation_stream([{"study_id": "s0", "file": "f", "row_group": 0}],
                                             ShardStudies("/nowhere", Storage()), config)
    steps = map_steps(shard_stream)
    assert len(steps) == 3 and all("memory" not in args for args in steps.values())


class TimedStudies:
    """A raw-file source that holds each study a while after decoding it, and records when its task began
    reading it and finished building it: in a new file each time, so a task that Ray ran again shows."""

    def __init__(self, source: RawStudies, folder: str, hold_s: float) -> None:
        self.source, self.folder, self.hold_s = source, folder, hold_s
        self.drops_studies = source.drops_studies

    def read(self, item: dict, epoch: int = 0):
        return time.time(), self.source.read(item, epoch)

    def build(self, item: dict, epoch: int, read) -> list[dict]:
        began, files = read
        records = self.source.build(item, epoch, files)
        time.sleep(self.hold_s)
        with open(os.path.join(self.folder, f"{item['study_id']}-{os.getpid()}-{time.time_ns()}.json"), "w") as file:
            json.dump({"began": began, "ended": time.time()}, file)
        return records


def most_at_once(spans: list[tuple[float, float]]) -> int:
    """The largest number of ``(began, ended)`` spans open at one moment."""
    events = sorted([(began, 1) for began, _ in spans] + [(ended, -1) for _, ended in spans])
    running = peak = 0
    for _, change in events:   # at a tie an end sorts before a start: back-to-back spans do not overlap
        running += change
        peak = max(peak, running)
    return peak


def test_decode_tasks_wait_for_memory_instead_of_overrunning_the_node(ray_session, tmp_path, monkeypatch):
    """Each decode task asks for 40% of the cluster's free memory, so two fit at once, though six may
    run by ``data.decode_concurrency`` and eight by CPUs: the tasks queue, two at a time, and every study
    comes out, each decoded once (no task killed and run again). A task holds one study here, and its
    span runs from its first read to the end of its decode (the fused sampling and tokenizing after it
    are left out, so the count is the tasks decoding at one moment)."""
    import ray

    studies, fit = 8, 2
    free_mib = ray.available_resources()["memory"] / 2**20
    share_mib = int(free_mib / (fit + 0.5))   # fit of them hold 80% of it; fit + 1 would need 120%
    root = synthetic_corpus(tmp_path, studies=studies, seed=5, val_fraction=0.0)
    rows = read_manifest(str(root / "manifest.parquet"), Storage())
    config = load_config(None, [*TINY, "data.decode_concurrency=6", f"data.decode_memory_mb={share_mib}"])
    spans_dir = tmp_path / "spans"
    spans_dir.mkdir()
    quarantine_log = create_quarantine_log()
    source = TimedStudies(RawStudies.of_config(config, Storage(), quarantine_log, train=False), str(spans_dir),
                          hold_s=1.0)
    monkeypatch.setattr(streams, "STUDIES_PER_TASK", 1)   # one task per study
    stream = streams.evaluation_stream([row.to_item() for row in rows], source, config)
    seen = [study for batch in stream.iter_batches(batch_size=None) for study in batch["study_id"]]
    assert seen == [row.study_id for row in rows]   # every study, none lost to a failed task
    assert ray.get(quarantine_log.records_list.remote()) == []
    quarantine_log.close.remote()
    spans = [tuple(json.loads(path.read_text()).values()) for path in spans_dir.iterdir()]
    assert len(spans) == studies   # one decode per study: none ran again
    assert most_at_once(spans) == fit
    assert "ReadAhead)->Map(ScanSampler)->MapBatches(ReportTokenizer)" in stream.stats()   # one fused task
