"""``hlip-ray eval``: a trained model on a split: contrastive loss and retrieval, and with a label
vocabulary zero-shot classification beside a baseline, bootstrap confidence intervals, balanced
accuracy and F1 at a chosen threshold, a linear probe and a few-shot probe (``metrics.py``).

The split's studies stream through the data plane (Ray Data, CPU workers) to one Ray actor that holds
the model (``EncoderActor``), placed as a training worker is (``placement.py``: one CPU,
``resources.trainer``, a GPU where ``eval.device`` resolves to CUDA). It encodes the studies, the
vocabulary's class embeddings and the relevance maps there (it reads the stream itself, so Ray Data's
executor runs there too: the pixels never pass through this process); this process, the driver, starts
nothing else and computes the figures from the embeddings that come back. The baseline
scores every label by a study's mean intensity: a model that only learnt global brightness would score
like it. The loss, retrieval and AUC figures are those of ``held_out.evaluate`` (the validation's): the
same pieces on the same encoded studies.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time

import torch

from hlip_ray.config import Config
from hlip_ray.data.sources import study_items
from hlip_ray.data.streams import collate_study_batch, evaluation_stream
from hlip_ray.eval import metrics
from hlip_ray.eval.held_out import Encoded, encode, summarize
from hlip_ray.eval.placement import Placement, actor_placement, announce_wait
from hlip_ray.eval.zeroshot import class_embeddings, load_vocabulary, zeroshot_scores
from hlip_ray.progress import Progress
from hlip_ray.storage import Storage, join
from hlip_ray.text_source import load_tokenizer


def evaluate_split(model, config: Config, split: str = "val", *, checkpoint: str | None = None,
                   out: str | None = None, interpret: str | None = None) -> dict:
    """The report of ``model`` on ``split`` (Ray must be initialised): ``split``, ``studies``, ``loss``,
    ``retrieval`` and, with ``eval.vocabulary``, ``macro_auc``, ``per_label`` and ``baseline`` as
    validation reports them, and ``auc_ci`` (``eval.bootstrap_samples`` > 0), ``classification`` (at
    thresholds chosen on ``eval.threshold_split``, or on ``split``) and ``linear_probe``.

    ``config`` names the data (``data.shards`` or ``data.manifest``). Studies that cannot be read are
    skipped with a warning. ``checkpoint`` (the model's source) heads the report; with ``out`` (a folder
    or ``s3://`` prefix) ``report.json``, ``report.md`` and the ROC curves are written there. With
    ``interpret`` (a folder or s3:// prefix) the relevance maps of every study go there (``relevance.py``): one
    figure per study and label it is positive for (every label where the study has none).

    ``model`` (on the CPU) is copied to one ``EncoderActor``, placed by ``eval.device`` and
    ``resources.trainer`` (module docstring), which runs every forward pass; here it gives only its loss
    type and temperature to the figures.
    """
    from hlip_ray.data.quarantine import create_quarantine_log
    from hlip_ray.eval.report import roc_figure, write_report

    placement = actor_placement(config)   # eval.device=cuda without a GPU fails here, before any work
    storage = Storage.from_config(config.storage)
    quarantine_log = create_quarantine_log()
    vocabulary = None
    if config.eval.vocabulary:
        vocabulary = load_vocabulary(storage.read_bytes(config.eval.vocabulary), config.eval.vocabulary)
    names = list(vocabulary or {})
    started = time.perf_counter()
    model.eval()
    encoder = SplitEncoder.start(model, placement)
    try:
        encoded = _encode_split(encoder, model, config, storage, split, names, quarantine_log, out)
        classes = None
        if vocabulary and (encoded.labels >= 0).any():
            classes = encoder.class_embeddings(load_tokenizer(config.model.text.name_or_path), vocabulary,
                                               config.model.text.context_length, config.eval.templates)
        report = {**({"checkpoint": checkpoint} if checkpoint else {}), "split": split,
                  **summarize(model, encoded, names, classes)}
        roc_png = None
        if classes is not None:
            scores, labels = zeroshot_scores(encoded.study, classes), encoded.labels.numpy()
            samples = config.eval.bootstrap_samples
            if samples:
                progress = Progress("eval: bootstrap resamples", samples)
                report["auc_ci"] = metrics.bootstrap_auc(scores, labels, names, samples, on_resample=progress.update)
                progress.close()
            chosen_on = config.eval.threshold_split or split
            if chosen_on == split:
                threshold_scores, threshold_labels = scores, labels
            else:
                other = _encode_split(encoder, model, config, storage, chosen_on, names, quarantine_log, out)
                threshold_scores, threshold_labels = zeroshot_scores(other.study, classes), other.labels.numpy()
            report["classification"] = metrics.classification_report(scores, labels, names, threshold_scores,
                                                                      threshold_labels, chosen_on)
            report["linear_probe"] = metrics.linear_probe(encoded.study.numpy(), labels, names,
                                                          config.eval.probe_folds)
            if config.eval.few_shot:
                report["few_shot"] = metrics.few_shot_probe(encoded.study.numpy(), labels, names,
                                                            config.eval.few_shot, config.eval.few_shot_draws)
            if out:
                roc_png = roc_figure(report, scores, encoded.intensity.numpy(), labels, names)
        if interpret and classes is not None:
            report["relevance_maps"] = _relevance_maps(encoder, config, storage, split, names, classes, interpret)
    finally:
        encoder.stop()
    skipped = _skipped(quarantine_log, out, storage)
    if skipped:
        report["skipped"] = skipped
    report["seconds"] = round(time.perf_counter() - started, 2)
    if out:
        write_report(out, report, storage, roc_png)
    return report


def _skipped(quarantine_log, out: str | None, storage: Storage) -> dict:
    """The studies and scans the evaluation skipped, by reason (``out/quarantine.jsonl`` with ``out``)."""
    import ray

    from hlip_ray.data.quarantine import QUARANTINE_FILE, write_quarantine
    from hlip_ray.data.records import NOTE_REASONS

    if out:
        counts = write_quarantine(quarantine_log, out, storage)
        where = join(out, QUARANTINE_FILE)
    else:
        records = ray.get(quarantine_log.records_list.remote())
        ray.get(quarantine_log.close.remote())
        counts = {}
        for record in records:
            counts[record["reason"]] = counts.get(record["reason"], 0) + 1
        where = None
    counts = {reason: count for reason, count in counts.items() if reason not in NOTE_REASONS}
    return {"by_reason": counts, **({"quarantine": where} if where else {})} if counts else {}


class EncoderActor:
    """The model on its device (``placement.Placement.device``), in a Ray actor: a split's studies, the
    vocabulary's class embeddings and relevance figures. What it returns is on the CPU."""

    def __init__(self, model, device: str) -> None:
        self.model = model.to(torch.device(device)).eval()

    def where(self) -> dict:
        """``{"pid", "node_id", "resources", "device"}`` of this actor: its process, its node, what Ray assigned
        it, where its model is."""
        import os

        import ray

        context = ray.get_runtime_context()
        return {"pid": os.getpid(), "node_id": context.get_node_id(), "resources": context.get_assigned_resources(),
                "device": str(next(self.model.parameters()).device)}

    def encode(self, studies, names: list[str], batch_size: int):
        """``held_out.encode`` of each batch of ``batch_size`` studies of ``studies`` (a Ray Dataset, executed
        here): one ``Encoded`` per batch, streamed back as it is done."""
        for batch in studies.iter_torch_batches(batch_size=batch_size, collate_fn=collate_study_batch):
            yield encode(self.model, [batch], names)

    def class_embeddings(self, tokenizer, vocabulary: dict, context_length: int, templates: list[str]) -> dict:
        """``zeroshot.class_embeddings``: label -> ``[2, P]``."""
        classes = class_embeddings(self.model, tokenizer, vocabulary, context_length, templates)
        return {label: pair.cpu() for label, pair in classes.items()}

    def relevance(self, studies, names: list[str], classes: dict, batch_size: int):
        """Each study's relevance figures (``relevance.relevance_figures``) for the labels it is positive for
        (every label where it carries none): one ``{file name: PNG bytes}`` per study, streamed back."""
        from hlip_ray.eval.relevance import relevance_figures

        with tempfile.TemporaryDirectory() as scratch:
            for batch in studies.iter_torch_batches(batch_size=batch_size, collate_fn=collate_study_batch):
                for row, study_id in enumerate(batch["study_id"]):
                    positive = [name for name in names if batch["labels"][row].get(name) == 1]
                    labelled = any(name in batch["labels"][row] for name in names)
                    chosen = {name: classes[name] for name in (positive if labelled else names)}
                    figures = {}
                    if chosen:
                        for path in relevance_figures(self.model, batch["pixels"][row:row + 1],
                                                      batch["scan_mask"][row:row + 1], chosen, scratch, [study_id]):
                            figures[path.name] = path.read_bytes()
                            path.unlink()
                    yield figures


class SplitEncoder:
    """This process's handle on an ``EncoderActor``: started with a copy of the model, stopped at the end."""

    def __init__(self, actor, placement: Placement) -> None:
        self.actor, self.placement = actor, placement

    @classmethod
    def start(cls, model, placement: Placement) -> SplitEncoder:
        """An ``EncoderActor`` holding a copy of ``model`` (through the object store: a local checkpoint
        need not be readable where the actor runs), placed by ``placement``."""
        import ray

        announce_wait(placement, "eval: the encoder")
        actor = ray.remote(EncoderActor).options(**placement.options()).remote(ray.put(model), placement.device)
        return cls(actor, placement)

    def where(self) -> dict:
        """The actor's ``EncoderActor.where``."""
        import ray

        return ray.get(self.actor.where.remote())

    def encode(self, studies, names: list[str], batch_size: int):
        """``EncoderActor.encode``'s parts, each as it comes."""
        import ray

        for part in self.actor.encode.remote(studies, names, batch_size):
            yield ray.get(part)

    def class_embeddings(self, tokenizer, vocabulary: dict, context_length: int, templates) -> dict:
        """``EncoderActor.class_embeddings``: label -> ``[2, P]`` on the CPU (``tokenizer`` goes along)."""
        import ray

        return ray.get(self.actor.class_embeddings.remote(tokenizer, vocabulary, context_length, list(templates)))

    def relevance(self, studies, names: list[str], classes: dict, batch_size: int):
        """``EncoderActor.relevance``'s figures, study by study."""
        import ray

        for figures in self.actor.relevance.remote(studies, names, classes, batch_size):
            yield ray.get(figures)

    def stop(self) -> None:
        import ray

        ray.kill(self.actor)


def _split_stream(config: Config, storage: Storage, split: str, quarantine_log=None):
    """``(studies, count)``: the studies of ``split`` through the data plane (a Ray Dataset, which the encoder
    actor reads and so executes), and how many are listed. Studies that cannot be read are skipped into
    ``quarantine_log`` (a ``QuarantineLog``; None: logged only)."""
    items, source = study_items(config, storage, quarantine_log, split, train=False)
    if not items:
        raise ValueError(f"the data has no studies in split {split!r}")
    studies = evaluation_stream(items, source, config)
    return studies, len(items)


def _encode_split(encoder: SplitEncoder, model, config: Config, storage: Storage, split: str,
                  names: list[str], quarantine_log, out: str | None) -> Encoded:
    """The studies of ``split``, encoded by the encoder actor (``model``, here, gives only the empty start).
    A split of which no study could be read is refused, with the reasons (figures of no study would be NaN)."""
    studies, count = _split_stream(config, storage, split, quarantine_log)
    progress = Progress(f"eval: encoded studies of split {split!r}", count, unit="studies")
    parts = [encode(model, [], names)]   # no study: the empty tensors of the right widths
    done = 0
    for part in encoder.encode(studies, names, config.eval.batch_size):
        parts.append(part)
        done += len(part.study)
        progress.update(done)
    progress.close()   # fewer than listed where studies could not be read
    if not done:
        skipped = _skipped(quarantine_log, out, Storage.from_config(config.storage))
        reasons = ", ".join(f"{reason}: {n}" for reason, n in skipped.get("by_reason", {}).items()) or "no reason"
        where = f"; every reason in {skipped['quarantine']}" if skipped.get("quarantine") else (
            "; with --out the quarantine (each study's reason) is written there")
        raise ValueError(f"none of the {count} studies of split {split!r} could be read "
                         f"({reasons or 'no reason recorded'}){where}")
    return Encoded(**{field.name: torch.cat([getattr(part, field.name) for part in parts])
                      for field in dataclasses.fields(Encoded)})


def _relevance_maps(encoder: SplitEncoder, config: Config, storage: Storage, split: str, names: list[str],
                    classes: dict, folder: str) -> dict:
    """The split's studies through the data plane again, each one's relevance figures (drawn by the encoder
    actor) into ``folder``."""
    studies, count = _split_stream(config, storage, split)
    progress = Progress(f"eval: relevance maps of split {split!r}", count, unit="studies")
    figures = done = 0
    for drawn in encoder.relevance(studies, names, classes, config.eval.batch_size):
        for name, png in drawn.items():
            storage.write_bytes(join(folder, name), png)
        figures += len(drawn)
        done += 1
        progress.update(done)
    progress.close()
    return {"folder": folder, "figures": figures}
