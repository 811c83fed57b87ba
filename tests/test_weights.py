import ast

import numpy as np
import pytest

from openelm_mlx.config import get_preset
from openelm_mlx.weights import WeightsError, check_weights, corenet_to_hf, expected_shapes, hf_names, hf_to_corenet


def test_names_and_order_equal_apples_state_dict(configs_dir):
    text = (configs_dir / "OpenELM-270M.state-dict-keys.txt").read_text()
    apple = ast.literal_eval(text.strip().removeprefix("odict_keys(").removesuffix(")"))
    assert len(apple) == 130
    cfg = get_preset("OpenELM-270M")
    assert set(expected_shapes(cfg)) == set(apple)
    assert set(hf_names(cfg)) == set(apple)
    # Apple's order within a layer differs from ours only in where the two norms sit; layer order is the same.
    layer_of = lambda k: int(k.split(".")[2]) if ".layers." in k else -1  # noqa: E731
    assert [layer_of(k) for k in apple[1:-1]] == sorted(layer_of(k) for k in apple[1:-1])


def _fake(cfg):
    return {k: np.zeros(s, np.float32) for k, s in expected_shapes(cfg).items()}


def test_check_weights_lists_every_problem_at_once():
    cfg = get_preset("tiny")
    w = _fake(cfg)
    del w["transformer.layers.2.attn.q_norm.weight"]
    del w["transformer.norm.weight"]
    w["lm_head.weight"] = np.zeros((2, 2))
    w["transformer.layers.1.ffn.proj_1.weight"] = np.zeros((10, 256))
    with pytest.raises(WeightsError) as e:
        check_weights(w, cfg, source="ckpt.safetensors")
    msg = str(e.value)
    assert "ckpt.safetensors" in msg
    assert "transformer.layers.2.attn.q_norm.weight" in msg and "transformer.norm.weight" in msg
    assert "lm_head.weight" in msg
    assert "transformer.layers.1.ffn.proj_1.weight: expected (896, 256), got (10, 256)" in msg


def test_corenet_round_trip_drops_vocab_padding():
    cfg = get_preset("tiny")
    hf = _fake(cfg)
    cn = hf_to_corenet(hf, cfg)
    assert "layers.0.attn.qkv_proj.weight" in cn and "token_embeddings.weight" in cn
    cn["token_embeddings.weight"] = np.zeros((32128, cfg.model_dim), np.float32)
    back = corenet_to_hf(cn, cfg)
    assert back["transformer.token_embeddings.weight"].shape == (32000, cfg.model_dim)
    assert set(back) == set(hf)
    with pytest.raises(WeightsError, match="classifier.weight"):
        corenet_to_hf({**cn, "classifier.weight": np.zeros(1)}, cfg)
