"""What ships: the project built as a wheel and installed in a fresh virtual environment runs what users
run (``hlip-ray --version``, ``hlip-ray demo --help``, ``hlip-ray synth``) from another folder, with the
demo's config inside the package and no test harness in it.

The fresh environment borrows this one's third-party packages through a ``.pth`` line (no network here),
not its editable hlip_ray: ``.pth`` files inside a directory a ``.pth`` line adds are not read, so the
editable install's finder stays out.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from importlib.metadata import version
from pathlib import Path

from tests.conftest import REPO_ROOT

UV = Path(sys.executable).with_name("uv")


def _run(command: list, cwd: Path) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{command}: {done.stdout[-2000:]}{done.stderr[-3000:]}"
    return done


def test_a_wheel_in_a_fresh_venv_runs_version_demo_help_and_synth_from_another_folder(tmp_path):
    source = tmp_path / "source"   # the tracked sources alone: no build/ or egg-info of an earlier build
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    shutil.copytree(REPO_ROOT / "hlip_ray", source / "hlip_ray", ignore=shutil.ignore_patterns("__pycache__"))
    _run([UV, "build", "--offline", "--wheel", "--no-build-isolation", "--python", sys.executable,
          "--out-dir", tmp_path / "dist", source], tmp_path)
    (wheel,) = (tmp_path / "dist").glob("hlip_ray-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "hlip_ray/demo/demo.yaml" in names and "hlip_ray/demo/job.py" in names
    assert not [name for name in names if "spot_drill" in name or name.startswith("tests/")]

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path)
    python = venv / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     tmp_path).stdout.strip())
    (site / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([UV, "pip", "install", "--offline", "--no-deps", "--python", python, wheel], tmp_path)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = "import hlip_ray.demo.job as job; print(job.__file__); print(job.DEMO_CONFIG.is_file())"
    found = _run([python, "-c", code], elsewhere).stdout.split()
    assert found == [str(site / "hlip_ray" / "demo" / "job.py"), "True"]   # the wheel's, with its config
    hlip_ray = venv / "bin" / "hlip-ray"
    assert _run([hlip_ray, "--version"], elsewhere).stdout.strip() == f"hlip-ray {version('hlip-ray')}"
    assert "--studies" in _run([hlip_ray, "demo", "--help"], elsewhere).stdout
    _run([hlip_ray, "synth", "--out", "corpus", "--studies", "2"], elsewhere)
    assert sorted(path.name for path in (elsewhere / "corpus").iterdir() if path.is_dir()) == ["study-0000",
                                                                                            "study-0001"]
