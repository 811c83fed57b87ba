"""Apple's pre-training recipes: every packaged recipe loads and carries apple/corenet's values for its size
(`projects/openelm/pretraining_configs/openelm_*.yaml`), smoke variants keep them at a small scale, recipes
resolve by name, and the uniform ablation variant of every recipe's model matches its parameter budget."""

import json
import tomllib

import pytest
import torch

from conftest import ROOT, shared_file
from openelm_mlx import recipes
from openelm_mlx.config import get_preset, layer_plan, num_parameters, uniform_variant
from openelm_mlx.reference.model import build_model
from openelm_mlx.reference.train import (TrainConfig, TrainingError, lr_at, main, make_optimizer, model_config,
                               resolve_config, train, with_global_batch)

# size: preset, peak LR, min LR, activation checkpointing, FSDP, parameters (from corenet's configs and the paper)
APPLE = {
    "270m": ("OpenELM-270M", 5.3e-3, 5.3e-4, False, False, 271_527_168),
    "450m": ("OpenELM-450M", 3.9e-3, 3.9e-4, True, False, 457_179_136),
    "1_1b": ("OpenELM-1_1B", 2.4e-3, 2.4e-4, True, False, 1_079_891_456),
    "3b": ("OpenELM-3B", 1.2e-3, 1.2e-4, True, True, 3_036_647_424),
}
SHARED = dict(adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, weight_decay=0.1, grad_clip=1.0, z_loss=1e-4,
              warmup_init_lr=1e-6)


def test_every_size_has_a_recipe_and_a_smoke_variant():
    assert recipes.names() == sorted(f"openelm-{s}{v}" for s in APPLE for v in ("", "-smoke"))


@pytest.mark.parametrize("size", APPLE)
def test_recipe_has_apples_settings(size):
    preset, lr, min_lr, checkpointing, fsdp, params = APPLE[size]
    tc = resolve_config(["-c", f"openelm-{size}"])
    cfg = model_config(tc, 32000)
    assert cfg == get_preset(preset) and num_parameters(cfg) == params
    assert (tc.lr, tc.min_lr) == (lr, min_lr)
    assert {k: getattr(tc, k) for k in SHARED} == SHARED
    assert (tc.iters, tc.warmup, tc.seq_len, tc.pack, tc.corenet_filters) == (350_000, 5_000, 2048, False, True)
    assert (tc.dtype, tc.activation_checkpointing, tc.fsdp) == ("bfloat16", checkpointing, fsdp)
    # ~4M tokens per step on Apple's 128 GPUs, and the same on one 8-GPU node through gradient accumulation
    for gpus, accum in ((128, 1), (8, 16)):
        run = with_global_batch(tc, gpus)
        assert run.grad_accum == accum
        assert run.batch_size * run.grad_accum * gpus * run.seq_len == 4_194_304
    # the schedule: 1e-6 at step 0, the peak after 5k warmup steps, 0.1 x peak at 350k
    assert lr_at(0, tc) == pytest.approx(1e-6) and lr_at(5_000, tc) == pytest.approx(lr)
    assert lr_at(350_000, tc) == pytest.approx(min_lr)


@pytest.mark.parametrize("size", APPLE)
def test_smoke_recipe_keeps_the_optimizer_and_scaling_and_is_small(size):
    full = resolve_config(["-c", f"openelm-{size}"])
    smoke = resolve_config(["-c", f"openelm-{size}-smoke"])
    for key in (*SHARED, "lr", "min_lr", "preset", "activation_checkpointing"):
        assert getattr(smoke, key) == getattr(full, key), key
    big, small = model_config(full, 32000), model_config(smoke, 32000)
    for key in ("head_dim", "num_gqa_groups", "qkv_multipliers", "ffn_multipliers", "ffn_dim_divisor"):
        assert getattr(small, key) == getattr(big, key), key
    assert len({p.ffn_dim for p in layer_plan(small)}) > 1  # still layer-wise scaled
    assert num_parameters(small) < 80_000_000 and smoke.seq_len <= 256 and not smoke.fsdp
    assert not smoke.corenet_filters  # the stories a smoke run trains on are all under corenet's 256 tokens


def test_optimizer_takes_the_recipes_betas_and_eps():
    tc = resolve_config(["-c", "openelm-270m-smoke", "--adam-beta2", "0.99"])
    model = build_model(get_preset("tiny").replace(num_transformer_layers=1, vocab_size=64), seed=0)
    group = make_optimizer(model, tc).param_groups[0]
    assert group["betas"] == (0.9, 0.99) and group["eps"] == 1e-8 and group["weight_decay"] == 0.1


def test_recipe_by_name_path_or_error(tmp_path, capsys):
    by_name = resolve_config(["-c", "OpenELM-1.1B"])
    by_path = resolve_config(["--config", str(recipes.RECIPES_DIR / "openelm-1_1b.yaml"), "--lr", "1e-3"])
    assert by_name.preset == by_path.preset == "OpenELM-1_1B" and by_path.lr == 1e-3
    with pytest.raises(recipes.RecipeError, match="openelm-270m-smoke"):
        resolve_config(["-c", "openelm-7b"])
    assert main(["-c", "openelm-7b", "--out", str(tmp_path / "r")]) == 1
    assert "no such settings file or packaged recipe" in capsys.readouterr().err


def test_global_batch_must_divide():
    with pytest.raises(TrainingError, match="not a multiple of batch_size x processes = 16 x 3"):
        with_global_batch(TrainConfig(batch_size=16, global_batch=2048), 3)
    assert with_global_batch(TrainConfig(grad_accum=3), 5).grad_accum == 3  # no global_batch: unchanged


def test_recipes_ship_as_package_data():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "*.yaml" in setuptools["package-data"]["openelm_mlx.recipes"]
    assert (ROOT / "openelm_mlx" / "recipes" / "__init__.py").exists()  # a package, so find_packages takes it


@pytest.mark.parametrize("name", ["tiny", *recipes.names()])
def test_uniform_variant_matches_the_budget(name):
    cfg = get_preset(name) if name == "tiny" else model_config(resolve_config(["-c", name]), 32000)
    uni = uniform_variant(cfg)
    plans, uni_plans = layer_plan(cfg), layer_plan(uni)
    assert len(set(uni_plans)) == 1 and len(uni_plans) == len(plans) and uni.model_dim == cfg.model_dim
    assert abs(num_parameters(uni) / num_parameters(cfg) - 1) < 0.01
    # same attention share: the query width on the grid nearest the layer-wise mean
    step = cfg.num_gqa_groups
    mean_heads = sum(p.num_query_heads for p in plans) / len(plans)
    assert abs(uni_plans[0].num_query_heads - mean_heads) <= step / 2


@pytest.mark.slow
def test_run_dir_records_the_variant(tmp_path):
    torch.set_num_threads(1)
    common = dict(data=[str(shared_file("tinystories-fixture-4kb.txt"))],
                  tokenizer=str(shared_file("llama2-tokenizer.model")), model_dim=64, num_transformer_layers=3,
                  head_dim=16, ffn_dim_divisor=32, seq_len=16, batch_size=2, iters=1, warmup=1, val_batches=1)
    records = {}
    for uniform in (False, True):
        result = train(**common, uniform=uniform, out=str(tmp_path / str(uniform)))
        records[uniform] = json.loads((result.run_dir / "model.json").read_text())
        saved = json.loads((result.run_dir / "train_config.json").read_text())
        assert saved["uniform"] is uniform
    assert records[False]["variant"] == "layer-wise" and records[True]["variant"] == "uniform"
    assert len({json.dumps(x) for x in records[True]["layers"]}) == 1
    assert len({json.dumps(x) for x in records[False]["layers"]}) == 3
    assert abs(records[True]["num_parameters"] / records[False]["num_parameters"] - 1) < 0.01
