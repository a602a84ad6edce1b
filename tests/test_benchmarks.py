"""``benchmarks/gpu_check.sh``, the prepared check for a lent GPU, runs where Ray and DeepSpeed are missing
(as on the GPU machine): its CPU dry run, in fresh processes that cannot import them (nor the data plane's
packages, also missing there), prints one JSON line with every part's figures."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What the lent GPU machine lacks and the project's environment has: made unimportable in every process
# (a None in sys.modules makes an import fail).
MISSING_ON_THE_GPU_MACHINE = ("ray", "deepspeed", "pydicom", "nibabel", "boto3")
SITECUSTOMIZE = f"import sys\nfor name in {MISSING_ON_THE_GPU_MACHINE!r}:\n    sys.modules[name] = None\n"


def gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_gpu_check_report_names_each_part_that_failed_or_did_not_run(tmp_path):
    """The report is one JSON line whatever happened: a step that timed out, one that failed and one that
    never ran are each named in ``failures``, with the end of the step's stderr."""
    gpu_check = gpu_check_module()
    (tmp_path / "setup.rc").write_text("0\n")
    (tmp_path / "setup.json").write_text('{"carried": "none needed"}\n')
    (tmp_path / "text_tower.rc").write_text("0\n")
    (tmp_path / "encoder.rc").write_text("124\n")
    (tmp_path / "encoder.limit").write_text("120\n")
    (tmp_path / "encoder.err").write_text("warm-up h2\n")
    (tmp_path / "gradcache.rc").write_text("1\n")
    (tmp_path / "gradcache.err").write_text("Traceback ...\nImportError: no pydantic\n")
    report = gpu_check.make_report(tmp_path, started=0.0, device="cuda")
    assert report["ok"] is False and report["carried"] == "none needed"
    assert report["failures"] == ["encoder: timed out after 120 s", "gradcache: exit status 1", "checks: did not run"]
    assert report["encoder"]["stderr_tail"] == "warm-up h2\n"
    assert "no pydantic" in report["gradcache"]["stderr_tail"]
    json.dumps(report)


@pytest.mark.slow
def test_the_gpu_check_dry_runs_on_cpu_without_ray_or_deepspeed(tmp_path):
    """``GPU_CHECK_DEVICE=cpu``: every part runs (tiny sizes) in processes where importing Ray or DeepSpeed
    fails, and the script prints one parseable JSON line: the encoder and gradient-cache benchmarks,
    bf16 training steps whose loss is finite and falls, and zero-shot scores equal to the CPU's."""
    poison = tmp_path / "poison"
    poison.mkdir()
    (poison / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {**os.environ, "PYTHONPATH": str(poison), "GPU_CHECK_DEVICE": "cpu", "PYTHON": sys.executable,
           "GPU_CHECK_CARRY": str(tmp_path / "nothing-carried"), "TMPDIR": str(tmp_path)}
    for name in MISSING_ON_THE_GPU_MACHINE:   # the poison works in a fresh process
        blocked = subprocess.run([sys.executable, "-c", f"import {name}"], env=env, capture_output=True, text=True)
        assert blocked.returncode != 0 and f"import of {name} halted" in blocked.stderr

    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=1200)
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stderr[-4000:]
    result = json.loads(lines[0])
    assert result["ok"] and done.returncode == 0, (result["failures"], done.stderr[-4000:])
    assert {"check", "ok", "failures", "device", "versions", "summary", "encoder", "gradcache", "train_bf16",
            "zeroshot", "wall_s"} <= set(result)
    assert result["device"].startswith("cpu") and result["carried"] == "none needed"

    encoder = result["encoder"]
    assert encoder["flash_attn"] == "unavailable" and encoder["mfu_h2"] is None   # MFU needs a GPU's peak
    assert encoder["tflop_per_step_h2"] > 0 and set(encoder["seconds_per_step"]) >= {"h2", "full"}
    assert set(result["gradcache"]["seconds_per_step"]) == {"1_chunks", "2_chunks", "4_chunks", "8_chunks", "plain_4"}

    train = result["train_bf16"]
    assert train["steps"] == 8 and train["autocast_dtypes"] == ["torch.bfloat16"]
    assert train["param_dtype"] == "torch.float32" and train["loss_finite"] and train["loss_decreasing"]
    assert train["steps_per_s"] > 0 and len(train["losses"]) == 8

    zeroshot = result["zeroshot"]
    assert zeroshot["matches_cpu"] and zeroshot["max_abs_diff_vs_cpu"] <= zeroshot["atol"]
    assert zeroshot["studies"] == 12 and zeroshot["seconds"] > 0
    assert result["summary"]["train_bf16_loss_decreasing"] is True
    assert not list(tmp_path.glob("gpu_check.*"))   # its work folder is removed
