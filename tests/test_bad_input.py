"""What a bad-input sweep of the whole command line found, each case as a user met it.

Most commands run from a working folder other than the repository's, with relative paths as a user types
them. Ray's worker processes keep the folder Ray started in, so a relative path handed on to them is read
or written somewhere else: the command line makes every local path absolute once, as it reads it.
(``train`` with a relative ``--config`` and relative config paths: ``test_precision.py``'s bf16 run.)

The tiny run checkpoint here was trained, as the demo's is, with a shard cache on an S3 endpoint that no
longer exists: what the command line says (``--manifest``) must win over what its config says.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path

import pytest

from hlip_ray import cli, ray_runtime
from hlip_ray.data.shards import read_index
from hlip_ray.storage import Storage
from tests.helpers import tiny_bert_dir, tiny_run_checkpoint

GRID = ["data.grid=[16,32,32]", "data.windows=[[-20,140]]", "data.max_eval_scans=3"]
GONE = ["data.shards=s3://bucket-of-a-finished-demo/shards", "storage.endpoint_url=http://127.0.0.1:9"]


def _working_folder() -> str:
    return os.getcwd()


def _main(*argv: str) -> tuple[int, str, str]:
    """``hlip-ray ARGV`` in this process: its exit status, stdout and stderr."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = cli.main(list(argv))
    return status, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="module")
def site(tmp_path_factory, ray_session):
    """A folder, entered as the working folder, holding: a tiny run checkpoint (``run/checkpoint``) whose
    config names a shard cache on a gone S3 endpoint; a synthetic corpus of 4 studies (``corpus``), one of
    them without its report; its manifest (``m.jsonl``); and the corpus preprocessed into ``cache``, all
    by relative paths. Returns ``(folder, studies, study without report, preprocess's two outputs)``."""
    root = tmp_path_factory.mktemp("site")
    tiny_run_checkpoint(root / "run" / "checkpoint", tiny_bert_dir(root), *GONE)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        assert ray_session.get(ray_session.remote(_working_folder).remote()) != str(root)   # workers: elsewhere
        assert _main("synth", "--out", "corpus", "--studies", "4", "--seed", "3")[0] == 0
        no_report = sorted(path.name for path in (root / "corpus").iterdir() if path.is_dir())[-1]
        (root / "corpus" / no_report / "report.txt").unlink()
        assert _main("manifest", "--root", "corpus", "--out", "m.jsonl", "data.val_fraction=0.5")[0] == 0
        studies = len((root / "m.jsonl").read_text().splitlines())
        runs = [_main("preprocess", "--manifest", "m.jsonl", "--out", "cache", *GRID) for _ in range(2)]
    assert [status for status, _, _ in runs] == [0, 0], runs
    return root, studies, no_report, runs


def test_every_path_argument_of_every_command_is_made_absolute_from_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    commands = {
        "synth": ["--out", "corpus"],
        "manifest": ["--root", "corpus", "--out", "m.jsonl"],
        "preprocess": ["--manifest", "m.jsonl", "--out", "cache", "--data-root", "data"],
        "train": ["--init-from", "init"],
        "tune": ["--space", "space.yaml"],
        "eval": ["--checkpoint", "ckpt", "--manifest", "m.jsonl", "--out", "report", "--interpret", "maps"],
        "embed": ["--checkpoint", "ckpt", "--manifest", "m.jsonl", "--out", "emb", "--data-root", "data"],
        "predict": ["study", "--checkpoint", "ckpt", "--interpret", "maps"],
        "export": ["--checkpoint", "ckpt", "--format", "hlip", "--out", "model.pt"],
    }
    parser = cli.build_parser()
    for command, arguments in commands.items():
        args = parser.parse_args([command, "--config", "c.yaml", *arguments])
        cli._absolute_arguments(args)
        given = {name: getattr(args, name) for name in cli.PATH_ARGUMENTS if getattr(args, name, None)}
        flags = {flag.lstrip("-").replace("-", "_") for flag in arguments if flag.startswith("--")} - {"format"}
        assert set(given) == {"config", *flags, *(["study"] if command == "predict" else [])}, command
        assert all(Path(value).is_absolute() and Path(value).parent == tmp_path for value in given.values()), given
    s3 = parser.parse_args(["preprocess", "--manifest", "s3://b/m.jsonl", "--out", "file://shared/cache"])
    cli._absolute_arguments(s3)
    assert (s3.manifest, s3.out) == ("s3://b/m.jsonl", f"file://{tmp_path}/shared/cache")


def test_config_paths_are_made_absolute_and_uris_and_hub_names_kept(tmp_path, monkeypatch):
    from hlip_ray.config import load_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "text").mkdir()
    config = cli._absolute_config(load_config(None, [
        "data.manifest=m.parquet", "data.shards=s3://b/shards", "train.storage_path=runs", "train.log_dir=logs",
        "tune.storage_path=file://mnt/sweeps", "eval.vocabulary=v.json", "eval.checkpoint=ckpt",
        "model.text.name_or_path=text"]))
    assert config.data.manifest == str(tmp_path / "m.parquet") and config.data.shards == "s3://b/shards"
    assert (config.train.storage_path, config.train.log_dir) == (str(tmp_path / "runs"), str(tmp_path / "logs"))
    assert config.tune.storage_path == f"file://{tmp_path}/mnt/sweeps"
    assert (config.eval.vocabulary, config.eval.checkpoint) == (str(tmp_path / "v.json"), str(tmp_path / "ckpt"))
    assert config.model.text.name_or_path == str(tmp_path / "text")
    hub = cli._absolute_config(load_config(None, ["model.text.name_or_path=microsoft/BiomedVLP-CXR-BERT"]))
    assert hub.model.text.name_or_path == "microsoft/BiomedVLP-CXR-BERT"
    assert cli._absolute_config(load_config(None, [])).model.text.name_or_path.startswith("pkg:")


def test_a_relative_preprocess_out_indexes_every_study_it_wrote_and_a_rerun_keeps_them(site):
    """Before: the shards were written, the index listed none ("written 0 ... refused N"), and a rerun removed
    them as damaged."""
    root, studies, no_report, (first, again) = site
    indexed = read_index(str(root / "cache"), Storage())
    assert sorted(row["study_id"] for row in indexed) == sorted(
        json.loads(line)["study_id"] for line in (root / "m.jsonl").read_text().splitlines()
        if json.loads(line)["report"])
    assert len(indexed) == studies - 1 and no_report not in {row["study_id"] for row in indexed}
    assert f"-> {root / 'cache'}" in first[1] and "empty_report" in first[1]
    assert f"0 now, {studies - 1} by an earlier run" in again[1]
    assert "damaged" not in again[1] + again[2]


def test_commands_from_another_folder_with_relative_paths_keep_what_they_write_and_the_manifest_given_wins(
        site, monkeypatch):
    """eval, embed, predict and export with relative paths. eval and embed are given ``--manifest`` while the
    checkpoint's config names a shard cache on a gone endpoint (before: an S3 credentials traceback); embed
    embeds the study without a report too (an image embedding needs no text; before: refused)."""
    root, studies, no_report, _ = site
    monkeypatch.chdir(root)
    status, _, errors = _main("eval", "--checkpoint", "run/checkpoint", "--manifest", "m.jsonl", "--split", "train",
                              "--out", "report", "--interpret", "maps", "eval.vocabulary=corpus/vocabulary.json",
                              "eval.bootstrap_samples=0")
    assert status == 0, errors
    report = json.loads((root / "report" / "report.json").read_text())
    assert report["studies"] >= 1 and report["relevance_maps"]["figures"] == len(list((root / "maps").glob("*.png")))
    assert report["relevance_maps"]["figures"] > 0

    status, console, errors = _main("embed", "--checkpoint", "run/checkpoint", "--manifest", "m.jsonl",
                                    "--out", "embeddings")
    assert status == 0, errors
    summary = json.loads((root / "embeddings" / "embed.json").read_text())
    assert (summary["embedded_now"], summary["quarantined"]) == (studies, 0), console
    import pyarrow.parquet as pq
    assert no_report in pq.read_table(root / "embeddings" / "embeddings").column("study_id").to_pylist()

    study = sorted(path.name for path in (root / "corpus").iterdir() if path.is_dir())[0]
    status, console, errors = _main("predict", f"corpus/{study}", "eval.vocabulary=corpus/vocabulary.json",
                                    "--checkpoint", "run/checkpoint", "--interpret", "predicted", "--json")
    assert status == 0, errors
    assert json.loads(console)["study"] == str(root / "corpus" / study)
    assert list((root / "predicted").glob("*.png"))

    assert _main("export", "--checkpoint", "run/checkpoint", "--format", "hlip", "--out", "model.pt")[0] == 0
    assert (root / "model.pt").stat().st_size > 0


def test_another_sites_study_of_an_id_in_the_cache_is_refused_naming_both_sources(site, tmp_path, monkeypatch):
    """Two sites whose studies are named alike, preprocessed into one cache. Before: the second site's
    studies were reported "written by an earlier run" and never written."""
    root, _, _, _ = site
    cache = tmp_path / "cache"
    shutil.copytree(root / "cache", cache)
    index = (cache / "index.parquet").read_bytes()
    monkeypatch.chdir(tmp_path)
    assert _main("synth", "--out", "site2", "--studies", "2", "--seed", "8")[0] == 0
    assert _main("manifest", "--root", "site2", "--out", "site2.jsonl")[0] == 0
    status, _, errors = _main("preprocess", "--manifest", "site2.jsonl", "--out", "cache", *GRID)
    assert status == 3 and "study-0000" in errors, errors
    assert str(root / "corpus" / "study-0000") in errors and str(tmp_path / "site2" / "study-0000") in errors
    assert len(errors.strip().splitlines()) == 1
    assert (cache / "index.parquet").read_bytes() == index   # nothing decoded, nothing committed


def test_eval_of_a_split_no_study_of_which_reads_is_refused_naming_the_split_and_the_quarantine(site, tmp_path):
    """Before: exit 0 with NaN figures."""
    root, _, _, _ = site
    rows = [json.loads(line) for line in (root / "m.jsonl").read_text().splitlines()]
    for row in rows:
        row["split"] = "test"
        row["scans"] = [{"name": "ct", "uri": str(tmp_path / "gone" / row["study_id"] / "ct.nii.gz"),
                         "format": "nifti"}]
    (tmp_path / "broken.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    status, console, errors = _main("eval", "--checkpoint", str(root / "run" / "checkpoint"),
                                    "--manifest", str(tmp_path / "broken.jsonl"), "--split", "test",
                                    "--out", str(tmp_path / "report"))
    assert status == 3, console
    message = errors.strip().splitlines()[-1]
    assert f"none of the {len(rows)} studies of split 'test' could be read" in message
    assert "missing_object" in message and str(tmp_path / "report" / "quarantine.jsonl") in message
    quarantined = [json.loads(line) for line in (tmp_path / "report" / "quarantine.jsonl").read_text().splitlines()]
    assert {record["study_id"] for record in quarantined} == {row["study_id"] for row in rows}
    assert not (tmp_path / "report" / "report.json").exists() and "nan" not in console.lower()


@pytest.mark.parametrize("command", ["preprocess", "train", "tune", "eval", "embed"])
def test_an_empty_manifest_is_refused_before_ray_starts(command, site, tmp_path, monkeypatch):
    """Before: refused only once a local Ray had started (23 s)."""
    root, _, _, _ = site
    (tmp_path / "empty.jsonl").write_text("")
    space = tmp_path / "space.yaml"
    space.write_text("train.lr: {choice: [1.0e-3, 1.0e-4]}\n")

    def started(*args, **kwargs):
        raise AssertionError("Ray was started before the manifest was read")

    monkeypatch.setattr(ray_runtime, "connect", started)
    manifest = str(tmp_path / "empty.jsonl")
    checkpoint = ["--checkpoint", str(root / "run" / "checkpoint")]
    argv = {"preprocess": ["--manifest", manifest, "--out", str(tmp_path / "cache")],
            "train": [f"data.manifest={manifest}"],
            "tune": ["--space", str(space), f"data.manifest={manifest}", "tune.metric=val/loss", "tune.mode=min"],
            "eval": [*checkpoint, "--manifest", manifest],
            "embed": [*checkpoint, "--manifest", manifest, "--out", str(tmp_path / "emb")]}[command]
    status, _, errors = _main(command, *argv)
    assert status == 3 and errors.strip() == f"hlip-ray: {manifest}: the manifest lists no studies", errors


def test_a_relative_output_path_in_a_jobs_working_dir_copy_is_still_refused_once_made_absolute(tmp_path, monkeypatch):
    from hlip_ray.config import ConfigError, load_config
    from hlip_ray.train.run import check_output_paths

    copy = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    for key in ("train.storage_path", "train.log_dir"):
        config = cli._absolute_config(load_config(None, ["train.storage_path=/mnt/runs", "train.log_dir=/mnt/logs",
                                                         f"{key}=runs"]))
        with pytest.raises(ConfigError, match=f"{key} '{copy}/runs' lies in this job's temporary copy"):
            check_output_paths(config)
    check_output_paths(cli._absolute_config(load_config(None, ["train.storage_path=/mnt/runs",
                                                               "train.log_dir=/mnt/logs"])))
    check_output_paths(cli._absolute_config(load_config(None, ["train.storage_path=s3://b/runs"])))
