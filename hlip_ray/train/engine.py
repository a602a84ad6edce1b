"""The DeepSpeed engine around the CLIP model: ZeRO stage, precision, AdamW groups, schedule.

On CPU (``DS_ACCELERATOR=cpu``) DeepSpeed runs with the gloo backend Ray Train set up; the same
code runs on GPUs with NCCL.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from hlip_ray.config import Config

# Parameters without weight decay: norms and biases (1-D), position embeddings, CLS, logit scale/bias.
NO_DECAY_NAMES = ("pos_embed", "cls_token", "logit_scale", "logit_bias")
DECAYED_GROUP = 0   # parameter_groups' order: the decayed group, then the rest


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on weight matrices and kernels; none on norms, biases, positions, CLS, scale."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or any(key in name for key in NO_DECAY_NAMES):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_factor: float = 0.0) -> float:
    """Linear warmup over ``warmup_steps``, then cosine decay to ``min_factor`` at ``max_steps``.

    ``step`` counts optimizer steps already taken: the first update uses ``lr_factor(0)`` =
    ``1 / warmup_steps``. Not ``transformers.get_cosine_schedule_with_warmup``: its cosine is this
    one, but its warmup is ``step / warmup_steps``, so its first update has a learning rate of zero
    (AdamW still moves its moments), and every run's numbers would shift by a step.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))


def deepspeed_config(config: Config, world_size: int, load_universal: bool = False) -> dict:
    """The DeepSpeed config dict of a run at ``world_size`` workers.

    The gradient cache owns accumulation: every chunk's backward only accumulates
    (``managed_gradient_accumulation: false``) and ``step()`` ends the step, so ZeRO 0/1 reduce
    gradients once per step; ZeRO 2/3 reduce on every backward by design.
    """
    train = config.train
    local_batch = train.global_batch_size // world_size
    ds: dict = {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": local_batch,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": {"stage": train.zero_stage},
        "steps_per_print": 10**9,
        "zero_allow_untested_optimizer": True,
        "wall_clock_breakdown": False,
    }
    if load_universal:  # resuming a checkpoint written at another world size
        ds["checkpoint"] = {"load_universal": True}
    if train.zero_stage >= 2:
        ds["zero_optimization"].update({"overlap_comm": False, "contiguous_gradients": True})
    if train.zero_stage == 3:   # ``save_16bit_model`` gathers the partitions into one model file
        ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    if train.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif train.precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return ds


def build_engine(model: nn.Module, config: Config, world_size: int, load_universal: bool = False):
    """``(engine, optimizer, scheduler)``: AdamW (torch's) and warmup + cosine, wrapped by DeepSpeed.

    ``load_universal``: the engine will load a universal checkpoint (another world size's state).
    """
    import deepspeed

    train = config.train
    optimizer = torch.optim.AdamW(
        parameter_groups(model, train.weight_decay), lr=train.lr, betas=(0.9, 0.98), eps=1e-6
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, train.warmup_steps, train.max_steps)
    )
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(config, world_size, load_universal), dist_init_required=False,
    )
    return engine, optimizer, scheduler


def continue_schedule(engine, scheduler, config: Config, step: int) -> None:
    """After a checkpoint was restored at ``step``: this config's learning rate and weight decay (a PBT trial
    continues another trial's checkpoint with its own), and the learning rate of the next step under this
    run's schedule (``train.max_steps`` may have grown since the checkpoint)."""
    scheduler.base_lrs = [config.train.lr] * len(scheduler.base_lrs)
    engine.optimizer.param_groups[DECAYED_GROUP]["weight_decay"] = config.train.weight_decay
    scheduler.last_epoch = step - 1
    scheduler.step()
