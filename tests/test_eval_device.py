"""Where a trained model runs (``hlip_ray/eval/placement.py``): ``eval.device`` resolved in this process
(``predict``) and for the Ray actors of ``eval`` and ``embed``, which ask for a training worker's resources.
Plain functions of the config and the cluster's resources: no Ray, no model."""

from __future__ import annotations

import pytest
import torch

from hlip_ray.config import ConfigError, load_config
from hlip_ray.eval.placement import actor_placement, local_device
from hlip_ray.inference.embed import embed_placement

NO_GPU = {"CPU": 8.0, "trainer": 4.0}
GPU_NODES = {"CPU": 16.0, "GPU": 2.0, "gpu_pool": 2.0}


def test_auto_is_the_cpu_here_and_cuda_without_a_device_fails_naming_the_key():
    assert local_device(load_config(None, [])).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert local_device(load_config(None, ["eval.device=cpu"])).type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="eval.device=cuda"):
            local_device(load_config(None, ["eval.device=cuda"]))
    with pytest.raises(ConfigError, match="eval.device"):
        load_config(None, ["eval.device=gpu"])


def test_an_actor_asks_for_a_training_workers_resources_and_a_gpu_only_where_there_is_one():
    config = load_config(None, ["resources.trainer=trainer"])
    on_cpu = actor_placement(config, cluster=NO_GPU, local=True)
    assert on_cpu.device == "cpu"
    assert on_cpu.options() == {"num_cpus": 1, "num_gpus": 0.0, "resources": {"trainer": 1.0}}
    gpu_pool = load_config(None, ["resources.trainer=gpu_pool"])
    on_gpu = actor_placement(gpu_pool, cluster=GPU_NODES, local=False)
    assert on_gpu.device == "cuda"
    assert on_gpu.options() == {"num_cpus": 1, "num_gpus": 1.0, "resources": {"gpu_pool": 1.0}}
    assert actor_placement(load_config(None, ["eval.device=cpu"]), cluster=GPU_NODES, local=False).num_gpus == 0
    assert actor_placement(load_config(None, []), cluster=NO_GPU, local=True).options() == {
        "num_cpus": 1, "num_gpus": 0.0}   # no resources.trainer: one CPU anywhere


def test_train_use_gpu_counts_where_the_cluster_can_grow_gpu_nodes_not_on_this_machine_alone():
    """An autoscaling cluster whose GPU pool is at zero nodes: ``train.use_gpu`` says the GPUs will come."""
    config = load_config(None, ["train.use_gpu=true"])
    assert actor_placement(config, cluster=NO_GPU, local=False).device == "cuda"
    assert actor_placement(config, cluster=NO_GPU, local=True).device == "cpu"
    with pytest.raises(ConfigError, match="eval.device=cuda"):
        actor_placement(load_config(None, ["eval.device=cuda"]), cluster=NO_GPU, local=False)
    with pytest.raises(ConfigError, match="eval.device=cuda"):
        actor_placement(load_config(None, ["eval.device=cuda", "train.use_gpu=true"]), cluster=NO_GPU, local=True)


def test_a_trainer_resource_no_node_of_a_local_cluster_has_fails_rather_than_waiting_forever():
    config = load_config(None, ["resources.trainer=gpu_pool"])
    with pytest.raises(ConfigError, match="resources.trainer=gpu_pool"):
        actor_placement(config, cluster=NO_GPU, local=True)
    assert actor_placement(config, cluster=NO_GPU, local=False).resources == {"gpu_pool": 1.0}   # a node may join


def test_embed_actors_take_their_gpu_share_and_refuse_a_share_on_the_cpu():
    half = load_config(None, ["embed.num_gpus=0.5"])
    assert embed_placement(half, cluster=NO_GPU, local=False).options()["num_gpus"] == 0.5   # says GPUs will come
    assert embed_placement(load_config(None, []), cluster=GPU_NODES, local=False).num_gpus == 1.0
    assert embed_placement(load_config(None, []), cluster=NO_GPU, local=True).num_gpus == 0.0
    with pytest.raises(ConfigError, match="eval.device=cpu.*embed.num_gpus"):
        embed_placement(load_config(None, ["eval.device=cpu", "embed.num_gpus=1"]), cluster=GPU_NODES, local=False)
