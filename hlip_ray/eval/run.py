"""``hlip-ray eval``: a trained model on a split: contrastive loss and retrieval, and with a label
vocabulary zero-shot classification beside a baseline, bootstrap confidence intervals, balanced
accuracy and F1 at a chosen threshold, and a linear probe (``metrics.py``).

The split's studies stream through the data plane (Ray Data, CPU workers); the model encodes
them in this process. The baseline scores every label by a study's mean intensity: a model that
only learnt global brightness would score like it. The loss, retrieval and AUC figures are those of
``held_out.evaluate`` (the validation's): the same pieces on the same encoded studies.
"""

from __future__ import annotations

import sys
import time

from hlip_ray.config import Config
from hlip_ray.data.sources import study_items
from hlip_ray.data.storage import Storage
from hlip_ray.data.streams import collate_study_batch, evaluation_stream
from hlip_ray.eval import metrics
from hlip_ray.eval.held_out import Encoded, encode, summarize
from hlip_ray.eval.zeroshot import class_embeddings, load_vocabulary, zeroshot_scores
from hlip_ray.text_source import load_tokenizer

PROGRESS_SECONDS = 10.0   # at most one progress line (stderr) per this many seconds


class _Progress:
    """Progress lines on stderr, at most one every ``PROGRESS_SECONDS`` and the last always."""

    def __init__(self, what: str, total: int) -> None:
        self.what, self.total = what, total
        self.started = self.printed = time.perf_counter()

    def __call__(self, done: int, last: bool = False) -> None:
        now = time.perf_counter()
        if last or done >= self.total or now - self.printed >= PROGRESS_SECONDS:
            self.printed = now
            print(f"eval: {self.what} {done}/{self.total} ({now - self.started:.0f} s)", file=sys.stderr, flush=True)


def evaluate_split(model, config: Config, split: str = "val", *, checkpoint: str | None = None,
                   out: str | None = None, interpret: str | None = None) -> dict:
    """The report of ``model`` on ``split`` (Ray must be initialised): ``split``, ``studies``, ``loss``,
    ``retrieval`` and, with ``eval.vocabulary``, ``macro_auc``, ``per_label`` and ``baseline`` as
    validation reports them, and ``auc_ci`` (``eval.bootstrap_samples`` > 0), ``classification`` (at
    thresholds chosen on ``eval.threshold_split``, or on ``split``) and ``linear_probe``.

    ``config`` names the data (``data.shards`` or ``data.manifest``). Studies that cannot be read are
    skipped with a warning. ``checkpoint`` (the model's source) heads the report; with ``out`` (a folder
    or ``s3://`` prefix) ``report.json``, ``report.md`` and the ROC curves are written there. With
    ``interpret`` (a local folder) the relevance maps of every study go there (``relevance.py``): one
    figure per study and label it is positive for (every label where the study has none).
    """
    from hlip_ray.eval.report import roc_figure, write_report

    storage = Storage.from_config(config.storage)
    vocabulary = None
    if config.eval.vocabulary:
        vocabulary = load_vocabulary(storage.read_bytes(config.eval.vocabulary), config.eval.vocabulary)
    names = list(vocabulary or {})
    started = time.perf_counter()
    model.eval()
    encoded = _encode_split(model, config, storage, split, names)
    classes = None
    if vocabulary and (encoded.labels >= 0).any():
        classes = class_embeddings(model, load_tokenizer(config.model.text.name_or_path), vocabulary,
                                   config.model.text.context_length, config.eval.templates)
    report = {**({"checkpoint": checkpoint} if checkpoint else {}), "split": split,
              **summarize(model, encoded, names, classes)}
    roc_png = None
    if classes is not None:
        scores, labels = zeroshot_scores(encoded.study, classes), encoded.labels.numpy()
        samples = config.eval.bootstrap_samples
        if samples:
            report["auc_ci"] = metrics.bootstrap_auc(scores, labels, names, samples,
                                                     on_resample=_Progress("bootstrap resamples", samples))
        chosen_on = config.eval.threshold_split or split
        if chosen_on == split:
            threshold_scores, threshold_labels = scores, labels
        else:
            other = _encode_split(model, config, storage, chosen_on, names)
            threshold_scores, threshold_labels = zeroshot_scores(other.study, classes), other.labels.numpy()
        report["classification"] = metrics.classification_report(scores, labels, names, threshold_scores,
                                                                  threshold_labels, chosen_on)
        report["linear_probe"] = metrics.linear_probe(encoded.study.numpy(), labels, names, config.eval.probe_folds)
        if out:
            roc_png = roc_figure(report, scores, encoded.intensity.numpy(), labels, names)
    if interpret and classes is not None:
        report["relevance_maps"] = _relevance_maps(model, config, storage, split, names, classes, interpret)
    report["seconds"] = round(time.perf_counter() - started, 2)
    if out:
        write_report(out, report, storage, roc_png)
    return report


def _encode_split(model, config: Config, storage: Storage, split: str, names: list[str]) -> Encoded:
    """The studies of ``split`` through the data plane, encoded by ``model`` in this process."""
    items, source = study_items(config, storage, None, split, train=False)
    if not items:
        raise ValueError(f"the data has no studies in split {split!r}")
    batches = evaluation_stream(items, source, config).iter_torch_batches(
        batch_size=config.eval.batch_size, collate_fn=collate_study_batch)
    progress = _Progress(f"encoded studies of split {split!r}", len(items))

    def counted():
        done = 0
        for batch in batches:
            yield batch
            done += len(batch["study_id"])
            if done < len(items):
                progress(done)
        progress(done, last=True)   # fewer than listed where studies could not be read

    return encode(model, counted(), names)


def _relevance_maps(model, config: Config, storage: Storage, split: str, names: list[str], classes: dict,
                    folder: str) -> dict:
    """The split's studies through the data plane again, each one's relevance figures into ``folder``."""
    from hlip_ray.eval.relevance import relevance_figures

    items, source = study_items(config, storage, None, split, train=False)
    progress = _Progress(f"relevance maps of split {split!r}", len(items))
    figures = done = 0
    for batch in evaluation_stream(items, source, config).iter_torch_batches(
            batch_size=config.eval.batch_size, collate_fn=collate_study_batch):
        for row, study_id in enumerate(batch["study_id"]):
            positive = [name for name in names if batch["labels"][row].get(name) == 1]
            labelled = any(name in batch["labels"][row] for name in names)
            chosen = {name: classes[name] for name in (positive if labelled else names)}
            if chosen:
                figures += len(relevance_figures(model, batch["pixels"][row:row + 1], batch["scan_mask"][row:row + 1],
                                                 chosen, folder, [study_id]))
            done += 1
            progress(done, last=done == len(items))
    return {"folder": folder, "figures": figures}
