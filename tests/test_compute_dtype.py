import mlx.core as mx
import numpy as np
import pytest
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


def test_prepare_moves_weights_to_cache_lines_unchanged(monkeypatch):
    """cpu.memory.align_weights (run by cpu.prepare for decode and prefill on the CPU): every float32 array up to
    ALIGN_MAX_BYTES starts on a 64-byte boundary afterwards, with the same values, dtype and shape; larger ones and
    other dtypes (bfloat16, quantized uint32) stay put; OPENELM_MLX_ALIGN_WEIGHTS=0 moves none."""
    import mlx.nn as nn

    from openelm_mlx import cpu, switches
    from openelm_mlx.cpu import memory

    if not cpu.active():
        pytest.skip("the CPU layer applies on MLX's CPU backend (not macOS, not a GPU)")

    def fresh():
        model = Model(get_preset("tiny"))
        nn.quantize(model, group_size=32, bits=4, class_predicate=lambda p, m: p.endswith("proj_2"))
        model.transformer.norm.weight = model.transformer.norm.weight.astype(mx.bfloat16)
        mx.eval(model.parameters())
        return model

    def addresses(model):
        return {k: memory._address(v) % memory.ALIGN for k, v in tree_flatten(model.parameters())}

    model = fresh()
    before = {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())}
    monkeypatch.setattr(memory, "ALIGN_MAX_BYTES", 200_000)
    stay = {k for k, v in tree_flatten(model.parameters()) if v.nbytes > 200_000 or v.dtype != mx.float32}
    old = addresses(model)
    off_line = {k for k, a in old.items() if a and k not in stay}  # here: all (MLX: 8 past 16 bytes)
    assert memory.align_weights(model) == len(off_line) > 0
    after = addresses(model)
    assert all(after[k] == 0 for k in after if k not in stay)
    assert all(after[k] == old[k] for k in stay)
    for k, v in tree_flatten(model.parameters()):
        np.testing.assert_array_equal(np.array(v.astype(mx.float32)), before[k])
    assert dict(tree_flatten(model.parameters()))["transformer.norm.weight"].dtype == mx.bfloat16
    with switches.override(ALIGN_WEIGHTS=False):
        assert memory.align_weights(fresh()) == 0
