"""Several Ray nodes on one machine (``ray.cluster_utils.Cluster``): work lands where its resources say.

A data node (``data_pool``), a trainer node (``trainer``) and a head with neither. Decoding runs
only on the data node, trainers only on the trainer node, and a node-local ``storage_path`` is
refused before any training starts. The cluster lives in a child process, apart from the
session's single-node Ray.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO_ROOT

SCRIPT = textwrap.dedent('''
    import json, os, sys, tempfile
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_tasks

    from hlip_ray.config import ConfigError, load_config
    from hlip_ray.data.manifest import build_manifest
    from hlip_ray.data.quarantine import create_quarantine_log
    from hlip_ray.storage import Storage
    from hlip_ray.demo.synth import folder_writer, write_corpus
    from hlip_ray.train.run import build_trainer
    from tests.helpers import raw_training_examples

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": True})
    data_node = cluster.add_node(num_cpus=4, resources={"data_pool": 8})
    trainer_node = cluster.add_node(num_cpus=2, resources={"trainer": 2})
    ray.init(address=cluster.address, log_to_driver=False)
    out = {"data_node": data_node.node_id, "trainer_node": trainer_node.node_id}

    root = tempfile.mkdtemp()
    write_corpus(folder_writer(root + "/raw"), studies=4, seed=2)
    rows = build_manifest(root + "/raw", Storage(), salt="s", val_fraction=0.0)
    config = load_config(None, ["data.grid=[16,32,32]", "data.scans_per_study=2", "data.windows=[[0,80]]",
                                "model.text.context_length=16", "resources.data=data_pool",
                                "resources.trainer=trainer", f"data.manifest={root}/manifest.parquet"])
    batches = list(raw_training_examples(rows, config, Storage(), create_quarantine_log()).iter_batches())
    out["studies"] = sum(len(batch["study_id"]) for batch in batches)
    tasks = list_tasks(filters=[("type", "=", "NORMAL_TASK")], limit=10000, raise_on_missing_output=False)
    out["data_task_nodes"] = sorted({task.node_id for task in tasks
                                     if "ReadAhead" in task.name or "ScanSampler" in task.name})

    def where(loop_config):
        import ray.train
        rank = ray.train.get_context().get_world_rank()
        with open(f"{loop_config['root']}/worker-{rank}.node", "w") as file:
            file.write(ray.get_runtime_context().get_node_id())

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    scaling = ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1, "trainer": 1})
    TorchTrainer(where, train_loop_config={"root": root}, scaling_config=scaling,
                 run_config=RunConfig(storage_path=root + "/runs", name="where")).fit()
    out["trainer_nodes_seen"] = sorted({open(f"{root}/worker-{rank}.node").read() for rank in (0, 1)})

    from hlip_ray.data.manifest import write_manifest
    write_manifest(rows, root + "/manifest.parquet", Storage())
    try:
        build_trainer(config.model_copy(update={"train": config.train.model_copy(update={"storage_path": root})}))
        out["local_storage"] = "accepted"
    except ConfigError as error:
        out["local_storage"] = str(error)
    print("RESULT " + json.dumps(out))
    ray.shutdown()
    cluster.shutdown()
''')


@pytest.mark.slow
def test_decoding_and_trainers_land_on_their_node_pools_and_local_storage_is_refused(tmp_path):
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=600, env={**__import__("os").environ, "RAY_USAGE_STATS_ENABLED": "0"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, done.stdout[-3000:] + done.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["studies"] == 4
    assert out["data_task_nodes"] == [out["data_node"]]
    assert out["trainer_nodes_seen"] == [out["trainer_node"]]
    assert "train.storage_path" in out["local_storage"] and "3 node(s)" in out["local_storage"]
