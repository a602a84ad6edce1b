"""What storing the model's input as uint8 changes, against float, on a trained model.

The shard cache and the Ray Data streams hold every preprocessed scan as uint8: each window (or MR
percentile range) mapped to 0..255. With HLIP's chest window of 1500 HU a level is 5.9 HU. This script
decodes the held-out studies of a manifest, preprocesses every scan both ways (the pipeline's uint8, and
the same values before rounding, in [0, 1]), runs the trained model on both and prints ONE JSON line:

- ``level_error_max``: the largest difference between the two inputs, in levels (rounding: <= 0.5);
- ``embedding_cosine``: min and mean cosine similarity of a study's embeddings from the two inputs;
- ``score_change``: the largest and mean absolute change of a zero-shot score, over the standard deviation
  of that score across the studies (how far rounding moves a study against how far studies differ);
- ``macro_auc``: the zero-shot macro AUC from each input, and ``auc_change_max``, the largest change of a
  label's AUC;
- ``chest_window_hu``: a level and the rounding's RMS error in HU for the 1500 HU window (1500/255 and
  that over sqrt(12)), beside the model's view: whatever the window, rounding moves an input by at most
  0.5/255 of its range, the perturbation measured here.

Usage (the demo's model, which ``make demo`` copies to ``demo_out/checkpoint``; its corpus written again
with the demo's seed and listed with the demo's split):

    hlip-ray synth --out /tmp/demo-corpus --studies 600 --seed 0
    hlip-ray manifest --root /tmp/demo-corpus --out /tmp/demo-corpus/manifest.parquet
    python benchmarks/uint8_vs_float.py --checkpoint demo_out/checkpoint \\
        --manifest /tmp/demo-corpus/manifest.parquet --vocabulary /tmp/demo-corpus/vocabulary.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def float_input(volume, data):
    """The scan's model input before rounding: ``[C, D, H, W]`` float32 in [0, 1], computed as
    ``preprocess_volume`` computes it (windows, area-average resize), less the rounding to 0..255."""
    import numpy as np

    from hlip_ray.data import volume as recipe

    if data.spacing is not None or data.fit != "resize" or data.reorient_to_ras or data.crop_foreground:
        raise SystemExit("this measurement covers data.fit=resize without spacing, reorientation or cropping")
    pixels, rescale = np.asarray(volume.pixels), tuple(volume.rescale)
    ct = volume.modality.upper() == "CT"
    bounds = ([(float(low), float(high)) for low, high in data.windows] if ct
              else [recipe._percentiles(pixels, rescale, data.mri_percentiles)])
    channels = []
    for low, high in bounds:
        if high <= low:
            channels.append(np.zeros(tuple(data.grid), np.float32))
            continue
        values = recipe._windowed(pixels, rescale, tuple(data.grid), low, high)
        channels.append((np.clip(values, low, high) - low) / (high - low))
    stacked = np.stack(channels).astype(np.float32)
    return stacked if len(stacked) == len(data.windows) else np.repeat(stacked, len(data.windows), axis=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a run checkpoint (folder or s3:// URI)")
    parser.add_argument("--manifest", required=True, help="the corpus the model was trained on")
    parser.add_argument("--vocabulary", required=True, help="the labels' vocabulary (zero-shot prompts)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--studies", type=int, default=120, help="held-out studies measured")
    args = parser.parse_args()

    import numpy as np
    import torch
    import torch.nn.functional as F

    from hlip_ray.data.manifest import read_manifest
    from hlip_ray.data.sources import decode_scan, read_scan
    from hlip_ray.data.volume import preprocess_volume, recipe
    from hlip_ray.eval.zeroshot import class_embeddings, load_vocabulary, roc_auc, zeroshot_scores
    from hlip_ray.inference.trained_model import load_model
    from hlip_ray.storage import Storage
    from hlip_ray.text_source import load_tokenizer

    storage = Storage()
    model, config = load_model(args.checkpoint, storage)
    model.eval()
    data = config.data
    rows = [row for row in read_manifest(args.manifest, storage) if row.split == args.split][: args.studies]
    quantised, floats, labels, worst = [], [], [], 0.0
    with torch.no_grad():
        for number, row in enumerate(rows, 1):
            as_uint8, as_float = [], []
            for scan in row.scans:
                decoded = decode_scan(read_scan(scan, storage), row.modality, data.nifti_4d, data.min_slices)
                for volume in decoded.volumes:
                    if len(as_uint8) < data.max_eval_scans:
                        as_uint8.append(preprocess_volume(volume, tuple(data.grid), **recipe(data)))
                        as_float.append(float_input(volume, data))
            levels = np.abs(np.stack(as_float) * 255 - np.stack(as_uint8).astype(np.float32))
            worst = max(worst, float(levels.max()))
            mask = torch.ones(1, len(as_uint8), dtype=torch.bool)
            quantised.append(model.encode_study(torch.from_numpy(np.stack(as_uint8))[None], mask))
            floats.append(model.encode_study(torch.from_numpy(np.stack(as_float))[None], mask))
            labels.append(row.labels)
            print(f"\r{number}/{len(rows)} studies", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        quantised, floats = torch.cat(quantised).float(), torch.cat(floats).float()
        vocabulary = load_vocabulary(storage.read_bytes(args.vocabulary), args.vocabulary)
        classes = class_embeddings(model, load_tokenizer(config.model.text.name_or_path), vocabulary,
                                   config.model.text.context_length, config.eval.templates)
    cosine = F.cosine_similarity(quantised, floats, dim=-1)
    scores_q, scores_f = zeroshot_scores(quantised, classes), zeroshot_scores(floats, classes)
    changes, aucs = [], {"uint8": {}, "float": {}}
    for label in vocabulary:
        spread = float(np.std(scores_f[label])) or 1.0
        changes.append(np.abs(scores_q[label] - scores_f[label]) / spread)
        carried = [index for index, row in enumerate(labels) if label in row]
        truth = [labels[index][label] for index in carried]
        aucs["uint8"][label] = roc_auc(scores_q[label][carried], truth)
        aucs["float"][label] = roc_auc(scores_f[label][carried], truth)
    changes = np.concatenate(changes)
    level_hu = 1500 / 255
    print(json.dumps({
        "studies": len(rows),
        "windows": data.windows,
        "level_error_max": round(worst, 4),
        "embedding_cosine": {"min": round(float(cosine.min()), 6), "mean": round(float(cosine.mean()), 6)},
        "score_change": {"max": round(float(changes.max()), 4), "mean": round(float(changes.mean()), 5)},
        "macro_auc": {kind: round(float(np.nanmean(list(values.values()))), 4) for kind, values in aucs.items()},
        "auc_change_max": round(max(abs(aucs["uint8"][label] - aucs["float"][label]) for label in vocabulary), 4),
        "chest_window_hu": {"level": round(level_hu, 2), "rms_error": round(level_hu / math.sqrt(12), 2)},
    }))


if __name__ == "__main__":
    main()
