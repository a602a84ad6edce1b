"""One contrastive training step over a global batch larger than memory: the exact gradient cache.

A worker holds its share of the global batch (``B`` studies, cut into chunks of ``chunk_size``):

1. every chunk but the last runs forward **without** grad; the RNG state (CPU and accelerator)
   before each is saved, so any randomness not keyed on the study (text dropout) can be replayed.
   The study encoder's own draws (scan slots, patch dropout, drop-path) are keyed on
   ``study_seeds`` and repeat by construction. The last chunk runs **with** grad and keeps its
   graph: one chunk's activations, which pass 3 holds anyway, so memory stays flat;
2. the embeddings of all workers are all-gathered and the loss is computed on the global batch;
   its gradient with respect to this worker's embeddings (and the logit scale / bias) is kept;
3. the dot product of each chunk's embeddings with their cached gradient is backpropagated: the
   last chunk's through the graph it kept, every other chunk's after running it forward again
   with grad, its RNG state restored. The RNG ends where pass 1 left it, as after a plain step.

So a step over ``n`` chunks costs ``n - 1`` extra forwards (none for a plain step, ``n = 1``).

The parameter gradient equals that of one full-batch step on one process, whatever the chunk
count and the number of workers. A frozen text transformer (eval mode, no grad) is not run twice:
its pooled output from pass 1 is reused in pass 3.

``forward`` is the model (or the DeepSpeed engine wrapping it) called as ``StudyCLIP.forward``;
``backward`` backpropagates a scalar (``Tensor.backward``, or the engine's ``backward``). Under
data parallelism the gradients of the workers are averaged (DDP, DeepSpeed), so the embedding
terms are multiplied by the world size; the logit scale and bias, whose gradient every worker
computes in full, are not.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from hlip_ray.model.contrastive import contrastive_loss
from hlip_ray.train.gather import gather_global, with_local_leaf, world

BATCH_TENSORS = ("pixels", "scan_mask", "input_ids", "attention_mask", "study_seeds")
SENTENCE_TENSORS = ("sentence_input_ids", "sentence_attention_mask")   # the dual loss's one sentence


@dataclass
class StepResult:
    loss: float
    logit_scale: float


def _rng_state(device: torch.device) -> tuple:
    accelerator = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), accelerator


def _restore_rng(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _chunks(batch: dict[str, torch.Tensor], chunk_size: int) -> list[dict[str, torch.Tensor]]:
    size = len(batch["pixels"])
    keys = [key for key in BATCH_TENSORS + SENTENCE_TENSORS if key in batch]
    return [{key: batch[key][start : start + chunk_size] for key in keys} for start in range(0, size, chunk_size)]


def contrastive_step(
    forward: Callable[..., dict],
    backward: Callable[[torch.Tensor], object],
    batch: dict[str, torch.Tensor],
    *,
    loss: str,
    chunk_size: int | None,
    text_frozen: bool = False,
    sentence_weight: float = 0.0,
) -> StepResult:
    """Accumulate the gradient of the global-batch contrastive loss into the parameters.

    Args:
        batch: this worker's studies: ``pixels [B, K, C, D, H, W]``, ``scan_mask [B, K]``,
            ``input_ids``/``attention_mask [B, L]``, ``study_seeds [B]`` (int64), on the device.
        loss: ``clip`` or ``siglip``.
        chunk_size: studies per forward with grad; None (or ``>= B``): a plain step, one forward
            with grad and no recomputation.
        text_frozen: the text transformer is frozen (its pass-1 output is reused).
        sentence_weight: the dual loss: ``loss(study, report) + sentence_weight * loss(study,
            sentence)``, the sentence one per study in ``sentence_input_ids`` /
            ``sentence_attention_mask [B, L]`` (the same logit scale and bias). 0: the report only.

    The optimizer step is the caller's. Returns the loss (the same on every worker) and the
    logit scale.
    """
    size = len(batch["pixels"])
    dual = sentence_weight > 0
    if dual and not all(key in batch for key in SENTENCE_TENSORS):
        raise ValueError("the dual loss needs one sentence per study: sentence_input_ids and sentence_attention_mask")
    if not dual:
        batch = {key: value for key, value in batch.items() if key not in SENTENCE_TENSORS}
    chunks = _chunks(batch, min(chunk_size or size, size))
    last = len(chunks) - 1
    device = batch["pixels"].device
    _, world_size = world()

    # Pass 1: embeddings of every chunk; the last keeps its graph, the others are run without grad.
    states, outputs = [], []
    for chunk in chunks[:last]:
        states.append(_rng_state(device))
        with torch.no_grad():
            outputs.append(forward(**chunk))
    outputs.append(forward(**chunks[last]))
    end_state = _rng_state(device)

    # Pass 2: the loss on the global batch and its gradient with respect to this worker's embeddings.
    names = ("study_features", "text_features") + (("sentence_features",) if dual else ())
    local = {name: torch.cat([out[name] for out in outputs]).detach().float().requires_grad_() for name in names}
    scale = outputs[0]["logit_scale"].detach().float().requires_grad_()
    bias = outputs[0]["logit_bias"]
    bias = bias.detach().float().requires_grad_() if bias is not None else None
    gathered = {name: with_local_leaf(gather_global(leaf), leaf) for name, leaf in local.items()}
    value = contrastive_loss(loss, gathered["study_features"], gathered["text_features"], scale, bias)
    if dual:
        value = value + sentence_weight * contrastive_loss(
            loss, gathered["study_features"], gathered["sentence_features"], scale, bias)
    leaves = [*local.values(), scale] + ([bias] if bias is not None else [])
    grads = torch.autograd.grad(value, leaves)
    embedding_grads = dict(zip(names, grads))
    scale_grad = grads[len(names)]
    bias_grad = grads[len(names) + 1] if bias is not None else None
    offsets = [0, *itertools.accumulate(len(chunk["pixels"]) for chunk in chunks)]

    def backpropagate(index: int, out: dict) -> None:
        rows = slice(offsets[index], offsets[index + 1])
        surrogate = world_size * sum((out[name].float() * grad[rows]).sum() for name, grad in embedding_grads.items())
        if index == last:  # the logit scale and bias once per step, through the kept graph
            surrogate = surrogate + out["logit_scale"].float() * scale_grad
            if bias_grad is not None:
                surrogate = surrogate + out["logit_bias"].float() * bias_grad
        backward(surrogate)

    # Pass 3: the kept graph first (freeing it), then every other chunk again with grad, RNG replayed.
    backpropagate(last, outputs[last])
    for index, chunk in enumerate(chunks[:last]):
        _restore_rng(states[index], device)
        pooled = {key: outputs[index][key] for key in ("text_pooled", "sentence_pooled")
                  if text_frozen and key in outputs[index]}
        backpropagate(index, forward(**chunk, **pooled))
    _restore_rng(end_state, device)
    return StepResult(loss=float(value.detach()), logit_scale=float(scale.detach()))
