"""Benchmark of relevance maps (``hlip_ray.eval.relevance``): the pointing game on held-out lesions.
Prints ONE JSON line on stdout (progress goes to stderr).

A small model is trained with the platform on the synthetic corpus (``hlip-ray synth``, ``manifest``,
``preprocess`` and ``train`` with ``hlip_ray/demo/demo.yaml`` on local folders), or ``--checkpoint``
names a run checkpoint trained on a corpus that ``--corpus`` holds. Then, for every held-out study
and every label present in it, the label's relevance map over the study's scans is computed, and the
study **hits** when the voxel of peak relevance (over all its scans) lies inside that label's lesion
mask. Chance is the hit rate of a voxel drawn uniformly from the study's scans: the lesion's share of
the study's voxels, averaged over the same (study, label) pairs. Goal: hit rate >= 3x chance. In studies
with several lesions, ``several_lesions`` tells whether a label's peak falls in its own lesion or in
another label's (a map that only found "a lesion" would hit the others as often).

The corpus writes each lesion's mask in its scan's decoded voxel order (``demo/synth.py``); a mask is
brought onto the model grid through the geometry its scan goes through: the scan's decoded axes
(from the two affines), then ``preprocess_volume`` itself (reorientation, resize) on the mask as a
[0, 1] volume, thresholded at 0.5. On every held-out positive scan the benchmark checks that the mapped mask
sits on the lesion: the preprocessed pixels inside it differ from a shell around it the way the
corpus says (``hyper``: brighter, ``hypo``: darker); ``mask_on_lesion_share`` is the share that do.

Full run (writes 600 studies and trains 800 steps: 10-25 min on 2 cores): ``python benchmarks/bench_relevance.py``.
Smoke run: ``python benchmarks/bench_relevance.py --studies 60 --steps 20 --min-positives 1``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch
from measure import log, ratio

from hlip_ray.demo.synth import LABELS

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "hlip_ray" / "demo" / "demo.yaml"
GOAL_OVER_CHANCE = 3.0


# -- training with the platform ---------------------------------------------------------------
def hlip_ray(*arguments: str) -> str:
    """Run ``hlip-ray ARGUMENTS``, its output passed on to stderr as it comes; returns the last line of its
    stdout that is a JSON object (a command's summary; Ray may print after it), or ""."""
    command = [sys.executable, "-m", "hlip_ray.cli", *arguments]
    log("$ hlip-ray " + " ".join(arguments))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0"}
    last = ""
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env) as process:
        for line in process.stdout:
            sys.stderr.write(line)
            last = line.strip() if line.startswith("{") and line.rstrip().endswith("}") else last
    if process.returncode:
        raise subprocess.CalledProcessError(process.returncode, command)
    return last


def train_model(work: Path, studies: int, steps: int | None, seed: int) -> str:
    """The corpus in ``work/raw``, its manifest and shards, and a run trained on them; the checkpoint. A corpus
    that ``work`` holds already is kept, and preprocessing takes up shards written there before."""
    raw, manifest, shards = work / "raw", work / "manifest.parquet", work / "shards"
    config = ["--config", str(DEMO_CONFIG)]
    data = [f"data.manifest={manifest}", f"data.shards={shards}", f"eval.vocabulary={raw / 'vocabulary.json'}"]
    written = json.loads((raw / "corpus.json").read_text()) if (raw / "corpus.json").exists() else {}
    if (written.get("studies"), written.get("seed")) != (studies, seed):   # else: the corpus of an earlier run
        hlip_ray("synth", *config, "--out", str(raw), "--studies", str(studies), "--seed", str(seed))
        hlip_ray("manifest", *config, "--root", str(raw), "--out", str(manifest))
    hlip_ray("preprocess", *config, "--manifest", str(manifest), "--out", str(shards))
    run = [f"train.storage_path={work / 'runs'}", f"train.log_dir={work / 'logs'}", "train.run_name=relevance"]
    if steps is not None:
        run += [f"train.max_steps={steps}", f"train.checkpoint_every={steps}",
                f"train.warmup_steps={min(30, max(1, steps // 10))}"]
    summary = json.loads(hlip_ray("train", *config, *data, *run))
    log(f"trained: {json.dumps(summary['metrics'], default=str)}")
    return summary["checkpoint"]


# -- the pointing game ----------------------------------------------------------------------------
def mask_on_grid(mask_file: Path, volume, data) -> np.ndarray:
    """A lesion mask (NIfTI, on its scan's voxel grid) -> bool ``[D, H, W]`` on the model grid, through the
    geometry the scan goes through: its axes as the scan decoded (``volume.affine``), then
    ``preprocess_volume`` on the mask as a [0, 1] volume, thresholded at 0.5."""
    import nibabel as nib
    from nibabel.orientations import apply_orientation, io_orientation, ornt_transform

    from hlip_ray.data.records import Volume
    from hlip_ray.data.volume import preprocess_volume

    image = nib.load(mask_file)
    to_scan = ornt_transform(io_orientation(image.affine), io_orientation(volume.affine))
    array = apply_orientation(np.asarray(image.dataobj, dtype=np.float32), to_scan)
    if array.shape != volume.pixels.shape:
        raise ValueError(f"{mask_file}: mask of shape {array.shape} on a scan of shape {volume.pixels.shape}")
    as_volume = Volume(pixels=array, affine=volume.affine, modality="CT", uri=str(mask_file))
    resized = preprocess_volume(as_volume, tuple(data.grid), [(0.0, 1.0)], reorient_to_ras=data.reorient_to_ras)
    return resized[0] >= 128


def study_input(row, corpus: Path, config, storage, labels: list[str]):
    """One study as the model reads it at evaluation (the first ``data.max_eval_scans`` scans that decode,
    preprocessed) and each present label's lesion mask on every one of those scans: ``(pixels
    [K, C, D, H, W] uint8, masks label -> [K, D, H, W] bool, scan names [K])``."""
    from hlip_ray.data.sources import decode_scan, read_scan
    from hlip_ray.data.volume import preprocess_volume

    data = config.data
    scans, names, masks = [], [], {label: [] for label in labels}
    for scan in row.scans:
        decoded = decode_scan(read_scan(scan, storage), row.modality, data.nifti_4d, data.min_slices)
        for volume in decoded.volumes[:1]:
            scans.append(preprocess_volume(volume, tuple(data.grid), [tuple(w) for w in data.windows],
                                           tuple(data.mri_percentiles), data.reorient_to_ras))
            names.append(scan.name)
            for label in labels:
                index = LABELS.index(label)
                masks[label].append(mask_on_grid(corpus / row.study_id / "masks" / f"{scan.name}_{index}.nii.gz",
                                                 volume, data))
        if len(scans) == data.max_eval_scans:
            break
    return np.stack(scans), {label: np.stack(stack) for label, stack in masks.items()}, names


def shell_contrast(pixels: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """Mean of the first channel inside ``mask`` and in a 2-voxel shell around it (``[K, C, D, H, W]``,
    ``[K, D, H, W]``)."""
    inside = torch.from_numpy(mask).float()[:, None]
    grown = torch.nn.functional.max_pool3d(inside, kernel_size=5, stride=1, padding=2)
    shell = (grown - inside)[:, 0].bool().numpy()
    image = pixels[:, 0].astype(np.float64)
    return float(image[mask].mean()), float(image[shell].mean())


def pointing_game(checkpoint: str, corpus: Path, figures_dir: Path, figure_count: int, min_positives: int) -> dict:
    """Hit rate of the peak relevance in the lesion over held-out (study, present label) pairs, beside chance,
    for the input of every block but the last (``relevance_maps``' ``block``); overlays of a few studies."""
    from hlip_ray.data.manifest import read_manifest
    from hlip_ray.eval.relevance import label_directions, relevance_figures, relevance_maps
    from hlip_ray.eval.zeroshot import class_embeddings, load_vocabulary
    from hlip_ray.inference.trained_model import inference_config, load_model
    from hlip_ray.storage import Storage
    from hlip_ray.text_source import load_tokenizer

    storage = Storage()
    model, config = load_model(checkpoint, storage)
    config = inference_config(config)
    if config.data.crop_foreground:
        raise ValueError("the benchmark maps masks without data.crop_foreground; train without it")
    model.eval()
    vocabulary = load_vocabulary((corpus / "vocabulary.json").read_text(), str(corpus / "vocabulary.json"))
    tokenizer = load_tokenizer(config.model.text.name_or_path)
    classes = class_embeddings(model, tokenizer, vocabulary, config.model.text.context_length)
    directions = label_directions(classes)
    rows = [row for row in read_manifest(config.data.manifest, storage)
            if row.split == "val" and any(value == 1 for value in row.labels.values())]
    blocks = list(range(len(model.visual.blocks) - 1))
    hits = {block: {label: [] for label in LABELS} for block in blocks}
    # Studies with several lesions: does a label's peak fall in its own lesion, or in another label's?
    own_or_other = {block: [] for block in blocks}
    chance = {label: [] for label in LABELS}
    agrees, figures, started = [], [], time.perf_counter()
    for number, row in enumerate(rows):
        present = [label for label in LABELS if row.labels.get(label) == 1]
        pixels, masks, names = study_input(row, corpus, config, storage, present)
        appearance = {(lesion["label"], lesion["scan"]): lesion["appearance"]
                      for lesion in json.loads((corpus / row.study_id / "labels.json").read_text())["lesions"]}
        for label in present:
            for scan, name in enumerate(names):   # the mapped mask on the lesion: brighter or darker than around it
                inside, shell = shell_contrast(pixels[scan:scan + 1], masks[label][scan:scan + 1])
                agrees.append((inside > shell) == (appearance[label, name] == "hyper"))
            chance[label].append(float(masks[label].mean()))
        batch = torch.from_numpy(pixels)[None]
        scan_mask = torch.ones(1, len(pixels), dtype=torch.bool)
        for block in blocks:
            maps, _ = relevance_maps(model, batch, scan_mask, {label: directions[label] for label in present},
                                     block=block)
            for label in present:
                relevance = maps[label][0].numpy()
                peak = np.unravel_index(int(relevance.argmax()), relevance.shape)
                hits[block][label].append(bool(masks[label][peak]))
                if len(present) > 1:
                    other = any(masks[name][peak] for name in present if name != label)
                    own_or_other[block].append((bool(masks[label][peak]), other))
        if number < figure_count:
            figures += relevance_figures(model, batch, scan_mask, {label: classes[label] for label in present},
                                         figures_dir, [row.study_id])
        if (number + 1) % 10 == 0 or number + 1 == len(rows):
            log(f"pointing game: {number + 1}/{len(rows)} studies, {time.perf_counter() - started:.0f} s")
    pairs = sum(len(values) for values in chance.values())
    if pairs < min_positives:
        raise ValueError(f"only {pairs} held-out positives (need {min_positives}): write more studies")
    chance_rate = float(np.mean([value for values in chance.values() for value in values]))
    per_block = {}
    for block in blocks:
        rate = float(np.mean([hit for values in hits[block].values() for hit in values]))
        per_block[f"block_{block}"] = {
            "hit_rate": round(rate, 4), "over_chance": ratio(rate, chance_rate),
            "per_label": {label: round(float(np.mean(values)), 4) for label, values in hits[block].items() if values},
            "several_lesions": {"pairs": len(own_or_other[block]),
                                "own_lesion": round(float(np.mean([own for own, _ in own_or_other[block]])), 4),
                                "other_lesion": round(float(np.mean([other for _, other in own_or_other[block]])), 4)},
        }
    headline = per_block["block_0"]
    return {
        "pointing_game_hit_rate": headline["hit_rate"], "chance": round(chance_rate, 5),
        "over_chance": headline["over_chance"], "goal_over_chance": GOAL_OVER_CHANCE,
        "meets_goal": headline["over_chance"] is not None and headline["over_chance"] >= GOAL_OVER_CHANCE,
        "per_block": per_block,
        "chance_per_label": {label: round(float(np.mean(values)), 5) for label, values in chance.items() if values},
        "positives": pairs, "studies": len(rows),
        "mask_on_lesion_share": round(float(np.mean(agrees)), 4),
        "relevance_s_per_study": round((time.perf_counter() - started) / max(1, len(rows)), 3),
        "figures": [str(path) for path in figures],
    }


# -- the run ------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="a run checkpoint trained on --corpus (skips training)")
    parser.add_argument("--corpus", help="the synthetic corpus folder of --checkpoint (default: WORK/raw)")
    parser.add_argument("--work", default="bench_relevance_out",
                        help="folder for the corpus, shards, run and figures")
    parser.add_argument("--studies", type=int, default=600, help="synthetic studies to write and train on")
    parser.add_argument("--steps", type=int, help="training steps (default: the demo config's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--figures", type=int, default=3, help="held-out studies to draw overlays for")
    parser.add_argument("--min-positives", type=int, default=50,
                        help="fewest held-out (study, label) positives the figure is taken over")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = args.checkpoint or train_model(work, args.studies, args.steps, args.seed)
    corpus = Path(args.corpus).resolve() if args.corpus else work / "raw"
    trained_s = time.perf_counter() - started
    figures = pointing_game(checkpoint, corpus, work / "figures", args.figures, args.min_positives)
    figures.update(train_s=round(trained_s, 1), wall_s=round(time.perf_counter() - started, 1),
                   checkpoint=str(checkpoint))
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
