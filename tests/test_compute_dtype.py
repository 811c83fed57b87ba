import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from openelm_mlx.config import get_preset
from openelm_mlx.cpu import dtype as cpu_dtype
from openelm_mlx.model import Model

CFG = get_preset("tiny").replace(vocab_size=512, num_transformer_layers=2)


def dtypes(model):
    return {v.dtype for _, v in tree_flatten(model.parameters())}


def test_half_model_is_upcast_only_where_float32_is_fastest():
    model = Model(CFG)
    model.set_dtype(mx.float16)
    ids = mx.array([[1, 5, 9, 200]])
    before = np.array(model(ids).astype(mx.float32))
    used = cpu_dtype.apply(model, None, "lora")
    if cpu_dtype.preferred() == "float32":
        assert used == "float32" and dtypes(model) == {mx.float32}
        np.testing.assert_allclose(np.array(model(ids)), before, atol=5e-2)  # same weights, more precision
    else:
        assert used is None and dtypes(model) == {mx.float16}


def test_float32_model_is_never_downcast_by_default_and_explicit_dtype_wins():
    model = Model(CFG)
    assert cpu_dtype.apply(model, None, "decode") is None and dtypes(model) == {mx.float32}
    assert cpu_dtype.apply(model, "bfloat16", "lora") == "bfloat16" and dtypes(model) == {mx.bfloat16}
