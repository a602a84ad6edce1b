import re

import pytest

from hlip_ray.config import ConfigError, apply_overrides, dump_config, expand_layout, load_config
from hlip_ray.config_reference import config_reference


def test_defaults_are_valid_and_round_trip(tmp_path):
    config = load_config()
    assert config.model.attention_levels == ("scan", "scan", "study") * 4
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(config))
    assert load_config(path) == config


def test_dotted_overrides_apply_on_top_of_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  depth: 6\n  embed_dim: 96\n  num_heads: 2\ntrain:\n  num_workers: 2\n")
    config = load_config(path, ["model.depth=3", "data.grid=[16,32,32]", "train.num_workers=[1,2]"])
    assert config.model.depth == 3
    assert config.model.embed_dim == 96
    assert config.data.grid == [16, 32, 32]
    assert config.train.num_workers == [1, 2]


@pytest.mark.parametrize(
    "overrides, key_path",
    [
        (["model.depht=4"], "model.depht: unknown key; did you mean model.depth?"),
        (["model.text.frozenn=true"], "model.text.frozenn: unknown key; did you mean model.text.frozen?"),
        (["train.grid=[8,8,8]"], "train.grid: unknown key; did you mean data.grid?"),   # the key's own section
        (["nonsense.key=1"], "nonsense: unknown key\n"),   # nothing close: no guess
        (["model.depth=zero"], "model.depth:"),
        (["model.patch_size=[8,16]"], "model.patch_size:"),
        (["train.zero_stage=5"], "train.zero_stage:"),
        (["train.precision=fp8"], "train.precision:"),
        (["data.windows=[[350,-1150]]"], "data.windows:"),
        (["model.attention_layout=h9"], "model:"),
        (["model.pixel_std=[0]"], "model.pixel_std[0]:"),
        (["train.num_workers=[4,1]"], "train:"),
        (["train.num_workers=0"], "train.num_workers: Input should be greater than 0, or Input should be a valid list"),
        (["train.num_workers=-2"], "train.num_workers: Input should be greater than 0"),
    ],
)
def test_bad_key_or_value_fails_at_load_naming_the_key(overrides, key_path):
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    assert key_path in str(error.value) + "\n"


def test_unknown_key_in_yaml_file_names_file_and_path(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("storage:\n  endpoint_url: http://127.0.0.1:9000\n  secret: x\n")
    with pytest.raises(ConfigError, match=r"storage\.secret: unknown key") as error:
        load_config(path)
    assert str(path) in str(error.value)


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="not divisible by model.patch_size"):
        load_config(None, ["data.grid=[20,224,224]"])
    with pytest.raises(ConfigError, match="multiple of num_workers"):
        load_config(None, ["train.global_batch_size=10", "train.num_workers=2", "train.chunk_size=4"])
    # An elastic range: the global batch must split at every size the run may take.
    with pytest.raises(ConfigError, match=re.escape(
            "num_workers [1, 3]: global_batch_size 4 (workers × chunks × chunk_size 2) does not split over 3 "
            "worker(s); it does over 1, 2. Narrow the range, or make global_batch_size a multiple of 12")):
        load_config(None, ["train.num_workers=[1,3]", "train.global_batch_size=4", "train.chunk_size=2"])
    assert load_config(None, ["train.num_workers=[1,3]", "train.global_batch_size=12",
                              "train.chunk_size=2"]).train.num_workers == [1, 3]
    with pytest.raises(ConfigError, match="depth divisible by 3"):
        load_config(None, ["model.depth=4"])
    with pytest.raises(ConfigError, match="3 values for 2 channels"):
        load_config(None, ["data.windows=[[-1000,400],[0,80]]", "model.pixel_mean=[0.1,0.2,0.3]"])


def test_malformed_override_is_rejected():
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(None, ["model.depth"])


@pytest.mark.parametrize(
    "layout, depth, expected",
    [
        ("h2", 6, ("scan", "scan", "study") * 2),
        ("h3", 3, ("slice", "scan", "study")),
        ("chest", 6, ("slice", "slice", "study") * 2),
        ("full", 4, ("study",) * 4),
        ("slice,study", 2, ("slice", "study")),
        (["scan", "study"], 2, ("scan", "study")),
    ],
)
def test_layouts_by_name_or_list(layout, depth, expected):
    assert expand_layout(layout, depth) == expected


def test_layout_list_must_match_depth():
    with pytest.raises(ConfigError, match="3 levels for a model of depth 12"):
        load_config(None, ["model.attention_layout=[scan,scan,study]"])



def test_a_key_given_twice_in_a_yaml_file_is_refused_with_both_lines(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("train:\n  lr: 0.1\nmodel:\n  depth: 2\ntrain:\n  max_steps: 3\n")
    with pytest.raises(ConfigError, match=r"twice.yaml: not valid YAML: 'train' is given twice \(lines 1 and 5\)"):
        load_config(path)
    path.write_text("train:\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match=r"'lr' is given twice \(lines 2 and 3\)"):
        load_config(path)


def test_a_named_model_sets_its_geometry_and_a_key_given_beside_it_wins(tmp_path):
    from hlip_ray.named_models import NAMED_MODELS

    config = load_config(None, ["model.name=vit_base_multiscan_h3_token1176"])
    assert (config.model.embed_dim, config.model.depth, config.model.num_heads) == (768, 12, 12)
    assert config.model.attention_levels[:3] == ("slice", "scan", "study") and config.data.grid == [48, 224, 224]
    assert config.model.patch_size == [8, 16, 16] and config.model.pooling == "cls"
    path = tmp_path / "named.yaml"
    path.write_text("model:\n  name: vit_base_scan_study_dinotxt1568\n  depth: 6\n")
    config = load_config(path, ["model.num_heads=6"])
    assert (config.model.depth, config.model.num_heads, config.model.patch_size) == (6, 6, [6, 16, 16])
    assert config.model.pooling == "cls_patch_mean"
    # another name on top of a loaded config (a sweep, a resumed run's overrides) takes its geometry
    renamed = apply_overrides(config, ["model.name=vit_base_singlescan_h2_token2744"])
    assert renamed.data.grid == [112, 336, 336] and renamed.model.patch_size == [8, 24, 24]
    assert renamed.model.depth == 12 and renamed.model.max_scan_slots == 1
    assert "vit_base_slice_scan_study_dinotxt1568" in config_reference()
    assert all(f"`{name}`" in config_reference() for name in NAMED_MODELS)


def test_an_unknown_model_name_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"model.name: unknown model name 'vit_b'; known: vit_base_singlescan"):
        load_config(None, ["model.name=vit_b"])
