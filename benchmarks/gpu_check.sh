#!/usr/bin/env bash
# The GPU check: one prepared run for the day a session is lent a GPU (one H100 or H200), at most 8 minutes,
# printing ONE JSON line on stdout (progress on stderr):
#   (a) benchmarks/bench_encoder.py --device cuda: the ViT-B h2 recipe's training step in bf16, its MFU,
#       and sdpa against flash-attn's varlen kernel where flash-attn imports ("flash_attn": "unavailable"
#       otherwise); benchmarks/bench_gradcache.py --device cuda: the gradient cache at 1-8 chunks and MFU;
#   (b) 20 bf16 training steps of a small config through the gradient-cache step with torch's AdamW
#       (no DeepSpeed, no Ray): the loss finite and decreasing, steps/s;
#   (c) zero-shot scoring (hlip_ray/eval/zeroshot.py) of synthetic studies with the model on the GPU:
#       its time, and its scores against the same model's on the CPU (fp32, atol 1e-4).
# "ok" is true when every part ran and passed; "failures" says what did not; the exit status is 0 when ok.
# Every part runs with a time limit of its own, so a part that hangs costs only its share.
#
# The GPU machine has PyTorch, timm, transformers, numpy, PyYAML and scikit-learn, but no Ray, DeepSpeed
# or pydantic, and no network. Nothing here imports Ray or DeepSpeed; pydantic (for hlip_ray.config) and
# MiniLM's tokenizer come as files carried with the working tree, gathered on the CPU machine first:
#
#   bash benchmarks/gpu_wheels.sh                 # -> benchmarks/.gpu_carry/ (ignored by git, about 11 MiB)
#
# then the session with a lent GPU makes this one device `run` call:
#
#   run(command="bash benchmarks/gpu_check.sh > $OUT/gpu_check.json 2> $OUT/gpu_check.log; rc=$?;
#                tail -c 5000 $OUT/gpu_check.log; echo; cat $OUT/gpu_check.json; exit $rc",
#       carry=["benchmarks/.gpu_carry"], timeout_s=540)
#
# and reads the line in files_at/gpu_check.json (the whole log beside it). The text tower gets random
# weights (MiniLM's own are too large to carry): FLOPs and timings are those of the real model.
#
# A dry run on a CPU, tiny sizes, same code paths (what tests/test_benchmarks.py runs):
#   GPU_CHECK_DEVICE=cpu PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh
# Settings: GPU_CHECK_DEVICE (cuda), PYTHON (python3), GPU_CHECK_CARRY (benchmarks/.gpu_carry).
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEVICE=${GPU_CHECK_DEVICE:-cuda}
PYTHON=${PYTHON:-python3}
CARRY=${GPU_CHECK_CARRY:-$ROOT/benchmarks/.gpu_carry}
STARTED=$(date +%s)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

log() { echo "[gpu_check $(date +%T)] $*" >&2; }

# step NAME LIMIT_S COMMAND...: stdout to WORK/NAME.json, stderr to WORK/NAME.err and this script's stderr,
# exit status to WORK/NAME.rc; killed after LIMIT_S seconds.
step() {
    local name=$1 limit=$2
    shift 2
    log "$name (at most ${limit} s): $*"
    echo "$limit" > "$WORK/$name.limit"
    timeout -k 10 "$limit" "$@" > "$WORK/$name.json" 2> >(tee "$WORK/$name.err" >&2)
    local rc=$?
    echo "$rc" > "$WORK/$name.rc"
    log "$name: exit status $rc after $(($(date +%s) - STARTED)) s in all"
    return "$rc"
}

# Sizes: the benchmarks' own GPU defaults (ViT-B, 48x224x224) with fewer repeats; tiny ones on a CPU.
if [ "$DEVICE" = cuda ]; then
    ENCODER_ARGS=(--device cuda --repeats 5)
    TEXT_ARGS=()
    CHECK_STEPS=20
    GRADCACHE_ARGS=(--device cuda --repeats 3)
    LIMITS=(45 120 170 110)   # text tower, encoder, gradient cache, checks: 445 s at most, and the set-up
else
    ENCODER_ARGS=(--device cpu --embed-dim 24 --heads 2 --depth 3 --grid 16 32 32 --scans 2 --repeats 1
                  --mixed-grid 16 32 32 --mixed-batch 3 --mixed-slots 4 --mem-repeats 0)
    GRADCACHE_ARGS=(--device cpu --repeats 1 --chunk 1 --skip-memory model.depth=3 model.embed_dim=24
                    model.num_heads=2 model.projection_dim=16 data.grid=[16,32,32] data.scans_per_study=2
                    model.patch_size=[8,16,16] model.text.context_length=16)
    TEXT_ARGS=(--tiny)
    CHECK_STEPS=8
    LIMITS=(180 240 240 240)   # generous: a busy 2-core machine
fi

# What the machine lacks (pydantic, maybe PyYAML), from the carried wheels of this Python.
install_missing() {
    if "$PYTHON" -c 'import pydantic, yaml' 2>/dev/null; then
        echo '{"carried": "none needed"}'
        return 0
    fi
    local tag wheels
    tag=cp$("$PYTHON" -c 'import sys; print("%d%d" % sys.version_info[:2])')
    shopt -s nullglob
    wheels=("$CARRY"/wheels/any/*.whl "$CARRY/wheels/$tag"/*.whl)
    shopt -u nullglob
    if [ ! -d "$CARRY/wheels/$tag" ]; then
        echo "no carried wheels for $tag in $CARRY: run bash benchmarks/gpu_wheels.sh and carry the folder" >&2
        return 1
    fi
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
        --target "$WORK/site" "${wheels[@]}" >&2 || return 1
    printf '{"carried": ['
    local first=1 wheel
    for wheel in "${wheels[@]}"; do
        [ $first = 1 ] || printf ', '
        printf '"%s"' "$(basename "$wheel")"
        first=0
    done
    printf ']}\n'
}

log "device $DEVICE, $("$PYTHON" --version 2>&1), work in $WORK"
install_missing > "$WORK/setup.json" 2> >(tee "$WORK/setup.err" >&2)
echo $? > "$WORK/setup.rc"
[ -d "$WORK/site" ] && export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

TEXT_SOURCE=()
[ -f "$CARRY/text/config.json" ] && TEXT_SOURCE=(--source "$CARRY/text")
TEXT="$WORK/text-tower"
step text_tower "${LIMITS[0]}" "$PYTHON" "$ROOT/benchmarks/gpu_check.py" text-tower "$TEXT" "${TEXT_SOURCE[@]}" \
    "${TEXT_ARGS[@]}"

step encoder "${LIMITS[1]}" "$PYTHON" "$ROOT/benchmarks/bench_encoder.py" "${ENCODER_ARGS[@]}"
step gradcache "${LIMITS[2]}" "$PYTHON" "$ROOT/benchmarks/bench_gradcache.py" "${GRADCACHE_ARGS[@]}" \
    "model.text.name_or_path=$TEXT"
step checks "${LIMITS[3]}" "$PYTHON" "$ROOT/benchmarks/gpu_check.py" checks --device "$DEVICE" --text "$TEXT" \
    --steps "$CHECK_STEPS"

"$PYTHON" "$ROOT/benchmarks/gpu_check.py" report "$WORK" --started "$STARTED" --device "$DEVICE"
