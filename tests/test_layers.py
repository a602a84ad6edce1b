"""The layers of ../shared/DESIGN.md, as executable documentation: what each layer must never pull in.

    config -> text_source -> model -> data -> eval -> inference -> train -> cli

(``layouts``, ``named_models``, ``progress`` and ``storage`` are plain Python below them all; ``demo`` is a tool
beside them that no layer uses.)
Each layer is imported in a fresh interpreter, where what it loads, third-party libraries included,
is checked; and every import in the package's source, lazy (in-function) ones included, is read, so a
module that would reach a layer above it only when a function runs is caught too.
"""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys

import pytest

import hlip_ray
from tests.conftest import REPO_ROOT

# layer -> what importing it (every module in it) must never load
NEVER = {
    "hlip_ray.config": ["torch", "ray", "hlip_ray.text_source", "hlip_ray.model", "hlip_ray.data"],
    "hlip_ray.config_reference": ["torch", "ray", "hlip_ray.text_source", "hlip_ray.model", "hlip_ray.data"],
    # a run checkpoint's format: what the trainer writes and evaluation and inference read, on config and storage
    "hlip_ray.run_checkpoint": ["torch", "ray", "hlip_ray.model", "hlip_ray.data", "hlip_ray.train", "hlip_ray.eval",
                                "hlip_ray.inference"],
    "hlip_ray.text_source": ["torch", "ray", "pydantic", "hlip_ray.config", "hlip_ray.model"],
    # what the GPU machine has: torch, timm, transformers (no Ray, DeepSpeed, pydantic or flash-attn)
    "hlip_ray.model": ["ray", "deepspeed", "pydantic", "flash_attn", "hlip_ray.config", "hlip_ray.data",
                       "hlip_ray.train", "hlip_ray.eval", "hlip_ray.inference", "hlip_ray.demo"],
    "hlip_ray.data": ["deepspeed", "timm", "hlip_ray.model", "hlip_ray.train", "hlip_ray.eval", "hlip_ray.inference",
                      "hlip_ray.demo"],
    "hlip_ray.eval": ["deepspeed", "hlip_ray.inference", "hlip_ray.train", "hlip_ray.tune", "hlip_ray.demo"],
    "hlip_ray.inference": ["deepspeed", "hlip_ray.train", "hlip_ray.tune", "hlip_ray.demo"],
    "hlip_ray.train": ["hlip_ray.tune", "hlip_ray.demo", "hlip_ray.cli"],
    "hlip_ray.tune": ["hlip_ray.demo", "hlip_ray.cli"],
    # files and objects, below every layer: the standard library, pyarrow, boto3
    "hlip_ray.storage": ["torch", "ray", "pydantic", "hlip_ray.config", "hlip_ray.data", "hlip_ray.model",
                         "hlip_ray.train", "hlip_ray.eval"],
    # a bar or lines: the standard library, and tqdm once a bar is drawn
    "hlip_ray.progress": ["torch", "ray", "pydantic", "numpy", "hlip_ray.config", "hlip_ray.data", "hlip_ray.train",
                          "hlip_ray.eval"],
    # the spot watcher runs beside training on every worker node: standard library only, a few MB
    "hlip_ray.spot": ["torch", "ray", "pydantic", "numpy", "hlip_ray.config", "hlip_ray.data", "hlip_ray.train"],
}
TOP_LEVEL = {"hlip_ray.cli", "hlip_ray.layouts", "hlip_ray.named_models", "hlip_ray.ray_runtime", "hlip_ray.demo"}


def modules_of(package: str) -> list[str]:
    """The package and every module in it (a module file is imported on its own too)."""
    module = __import__(package, fromlist=["_"])
    if not hasattr(module, "__path__"):
        return [package]
    return [package] + [f"{package}.{info.name}" for info in pkgutil.walk_packages(module.__path__)]


def source_imports() -> dict[str, set[str]]:
    """hlip_ray module -> the hlip_ray modules its source imports anywhere (top level or in a function).

    A module's own package is left out (``from hlip_ray.model import randomness`` in a model module),
    and so are imports for type checkers only (``if TYPE_CHECKING:``).
    """
    root = REPO_ROOT / "hlip_ray"
    modules = {".".join(path.relative_to(REPO_ROOT).with_suffix("").parts).removesuffix(".__init__"): path
               for path in root.rglob("*.py")}
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in _runtime_nodes(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            edges[name] |= {target for target in targets
                            if target in modules and target != name and not name.startswith(target + ".")}
    return edges


def _runtime_nodes(tree: ast.AST):
    """Every node of a module but those under ``if TYPE_CHECKING:``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            continue
        yield node
        yield from _runtime_nodes(node)


def reachable(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in edges[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


# Fresh interpreters, each importing layers in order: a layer's check reads what was loaded once it
# and those before it in its sequence were imported. A lower layer only adds what the higher one
# imports anyway (eval imports data; the model reads text towers through text_source), so this is as
# strict as one interpreter per layer, with fewer of them. (The trainer's and the sweeps' rules are all about
# hlip_ray's own modules: the source check below covers them.)
SEQUENCES = [["hlip_ray.config", "hlip_ray.config_reference", "hlip_ray.run_checkpoint"],
             ["hlip_ray.progress", "hlip_ray.storage"],
             ["hlip_ray.text_source", "hlip_ray.model"], ["hlip_ray.data", "hlip_ray.eval", "hlip_ray.inference"],
             ["hlip_ray.spot"]]


@pytest.fixture(scope="module")
def loaded() -> dict[str, set[str]]:
    """Layer -> the modules loaded once every module of it (and of those before it in its sequence)
    was imported in a fresh interpreter; the sequences run at once."""
    code = ("import importlib, json, sys\nfor layer, names in json.loads(sys.argv[1]):\n"
            "    for name in names: importlib.import_module(name)\n"
            "    print(json.dumps([layer, sorted(sys.modules)]))")
    runs = []
    for sequence in SEQUENCES:
        layers = json.dumps([[layer, modules_of(layer)] for layer in sequence])
        runs.append(subprocess.Popen([sys.executable, "-c", code, layers], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True))
    out = {}
    for run in runs:
        stdout, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, stderr[-3000:]
        for line in stdout.splitlines():
            layer, modules = json.loads(line)
            out[layer] = set(modules)
    return out


@pytest.mark.parametrize("package", sorted(set(NEVER) - {"hlip_ray.train", "hlip_ray.tune"}))
def test_importing_a_layer_never_loads_what_sits_above_it(package, loaded):
    imported = sorted(name for name in NEVER[package] if name in loaded[package])
    assert not imported, f"importing {package} loads {imported}"


@pytest.mark.parametrize("package", sorted(NEVER))
def test_no_import_in_a_layers_source_reaches_what_sits_above_it(package):
    edges = source_imports()
    own = [name for name in edges if name == package or name.startswith(package + ".")]
    reached = set().union(*(reachable(edges, name) for name in own))
    above = sorted(name for name in reached if any(name == never or name.startswith(never + ".")
                                                   for never in NEVER[package]))
    assert not above, f"{package} imports {above}"


def test_no_module_imports_one_that_imports_it_back():
    """No import loops, lazy imports counted: a loop is a knot between two modules."""
    edges = source_imports()
    loops = sorted((a, b) for a in edges for b in edges[a] if a < b and a in reachable(edges, b))
    assert not loops
    assert edges["hlip_ray.train.loop"] and edges["hlip_ray.data.streams"]   # the scan did find imports


def test_every_module_belongs_to_a_layer():
    """A new module lands in a layer the tests above check (or is one of the few top-level ones)."""
    for info in pkgutil.iter_modules(hlip_ray.__path__):
        name = f"hlip_ray.{info.name}"
        assert name in NEVER or name in TOP_LEVEL, f"{name}: which layer is it? (tests/test_layers.py)"
