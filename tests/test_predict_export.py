"""``hlip-ray export`` (HLIP's released layout, read back by from_hlip_checkpoint; on the CPU) and ``hlip-ray predict``
(one local study of real DICOM and NIfTI files, zero-shot scores, on ``eval.device``)."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pydicom.data
import pytest
import torch

from hlip_ray import cli
from hlip_ray.inference.trained_model import load_model
from hlip_ray.model import from_hlip_checkpoint
from hlip_ray.storage import Storage
from tests.helpers import tiny_bert_dir, tiny_run_checkpoint

PYDICOM_FILES = Path(pydicom.data.__file__).parent / "test_files"
REBUILD_KEYS = ("attention_layout", "num_heads", "pixel_mean", "pixel_std", "text_name_or_path")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run checkpoint, its text tower folder and the model it holds."""
    root = tmp_path_factory.mktemp("predict-export")
    text_dir = tiny_bert_dir(root)
    folder, _ = tiny_run_checkpoint(root / "run", text_dir)
    model, config = load_model(str(folder), Storage())
    return folder, text_dir, model.eval(), config


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A study folder as a PACS export holds it: a 15-frame DICOM volume, a localizer series (skipped), a
    NIfTI volume, and a stray text file."""
    import nibabel.tests

    folder = tmp_path_factory.mktemp("studies") / "study-1"
    (folder / "dose").mkdir(parents=True)
    shutil.copy(PYDICOM_FILES / "rtdose.dcm", folder / "dose" / "IM0001.dcm")
    shutil.copytree(PYDICOM_FILES / "dicomdirtests" / "98892003" / "MR700", folder / "scout")
    shutil.copy(Path(nibabel.tests.__file__).parent / "data" / "anatomical.nii", folder / "t1.nii")
    (folder / "notes.txt").write_text("exported by the PACS")
    return folder


def _embeddings(model, text_ids):
    torch.manual_seed(3)
    pixels = torch.randint(0, 256, (2, 3, 1, 16, 32, 32), dtype=torch.uint8)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    with torch.no_grad():
        return model.encode_study(pixels, mask), model.encode_text(text_ids, torch.ones_like(text_ids))


def test_hlip_export_reads_back_to_the_same_embeddings(run, tmp_path, capsys):
    folder, text_dir, model, config = run
    out = tmp_path / "model.pt"
    assert cli.main(["export", "--checkpoint", str(folder), "--format", "hlip", "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    state = torch.load(out, weights_only=True)["state_dict"]
    assert state["logit_scale"].shape == ()
    assert {"visual.trunk.patch_embed.proj.weight", "visual.trunk.spatial_posemb", "visual.trunk.sequential_posemb",
            "visual.head.proj.weight", "text.proj.weight"} <= set(state)
    assert not [key for key in state if key.startswith(("visual.patch_embed", "visual_proj", "visual.blocks"))]

    loaded = from_hlip_checkpoint(out, attention_layout=config.model.attention_layout, num_heads=2,
                                  pixel_mean=[0.5], pixel_std=[0.5], text_name_or_path=str(text_dir)).eval()
    ids = torch.tensor([[101, 7592, 2088, 102], [101, 2053, 3430, 102]])
    for original, read_back in zip(_embeddings(model, ids), _embeddings(loaded, ids)):
        torch.testing.assert_close(read_back, original, rtol=0, atol=0)
    assert loaded.scale() == model.scale()


def test_safetensors_export_is_a_folder_that_loads_back(run, tmp_path):
    from hlip_ray.config import load_config

    folder, _, model, config = run
    out = tmp_path / "export"
    assert cli.main(["export", "--checkpoint", str(folder), "--format", "safetensors", "--out", str(out)]) == 0
    assert sorted(path.name for path in out.iterdir()) == ["config.yaml", "model.safetensors", "open_clip_config.json"]
    described = json.loads((out / "open_clip_config.json").read_text())
    assert described["model_cfg"]["embed_dim"] == 16
    assert described["model_cfg"]["text_cfg"]["hf_pooler_type"] == "cls_last_hidden_state_pooler"
    assert described["hlip"]["grid"] == [16, 32, 32] and described["hlip"]["patch_size"] == [8, 16, 16]
    assert described["hlip"]["attention_layout"] == ["scan", "scan", "study"]
    written = load_config(out / "config.yaml")
    assert (written.model.embed_dim, written.model.num_heads, written.data.grid) == (24, 2, [16, 32, 32])

    loaded = from_hlip_checkpoint(out / "model.safetensors",
                                  **{key: described["hlip"][key] for key in REBUILD_KEYS}).eval()
    ids = torch.tensor([[101, 7592, 2088, 102]])
    for original, read_back in zip(_embeddings(model, ids), _embeddings(loaded, ids)):
        torch.testing.assert_close(read_back, original, rtol=0, atol=0)


def test_export_of_an_hlip_release_gives_back_its_keys_and_tensors(hlip_reference, tmp_path):
    release = hlip_reference / "multiscan_h3.pt"
    out = tmp_path / "again.pt"
    assert cli.main(["export", "--checkpoint", str(release), "--format", "hlip", "--out", str(out),
                     "model.attention_layout=h3"]) == 0
    original = {key.removeprefix("module."): value
                for key, value in torch.load(release, weights_only=True)["state_dict"].items()}
    exported = torch.load(out, weights_only=True)["state_dict"]
    assert sorted(exported) == sorted(original)
    for key, value in original.items():
        assert exported[key].dtype == value.dtype and torch.equal(exported[key], value), key


@pytest.fixture(scope="module")
def unloadable_run(run, tmp_path_factory):
    """A run checkpoint whose ``model.safetensors`` is not a safetensors file: ``hlip-ray export`` that loads
    it fails with "not a readable safetensors file", so any other refusal came before the model load."""
    folder = tmp_path_factory.mktemp("unloadable") / "run"
    shutil.copytree(run[0], folder)
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    return folder


def _export(capsys, checkpoint, fmt, out, *options):
    code = cli.main(["export", "--checkpoint", str(checkpoint), "--format", fmt, "--out", str(out), *options])
    captured = capsys.readouterr()
    return code, captured.err


def test_export_refuses_an_output_of_the_wrong_kind_before_loading_the_model(unloadable_run, tmp_path, capsys):
    for fmt, out, message in (("hlip", tmp_path / "m.json", "--format hlip writes one torch file"),
                              ("safetensors", tmp_path / "m.safetensors", "writes a folder"),
                              ("safetensors", tmp_path / "x.pt", "writes a folder")):
        code, err = _export(capsys, unloadable_run, fmt, out)
        assert code == 3 and message in err, err
        assert "not a readable safetensors file" not in err
        assert not out.exists()


def test_export_refuses_an_existing_file_unless_forced(run, unloadable_run, tmp_path, capsys):
    out = tmp_path / "model.pt"
    out.write_bytes(b"somebody's model")
    code, err = _export(capsys, unloadable_run, "hlip", out)   # refused before the (failing) load
    assert code == 3 and err == f"hlip-ray: {out} already exists: pass --force to overwrite it\n"
    code, err = _export(capsys, run[0], "hlip", out)
    assert code == 3 and "--force" in err
    assert out.read_bytes() == b"somebody's model"

    code, err = _export(capsys, run[0], "hlip", out, "--force")
    assert code == 0, err
    assert "logit_scale" in torch.load(out, weights_only=True)["state_dict"]


def test_export_refuses_to_overwrite_an_exported_folder_unless_forced(run, unloadable_run, tmp_path, capsys):
    out = tmp_path / "export"
    out.mkdir()
    (out / "config.yaml").write_text("an earlier export\n")
    for checkpoint in (unloadable_run, run[0]):
        code, err = _export(capsys, checkpoint, "safetensors", out)
        assert code == 3 and f"hlip-ray: {out}" in err and "--force" in err, err
        assert "not a readable safetensors file" not in err
    assert sorted(path.name for path in out.iterdir()) == ["config.yaml"]
    assert (out / "config.yaml").read_text() == "an earlier export\n"

    code, err = _export(capsys, run[0], "safetensors", out, "--force")
    assert code == 0, err
    assert sorted(path.name for path in out.iterdir()) == ["config.yaml", "model.safetensors", "open_clip_config.json"]
    assert (out / "config.yaml").read_text() != "an earlier export\n"


def test_export_never_writes_into_a_run_checkpoint_even_forced(run, unloadable_run, tmp_path, capsys):
    """``--out`` the checkpoint being read, a file in it, or another run checkpoint: refused, with or without
    ``--force``, before the model loads; the checkpoint is untouched and still loads."""
    checkpoint = tmp_path / "run"
    shutil.copytree(run[0], checkpoint)
    before = {path.name: path.read_bytes() for path in checkpoint.iterdir()}
    for source, fmt, out in ((checkpoint, "safetensors", checkpoint),
                             (checkpoint, "safetensors", f"{checkpoint}/"),
                             (checkpoint, "hlip", checkpoint / "model.pt"),
                             (unloadable_run, "safetensors", checkpoint),
                             (unloadable_run, "hlip", checkpoint / "deepspeed" / "model.pt"),
                             (unloadable_run, "safetensors", unloadable_run)):
        for force in ((), ("--force",)):
            code, err = _export(capsys, source, fmt, out, *force)
            assert code == 3 and "is a run checkpoint" in err and "not a readable" not in err, (out, force, err)
    assert err == (f"hlip-ray: {unloadable_run} is a run checkpoint: export writes no file into one; "
                   "name another --out\n")
    assert {path.name: path.read_bytes() for path in checkpoint.iterdir()} == before
    model, _ = load_model(str(checkpoint), Storage())
    assert model is not None


def _predict(capsys, checkpoint, study, *extra, options=()):
    """``hlip-ray predict --json``: what a person reads (stderr then) and the result (stdout's one line)."""
    code = cli.main(["predict", "--checkpoint", str(checkpoint), "--labels", "mass, hemorrhage", *options, str(study),
                     "--json", *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert len(captured.out.splitlines()) == 1, captured.out
    return captured.err, json.loads(captured.out)


def test_predict_scores_a_folder_of_dicom_and_nifti_scans(run, study, tmp_path, capsys):
    folder, _, model, _ = run
    vocabulary = tmp_path / "vocabulary.json"
    vocabulary.write_text(json.dumps({
        "hemorrhage": {"positive": ["acute hemorrhage"], "negative": ["no hemorrhage"]},
        "edema": {"positive": ["vasogenic edema"], "negative": ["no edema"]}}))
    out, result = _predict(capsys, folder, study, f"eval.vocabulary={vocabulary}")

    assert result["scans"] == ["dose", "t1"]
    assert result["input_shape"] == [2, 1, 16, 32, 32]
    assert [(skip["scan"], skip["reason"]) for skip in result["skipped"]] == [("scout", "localizer")]
    assert "skipped scout: localizer" in out
    scores = result["scores"]
    assert list(scores) == ["mass", "hemorrhage"]
    assert scores["hemorrhage"]["prompts"] == "vocabulary" and scores["mass"]["prompts"] == "default"
    with torch.no_grad():
        scale = float(model.scale())
    for score in scores.values():
        assert 0 < score["probability"] < 1
        assert score["probability"] == pytest.approx(1 / (1 + math.exp(-scale * score["difference"])))
    table = out.splitlines()
    header = next(index for index, line in enumerate(table) if line.startswith("label"))
    assert table[header + 1].split()[:3] == ["mass", f"{scores['mass']['probability']:.3f}",
                                             f"{scores['mass']['difference']:+.4f}"]
    assert table[header + 2].startswith("hemorrhage")


def test_predict_decodes_at_the_test_time_grid_and_draws_relevance_maps(run, study, tmp_path, capsys):
    _, first = _predict(capsys, run[0], study)
    printed, result = _predict(capsys, run[0], study, "eval.grid=[24,48,48]", options=["--interpret", str(tmp_path)])
    assert result["input_shape"] == [2, 1, 24, 48, 48] and result["grid"] == [24, 48, 48]
    maps = sorted(path.name for path in tmp_path.glob("*.png"))
    assert len(maps) == 2 and all(path.read_bytes().startswith(b"\x89PNG") for path in tmp_path.glob("*.png"))
    assert "relevance maps: " in printed
    assert first["input_shape"] == [2, 1, 16, 32, 32]
    differences = [[result["scores"][label]["difference"] for label in result["scores"]] for result in (first, result)]
    assert not np.allclose(*differences)   # the encoder saw another input (its position embedding resampled)


def test_relevance_maps_go_to_s3_as_other_outputs_do(run, study, s3_endpoint, capsys):
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="maps")
    printed, _ = _predict(capsys, run[0], study, f"storage.endpoint_url={s3_endpoint}",
                          options=["--interpret", "s3://maps/predict"])
    listed = boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(Bucket="maps")["Contents"]
    keys = sorted(item["Key"] for item in listed)
    assert len(keys) == 2 and all(key.startswith("predict/") and key.endswith(".png") for key in keys)
    assert "relevance maps: s3://maps/predict/" in printed and all(f"s3://maps/{key}" in printed for key in keys)


def test_predict_names_the_folder_when_nothing_in_it_is_usable(run, tmp_path, capsys):
    folder = str(run[0])
    empty = tmp_path / "empty"
    empty.mkdir()
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "IM0001").write_bytes(b"not a DICOM file at all" * 20)
    (junk / "scan.nii.gz").write_bytes(b"neither a NIfTI file")
    (junk / "notes.txt").write_text("no image here")

    for where, message in ((empty, "no DICOM or NIfTI file"), (tmp_path / "missing", "no such study folder"),
                           (junk, "no readable scan")):
        assert cli.main(["predict", "--checkpoint", folder, "--labels", "mass", str(where)]) == 3
        captured = capsys.readouterr()
        assert f"hlip-ray: {where}: {message}" in captured.err
    assert "skipped junk: unsupported_format" in captured.out
    assert "skipped scan.nii.gz: corrupt" in captured.out
    assert cli.main(["predict", "--checkpoint", folder, "--labels", " , ", str(junk)]) == 3
    assert "no label in it" in capsys.readouterr().err


def test_predict_runs_on_eval_device_and_refuses_cuda_without_one_before_decoding(run, study, capsys):
    """``eval.device=cpu`` scores; ``cuda`` where torch sees none is refused, naming the key, before a scan is
    decoded."""
    _, on_cpu = _predict(capsys, run[0], study, "eval.device=cpu")
    assert list(on_cpu["scores"]) == ["mass", "hemorrhage"]
    if not torch.cuda.is_available():
        assert cli.main(["predict", "--checkpoint", str(run[0]), "--labels", "mass", str(study),
                         "eval.device=cuda"]) == 3
        captured = capsys.readouterr()
        assert "hlip-ray: eval.device=cuda, but torch sees no CUDA device" in captured.err
        assert "decoding" not in captured.out


def test_export_loads_on_the_cpu_whatever_eval_device_says(run, tmp_path):
    """Export copies weights only: its file holds CPU tensors even with ``eval.device=cuda`` asked."""
    out = tmp_path / "model.pt"
    assert cli.main(["export", "--checkpoint", str(run[0]), "--format", "hlip", "--out", str(out),
                     "eval.device=cuda"]) == 0
    state_dict = torch.load(out, weights_only=True)["state_dict"]
    assert {tensor.device.type for tensor in state_dict.values()} == {"cpu"}
