"""Sweeps with Ray Tune, as a user runs them: `hlip-ray tune` in a process of its own, on the tiny smoke
config and a small synthetic corpus.

A space that names an unknown key, or has a point the config refuses, fails before any trial, naming
the key and value. A sweep over attention layout x global batch (through the gradient cache) runs every
trial as a whole training run; ASHA stops the trials that trail; the results (table, best config,
front, plots) are written and the best config builds its trainer. A sweep on S3 whose driver is killed resumes
with `--resume` and finishes without running its finished trial again. Under PBT the trailing trial
continues the leader's checkpoint with perturbed values.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hlip_ray.config import ConfigError, load_config
from hlip_ray.tune.space import load_space
from tests.conftest import REPO_ROOT
from tests.helpers import preprocessed_shards, synthetic_corpus

SMOKE = str(REPO_ROOT / "jobs" / "configs" / "smoke.yaml")


def _space(tmp_path: Path, text: str) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return str(path)


def _tune(*args: str, address: str | None = None, **popen) -> subprocess.Popen:
    """`hlip-ray tune` in a process of its own, attached to the cluster at ``address``.

    On the session's cluster (which has its dashboard) rather than a local Ray of its own: Ray Train's
    placement-group cleaner, which frees the CPUs of a trial that Tune stopped, finds its cluster by
    looking for one on the machine, and with two it finds neither (docs/troubleshooting.md)."""
    env = {**os.environ, **({"RAY_ADDRESS": address} if address else {})}
    return subprocess.Popen([sys.executable, "-m", "hlip_ray.cli", "tune", *args], cwd=REPO_ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, **popen)


def test_a_space_is_checked_whole_before_any_trial_starts(tmp_path):
    from hlip_ray.tune.sweep import sweep_config

    config = load_config(SMOKE, ["eval.vocabulary=v.json", "tune.grace_period=6",
                                 f"tune.storage_path={tmp_path / 'sweeps'}"])
    cases = {
        "model.attn: {grid: [h2, full]}\n": "model.attn: not a config key",
        "train.lr: {between: [1, 2]}\n": "train.lr: expected one sampler of choice, grid",
        "train.lr: {loguniform: [0, 1.0e-3]}\n": "loguniform needs low > 0",
        "train.run_name: {choice: [a, b]}\n": "train.run_name: set by the sweep itself",
        "model.attention_layout: {grid: [h2, full]}\ntrain.global_batch_size: {choice: [8, 10]}\n":
            "the point model.attention_layout=h2, train.global_batch_size=10 is refused",
        "data.grid: {choice: [[16, 32, 32], [16, 30, 32]]}\n": "data.grid [16, 30, 32] is not divisible",
    }
    for text, message in cases.items():
        with pytest.raises(ConfigError, match=re.escape(message)):
            sweep_config(config, load_space(_space(tmp_path, text)))
    # PBT changes a running trial's values at a checkpoint: only keys a run can take up there.
    pbt = load_config(SMOKE, ["tune.scheduler=pbt", f"tune.storage_path={tmp_path / 'sweeps'}",
                              "eval.vocabulary=v.json"])
    with pytest.raises(ConfigError, match=re.escape("train.global_batch_size: PBT changes a running trial's")):
        sweep_config(pbt, load_space(_space(tmp_path, "train.global_batch_size: {grid: [8, 16]}\n")))
    with pytest.raises(ConfigError, match="PBT needs a population"):
        sweep_config(pbt, load_space(_space(tmp_path, "train.lr: {choice: [1.0e-4, 1.0e-3]}\n")))
    assert sweep_config(pbt, load_space(_space(tmp_path, "train.lr: {grid: [1.0e-4, 1.0e-3]}\n")))
    with pytest.raises(ConfigError, match="tune.perturbation_interval 4 is not a multiple of train.checkpoint_every 6"):
        load_config(SMOKE, ["tune.scheduler=pbt", "tune.perturbation_interval=4"])
    # Through the command line: one line naming the key, exit status 3, and no sweep folder (no trial).
    done = _tune("--space", _space(tmp_path, "train.global_batch_size: {grid: [8, 12, 14]}\n"), "--config", SMOKE,
                 "eval.vocabulary=v.json", "tune.grace_period=6", f"tune.storage_path={tmp_path / 'sweeps'}")
    output, _ = done.communicate(timeout=120)
    assert done.returncode == 3, output
    assert "train.global_batch_size=14 is refused" in output and "not a multiple of num_workers × chunk_size" in output
    assert "Traceback" not in output
    assert not (tmp_path / "sweeps").exists()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, ray_session):
    """32 synthetic studies, preprocessed once into shards: the trials spend no time decoding DICOM."""
    root = synthetic_corpus(tmp_path_factory.mktemp("tune"), studies=32, seed=5, val_fraction=0.4)
    preprocessed_shards(root, "--config", SMOKE)
    return root


def _data(corpus: Path) -> list[str]:
    return [f"data.shards={corpus / 'shards'}", f"eval.vocabulary={corpus / 'raw' / 'vocabulary.json'}",
            f"tune.storage_path={corpus / 'sweeps'}", f"train.log_dir={corpus / 'logs'}"]


@pytest.mark.slow
def test_a_sweep_stops_trailing_trials_early_and_writes_results_whose_best_config_builds(corpus, ray_session):
    space = _space(corpus, "model.attention_layout: {grid: [h2, full]}\ntrain.global_batch_size: {grid: [8, 16]}\n")
    # One worker per trial (fewer processes to start on 2 cores); the gradient cache's chunks are what
    # the global batch changes, as with more workers.
    run = _tune("--space", space, "--config", SMOKE, *_data(corpus), "tune.name=layouts", "tune.grace_period=6",
                "tune.reduction_factor=2", "train.num_workers=1", "train.chunk_size=4",
                address=ray_session.get_runtime_context().gcs_address)
    output, _ = run.communicate(timeout=900)
    assert run.returncode == 0, output[-6000:]
    folder = corpus / "sweeps" / "layouts"
    with open(folder / "trials.csv") as file:
        trials = list(csv.DictReader(file))
    assert len(trials) == 4
    assert all(trial["status"] in ("finished", "stopped early") for trial in trials), trials
    stopped = [trial for trial in trials if trial["status"] == "stopped early"]
    finished = [trial for trial in trials if trial["status"] == "finished"]
    assert stopped and finished, trials                                   # ASHA stopped a trailing trial
    assert all(int(trial["steps"]) < 12 for trial in stopped) and all(int(t["steps"]) == 12 for t in finished)
    # One line per trial event, not Tune's status table.
    assert len(re.findall(r"^trial \S+ started: model.attention_layout=\S+ train.global_batch_size=\d+", output,
                          re.M)) == 4
    assert re.search(r"^trial \S+ stopped early by ASHA at step 6 of 12", output, re.M), output[-4000:]
    assert "Trial status" not in output and "Current time" not in output
    # The global batch grows through the gradient cache's chunks, not the memory per worker: the same
    # chunk size, twice the chunks.
    chunks = {trial["train.global_batch_size"]: int(trial["chunks_per_worker"]) for trial in trials}
    assert chunks == {"8": 2, "16": 4}
    assert all(float(trial["compute CPU-s"]) > 0 and float(trial["studies_per_s"]) > 0 for trial in trials)
    best = [trial for trial in trials if trial["best"] == "true"]
    assert len(best) == 1 and best[0]["pareto_front"] == "true"
    assert max(float(t["best val/zeroshot_auc"]) for t in trials) == float(best[0]["best val/zeroshot_auc"])
    for name in ("trials.parquet", "metric_by_step.png", "metric_vs_compute.png"):
        assert (folder / name).stat().st_size > 0
    assert re.search(r"^best: \S+ \(model.attention_layout=", output, re.M)

    config = load_config(folder / "best.yaml")
    assert config.model.attention_layout == best[0]["model.attention_layout"]
    assert config.train.global_batch_size == int(best[0]["train.global_batch_size"])
    # A whole config `hlip-ray train` takes: its trainer builds, with every check a run makes before
    # any work (each trial trained this very config, bar the run name).
    from hlip_ray.train.run import build_trainer

    training = build_trainer(config)
    assert training.trainer.scaling_config.num_workers == config.train.num_workers
    ray_session.kill(training.quarantine)
    ray_session.kill(training.run_log)


def _trials_csv(storage, folder: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(storage.read_bytes(f"{folder}/trials.csv").decode())))


@pytest.mark.slow
def test_a_sweep_on_s3_whose_driver_is_killed_resumes_without_rerunning_finished_trials(corpus, ray_session, bucket,
                                                                                      s3_endpoint):
    from hlip_ray.storage import Storage

    space = _space(corpus, "data.scans_per_study: {grid: [1, 2]}\n")
    args = ["--space", space, "--config", SMOKE, *_data(corpus), f"tune.storage_path={bucket}/sweeps",
            f"storage.endpoint_url={s3_endpoint}", "tune.name=resumed", "tune.scheduler=fifo", "train.max_steps=6",
            "train.num_workers=1", "train.chunk_size=4",
            "train.checkpoint_every=3", "tune.grace_period=3", "tune.max_concurrent_trials=1"]
    address = ray_session.get_runtime_context().gcs_address
    run = _tune(*args, address=address, start_new_session=True)
    lines, finished = [], None
    deadline = time.monotonic() + 600
    for line in run.stdout:
        lines.append(line)
        found = re.match(r"trial (\S+) finished at step 6", line)
        finished = finished or (found and found.group(1))
        if finished and re.match(r"trial \S+ step \d+:", line) and finished not in line:
            break   # the second trial is under way
        assert time.monotonic() < deadline, "".join(lines[-50:])
    assert finished, "".join(lines[-50:])
    os.killpg(run.pid, signal.SIGKILL)   # the driver: its trials and their training runs go with it
    run.wait(timeout=60)

    resumed = _tune("--resume", *args, address=address)
    output, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, output[-6000:]
    assert not re.search(rf"^trial {finished} started", output, re.M), "the finished trial ran again"
    trials = _trials_csv(Storage(endpoint_url=s3_endpoint), f"{bucket}/sweeps/resumed")
    statuses = {trial["trial"]: trial["status"] for trial in trials}
    assert statuses == {trial["trial"]: "finished" for trial in trials} and len(statuses) == 2, (trials, output[-6000:])
    assert finished in statuses


@pytest.mark.slow
def test_pbt_continues_trailing_trials_from_a_leaders_checkpoint_with_perturbed_values(tmp_path, ray_session):
    from hlip_ray.train.engine import lr_factor

    # Kept small: one worker per trial, no validation split (PBT compares the training loss).
    corpus = synthetic_corpus(tmp_path, studies=16, seed=7, val_fraction=0.0)
    space = _space(corpus, "train.lr: {loguniform: [1.0e-4, 3.0e-3]}\nmodel.attention_layout: {grid: [h2, full]}\n")
    run = _tune("--space", space, "--config", SMOKE, f"data.manifest={corpus / 'manifest.parquet'}",
                f"tune.storage_path={corpus / 'sweeps'}", f"train.log_dir={corpus / 'logs'}", "tune.name=pbt",
                "tune.scheduler=pbt", "tune.metric=loss", "tune.mode=min", "train.num_workers=1",
                "train.global_batch_size=4", "train.max_steps=4", "train.checkpoint_every=2",
                address=ray_session.get_runtime_context().gcs_address)
    output, _ = run.communicate(timeout=900)
    assert run.returncode == 0, output[-6000:]
    folder = corpus / "sweeps" / "pbt"
    with open(folder / "trials.csv") as file:
        trials = {trial["trial"]: trial for trial in csv.DictReader(file)}
    assert len(trials) == 2 and all(trial["status"] == "finished" for trial in trials.values()), trials
    # Synchronous PBT with two trials: at step 2 the trailing one continues the leader's step-2 checkpoint
    # (and not again at the last step, where it would end as a copy of the leader).
    cloned = [trial for trial in trials.values() if trial["cloned_from"]]
    assert len(cloned) == 1, trials
    follower = cloned[0]
    leader = re.fullmatch(r"(\S+) step 2", follower["cloned_from"]).group(1)
    assert leader in trials and leader != follower["trial"]
    assert re.search(rf"^trial {follower['trial']} continues trial {leader} step 2 \(PBT\): train.lr=", output, re.M)
    # Its own run: the leader's weights, optimizer and data position at step 2, then its own 2 steps at
    # its perturbed lr (which the restored optimizer takes up from the config).
    runs = [path for path in (folder / "runs").iterdir() if path.name.startswith(f"pbt-{follower['trial']}-")]
    assert len(runs) == 1, runs
    assert sorted(path.name for path in runs[0].glob("checkpoint_0*")) == ["checkpoint_00000004"]
    state = json.loads((runs[0] / "checkpoint_00000004" / "train_state.json").read_text())
    assert state["step"] == 4 and state["position"] == 4 * 4
    lr = float(follower["train.lr"])
    assert lr != float(trials[leader]["train.lr"])
    steps = [json.loads(line) for line in (corpus / "logs" / runs[0].name / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in steps] == [3, 4]
    assert steps[0]["lr"] == pytest.approx(lr * lr_factor(2, 2, 4), rel=1e-6)
