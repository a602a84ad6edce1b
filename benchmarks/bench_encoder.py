"""Benchmark of the hierarchical study encoder: attention layouts, and masked vs repeat-filled
batches. Prints ONE JSON line on stdout (progress goes to stderr).

Figures, all measured side by side in one run (timings interleaved over repeats, medians):

1. training-step time (forward + backward, train mode) of layouts h2 and h3 over "full";
2. peak training-step memory h2 / full, with the default (fused) and the math SDPA kernel;
3. a batch of studies with 1..K real scans (P(n) ~ 1/n): the masked encoder, which tokenises
   only real scans, against HLIP's repeat fill (every slot filled by repeating the study's own
   scans): useful-token throughput and peak-memory ratios;
4. the h2 step's FLOPs (PyTorch's FLOP counter) and, on cuda, its model FLOPs utilisation (MFU,
   against ``--peak-tflops``, by default the device's dense bf16 peak by name); and the h2 step
   with flash-attn's varlen kernel (``model.attention_backend=flash_varlen``) beside the default
   sdpa buckets where flash-attn can be imported (``"flash_attn": "unavailable"`` otherwise).

Memory: on cuda the growth of ``max_memory_allocated`` over the memory allocated before the
step; on cpu the growth of peak RSS (``ru_maxrss``) during one step, each measurement in a
fresh subprocess (this script re-invoked with a hidden ``--_measure-memory`` option).

Smoke run: ``python benchmarks/bench_encoder.py --grid 16 64 64 --scans 2 --depth 3
--repeats 1 --mixed-grid 16 32 32 --mixed-batch 3``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import timm
import torch
from measure import MIB, current_rss_bytes, device_name, log, maxrss_bytes, mfu, peak_bf16_tflops, ratio, sync
from torch.nn.attention import SDPBackend, sdpa_kernel

from hlip_ray.layouts import expand_layout
from hlip_ray.model import StudyEncoder

GOALS = {"h2_time": 0.60, "throughput": 1.5, "mem_repeat_fill": 0.70}


# -- one case: a model and its input, built deterministically from a JSON-able dict ----------
def build_case(case: dict, device: torch.device):
    """``case`` -> (model in train mode, (pixels, scan_mask, study_seeds)) on ``device``."""
    torch.manual_seed(case["seed"])  # identical weights whatever the layout
    model = StudyEncoder(
        grid=case["grid"],
        patch_size=case["patch"],
        attention_levels=expand_layout(case["layout"], case["depth"]),
        embed_dim=case["embed_dim"],
        num_heads=case["heads"],
        attention_backend=case.get("backend", "sdpa"),
    ).to(device).train()
    counts, slots = case["scan_counts"], case["slots"]
    gen = torch.Generator().manual_seed(case["seed"] + 1)
    pixels = torch.zeros(len(counts), slots, 1, *case["grid"], dtype=torch.uint8)
    mask = torch.zeros(len(counts), slots, dtype=torch.bool)
    for row, count in enumerate(counts):
        scans = torch.randint(0, 256, (count, 1, *case["grid"]), generator=gen, dtype=torch.uint8)
        if case["fill"] == "repeat":  # HLIP: slot k holds scan k mod n, every slot real
            pixels[row] = scans[torch.arange(slots) % count]
            mask[row] = True
        else:  # masked: the n real scans first, zero padding after
            pixels[row, :count] = scans
            mask[row, :count] = True
    seeds = list(range(len(counts)))  # same slot-embedding draws in every case
    return model, (pixels.to(device), mask.to(device), seeds)


def train_step(model, batch, case: dict, device: torch.device) -> None:
    """One forward + backward of ``encoder(...).sum()`` (grads reset first)."""
    model.zero_grad(set_to_none=True)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if case["bf16"]
        else contextlib.nullcontext()
    )
    kernel = sdpa_kernel(SDPBackend.MATH) if case["kernel"] == "math" else contextlib.nullcontext()
    with autocast, kernel:
        loss = model(*batch[:2], study_seeds=batch[2]).float().sum()
    loss.backward()


def timed_step(model, batch, case: dict, device: torch.device) -> float:
    """Seconds of one training step."""
    sync(device)
    start = time.perf_counter()
    train_step(model, batch, case, device)
    sync(device)
    return time.perf_counter() - start


def step_flops(model, batch, case: dict, device: torch.device) -> float:
    """FLOPs of one training step as PyTorch's FLOP counter sees them (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        train_step(model, batch, case, device)
    return float(counter.get_total_flops())


def flash_attn_version() -> str | None:
    """flash-attn's version where it can be imported (the ``gpu`` extra), else None."""
    try:
        import flash_attn
    except Exception:  # ImportError, or a build that does not match this torch
        return None
    return getattr(flash_attn, "__version__", "unknown")


def measure_step_memory(case: dict, device: torch.device) -> dict:
    """Peak memory growth of one training step in this process (no warm-up step before it).

    cpu: ``ru_maxrss`` after the step minus ``ru_maxrss`` after building model and input;
    ``baseline_gap`` is how far that baseline high-water mark sits above the RSS actually in
    use then (the figure can be underestimated by at most that much).
    """
    model, batch = build_case(case, device)
    gc.collect()
    if device.type == "cuda":
        sync(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        try:
            train_step(model, batch, case, device)
        except torch.OutOfMemoryError:
            log(f"out of memory: {case['name']}")
            return {"peak_bytes": None, "oom": True}
        sync(device)
        return {"peak_bytes": torch.cuda.max_memory_allocated(device) - before}
    before, in_use = maxrss_bytes(), current_rss_bytes()
    train_step(model, batch, case, device)
    gap = None if in_use is None else max(0, before - in_use)
    return {"peak_bytes": maxrss_bytes() - before, "baseline_gap": gap}


def peak_step_memory(case: dict, device: torch.device) -> dict:
    """``measure_step_memory`` in-process on cuda, in a fresh interpreter on cpu."""
    if device.type == "cuda":
        result = measure_step_memory(case, device)
        gc.collect()
        torch.cuda.empty_cache()
        return result
    command = [sys.executable, str(Path(__file__).resolve()), "--_measure-memory", json.dumps(case)]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the run ----------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--embed-dim", type=int, help="default: 192 on cpu, 768 on cuda")
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--heads", type=int, help="default: 3 on cpu, 12 on cuda")
    parser.add_argument("--patch", type=int, nargs=3, default=(8, 16, 16))
    parser.add_argument("--grid", type=int, nargs=3, default=(48, 224, 224),
                        help="per-scan size (D H W), layout comparison")
    parser.add_argument("--scans", type=int, help="real scans per study, layout comparison "
                        "(default: 4 on cpu, 8 on cuda)")
    parser.add_argument("--batch", type=int, default=1, help="studies, layout comparison")
    parser.add_argument("--mixed-grid", type=int, nargs=3,
                        help="per-scan size, masked vs repeat fill "
                        "(default: 24 112 112 on cpu, 48 224 224 on cuda)")
    parser.add_argument("--mixed-batch", type=int, default=8, help="studies, masked vs repeat fill")
    parser.add_argument("--mixed-slots", type=int, default=8, help="K: scan slots per study")
    parser.add_argument("--repeats", type=int, help="timed steps per case (default: 3 cpu, 10 cuda)")
    parser.add_argument("--mem-repeats", type=int, default=1, help="memory measurements per case (0: none)")
    parser.add_argument("--peak-tflops", type=float, help="device peak bf16 TFLOPS for MFU (default: by name)")
    parser.add_argument("--flash", choices=("auto", "off"), default="auto",
                        help="auto: time h2 with flash-attn's varlen kernel too, on cuda where flash-attn imports")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="auto: bf16 autocast on cuda, fp32 on cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--_measure-memory", dest="measure_memory", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    args.embed_dim = args.embed_dim or (768 if cuda else 192)
    args.heads = args.heads or (12 if cuda else 3)
    args.scans = args.scans or (8 if cuda else 4)
    args.mixed_grid = args.mixed_grid or ((48, 224, 224) if cuda else (24, 112, 112))
    args.repeats = args.repeats or (10 if cuda else 3)
    args.bf16 = args.precision == "bf16" or (args.precision == "auto" and cuda)
    return args


def make_cases(args, flash: bool = False) -> tuple[dict, dict, list[int]]:
    """Timing cases, memory cases (name -> case dict) and the drawn scan counts; ``flash``: with
    ``h2_flash_varlen``, h2 on flash-attn's varlen kernel."""
    common = {"patch": list(args.patch), "embed_dim": args.embed_dim, "depth": args.depth,
              "heads": args.heads, "bf16": args.bf16, "seed": args.seed, "kernel": "default"}
    layout = {**common, "grid": list(args.grid), "slots": args.scans, "fill": "mask",
              "scan_counts": [args.scans] * args.batch}
    # P(n) ~ 1/n over n = 1..K, from a seeded RNG.
    sizes = np.arange(1, args.mixed_slots + 1)
    rng = np.random.default_rng(args.seed)
    counts = rng.choice(sizes, size=args.mixed_batch, p=(1 / sizes) / (1 / sizes).sum()).tolist()
    mixed = {**common, "grid": list(args.mixed_grid), "slots": args.mixed_slots,
             "layout": "h2", "scan_counts": counts}
    timing = {
        "h2": {**layout, "layout": "h2"},
        "h3": {**layout, "layout": "h3"},
        "full": {**layout, "layout": "full"},
        "masked": {**mixed, "fill": "mask"},
        "repeat_fill": {**mixed, "fill": "repeat"},
    }
    if flash:
        timing["h2_flash_varlen"] = {**timing["h2"], "backend": "flash_varlen"}
    memory = {name: timing[name] for name in ("h2", "full", "masked", "repeat_fill")}
    memory["h2_math"] = {**timing["h2"], "kernel": "math"}
    memory["full_math"] = {**timing["full"], "kernel": "math"}
    for name, case in {**timing, **memory}.items():
        case["name"] = name
    return timing, memory, counts


def at_most(value, goal):
    return None if value is None else value <= goal


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.measure_memory:  # child process of peak_step_memory
        print(json.dumps(measure_step_memory(json.loads(args.measure_memory), device)))
        return
    wall = time.perf_counter()
    torch.manual_seed(args.seed)
    flash_version = flash_attn_version() if device.type == "cuda" and args.flash == "auto" else None
    timing_cases, memory_cases, counts = make_cases(args, flash=flash_version is not None)

    # Memory first: a cpu child's ru_maxrss starts at its parent's peak RSS (the kernel carries
    # it over exec), so the children are started while this process is still small.
    names = list(memory_cases)
    measured = {name: [] for name in names}
    for repeat in range(args.mem_repeats):
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:
            measured[name].append(peak_step_memory(memory_cases[name], device))
            log(f"memory {name}: {measured[name][-1]}")
    peak_mib = {}
    for name, results in measured.items():
        values = [result["peak_bytes"] for result in results]
        peak_mib[name] = None if None in values or not values else round(statistics.median(values) / MIB, 1)
    gaps = [result.get("baseline_gap") or 0 for results in measured.values() for result in results]

    # Timings: one untimed warm-up step per case, then every repeat runs all cases, starting
    # from a different case each time, so drift on a shared machine hits them alike.
    built = {name: build_case(case, device) for name, case in timing_cases.items()}
    names = list(timing_cases)
    seconds = {name: [] for name in names}
    for name in names:
        log(f"warm-up {name}")
        timed_step(*built[name], timing_cases[name], device)
    for repeat in range(args.repeats):
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:
            seconds[name].append(timed_step(*built[name], timing_cases[name], device))
        log(f"repeat {repeat + 1}/{args.repeats}: "
            + ", ".join(f"{name} {seconds[name][-1]:.3f}s" for name in names))
    step_s = {name: statistics.median(values) for name, values in seconds.items()}
    h2_flops = step_flops(*built["h2"], timing_cases["h2"], device)
    h2_mfu = mfu(h2_flops, step_s["h2"], peak_bf16_tflops(device, args.peak_tflops))

    tokens_per_scan = int(np.prod([g // p for g, p in zip(args.mixed_grid, args.patch)]))
    useful_tokens = sum(counts) * tokens_per_scan
    throughput = {name: useful_tokens / step_s[name] for name in ("masked", "repeat_fill")}
    time_h2 = ratio(step_s["h2"], step_s["full"])
    tput = ratio(throughput["masked"], throughput["repeat_fill"])
    mem_fill = ratio(peak_mib["masked"], peak_mib["repeat_fill"])
    tokens_per_study = args.scans * int(np.prod([g // p for g, p in zip(args.grid, args.patch)]))
    result = {
        "device": device_name(device),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "config": {
            "embed_dim": args.embed_dim, "depth": args.depth, "heads": args.heads,
            "patch": list(args.patch), "precision": "bf16 autocast" if args.bf16 else "fp32",
            "layouts": {"grid": list(args.grid), "scans": args.scans, "batch": args.batch,
                        "tokens_per_study": tokens_per_study},
            "mixed": {"grid": list(args.mixed_grid), "slots": args.mixed_slots,
                      "batch": args.mixed_batch, "layout": "h2",
                      "tokens_per_scan": tokens_per_scan},
            "repeats": args.repeats, "mem_repeats": args.mem_repeats, "seed": args.seed,
            "memory_method": ("cuda max_memory_allocated - memory_allocated before the step"
                              if device.type == "cuda" else
                              "peak RSS (ru_maxrss) growth over one step, fresh subprocess"),
        },
        "seconds_per_step": {name: round(value, 4) for name, value in step_s.items()},
        "seconds_per_step_all": {name: [round(v, 4) for v in vs] for name, vs in seconds.items()},
        "time_ratio_h2_vs_full": time_h2,
        "time_ratio_h3_vs_full": ratio(step_s["h3"], step_s["full"]),
        "peak_step_mib": peak_mib,
        "mem_ratio_h2_vs_full": ratio(peak_mib["h2"], peak_mib["full"]),
        "mem_ratio_h2_vs_full_math": ratio(peak_mib["h2_math"], peak_mib["full_math"]),
        "tflop_per_step_h2": float(f"{h2_flops / 1e12:.4g}"),
        "mfu_h2": h2_mfu,
        "flash_attn": flash_version or "unavailable",
        "time_ratio_h2_flash_varlen_vs_sdpa": ratio(step_s.get("h2_flash_varlen"), step_s["h2"]),
        "scan_counts": counts,
        "useful_tokens": useful_tokens,
        "repeat_fill_tokens": args.mixed_batch * args.mixed_slots * tokens_per_scan,
        "useful_tokens_per_s": {name: round(value, 1) for name, value in throughput.items()},
        "useful_tokens_per_s_ratio_vs_repeat_fill": tput,
        "mem_ratio_vs_repeat_fill": mem_fill,
        "goal_h2_time_met": at_most(time_h2, GOALS["h2_time"]),
        "goal_throughput_met": None if tput is None else tput >= GOALS["throughput"],
        "goal_mem_repeat_fill_met": at_most(mem_fill, GOALS["mem_repeat_fill"]),
        "wall_s": round(time.perf_counter() - wall, 1),
    }
    if device.type == "cpu":
        result["memory_baseline_gap_mib_max"] = round(max(gaps, default=0) / MIB, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
