"""The command line, the job configs and the demo."""

import json
from pathlib import Path

import pytest

from hlip_ray import cli
from hlip_ray.config import load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((REPO / "jobs" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_job_config_is_a_valid_instance_of_the_tree(path):
    load_config(path)


def test_config_command_prints_the_merged_config(capsys):
    assert cli.main(["config", "--config", str(REPO / "jobs/configs/demo.yaml"), "model.depth=3"]) == 0
    out = capsys.readouterr().out
    assert "depth: 3" in out and "embed_dim: 96" in out


def test_config_command_rejects_a_bad_key_with_its_path(capsys):
    assert cli.main(["config", "train.zero_stag=2"]) == 2
    assert "train.zero_stag: unknown key" in capsys.readouterr().err


def test_demo_runs_synthetic_studies_from_s3_through_shards_to_the_model(ray_session, capsys):
    from hlip_ray import demo

    figures = demo.main(["--studies", "4", "model.depth=3", "data.val_fraction=0", "data.grid=[16,32,32]"])
    assert figures["studies_sharded"] == 4 and figures["rejections"] == {}
    assert figures["batch_pixels_shape"] == [4, 4, 1, 16, 32, 32]
    assert figures["study_embedding_shape"] == figures["text_embedding_shape"] == [4, 64]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == figures
