"""Studies to training and evaluation batches on Ray Data, decoded and preprocessed on CPU workers.

::

    items ──map_batches(ReadAhead(source))──> study records ──map(ScanSampler)──>
        ──map_batches(ReportTokenizer)──> examples ──> iter_torch_batches(collate_fn=collate_study_batch)

Items are manifest rows or shard index rows, and the source reads them (``sources.py``); a training
stream reads them at positions of the data order (``order.py``). Ray Data fuses the per-study steps
of a stream into one task per block, up to ``data.decode_concurrency`` at a time on CPU nodes; a task
that decodes raw files also asks Ray for ``data.decode_memory_mb`` of memory, so that a node starts no
more of them than its memory holds (the others wait).

Example (one study; batches stack them): ``pixels [K, C, D, H, W]`` uint8, ``scan_mask [K]`` bool,
``input_ids`` / ``attention_mask [L]`` int64, ``study_id``, ``labels`` (JSON text), ``epoch``; in a
training stream also ``position``, and ``sentence_input_ids`` / ``sentence_attention_mask [L]`` under the
dual loss.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

import numpy as np
import ray
from ray.data.collate_fn import NumpyBatchCollateFn

from hlip_ray.config import Config
from hlip_ray.data.manifest import StudyRow
from hlip_ray.data.order import StudiesAtPositions, study_rng
from hlip_ray.data.sources import RawStudies, ReadAhead, ShardStudies, StudySource
from hlip_ray.storage import Storage

MAX_BLOCKS = 4096  # manifest blocks fed to the decode tasks
# Studies per decode task. A task reads the next study's files while it decodes the current one
# (``ReadAhead``), so only its first read is waited for; and Ray Data's executor notices a finished
# task up to 0.1 s late (it polls), so a worker idles between tasks. Four per task measured 1.16x
# the studies/s of two without reading ahead (64 studies, 2 processes; ``benchmarks/bench_data.py``).
STUDIES_PER_TASK = 4


def _decode_blocks(studies: int) -> int:
    """Blocks of a stream of ``studies`` manifest or index rows: ``STUDIES_PER_TASK`` per decode task."""
    return max(1, min(-(-studies // STUDIES_PER_TASK), MAX_BLOCKS))


# -- stage 2: choose K scans ---------------------------------------------------------------
class ScanSampler:
    """Study record -> fixed-K example: ``pixels [K, C, D, H, W]`` uint8 padded, ``scan_mask [K]``.

    Training: a random subset of K stored scans (no repeats) per (seed, epoch, study), the
    epoch read from the record; a study of fewer than K is padded, or with ``repeat`` its scans are
    taken again in turn until K are filled (HLIP's brain recipe). Evaluation: the first K, padded.
    """

    def __init__(self, scans: int, train: bool, seed: int = 0, repeat: bool = False) -> None:
        self.scans = scans
        self.train = train
        self.seed = seed
        self.repeat = repeat

    def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
        shape = [int(s) for s in record["shape"]]
        volumes = np.frombuffer(record["pixels"], dtype=np.uint8).reshape(shape)
        count = min(shape[0], self.scans)
        if self.train:
            rng = study_rng(self.seed, int(record.get("epoch", 0)), record["study_id"])
            chosen = np.sort(rng.permutation(shape[0])[:count])
            if self.repeat:
                chosen, count = np.resize(chosen, self.scans), self.scans
        else:
            chosen = np.arange(count)
        pixels = np.zeros((self.scans, *shape[1:]), dtype=np.uint8)
        pixels[:count] = volumes[chosen]
        scan_mask = np.zeros(self.scans, dtype=bool)
        scan_mask[:count] = True
        example = {"study_id": record["study_id"], "report": record["report"], "labels": record["labels"],
                   "epoch": int(record.get("epoch", 0)), "pixels": pixels, "scan_mask": scan_mask}
        if "position" in record:
            example["position"] = int(record["position"])
        return example


# -- stage 3: tokenize reports -------------------------------------------------------------
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@functools.cache
def worker_tokenizer(name_or_path: str):
    """The tokenizer of ``name_or_path``, loaded once per worker process (Ray reuses task workers)."""
    from hlip_ray.text_source import load_tokenizer

    return load_tokenizer(name_or_path)


class ReportTokenizer:
    """Batch of examples -> adds ``input_ids`` / ``attention_mask [B, L]``; drops the report text.

    In training, per (seed, epoch, study): each sentence is dropped with probability
    ``sentence_dropout`` (at least one kept), and the rest are shuffled when ``shuffle_sentences``
    (HLIP does both). ``prefix`` opens every report (HLIP's ``This study shows: ``). With
    ``one_sentence`` the batch also carries ``sentence_input_ids`` / ``sentence_attention_mask``: one
    sentence of the report drawn per study, behind the same prefix (the dual loss,
    ``model.sentence_loss_weight``). It pickles as its settings; the tokenizer comes from
    ``worker_tokenizer`` where it runs.
    """

    def __init__(self, name_or_path: str, context_length: int, shuffle_sentences: bool, seed: int = 0, *,
                 sentence_dropout: float = 0.0, prefix: str = "", one_sentence: bool = False) -> None:
        self.name_or_path = name_or_path
        self.context_length = context_length
        self.shuffle_sentences = shuffle_sentences
        self.seed = seed
        self.sentence_dropout = sentence_dropout
        self.prefix = prefix
        self.one_sentence = one_sentence

    def texts(self, study_id: str, report: str, epoch: int) -> tuple[str, str]:
        """The report as the text tower reads it, and one of its sentences (both behind the prefix)."""
        sentences = [s for s in _SENTENCE_END.split(str(report).strip()) if s] or [""]
        draws = study_rng(self.seed, epoch, study_id, stream=1)
        one = sentences[int(draws.integers(len(sentences)))]
        if self.sentence_dropout and len(sentences) > 1:
            kept = draws.random(len(sentences)) >= self.sentence_dropout
            kept[int(draws.integers(len(sentences)))] = True     # at least one stays
            sentences = [s for s, keep in zip(sentences, kept) if keep]
        if self.shuffle_sentences and len(sentences) > 1:
            order = study_rng(self.seed, epoch, study_id).permutation(len(sentences))
            sentences = [sentences[i] for i in order]
        return self.prefix + " ".join(sentences), self.prefix + one

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pairs = [self.texts(str(study_id), report, int(epoch))
                 for study_id, report, epoch in zip(batch["study_id"], batch["report"], batch["epoch"])]
        out = {key: value for key, value in batch.items() if key != "report"}
        keys = [("", 0)] + ([("sentence_", 1)] if self.one_sentence else [])
        for name, index in keys:
            tokens = worker_tokenizer(self.name_or_path)([pair[index] for pair in pairs], padding="max_length",
                                                         truncation=True, max_length=self.context_length,
                                                         return_tensors="np")
            out[f"{name}input_ids"] = tokens["input_ids"].astype(np.int64)
            out[f"{name}attention_mask"] = tokens["attention_mask"].astype(np.int64)
        return out


# -- datasets ------------------------------------------------------------------------------
def _placement(config: Config) -> dict[str, Any]:
    """Ray resources that keep data work on CPU nodes (``resources.data``), never on GPUs."""
    resources = {config.resources.data: 1} if config.resources.data else None
    return {"num_cpus": 1, "num_gpus": 0, **({"resources": resources} if resources else {})}


def _per_study(config: Config, raw: bool) -> dict[str, Any]:
    """Ray Data arguments of a per-study step: up to ``data.decode_concurrency`` tasks at a time on
    CPU nodes, each asking for ``data.decode_memory_mb`` of memory where it decodes ``raw`` files (a
    shard-cache task holds a few uint8 studies, and asks for none). Every step of a stream gets the
    same ones, so Ray Data fuses them into one task, and the memory covers the whole of it."""
    memory = {"memory": config.data.decode_memory_mb * 2**20} if raw else {}
    return {"compute": ray.data.TaskPoolStrategy(size=config.data.decode_concurrency), **_placement(config),
            **memory}


def _decodes(source: StudySource) -> bool:
    """Whether ``source`` decodes raw files (every source but the shard cache)."""
    return not isinstance(source, ShardStudies)


def _read_studies(items, source: StudySource, config: Config, epoch: int = 0, *, raw: bool = True):
    """A dataset of items -> the study records a source gives them, reading ahead in each task;
    ``raw``: the source decodes raw files (``_per_study``)."""
    return items.map_batches(ReadAhead(source, epoch), batch_size=None, batch_format="pyarrow",
                             **_per_study(config, raw))


def study_records(rows: list[StudyRow], config: Config, storage: Storage, quarantine, *,
                  train: bool, epoch: int = 0, needs_report: bool = True):
    """Ray Dataset of study records decoded from raw files, in manifest order (streamed).

    Training keeps ``data.scans_per_study`` scans per study, tried in random order;
    evaluation and the shard cache keep up to ``data.max_eval_scans`` in manifest order. Studies without
    report text are refused unless ``needs_report`` is off (``RawStudies``).
    """
    loader = RawStudies.of_config(config, storage, quarantine, train=train, needs_report=needs_report)
    # Small blocks of manifest rows: each decode task takes ``STUDIES_PER_TASK``, so the work spreads
    # evenly over the workers however uneven the studies are (1 to many scans).
    manifest = ray.data.from_items([row.to_item() for row in rows], override_num_blocks=_decode_blocks(len(rows)))
    return _read_studies(manifest, loader, config, epoch)


def study_examples(records, config: Config, *, train: bool, batch_size: int | None = 8, raw: bool = True):
    """Study records -> tokenized fixed-K examples (the batch contract of training and evaluation alike; ``train``
    samples ``data.scans_per_study`` scans at random, else the first ``data.max_eval_scans``).

    Ray Data fuses decoding, scan sampling and tokenizing into one task per block, up to
    ``data.decode_concurrency`` at a time; each task worker loads the tokenizer once
    (``worker_tokenizer``). ``raw``: the records are decoded from raw files (``study_records``), so
    these steps ask for the decode's memory too, and fuse with it. Tasks, not an actor pool: run in
    Ray Data's actors the same fused steps on raw DICOM from S3 gave 2.3-2.5 studies/s against 4.0-4.3
    as tasks (64 studies, 2 CPUs, moto; ``benchmarks/bench_data.py``'s corpus).
    """
    scans = config.data.scans_per_study if train else config.data.max_eval_scans
    sampler = ScanSampler(scans, train, config.train.seed, repeat=config.data.fill_scans == "repeat")
    examples = records.map(sampler, **_per_study(config, raw))
    text = config.model.text
    tokenizer = ReportTokenizer(text.name_or_path, text.context_length, config.data.shuffle_sentences and train,
                                config.train.seed, sentence_dropout=config.data.sentence_dropout if train else 0.0,
                                prefix=config.data.report_prefix,
                                one_sentence=train and config.model.sentence_loss_weight > 0)
    return examples.map_batches(tokenizer, batch_size=batch_size, **_per_study(config, raw))


def training_stream(items: list[dict], source: StudySource, config: Config, *, start: int, stop: int):
    """Training examples at global positions ``[start, stop)`` of the data order, in order
    (``stop`` rounded up to fill the last chunk).

    Blocks hold exactly ``train.chunk_size`` examples, so Ray Train's equal split hands them to
    the workers in turn and every global step takes positions ``[s * G, (s + 1) * G)`` (G the
    global batch), however many workers there are. Needs ``preserve_order`` in the ingest options.
    The positions come in blocks of ``chunk_size``, and a source that never drops a study (the
    shard cache) keeps them so; after one that may (raw files with bad scans), the examples are
    re-blocked.
    """
    count = stop - start
    if count <= 0:
        raise ValueError(f"no positions to stream: start {start}, stop {stop}")
    chunk = config.train.chunk_size
    chunks = -(-count // chunk)
    positions = ray.data.from_items([{"id": k} for k in range(chunks * chunk)],
                                    override_num_blocks=min(chunks, MAX_BLOCKS))
    raw = _decodes(source)
    records = _read_studies(positions, StudiesAtPositions(items, source, config.train.seed, start), config, raw=raw)
    examples = study_examples(records, config, train=True, batch_size=None, raw=raw)
    if source.drops_studies or chunks > MAX_BLOCKS:   # blocks not exactly one chunk
        examples = examples.repartition(target_num_rows_per_block=chunk, strict=True)
    # A block is never split for size: 4 examples of a full-size study are over Ray's 128 MiB default.
    examples.context.target_max_block_size = None
    return _ordered_quietly(examples)


def _ordered_quietly(examples):
    """``examples`` in order, and without Ray Data's progress log: a stream runs for the whole of
    training (in Ray Train's split coordinator), and would add a line every 10 s to the console,
    where the trainer's own progress lines say where the run is."""
    examples.context.execution_options.preserve_order = True
    examples.context.enable_progress_bars = False
    return examples


def evaluation_stream(items: list[dict], source: StudySource, config: Config):
    """Evaluation examples of ``items``, in order: up to ``data.max_eval_scans`` scans, no randomness."""
    listed = ray.data.from_items(items, override_num_blocks=_decode_blocks(len(items)))
    raw = _decodes(source)
    records = _read_studies(listed, source, config, raw=raw)
    examples = study_examples(records, config, train=False, batch_size=None, raw=raw)
    return _ordered_quietly(examples)


class StudyBatchCollate(NumpyBatchCollateFn):
    """``iter_torch_batches`` collate_fn: tensors for arrays, lists for ``study_id`` / ``labels``."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        out: dict[str, Any] = {}
        for key, value in batch.items():
            if key == "study_id":
                out[key] = [str(v) for v in value]
            elif key == "labels":
                out[key] = [json.loads(v) for v in value]
            else:
                out[key] = torch.from_numpy(np.array(value, copy=True))
        return out


collate_study_batch = StudyBatchCollate()
