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


@pytest.mark.parametrize("job", sorted((REPO / "jobs").glob("*.py")), ids=lambda p: p.name)
def test_every_job_entry_point_is_its_command(job):
    """``python jobs/X.py ...`` (what ``ray job submit`` runs) is ``hlip-ray X ...``: its help says so."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(job), "--help"], capture_output=True, text=True, cwd=REPO,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith(f"usage: hlip-ray {job.stem}"), done.stdout + done.stderr


def test_config_command_prints_the_merged_config(capsys):
    assert cli.main(["config", "--config", str(REPO / "hlip_ray/demo/demo.yaml"), "model.depth=6"]) == 0
    out = capsys.readouterr().out
    assert "depth: 6" in out and "embed_dim: 48" in out


def test_overrides_come_before_between_and_after_options(capsys):
    """argparse's intermixed parsing: ``train --config C a=b --init-from X c=d`` was "unrecognized arguments"."""
    args = cli.parse_args(["train", "--config", "C.yaml", "model.depth=6", "--init-from", "X", "data.grid=[8,8,8]"])
    assert (args.config, args.init_from, args.overrides) == ("C.yaml", "X", ["model.depth=6", "data.grid=[8,8,8]"])
    args = cli.parse_args(["predict", "--checkpoint", "C", "study", "eval.grid=[8,8,8]", "--labels", "mass", "a=b"])
    assert (args.study, args.labels, args.overrides) == ("study", "mass", ["eval.grid=[8,8,8]", "a=b"])
    demo = str(REPO / "hlip_ray/demo/demo.yaml")
    assert cli.main(["config", "model.depth=6", "--config", demo, "data.max_eval_scans=3"]) == 0
    out = capsys.readouterr().out
    assert "depth: 6" in out and "embed_dim: 48" in out and "max_eval_scans: 3" in out
    args = cli.parse_args(["demo", "--studies", "8", "train.max_steps=2"])   # the demo's own flags, as they are
    assert args.rest == ["--studies", "8", "train.max_steps=2"]


def test_demo_help_shows_the_demos_own_options_with_their_defaults(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["demo", "--help"])
    out = capsys.readouterr().out
    assert exited.value.code == 0 and out.startswith("usage: hlip-ray demo")
    assert "--studies STUDIES" in out and "(default: 600)" in out


def test_version_prints_the_installed_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exited:
        cli.main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out.strip() == f"hlip-ray {version('hlip-ray')}"


def test_every_flag_says_what_it_means_and_its_default():
    import argparse

    parser = cli.build_parser()
    (commands,) = [action.choices for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    for name, command in commands.items():
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            where = f"hlip-ray {name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help, f"{where} has no help"
            if action.default not in (None, False, argparse.SUPPRESS):
                assert "(default: %(default)s)" in action.help, f"{where} does not show its default"


def test_config_command_rejects_a_bad_key_with_its_path(capsys):
    assert cli.main(["config", "train.zero_stag=2"]) == 3
    assert "train.zero_stag: unknown key; did you mean train.zero_stage?" in capsys.readouterr().err


def test_a_usage_error_and_a_bad_input_exit_with_different_codes_that_help_lists(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:      # argparse's usage error
        cli.main(["config", "--no-such-flag"])
    assert exited.value.code == 2 and "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
    assert cli.main(["config", "--config", str(tmp_path / "missing.yaml")]) == 3
    assert str(tmp_path / "missing.yaml") in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    said = " ".join(capsys.readouterr().out.split())
    assert "2 a usage error, 3 a bad config or input" in said and "130 interrupted" in said


def test_demo_runs_end_to_end_and_ends_with_its_figures(ray_session, tmp_path, capsys):
    """The demo job at toy size: corpus on moto S3, shards, 2-worker ZeRO-2 training, zero-shot eval.

    Its locked text tower (no projection) makes the embedding the tiny BERT's hidden size, 32."""
    from hlip_ray.demo import job as demo
    from tests.helpers import tiny_bert_dir

    out = tmp_path / "out"
    (out / "demo").mkdir(parents=True)   # an earlier demo run's metrics: this run's log starts afresh
    (out / "demo" / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 9.0}) + "\n")
    figures = demo.main([
        "--studies", "12", "--out", str(out), f"model.text.name_or_path={tiny_bert_dir(tmp_path)}",
        "model.text.context_length=32", "model.depth=3", "model.embed_dim=24", "model.num_heads=2",
        "model.projection_dim=32", "data.grid=[16,32,32]", "data.scans_per_study=1", "data.max_eval_scans=2",
        "data.val_fraction=0.4", "train.global_batch_size=4", "train.chunk_size=1", "train.max_steps=2",
        "train.warmup_steps=1", "train.checkpoint_every=2",
    ])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(last) == set(figures) >= {"zeroshot_macro_auc", "baseline_auc", "train_studies_per_s", "wall_s",
                                         "checkpoint"}
    assert figures["train_steps"] == 2 and figures["val_studies"] > 0 and figures["train_studies_per_s"] > 0
    assert Path(figures["checkpoint"]).joinpath("model.safetensors").is_file()
    assert (out / "loss_curve.png").stat().st_size > 0
    assert (out / "eval" / "roc_curves.png").stat().st_size > 0 and (out / "eval" / "report.md").is_file()
    assert len((out / "demo" / "metrics.jsonl").read_text().splitlines()) == 2
