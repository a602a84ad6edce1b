"""``hlip-ray eval``: zero-shot classification of a split with a trained model, beside a baseline.

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
from hlip_ray.eval.zeroshot import evaluate_zeroshot, load_vocabulary
from hlip_ray.text_source import load_tokenizer


def evaluate_split(model, config: Config, split: str = "val") -> dict:
    """Macro and per-label AUC of ``model`` on ``split`` (Ray must be initialised), and the baseline's.

    ``config`` names the data (``data.shards`` or ``data.manifest``) and ``eval.vocabulary``.
    Studies that cannot be read are skipped with a warning.
    """
    if not config.eval.vocabulary:
        raise ValueError("eval.vocabulary is not set: zero-shot prompts come from a label vocabulary")
    storage = Storage.from_config(config.storage)
    vocabulary = load_vocabulary(storage.read_bytes(config.eval.vocabulary), config.eval.vocabulary)
    items, source = study_items(config, storage, None, split, train=False)
    if not items:
        raise ValueError(f"the data has no studies in split {split!r}")
    started = time.perf_counter()
    batches = evaluation_stream(items, source, config).iter_torch_batches(
        batch_size=config.eval.batch_size, collate_fn=collate_study_batch)
    report = evaluate_zeroshot(model.eval(), batches, vocabulary, load_tokenizer(config.model.text.name_or_path),
                               config.model.text.context_length)
    report["split"] = split
    report["seconds"] = round(time.perf_counter() - started, 2)
    return report
