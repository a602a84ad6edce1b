"""``hlip-ray eval``: a trained model on a split: contrastive loss and retrieval, and zero-shot
classification beside a baseline where a label vocabulary is given.

The split's studies stream through the data plane (Ray Data, CPU workers); the model encodes
them in this process. The baseline scores every label by a study's mean intensity: a model that
only learnt global brightness would score like it.
"""

from __future__ import annotations

import time

from hlip_ray.config import Config
from hlip_ray.data.sources import study_items
from hlip_ray.data.storage import Storage
from hlip_ray.data.streams import collate_study_batch, evaluation_stream
from hlip_ray.eval.held_out import evaluate
from hlip_ray.eval.zeroshot import load_vocabulary
from hlip_ray.text_source import load_tokenizer


def evaluate_split(model, config: Config, split: str = "val") -> dict:
    """Loss, retrieval R@k and (with ``eval.vocabulary``) macro and per-label AUC of ``model`` on
    ``split``, with the baseline's AUC (Ray must be initialised).

    ``config`` names the data (``data.shards`` or ``data.manifest``). Studies that cannot be read are
    skipped with a warning.
    """
    storage = Storage.from_config(config.storage)
    vocabulary = None
    if config.eval.vocabulary:
        vocabulary = load_vocabulary(storage.read_bytes(config.eval.vocabulary), config.eval.vocabulary)
    items, source = study_items(config, storage, None, split, train=False)
    if not items:
        raise ValueError(f"the data has no studies in split {split!r}")
    started = time.perf_counter()
    batches = evaluation_stream(items, source, config).iter_torch_batches(
        batch_size=config.eval.batch_size, collate_fn=collate_study_batch)
    report = evaluate(model.eval(), batches, vocabulary=vocabulary,
                      tokenizer=load_tokenizer(config.model.text.name_or_path) if vocabulary else None,
                      context_length=config.model.text.context_length)
    report["split"] = split
    report["seconds"] = round(time.perf_counter() - started, 2)
    return report
