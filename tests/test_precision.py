"""The default precision (``train.precision: bf16``) trains end to end: ``hlip-ray train`` on Ray Train +
DeepSpeed (CPU accelerator, gloo), and proof that the weights really trained in bf16 under DeepSpeed,
so that a silent fall-back to fp32 fails here.

The GPU check (``benchmarks/gpu_check.sh``) runs without Ray and DeepSpeed: its CPU dry run is tested in
``tests/test_benchmarks.py``.
"""

from __future__ import annotations

import json
import math

import pytest

from hlip_ray import cli
from hlip_ray.config import load_config
from hlip_ray.inference.trained_model import load_model
from hlip_ray.run_checkpoint import DEEPSPEED_DIR, MODEL_FILE, latest_checkpoint
from hlip_ray.storage import Storage
from hlip_ray.train.engine import deepspeed_config
from tests.helpers import TINY_MODEL, synthetic_corpus, tiny_bert_dir

STEPS = 4


def test_the_default_precision_is_bf16_and_reaches_deepspeed():
    config = load_config(None, [])
    assert config.train.precision == "bf16"
    ds = deepspeed_config(config, world_size=2)
    assert ds["bf16"] == {"enabled": True} and "fp16" not in ds
    assert "bf16" not in deepspeed_config(load_config(None, ["train.precision=fp32"]), world_size=2)


@pytest.mark.slow
def test_the_default_precision_trains_end_to_end_in_bf16_under_deepspeed(ray_session, tmp_path, monkeypatch):
    """4 steps of a tiny model, 2 workers, ZeRO-2 (the defaults), with ``train.precision`` left at its
    default. The run ends, its losses are finite, its checkpoint loads, and the weights trained in bf16:
    the engine that wrote the checkpoint had bf16 enabled and held bf16 parameters beside fp32 master
    copies, every consolidated weight is a bf16 value, and the study encoder moved from its init.

    Run as a user types it, from a folder that is not the one Ray's workers run in: a relative ``--config``
    whose manifest, text tower, checkpoint and log folders are relative paths too."""
    import torch
    import yaml
    from safetensors.torch import load

    from hlip_ray.model import build_model

    synthetic_corpus(tmp_path / "corpus", studies=8, seed=11, val_fraction=0.0)
    text = tiny_bert_dir(tmp_path).relative_to(tmp_path)
    overrides = [
        *TINY_MODEL, f"model.text.name_or_path={text}",
        "data.manifest=corpus/manifest.parquet", "train.global_batch_size=4", "train.chunk_size=1",
        "train.lr=1e-3", "train.warmup_steps=1", f"train.max_steps={STEPS}", f"train.checkpoint_every={STEPS}",
        "train.max_failures=0", "train.run_name=bf16", "train.storage_path=runs",
        "train.log_dir=logs", "resources.data=data_pool", "resources.trainer=trainer",
    ]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(load_config(None, overrides).model_dump(mode="json")))
    config = load_config(None, overrides)
    assert (config.train.precision, config.train.zero_stage, config.train.num_workers) == ("bf16", 2, 2)
    assert cli.main(["train", "--config", "run.yaml"]) == 0
    config = load_config(None, [*overrides, f"model.text.name_or_path={tmp_path / text}"])

    lines = [json.loads(line) for line in (tmp_path / "logs" / "bf16" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, STEPS + 1))
    assert all(math.isfinite(line["loss"]) for line in lines)

    storage = Storage()
    uri, state = latest_checkpoint(str(tmp_path / "runs" / "bf16"), storage)
    assert state.step == STEPS and state.world_size == 2
    model, loaded = load_model(uri, storage)
    assert loaded.train.precision == "bf16" and model.visual.embed_dim == 24

    # What DeepSpeed itself saved: its config, the module's parameters, and the optimizer's master copies.
    tag_dir = tmp_path / "runs" / "bf16" / uri.rsplit("/", 1)[1] / DEEPSPEED_DIR / state.deepspeed_tag
    engine_state = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    assert engine_state["ds_config"]["bf16"]["enabled"] is True
    assert not engine_state["ds_config"].get("fp16", {}).get("enabled", False)
    # Parameters only: the fixed sin-cos position tables are buffers, kept in fp32 by the model.
    parameters = {name for group in engine_state["param_shapes"] for name in group}
    parameters |= set(engine_state["frozen_param_shapes"])
    assert len(parameters) > 10 and not parameters & set(engine_state["buffer_names"])
    assert {engine_state["module"][name].dtype for name in parameters} == {torch.bfloat16}
    masters = []
    for rank in range(2):
        optimizer = torch.load(tag_dir / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", map_location="cpu",
                               weights_only=False)["optimizer_state_dict"]
        masters += optimizer["single_partition_of_fp32_groups"]
    assert masters and {tensor.dtype for tensor in masters} == {torch.float32}

    # The consolidated weights (float32 in the file) are the bf16 weights the engine trained...
    weights = load(storage.read_bytes(f"{uri}/{MODEL_FILE}"))
    assert parameters <= set(weights)
    for name in parameters:
        assert torch.equal(weights[name], weights[name].bfloat16().float()), f"{name} is not a bf16 value"
    # ...and they trained: the study encoder is not its init (the same seed builds the same init).
    torch.manual_seed(config.train.seed)
    initial = build_model(config).state_dict()
    visual = [name for name in parameters if name.startswith("visual.") and weights[name].numel() > 1]
    moved = [name for name in visual if not torch.equal(weights[name], initial[name].bfloat16().float())]
    assert len(moved) >= 0.8 * len(visual), (len(moved), len(visual))
