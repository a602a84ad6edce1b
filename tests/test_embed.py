"""`hlip-ray embed` as a user runs it on an archive: one row per readable study, written in parts;
the broken study quarantined with its reason; a rerun encodes nothing; a lost part is encoded again,
and only it; the embeddings are the model's own ``encode_study``; another checkpoint into the same
output is refused before any decoding.

One embedding run (module fixture) of a small synthetic corpus plus one study whose only scan is not
a NIfTI file, by a tiny random run checkpoint; each test works on its own copy of the output.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hlip_ray import cli
from hlip_ray.inference import embed
from tests.helpers import synthetic_corpus, tiny_bert_dir, tiny_run_checkpoint

SETTINGS = ["resources.data=data_pool", "resources.trainer=trainer", "embed.batch_size=2"]
PART_STUDIES = 2   # a part every two studies or more: five studies come in two parts at least


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """``(root, manifest, readable study ids)``: a synthetic corpus and a study with a broken scan."""
    from hlip_ray.data.manifest import ScanRef, StudyRow, read_manifest, write_manifest
    from hlip_ray.storage import Storage

    root = synthetic_corpus(tmp_path_factory.mktemp("embed"), studies=5, seed=4, val_fraction=0.4)
    rows = read_manifest(str(root / "manifest.parquet"), Storage())
    broken = root / "raw" / "study-broken" / "ct.nii.gz"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"not a NIfTI file" * 64)
    manifest = root / "with-broken.parquet"
    write_manifest([*rows, StudyRow(study_id="study-broken", report="No acute findings.", modality="CT",
                                    split="val", scans=[ScanRef("ct", str(broken), "nifti")])],
                   str(manifest), Storage())
    return root, manifest, sorted(row.study_id for row in rows)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two tiny run checkpoints of different random weights: ``runs/demo/checkpoint_*`` and ``runs/other/...``."""
    root = tmp_path_factory.mktemp("runs")
    text_dir = tiny_bert_dir(root)
    first, _ = tiny_run_checkpoint(root / "demo" / "checkpoint_00000001", text_dir, seed=0)
    second, _ = tiny_run_checkpoint(root / "other" / "checkpoint_00000001", text_dir, seed=1)
    return first, second


def _embed(manifest: Path, checkpoint: Path, out: Path, *extra: str,
           actors: list | None = None) -> tuple[int, str, str]:
    """``hlip-ray embed``: its exit status, stdout and stderr; the Ray arguments of its embedding actors are
    added to ``actors``."""
    from ray.data import Dataset

    map_batches = Dataset.map_batches

    def recorded(dataset, fn, *args, **kwargs):
        if fn is embed.StudyEmbedder and actors is not None:
            actors.append({key: kwargs[key] for key in ("num_cpus", "num_gpus", "resources") if key in kwargs})
        return map_batches(dataset, fn, *args, **kwargs)

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), \
            pytest.MonkeyPatch.context() as patch:
        patch.setattr(embed, "PART_STUDIES", PART_STUDIES)
        patch.setattr(Dataset, "map_batches", recorded)
        status = cli.main(["embed", "--checkpoint", str(checkpoint), "--manifest", str(manifest), "--out", str(out),
                           *SETTINGS, *extra])
    return status, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="module")
def first_run(archive, checkpoints, tmp_path_factory, ray_session):
    """The output folder of one embedding run, its console output, and its embedding actors' Ray arguments."""
    _, manifest, _ = archive
    out = tmp_path_factory.mktemp("first") / "out"
    actors: list[dict] = []
    status, console, errors = _embed(manifest, checkpoints[0], out, actors=actors)
    assert status == 0, errors
    return out, console, actors


def _parts(out: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted((out / embed.EMBEDDINGS_DIR).glob("*.parquet"))}


def _rows(out: Path) -> pa.Table:
    return pq.read_table(out / embed.EMBEDDINGS_DIR)


def _copy(out: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    return copy


def test_one_row_per_readable_study_in_parts_and_the_broken_study_quarantined_with_its_reason(
        first_run, archive, checkpoints):
    out, console, _ = first_run
    _, _, readable = archive
    rows = _rows(out)
    assert rows.schema.names == ["study_id", "embedding", "model_id", "checkpoint_sha256"]
    assert rows.schema.field("embedding").type == pa.list_(pa.float32())
    assert sorted(rows.column("study_id").to_pylist()) == readable             # each once, the broken one not
    assert len(_parts(out)) >= 2                                               # written in parts as they came
    weights = (checkpoints[0] / "model.safetensors").read_bytes()
    assert set(rows.column("checkpoint_sha256").to_pylist()) == {hashlib.sha256(weights).hexdigest()}
    assert set(rows.column("model_id").to_pylist()) == {"demo/step-1"}
    embeddings = np.array(rows.column("embedding").to_pylist())
    assert embeddings.shape == (len(readable), 16)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)

    records = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    assert {(record["study_id"], record["reason"]) for record in records} == {
        ("study-broken", "corrupt"), ("study-broken", "no_usable_scan")}
    assert re.search(rf"^  embedded now +{len(readable)}$", console, re.M), console
    assert re.search(r"^  already written +0  skipped$", console, re.M), console
    assert re.search(r"^  quarantined +1$", console, re.M), console
    assert re.search(r"^    corrupt +1  e\.g\. study-broken$", console, re.M), console
    assert re.search(r"^  [\d.]+ s$", console, re.M), console
    summary = json.loads((out / "embed.json").read_text())
    assert (summary["embedded_now"], summary["quarantined"]) == (len(readable), 1)


def test_embeddings_are_the_models_encode_study_of_the_same_study(first_run, archive, checkpoints):
    import torch

    from hlip_ray.data.manifest import read_manifest
    from hlip_ray.data.sources import RawStudies
    from hlip_ray.data.streams import ScanSampler
    from hlip_ray.inference.trained_model import load_model
    from hlip_ray.storage import Storage

    out, _, _ = first_run
    _, manifest, readable = archive
    written = dict(zip(*(_rows(out).column(name).to_pylist() for name in ("study_id", "embedding"))))
    model, config = load_model(str(checkpoints[0]), Storage())
    source = RawStudies.of_config(config, Storage(), None, train=False)
    sampler = ScanSampler(config.data.max_eval_scans, train=False)
    items = {row.study_id: row.to_item() for row in read_manifest(str(manifest), Storage())}
    for study_id in readable[:2]:
        (record,) = source.build(items[study_id], 0, source.read(items[study_id]))
        example = sampler(record)
        with torch.no_grad():
            expected = model.eval().encode_study(torch.from_numpy(example["pixels"])[None],
                                                 torch.from_numpy(example["scan_mask"])[None])[0]
        np.testing.assert_allclose(written[study_id], expected.numpy(), atol=1e-5)


def test_the_embedding_actors_ask_for_a_training_workers_resources(first_run):
    """One CPU and one ``resources.trainer`` slot each, and no GPU (``eval.device=auto`` on a cluster without
    one)."""
    assert first_run[2] == [{"num_cpus": 1, "num_gpus": 0.0, "resources": {"trainer": 1.0}}]


def test_a_rerun_encodes_no_study_and_leaves_the_output_unchanged(first_run, archive, checkpoints, tmp_path):
    out = _copy(first_run[0], tmp_path)
    _, manifest, readable = archive
    before = _parts(out)
    status, console, errors = _embed(manifest, checkpoints[0], out)
    assert status == 0, errors
    assert re.search(r"^  embedded now +0$", console, re.M), console
    assert re.search(rf"^  already written +{len(readable)}  skipped$", console, re.M), console
    assert _parts(out) == before
    assert json.loads((out / "embed.json").read_text())["embedded_now"] == 0


def test_a_lost_part_is_encoded_again_and_only_it(first_run, archive, checkpoints, tmp_path):
    out = _copy(first_run[0], tmp_path)
    _, manifest, readable = archive
    parts = sorted((out / embed.EMBEDDINGS_DIR).glob("*.parquet"))
    lost = set(pq.read_table(parts[0]).column("study_id").to_pylist())
    parts[0].unlink()
    # And one cut short, as a kill during its write leaves it: removed, its studies encoded again.
    cut = set(pq.read_table(parts[1]).column("study_id").to_pylist())
    parts[1].write_bytes(parts[1].read_bytes()[:100])

    status, console, errors = _embed(manifest, checkpoints[0], out)
    assert status == 0, errors
    assert re.search(rf"^  embedded now +{len(lost | cut)}$", console, re.M), console
    assert re.search(rf"^  already written +{len(readable) - len(lost | cut)}  skipped$", console, re.M), console
    assert "1 part files an interrupted run left damaged were removed" in console
    assert sorted(_rows(out).column("study_id").to_pylist()) == readable       # each once again


def test_another_checkpoint_into_the_same_output_is_refused_before_decoding(first_run, archive, checkpoints,
                                                                             tmp_path):
    out = _copy(first_run[0], tmp_path)
    _, manifest, _ = archive
    before = _parts(out)
    status, console, errors = _embed(manifest, checkpoints[1], out)
    assert status == 3
    assert f"hlip-ray: --out {out} holds embeddings of another checkpoint (demo/step-1, sha256 " in errors, errors
    assert "Traceback" not in errors and not console
    assert _parts(out) == before
