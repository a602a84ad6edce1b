"""A weights file that is missing, truncated or not ours is refused with its path, before any worker starts."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from hlip_ray.config import ConfigError, load_config
from hlip_ray.inference.trained_model import load_model
from hlip_ray.model.weight_files import load_state_dict_file
from hlip_ray.storage import Storage


def _damaged_files(tmp_path):
    random_pt = tmp_path / "random.pt"
    random_pt.write_bytes(bytes(range(256)) * 8)
    whole = tmp_path / "whole.safetensors"
    save_file({"weight": torch.ones(64, 64)}, str(whole))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    code = tmp_path / "code.pt"
    torch.save({"model": {"weight": torch.ones(2)}, "callback": print}, str(code))   # a pickle with a function
    return random_pt, truncated, code


def test_damaged_weights_files_are_refused_naming_the_file(tmp_path):
    for path in _damaged_files(tmp_path):
        with pytest.raises(ValueError) as error:
            load_state_dict_file(path)
        message = str(error.value)
        assert message.startswith(str(path)), message
        assert "weights_only=False" not in message   # never advice to unpickle code


def test_a_run_checkpoint_with_damaged_weights_names_its_file(tmp_path):
    from hlip_ray.run_checkpoint import TrainState

    folder = tmp_path / "checkpoint_00000010"
    folder.mkdir()
    (folder / "train_state.json").write_text(TrainState(step=10).to_json())
    (folder / "config.yaml").write_text("model:\n  depth: 3\n  embed_dim: 48\n  num_heads: 2\n")
    (folder / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match=r"checkpoint_00000010/model.safetensors: not a readable safetensors"):
        load_model(str(folder), Storage())


def test_train_with_a_wrong_checkpoint_path_fails_before_any_worker_starts(ray_session, tmp_path):
    import time

    from hlip_ray.train.run import build_trainer

    config = load_config(None, [f"train.storage_path={tmp_path}/runs", f"data.manifest={tmp_path}/m.parquet"])
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"--checkpoint .*/runs/demo/checkpoint_0000060: .*neither a run checkpoint"):
        build_trainer(config, init_checkpoint=f"{tmp_path}/runs/demo/checkpoint_0000060")
    assert time.monotonic() - started < 30
