"""`hlip-ray preprocess` into a folder as a user reruns it: idempotent, resumable after a kill, checked
before any decoding, and ending with a summary a person reads.

A rerun writes no study twice; a run killed half-way leaves nothing a reader picks up, and the next
run takes up its whole shard files, names and removes its damaged ones, and decodes the rest; an
output made with other settings, or one that cannot be written, is refused before decoding; a damaged
shard that the index names is named when read.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hlip_ray import cli
from hlip_ray.data.shards import INDEX_FILE, SHARDS_DIR, SUMMARY_FILE, read_index, read_study
from hlip_ray.storage import Storage
from tests.conftest import REPO_ROOT
from tests.helpers import synthetic_corpus

SETTINGS = ["data.grid=[8,16,16]", "data.max_eval_scans=2", "data.windows=[[0,80]]", "resources.data=data_pool"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return synthetic_corpus(tmp_path_factory.mktemp("preprocess"), studies=12, seed=3, val_fraction=0.3)


def _preprocess(corpus: Path, out: Path | str, *extra: str) -> int:
    return cli.main(["preprocess", "--manifest", str(corpus / "manifest.parquet"), "--out", str(out), *SETTINGS,
                     *extra])


def _studies(out: Path) -> list[str]:
    return sorted(row["study_id"] for row in read_index(str(out), Storage()))


def _shards(out: Path) -> list[Path]:
    return sorted((out / SHARDS_DIR).rglob("*.parquet"))


def test_a_rerun_writes_each_study_once_and_prints_a_summary(corpus, tmp_path, ray_session, capsys):
    out = tmp_path / "shards"
    assert _preprocess(corpus, out) == 0
    first = capsys.readouterr().out
    studies = _studies(out)
    assert studies and len(set(studies)) == len(studies)
    assert re.search(rf"^  written +{len(studies)}  {len(studies)} now, 0 by an earlier run$", first, re.M), first
    assert re.search(r"^quarantine \(every refusal and skipped part, with its reason\): .*quarantine.jsonl$", first,
                     re.M)
    files = _shards(out)

    assert _preprocess(corpus, out) == 0
    again = capsys.readouterr().out
    assert _studies(out) == studies                                 # each study once, not twice
    assert _shards(out) == files                                     # nothing decoded again
    assert re.search(rf"^  written +{len(studies)}  0 now, {len(studies)} by an earlier run$", again, re.M), again

    # Other preprocessing settings: refused before any decoding, naming the setting.
    assert _preprocess(corpus, out, "data.grid=[8,32,32]") == 3
    error = capsys.readouterr().err
    assert "holds shards made with other preprocessing settings (data.grid [8, 16, 16] there, [8, 32, 32] now)" in error
    assert _shards(out) == files

    # A cache from before area resizing records no resize method: its volumes were sampled trilinearly, and
    # new area-averaged ones are not added beside them.
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["settings"].pop("resize") == "area"
    (out / SUMMARY_FILE).write_text(json.dumps(summary))
    assert _preprocess(corpus, out) == 3
    assert "(resize trilinear there, area now)" in capsys.readouterr().err
    assert _shards(out) == files

    # A shard the index names, damaged afterwards: named when read.
    item = read_index(str(out), Storage())[0]
    shard = out / SHARDS_DIR / item["file"]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ValueError, match=re.escape(f"{shard}: damaged shard, row group {item['row_group']}")):
        read_study(str(out), item["file"], item["row_group"], Storage())


def test_a_killed_run_leaves_nothing_a_reader_sees_and_the_next_run_takes_it_up(corpus, tmp_path, ray_session,
                                                                                 capsys):
    expected = tmp_path / "expected"
    assert _preprocess(corpus, expected) == 0
    capsys.readouterr()
    out = tmp_path / "shards"
    # Killed as soon as its first shard file is there.
    address = ray_session.get_runtime_context().gcs_address
    run = subprocess.Popen([sys.executable, "-m", "hlip_ray.cli", "preprocess", "--manifest",
                            str(corpus / "manifest.parquet"), "--out", str(out), *SETTINGS],
                           cwd=REPO_ROOT, env={**os.environ, "RAY_ADDRESS": address},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not _shards(out) and run.poll() is None:
        assert time.monotonic() < deadline, "no shard file appeared"
        time.sleep(0.2)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait(timeout=60)
    if not (out / INDEX_FILE).exists():   # killed before its commit (the usual case)
        assert _shards(out)
    # Whatever the kill left, plus a shard file cut short as a kill during its write leaves it.
    damaged = out / SHARDS_DIR / "run-interrupted" / "cut-short.parquet"
    damaged.parent.mkdir(parents=True, exist_ok=True)
    damaged.write_bytes(_shards(expected)[0].read_bytes()[:1000])

    assert _preprocess(corpus, out) == 0
    summary = capsys.readouterr().out
    assert _studies(out) == _studies(expected)                       # every study once
    assert not damaged.exists()
    # The file cut short here, and any the kill itself cut short (a write task killed mid-file).
    removed = re.search(r"^  an interrupted run's shards: \d+ studies taken up, (\d+) damaged files removed$",
                        summary, re.M)
    assert removed and int(removed.group(1)) >= 1, summary
    assert str(damaged) in json.loads((out / "shards.json").read_text())["leftovers_removed"]


def test_an_unreadable_study_is_quarantined_and_an_unwritable_output_refused_before_decoding(
        corpus, tmp_path, s3_endpoint, ray_session, capsys):
    from hlip_ray.data.manifest import ScanRef, StudyRow, read_manifest, write_manifest

    endpoint = f"storage.endpoint_url={s3_endpoint}"
    started = time.monotonic()
    assert _preprocess(corpus, "s3://no-such-bucket/shards", endpoint) == 3
    error = capsys.readouterr().err
    assert "--out s3://no-such-bucket/shards: cannot be" in error and "NoSuchBucket" in error
    assert "Traceback" not in error and time.monotonic() - started < 30

    # One row behind a bucket that does not exist: that study is refused with its reason, the rest written.
    rows = read_manifest(str(corpus / "manifest.parquet"), Storage())
    lost = StudyRow(study_id="study-lost", report="No acute findings.", modality="CT", split="train",
                    scans=[ScanRef("ct", "s3://no-such-bucket/study-lost/ct.nii.gz", "nifti")])
    write_manifest([*rows, lost], str(tmp_path / "manifest.parquet"), Storage())
    out = tmp_path / "shards"
    assert cli.main(["preprocess", "--manifest", str(tmp_path / "manifest.parquet"), "--out", str(out), *SETTINGS,
                     endpoint]) == 0
    summary = capsys.readouterr().out
    assert "study-lost" not in _studies(out) and len(_studies(out)) >= len(rows) - 2
    assert re.search(r"^    unreadable +1  e.g. study-lost$", summary, re.M), summary
    records = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    (record,) = [record for record in records if record["reason"] == "unreadable"]
    assert record["study_id"] == "study-lost" and "NoSuchBucket" in record["detail"]
