"""Where a trained model runs: ``eval.device`` resolved, in this process or in a Ray actor.

``eval.device`` is ``auto`` (CUDA where there is one), ``cpu`` or ``cuda``. Two places read it:

- **this process** (``local_device``): ``hlip-ray predict``, one local study without Ray. ``auto`` is CUDA
  when torch sees a device here.
- **a Ray actor** (``actor_placement``): ``hlip-ray eval``'s encoder and ``hlip-ray embed``'s actors. The
  actor asks for what a training worker asks for, so it lands in the trainer pool, never on the head (whose
  CPU is 0): one CPU, one unit of ``resources.trainer`` where that is set, and a GPU (``embed.num_gpus`` of
  one for embed) where the device resolves to CUDA. ``auto`` is CUDA when the cluster has GPUs or can grow
  nodes that have them (its autoscaler's node types, ``ray_runtime.max_cluster_resources``), or, on a
  cluster that can grow, when the config says its trainers have them (``train.use_gpu``: a GPU pool whose
  nodes the autoscaler cannot be asked about, as on KubeRay). The actor is told its device: Ray 2.60 leaves
  ``CUDA_VISIBLE_DEVICES`` alone for an actor that asked for no GPU, so torch there may see GPUs it does
  not hold.

``cuda`` where there is none is a ``ConfigError`` naming ``eval.device``, before any work; so is a
``resources.trainer`` that no node of a local cluster (this machine alone) has. ``hlip-ray export`` only
copies weights into a file and loads on the CPU whatever the device: a GPU would add two copies, and
tensors saved from it would load back onto a GPU.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

from hlip_ray.config import Config, ConfigError


def local_device(config: Config):
    """``torch.device`` of ``eval.device`` in this process: ``auto`` is ``cuda`` where torch sees a device."""
    import torch

    choice = config.eval.device
    present = torch.cuda.is_available()
    if choice == "cuda" and not present:
        raise ConfigError("eval.device=cuda, but torch sees no CUDA device on this machine (set eval.device=auto "
                          "or eval.device=cpu)")
    return torch.device("cuda" if choice == "cuda" or (choice == "auto" and present) else "cpu")


@dataclass(frozen=True)
class Placement:
    """Where a Ray actor that runs the model goes, and the device it puts the model on."""

    device: str
    """``cuda`` or ``cpu``: what the actor moves the model to."""
    num_gpus: float
    """GPUs the actor asks for (0 on ``cpu``)."""
    resources: dict[str, float] = field(default_factory=dict)
    """Custom resources it asks for: one unit of ``resources.trainer`` where that is set."""

    def options(self) -> dict[str, Any]:
        """Ray remote arguments (``ray.remote(...).options(**...)``, ``Dataset.map_batches(**...)``)."""
        return {"num_cpus": 1, "num_gpus": self.num_gpus, **({"resources": self.resources} if self.resources else {})}

    def describe(self) -> str:
        """The request as one short phrase, e.g. ``1 CPU, 1 GPU, 1 gpu_pool``."""
        gpus = f", {self.num_gpus:g} GPU" if self.num_gpus else ""
        return "1 CPU" + gpus + "".join(f", {amount:g} {name}" for name, amount in self.resources.items())


def actor_placement(config: Config, *, gpus: float = 1.0, gpus_asked: bool = False,
                    cluster: dict[str, float] | None = None, local: bool | None = None) -> Placement:
    """The placement of a model actor on the Ray cluster (module docstring). Ray must be initialised unless
    ``cluster`` and ``local`` are given.

    ``gpus``: the actor's share of a GPU when it runs on CUDA; ``gpus_asked``: the caller's config says the
    cluster has GPUs (``embed.num_gpus`` > 0), as ``train.use_gpu`` does. ``cluster``: the resources the
    cluster can hold at its largest (``ray_runtime.max_cluster_resources``); ``local``: whether it is this
    machine alone, unable to grow (``ray_runtime.is_local_cluster``). There a request no node can meet is a
    ``ConfigError`` (it would wait forever); elsewhere the actor waits for the node that brings it.
    """
    if cluster is None or local is None:
        from hlip_ray.ray_runtime import is_local_cluster, max_cluster_resources

        cluster = max_cluster_resources()[0] if cluster is None else cluster
        local = is_local_cluster() if local is None else local
    choice = config.eval.device
    declared = config.train.use_gpu or gpus_asked
    present = cluster.get("GPU", 0) > 0 or (declared and not local)
    if choice == "cuda" and not present:
        raise ConfigError("eval.device=cuda, but the Ray cluster has no GPU" + (
            "" if local else " and train.use_gpu is false (set train.use_gpu=true where the trainer pool's GPUs "
                             "are still to start)") + ": set eval.device=auto or eval.device=cpu")
    on_gpu = choice == "cuda" or (choice == "auto" and present)
    trainer = config.resources.trainer
    placement = Placement("cuda" if on_gpu else "cpu", gpus if on_gpu else 0.0, {trainer: 1.0} if trainer else {})
    if local and trainer and cluster.get(trainer, 0) < 1:
        raise ConfigError(f"resources.trainer={trainer}: no node of this Ray cluster (this machine alone) has that "
                          f"resource, so the model's actor would never start: set resources.trainer=null here")
    return placement


def announce_wait(placement: Placement, what: str) -> None:
    """One line on stderr where no node has the resources of ``placement`` now (an autoscaler's node is to
    start): ``what`` waits for one. Nothing otherwise."""
    import ray

    now = ray.cluster_resources()
    wanted = {**placement.resources, **({"GPU": placement.num_gpus} if placement.num_gpus else {})}
    missing = [name for name, amount in wanted.items() if now.get(name, 0) < amount]
    if missing:
        print(f"{what} asks for {placement.describe()}; no node has {', '.join(missing)} now, so it starts when "
              "one joins", file=sys.stderr, flush=True)
