"""The layers of ../shared/DESIGN.md, as executable documentation: each layer imported alone, in a
fresh interpreter, and what it must never pull in.

    config -> text_source -> model -> data -> eval -> train -> cli

(``layouts`` is plain Python below them all; ``demo`` is a tool beside them, used by nobody in
the layers.)
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import pytest

import hlip_ray
from tests.conftest import REPO_ROOT

# package (every module in it imported) -> modules that must not be loaded afterwards
NEVER = {
    "hlip_ray.config": ["torch", "ray", "hlip_ray.model", "hlip_ray.data"],
    "hlip_ray.text_source": ["torch", "ray", "pydantic", "hlip_ray.config", "hlip_ray.model"],
    # what the GPU machine has: torch, timm, transformers (no Ray, DeepSpeed, pydantic or flash-attn)
    "hlip_ray.model": ["ray", "deepspeed", "pydantic", "flash_attn", "hlip_ray.config", "hlip_ray.data",
                       "hlip_ray.train", "hlip_ray.eval"],
    "hlip_ray.data": ["deepspeed", "hlip_ray.model", "hlip_ray.train", "hlip_ray.eval", "hlip_ray.demo",
                      "timm"],
    "hlip_ray.eval": ["deepspeed", "hlip_ray.train", "hlip_ray.tune", "hlip_ray.demo"],
    "hlip_ray.train": ["hlip_ray.tune", "hlip_ray.demo"],
}


def modules_of(package: str) -> list[str]:
    """The package and every module in it (a module file is imported on its own too)."""
    module = __import__(package, fromlist=["_"])
    if not hasattr(module, "__path__"):
        return [package]
    return [package] + [f"{package}.{info.name}" for info in pkgutil.walk_packages(module.__path__)]


@pytest.fixture(scope="module")
def loaded() -> dict[str, set[str]]:
    """Layer -> the modules loaded after importing every module of it, each layer in its own fresh
    interpreter, all at once."""
    runs = {}
    for package in NEVER:
        code = (f"import importlib, json, sys\nfor name in {modules_of(package)!r}: importlib.import_module(name)\n"
                "print(json.dumps(sorted(sys.modules)))")
        runs[package] = subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True)
    out = {}
    for package, run in runs.items():
        stdout, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, stderr[-3000:]
        out[package] = set(json.loads(stdout.splitlines()[-1]))
    return out


@pytest.mark.parametrize("package", sorted(NEVER))
def test_a_layer_never_imports_what_sits_above_it(package, loaded):
    imported = sorted(name for name in NEVER[package] if name in loaded[package])
    assert not imported, f"importing {package} loads {imported}"


def test_every_module_belongs_to_a_layer():
    """A new module lands in a layer the test above checks (or is one of the few top-level ones)."""
    top_level = {"hlip_ray.cli", "hlip_ray.layouts", "hlip_ray.ray_runtime", "hlip_ray.demo"}
    for info in pkgutil.iter_modules(hlip_ray.__path__):
        name = f"hlip_ray.{info.name}"
        assert name in NEVER or name in top_level, f"{name}: which layer is it? (tests/test_layers.py)"


def test_no_module_imports_one_that_imports_it_back():
    """No import loops, lazy (in-function) imports counted: a loop is a knot between two modules."""
    import ast

    root = REPO_ROOT / "hlip_ray"
    modules = {".".join(path.relative_to(REPO_ROOT).with_suffix("").parts).removesuffix(".__init__"): path
               for path in root.rglob("*.py")}
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            # (a module's own package is not a loop: ``from hlip_ray.model import randomness`` in a model module)
            edges[name] |= {target for target in targets
                            if target in modules and target != name and not name.startswith(target + ".")}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(nxt == goal or (nxt not in seen and not seen.add(nxt) and reaches(nxt, goal, seen))
                   for nxt in edges[start])

    loops = sorted((a, b) for a in edges for b in edges[a] if a < b and reaches(b, a, set()))
    assert not loops
    assert edges["hlip_ray.train.loop"] and edges["hlip_ray.data.streams"]   # the scan did find imports
