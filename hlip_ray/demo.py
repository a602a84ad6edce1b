"""The embedded end-to-end job that ``make demo`` runs on a CPU machine.

What exists so far: build the CLIP model from ``jobs/configs/demo.yaml`` (the text tower is
the packaged, offline all-MiniLM-L6-v2), generate a few studies with varying numbers of scans,
encode studies and reports, and time a training step of the hierarchical layout against a
plain ViT. The last line printed is one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from hlip_ray.config import load_config
from hlip_ray.model import build_model, load_tokenizer

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "demo.yaml"

REPORTS = [
    "Hyperdense lesion in the left frontal lobe.",
    "No acute intracranial abnormality.",
    "Hypodense focus in the right parietal lobe, likely chronic infarct.",
    "Mass with midline shift to the left.",
]


def generated_studies(count: int, scans_max: int, grid: list[int], seed: int = 0):
    """``count`` studies of 1..scans_max uint8 scans of smooth noise: pixels, scan_mask."""
    gen = torch.Generator().manual_seed(seed)
    scans = torch.randint(1, scans_max + 1, (count,), generator=gen)
    coarse = torch.rand(count, scans_max, 1, *(g // 8 for g in grid), generator=gen)
    smooth = torch.nn.functional.interpolate(coarse.flatten(0, 1), size=tuple(grid), mode="trilinear")
    pixels = (smooth * 255).to(torch.uint8).view(count, scans_max, 1, *grid)
    scan_mask = torch.arange(scans_max)[None, :] < scans[:, None]
    return pixels, scan_mask


def _train_step_seconds(model, pixels, scan_mask, repeats: int = 2) -> float:
    model.train()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.encode_study(pixels, scan_mask).sum().backward()
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return min(times)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEMO_CONFIG))
    parser.add_argument("--studies", type=int, default=8)
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.depth=3")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    torch.manual_seed(0)

    config = load_config(args.config, args.overrides)
    model = build_model(config).eval()
    tokenizer = load_tokenizer(config.model.text.name_or_path)
    pixels, scan_mask = generated_studies(args.studies, config.data.scans_per_study, config.data.grid)
    reports = [REPORTS[i % len(REPORTS)] for i in range(args.studies)]
    tokens = tokenizer(reports, padding="max_length", truncation=True,
                       max_length=config.model.text.context_length, return_tensors="pt")

    with torch.no_grad():
        start = time.perf_counter()
        study_embeddings = model.encode_study(pixels, scan_mask)
        encode_s = time.perf_counter() - start
        text_embeddings = model.encode_text(tokens["input_ids"], tokens["attention_mask"])
    similarity = study_embeddings @ text_embeddings.T

    full = load_config(args.config, [*args.overrides, "model.attention_layout=full"])
    plain = build_model(full, text_weights=False)
    plain.visual.load_state_dict(model.visual.state_dict())
    step_hier = _train_step_seconds(model, pixels, scan_mask)
    step_full = _train_step_seconds(plain, pixels, scan_mask)

    grid = config.data.grid
    tokens_per_scan = 1
    for size, patch in zip(grid, config.model.patch_size):
        tokens_per_scan *= size // patch
    print(f"model: {config.model.attention_layout} layout, depth {config.model.depth}, "
          f"width {config.model.embed_dim}; text tower {config.model.text.name_or_path}")
    print(f"studies: {args.studies}, real scans per study {scan_mask.sum(1).tolist()} "
          f"(K = {scan_mask.shape[1]} slots), {tokens_per_scan} tokens per {grid} scan")
    print(f"study embeddings {tuple(study_embeddings.shape)}, report embeddings "
          f"{tuple(text_embeddings.shape)}, similarity {tuple(similarity.shape)}")
    print(f"encode {args.studies} studies: {encode_s:.3f} s; training step "
          f"{config.model.attention_layout}: {step_hier:.3f} s, full attention: {step_full:.3f} s")
    figures = {
        "studies": args.studies,
        "real_scans": int(scan_mask.sum()),
        "study_embedding_shape": list(study_embeddings.shape),
        "text_embedding_shape": list(text_embeddings.shape),
        "encode_s": round(encode_s, 4),
        "train_step_s": round(step_hier, 4),
        "train_step_full_attention_s": round(step_full, 4),
        "wall_s": round(time.perf_counter() - started, 2),
    }
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
