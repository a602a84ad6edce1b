"""The data plane end to end: synthetic DICOM/NIfTI on moto S3 -> manifest -> Ray Data -> batches."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from hlip_ray import cli
from hlip_ray.config import load_config
from hlip_ray.data.manifest import ScanRef, StudyRow, read_manifest
from hlip_ray.data.preprocess import write_shards
from hlip_ray.data.quarantine import create_quarantine_log
from hlip_ray.data.sources import RawStudies, study_items
from hlip_ray.data.streams import collate_study_batch, evaluation_stream
from hlip_ray.demo.synth import folder_writer, write_corpus
from hlip_ray.storage import Storage
from tests.helpers import raw_training_examples, shard_records

CANARY_NAME = "CANARY^ZEBULON"
GRID = [16, 32, 32]


def tiny_config(endpoint: str | None = None, *extra: str):
    overrides = [f"data.grid={GRID}", "data.scans_per_study=3", "data.max_eval_scans=4",
                 "data.windows=[[0,80]]", "data.val_fraction=0.3", "resources.data=data_pool",
                 "model.text.context_length=32", "train.num_workers=2", "train.chunk_size=2",
                 "train.global_batch_size=4", *extra]
    if endpoint:
        overrides.append(f"storage.endpoint_url={endpoint}")
    return load_config(None, overrides)


@pytest.fixture(scope="module")
def s3_corpus(s3_endpoint, ray_session):
    """10 synthetic studies written to moto S3 by `hlip-ray synth`, listed by `hlip-ray manifest`."""
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="corpus")
    endpoint = f"storage.endpoint_url={s3_endpoint}"
    assert cli.main(["synth", "--out", "s3://corpus/raw", "--studies", "10", "--seed", "3", endpoint]) == 0
    assert cli.main(["manifest", "--root", "s3://corpus/raw", "--out", "s3://corpus/manifest.parquet",
                     "data.val_fraction=0.3", endpoint]) == 0
    storage = Storage(endpoint_url=s3_endpoint)
    return {"endpoint": s3_endpoint, "storage": storage,
            "rows": read_manifest("s3://corpus/manifest.parquet", storage)}


def test_manifest_from_an_s3_listing_splits_by_patient(s3_corpus):
    import pydicom

    rows, storage = s3_corpus["rows"], s3_corpus["storage"]
    assert [row.study_id for row in rows] == [f"study-{i:04d}" for i in range(10)]
    labels = {json.loads(line)["study_id"]: json.loads(line)
              for line in storage.read_bytes("s3://corpus/raw/labels.jsonl").decode().splitlines()}
    split_of_patient: dict[str, set] = {}
    for row in rows:
        assert row.report and row.modality == labels[row.study_id]["modality"]
        assert row.labels == labels[row.study_id]["labels"]
        dicom = [scan for scan in row.scans if scan.format == "dicom"]
        if dicom:  # the split follows the DICOM PatientID (read here by the test only)
            first = storage.list_files(dicom[0].uri)[0]
            patient = pydicom.dcmread(io.BytesIO(storage.read_bytes(first)), stop_before_pixels=True).PatientID
            split_of_patient.setdefault(patient, set()).add(row.split)
    assert all(len(splits) == 1 for splits in split_of_patient.values())
    assert {row.split for row in rows} == {"train", "val"}
    assert "SYNTH-P" not in storage.read_bytes("s3://corpus/manifest.parquet").decode("latin-1")


def test_s3_studies_stream_as_training_batches(s3_corpus):
    config = tiny_config(s3_corpus["endpoint"])
    rows = [row for row in s3_corpus["rows"] if row.split == "train"]
    dataset = raw_training_examples(rows, config, s3_corpus["storage"], create_quarantine_log())
    seen, scan_counts = [], {row.study_id: len(row.scans) for row in rows}
    for batch in dataset.iter_torch_batches(batch_size=4, collate_fn=collate_study_batch):
        size = len(batch["study_id"])
        assert batch["pixels"].shape == (size, 3, 1, *GRID) and str(batch["pixels"].dtype) == "torch.uint8"
        assert batch["scan_mask"].shape == (size, 3) and batch["scan_mask"].dtype.is_floating_point is False
        assert batch["input_ids"].shape == batch["attention_mask"].shape == (size, 32)
        for study_id, mask, pixels in zip(batch["study_id"], batch["scan_mask"], batch["pixels"]):
            assert 1 <= int(mask.sum()) <= min(3, max(scan_counts[study_id], 1) * 2)
            assert mask[: int(mask.sum())].all()  # real scans first, then padding
            assert int(pixels[~mask].sum()) == 0 and int(pixels[mask].float().std()) > 0
        seen += batch["study_id"]
    assert sorted(seen) == sorted(scan_counts)


def test_shards_round_trip_and_feed_the_same_batches(s3_corpus, tmp_path):
    config = tiny_config(s3_corpus["endpoint"])
    storage = s3_corpus["storage"]
    assert cli.main(["preprocess", "--manifest", "s3://corpus/manifest.parquet", "--out", "s3://corpus/shards",
                     f"data.grid={GRID}", "data.max_eval_scans=4", "data.windows=[[0,80]]",
                     f"storage.endpoint_url={s3_corpus['endpoint']}", "resources.data=data_pool"]) == 0
    summary = json.loads(storage.read_bytes("s3://corpus/shards/shards.json"))
    assert summary["studies_written"] == 10 and summary["settings"]["grid"] == GRID
    filesystem, root = storage.resolve("s3://corpus/shards/shards")
    files = filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
    shard = next(info.path for info in files if info.path.endswith(".parquet"))
    with filesystem.open_input_file(shard) as handle:
        metadata = pq.ParquetFile(handle).metadata
    assert {metadata.row_group(0).column(i).compression for i in range(metadata.num_columns)} == {"ZSTD"}

    records = shard_records("s3://corpus/shards", storage)
    assert sorted(records) == [row.study_id for row in s3_corpus["rows"]]
    row = s3_corpus["rows"][1]
    raw = RawStudies(config.model_dump(mode="json"), storage, None, limit=4, shuffle=False)
    (direct,) = raw.build(row.to_dict(), 0, raw.read(row.to_dict()))
    stored = records[row.study_id]
    assert list(stored["shape"]) == direct["shape"]
    assert stored["pixels"] == direct["pixels"] and stored["report"] == row.report

    shard_config = config.model_copy(update={"data": config.data.model_copy(update={"shards": "s3://corpus/shards"})})
    for split in ("val", "train"):   # the training split's stream below
        items, source = study_items(shard_config, storage, None, split, train=False)
        assert [item["study_id"] for item in items] == [row.study_id for row in s3_corpus["rows"]
                                                        if row.split == split] != []
    examples = evaluation_stream(items, source, shard_config)
    batch = next(iter(examples.iter_torch_batches(batch_size=2, collate_fn=collate_study_batch)))
    assert batch["pixels"].shape == (2, 4, 1, *GRID) and batch["input_ids"].shape == (2, 32)


def _bad_corpus(root: Path) -> list[StudyRow]:
    """Three good synthetic studies plus one of each kind of bad input."""
    import nibabel
    from pydicom.data import get_testdata_file

    from hlip_ray.data.manifest import build_manifest

    write_corpus(folder_writer(root), studies=3, seed=5)
    good = build_manifest(str(root), Storage(), salt="s", val_fraction=0.0)[:1]
    # a series stored one file per slice (most synthetic DICOM scans are one multi-frame object)
    series = next(folder for folder in sorted(root.glob("study-*/*")) if len(list(folder.glob("*.dcm"))) > 1)
    truncated = root / "bad/truncated"
    truncated.mkdir(parents=True)
    for index, path in enumerate(sorted(series.glob("*.dcm"))):
        data = path.read_bytes()
        (truncated / f"{index:04d}.dcm").write_bytes(data[: len(data) // 2] if index == 1 else data)
    rtplan = root / "bad/rtplan"
    rtplan.mkdir()
    (rtplan / "plan.dcm").write_bytes(Path(get_testdata_file("rtplan.dcm")).read_bytes())
    nan_volume = np.ones((8, 8, 8), dtype=np.float32)
    nan_volume[2, 2, 2] = np.nan
    nibabel.save(nibabel.Nifti1Image(nan_volume, np.eye(4)), root / "bad/nan.nii.gz")
    good_nifti = next(p for p in sorted(root.rglob("*.nii.gz")) if not {"masks", "bad"} & set(p.parts))
    return good + [
        StudyRow("mixed", "Hemorrhage.", "CT", [ScanRef("truncated", str(truncated), "dicom"),
                                              ScanRef("missing", str(root / "nope"), "dicom"),
                                              ScanRef("plan", str(rtplan), "dicom"),
                                              ScanRef("ok", str(good_nifti), "nifti")]),
        StudyRow("all-bad", "Infarct.", "MR", [ScanRef("nan", str(root / "bad/nan.nii.gz"), "nifti")]),
        StudyRow("no-report", "  ", "CT", [ScanRef("ok", str(good_nifti), "nifti")]),
    ]


def test_bad_inputs_are_skipped_counted_and_quarantined(tmp_path, ray_session):
    rows = _bad_corpus(tmp_path / "raw")
    config = tiny_config()
    storage = Storage()
    summary = write_shards(rows, config, storage, str(tmp_path / "out"), create_quarantine_log())
    written = sorted(shard_records(str(tmp_path / "out"), storage))
    assert written == ["mixed", "study-0000"]
    assert summary["rejections"] == {"corrupt": 1, "missing_object": 1, "not_an_image": 1,
                                     "non_finite_values": 1, "no_usable_scan": 1, "empty_report": 1}
    lines = [json.loads(line) for line in (tmp_path / "out/quarantine.jsonl").read_text().splitlines()]
    assert {(line["study_id"], line["reason"]) for line in lines} == {
        ("mixed", "corrupt"), ("mixed", "missing_object"), ("mixed", "not_an_image"),
        ("all-bad", "non_finite_values"), ("all-bad", "no_usable_scan"), ("no-report", "empty_report")}
    assert all(set(line) == {"uri", "study_id", "reason", "detail"} for line in lines)
    corrupt = next(line for line in lines if line["reason"] == "corrupt")
    assert corrupt["uri"].endswith("truncated") and "0001.dcm" in corrupt["detail"]


def test_canary_patient_name_and_report_never_leak(tmp_path, ray_session):
    import pyarrow.parquet as pq
    import ray

    root = tmp_path / "raw"
    write_corpus(folder_writer(root), studies=3, seed=11, canary=CANARY_NAME)
    from hlip_ray.data.manifest import build_manifest

    storage = Storage()
    rows = build_manifest(str(root), storage, salt="s", val_fraction=0.0)
    canary_report = next(row.report for row in rows if CANARY_NAME in row.report)
    canary_sentence = next(s for s in canary_report.split(". ") if CANARY_NAME in s)
    rows.append(StudyRow("broken", canary_report, "CT", [ScanRef("x", str(root / "missing"), "dicom")]))
    out = tmp_path / "out"
    summary = write_shards(rows, tiny_config(), storage, str(out), create_quarantine_log())
    shard_config = tiny_config(None, f"data.shards={out}")
    items, source = study_items(shard_config, storage, None, "train", train=True)
    examples = evaluation_stream(items, source, shard_config)
    batches = list(examples.iter_batches(batch_size=4))

    needles = [CANARY_NAME, CANARY_NAME.replace("^", " "), canary_sentence]
    texts = {
        "summary": json.dumps(summary),
        "quarantine": (out / "quarantine.jsonl").read_text(),
        "batches": repr([{k: v for k, v in b.items() if k != "pixels"} for b in batches]),
    }
    for shard in sorted((out / "shards").glob("*.parquet")):
        texts[f"{shard.name} metadata"] = repr(pq.read_metadata(shard).metadata) + repr(pq.read_schema(shard))
        texts[f"{shard.name} columns"] = repr(pq.read_table(shard).drop(["report"]).to_pylist())
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    for log in logs.rglob("*"):
        if log.is_file() and log.suffix in (".log", ".out", ".err"):
            texts[f"log {log.name}"] = log.read_text(errors="replace")
    leaks = [(where, needle) for where, text in texts.items() for needle in needles if needle in text]
    assert not leaks
    assert CANARY_NAME in canary_report  # the canary did reach the data (the check above is not vacuous)
