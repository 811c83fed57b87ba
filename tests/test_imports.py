"""Import rules: config and weight tables import neither torch nor mlx; the MLX side never imports torch."""

import subprocess
import sys

import pytest


def modules_after_import(stmt: str) -> set:
    code = f"import sys; {stmt}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return set(out.split())


@pytest.mark.parametrize("module", ["openelm_mlx", "openelm_mlx.config", "openelm_mlx.weights"])
def test_pure_modules_import_neither_framework(module):
    loaded = modules_after_import(f"import {module}")
    assert "torch" not in loaded and "mlx" not in loaded


@pytest.mark.parametrize("module", ["openelm_mlx.model", "openelm_mlx.checkpoint", "openelm_mlx.tokenizer",
                                    "openelm_mlx.data", "openelm_mlx.adapters", "openelm_mlx.tuner",
                                    "openelm_mlx.lora", "openelm_mlx.fuse", "openelm_mlx.generate",
                                    "openelm_mlx.perplexity", "openelm_mlx.convert", "openelm_mlx.engine",
                                    "openelm_mlx.server", "openelm_mlx.chat"])
def test_mlx_side_does_not_import_torch(module):
    loaded = modules_after_import(f"import {module}")
    assert "torch" not in loaded
