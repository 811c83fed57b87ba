"""openelm-mlx: Apple's OpenELM (layer-wise scaled transformers) trained in PyTorch, run and fine-tuned in MLX.

Importing the package does not import mlx or torch; the public API below is loaded on first use. On Linux it
first loads an optimized BLAS for MLX's CPU backend (see `openelm_mlx.blas`; OPENELM_MLX_BLAS=none turns it off).
"""

from . import blas as _blas

_blas.preload()  # must run before anything imports mlx.core

__version__ = "0.1.0"

_LAZY = {
    "OpenELMConfig": "config", "get_preset": "config", "layer_plan": "config", "load_config": "config",
    "Model": "model", "Tokenizer": "tokenizer", "load_model": "checkpoint", "save_model": "checkpoint",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'openelm_mlx' has no attribute {name!r}")
