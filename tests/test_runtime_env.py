"""What a job uploads: `ray job submit --runtime-env jobs/runtime_env.yaml` zips the checkout as its
working_dir. After a checkout has been used (a demo, a training run, a sweep, the benchmarks), its output
folders must stay out of the upload (Ray refuses a working_dir over 500 MiB, and a sweep's checkpoints
reach that), and out of git."""

from __future__ import annotations

import shutil
import subprocess
import zipfile

import yaml

from hlip_ray.config import Config
from tests.conftest import REPO_ROOT

# The folders a used checkout holds that the user did not name: what the commands write by default (the
# config's defaults; `hlip-ray demo --out`, benchmarks/bench_data.py and bench_relevance.py --work).
OUTPUT_FOLDERS = sorted({Config().train.storage_path, Config().train.log_dir, Config().tune.storage_path,
                         "demo_out", "bench_out", "bench_relevance_out", ".venv", "site"})


def test_a_used_checkouts_job_upload_holds_the_code_and_configs_only(tmp_path):
    from ray._private.runtime_env.packaging import create_package

    checkout = tmp_path / "checkout"
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    for name in tracked:
        if (REPO_ROOT / name).is_file():
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, checkout / name)
    code_bytes = sum((checkout / name).stat().st_size for name in tracked if (checkout / name).is_file())
    for folder in OUTPUT_FOLDERS:   # 8 MiB of incompressible "checkpoint" in each
        (checkout / folder / "run" / "checkpoint_000010").mkdir(parents=True)
        (checkout / folder / "run" / "checkpoint_000010" / "model.safetensors").write_bytes(bytes(range(256)) * 32768)

    excludes = yaml.safe_load((REPO_ROOT / "jobs" / "runtime_env.yaml").read_text())["excludes"]
    package = tmp_path / "package.zip"
    # .gitignore apart (Ray reads it too, unless RAY_RUNTIME_ENV_IGNORE_GITIGNORE is set): the excludes alone.
    create_package(str(checkout), package, include_gitignore=False, excludes=excludes)
    names = zipfile.ZipFile(package).namelist()
    assert not [name for name in names if name.split("/")[0] in OUTPUT_FOLDERS]
    assert "jobs/configs/smoke.yaml" in names and "hlip_ray/cli.py" in names
    assert package.stat().st_size < code_bytes + (1 << 20)


def test_git_ignores_the_default_output_folders():
    ignored = subprocess.run(["git", "check-ignore", *[f"{folder}/x" for folder in OUTPUT_FOLDERS]], cwd=REPO_ROOT,
                             capture_output=True, text=True).stdout.split()
    assert sorted(path.removesuffix("/x") for path in ignored) == OUTPUT_FOLDERS
