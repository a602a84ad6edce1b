"""The command line, the job configs and the demo."""

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


def test_demo_encodes_generated_studies(capsys):
    from hlip_ray import demo

    figures = demo.main(["--studies", "3", "model.depth=3"])
    assert figures["study_embedding_shape"] == [3, 64]
    assert figures["text_embedding_shape"] == [3, 64]
    assert 3 <= figures["real_scans"] <= 12
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("{")
