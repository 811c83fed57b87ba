import json

import pytest

from openelm_mlx.config import (PRESETS, ConfigError, OpenELMConfig, from_dict, get_preset, layer_plan,
                                load_config, make_divisible, num_parameters, to_dict, uniform_variant)

APPLE_PARAMS = {"270M": 271_527_168, "450M": 457_179_136, "1_1B": 1_079_891_456, "3B": 3_036_647_424}


@pytest.mark.parametrize("size,count", APPLE_PARAMS.items())
def test_parameter_counts_equal_apples(size, count):
    assert num_parameters(get_preset(f"OpenELM-{size}")) == count


def test_270m_plan_matches_design_table():
    plan = layer_plan(get_preset("OpenELM-270M"))
    assert [p.num_query_heads for p in plan] == [12] * 5 + [16] * 7 + [20] * 4
    assert [p.num_kv_heads for p in plan] == [3] * 5 + [4] * 7 + [5] * 4
    assert [p.ffn_dim for p in plan] == [768, 1024, 1280, 1536, 1792, 2048, 2560, 2816, 3072, 3328, 3584, 3840,
                                         4352, 4608, 4864, 5120]


@pytest.mark.parametrize("size", APPLE_PARAMS)
def test_derived_apple_configs_load_as_presets(configs_dir, size):
    data = json.loads((configs_dir / "derived" / f"OpenELM-{size}.json").read_text())
    cfg = from_dict(data)
    assert cfg == get_preset(size)
    ours = to_dict(cfg)
    for key in data:  # every key Apple's config writes, with Apple's values
        assert ours[key] == data[key], key


def test_real_instruct_config_loads_as_270m(configs_dir):
    assert load_config(configs_dir / "OpenELM-270M-Instruct.json") == get_preset("OpenELM-270M")
    assert load_config(configs_dir / "OpenELM-270M.printed-config.json") == get_preset("OpenELM-270M")


def test_module_tree_shapes(configs_dir):
    tree = (configs_dir / "OpenELM-270M.module-tree.txt").read_text()
    import re

    qkv_out = [int(m) for m in re.findall(r"\(qkv_proj\): Linear\(in_features=1280, out_features=(\d+)", tree)]
    plan = layer_plan(get_preset("OpenELM-270M"))
    assert qkv_out == [(p.num_query_heads + 2 * p.num_kv_heads) * 64 for p in plan]
    proj1_out = [int(m) for m in re.findall(r"\(proj_1\): Linear\(in_features=1280, out_features=(\d+)", tree)]
    assert proj1_out == [2 * p.ffn_dim for p in plan]


@pytest.mark.parametrize("name", list(PRESETS))
def test_config_json_round_trip(tmp_path, name):
    cfg = PRESETS[name]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(to_dict(cfg)))
    assert load_config(tmp_path) == cfg


def test_tampered_per_layer_list_names_the_layer(configs_dir):
    data = json.loads((configs_dir / "OpenELM-270M-Instruct.json").read_text())
    data["num_query_heads"][7] = 20
    with pytest.raises(ConfigError, match=r"num_query_heads\[7\] \(layer 7\)"):
        from_dict(data)
    data = json.loads((configs_dir / "OpenELM-270M-Instruct.json").read_text())
    data["ffn_multipliers"][3] = 1.5
    with pytest.raises(ConfigError, match=r"ffn_multipliers\[3\] \(layer 3\)"):
        from_dict(data)


def test_unknown_keys_are_reported():
    data = to_dict(get_preset("tiny"))
    data["num_experts"] = 8
    with pytest.raises(ConfigError, match="num_experts"):
        from_dict(data)


def test_invalid_json_names_file_and_line(tmp_path):
    (tmp_path / "config.json").write_text('{\n "model_dim": 3,\n oops\n}')
    with pytest.raises(ConfigError, match=r"config.json: invalid JSON at line 3"):
        load_config(tmp_path)


def test_tiny_preset_every_layer_differs_and_is_quantizable():
    cfg = get_preset("openelm-tiny")
    plan = layer_plan(cfg)
    assert len({p.num_query_heads for p in plan}) == len(plan)
    assert len({p.ffn_dim for p in plan}) == len(plan)
    for p in plan:  # every Linear's input dim is a multiple of 64
        assert cfg.model_dim % 64 == 0 and (p.num_query_heads * cfg.head_dim) % 64 == 0 and p.ffn_dim % 64 == 0


def test_make_divisible_matches_corenet_examples():
    assert make_divisible(640, 256) == 768
    assert make_divisible(1280 * 0.73, 256) == 1024
    assert make_divisible(100, 64) == 128  # 64 would be 36% below, so one more divisor is added


def test_presets_are_frozen():
    with pytest.raises(Exception):
        PRESETS["OpenELM-270M"].model_dim = 1


def test_unsupported_variant_is_refused():
    with pytest.raises(ConfigError, match="ffn_with_glu"):
        OpenELMConfig(num_transformer_layers=2, model_dim=64, head_dim=16, ffn_with_glu=False)


def test_uniform_variant_matches_parameter_budget():
    for name in ("OpenELM-tiny", "OpenELM-270M"):
        cfg = get_preset(name)
        uni = uniform_variant(cfg)
        plan = layer_plan(uni)
        assert len({(p.num_query_heads, p.ffn_dim) for p in plan}) == 1
        assert abs(num_parameters(uni) - num_parameters(cfg)) / num_parameters(cfg) < 0.01
