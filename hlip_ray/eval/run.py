"""``hlip-ray eval``: zero-shot classification of a split with a trained model, beside a baseline.

The split's studies stream through the data plane (Ray Data, CPU workers); the model encodes
them in this process. The baseline scores every label by a study's mean intensity: a model that
only learnt global brightness would score like it.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from hlip_ray.config import Config
from hlip_ray.data.storage import Storage
from hlip_ray.eval.zeroshot import (
    auc_report,
    class_embeddings,
    load_vocabulary,
    mean_intensity_scores,
    zeroshot_scores,
)


@torch.no_grad()
def evaluate_zeroshot(model, config: Config, split: str = "val") -> dict:
    """Macro and per-label AUC of ``model`` on ``split`` (Ray must be initialised), and the baseline's.

    ``config`` names the data (``data.shards`` or ``data.manifest``) and ``eval.vocabulary``.
    """
    from hlip_ray.data.pipeline import collate_study_batch, create_quarantine_log, evaluation_stream, study_items
    from hlip_ray.model import load_tokenizer

    if not config.eval.vocabulary:
        raise ValueError("eval.vocabulary is not set: zero-shot prompts come from a label vocabulary")
    storage = Storage.from_config(config.storage)
    vocabulary = load_vocabulary(storage.read_bytes(config.eval.vocabulary), config.eval.vocabulary)
    items, source = study_items(config, storage, create_quarantine_log(), split, train=False)
    if not items:
        raise ValueError(f"the data has no studies in split {split!r}")
    started = time.perf_counter()
    model = model.eval()
    embeddings, baseline, labels = [], [], []
    for batch in evaluation_stream(items, source, config).iter_torch_batches(
            batch_size=config.eval.batch_size, collate_fn=collate_study_batch):
        embeddings.append(model.encode_study(batch["pixels"], batch["scan_mask"]).float())
        baseline.append(mean_intensity_scores(batch["pixels"], batch["scan_mask"]))
        labels += batch["labels"]
    classes = class_embeddings(model, load_tokenizer(config.model.text.name_or_path), vocabulary,
                               config.model.text.context_length)
    report = auc_report(zeroshot_scores(torch.cat(embeddings), classes), labels)
    intensity = np.concatenate(baseline)
    report["baseline"] = auc_report({label: intensity for label in vocabulary}, labels)
    report["split"] = split
    report["seconds"] = round(time.perf_counter() - started, 2)
    return report
